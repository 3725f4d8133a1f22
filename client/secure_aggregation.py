"""Secure aggregation at a site (``federation.secure-aggregation = true``): the site's part of each round.

A round runs four messages at the site (maths: :mod:`shared.secagg`; server side: :mod:`server.secure_aggregation`):

1. ``query.secagg_keys`` (:func:`answer_keys`): draw two fresh X25519 key pairs for this round (one agrees the
   pairwise mask seeds, one encrypts Shamir shares) and send the public halves, signed with the site's
   authentication key when its node config names one (``secagg-signing-key``, :mod:`shared.secagg_signing`);
2. ``query.secagg_shares`` (:func:`answer_shares`): when the node config names the consortium's keys
   (``secagg-trusted-keys``), refuse the round unless every keyed site's keys are signed by a distinct consortium
   key (a server substituting keys is caught here); then, with every keyed site's public keys, draw the self-mask seed,
   split it and the mask private key into Shamir shares (threshold ``t``) and send each peer its share, encrypted
   and bound to (round, sender, receiver); the site keeps its own;
3. ``train`` (:func:`secure_aggregation_mod`, around the train handler): after local training, decrypt the
   peers' shares, and send ``enc(w · (adapter − global)) + masks`` (uint64 ring elements, same names and shapes
   as the packed adapter) instead of the adapter; ``w`` is the site's ``num-examples``, sent in the clear;
4. ``query.secagg_unmask`` (:func:`answer_unmask`): reveal the self-mask shares of the sites whose input the
   server holds and the mask-key shares of those that dropped, once per round, after
   :func:`shared.secagg.check_unmask_request`.

Per-round secrets live in ``context.state`` (the SuperNode keeps it between the messages of a run) and are
replaced by the next round's keys. With secure aggregation on, a train message without the mask setup is
refused: the site never sends its adapter in the clear. ``federation.max-update-norm`` (when above 0) is applied
here, to ``‖adapter − global‖`` before masking, because the server cannot measure a masked update.
"""

from __future__ import annotations

from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log

from client.egress import EgressRefused, outgoing_update_norm
from shared.config import load_run_config
from shared.protocol import (
    ARRAYS,
    METRICS,
    NUM_EXAMPLES,
    SECAGG,
    SECAGG_CIPHERTEXTS,
    SECAGG_DROPPED,
    SECAGG_KEY_SHARES,
    SECAGG_MASK_PUBLIC,
    SECAGG_NODES,
    SECAGG_PEERS,
    SECAGG_SEED_SHARES,
    SECAGG_SHARE_PUBLIC,
    SECAGG_SIGNATURE,
    SECAGG_SIGNER,
    SECAGG_SURVIVORS,
    SECAGG_THRESHOLD,
    SERVER_ROUND,
)
from shared.secagg import (
    KeyPair,
    SecAggError,
    SiteShares,
    check_unmask_request,
    decrypt_shares,
    encode,
    encrypt_shares,
    flatten,
    mask,
    new_seed,
    pair_seed,
    split_secret,
    threshold_for,
    unflatten,
)
from shared.secagg_signing import (
    SIGNING_KEY_NODE_CONFIG,
    TRUSTED_KEYS_NODE_CONFIG,
    KeyBundle,
    key_statement,
    load_signer,
    load_trusted_keys,
    verify_round_keys,
)

__all__ = ["STATE", "answer_keys", "answer_shares", "answer_unmask", "mask_update", "secure_aggregation_mod"]

#: ``context.state`` ConfigRecord holding this round's secrets.
STATE = "secagg-state"
_MASK_PRIVATE, _SHARE_PRIVATE, _SELF_SEED = "mask-private", "share-private", "self-seed"
_HELD_FROM, _DONE = "held-from", "unmasked"


def _ids(values) -> list[int]:
    return [int(value) for value in values]


def _request(msg: Message) -> ConfigRecord:
    return msg.content.config_records[SECAGG]


def _state(context: Context, server_round: int) -> ConfigRecord:
    """This round's secrets; :class:`SecAggError` when the site holds none for ``server_round``."""
    state = context.state.config_records.get(STATE)
    if state is None or int(state[SERVER_ROUND]) != server_round:
        held = None if state is None else int(state[SERVER_ROUND])
        raise SecAggError(
            f"no secure-aggregation keys for round {server_round} at this site (it holds {held})"
        )
    return state


