"""client/monai_import.py: a fresh ClientApp process imports MONAI without MLflow, matplotlib and transformers, the
MONAI parts fedabus uses still work, and the libraries load normally once MONAI is imported."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from client.monai_import import KEPT_OUT, kept_out

REPO_ROOT = Path(__file__).resolve().parents[2]

FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import client.app
    before = sorted(name for name in {kept!r} if name in sys.modules)

    import numpy as np, torch
    from monai.losses import DiceCELoss
    from monai.metrics import compute_hausdorff_distance
    from monai.networks.nets import ResNet
    from monai.handlers import mlflow_handler
    from monai.utils import OptionalImportError

    loss = float(DiceCELoss(sigmoid=True)(torch.zeros(1, 1, 4, 4, 4), torch.ones(1, 1, 4, 4, 4)))
    mask = torch.zeros(1, 1, 8, 8, 8); mask[..., 2:5, 2:5, 2:5] = 1
    hd = float(compute_hausdorff_distance(mask, mask, percentile=95)[0, 0])
    net = ResNet("basic", [1, 1, 1, 1], [1, 1, 1, 1], spatial_dims=2, n_input_channels=1, num_classes=2)
    try:
        mlflow_handler.mlflow.start_run
        stand_in = False
    except OptionalImportError:
        stand_in = True

    import matplotlib.pyplot, mlflow, transformers
    from peft import LoraConfig
    after = sorted(name for name in {kept!r} if name in sys.modules)
    print(json.dumps({{"before": before, "after": after, "loss": loss, "hd": hd, "stand_in": stand_in}}))
    """
).format(kept=KEPT_OUT)


def test_a_fresh_clientapp_process_imports_monai_without_the_kept_out_libraries() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before"] == []  # importing the handler module loaded none of them
    assert result["stand_in"]  # MONAI took its "not installed" path for its MLflow handler
    assert result["loss"] > 0 and result["hd"] == 0.0  # the MONAI parts fedabus uses work
    assert result["after"] == sorted(KEPT_OUT)  # and the libraries themselves import normally afterwards


def test_kept_out_refuses_only_inside_and_only_what_is_not_imported(tmp_path, monkeypatch) -> None:
    package = tmp_path / "fedabus_probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "part.py").write_text("VALUE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with kept_out(["fedabus_probe_pkg", "json"]):
        with pytest.raises(ModuleNotFoundError, match="kept out of MONAI's import"):
            importlib.import_module("fedabus_probe_pkg.part")
        importlib.import_module("json.tool")  # json was imported before: it stays usable
    assert importlib.import_module("fedabus_probe_pkg.part").VALUE == 3
    for name in ("fedabus_probe_pkg.part", "fedabus_probe_pkg"):
        sys.modules.pop(name, None)
