"""Site layout detection and indexing (manifest and TDSC-ABUS), and the site TOML configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import ConfigError, SiteConfig, load_site_config
from shared.data.layouts import SiteLayoutError, discover_site, parse_label, parse_split


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def tdsc_split(
    folder: Path, rows: list[tuple[str, str]], *, backslash: bool = True, prefix: str = ""
) -> None:
    """A TDSC split folder: DATA/DATA_XXX.nrrd, MASK/MASK_XXX.nrrd, labels.csv (paths with backslashes)."""
    sep = "\\" if backslash else "/"
    lines = ["case_id,label,data_path,mask_path"]
    for case_id, label in rows:
        number = f"{int(case_id):03d}"
        touch(folder / "DATA" / f"DATA_{number}.nrrd")
        touch(folder / "MASK" / f"MASK_{number}.nrrd")
        lines.append(
            f"{case_id},{label},{prefix}DATA{sep}DATA_{number}.nrrd,{prefix}MASK{sep}MASK_{number}.nrrd"
        )
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")


def test_manifest_tolerates_bom_whitespace_case_and_extra_columns(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        touch(tmp_path / "images" / f"{name}.nii.gz")
        touch(tmp_path / "masks" / f"{name}.nii.gz")
    (tmp_path / "manifest.csv").write_text(
        "\ufeff Case_ID ,Image, MASK ,Label ,Split,BI-RADS,scanner\n"
        "007 , images/a.nii.gz , masks/a.nii.gz , Malignant , Train ,4C,GE\n"
        "b,images/b.nii.gz,masks/b.nii.gz,b,VAL,,GE\n"
        "c,images/c.nii.gz,masks/c.nii.gz,M,test,3,Siemens\n",
        encoding="utf-8",
    )
    index = discover_site(tmp_path)
    assert index.layout == "manifest"
    assert index.problems == {}
    assert [c.case_id for c in index.cases] == ["007", "b", "c"]
    assert [c.label for c in index.cases] == [1, 0, 1]
    assert [c.split for c in index.cases] == ["train", "val", "test"]
    assert index.cases[0].birads == "4C" and index.cases[1].birads is None
    assert index.cases[0].image == tmp_path / "images" / "a.nii.gz"
    assert index.cases[0].raw_label == "Malignant"
    assert index.name == tmp_path.name


def test_manifest_semicolon_delimiter(tmp_path: Path) -> None:
    touch(tmp_path / "i.nii.gz")
    touch(tmp_path / "m.nii.gz")
    (tmp_path / "manifest.csv").write_text(
        "case_id;image;mask;label;split\nx;i.nii.gz;m.nii.gz;benign;train\n"
    )
    index = discover_site(tmp_path)
    assert index.cases[0].label == 0 and not index.problems


def test_row_problems_are_recorded_not_raised(tmp_path: Path) -> None:
    touch(tmp_path / "i.nii.gz")
    touch(tmp_path / "m.nii.gz")
    (tmp_path / "manifest.csv").write_text(
        "case_id,image,mask,label,split\n"
        "good,i.nii.gz,m.nii.gz,benign,train\n"
        "lab,i.nii.gz,m.nii.gz,suspicious,train\n"
        "spl,i.nii.gz,m.nii.gz,benign,holdout\n"
        "dup,i.nii.gz,m.nii.gz,benign,train\n"
        "dup,i.nii.gz,m.nii.gz,benign,train\n"
        "gone,missing.nii.gz,m.nii.gz,benign,train\n"
        "nomask,i.nii.gz,,benign,train\n"
    )
    index = discover_site(tmp_path)
    assert len(index.cases) == 7
    assert "good" not in index.problems
    assert "unknown label value 'suspicious'" in " ".join(index.problems["lab"])
    assert "unknown split value 'holdout'" in " ".join(index.problems["spl"])
    assert any("duplicate case id 'dup'" in p for p in index.problems["dup"])
    assert any("missing file" in p and "missing.nii.gz" in p for p in index.problems["gone"])
    assert any("no mask path" in p for p in index.problems["nomask"])
    assert index.cases[-1].mask is None
    assert index.problems_of(0) == [] and index.problems_of(3) == index.problems_of(4)


def test_tdsc_split_folder_with_backslash_paths(tmp_path: Path) -> None:
    site = tmp_path / "Validation"
    tdsc_split(site, [("100", "M"), ("101", "B")])
    index = discover_site(site)
    assert index.layout == "tdsc"
    assert not index.problems
    assert [c.case_id for c in index.cases] == ["100", "101"]
    assert [c.label for c in index.cases] == [1, 0]
    assert {c.split for c in index.cases} == {"val"}
    assert index.cases[0].image == site / "DATA" / "DATA_100.nrrd"
    assert index.cases[1].mask == site / "MASK" / "MASK_101.nrrd"


def test_tdsc_paths_relative_to_the_root_above_the_split(tmp_path: Path) -> None:
    tdsc_split(tmp_path / "Train", [("0", "B")], prefix="Train\\")
    index = discover_site(tmp_path / "Train")
    assert not index.problems
    assert index.cases[0].image == tmp_path / "Train" / "DATA" / "DATA_000.nrrd"


def test_tdsc_root_with_three_splits(tmp_path: Path) -> None:
    tdsc_split(tmp_path / "Train", [("0", "M"), ("1", "B")], backslash=False)
    tdsc_split(tmp_path / "Validation", [("100", "B")])
    tdsc_split(tmp_path / "Test", [("130", "M")])
    index = discover_site(tmp_path, SiteConfig(name="tdsc"))
    assert index.name == "tdsc" and index.layout == "tdsc"
    assert [(c.case_id, c.split) for c in index.cases] == [
        ("0", "train"),
        ("1", "train"),
        ("100", "val"),
        ("130", "test"),
    ]


def test_tdsc_folder_with_another_name_defaults_to_train_with_a_note(tmp_path: Path) -> None:
    site = tmp_path / "hospital-b"
    tdsc_split(site, [("3", "B")])
    index = discover_site(site)
    assert index.cases[0].split == "train" and not index.problems
    assert "no split given (folder 'hospital-b' is not named" in index.notes_of(0)[0]
    index = discover_site(site, SiteConfig(split="test"))
    assert index.cases[0].split == "test" and not index.problems and not index.notes_of(0)


def test_tdsc_split_from_the_parent_folder_name(tmp_path: Path) -> None:
    site = tmp_path / "Test" / "hospital-b"
    tdsc_split(site, [("3", "B")])
    assert discover_site(site).cases[0].split == "test"


def test_manifest_split_column_absent_or_empty(tmp_path: Path) -> None:
    touch(tmp_path / "i.nii.gz")
    touch(tmp_path / "m.nii.gz")
    (tmp_path / "manifest.csv").write_text("case_id,image,mask,label\na,i.nii.gz,m.nii.gz,M\n")
    index = discover_site(tmp_path)
    assert index.cases[0].split == "train" and not index.problems and index.notes_of(0)
    (tmp_path / "manifest.csv").write_text("case_id,image,mask,label,split\na,i.nii.gz,m.nii.gz,M,\n")
    assert "split cell is empty" in discover_site(tmp_path).problems["a"][0]


def test_tdsc_split_column_is_accepted(tmp_path: Path) -> None:
    site = tmp_path / "site-c"
    tdsc_split(site, [("3", "B")])
    text = (site / "labels.csv").read_text(encoding="utf-8").splitlines()
    (site / "labels.csv").write_text("\n".join([text[0] + ",split", text[1] + ",val"]) + "\n")
    assert discover_site(site).cases[0].split == "val"


def test_split_file_overrides_per_case(tmp_path: Path) -> None:
    site = tmp_path / "Train"
    tdsc_split(site, [("0", "M"), ("1", "B")])
    (tmp_path / "splits.csv").write_text("case_id,split\n1,test\n")
    toml = tmp_path / "site.toml"
    toml.write_text('[site]\nname = "x"\nsplit-file = "splits.csv"\n')
    index = discover_site(site, load_site_config(toml))
    assert [c.split for c in index.cases] == ["train", "test"]


def test_tdsc_paths_missing_from_csv_are_guessed_from_the_case_id(tmp_path: Path) -> None:
    site = tmp_path / "Test"
    touch(site / "DATA" / "DATA_007.nrrd")
    touch(site / "MASK" / "MASK_007.nrrd")
    (site / "labels.csv").write_text("case_id,label\n7,B\n")
    index = discover_site(site)
    assert index.cases[0].image == site / "DATA" / "DATA_007.nrrd" and not index.problems


def test_folder_in_neither_layout_raises_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "DATA").mkdir()
    with pytest.raises(SiteLayoutError, match="not a site folder in a known layout") as info:
        discover_site(tmp_path)
    assert str(tmp_path) in str(info.value) and "no labels.csv" in str(info.value)
    with pytest.raises(SiteLayoutError, match="does not exist"):
        discover_site(tmp_path / "nowhere")


def test_manifest_without_required_column_names_it(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("case_id,mask,label,split\na,m.nii.gz,benign,train\n")
    with pytest.raises(SiteLayoutError, match="missing column.*image"):
        discover_site(tmp_path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("M", 1),
        (" malignant ", 1),
        ("MALIGNANT", 1),
        ("1", 1),
        ("b", 0),
        ("Benign", 0),
        ("0", 0),
        ("?", None),
    ],
)
def test_parse_label(text: str, expected: int | None) -> None:
    assert parse_label(text) == expected


@pytest.mark.parametrize(
    "text, expected", [("Train", "train"), ("Validation", "val"), ("TEST", "test"), ("x", None)]
)
def test_parse_split(text: str, expected: str | None) -> None:
    assert parse_split(text) == expected


# ---------------------------------------------------------------- site TOML


def test_load_site_config_reads_the_site_table(tmp_path: Path) -> None:
    path = tmp_path / "tdsc.toml"
    path.write_text(
        '[site]\nname = "tdsc"\nspacing-z = 0.476\nspacing-y = 0.2\nspacing-x = 0.073\n'
        'orientation = "LPS"\nsplit = "train"\n'
    )
    config = load_site_config(path)
    assert config.name == "tdsc" and config.split == "train"
    assert config.spacing_override_xyz() == (0.073, 0.2, 0.476)
    assert config.direction_override() == (1, 0, 0, 0, 1, 0, 0, 0, 1)


def test_orientation_as_a_list_of_nine_numbers(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("orientation = [-1, 0, 0, 0, -1, 0, 0, 0, 1]\n")
    assert load_site_config(path).direction_override() == (-1, 0, 0, 0, -1, 0, 0, 0, 1)


@pytest.mark.parametrize(
    "body, message",
    [
        ("[site]\nspacing = 1\n", "unknown key 'spacing'"),
        ("[site]\nspacing-z = -1\n", "spacing-z"),
        ('[site]\nsplit = "holdout"\n', "split = 'holdout'"),
        ('[site]\norientation = "LPX"\n', "orientation"),
        ('[site]\norientation = "1 0 0"\n', "orientation"),
        ("[site\n", "not valid TOML"),
    ],
)
def test_site_config_errors_name_the_file_and_key(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message) as info:
        load_site_config(path)
    assert str(path) in str(info.value)


def test_missing_site_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_site_config(tmp_path / "none.toml")


@pytest.mark.parametrize("name", ["example-tdsc.toml", "example-manifest.toml"])
def test_example_site_configs_load(name: str) -> None:
    config = load_site_config(Path(__file__).resolve().parents[3] / "sites" / name)
    assert config.name


def test_site_folder_may_be_given_as_its_csv(tmp_path: Path) -> None:
    tdsc_split(tmp_path / "Train", [("0", "M")])
    assert discover_site(tmp_path / "Train" / "labels.csv").site_dir == tmp_path / "Train"


def test_csv_names_in_any_letter_case(tmp_path: Path) -> None:
    tdsc_split(tmp_path / "TRAIN", [("0", "M")])
    (tmp_path / "TRAIN" / "labels.csv").rename(tmp_path / "TRAIN" / "Labels.CSV")
    index = discover_site(tmp_path)
    assert index.layout == "tdsc" and index.cases[0].split == "train" and not index.problems
