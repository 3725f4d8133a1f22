"""Packaging: the Flower app manifest, the console script, the config schema and the import rules."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shared.config import ConfigError, load_config, to_flat_dict

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


def test_run_config_is_scalar_and_fits_the_schema():
    from shared.config import flatten

    flat = flatten(PYPROJECT["tool"]["flwr"]["app"]["config"])
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    config = load_config(flat, ignore=("num-server-rounds",))
    assert config.model.attention_impl == "fast"
    assert to_flat_dict(config)["adapter.lora-rank"] == flat["adapter.lora-rank"]


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
        [sys.executable, "-m", "shared.cli", "--help"], capture_output=True, text=True, cwd=ROOT, check=True
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
