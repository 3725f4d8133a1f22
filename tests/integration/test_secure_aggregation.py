"""Secure aggregation in a real Flower simulation (3 sites, `fedabus demo`): the global adapter equals the one of
the same run without it, to float32 rounding. Dropouts are tested in-process (tests/server/test_secure_aggregation.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from shared.adapters import load_adapter
from shared.base import build_random_base, save_base

pytestmark = [pytest.mark.integration]


def _demo(tmp_path, base_path, *, secure: bool):
    out = tmp_path / ("secure" if secure else "plain")
    command = [sys.executable, "-m", "shared.cli", "demo", "--sites", "3", "--cases", "6", "--rounds", "1"]
    command += ["--local-epochs", "1", "--out", str(out), "--base", str(base_path)]
    sets = {
        "federation.secure-aggregation": "true" if secure else "false",
        "federation.final-test": "false",
        "train.seg-click-iterations": "1",
        "train.eval-clicks": "2",
    }
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    result = subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    print(next((line for line in output.splitlines() if "s in all)" in line), ""))  # wall time, for the docs
    return load_adapter(out / "server" / "final_adapter.safetensors"), output


@pytest.mark.timeout(1800)
def test_a_secure_federation_gives_the_plain_global_adapter(tmp_path):
    base_path = save_base(build_random_base("small", cls_depth=18, seed=0), tmp_path / "base")
    plain, _ = _demo(tmp_path, base_path, secure=False)
    masked, output = _demo(tmp_path, base_path, secure=True)
    assert "secure aggregation unmasked the sum of 3 site(s)" in output
    assert plain.tensors.keys() == masked.tensors.keys()
    for name, tensor in plain.tensors.items():
        torch.testing.assert_close(masked.tensors[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
