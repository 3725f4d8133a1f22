"""The sites of a study: opened and validated before anything trains, fingerprinted, and cut into folds.

Without cross-validation a site keeps its own splits (validation carved from ``train`` when it has none). With
``--folds K`` every usable case of a site is dealt into K label-stratified folds; fold ``k`` is the test split
and validation is carved from the rest (:mod:`shared.data.splits`). The federated arms run in separate Flower
processes, so a fold is also written down: a per-fold sites folder with links to the site folders and a site
TOML per site naming a split file (:func:`write_fold_sites`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from shared.config import SLICE_SEG_MODELS, FedabusConfig, SiteConfig, load_site_config
from shared.data.busi_volumes import convert_busi_site, is_busi_folder
from shared.data.layouts import CaseRecord
from shared.data.splits import kfold_assignment, with_fold
from shared.training.site import SiteData, find_site_config, open_site

__all__ = [
    "StudyError",
    "StudySite",
    "check_busi_arms",
    "fold_site",
    "open_study_sites",
    "pooled_site",
    "write_fold_sites",
]


class StudyError(ValueError):
    """The study cannot run as asked (bad site folders, unknown arm, too few sites); nothing was trained."""


@dataclass(frozen=True)
class StudySite:
    """One site folder of a study: its data as opened, every usable case, and a fingerprint of both."""

    name: str
    site_dir: Path
    site_config_path: Path | None
    data: SiteData
    fingerprint: str

    @property
    def all_cases(self) -> tuple[CaseRecord, ...]:
        return (*self.data.train_cases, *self.data.val_cases, *self.data.test_cases)


def _fingerprint(site: SiteData, config_path: Path | None, source: str = "") -> str:
    """SHA-256 over every case's id, split, label and its files' sizes and modification times, the site
    TOML and ``source`` (a BUSI folder's key): a changed, added or re-labelled case gives a new fingerprint
    (and a finished arm is not reused)."""
    digest = hashlib.sha256(source.encode())
    for case in sorted((*site.train_cases, *site.val_cases, *site.test_cases), key=lambda c: c.case_id):
        files = [case.image, *([case.mask] if case.mask else [])]
        stats = [(f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        digest.update(json.dumps([case.case_id, case.split, case.label, stats]).encode())
    if config_path is not None:
        digest.update(config_path.read_bytes())
    return digest.hexdigest()[:16]


def check_busi_arms(
    site_dirs: Sequence[Path], arms: Sequence[str], configs: Mapping[str, FedabusConfig]
) -> None:
    """Refuse (:class:`StudyError`, naming the folders and the arm) a study with a BUSI folder among its sites
    and an arm that cannot learn from one-frame images: a 3D segmenter, or a classifier on other planes than
    the transverse one. ``configs`` holds every arm's config."""
    busi = [str(d) for d in site_dirs if is_busi_folder(d)]
    if not busi:
        return
    where = f"the BUSI folder{'s' if len(busi) > 1 else ''} {', '.join(busi)}"
    problems = []
    for arm in arms:
        config = configs[arm]
        if config.model.seg_model not in SLICE_SEG_MODELS:
            problems.append(
                f"arm {arm!r} (model.seg-model = {config.model.seg_model!r}, a 3D model) cannot use the "
                f"2D images of {where}: only the 2D arms can (model.seg-model = "
                f"{' or '.join(SLICE_SEG_MODELS)}, e.g. --set {arm}:model.seg-model=u2net-lite)"
            )
        planes = [p.strip() for p in config.train.cls_planes.split(",") if p.strip()]
        if planes != ["transverse"]:
            problems.append(
                f"arm {arm!r} classifies on train.cls-planes = {config.train.cls_planes!r}, but the images of "
                f"{where} have no sagittal or coronal plane: set train.cls-planes = transverse "
                "(configs/seed-004.toml does) with a base made for it (fedabus make-base ... --cls-planes "
                "transverse)"
            )
    if problems:
        raise StudyError("cannot start the study:\n  " + "\n  ".join(problems))


def open_study_sites(
    site_dirs: Sequence[Path],
    site_configs: Sequence[Path],
    config: FedabusConfig,
    *,
    busi_root: Path | None = None,
) -> list[StudySite]:
    """Open every site; all problems are collected and raised together as :class:`StudyError` (each naming
    its folder), before anything trains. ``site_configs`` are matched to sites by the TOML's file stem (the
    site folder's name) or, when given one per site, by position. A BUSI folder is converted once into a
    manifest site of one-frame volumes under ``busi_root`` (:mod:`shared.data.busi_volumes`) and opened as
    that site; its TOML is still the BUSI folder's."""
    by_name = {path.stem: path for path in site_configs}
    positional = len(site_configs) == len(site_dirs) and not set(by_name) & {d.name for d in site_dirs}
    sites, problems = [], []
    for index, site_dir in enumerate(site_dirs):
        path = site_configs[index] if positional else by_name.get(site_dir.name) or find_site_config(site_dir)
        try:
            if not site_dir.is_dir():
                raise ValueError(f"{site_dir}: not a folder")
            opened, source = (
                _busi_as_site(site_dir, config, busi_root) if is_busi_folder(site_dir) else (site_dir, "")
            )
            data = open_site(
                opened, site_config_path=path, val_fraction=config.data.val_fraction, seed=config.train.seed
            )
            if not data.test_cases:
                raise ValueError(f"{site_dir}: no usable test case (every model is tested on every site)")
        except ValueError as exc:  # ConfigError and the site layout errors are ValueErrors
            problems.append(str(exc))
            continue
        sites.append(StudySite(data.name, opened.resolve(), path, data, _fingerprint(data, path, source)))
    names = [s.name for s in sites]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(
            f"several site folders are named {duplicates}; give each a distinct name in its site TOML"
        )
    if problems:
        raise StudyError("cannot start the study:\n  " + "\n  ".join(problems))
    return sites


def _busi_as_site(site_dir: Path, config: FedabusConfig, busi_root: Path | None) -> tuple[Path, str]:
    """The converted site of a BUSI folder and its source key."""
    if busi_root is None:
        raise ValueError(f"{site_dir}: a BUSI folder needs a folder to convert it into (busi_root)")
    converted = convert_busi_site(
        site_dir, busi_root, seed=config.train.seed, val_fraction=config.data.val_fraction
    )
    return converted.site_dir, converted.key


def fold_site(site: StudySite, fold: int | None, folds: int, config: FedabusConfig, seed: int) -> SiteData:
    """The site's data in fold ``fold`` of ``folds`` (None: its own splits)."""
    if fold is None:
        return site.data
    assignment = kfold_assignment(site.all_cases, folds, seed)
    train, val, test = with_fold(site.all_cases, assignment, fold, config.data.val_fraction, seed)
    return replace(site.data, train_cases=train, val_cases=val, test_cases=test, val_carved=True)


def pooled_site(sites: Sequence[SiteData]) -> SiteData:
    """All sites' cases in one site (the pooled arm): case ids become ``site/case_id``, each case keeps its own
    site's reading overrides."""

    def cases(split: str) -> tuple[CaseRecord, ...]:
        return tuple(replace(c, case_id=f"{s.name}/{c.case_id}") for s in sites for c in s.cases(split))

    configs = {
        f"{s.name}/{c.case_id}": s.site_config
        for s in sites
        for c in (*s.train_cases, *s.val_cases, *s.test_cases)
    }
    return SiteData(
        "pooled",
        sites[0].site_dir,
        configs,
        cases("train"),
        cases("test"),
        cases("val"),
        False,  # type: ignore[arg-type]
    )


def _site_toml(config: SiteConfig | None, name: str, split_file: Path) -> str:
    """A ``[site]`` table with the site's overrides and the fold's split file."""
    values = dataclasses.asdict(config) if config is not None else {}
    values.update(name=name, split_file=str(split_file), split="")
    lines = ["[site]"]
    for key, value in values.items():
        text = json.dumps(value) if isinstance(value, str) else repr(value)
        lines.append(f"{key.replace('_', '-')} = {text}")
    return "\n".join(lines) + "\n"


def _link_contents(site_dir: Path, folder: Path) -> None:
    """``folder`` holds a link to every entry of ``site_dir`` except its own ``site.toml`` (which would win over
    the fold's TOML beside the folder)."""
    folder.mkdir(exist_ok=True)
    for entry in site_dir.iterdir():
        link = folder / entry.name
        if entry.name != "site.toml" and not link.exists():
            link.symlink_to(entry, target_is_directory=entry.is_dir())


def write_fold_sites(
    root: Path, sites: Sequence[StudySite], views: Sequence[SiteData], include: Sequence[str]
) -> Path:
    """A sites folder for a Flower simulation of the ``include``d sites: ``root/<site>`` links to each site
    folder's files, ``root/<site>.toml`` is its site config with a split file holding the view's
    train/val/test."""
    root.mkdir(parents=True, exist_ok=True)
    for site, view in zip(sites, views, strict=True):
        if site.name not in include:
            continue
        _link_contents(site.site_dir, root / site.site_dir.name)
        split_file = root / f"{site.site_dir.name}.splits.csv"
        rows = [f"{c.case_id},{split}" for split in ("train", "val", "test") for c in view.cases(split)]
        split_file.write_text("case_id,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
        original = load_site_config(site.site_config_path) if site.site_config_path else None
        (root / f"{site.site_dir.name}.toml").write_text(
            _site_toml(original, site.name, split_file), encoding="utf-8"
        )
    return root
