"""Server checkpoints: exact round trips, the LATEST pointer, crashes while saving, retention, config checks and
errors that name the corrupt file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from server.checkpoint import (
    LATEST,
    CheckpointError,
    IncompatibleCheckpointError,
    ServerCheckpoint,
    config_fingerprint,
    load_latest,
)
from server.reports import BestAdapter
from shared.adapters import ADAPTER_FORMAT, Adapter

CONFIG = {
    "num-server-rounds": 5,
    "train.seg-lr": 0.0002,
    "federation.strategy": "fedadam",
    "train.precision": "fp32",
}


def make_adapter(seed: int) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "seg.image_encoder.blocks.0.attn.qkv.lora_A.weight": torch.randn(4, 16, generator=generator),
        "seg.mask_decoder.iou_token.weight": torch.randn(1, 8, generator=generator),
        "cls.head.weight": torch.randn(2, 8, generator=generator),
    }
    return Adapter(
        tensors, {"format": ADAPTER_FORMAT, "format_version": 1, "base_fingerprint": {"seg": "sha256:0"}}
    )


def strategy_state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((4, 16)).astype(np.float32)
    m[0, 0] = np.nan  # NaN payloads must survive bit for bit
    return {
        "m_t/seg.image_encoder.blocks.0.attn.qkv.lora_A.weight": m,
        "v_t/seg.image_encoder.blocks.0.attn.qkv.lora_A.weight": rng.random((4, 16)),  # float64
        "counts": np.arange(5, dtype=np.int64),
        "beta_1_power": np.float64(0.9**3),
        "torch_moment": torch.randn(3, 2, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16),
        "t": 3,
        "eta": 0.1,
        "name": "fedadam",
        "schedule": [0.1, 0.05, math.inf],
        "nested": {"tau": 1e-9, "flags": [True, None]},
    }


def save_round(ckpt: ServerCheckpoint, server_round: int, **overrides) -> Path:
    overrides.setdefault("global_adapter", make_adapter(abs(server_round)))
    overrides.setdefault("strategy_state", strategy_state(abs(server_round)))
    overrides.setdefault("mlflow_run_id", "a1b2c3")
    return ckpt.save(server_round=server_round, config=CONFIG, **overrides)


def same_bits(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.flatten().view(torch.uint8), b.flatten().view(torch.uint8))
        )
    if isinstance(a, np.ndarray | np.generic):
        return (
            type(a) is type(b)
            and a.dtype == b.dtype
            and np.shape(a) == np.shape(b)
            and a.tobytes() == b.tobytes()
        )
    return json.dumps(a) == json.dumps(b)


def test_every_field_round_trips_bit_exactly(tmp_path: Path):
    ckpt = ServerCheckpoint(tmp_path / "ckpt")
    best = BestAdapter(make_adapter(7), "global/test/dice_1click_mean", 0.123456789012345, 2)
    extra = {"round_report": {"round": 3, "evaluation": {"a": {"test/auc": None}}}}
    folder = save_round(ckpt, 3, best=best, extra=extra)
    assert folder == tmp_path / "ckpt" / "round-0003"

    state = ckpt.load_latest()
    assert state is not None and state.path == folder
    assert state.server_round == 3 and state.mlflow_run_id == "a1b2c3"
    assert state.config == CONFIG and state.config_fingerprint == config_fingerprint(CONFIG)
    assert state.extra == extra and state.saved_at
    for name, tensor in make_adapter(3).tensors.items():
        assert same_bits(tensor, state.global_adapter.tensors[name])
    assert set(state.global_adapter.tensors) == set(make_adapter(3).tensors)
    assert (state.best.metric, state.best.value, state.best.server_round) == (best.metric, best.value, 2)
    assert all(same_bits(t, state.best.adapter.tensors[k]) for k, t in best.adapter.tensors.items())
    expected = strategy_state(3)
    assert set(state.strategy_state) == set(expected)
    for key, value in expected.items():
        assert same_bits(value, state.strategy_state[key]), key


def test_a_checkpoint_without_best_or_strategy_state(tmp_path: Path):
    ckpt = ServerCheckpoint(tmp_path)
    save_round(ckpt, 0, strategy_state=None, mlflow_run_id="")
    state = load_latest(tmp_path)
    assert state.best is None and state.strategy_state == {} and state.mlflow_run_id == ""


def test_latest_pointer_semantics(tmp_path: Path):
    assert load_latest(tmp_path / "missing") is None
    ckpt = ServerCheckpoint(tmp_path, keep=5)
    assert ckpt.load_latest() is None and ckpt.latest_round() is None
    for r in (1, 2, 3):
        save_round(ckpt, r)
    assert (tmp_path / LATEST).read_text(encoding="utf-8") == "round-0003\n"
    assert ckpt.latest_round() == 3 and ckpt.load_latest().server_round == 3
    with pytest.raises(ValueError, match="round 3 is not after the latest checkpoint"):
        save_round(ckpt, 3)
    with pytest.raises(ValueError, match="int >= 0"):
        save_round(ckpt, -1)
    (tmp_path / LATEST).unlink()  # only LATEST makes a round folder count
    assert ckpt.load_latest() is None


@pytest.mark.parametrize("crash_on", ["pointer", "round folder"])
def test_a_crash_while_saving_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_on: str
):
    ckpt = ServerCheckpoint(tmp_path)
    save_round(ckpt, 1)
    save_round(ckpt, 2)
    real_replace = os.replace

    def crashing_replace(src, dst):
        name = Path(dst).name
        if (crash_on == "pointer" and name == LATEST) or (
            crash_on == "round folder" and name == "round-0003"
        ):
            raise OSError("simulated power loss")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated power loss"):
        save_round(ckpt, 3)
    monkeypatch.setattr(os, "replace", real_replace)

    state = ckpt.load_latest()
    assert state.server_round == 2 and same_bits(
        state.global_adapter.tensors["cls.head.weight"], make_adapter(2).tensors["cls.head.weight"]
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-") and p.is_dir()]
    save_round(ckpt, 3, global_adapter=make_adapter(33))  # the resumed server redoes round 3
    state = ckpt.load_latest()
    assert state.server_round == 3
    assert same_bits(
        state.global_adapter.tensors["cls.head.weight"], make_adapter(33).tensors["cls.head.weight"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "round-0002", "round-0003"]


def test_only_the_last_k_rounds_are_kept(tmp_path: Path):
    ckpt = ServerCheckpoint(tmp_path)  # keep=2 by default
    for r in range(1, 5):
        save_round(ckpt, r)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "round-0003", "round-0004"]
    single = ServerCheckpoint(tmp_path / "one", keep=1)
    save_round(single, 1)
    save_round(single, 2)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [LATEST, "round-0002"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ServerCheckpoint(tmp_path, keep=0)


def test_a_resume_with_an_incompatible_config_is_refused(tmp_path: Path):
    ckpt = ServerCheckpoint(tmp_path)
    save_round(ckpt, 2)
    assert ckpt.resume({**CONFIG, "num-server-rounds": 10}).state.server_round == 2  # more rounds is fine
    changed = {**CONFIG, "train.seg-lr": 0.001, "data.patch-size": 64}
    with pytest.raises(IncompatibleCheckpointError) as info:
        ckpt.resume(changed)
    message = str(info.value)
    assert str(tmp_path / "round-0002" / "state.json") in message
    assert "train.seg-lr: checkpoint 0.0002, now 0.001" in message
    assert "data.patch-size: checkpoint (absent), now 64" in message
    assert "cannot resume round 3" in message
    assert ckpt.resume(changed, ignore=("num-server-rounds", "train.seg-lr", "data.patch-size")) is not None


def test_config_fingerprint_ignores_order_and_resume_mutable_keys():
    shuffled = dict(reversed(list(CONFIG.items())))
    assert config_fingerprint(shuffled) == config_fingerprint(CONFIG)
    assert config_fingerprint({**CONFIG, "num-server-rounds": 9}) == config_fingerprint(CONFIG)
    assert config_fingerprint({**CONFIG, "train.seg-lr": 0.1}) != config_fingerprint(CONFIG)
    assert config_fingerprint(CONFIG).startswith("sha256:")


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "file_named"),
    [
        (lambda d: (d / "global.safetensors").write_bytes(b"truncated"), "global.safetensors"),
        (lambda d: _corrupt(d / "strategy.safetensors"), "strategy.safetensors"),
        (lambda d: (d / "strategy.safetensors").unlink(), "strategy.safetensors"),
        (lambda d: (d / "state.json").write_text('{"format": "fedabus-server-'), "state.json"),
        (lambda d: (d / "state.json").unlink(), "state.json"),
        (lambda d: (d / "best.json").unlink(), "best.json"),
        (lambda d: (d.parent / LATEST).write_text("garbage\n"), LATEST),
        (lambda d: (d.parent / LATEST).write_text("round-0009\n"), LATEST),
    ],
)
def test_a_corrupt_checkpoint_names_the_file(tmp_path: Path, damage, file_named: str):
    ckpt = ServerCheckpoint(tmp_path)
    best = BestAdapter(make_adapter(5), "global/test/auc_mean", 0.8, 1)
    folder = save_round(ckpt, 1, best=best)
    damage(folder)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_latest()
    assert file_named in str(info.value) and str(tmp_path) in str(info.value)


def test_unsupported_strategy_values_are_refused(tmp_path: Path):
    ckpt = ServerCheckpoint(tmp_path)
    with pytest.raises(TypeError, match="'optimizer'"):
        save_round(ckpt, 1, strategy_state={"optimizer": object()})
    with pytest.raises(TypeError, match="object arrays"):
        save_round(ckpt, 1, strategy_state={"names": np.array(["a", None], dtype=object)})
    with pytest.raises(TypeError, match="'labels': numpy dtype <U1"):
        save_round(ckpt, 1, strategy_state={"labels": np.array(["a", "b"])})
    assert ckpt.load_latest() is None and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_key_added_after_the_checkpoint_is_accepted_at_its_default_only(tmp_path: Path):
    ckpt = ServerCheckpoint(tmp_path)
    save_round(ckpt, 2)
    defaults = {"federation.max-update-norm": 0.0, "train.seg-lr": 0.01}
    point = ckpt.resume({**CONFIG, "federation.max-update-norm": 0.0}, defaults=defaults)
    assert point.state.server_round == 2 and point.defaulted == ("federation.max-update-norm",)
    with pytest.raises(
        IncompatibleCheckpointError, match=r"federation.max-update-norm: checkpoint \(absent\), now 5.0"
    ):
        ckpt.resume({**CONFIG, "federation.max-update-norm": 5.0}, defaults=defaults)
    # a key the checkpoint holds is compared with its saved value, whatever the schema's default
    with pytest.raises(IncompatibleCheckpointError, match="train.seg-lr: checkpoint 0.0002, now 0.01"):
        ckpt.resume({**CONFIG, "train.seg-lr": 0.01}, defaults=defaults)


def _truncate(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(size // 2)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_round(tmp_path: Path):
    ckpt = ServerCheckpoint(tmp_path)
    save_round(ckpt, 1)
    newest = save_round(ckpt, 2)
    _truncate(newest / "global.safetensors")
    point = ckpt.resume(CONFIG)
    assert point.fell_back and point.state.server_round == 1
    (damaged,) = point.damaged
    assert damaged.path == newest and str(newest / "global.safetensors") in damaged.reason
    assert damaged.moved_to is not None and damaged.moved_to.name.startswith("damaged-round-0002-")
    assert (damaged.moved_to / "global.safetensors").is_file()  # kept for the operator, not deleted
    assert (tmp_path / LATEST).read_text().strip() == "round-0001" and not newest.exists()
    # round 2 is run again and checkpointed under its own number; the damaged copy is never pruned
    save_round(ckpt, 2)
    save_round(ckpt, 3)
    assert ckpt.load_latest().server_round == 3
    assert damaged.moved_to.is_dir() and not ckpt.resume(CONFIG).fell_back


def test_no_usable_checkpoint_is_a_plain_error_naming_each_file(tmp_path: Path):
    ckpt = ServerCheckpoint(tmp_path)
    for r in (1, 2):
        _truncate(save_round(ckpt, r) / "global.safetensors")
    with pytest.raises(CheckpointError) as info:
        ckpt.resume(CONFIG)
    message = str(info.value)
    for r in (1, 2):
        assert str(tmp_path / f"round-000{r}" / "global.safetensors") in message
    assert "checkpoint-keep" in message and (tmp_path / LATEST).read_text().strip() == "round-0002"
    assert ServerCheckpoint(tmp_path / "never").resume(CONFIG) is None
