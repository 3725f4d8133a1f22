"""What a site sets up once and reuses across messages: its base (loaded and fingerprinted) and its validated data.

Flower handles every message in a ClientApp: in simulation the Ray actor's process lives across messages, in
deployment with ``isolation=subprocess`` each message is a fresh process. :data:`SITE_SETUP` is the process's
cache, the one deliberate module-level cache of fedabus (Flower's ``context.state`` holds records, not models).

* **Base**: kept per resolved path while :func:`shared.base.base_stamp` (size, mtime, ctime, inode of both
  files) is unchanged; a changed or swapped file is read and hashed again. A fresh process trusts the
  fingerprints recorded with the same stamp in ``<state-dir>/base-fingerprints.json`` for train and evaluate
  messages, but hashes the weights again for the query (the handshake, once per run): see docs/architecture.md,
  "Site setup".
* **Site data**: kept per run, site folder and settings while the stamp of the site's files (every file under the
  folder, the site config, the cases' files outside it) is unchanged. Validation results of unchanged cases
  come from ``<state-dir>/validation-cache.json`` (:func:`shared.data.validate.validate_site`'s cache), so a
  fresh process re-reads no unchanged volume either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.base import BaseModels, base_stamp, load_base
from shared.config import FedabusConfig
from shared.tensor_files import atomic_write
from shared.training.site import SiteData, find_site_config, open_site

if TYPE_CHECKING:
    from client.task import SiteSettings

__all__ = ["BASE_STAMPS", "SITE_SETUP", "VALIDATION_CACHE", "SiteSetup", "site_files_stamp"]

logger = logging.getLogger(__name__)

#: File in the site's state folder holding fingerprints hashed earlier, with the stamp of the files hashed.
BASE_STAMPS = "base-fingerprints.json"
#: File in the site's state folder holding per-case validation results (keyed by the case's files).
VALIDATION_CACHE = "validation-cache.json"
_STAMPS_FORMAT = "fedabus-base-stamps"
#: Sites kept per process (a simulation actor may serve several partitions); the oldest is dropped first.
_MAX_SITES = 8


@dataclass
class _CachedBase:
    stamp: dict[str, Any]
    attention_impl: str
    base: BaseModels


@dataclass
class SiteSetup:
    """The bases and sites one process has set up (normally the single :data:`SITE_SETUP`).

    Bases returned here are shared between messages: never train them directly, wrap a
    :func:`shared.base.working_copy`. ``hashed`` and ``validated`` count the work done (for tests and the
    benchmark)."""

    bases: dict[str, _CachedBase] = field(default_factory=dict)
    sites: OrderedDict[tuple, tuple[str, SiteData]] = field(default_factory=OrderedDict)
    hashed: int = 0
    validated: int = 0

    def clear(self) -> None:
        self.bases.clear()
        self.sites.clear()

    def base(self, path: Path, state_dir: Path, *, attention_impl: str, trust_stamp: bool) -> BaseModels:
        """The base at ``path``, loaded once per process while its files are unchanged.

        ``trust_stamp``: take the fingerprints from ``state_dir``'s record when it was made for files with this
        very stamp, instead of hashing the weights (train and evaluate messages; not the query)."""
        stamp = base_stamp(path)
        cached = self.bases.get(stamp["path"])
        if cached is not None and cached.stamp == stamp and cached.attention_impl == attention_impl:
            return cached.base
        self.bases.clear()  # a site uses one base: free the old weights before loading new ones
        recorded = _recorded_fingerprints(state_dir, stamp) if trust_stamp else None
        base = load_base(path, attention_impl=attention_impl, fingerprints=recorded)
        if recorded is None:
            self.hashed += 1
            _record_fingerprints(state_dir, stamp, base.fingerprints)
        # Kept under the stamp taken before reading: a file replaced meanwhile (new inode; the memory map still
        # shows the old one) no longer matches it, so the next message reads the new file.
        self.bases[stamp["path"]] = _CachedBase(stamp, attention_impl, base)
        return base

    def site(self, settings: SiteSettings, config: FedabusConfig, *, run: str) -> SiteData:
        """The validated data of ``settings.site_dir``, opened once per ``run`` and process while the site's files
        are unchanged (validation carved from ``train`` when the site has none, the same cases in every
        message), named by the node config's ``site-id`` when given."""
        key = (
            run,
            str(settings.site_dir.resolve()),
            str(settings.site_config or ""),
            settings.site_id,
            config.data.val_fraction,
            config.train.seed,
        )
        cached = self.sites.get(key)
        if cached is not None and cached[0] == site_files_stamp(
            settings.site_dir, settings.site_config, cached[1]
        ):
            self.sites.move_to_end(key)
            return cached[1]
        before = _folder_part(settings.site_dir, settings.site_config)
        site = open_site(
            settings.site_dir,
            site_config_path=settings.site_config,
            cache=_validation_cache(Path(settings.state_dir)),
            val_fraction=config.data.val_fraction,
            seed=config.train.seed,
        )
        site = replace(site, name=settings.site_id) if settings.site_id else site
        self.validated += 1
        stamp = site_files_stamp(settings.site_dir, settings.site_config, site, folder=before)
        self.sites[key] = (stamp, site)
        while len(self.sites) > _MAX_SITES:
            self.sites.popitem(last=False)
        return site


