"""What a site refuses in the secure-aggregation steps (client/secure_aggregation.py): a threshold below a strict
majority, a step for a round it holds no keys for, and shares that were altered or meant for another site."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.secure_aggregation import STATE, answer_keys, answer_shares
from shared.protocol import (
    SECAGG,
    SECAGG_CIPHERTEXTS,
    SECAGG_KEYS,
    SECAGG_MASK_PUBLIC,
    SECAGG_NODES,
    SECAGG_PEERS,
    SECAGG_SHARE_PUBLIC,
    SECAGG_SHARES,
    SECAGG_THRESHOLD,
    SERVER_ROUND,
)
from shared.secagg import SecAggError, decrypt_shares

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = (1, 2, 3, 4, 5)


def _ask(node: int, action: str, values: dict) -> Message:
    content = RecordDict({SECAGG: ConfigRecord(values)})
    return Message(content, dst_node_id=node, message_type=f"{MessageType.QUERY}.{action}")


def _keyed(server_round: int = 4):
    """Every site's context after step 1, and the step-2 request the server would send."""
    contexts = {node: Context(1, node, {}, RecordDict(), {}) for node in NODES}
    keys = {
        node: answer_keys(_ask(node, SECAGG_KEYS, {SERVER_ROUND: server_round}), contexts[node]).content[
            SECAGG
        ]
        for node in NODES
    }
    request = {
        SERVER_ROUND: server_round,
        SECAGG_THRESHOLD: 3,
        SECAGG_NODES: [str(node) for node in NODES],
        SECAGG_MASK_PUBLIC: [keys[node][SECAGG_MASK_PUBLIC] for node in NODES],
        SECAGG_SHARE_PUBLIC: [keys[node][SECAGG_SHARE_PUBLIC] for node in NODES],
    }
    return contexts, request


def test_a_site_refuses_a_threshold_below_a_strict_majority():
    contexts, request = _keyed()
    with pytest.raises(SecAggError, match="strict majority"):
        answer_shares(_ask(1, SECAGG_SHARES, {**request, SECAGG_THRESHOLD: 2}), contexts[1])


def test_a_site_refuses_a_step_for_a_round_it_has_no_keys_for():
    contexts, request = _keyed(server_round=4)
    with pytest.raises(SecAggError, match="no secure-aggregation keys for round 5"):
        answer_shares(_ask(1, SECAGG_SHARES, {**request, SERVER_ROUND: 5}), contexts[1])


def test_each_peer_gets_one_box_that_only_it_can_open():
    contexts, request = _keyed()
    reply = answer_shares(_ask(1, SECAGG_SHARES, request), contexts[1]).content[SECAGG]
    assert reply[SECAGG_PEERS] == ["2", "3", "4", "5"]
    box = reply[SECAGG_CIPHERTEXTS][0]  # for site 2
    public_1 = request[SECAGG_SHARE_PUBLIC][0]
    state = {node: contexts[node].state.config_records[STATE] for node in (2, 3)}
    shares = decrypt_shares(
        box, private=bytes(state[2]["share-private"]), peer_public=public_1, server_round=4, src=1, dst=2
    )
    assert len(shares.self_seed) == len(shares.mask_key) == 52  # 4-byte index + 3 Shamir chunks of 16 bytes
    with pytest.raises(SecAggError, match="fail authentication"):  # relayed to site 3 instead
        decrypt_shares(
            box, private=bytes(state[3]["share-private"]), peer_public=public_1, server_round=4, src=1, dst=3
        )
