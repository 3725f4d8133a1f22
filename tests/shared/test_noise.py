"""Third-party warnings nobody here can act on are hidden by origin; our own warnings still show."""

from __future__ import annotations

import subprocess
import sys
import warnings

from shared.noise import hide_third_party_noise, pythonwarnings


def _shown(category: type[Warning], module: str, message: str = "something changed") -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hide_third_party_noise()
        warnings.warn_explicit(message, category, filename=f"{module}.py", lineno=1, module=module)
    return bool(caught)


def test_mlflow_store_deprecations_and_the_ray_tip_are_hidden_by_origin():
    assert not _shown(DeprecationWarning, "mlflow.store.tracking.sqlalchemy_store")
    assert not _shown(FutureWarning, "ray._private.worker", "Tip: In future versions of Ray, ...")


def test_the_same_categories_from_anywhere_else_still_show():
    assert _shown(DeprecationWarning, "shared.training.seg")
    assert _shown(DeprecationWarning, "mlflow.tracking.client")
    assert _shown(FutureWarning, "ray._private.worker", "Pydantic v1 is deprecated")
    assert _shown(UserWarning, "mlflow.store.tracking.sqlalchemy_store")


def test_child_processes_get_the_filters_and_the_users_own_settings_win():
    value = pythonwarnings("error::FutureWarning")
    assert value.endswith(",error::FutureWarning")
    probe = (
        "import warnings\n"
        "warnings.warn_explicit('x', DeprecationWarning, 'f.py', 1, module='mlflow.store.tracking.sqlalchemy_store')\n"
        "warnings.warn_explicit('y', DeprecationWarning, 'f.py', 1, module='fedabus_probe')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONWARNINGS": pythonwarnings("default::DeprecationWarning:fedabus_probe")},
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "DeprecationWarning: y" in result.stderr and "DeprecationWarning: x" not in result.stderr