def site_files_stamp(
    site_dir: Path, site_config: Path | None, site: SiteData | None = None, *, folder: str | None = None
) -> str:
    """Hash of the (path, size, mtime) of every file a site's validation read: all files under ``site_dir``, its
    site config, and the image and mask files of ``site``'s cases that lie outside the folder. ``folder``: the
    part for the folder, computed earlier (before validating, so that a change during validation counts)."""
    folder = folder if folder is not None else _folder_part(site_dir, site_config)
    outside = []
    if site is not None:
        root = site_dir.resolve()
        for case in (*site.train_cases, *site.val_cases, *site.test_cases):
            for path in (case.image, case.mask):
                if path is not None and not path.resolve().is_relative_to(root):
                    outside.append(_stat(path))
    payload = json.dumps([folder, sorted(outside)])
    return hashlib.sha256(payload.encode()).hexdigest()


def _folder_part(site_dir: Path, site_config: Path | None) -> str:
    entries = [_stat(Path(top) / name) for top, _, names in os.walk(site_dir) for name in names]
    config = site_config or find_site_config(site_dir)
    entries.append(_stat(config) if config else None)
    return hashlib.sha256(json.dumps(sorted(entries, key=str)).encode()).hexdigest()


def _stat(path: Path) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None]
    return [str(path), st.st_size, st.st_mtime_ns]


def _validation_cache(state_dir: Path) -> Path | None:
    """The validation cache file, or None (validate without one) when the state folder is not writable."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if os.access(state_dir, os.W_OK):
        return state_dir / VALIDATION_CACHE
    logger.warning("state folder %s is not writable: each process validates the site in full", state_dir)
    return None


def _recorded_fingerprints(state_dir: Path, stamp: dict[str, Any]) -> dict[str, str] | None:
    """The fingerprints recorded in ``state_dir`` for files with exactly ``stamp``, else None."""
    try:
        record = json.loads((Path(state_dir) / BASE_STAMPS).read_text(encoding="utf-8"))
        entry = record["entries"][stamp["path"]] if record.get("format") == _STAMPS_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(entry, dict) or entry.get("stamp") != stamp:
        return None
    fingerprints = entry.get("fingerprints")
    return fingerprints if isinstance(fingerprints, dict) else None


def _record_fingerprints(state_dir: Path, stamp: dict[str, Any], fingerprints: dict[str, str]) -> None:
    """Record hashed fingerprints with the stamp of the files hashed (best effort: a read-only state folder only
    costs the next fresh process a hash)."""
    path = Path(state_dir) / BASE_STAMPS
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        entries = record.get("entries", {}) if record.get("format") == _STAMPS_FORMAT else {}
    except (OSError, ValueError, AttributeError):
        entries = {}
    entries = entries if isinstance(entries, dict) else {}
    entries[stamp["path"]] = {"stamp": stamp, "fingerprints": dict(fingerprints)}
    text = json.dumps({"format": _STAMPS_FORMAT, "entries": entries}, indent=1) + "\n"
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        logger.warning(
            "could not record the base's fingerprints in %s (%s); the next process hashes again", path, exc
        )


#: This process's cache.
SITE_SETUP = SiteSetup()