def _reply(msg: Message, values: dict) -> Message:
    return Message(RecordDict({SECAGG: ConfigRecord(values)}), reply_to=msg)


def answer_keys(msg: Message, context: Context) -> Message:
    """Step 1: fresh key pairs for the round in the request; the public halves go back."""
    server_round = int(_request(msg)[SERVER_ROUND])
    masking, sharing = KeyPair.generate(), KeyPair.generate()
    context.state[STATE] = ConfigRecord(
        {SERVER_ROUND: server_round, _MASK_PRIVATE: masking.private, _SHARE_PRIVATE: sharing.private}
    )
    signer, signature = b"", b""
    key_path = context.node_config.get(SIGNING_KEY_NODE_CONFIG)
    if key_path:
        statement = key_statement(
            run_id=int(context.run_id),
            server_round=server_round,
            node_id=int(msg.metadata.dst_node_id),
            mask_public=masking.public,
            share_public=sharing.public,
        )
        signer, signature = load_signer(str(key_path)).sign(statement)
    return _reply(
        msg,
        {
            SECAGG_MASK_PUBLIC: masking.public,
            SECAGG_SHARE_PUBLIC: sharing.public,
            SECAGG_SIGNER: signer,
            SECAGG_SIGNATURE: signature,
        },
    )


def _verify_keys(msg: Message, context: Context, state: ConfigRecord, nodes: list[int]) -> None:
    """Under ``secagg-trusted-keys``: every keyed site's keys in the step-2 request are signed by a distinct
    consortium key, and this site's own entry is the keys it drew (:class:`SecAggError` naming the node or site
    otherwise). Without it: a WARNING per round that the keys are taken on trust."""
    request = _request(msg)
    server_round, me = int(request[SERVER_ROUND]), int(msg.metadata.dst_node_id)
    masks, shares = list(request[SECAGG_MASK_PUBLIC]), list(request[SECAGG_SHARE_PUBLIC])
    own = nodes.index(me)
    mine = (
        KeyPair.from_private(bytes(state[_MASK_PRIVATE])),
        KeyPair.from_private(bytes(state[_SHARE_PRIVATE])),
    )
    if (bytes(masks[own]), bytes(shares[own])) != (mine[0].public, mine[1].public):
        raise SecAggError(
            f"round {server_round}: the server relayed other keys for this site (node {me}) than it sent; "
            "no shares sent"
        )
    source = context.node_config.get(TRUSTED_KEYS_NODE_CONFIG)
    if not source:
        log(
            WARNING,
            "Round %d: secure-aggregation keys of %d site(s) taken unverified: node config %s is not set, so a "
            "server substituting keys would go unnoticed",
            server_round,
            len(nodes),
            TRUSTED_KEYS_NODE_CONFIG,
        )
        return
    signers = list(request.get(SECAGG_SIGNER, [b""] * len(nodes)))
    signatures = list(request.get(SECAGG_SIGNATURE, [b""] * len(nodes)))
    if len(signers) != len(nodes) or len(signatures) != len(nodes):
        raise SecAggError(
            f"round {server_round}: {len(signers)} signer(s) and {len(signatures)} signature(s) relayed for "
            f"{len(nodes)} keyed site(s); no shares sent"
        )
    bundles = [
        KeyBundle(node, bytes(masks[k]), bytes(shares[k]), bytes(signers[k]), bytes(signatures[k]))
        for k, node in enumerate(nodes)
    ]
    names = verify_round_keys(
        bundles,
        load_trusted_keys(str(source)),
        run_id=int(context.run_id),
        server_round=server_round,
        source=str(source),
    )
    log(
        INFO,
        "Round %d: secure-aggregation keys of %s verified against %s",
        server_round,
        ", ".join(sorted(names.values())),
        source,
    )


