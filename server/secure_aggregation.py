"""Secure aggregation on the server (``federation.secure-aggregation = true``): the server learns only the
weighted sum of the sites' adapter updates.

Flower 1.42's SecAgg+ (``SecAggPlusWorkflow``, ``secaggplus_mod``) cannot serve this app: the workflow needs a
``LegacyContext`` and a legacy ``Strategy.configure_fit`` with a ``ClientManager``, and the mod reads and writes
legacy ``fitres.*`` records. This module runs the same protocol family (pairwise masks, Shamir dropout recovery;
maths in :mod:`shared.secagg`, the site's part in :mod:`client.secure_aggregation`) around Flower's own round
loop, through two strategy hooks (:class:`server.strategies.FedabusHooks`):

* :meth:`SecureAggregation.prepare`, in ``configure_train`` once the sites are sampled: ``query.secagg_keys``
  (fresh per-round keys, signed by sites that hold a signing key) then ``query.secagg_shares`` (every keyed site's
  keys and signatures relayed for the sites to verify; encrypted Shamir shares routed back here); every train message
  then carries, for its site, the shares addressed to it. A site that misses either step gets no train message;
  a round with fewer than ``t`` sites left is skipped (global adapter unchanged);
* :meth:`SecureAggregation.unmask`, in ``aggregate_train`` after admission (which under secure aggregation checks
  names, lengths, dtype, round and metrics, not values): the admitted inputs are the survivors, every other site
  that exchanged shares has dropped; ``query.secagg_unmask`` asks the survivors for the survivors' self-mask
  shares and the dropped sites' mask-key shares, ``t`` of each rebuild the seeds, and the masks come off the sum.
  Every admitted reply then carries the same unmasked weighted mean ``global + Σ wᵢ·Δᵢ / Σ wᵢ`` (float32), so the
  strategy's own weighted mean (FedAvg, FedProx, FedAdam's pseudo-gradient) returns it unchanged and its metric
  aggregation still sees every site's metrics.

The weights ``wᵢ`` (``num-examples``, training cases) travel in the clear, as without secure aggregation; the
handshake already reports every site's case counts. Cost per round: three extra message exchanges; uploads of
8 bytes per adapter element (uint64 ring) instead of 4.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from shared.protocol import (
    ARRAYS,
    METRICS,
    NUM_EXAMPLES,
    SECAGG,
    SECAGG_CIPHERTEXTS,
    SECAGG_DROPPED,
    SECAGG_KEY_SHARES,
    SECAGG_KEYS,
    SECAGG_MASK_PUBLIC,
    SECAGG_NODES,
    SECAGG_PEERS,
    SECAGG_SEED_SHARES,
    SECAGG_SHARE_PUBLIC,
    SECAGG_SHARES,
    SECAGG_SIGNATURE,
    SECAGG_SIGNER,
    SECAGG_SURVIVORS,
    SECAGG_THRESHOLD,
    SECAGG_UNMASK,
    SERVER_ROUND,
)
from shared.secagg import SecAggError, combine_secret, decode, flatten, threshold_for, unflatten, unmask

__all__ = ["RoundSetup", "SecureAggregation"]


def _strings(ids: Iterable[int]) -> list[str]:
    return [str(node) for node in ids]


@dataclass
class RoundSetup:
    """One round's key exchange as the server saw it: the threshold ``t``, every keyed site's mask public key,
    and the sites that sent shares (the masks are shared among exactly these)."""

    server_round: int
    threshold: int
    mask_publics: dict[int, bytes]
    holders: list[int] = field(default_factory=list)


class SecureAggregation:
    """The server's part of secure aggregation; one per run, holding the current round's :class:`RoundSetup`."""

    def __init__(self, *, timeout: float) -> None:
        self.timeout = timeout
        self.setup: RoundSetup | None = None

    def _ask(self, grid: Grid, nodes: Iterable[int], action: str, values: dict) -> dict[int, ConfigRecord]:
        """Send ``query.<action>`` with the ``secagg`` record ``values`` to ``nodes``; the answers by node. A site
        that fails or does not answer within the timeout is logged and left out."""
        content = RecordDict({SECAGG: ConfigRecord(values)})
        messages = [
            Message(content, dst_node_id=node, message_type=f"{MessageType.QUERY}.{action}") for node in nodes
        ]
        answers = {}
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(
                    WARNING,
                    "Secure aggregation %s: site node-%d failed: %s",
                    action,
                    node,
                    reply.error.reason,
                )
            else:
                answers[node] = reply.content.config_records[SECAGG]
        return answers

    def prepare(self, grid: Grid, server_round: int, messages: list[Message]) -> list[Message]:
        """Steps 1–2 for the sites ``messages`` go to; returns their train messages with each site's ``secagg``
        record (the sites that completed both steps only), or [] when fewer than ``t`` are left."""
        self.setup = None
        if not messages:
            return []
        sampled = sorted(msg.metadata.dst_node_id for msg in messages)
        threshold = threshold_for(len(sampled))
        keys = self._ask(grid, sampled, SECAGG_KEYS, {SERVER_ROUND: server_round})
        keyed = sorted(keys)
        if not self._enough(server_round, "exchanged keys", len(keyed), threshold):
            return []
        shares = self._ask(
            grid,
            keyed,
            SECAGG_SHARES,
            {
                SERVER_ROUND: server_round,
                SECAGG_THRESHOLD: threshold,
                SECAGG_NODES: _strings(keyed),
                SECAGG_MASK_PUBLIC: [keys[node][SECAGG_MASK_PUBLIC] for node in keyed],
                SECAGG_SHARE_PUBLIC: [keys[node][SECAGG_SHARE_PUBLIC] for node in keyed],
                SECAGG_SIGNER: [bytes(keys[node].get(SECAGG_SIGNER, b"")) for node in keyed],
                SECAGG_SIGNATURE: [bytes(keys[node].get(SECAGG_SIGNATURE, b"")) for node in keyed],
            },
        )
        holders = sorted(shares)
        if not self._enough(server_round, "sent their Shamir shares", len(holders), threshold):
            return []
        inbox: dict[int, tuple[list[str], list[bytes]]] = {node: ([], []) for node in holders}
        for src, record in shares.items():
            for dst, box in zip(record[SECAGG_PEERS], record[SECAGG_CIPHERTEXTS], strict=True):
                if int(dst) in inbox:
                    inbox[int(dst)][0].append(str(src))
                    inbox[int(dst)][1].append(box)
        self.setup = RoundSetup(
            server_round, threshold, {node: bytes(keys[node][SECAGG_MASK_PUBLIC]) for node in keyed}, holders
        )
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in inbox:
                continue
            record = ConfigRecord(
                {
                    SERVER_ROUND: server_round,
                    SECAGG_NODES: _strings(holders),
                    SECAGG_PEERS: inbox[node][0],
                    SECAGG_CIPHERTEXTS: inbox[node][1],
                }
            )
            content = RecordDict({**dict(msg.content), SECAGG: record})
            out.append(Message(content, dst_node_id=node, message_type=msg.metadata.message_type))
        log(
            INFO,
            "Round %d: secure aggregation set up among %d site(s), threshold %d",
            server_round,
            len(out),
            threshold,
        )
        return out

    @staticmethod
    def _enough(server_round: int, what: str, count: int, threshold: int) -> bool:
        if count >= threshold:
            return True
        log(
            WARNING,
            "Round %d: only %d site(s) %s, below the secure-aggregation threshold %d; the round is skipped and "
            "the global adapter is unchanged",
            server_round,
            count,
            what,
            threshold,
        )
        return False

    def unmask(
        self, grid: Grid, server_round: int, admitted: list[Message], reference: ArrayRecord
    ) -> list[Message]:
        """Step 4: ``admitted`` (the survivors' masked replies) each carrying the unmasked weighted mean adapter
        ``reference + Σ wᵢ·Δᵢ / Σ wᵢ`` (float32); [] when the masks cannot come off (too few survivors or shares,
        shares that do not rebuild), logged with the reason."""
        setup = self.setup
        if setup is None or setup.server_round != server_round or not admitted:
            return []
        survivors = sorted(msg.metadata.src_node_id for msg in admitted)
        dropped = sorted(set(setup.holders) - set(survivors))
        if not self._enough(server_round, "sent an admitted masked update", len(survivors), setup.threshold):
            return []
        answers = self._ask(
            grid,
            survivors,
            SECAGG_UNMASK,
            {
                SERVER_ROUND: server_round,
                SECAGG_SURVIVORS: _strings(survivors),
                SECAGG_DROPPED: _strings(dropped),
            },
        )
        if not self._enough(server_round, "revealed their shares", len(answers), setup.threshold):
            return []
        try:
            seeds = self._rebuild(answers, survivors, SECAGG_SURVIVORS, SECAGG_SEED_SHARES, setup.threshold)
            keys = self._rebuild(answers, dropped, SECAGG_DROPPED, SECAGG_KEY_SHARES, setup.threshold)
        except SecAggError as exc:
            log(
                WARNING,
                "Round %d: secure aggregation cannot unmask the sum: %s; round skipped",
                server_round,
                exc,
            )
            return []
        masked_sum = sum(
            (
                flatten({k: v.numpy() for k, v in msg.content[ARRAYS].items()}, np.uint64)
                for msg in admitted[1:]
            ),
            flatten({k: v.numpy() for k, v in admitted[0].content[ARRAYS].items()}, np.uint64),
        )
        ring = unmask(
            masked_sum,
            self_seeds=seeds,
            dropped_keys=keys,
            public_keys=setup.mask_publics,
            server_round=server_round,
        )
        total_weight = sum(float(msg.content[METRICS][NUM_EXAMPLES]) for msg in admitted)
        glob = {name: array.numpy() for name, array in reference.items()}
        mean = flatten(glob) + decode(ring, total_weight)
        shapes = {name: value.shape for name, value in glob.items()}
        record = ArrayRecord(
            {name: Array(value.astype(np.float32)) for name, value in unflatten(mean, shapes).items()}
        )
        for msg in admitted:
            msg.content[ARRAYS] = record
        log(
            INFO,
            "Round %d: secure aggregation unmasked the sum of %d site(s); %d dropped after the key exchange",
            server_round,
            len(survivors),
            len(dropped),
        )
        self.setup = None
        return admitted

    @staticmethod
    def _rebuild(
        answers: dict[int, ConfigRecord], owners: list[int], owner_key: str, share_key: str, threshold: int
    ) -> dict[int, bytes]:
        """``{owner: secret}`` rebuilt from the shares of ``owners`` in the sites' ``answers``."""
        shares: dict[int, list[bytes]] = {owner: [] for owner in owners}
        for record in answers.values():
            for owner, share in zip(record.get(owner_key, []), record.get(share_key, []), strict=True):
                if int(owner) in shares:
                    shares[int(owner)].append(bytes(share))
        return {owner: combine_secret(held, threshold=threshold) for owner, held in shares.items()}
