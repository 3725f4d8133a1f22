"""Fixtures shared by the test packages (pytest runs with ``--import-mode=importlib``; conftest still applies)."""

from __future__ import annotations

import os

import pytest

# Two pytest workers share the CI machine's two cores: each test process, and every process a test starts (demos,
# studies, SuperLinks, SuperNodes, ClientApps), uses one intra-op thread. Torch's default of one per core would put
# four busy threads on two cores; with the other core busy, one thread trained the small SAM-Med3D 2.1x faster
# than two (docs/performance.md, "The demo's budget"). A caller's explicit setting wins.
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread_per_test_process():
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def task_identity():
    """Flower's process-wide task identity set for the test (run 1, node 0, task 1), restored afterwards.

    Building a ``flwr.app.Message`` outside a running Flower process needs it. Test modules that build messages
    use it for every test: ``pytestmark = pytest.mark.usefixtures("task_identity")``.
    """
    from flwr.supercore.task_identity import TaskIdentity

    previous = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous
