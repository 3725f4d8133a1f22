"""Detect and index a site folder in one of the two supported layouts (sites/README.md documents both).

* **manifest**: ``manifest.csv`` with columns ``case_id, image, mask, label, split`` (optional ``birads``);
  paths relative to the site folder (absolute paths work too).
* **tdsc** (TDSC-ABUS 2023): ``DATA/*.nrrd``, ``MASK/*.nrrd`` and ``labels.csv`` with columns
  ``case_id, label (M/B), data_path, mask_path``; the split comes from the site config, an optional ``split``
  column, or the folder name (Train/Validation/Test). A TDSC root holding Train/Validation/Test folders is one
  site made of all three.

Indexing reads only the CSV files and checks that paths exist; it never opens a volume. Row-level problems
(unknown label or split, duplicate case id, missing file) are recorded in :attr:`SiteIndex.problems`, never
raised, so that validation can report them per case. Only a folder in neither layout raises
:class:`SiteLayoutError`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from shared.config import SPLITS, SiteConfig

__all__ = [
    "CaseRecord",
    "SiteIndex",
    "SiteLayoutError",
    "discover_site",
    "missing_file_problem",
    "parse_label",
    "parse_split",
]

MANIFEST_NAME = "manifest.csv"
TDSC_LABELS_NAME = "labels.csv"

_MALIGNANT = {"m", "malignant", "malign", "mal", "1", "cancer", "positive", "pos"}
_BENIGN = {"b", "benign", "ben", "0", "negative", "neg"}
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "tr": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
    "ts": "test",
}
_COLUMN_ALIASES = {
    "case_id": ("case_id", "caseid", "case", "id", "case_name"),
    "image": ("image", "image_path", "img", "data_path", "data", "volume", "volume_path"),
    "mask": ("mask", "mask_path", "seg", "segmentation", "label_path"),
    "label": ("label", "class", "diagnosis", "pathology", "malignancy"),
    "split": ("split", "subset", "fold_split"),
    "birads": ("birads", "bi_rads"),
}


class SiteLayoutError(ValueError):
    """The folder is in neither supported layout, or its CSV cannot be read at all; the message says why."""


@dataclass(frozen=True)
class CaseRecord:
    """One case of a site as written in its CSV, with paths resolved (not yet opened).

    ``label`` is 1 for malignant, 0 for benign and None when missing or unknown (``raw_label`` keeps the
    text). ``split`` is ``train``, ``val`` or ``test``, or the raw text when unknown. ``mask`` is None when
    the CSV gives no mask path.
    """

    case_id: str
    image: Path
    mask: Path | None
    label: int | None
    split: str
    birads: str | None = None
    raw_label: str = ""


@dataclass(frozen=True)
class SiteIndex:
    """All cases of one site folder and the row-level problems found while indexing it.

    ``problems`` maps a case id (as written in the CSV) to messages such as ``unknown label value 'X'``;
    ``case_problems[i]`` holds the problems of ``cases[i]`` alone (rows sharing a duplicate id differ there);
    ``case_notes[i]`` holds warnings about it that do not make it unusable (e.g. a defaulted split).
    """

    site_dir: Path
    name: str
    layout: str
    cases: tuple[CaseRecord, ...]
    problems: dict[str, list[str]] = field(default_factory=dict)
    case_problems: tuple[tuple[str, ...], ...] = ()
    case_notes: tuple[tuple[str, ...], ...] = ()

    def problems_of(self, number: int) -> list[str]:
        """Problems of ``cases[number]`` (its own row's when known, else all of its case id's)."""
        if len(self.case_problems) == len(self.cases):
            return list(self.case_problems[number])
        return list(self.problems.get(self.cases[number].case_id, []))

    def notes_of(self, number: int) -> list[str]:
        """Warnings about ``cases[number]`` found while indexing."""
        return list(self.case_notes[number]) if len(self.case_notes) == len(self.cases) else []


def parse_label(text: str) -> int | None:
    """1 for malignant (``M``, ``malignant``, ``1``…), 0 for benign (``B``, ``benign``, ``0``…), else None."""
    value = text.strip().lower()
    if value in _MALIGNANT:
        return 1
    if value in _BENIGN:
        return 0
    return None


def parse_split(text: str) -> str | None:
    """``train``, ``val`` or ``test`` for the usual spellings (``Training``, ``Validation``…), else None."""
    return _SPLIT_ALIASES.get(text.strip().lower())


def missing_file_problem(kind: str, path: Path) -> str:
    """The one wording of a missing-file problem (shared by indexing and validation, so reports dedupe)."""
    return f"{kind} {path}: missing file (does not exist)"


def discover_site(site_dir: str | Path, site_config: SiteConfig | None = None) -> SiteIndex:
    """Detect the layout of ``site_dir`` and index its cases (reads CSV files only).

    Raises SiteLayoutError when the folder does not exist or is in neither layout.
    """
    site_dir = Path(site_dir)
    config = site_config or SiteConfig()
    if site_dir.is_file() and site_dir.name.lower() in (MANIFEST_NAME, TDSC_LABELS_NAME):
        site_dir = site_dir.parent  # the user pointed at the CSV itself
    if not site_dir.is_dir():
        raise SiteLayoutError(f"{site_dir}: site folder does not exist or is not a folder")
    name = config.name or site_dir.resolve().name
    builder = _Builder(site_dir, config)
    if manifest := _find_file(site_dir, MANIFEST_NAME):
        _index_manifest(builder, manifest)
        layout = "manifest"
    elif _find_file(site_dir, TDSC_LABELS_NAME):
        _index_tdsc_split(builder, site_dir)
        layout = "tdsc"
    elif split_dirs := _tdsc_split_dirs(site_dir):
        for split_dir in split_dirs:
            _index_tdsc_split(builder, split_dir)
        layout = "tdsc"
    else:
        raise SiteLayoutError(_layout_help(site_dir))
    return builder.build(name, layout)


def _layout_help(site_dir: Path) -> str:
    hint = ""
    if (site_dir / "DATA").is_dir():
        hint = f" It has DATA/ but no {TDSC_LABELS_NAME} (TDSC layout needs one)."
    return (
        f"{site_dir}: not a site folder in a known layout: expected {MANIFEST_NAME} (manifest layout), "
        f"{TDSC_LABELS_NAME} with DATA/ and MASK/ (TDSC-ABUS layout), or Train/Validation/Test folders "
        f"each holding a {TDSC_LABELS_NAME}.{hint} See sites/README.md."
    )


def _find_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` if it is a file, else a file of that name in any letter case (``Labels.CSV``)."""
    if (folder / name).is_file():
        return folder / name
    return next((p for p in folder.iterdir() if p.name.lower() == name and p.is_file()), None)