def answer_shares(msg: Message, context: Context) -> Message:
    """Step 2: Shamir shares of the self-mask seed and the mask private key, one encrypted box per peer."""
    request = _request(msg)
    server_round, me = int(request[SERVER_ROUND]), int(msg.metadata.dst_node_id)
    state = _state(context, server_round)
    nodes, threshold = _ids(request[SECAGG_NODES]), int(request[SECAGG_THRESHOLD])
    if me not in nodes:
        raise SecAggError(f"round {server_round}: this site ({me}) is not among the keyed sites {nodes}")
    if threshold < threshold_for(len(nodes)) or threshold > len(nodes):
        raise SecAggError(
            f"round {server_round}: threshold {threshold} for {len(nodes)} keyed sites; at least "
            f"{threshold_for(len(nodes))} (a strict majority) is required"
        )
    _verify_keys(msg, context, state, nodes)
    self_seed = new_seed()
    seed_shares = split_secret(self_seed, threshold=threshold, num_shares=len(nodes))
    key_shares = split_secret(bytes(state[_MASK_PRIVATE]), threshold=threshold, num_shares=len(nodes))
    share_publics = list(request[SECAGG_SHARE_PUBLIC])
    peers, boxes = [], []
    for k, peer in enumerate(nodes):
        shares = SiteShares(self_seed=seed_shares[k], mask_key=key_shares[k])
        if peer == me:
            own = shares
            continue
        peers.append(str(peer))
        boxes.append(
            encrypt_shares(
                shares,
                private=bytes(state[_SHARE_PRIVATE]),
                peer_public=share_publics[k],
                server_round=server_round,
                src=me,
                dst=peer,
            )
        )
    state.update(
        {
            _SELF_SEED: self_seed,
            SECAGG_THRESHOLD: threshold,
            SECAGG_NODES: [str(n) for n in nodes],
            SECAGG_MASK_PUBLIC: list(request[SECAGG_MASK_PUBLIC]),
            SECAGG_SHARE_PUBLIC: share_publics,
            _HELD_FROM: [str(me)],
            SECAGG_SEED_SHARES: [own.self_seed],
            SECAGG_KEY_SHARES: [own.mask_key],
        }
    )
    return _reply(msg, {SECAGG_PEERS: peers, SECAGG_CIPHERTEXTS: boxes})


def _keep_shares(state: ConfigRecord, setup: ConfigRecord, *, me: int, server_round: int) -> list[int]:
    """Decrypt and keep the shares the peers in the train message's ``setup`` sent; returns the sites the masks
    are shared with (every site that sent shares, this one included)."""
    holders = _ids(setup[SECAGG_NODES])
    threshold = int(state[SECAGG_THRESHOLD])
    if me not in holders or len(holders) < threshold:
        raise SecAggError(
            f"round {server_round}: {len(holders)} site(s) exchanged shares (threshold {threshold}), this site "
            f"{'among them' if me in holders else 'not among them'}; no update sent"
        )
    keyed = _ids(state[SECAGG_NODES])
    publics = list(state[SECAGG_SHARE_PUBLIC])
    sources = _ids(setup[SECAGG_PEERS])
    if sorted(sources) != sorted(set(holders) - {me}):
        raise SecAggError(
            f"round {server_round}: shares from {sorted(sources)}, expected {sorted(set(holders) - {me})}"
        )
    held_from, seed_shares, key_shares = (
        _ids(state[_HELD_FROM]),
        list(state[SECAGG_SEED_SHARES]),
        list(state[SECAGG_KEY_SHARES]),
    )
    for src, box in zip(sources, setup[SECAGG_CIPHERTEXTS], strict=True):
        shares = decrypt_shares(
            box,
            private=bytes(state[_SHARE_PRIVATE]),
            peer_public=publics[keyed.index(src)],
            server_round=server_round,
            src=src,
            dst=me,
        )
        held_from.append(src)
        seed_shares.append(shares.self_seed)
        key_shares.append(shares.mask_key)
    state.update(
        {
            _HELD_FROM: [str(n) for n in held_from],
            SECAGG_SEED_SHARES: seed_shares,
            SECAGG_KEY_SHARES: key_shares,
        }
    )
    return holders


