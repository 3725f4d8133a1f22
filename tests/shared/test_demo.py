"""The demo's defaults and results table (no federation is run here; tests/integration runs one)."""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest

from shared.data.synth import generate_consortium
from shared.demo import _eval_interval, demo_synth_options, held_out_counts, print_site_table, register


def _demo_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["demo", *argv])


@pytest.mark.parametrize("seed", [0, 1])
def test_default_test_split_holds_both_classes_and_enough_lesions(tmp_path: Path, seed: int) -> None:
    args = _demo_args()
    options = replace(demo_synth_options(args.test_fraction), shape=(24, 32, 32), lesion_median_cm3=0.05)
    generate_consortium(tmp_path, sites=args.sites, cases=args.cases, seed=seed, options=options)
    counts = held_out_counts(tmp_path)
    assert sorted(counts) == ["site_a", "site_b", "site_c"]
    for benign, malignant in counts.values():
        assert benign >= 5 and malignant >= 5 and benign + malignant >= 15
        assert benign + malignant < args.cases / 2  # most cases still train


def test_demo_split_has_train_validation_and_test_cases(tmp_path: Path) -> None:
    options = replace(demo_synth_options(), shape=(24, 32, 32))
    generate_consortium(tmp_path, sites=1, cases=36, seed=3, options=replace(options, lesion_median_cm3=0.05))
    splits = [
        c["split"]
        for c in json.loads((tmp_path / "consortium.json").read_text(encoding="utf-8"))["sites"][0]["cases"]
    ]
    assert splits.count("test") == 16 and 4 <= splits.count("val") <= 6  # validation chooses the round
    assert splits.count("train") == 36 - 16 - splits.count("val")


@pytest.mark.parametrize("fraction", [0.0, 0.9, -0.2, 1.5])
def test_test_fraction_outside_zero_one_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="--test-fraction"):
        demo_synth_options(fraction)


def test_eval_interval_always_evaluates_the_last_round(capsys: pytest.CaptureFixture[str]) -> None:
    assert _eval_interval(_demo_args()) == 2  # default: rounds 2, 4, 6 (and before round 1)
    assert _eval_interval(_demo_args("--rounds", "5", "--eval-every", "5")) == 5
    assert _eval_interval(_demo_args("--rounds", "5")) == 1
    assert "evaluating every round" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--eval-every"):
        _eval_interval(_demo_args("--eval-every", "0"))


def test_site_table_shows_split_round_and_both_aucs() -> None:
    site = {"test/dice_1click": 0.3, "test/dice": 0.31, "test/hd95_mm": 12.0, "test/auc": 0.5}
    summary = {
        "before": {"site_a": {**site, "test/auc_gt_planes": 0.55}, "site_b": site},
        "after": {"site_a": {**site, "test/dice_1click": 0.52, "test/auc_gt_planes": 0.95}},
        "after_round": 6,
    }
    stream = io.StringIO()
    print_site_table(summary, test_counts={"site_a": (7, 9)}, file=stream)
    lines = stream.getvalue().splitlines()
    assert "AUC GT planes" in lines[0] and "AUC e2e" in lines[0] and "before -> r6" in lines[1]
    row_a = next(line for line in lines if line.startswith("site_a"))
    assert "7/9" in row_a and "0.300 ->  0.520" in row_a and "0.550 ->  0.950" in row_a
    row_b = next(line for line in lines if line.startswith("site_b"))
    assert " ? " in row_b and row_b.count("nan") == 6  # no 'after' for site_b, no GT-plane AUC before
    assert any("never trained on" in line for line in lines)


def test_site_table_of_an_automatic_segmenter_shows_its_whole_volume_metrics() -> None:
    site = {"test/dice_auto": 0.2, "test/hd95_mm_auto": 30.0, "test/auc": 0.5}
    summary = {
        "before": {"site_a": site},
        "after": {"site_a": {**site, "test/dice_auto": 0.4}},
        "after_round": 2,
    }
    stream = io.StringIO()
    print_site_table(summary, file=stream)
    lines = stream.getvalue().splitlines()
    assert "Dice auto" in lines[0] and "HD95 auto mm" in lines[0] and "Dice@1" not in lines[0]
    assert "0.200 ->  0.400" in next(line for line in lines if line.startswith("site_a"))


def test_bad_options_stop_the_demo_before_it_deletes_anything(tmp_path: Path) -> None:
    from shared.demo import run_demo

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x", encoding="utf-8")
    for argv in (["--test-fraction", "1.2"], ["--eval-every", "-1"]):
        with pytest.raises(SystemExit, match=argv[0]):
            run_demo(_demo_args("--out", str(tmp_path / "out"), "--fresh", *argv))
    assert (tmp_path / "out" / "keep.txt").is_file()


def test_site_table_reports_the_epsilon_each_site_spent_under_dp() -> None:
    site = {"test/dice_1click": 0.3, "test/auc": 0.5}
    train = {
        "site_a": {
            "num-examples": 20.0,
            "privacy/seg_epsilon": 2.5,
            "privacy/cls_epsilon": 2.75,
            "privacy/delta": 0.005,
        },
        "site_b": {
            "num-examples": 0.0,
            "privacy/seg_epsilon": 3.0,
            "privacy/cls_epsilon": 3.0,
            "privacy/delta": 0.005,
        },
    }
    summary = {"before": {"site_a": site, "site_b": site}, "after": {"site_a": site}, "train": train}
    summary["client_privacy"] = {"privacy/client_epsilon": 7.25}
    stream = io.StringIO()
    print_site_table(summary, file=stream)
    text = stream.getvalue()
    assert "site_a     ε  2.500 /  2.750  δ 0.005\n" in text
    assert "site_b     ε  3.000 /  3.000  δ 0.005  (stopped at its budget)" in text
    assert "client-level DP: ε 7.250" in text
    plain = io.StringIO()
    print_site_table({"before": {"site_a": site}, "after": {"site_a": site}}, file=plain)
    assert "DP" not in plain.getvalue()


def test_demo_sets_its_cpu_settings_and_records_the_base_it_uses(tmp_path: Path) -> None:
    """The run config's defaults are the real sites' (ResNet-50, progress bars): the demo's simulation sets its
    own values explicitly, takes the classifier's architecture from the base's manifest, and every key it sets
    is one that Flower accepts."""
    import tomllib

    from flwr.common.config import flatten_dict, fuse_dicts

    from shared.base import BASE_FORMAT
    from shared.config import load_run_config
    from shared.demo import demo_run_config

    base = tmp_path / "base"
    (tmp_path / "base.safetensors").write_bytes(b"")
    manifest = {"format": BASE_FORMAT, "cls_config": {"depth": 18, "planes": [], "norm_groups": 8}}
    (tmp_path / "base.json").write_text(json.dumps(manifest), encoding="utf-8")
    args = _demo_args("--rounds", "2", "--set", "train.eval-clicks=2")
    overrides = demo_run_config(
        args, base_path=base, sites_dir=tmp_path / "sites", work=tmp_path / "server", eval_interval=1
    )
    assert overrides["train.progress"] is False and overrides["train.eval-clicks"] == 2
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text("utf-8"))
    fused = fuse_dicts(flatten_dict(pyproject["tool"]["flwr"]["app"]["config"]), overrides, check_keys=True)
    config = load_run_config(fused)
    assert (config.model.cls_depth, config.model.cls_norm_groups) == (18, 8)
    assert config.model.base_path == str(base) and fused["num-server-rounds"] == 2
