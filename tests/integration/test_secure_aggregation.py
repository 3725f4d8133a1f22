"""Secure aggregation in a real Flower simulation (3 sites, `fedabus demo`): the extra exchanges run through the real
grid, the server unmasks the sum of all three sites and the global adapter is a trained, finite one. That it equals
the plain run's to float32 rounding (FedAvg, FedProx, FedAdam) and that dropouts are recovered is tested with
Flower's own round loop in-process (tests/server/test_secure_aggregation.py), at a fraction of the cost."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from shared.adapters import load_adapter
from shared.base import build_random_base, save_base

pytestmark = [pytest.mark.integration]


def _secure_demo(tmp_path, base_path):
    out = tmp_path / "secure"
    command = [sys.executable, "-m", "shared.cli", "demo", "--sites", "3", "--cases", "6", "--rounds", "1"]
    command += ["--local-epochs", "1", "--out", str(out), "--base", str(base_path)]
    sets = {
        "federation.secure-aggregation": "true",
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


@pytest.mark.timeout(1200)
def test_a_secure_federation_unmasks_the_sum_of_every_site(tmp_path):
    base = build_random_base("small", cls_depth=18, seed=0)
    base_path = save_base(base, tmp_path / "base")
    masked, output = _secure_demo(tmp_path, base_path)
    assert "secure aggregation unmasked the sum of 3 site(s)" in output
    assert "Traceback" not in output
    for name, tensor in masked.tensors.items():
        assert torch.isfinite(tensor).all(), name
    lora_b = [t for n, t in masked.tensors.items() if "lora_B" in n]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "LoRA B starts at zero: the sites' training arrived"
