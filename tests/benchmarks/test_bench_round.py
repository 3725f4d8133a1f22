"""The pure parts of benchmarks/bench_round.py: phases timed by wrapping, loader time counted as data, and the
arithmetic of a message's row (cold messages carry process start and import; non-training overhead)."""

from __future__ import annotations

import importlib
import sys
import time
import types
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(
        0, str(BENCHMARKS)
    )  # the script imports its siblings ``harness`` and ``bench_site_setup``
    try:
        yield importlib.import_module("bench_round")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_a_wrapped_function_is_timed_under_its_phase_and_its_loader_counts_as_data(bench):
    def make_loader(n):
        for i in range(n):
            time.sleep(0.02)  # reading a batch
            yield i

    module = types.SimpleNamespace(loader=make_loader, work=lambda: time.sleep(0.03) or 7)
    clock = bench._Clock()
    clock.wrap(module, "loader", "data_s", loader=True)
    clock.wrap(module, "work", "train_total_s")
    assert list(module.loader(3)) == [0, 1, 2]  # the batches pass through unchanged
    assert module.work() == 7
    assert 0.06 <= clock.seconds["data_s"] < 0.5
    assert 0.03 <= clock.seconds["train_total_s"] < 0.5


def test_a_cold_row_carries_process_start_and_import_and_a_warm_one_does_not(bench):
    message = {"kind": "train", "train_s": 10.0, "eval_s": 0.0, "handler_s": 12.0, "serialise_s": 0.5}
    worker = {"process_start_s": 3.0, "import_s": 20.0, "messages": [message, dict(message)]}
    cold, warm = bench._row(worker, 0, cold=True), bench._row(worker, 1, cold=False)
    assert cold["total_s"] == 3.0 + 20.0 + 12.0 + 0.5
    assert cold["overhead_s"] == 20.0 + 12.0 - 10.0 + 0.5  # import + handler beyond training + serialisation
    assert warm["total_s"] == 12.5 and warm["overhead_s"] == 2.5 and warm["import_s"] == 0.0