def _tdsc_split_dirs(root: Path) -> list[Path]:
    found = [
        child
        for child in sorted(root.iterdir())
        if child.is_dir() and parse_split(child.name) and _find_file(child, TDSC_LABELS_NAME)
    ]
    return sorted(found, key=lambda d: SPLITS.index(parse_split(d.name) or "train"))


# ---------------------------------------------------------------- CSV reading


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV keyed by normalised column names (tolerates BOM, spaces, case, delimiter)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    except OSError as exc:
        raise SiteLayoutError(f"{path}: cannot read: {exc}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise SiteLayoutError(f"{path}: empty CSV (expected a header row)")
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(lines[0], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO("\n".join(lines)), dialect)
    header = [_normalise_column(h) for h in next(reader)]
    rows = []
    for values in reader:
        cells = [v.strip() for v in values] + [""] * max(0, len(header) - len(values))
        rows.append(dict(zip(header, cells, strict=False)))
    return header, rows


def _normalise_column(name: str) -> str:
    return name.strip().strip("\ufeff").strip().lower().replace("-", "_").replace(" ", "_")


def _columns(path: Path, header: list[str], required: tuple[str, ...]) -> dict[str, str | None]:
    """Map our column names to the CSV's; raise SiteLayoutError naming any required column that is absent."""
    present = header
    mapping = {
        ours: next((a for a in aliases if a in present), None) for ours, aliases in _COLUMN_ALIASES.items()
    }
    missing = [c for c in required if mapping[c] is None]
    if missing:
        raise SiteLayoutError(
            f"{path}: missing column(s) {', '.join(missing)}; found columns: {', '.join(present) or '(none)'}"
        )
    return mapping


# ---------------------------------------------------------------- building the index


class _Builder:
    """Collects cases and their row problems; applies the split overrides and detects duplicate ids."""

    def __init__(self, site_dir: Path, config: SiteConfig) -> None:
        self.site_dir = site_dir
        self.config = config
        self.cases: list[CaseRecord] = []
        self.row_problems: list[list[str]] = []
        self.row_notes: list[list[str]] = []
        self._rows_of: dict[str, list[str]] = {}
        self._split_map = _read_split_file(site_dir, config)

    def add(self, where: str, fields: Mapping[str, str | None], image: Path, mask: Path | None) -> None:
        case_id = fields["case_id"] or f"<{where}>"
        self._rows_of.setdefault(case_id, []).append(where)
        problems = [] if fields["case_id"] else [f"{where}: empty case id"]
        raw_label = fields["label"] or ""
        label = parse_label(raw_label)
        if label is None:
            reason = "missing label" if not raw_label else f"unknown label value {raw_label!r}"
            problems.append(f"{where}: {reason} (expected benign/malignant, B/M or 0/1)")
        notes: list[str] = []
        split = self._split(case_id, fields, where, problems, notes)
        for kind, path in (("image", image), ("mask", mask)):
            if path is None:
                problems.append(f"{where}: {kind}: no {kind} path given")
            elif not path.exists():
                problems.append(missing_file_problem(kind, path))
        birads = fields.get("birads") or None
        self.cases.append(CaseRecord(case_id, image, mask, label, split, birads, raw_label))
        self.row_problems.append(problems)
        self.row_notes.append(notes)

    def _split(
        self,
        case_id: str,
        fields: Mapping[str, str | None],
        where: str,
        problems: list[str],
        notes: list[str],
    ) -> str:
        """Split from (first given) the split file, the site config, the split column, the folder name."""
        candidates = [
            ("split file", self._split_map.get(case_id)),
            ("site config", self.config.split or None),
            ("split column", fields.get("split")),
            ("folder name", fields.get("folder_split")),
        ]
        source, raw = next(((s, v) for s, v in candidates if v), ("", None))
        if raw is None and fields.get("split") is not None:
            problems.append(f"{where}: unknown split: the split cell is empty (expected train, val or test)")
            return ""
        if raw is None:
            hint = fields.get("split_hint") or "no split column"
            notes.append(f"{where}: no split given ({hint}): using train; set split in the site config")
            return "train"
        split = parse_split(raw)
        if split is None:
            problems.append(
                f"{where}: unknown split value {raw!r} from the {source} (expected train, val or test)"
            )
            return raw
        return split

    def build(self, name: str, layout: str) -> SiteIndex:
        for case, problems in zip(self.cases, self.row_problems, strict=True):
            rows = self._rows_of[case.case_id]
            if len(rows) > 1:
                problems.append(f"duplicate case id {case.case_id!r} ({', '.join(rows)})")
        merged: dict[str, list[str]] = {}
        for case, problems in zip(self.cases, self.row_problems, strict=True):
            if problems:
                into = merged.setdefault(case.case_id, [])
                into.extend(p for p in problems if p not in into)
        per_case = tuple(tuple(p) for p in self.row_problems)
        notes = tuple(tuple(n) for n in self.row_notes)
        return SiteIndex(self.site_dir, name, layout, tuple(self.cases), merged, per_case, notes)


def _read_split_file(site_dir: Path, config: SiteConfig) -> dict[str, str]:
    if not config.split_file:
        return {}
    path = Path(config.split_file)
    path = path if path.is_absolute() else site_dir / path
    if not path.is_file():
        raise SiteLayoutError(f"{path}: split file named by the site config (split-file) does not exist")
    header, rows = _read_table(path)
    columns = _columns(path, header, ("case_id", "split"))
    id_column, split_column = columns["case_id"] or "", columns["split"] or ""
    return {row[id_column]: row.get(split_column, "") for row in rows if row.get(id_column)}


def _index_manifest(builder: _Builder, manifest: Path) -> None:
    header, rows = _read_table(manifest)
    columns = _columns(manifest, header, ("case_id", "image", "label"))
    for number, row in enumerate(rows, start=2):
        fields = {ours: (row.get(theirs) if theirs else None) for ours, theirs in columns.items()}
        where = f"{manifest.name} row {number}"
        image = (
            _resolve(manifest.parent, fields["image"], ()) if fields["image"] else _no_path(builder, where)
        )
        mask = _resolve(manifest.parent, fields["mask"], ()) if fields["mask"] else None
        builder.add(where, fields, image, mask)


def _no_path(builder: _Builder, where: str) -> Path:
    """A path that cannot exist, so that the case is reported as a missing image naming the row."""
    return builder.site_dir / f"(no image path in {where})"


def _index_tdsc_split(builder: _Builder, split_dir: Path) -> None:
    labels = _find_file(split_dir, TDSC_LABELS_NAME) or split_dir / TDSC_LABELS_NAME
    header, rows = _read_table(labels)
    columns = _columns(labels, header, ("label",))
    if columns["image"] is None and columns["case_id"] is None:
        raise SiteLayoutError(f"{labels}: needs a data_path or a case_id column to find the volumes")
    where_prefix = f"{split_dir.name}/{labels.name}" if split_dir != builder.site_dir else labels.name
    for number, row in enumerate(rows, start=2):
        fields = {ours: (row.get(theirs) if theirs else None) for ours, theirs in columns.items()}
        named = [d.name for d in (split_dir, split_dir.resolve().parent) if parse_split(d.name)]
        fields["folder_split"] = named[0] if named else None
        fields["split_hint"] = (
            f"folder {split_dir.name!r} is not named Train/Validation/Test, no split column"
        )
        image = _tdsc_path(split_dir, fields["image"], fields["case_id"], "DATA")
        mask = _tdsc_path(split_dir, fields["mask"], fields["case_id"], "MASK")
        if not fields["case_id"]:
            fields["case_id"] = _case_id_from_path(fields["image"] or "")
        builder.add(f"{where_prefix} row {number}", fields, image, mask)


def _case_id_from_path(text: str) -> str:
    return _windows_tolerant(text).name.split(".")[0] if text else ""


def _tdsc_path(split_dir: Path, written: str | None, case_id: str | None, folder: str) -> Path:
    """Resolve a TDSC path; without one, guess ``DATA/DATA_<id>.nrrd`` (zero-padded to 3) from the case id."""
    if written:
        return _resolve(split_dir, written, (folder,))
    number = (case_id or "").strip()
    stem = f"{folder}_{int(number):03d}" if number.isdigit() else number
    return _resolve(split_dir, f"{folder}/{stem}.nrrd", (folder,))


def _windows_tolerant(text: str) -> Path:
    return Path(*PureWindowsPath(text.strip()).parts) if "\\" in text else Path(text.strip())


def _resolve(base: Path, written: str, fallback_dirs: tuple[str, ...]) -> Path:
    """Resolve a CSV path tolerantly: as written (backslashes allowed) against ``base``, its parents, then by
    file name inside ``fallback_dirs`` (case-insensitively). Returns the first existing candidate, else the
    first candidate whose folder exists (so that the missing-file message shows a plausible path)."""
    relative = _windows_tolerant(written)
    if relative.is_absolute() or relative.drive:
        return relative
    candidates = [base / relative, base.parent / relative, base.parent.parent / relative]
    candidates += [base / d / relative.name for d in fallback_dirs]
    candidates += [base / relative.name]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    for folder in fallback_dirs:
        match = _case_insensitive(base, folder, relative.name)
        if match is not None:
            return match
    return next((c for c in candidates[:3] if c.parent.is_dir()), base / relative)


def _case_insensitive(base: Path, folder: str, name: str) -> Path | None:
    dirs = [
        d
        for d in (base.iterdir() if base.is_dir() else ())
        if d.is_dir() and d.name.lower() == folder.lower()
    ]
    for directory in dirs:
        for child in directory.iterdir():
            if child.name.lower() == name.lower():
                return child
    return None
