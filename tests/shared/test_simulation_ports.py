"""Each simulation gets its own managed local SuperLink ports, so two can run on one machine at once."""

from __future__ import annotations

import socket

from shared.simulation import local_superlink_ports

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
