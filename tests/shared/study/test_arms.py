"""Leave-one-site-out without Flower: one federation per left-out site, of exactly the other sites, with the
study's settings; the federation runner is replaced by a stand-in that writes what the ServerApp writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.adapters import extract_adapter, lora_specs_from_config, save_adapter
from shared.base import build_random_base, save_base, working_copy, wrap_for_training
from shared.config import load_config
from shared.data.synth import generate_consortium
from shared.study import arms
from shared.study.sites import StudyError, open_study_sites


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("arms")
    config = load_config({"model.cls-depth": 18, "train.progress": False})
    sites = open_study_sites(generate_consortium(root / "sites", sites=3, cases=8, seed=2), [], config)
    base = build_random_base("small", cls_depth=18, seed=0)
    return {
        "root": root,
        "config": config,
        "sites": sites,
        "base": save_base(base, root / "base"),
        "raw": base,
    }


def test_loso_runs_one_federation_of_the_other_sites_per_left_out_site(setup, monkeypatch, tmp_path: Path):
    calls = []

    def fake_simulation(overrides, *, sites, flwr_home, cwd, on_line=None, log_path=None, **_):
        sites_dir = Path(overrides["federation.sites-dir"])
        calls.append({"sites": sites, "folders": sorted(p.name for p in sites_dir.iterdir() if p.is_dir()),
                      "overrides": overrides})  # fmt: skip
        work = Path(overrides["federation.work-dir"])
        work.mkdir(parents=True)
        specs = lora_specs_from_config(setup["config"].adapter)
        models = wrap_for_training(working_copy(setup["raw"], specs), specs)  # each federation its own copy
        save_adapter(
            extract_adapter(models, base_fingerprints=setup["raw"].fingerprints), work / "chosen_adapter"
        )
        summary = {"run_id": "x", "selection": {"metric": "global/val/dice_1click_mean", "round": 1}}
        (work / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
        on_line("INFO : Round 1/1 done: validation dice_1click 0.5")
        return 0

    monkeypatch.setattr("shared.simulation.run_simulation", fake_simulation)
    said = []
    context = arms.ArmContext(
        config=setup["config"], base_path=setup["base"], sites=setup["sites"], views=[s.data for s in setup["sites"]],
        out=tmp_path, device=torch.device("cpu"), seed=3, rounds=2, say=said.append,
    )  # fmt: skip
    models = arms.train_arm("loso", context)
    names = [s.name for s in setup["sites"]]
    assert [m.name for m in models] == [f"loso:-{n}" for n in names]
    for model, call, left in zip(models, calls, names, strict=True):
        assert left not in model.trained_on and sorted(model.trained_on) == sorted(
            n for n in names if n != left
        )
        assert call["sites"] == 2 and call["folders"] == sorted(n for n in names if n != left)
        assert call["overrides"]["federation.min-sites"] == 2 and call["overrides"]["num-server-rounds"] == 2
        assert call["overrides"]["federation.final-test"] is False and call["overrides"]["train.seed"] == 3
        assert model.adapter_path.is_file() and model.selection["round"] == 1
    assert any("loso:-site_a: Round 1/1 done" in line for line in said)


def test_loso_needs_three_sites_and_a_failed_federation_names_its_log(setup, monkeypatch, tmp_path: Path):
    context = arms.ArmContext(
        config=setup["config"], base_path=setup["base"], sites=setup["sites"][:2],
        views=[s.data for s in setup["sites"][:2]], out=tmp_path, device=torch.device("cpu"), seed=0, rounds=1,
    )  # fmt: skip
    with pytest.raises(StudyError, match="loso needs at least 3 sites"):
        arms.train_arm("loso", context)
    monkeypatch.setattr("shared.simulation.run_simulation", lambda *a, **k: 1)
    with pytest.raises(StudyError, match=r"federated: the federation failed \(exit 1\); its log: .*flwr.log"):
        arms.train_arm("federated", context)
    with pytest.raises(StudyError, match=r"federated@int8: the federation failed .*federated@int8.flwr.log"):
        arms.train_arm("federated@int8", context)  # a variant's models and folders are named after it
    [model] = arms.train_arm("zero-shot@fresh", context)
    assert model.name == "zero-shot@fresh" and model.adapter_path.name.startswith("zero-shot@fresh")
    with pytest.raises(StudyError, match="unknown arm"):
        arms.train_arm("centralised", context)
