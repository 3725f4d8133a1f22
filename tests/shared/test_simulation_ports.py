"""Each simulation gets its own managed local SuperLink ports, so two can run on one machine at once; every site
of a small federation trains at once; a run whose SuperLink misses Flower's start timeout is started again."""

from __future__ import annotations

import socket

import pytest

from shared import simulation
from shared.simulation import SUPERLINK_START_ATTEMPTS, local_superlink_ports, ray_cpus, run_simulation

VARIABLES = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT"}


def test_private_runs_get_distinct_free_ports() -> None:
    first, second = local_superlink_ports({}, private=True), local_superlink_ports({}, private=True)
    assert set(first) == set(second) == VARIABLES
    assert len({*first.values()}) == 2
    for port in map(int, first.values()):
        with socket.socket() as sock:  # free: this test can bind it
            sock.bind(("127.0.0.1", port))


def test_ports_the_user_set_win_and_a_kept_superlink_uses_flowers_defaults() -> None:
    env = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "40001"}
    assert local_superlink_ports(env, private=True)["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] == "40001"
    assert local_superlink_ports(env, private=False) == env
    assert local_superlink_ports({}, private=False) == {}


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("sites", [1, 2, 3, 5, 8, 40])
def test_every_site_of_a_small_federation_gets_an_actor_and_at_most_two_per_core(
    cpus: int, sites: int
) -> None:
    actors = ray_cpus(sites, cpus)  # Flower's pool: int(Ray's CPUs / client-resources-num-cpus = 1)
    assert actors >= min(sites, 2 * cpus) and actors >= cpus  # never fewer CPUs than the machine has
    assert actors <= 2 * cpus  # each actor holds its own models


def test_the_demo_on_two_cores_trains_its_three_sites_at_once() -> None:
    assert ray_cpus(3, 2) == 3  # Ray's own count (2) gave 2 actors: two waves


def _fake_flwr_runs(monkeypatch: pytest.MonkeyPatch, outcomes: list[tuple[int, str]]) -> list[int]:
    """``flwr run`` stand-in: each call prints its line and exits with its code; returns the call log."""
    calls: list[int] = []

    def run_logged(command, env, cwd, on_line, log_path):
        code, line = outcomes[len(calls)]
        calls.append(code)
        on_line(line)
        return code

    monkeypatch.setattr(simulation, "_run_logged", run_logged)
    monkeypatch.setattr(simulation, "_listening_pids", lambda port: set())
    return calls


START_FAILED = "Error: Failed to start local SuperLink within 15s. See logs at /x/superlink.log."


def test_a_superlink_that_misses_flowers_start_timeout_is_retried(monkeypatch, tmp_path) -> None:
    calls = _fake_flwr_runs(monkeypatch, [(1, START_FAILED), (1, START_FAILED), (0, "run finished")])
    lines: list[str] = []
    code = run_simulation({}, sites=2, flwr_home=tmp_path, cwd=tmp_path, on_line=lines.append)
    assert code == 0 and calls == [1, 1, 0]
    assert sum("starting the run again" in line for line in lines) == 2


def test_other_failures_and_a_third_failed_start_are_not_retried(monkeypatch, tmp_path) -> None:
    calls = _fake_flwr_runs(monkeypatch, [(1, "ValueError: bad config")])
    assert run_simulation({}, sites=2, flwr_home=tmp_path, cwd=tmp_path, on_line=print) == 1
    assert calls == [1]
    calls = _fake_flwr_runs(monkeypatch, [(1, START_FAILED)] * SUPERLINK_START_ATTEMPTS)
    assert run_simulation({}, sites=2, flwr_home=tmp_path, cwd=tmp_path, on_line=print) == 1
    assert len(calls) == SUPERLINK_START_ATTEMPTS
