"""Packaging: the Flower app manifest, the console script, the config schema and the import rules."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import subprocess
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

from shared.config import (
    FLOWER_KEYS,
    ConfigError,
    FedabusConfig,
    flatten,
    load_config,
    load_run_config,
    to_flat_dict,
)

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_pyproject_is_a_flower_app():
    assert PYPROJECT["project"]["name"] == "fedabus"
    app = PYPROJECT["tool"]["flwr"]["app"]
    assert app["publisher"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    for ref in app["components"].values():
        module, attr = ref.split(":")
        assert getattr(importlib.import_module(module), attr) is not None


RUN_CONFIG = flatten(PYPROJECT["tool"]["flwr"]["app"]["config"])
CONFIGS = ROOT / "configs"


def test_run_config_is_scalar_and_fits_the_schema():
    assert all(isinstance(v, (str, int, float, bool)) for v in RUN_CONFIG.values())
    config = load_config(RUN_CONFIG, ignore=FLOWER_KEYS)
    assert config.model.attention_impl == "fast"
    assert to_flat_dict(config)["adapter.lora-rank"] == RUN_CONFIG["adapter.lora-rank"]


def _schema_types() -> dict[str, type]:
    """``{"section.key": type}`` of every key of the schema, in schema order."""
    out = {}
    for section in dataclasses.fields(FedabusConfig):
        section_type = typing.get_type_hints(FedabusConfig)[section.name]
        hints = typing.get_type_hints(section_type)
        for f in dataclasses.fields(section_type):
            out[f"{section.name}.{f.name.replace('_', '-')}"] = hints[f.name]
    return out


def _same_value(value: Any, default: Any, typ: type) -> bool:
    """Equal as the schema's type reads them: a float key needs a TOML float (2e-4 == 0.0002), an int key an
    int (not a bool, not 64.0), a bool key a bool, a string key a string."""
    if typ is float:
        return isinstance(value, float) and value == default
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool) and value == default
    return type(value) is typ and value == default


def _toml(value: Any) -> str:
    """``value`` as a TOML literal (what to paste into pyproject)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'" if "\\" in value or '"' in value else f'"{value}"'
    return repr(value)


def run_config_differences(run_config: dict[str, Any]) -> list[str]:
    """One readable line per difference between a flat run config and the schema's keys and defaults."""
    defaults, types = to_flat_dict(FedabusConfig()), _schema_types()
    lines = []
    for key, typ in types.items():
        if key not in run_config:
            lines.append(f"  {key}: missing, add `{key} = {_toml(defaults[key])}` ({typ.__name__})")
        elif not _same_value(run_config[key], defaults[key], typ):
            value = run_config[key]
            lines.append(
                f"  {key}: pyproject has {_toml(value)} ({type(value).__name__}), "
                f"the schema's default is {_toml(defaults[key])} ({typ.__name__})"
            )
    for key in run_config:
        if key not in types and key not in FLOWER_KEYS:
            lines.append(f"  {key}: not a schema key (remove it, or add it to shared/config.py)")
    return lines


def test_run_config_holds_every_schema_key_with_the_schema_default():
    """pyproject's [tool.flwr.app.config] is the schema's defaults, key by key: `flwr run -c` can only set
    listed keys, and one key has one default (small CPU settings are set where they are needed)."""
    differences = run_config_differences(RUN_CONFIG)
    assert not differences, (
        "pyproject.toml [tool.flwr.app.config] differs from the schema in shared/config.py:\n"
        + "\n".join(differences)
    )
    assert set(RUN_CONFIG) - set(to_flat_dict(FedabusConfig())) == set(FLOWER_KEYS)


def test_the_difference_report_names_each_key():
    drifted = {k: v for k, v in RUN_CONFIG.items() if k != "federation.server-lr"}
    drifted |= {"model.cls-depth": 18, "train.seg-lr": 0.0002, "adapter.lora-alpha": 4, "model.cls-dept": 50}
    report = "\n".join(run_config_differences(drifted))
    assert "federation.server-lr: missing, add `federation.server-lr = 0.1` (float)" in report
    assert "model.cls-depth: pyproject has 18 (int), the schema's default is 50 (int)" in report
    assert "adapter.lora-alpha: pyproject has 4 (int), the schema's default is 4.0 (float)" in report
    assert "model.cls-dept: not a schema key" in report
    assert "train.seg-lr" not in report  # 2e-4 == 0.0002
    assert len(report.splitlines()) == 4


def test_apps_never_show_progress_bars():
    assert load_config().train.progress  # interactive command-line default
    assert not load_run_config(RUN_CONFIG).train.progress
    assert not load_run_config({**RUN_CONFIG, "train.progress": True}).train.progress
    assert load_run_config(RUN_CONFIG).model == load_config(RUN_CONFIG, ignore=FLOWER_KEYS).model


def test_federation_settings_paragraph_lists_every_federation_key():
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    paragraph = text.split("## Federation settings", 1)[1].split("\n\n", 2)[1]
    listed = set(re.findall(r"`([a-z-]+)`", paragraph))
    keys = {k.split(".", 1)[1] for k in _schema_types() if k.startswith("federation.")}
    assert keys <= listed, f"docs/operations.md, Federation settings: add {sorted(keys - listed)}"


