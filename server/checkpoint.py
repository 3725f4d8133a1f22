"""Server checkpoints: what a federation needs to continue after the server stops, saved after every round.

Just over 500 lines on purpose: the checkpoint format is one concept — writing, verifying, pruning, reading
and falling back to an older round share one layout, and splitting them would spread that layout over modules.

A checkpoint folder holds one complete folder per saved round and a ``LATEST`` pointer::

    <folder>/
      LATEST                     "round-0003" — the newest complete checkpoint
      round-0002/ round-0003/    the last ``keep`` rounds (default 2)
        global.safetensors global.json    the global adapter (shared.adapters format)
        best.safetensors   best.json      the best adapter so far (when there is one)
        strategy.safetensors              the strategy's arrays (e.g. FedAdam moments), under their own names
        state.json                        round, MLflow run id, run config + fingerprint, best metric,
                                          the strategy's JSON values, caller extras, checksums

A round is written into a hidden temporary folder, every file is fsync'ed, the folder is renamed to
``round-NNNN`` and only then is ``LATEST`` replaced (temp file + ``os.replace``). A crash at any point leaves
the previous ``LATEST`` checkpoint complete and loadable; leftovers are removed by the next save. Loading
verifies checksums and raises :class:`CheckpointError` naming the file that is missing or corrupt.

Resuming (:meth:`ServerCheckpoint.resume`) falls back to an earlier kept round when the newest one is damaged
(a disk that damaged a finished file): the damaged folder is moved aside to ``damaged-round-NNNN-<time>`` (kept
for the operator, never deleted), ``LATEST`` is pointed at the good round, and the rounds after it are run
again. A run config key that the checkpoint does not hold (added to fedabus after it was written) is accepted
when its value is the schema's default.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.reports import BestAdapter
from shared import __version__
from shared.adapters import Adapter, AdapterError, load_adapter, save_adapter
from shared.atomic import fsync_file, fsync_folder, is_temp_file, write_text_atomic

__all__ = [
    "CHECKPOINT_FORMAT",
    "RESUME_MUTABLE_KEYS",
    "CheckpointError",
    "CheckpointState",
    "DamagedCheckpoint",
    "IncompatibleCheckpointError",
    "ResumePoint",
    "ServerCheckpoint",
    "config_fingerprint",
    "load_checkpoint",
    "load_latest",
]

CHECKPOINT_FORMAT = "fedabus-server-checkpoint"
FORMAT_VERSION = 1
LATEST = "LATEST"
STATE_FILE = "state.json"
STRATEGY_FILE = "strategy.safetensors"
GLOBAL_NAME = "global"
BEST_NAME = "best"
#: Run-config keys that may change when a federation is resumed (e.g. to train for more rounds).
RESUME_MUTABLE_KEYS: tuple[str, ...] = ("num-server-rounds",)
_ROUND_DIR = re.compile(r"^round-(\d{4,})$")
_TMP_PREFIX = ".tmp-"
#: Name prefix of a damaged round folder moved aside by a resume (never matched by ``_ROUND_DIR``).
DAMAGED_PREFIX = "damaged-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt; the message names the file."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint was written by a federation with another run config."""


