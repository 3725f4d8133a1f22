"""Suite-wide test setup.

With pytest-xdist (``make test`` runs ``pytest -n 2 --dist loadgroup``) every test that starts real processes
(marker ``integration``) goes to one worker, in file order, so module-scoped consortia are started once and no
two Flower simulations share the managed local SuperLink's fixed port; the other tests fill the idle time of
that worker's waits (heartbeats, process starts) on the second core.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("integration") is not None:
            item.add_marker(pytest.mark.xdist_group("processes"))