def test_full_models_config_loads_and_flower_accepts_it(tmp_path):
    from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

    from shared.pretrain import ensure_base

    path = CONFIGS / "full-models.toml"
    config = load_config(path=path)
    assert (config.model.sam_preset, config.model.cls_depth, config.data.patch_size) == ("vit_b_ori", 50, 128)
    assert (config.train.seg_lr, config.train.cls_lr, config.train.eval_clicks) == (2e-4, 1e-3, 11)
    assert config.train.seg_lr_milestones == "120,180" and config.train.seg_epochs == 200
    with pytest.raises(ConfigError, match="make-base"):
        ensure_base(config)  # never pretrains a full SAM-Med3D as a "demo base"

    # The federation copy that docs/deployment.md (step 6) describes: rounds above the first table, the base
    # under [model], the local epochs of one round instead of the seed's single-run schedule.
    text = path.read_text(encoding="utf-8")
    edits = {
        "\n[model]\n": '\n[model]\nbase-path = "/srv/fedabus/base.safetensors"\n',
        "\nseg-epochs = 200\n": "\nseg-epochs = 10\n",
        '\nseg-lr-milestones = "120,180"\n': '\nseg-lr-milestones = ""\n',
    }
    for old, new in edits.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    copy = tmp_path / "federation.toml"
    copy.write_text("num-server-rounds = 20\n" + text, encoding="utf-8")
    overrides = parse_config_args([str(copy)])  # what `flwr run . CONNECTION -c ~/federation.toml` sends
    fused = fuse_dicts(flatten_dict(PYPROJECT["tool"]["flwr"]["app"]["config"]), overrides, check_keys=True)
    assert fused["num-server-rounds"] == 20
    federated = load_run_config(fused)
    assert federated.model == dataclasses.replace(config.model, base_path="/srv/fedabus/base.safetensors")
    assert federated.train == dataclasses.replace(
        config.train, seg_epochs=10, seg_lr_milestones="", progress=False
    )
    assert (federated.adapter, federated.data) == (config.adapter, config.data)
    local = load_config(path=copy, ignore=FLOWER_KEYS)  # `train-local --config` reads the same file
    assert local.train == dataclasses.replace(config.train, seg_epochs=10, seg_lr_milestones="")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_every_shipped_config_loads_and_uses_run_config_keys(name):
    path = CONFIGS / name
    load_config(path=path)
    keys = set(flatten(tomllib.loads(path.read_text(encoding="utf-8"))))
    assert keys <= set(RUN_CONFIG), (
        f"{name}: keys `flwr run -c` would refuse: {sorted(keys - set(RUN_CONFIG))}"
    )


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'lora-rnak'"):
        load_config({"adapter.lora-rnak": 4})
    with pytest.raises(ConfigError, match="cannot read 'four' as int"):
        load_config({"adapter.lora-rank": "four"})
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(path=bad)
    good = tmp_path / "good.toml"
    good.write_text('[model]\nsam-preset = "vit_b_ori"\n[adapter]\nlora-rank = 8\n')
    cfg = load_config({"adapter.lora-rank": 16}, path=good)
    assert cfg.model.sam_preset == "vit_b_ori" and cfg.adapter.lora_rank == 16


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "shared.cli", "--help"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        cwd=ROOT,
        check=True,
    )
    assert "fedabus" in out.stdout


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    "package,forbidden", [("shared", {"server", "client"}), ("server", {"client"}), ("client", {"server"})]
)
def test_import_rules(package, forbidden):
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & forbidden)
        for path in (ROOT / package).rglob("*.py")
        if _imports(path) & forbidden
    }
    assert not offenders, f"{package} must not import {sorted(forbidden)}: {offenders}"


def _pins() -> dict[str, str]:
    """``{package: version}`` of the ``name==version`` lines of constraints.txt."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[name.strip()] = version.strip()
    return pins


def test_the_installed_packages_are_the_tested_pins():
    from importlib.metadata import version

    pins = _pins()
    direct = {
        re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0]
        for requirement in PYPROJECT["project"]["dependencies"]
        + PYPROJECT["project"]["optional-dependencies"]["dev"]
    }
    assert {d.lower() for d in direct} <= {p.lower() for p in pins}, "every direct dependency is pinned"
    for name, pinned in pins.items():
        installed = version(name).split("+", 1)[
            0
        ]  # torch's local build tag (+cpu, +cu126) is not the version
        assert installed == pinned, f"{name} {installed} is installed, constraints.txt pins {pinned}"


def test_seed_recipes_load_with_the_papers_settings():
    seg = load_config(path=CONFIGS / "seed-000.toml")
    assert (seg.model.sam_preset, seg.adapter.lora_rank, seg.data.patch_size) == ("vit_b_ori", 4, 128)
    assert (seg.train.seg_lr, seg.train.seg_epochs, seg.train.seg_batch_size) == (2e-4, 200, 2)
    assert (seg.train.seg_lr_milestones, seg.train.seg_lr_decay) == ("120,180", 0.1)
    assert seg.train.eval_clicks == seg.train.seg_click_iterations == 11
    assert seg.data.block_min_lesion_voxels == 2000
    cls = load_config(path=CONFIGS / "seed-003.toml")
    assert (cls.model.cls_depth, cls.train.cls_optimizer, cls.train.cls_lr) == (50, "sgd", 1e-3)
    assert cls.train.cls_momentum == 0.9
    assert cls.train.cls_planes == "transverse,sagittal,coronal"
    pair = load_config(path=CONFIGS / "seed-004.toml")
    assert (pair.model.seg_model, pair.model.cls_backbone, pair.train.cls_planes) == (
        "u2net-lite",
        "resnext50",
        "transverse",
    )
    assert (pair.train.cls_optimizer, pair.train.cls_lr, pair.train.cls_epochs) == ("adamw", 1e-4, 100)
    # the config loads, so its LoRA targets leave ResNeXt's grouped convolutions out (refused otherwise)
    assert "conv2" not in pair.adapter.cls_lora_targets