# ------------------------------------------------------------------------------------------ config
def _json_config(config: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(config), sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run config must hold JSON values only (str, int, float, bool): {exc}") from None


def config_fingerprint(config: Mapping[str, Any], *, ignore: Iterable[str] = RESUME_MUTABLE_KEYS) -> str:
    """``sha256:<hex>`` of a flat run config's keys and values (sorted), leaving out the keys in ``ignore``."""
    skip = set(ignore)
    kept = {k: v for k, v in _json_config(config).items() if k not in skip}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _config_differences(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    skip: set[str],
    defaults: Mapping[str, Any] | None = None,
) -> tuple[list[str], list[str]]:
    """``(differences, defaulted)``: ``"key: checkpoint X, now Y"`` for every key (outside ``skip``) whose value
    differs or is absent, and the keys absent from ``saved`` whose value now is their default in ``defaults``
    (a key added to the schema after the checkpoint was written: not a difference)."""
    lines, defaulted = [], []
    defaults = _json_config(defaults or {})
    for key in sorted((set(saved) | set(current)) - skip):
        old = repr(saved[key]) if key in saved else "(absent)"
        new = repr(current[key]) if key in current else "(absent)"
        if key not in saved and key in current and key in defaults and current[key] == defaults[key]:
            defaulted.append(key)
        elif key not in saved or key not in current or saved[key] != current[key]:
            lines.append(f"{key}: checkpoint {old}, now {new}")
    return lines, defaulted


# ------------------------------------------------------------------------------------------ state
@dataclass(frozen=True)
class CheckpointState:
    """One loaded checkpoint.

    ``strategy_state`` maps names to numpy arrays / torch tensors (same type, dtype and shape as saved) or
    JSON values; ``config`` is the flat run config the federation ran with; ``extra`` holds the caller's
    JSON values (e.g. the last round's ``RoundReport.to_json()``); ``path`` is the round folder.
    """

    server_round: int
    global_adapter: Adapter
    strategy_state: dict[str, Any]
    mlflow_run_id: str
    config: dict[str, Any]
    config_fingerprint: str
    best: BestAdapter | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    saved_at: str = ""

    def check_compatible(
        self,
        config: Mapping[str, Any],
        *,
        ignore: Iterable[str] = RESUME_MUTABLE_KEYS,
        defaults: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Raise IncompatibleCheckpointError listing every key whose value differs from the saved config.

        A key the checkpoint lacks is accepted when its value equals its default in ``defaults`` (the schema's,
        flat); returns those keys so the caller can log them."""
        skip = set(ignore)
        differences, defaulted = _config_differences(self.config, _json_config(config), skip, defaults)
        if differences:
            where = self.path / STATE_FILE if self.path is not None else "the checkpoint"
            raise IncompatibleCheckpointError(
                f"{where}: cannot resume round {self.server_round + 1} with this run config; it differs from "
                f"the checkpoint's in {len(differences)} key(s): {'; '.join(differences)}. Restore those "
                "values, or start a new federation with another checkpoint folder."
            )
        return defaulted


@dataclass(frozen=True)
class DamagedCheckpoint:
    """A round folder a resume could not load: ``reason`` names the file; ``moved_to`` is where it was put
    aside (None when it was not moved, e.g. ``LATEST`` named a folder that does not exist)."""

    path: Path
    reason: str
    moved_to: Path | None = None


@dataclass(frozen=True)
class ResumePoint:
    """What :meth:`ServerCheckpoint.resume` found: the checkpoint to continue from, the newer rounds that were
    damaged (their rounds are run again) and the config keys accepted at their schema default."""

    state: CheckpointState
    damaged: tuple[DamagedCheckpoint, ...] = ()
    defaulted: tuple[str, ...] = ()

    @property
    def fell_back(self) -> bool:
        """Whether the newest checkpoint was damaged and an earlier one is resumed."""
        return bool(self.damaged)


# ------------------------------------------------------------------------------------------ encoding
def _split_strategy_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """Arrays (as CPU tensors, own memory), their kinds (``torch``/``numpy``/``numpy-scalar``), JSON values."""
    arrays: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    values: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"strategy state keys must be str, got {key!r}")
        if isinstance(value, torch.Tensor):
            arrays[key], kinds[key] = value.detach().to("cpu").contiguous().clone(), "torch"
        elif isinstance(value, np.ndarray | np.generic):
            array = np.asarray(value)
            if array.dtype == object:
                raise TypeError(f"strategy state {key!r}: object arrays cannot be checkpointed")
            try:
                arrays[key] = torch.from_numpy(np.array(array, copy=True, order="C"))  # keeps 0-d shapes
            except TypeError:
                raise TypeError(
                    f"strategy state {key!r}: numpy dtype {array.dtype} cannot be checkpointed"
                ) from None
            kinds[key] = "numpy-scalar" if isinstance(value, np.generic) else "numpy"
        else:
            try:
                values[key] = json.loads(json.dumps(value))
            except (TypeError, ValueError):
                raise TypeError(
                    f"strategy state {key!r}: {type(value).__name__} is neither an array nor a JSON value"
                ) from None
    return arrays, kinds, values


def _join_strategy_state(
    arrays: Mapping[str, torch.Tensor], kinds: Mapping[str, str], values: Mapping
) -> dict:
    state: dict[str, Any] = dict(values)
    for key, kind in kinds.items():
        tensor = arrays[key]
        state[key] = (
            tensor if kind == "torch" else tensor.numpy()[()] if kind == "numpy-scalar" else tensor.numpy()
        )
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _round_dirs(folder: Path) -> dict[int, Path]:
    out = {}
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _ROUND_DIR.match(path.name)
        if match and path.is_dir():
            out[int(match.group(1))] = path
    return out


# ------------------------------------------------------------------------------------------ writing
class ServerCheckpoint:
    """Atomic per-round checkpoints in ``folder``, keeping the newest ``keep`` rounds."""

    def __init__(self, folder: str | Path, *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the latest checkpoint is always kept), got {keep}")
        self.folder = Path(folder)
        self.keep = keep

    def latest_round(self) -> int | None:
        """The round ``LATEST`` points to (read from the pointer only), or None."""
        name = _read_pointer(self.folder)
        return None if name is None else int(_ROUND_DIR.match(name).group(1))

    def save(
        self,
        *,
        server_round: int,
        global_adapter: Adapter,
        config: Mapping[str, Any],
        strategy_state: Mapping[str, Any] | None = None,
        mlflow_run_id: str = "",
        best: BestAdapter | None = None,
        extra: Mapping[str, Any] | None = None,
        ignore: Iterable[str] = RESUME_MUTABLE_KEYS,
    ) -> Path:
        """Write the checkpoint of a completed round and make it the latest; returns its folder.

        ``config`` is the flat run config (its fingerprint leaves out ``ignore``); ``strategy_state`` maps
        names to arrays/tensors or JSON values; ``extra`` must be JSON. Raises ValueError when
        ``server_round`` is not above the latest saved round.
        """
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
            raise ValueError(f"server_round must be an int >= 0, got {server_round!r}")
        latest = self.latest_round()
        if latest is not None and server_round <= latest:
            raise ValueError(
                f"{self.folder / LATEST}: round {server_round} is not after the latest checkpoint (round {latest})"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        tmp = self.folder / f"{_TMP_PREFIX}round-{server_round:04d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            state = self._state_json(server_round, config, mlflow_run_id, best, extra, ignore)
            self._write_round(tmp, state, global_adapter, strategy_state or {}, best)
            target = self.folder / f"round-{server_round:04d}"
            if target.exists():  # an orphan of a crash before LATEST moved; LATEST never points here
                shutil.rmtree(target)
            os.replace(tmp, target)
            fsync_folder(self.folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._point_latest_to(target.name)
        self._apply_retention(server_round)
        return target

    @staticmethod
    def _state_json(
        server_round: int,
        config: Mapping[str, Any],
        mlflow_run_id: str,
        best: BestAdapter | None,
        extra: Mapping[str, Any] | None,
        ignore: Iterable[str],
    ) -> dict[str, Any]:
        try:
            extra_json = json.loads(json.dumps(dict(extra or {})))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint extra must be JSON: {exc}") from None
        ignore = list(ignore)
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            "fedabus_version": __version__,
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "server_round": server_round,
            "mlflow_run_id": mlflow_run_id,
            "config": _json_config(config),
            "config_fingerprint": config_fingerprint(config, ignore=ignore),
            "config_fingerprint_ignores": ignore,
            "best": None
            if best is None
            else {"metric": best.metric, "value": best.value, "server_round": best.server_round},
            "extra": extra_json,
        }

    @staticmethod
    def _write_round(
        folder: Path,
        state: dict[str, Any],
        global_adapter: Adapter,
        strategy_state: Mapping[str, Any],
        best: BestAdapter | None,
    ) -> None:
        from safetensors.torch import save_file

        save_adapter(global_adapter, folder / GLOBAL_NAME)
        if best is not None:
            save_adapter(best.adapter, folder / BEST_NAME)
        arrays, kinds, values = _split_strategy_state(strategy_state)
        save_file(arrays, str(folder / STRATEGY_FILE), metadata={"format": CHECKPOINT_FORMAT})
        state["strategy"] = {"arrays": kinds, "values": values}
        state["files"] = {STRATEGY_FILE: _sha256(folder / STRATEGY_FILE)}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        for path in folder.iterdir():
            fsync_file(path)
        fsync_folder(folder)

    def _point_latest_to(self, name: str) -> None:
        write_text_atomic(self.folder / LATEST, name + "\n", fsync=True)

    def _remove_leftovers(self) -> None:
        for path in self.folder.iterdir():
            if path.name.startswith(_TMP_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith(_TMP_PREFIX) or is_temp_file(path):
                path.unlink(missing_ok=True)

    def _apply_retention(self, latest: int) -> None:
        rounds = _round_dirs(self.folder)
        keep = sorted(r for r in rounds if r <= latest)[-self.keep :]
        for number, path in rounds.items():
            if number not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # ---------------------------------------------------------------- reading
    def load_latest(self) -> CheckpointState | None:
        """The checkpoint ``LATEST`` points to, or None when there is none (see :func:`load_latest`)."""
        return load_latest(self.folder)

    def resume(
        self,
        config: Mapping[str, Any],
        *,
        ignore: Iterable[str] = RESUME_MUTABLE_KEYS,
        defaults: Mapping[str, Any] | None = None,
    ) -> ResumePoint | None:
        """The newest loadable checkpoint, checked against ``config`` (see :meth:`CheckpointState.check_compatible`
        for ``ignore`` and ``defaults``); None when no round was ever completed.

        When the newest round is damaged, the next older kept round is tried, and so on: the damaged folders are
        moved aside (``damaged-round-NNNN-<time>``) and ``LATEST`` points at the round resumed, so the rounds
        after it are run again and checkpointed under their own numbers. Raises CheckpointError naming every
        damaged file and its reason when no kept round loads, IncompatibleCheckpointError when the good one
        was written with another run config (nothing is moved then)."""
        try:
            name = _read_pointer(self.folder)
        except CheckpointError as exc:
            name, pointer_problem = None, str(exc)
        else:
            pointer_problem = None
        rounds = _round_dirs(self.folder)
        if name is None and pointer_problem is None:
            return None
        newest = int(_ROUND_DIR.match(name).group(1)) if name is not None else max(rounds, default=-1)
        damaged: list[DamagedCheckpoint] = []
        if name is not None and newest not in rounds:
            damaged.append(
                DamagedCheckpoint(
                    self.folder / name, f"{self.folder / LATEST}: points to a folder that does not exist"
                )
            )
        elif pointer_problem is not None:
            damaged.append(DamagedCheckpoint(self.folder / LATEST, pointer_problem))
        for number in sorted((r for r in rounds if r <= newest), reverse=True):
            try:
                state = load_checkpoint(rounds[number])
            except CheckpointError as exc:
                damaged.append(DamagedCheckpoint(rounds[number], str(exc)))
                continue
            defaulted = state.check_compatible(config, ignore=ignore, defaults=defaults)
            moved = tuple(self._put_aside(d) for d in damaged)
            if damaged:
                self._point_latest_to(rounds[number].name)
            return ResumePoint(state, moved, tuple(defaulted))
        reasons = "; ".join(d.reason for d in damaged) or f"{self.folder}: no round folder"
        raise CheckpointError(
            f"cannot resume from {self.folder}: no kept checkpoint is usable ({reasons}). Move the damaged "
            "round folder(s) away to start the federation again from scratch in this folder, or set another "
            "federation.work-dir; keep federation.checkpoint-keep >= 2 so that an earlier round can stand in."
        )

    def _put_aside(self, damaged: DamagedCheckpoint) -> DamagedCheckpoint:
        """Move a damaged round folder to ``damaged-<name>-<UTC time>`` beside it (kept, never deleted)."""
        if not _ROUND_DIR.match(damaged.path.name) or not damaged.path.is_dir():
            return damaged
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.folder / f"{DAMAGED_PREFIX}{damaged.path.name}-{stamp}-{uuid.uuid4().hex[:4]}"
        os.replace(damaged.path, target)
        fsync_folder(self.folder)
        return DamagedCheckpoint(damaged.path, damaged.reason, target)


# ------------------------------------------------------------------------------------------ reading
def _read_pointer(folder: Path) -> str | None:
    pointer = folder / LATEST
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer}: cannot read the checkpoint pointer ({exc})") from None
    if not _ROUND_DIR.match(name):
        raise CheckpointError(f"{pointer}: expected a folder name like 'round-0003', found {name[:80]!r}")
    return name


def load_latest(folder: str | Path) -> CheckpointState | None:
    """The checkpoint named by ``folder/LATEST``; None when the folder or the pointer does not exist (no
    round was ever completed). Raises CheckpointError naming the file when the pointer or its checkpoint is
    unreadable, partial or corrupt."""
    folder = Path(folder)
    name = _read_pointer(folder)
    if name is None:
        return None
    path = folder / name
    if not path.is_dir():
        raise CheckpointError(f"{folder / LATEST}: points to {path}, which does not exist")
    return load_checkpoint(path)


def _read_state_json(path: Path) -> dict[str, Any]:
    state_path = path / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{state_path}: missing; the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_path}: unreadable or not valid JSON ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{state_path}: not a fedabus server checkpoint")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{state_path}: format version {state['format_version']} is newer than this fedabus supports"
        )
    missing = [
        k
        for k in ("server_round", "mlflow_run_id", "config", "config_fingerprint", "strategy", "files")
        if k not in state
    ]
    if missing:
        raise CheckpointError(f"{state_path}: missing field(s) {missing}")
    return state


def _read_adapter(path: Path) -> Adapter:
    try:
        return load_adapter(path)
    except AdapterError as exc:
        raise CheckpointError(str(exc)) from None


def _read_strategy(path: Path, state: Mapping[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    file = path / STRATEGY_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; the checkpoint is incomplete")
    if _sha256(file) != state["files"].get(STRATEGY_FILE):
        raise CheckpointError(f"{file}: checksum differs from {path / STATE_FILE}; the file is corrupt")
    try:
        arrays = load_file(str(file))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from None
    kinds = state["strategy"].get("arrays", {})
    if set(arrays) != set(kinds):
        raise CheckpointError(f"{file}: arrays {sorted(arrays)} differ from those listed in {STATE_FILE}")
    return _join_strategy_state(arrays, kinds, state["strategy"].get("values", {}))


def load_checkpoint(path: str | Path) -> CheckpointState:
    """Read one round folder (``.../round-0003``); raises CheckpointError naming the faulty file."""
    path = Path(path)
    state = _read_state_json(path)
    match = _ROUND_DIR.match(path.name)
    if match and int(match.group(1)) != state["server_round"]:
        raise CheckpointError(
            f"{path / STATE_FILE}: records round {state['server_round']} but the folder is {path.name}"
        )
    best = None
    if state.get("best") is not None:
        info = state["best"]
        value = math.nan if info["value"] is None else float(info["value"])
        best = BestAdapter(_read_adapter(path / BEST_NAME), info["metric"], value, int(info["server_round"]))
    return CheckpointState(
        server_round=int(state["server_round"]),
        global_adapter=_read_adapter(path / GLOBAL_NAME),
        strategy_state=_read_strategy(path, state),
        mlflow_run_id=str(state["mlflow_run_id"]),
        config=dict(state["config"]),
        config_fingerprint=str(state["config_fingerprint"]),
        best=best,
        extra=dict(state.get("extra") or {}),
        path=path,
        saved_at=str(state.get("saved_at", "")),
    )