def mask_update(msg: Message, context: Context, reply: Message, *, max_update_norm: float = 0.0) -> Message:
    """Step 3: ``reply`` (the train handler's, holding the packed float32 adapter) with its arrays replaced by the
    masked ring encoding of ``num-examples · (adapter − global)``; the global adapter is the train message's.
    ``max_update_norm`` (``federation.max-update-norm``, 0 = off) bounds ``‖adapter − global‖`` (L2)."""
    setup = _request(msg)
    server_round, me = int(setup[SERVER_ROUND]), int(msg.metadata.dst_node_id)
    state = _state(context, server_round)
    holders = _keep_shares(state, setup, me=me, server_round=server_round)
    sent, received = reply.content[ARRAYS], msg.content[ARRAYS]
    if sorted(sent.keys()) != sorted(received.keys()):
        raise EgressRefused(
            f"update arrays {sorted(sent.keys())} are not the global adapter's {sorted(received.keys())}"
        )
    update = {name: sent[name].numpy().astype(np.float64) - received[name].numpy() for name in sent.keys()}
    shapes = {name: value.shape for name, value in update.items()}
    delta = flatten(update)
    outgoing_update_norm(float(np.linalg.norm(delta)), max_update_norm)
    weight = float(reply.content[METRICS][NUM_EXAMPLES])
    keyed, publics = _ids(state[SECAGG_NODES]), list(state[SECAGG_MASK_PUBLIC])
    private = bytes(state[_MASK_PRIVATE])
    pair_seeds = {
        peer: pair_seed(private, publics[keyed.index(peer)], server_round=server_round, me=me, peer=peer)
        for peer in holders
        if peer != me
    }
    masked = mask(
        encode(delta, weight, num_sites=len(holders)),
        me=me,
        self_seed=bytes(state[_SELF_SEED]),
        pair_seeds=pair_seeds,
    )
    context.state[STATE] = state
    reply.content[ARRAYS] = ArrayRecord(
        {name: Array(value) for name, value in unflatten(masked, shapes).items()}
    )
    return reply


def answer_unmask(msg: Message, context: Context) -> Message:
    """Step 4: the self-mask shares of the survivors and the mask-key shares of the dropped sites, once."""
    request = _request(msg)
    server_round, me = int(request[SERVER_ROUND]), int(msg.metadata.dst_node_id)
    state = _state(context, server_round)
    if bool(state.get(_DONE, False)):
        raise SecAggError(f"round {server_round}: shares were already revealed once; no second answer")
    survivors, dropped = _ids(request[SECAGG_SURVIVORS]), _ids(request.get(SECAGG_DROPPED, []))
    check_unmask_request(
        survivors, dropped, keyed=_ids(state[SECAGG_NODES]), threshold=int(state[SECAGG_THRESHOLD])
    )
    if me not in survivors:
        raise SecAggError(
            f"round {server_round}: this site ({me}) is not named a survivor; no share revealed"
        )
    held = _ids(state[_HELD_FROM])
    missing = sorted(set(survivors + dropped) - set(held))
    if missing:
        raise SecAggError(f"round {server_round}: this site holds no shares of site(s) {missing}")
    seeds, keys = list(state[SECAGG_SEED_SHARES]), list(state[SECAGG_KEY_SHARES])
    state[_DONE] = True
    context.state[STATE] = state
    return _reply(
        msg,
        {
            SECAGG_SURVIVORS: [str(u) for u in survivors],
            SECAGG_SEED_SHARES: [seeds[held.index(u)] for u in survivors],
            SECAGG_DROPPED: [str(v) for v in dropped],
            SECAGG_KEY_SHARES: [keys[held.index(v)] for v in dropped],
        },
    )


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``ClientApp`` mod: under ``federation.secure-aggregation``, a train reply's adapter leaves the site only
    masked (:func:`mask_update`); a train message without the mask setup is refused before training."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    federation = load_run_config(context.run_config).federation
    if not federation.secure_aggregation:
        return call_next(msg, context)
    if SECAGG not in msg.content.config_records:
        raise SecAggError(
            "federation.secure-aggregation is on but the train message carries no mask setup; "
            "this site sends no update in the clear"
        )
    reply = call_next(msg, context)
    if reply.has_error() or ARRAYS not in reply.content.array_records:
        return reply  # a site that declined sends no update: the server recovers its masks
    return mask_update(msg, context, reply, max_update_norm=federation.max_update_norm)
