"""Each simulation gets its own managed local SuperLink ports, so two can run on one machine at once; every site
of a small federation trains at once."""

from __future__ import annotations

import socket

import pytest

from shared.simulation import local_superlink_ports, ray_cpus

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
