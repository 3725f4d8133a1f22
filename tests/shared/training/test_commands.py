"""``fedabus train-local`` end to end on a tiny site, with and without sample-level DP."""

from __future__ import annotations

import json

import pytest

from shared.base import build_random_base, save_base
from shared.cli import main
from shared.data.synth import generate_consortium

SMALL = """
[model]
cls-depth = 18
[train]
seg-epochs = 1
cls-epochs = 1
eval-clicks = 2
seg-click-iterations = 1
progress = false
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-local")
    site_dir = generate_consortium(root / "sites", sites=1, cases=6, seed=5)[0]
    base = save_base(build_random_base("small", cls_depth=18, seed=0), root / "base")
    return {"root": root, "site_dir": site_dir, "base": base}


def _run(site, config_text: str, out_name: str, *extra: str) -> int:
    config = site["root"] / f"{out_name}.toml"
    config.write_text(config_text, encoding="utf-8")
    argv = ["train-local", "--site-dir", str(site["site_dir"]), "--base", str(site["base"])]
    argv += ["--config", str(config), "--out", str(site["root"] / out_name), "--device", "cpu", *extra]
    return main(argv)


def test_train_local_writes_the_adapter_and_before_after_metrics(site):
    assert _run(site, SMALL, "plain") == 0
    metrics = json.loads((site["root"] / "plain" / "metrics.json").read_text(encoding="utf-8"))
    assert {"before", "after", "training"} <= set(metrics)
    assert "test/dice_1click" in metrics["after"]
    assert (site["root"] / "plain" / "adapter.safetensors").is_file()


def test_train_local_under_dp_spends_from_the_site_ledger_and_stops_at_the_budget(site):
    dp = SMALL + "[privacy]\nsample-dp = true\ntarget-epsilon = 4.0\n"
    state = site["root"] / "state"
    assert _run(site, dp, "dp", "--state-dir", str(state)) == 0
    metrics = json.loads((site["root"] / "dp" / "metrics.json").read_text(encoding="utf-8"))
    assert 0 < metrics["training"]["privacy/seg_epsilon"] <= 4.0 + 1e-6
    ledger = json.loads((state / "privacy_ledger.json").read_text(encoding="utf-8"))
    assert len(ledger["models"]["seg"]) == 1
    with pytest.raises(SystemExit, match="not training"):  # the whole budget went into the first run
        _run(site, dp, "dp-again", "--state-dir", str(state))


def test_make_base_builds_a_classifier_ablation(tmp_path) -> None:
    """`fedabus make-base` takes the classifier's backbone, fusion and planes (no hand-built base needed)."""
    import torch

    from shared.base import read_base_manifest
    from shared.models.sam_med3d import build_sam_med3d

    checkpoint = tmp_path / "sam.pth"
    torch.save({"model_state_dict": build_sam_med3d("small").state_dict()}, checkpoint)
    argv = ["make-base", "--sam-checkpoint", str(checkpoint), "--sam-preset", "small", "--cls-depth", "18"]
    argv += [
        "--cls-fusion",
        "late-mean",
        "--cls-planes",
        "coronal,transverse",
        "--out",
        str(tmp_path / "base"),
    ]
    assert main(argv) == 0
    cls_config = read_base_manifest(tmp_path / "base")["cls_config"]
    assert cls_config == {
        "backbone": "resnet",
        "depth": 18,
        "planes": ["transverse", "coronal"],
        "norm_groups": 32,
        "fusion": "late-mean",
    }
    with pytest.raises(SystemExit):
        main([*argv[:-2], "--cls-arch", "vgg16", "--out", str(tmp_path / "other")])
