"""Secure aggregation through Flower's own round loop (``Strategy.start``) with three in-process sites: the
server's strategy sees only masked updates, yet the global adapter equals the plain run's to float32 rounding,
also when a site drops before or after sending its masked input. Config refusals of unsupported combinations."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from client.secure_aggregation import answer_keys, answer_shares, answer_unmask, secure_aggregation_mod
from shared.config import ConfigError, FederationConfig, load_run_config
from shared.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    SECAGG,
    SECAGG_DROPPED,
    SECAGG_KEYS,
    SECAGG_SHARES,
    SECAGG_SURVIVORS,
    SECAGG_UNMASK,
    SERVER_ROUND,
    SITE,
    SITE_ID,
)
from shared.secagg import SecAggError

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = (11, 22, 33)
#: Each site pulls the adapter towards its own target, with its own number of training cases.
TARGETS = {11: -1.5, 22: 0.25, 33: 4.0}
WEIGHTS = {11: 3.0, 22: 10.0, 33: 6.0}
LAYOUT = {"cls": (5,), "seg": (4, 3)}


def _initial() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord(
        {name: Array(rng.normal(size=shape).astype(np.float32)) for name, shape in LAYOUT.items()}
    )


def _train(msg: Message, context: Context) -> Message:
    """A site's local training: halfway from the global adapter to its target (float32, like the real one)."""
    node = context.node_id
    record = msg.content[ARRAYS]
    trained = {
        name: Array((0.5 * record[name].numpy() + 0.5 * TARGETS[node]).astype(np.float32))
        for name in record.keys()
    }
    server_round = int(msg.content[CONFIG][SERVER_ROUND])
    content = RecordDict(
        {
            ARRAYS: ArrayRecord(trained),
            METRICS: MetricRecord({NUM_EXAMPLES: WEIGHTS[node], "train/seg_loss": 0.1}),
            SITE: ConfigRecord({SITE_ID: f"site-{node}", SERVER_ROUND: server_round}),
        }
    )
    return Message(content, reply_to=msg)


class SitesGrid:
    """A grid that runs three sites in this process, each with its own ``Context`` (state kept between
    messages), the secure-aggregation handlers and mod as ``client/app.py`` wires them. ``fail`` names
    ``(node, message type, round)`` that fail (the site is gone for that message); ``seen`` keeps the dtypes of
    every train reply's arrays as the server received them."""

    def __init__(self, run_config: dict, fail: set[tuple[int, str, int]] = frozenset()) -> None:
        self.contexts = {node: Context(1, node, {}, RecordDict(), dict(run_config)) for node in NODES}
        self.fail = set(fail)
        self.seen: list[set[np.dtype]] = []
        self.round = 0

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def _handle(self, msg: Message) -> Message:
        context = self.contexts[msg.metadata.dst_node_id]
        kind = msg.metadata.message_type
        if kind == MessageType.TRAIN:
            self.round = int(msg.content[CONFIG][SERVER_ROUND])
            return secure_aggregation_mod(msg, context, _train)
        handler = {
            f"query.{SECAGG_KEYS}": answer_keys,
            f"query.{SECAGG_SHARES}": answer_shares,
            f"query.{SECAGG_UNMASK}": answer_unmask,
        }[kind]
        return handler(msg, context)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            server_round = int(
                msg.content.config_records.get(SECAGG, msg.content.config_records.get(CONFIG, {})).get(
                    SERVER_ROUND, 0
                )
            )
            if (msg.metadata.dst_node_id, msg.metadata.message_type, server_round) in self.fail:
                replies.append(Message(Error(code=1, reason="site went offline"), reply_to=msg))
                continue
            try:
                reply = self._handle(msg)
            except Exception as exc:  # Flower turns a handler's exception into an error reply
                reply = Message(Error(code=2, reason=str(exc)), reply_to=msg)
            if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
                self.seen.append({array.numpy().dtype for array in reply.content[ARRAYS].values()})
            replies.append(reply)
        return replies


def _federation(secure: bool, *, strategy: str = "fedavg", rounds: int = 2, fail=frozenset()):
    """Run ``rounds`` rounds through ``Strategy.start``; (final adapter as a flat float64 vector, or None when no
    round aggregated anything, grid)."""
    from server.strategies import build_strategy

    run_config = {
        "federation.strategy": strategy,
        "federation.secure-aggregation": secure,
        "federation.min-sites": 2,
        "federation.fraction-evaluate": 0.0,
        "federation.server-lr": 0.5,
    }
    config = load_run_config(run_config)
    grid = SitesGrid(run_config, fail)
    result = build_strategy(config.federation, privacy=config.privacy).start(
        grid=grid, initial_arrays=_initial(), num_rounds=rounds, timeout=10.0
    )
    if not len(result.arrays):  # no round aggregated anything: Flower keeps no arrays
        return None, grid
    flat = np.concatenate([result.arrays[name].numpy().astype(np.float64).ravel() for name in sorted(LAYOUT)])
    return flat, grid


def _plain_fedavg(nodes, rounds=2) -> np.ndarray:
    """The plain weighted mean, in float64, over ``rounds`` rounds with the sites in ``nodes``."""
    initial = _initial()
    current = np.concatenate([initial[name].numpy().astype(np.float64).ravel() for name in sorted(LAYOUT)])
    for _ in range(rounds):
        trained = [0.5 * current + 0.5 * TARGETS[node] for node in nodes]
        current = np.average(trained, axis=0, weights=[WEIGHTS[node] for node in nodes])
    return current


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_the_masked_federation_gives_the_plain_global_adapter(strategy):
    plain, _ = _federation(False, strategy=strategy)
    masked, grid = _federation(True, strategy=strategy)
    np.testing.assert_allclose(masked, plain, rtol=1e-6, atol=1e-6)
    if strategy == "fedavg":
        np.testing.assert_allclose(masked, _plain_fedavg(NODES), rtol=1e-6, atol=1e-6)
    assert grid.seen == [{np.dtype(np.uint64)}] * 6  # what the server received: ring elements, never floats


def test_a_site_that_drops_before_sending_its_masked_input_is_left_out_exactly():
    """Site 33 exchanged keys and shares in round 2 but its train reply never came: its masks come off via the
    others' shares of its mask key, and round 2 is the weighted mean of sites 11 and 22."""
    masked, grid = _federation(True, fail={(33, MessageType.TRAIN, 2)})
    one = _plain_fedavg(NODES, rounds=1)
    expected = np.average([0.5 * one + 0.5 * TARGETS[n] for n in (11, 22)], axis=0, weights=[3.0, 10.0])
    np.testing.assert_allclose(masked, expected, rtol=1e-6, atol=1e-6)


def test_a_site_that_drops_after_sending_its_masked_input_stays_in_the_sum():
    """Site 33 sent its masked input, then missed the unmasking step: the survivors' shares rebuild its
    self-mask seed, and the result is the plain three-site mean."""
    masked, _ = _federation(True, fail={(33, f"query.{SECAGG_UNMASK}", 1), (33, f"query.{SECAGG_UNMASK}", 2)})
    np.testing.assert_allclose(masked, _plain_fedavg(NODES), rtol=1e-6, atol=1e-6)


def test_below_the_threshold_the_round_is_skipped_and_the_global_adapter_kept(caplog):
    """Two of three sites miss the key exchange in round 1 (threshold 2): no train message goes out, and round 1
    aggregates nothing; round 2 runs normally."""
    fail = {(22, f"query.{SECAGG_KEYS}", 1), (33, f"query.{SECAGG_KEYS}", 1)}
    masked, grid = _federation(True, rounds=1, fail=fail)
    assert masked is None and grid.seen == []
    assert "only 1 site(s) exchanged keys, below the secure-aggregation threshold 2" in caplog.text
    masked, _ = _federation(True, rounds=2, fail=fail)
    np.testing.assert_allclose(masked, _plain_fedavg(NODES, rounds=1), rtol=1e-6, atol=1e-6)


def _unmask_request(grid: SitesGrid, node: int, survivors, dropped) -> Message:
    record = ConfigRecord(
        {
            SERVER_ROUND: grid.round,
            SECAGG_SURVIVORS: [str(n) for n in survivors],
            SECAGG_DROPPED: [str(n) for n in dropped],
        }
    )
    return Message(RecordDict({SECAGG: record}), dst_node_id=node, message_type=f"query.{SECAGG_UNMASK}")


def test_a_site_reveals_its_shares_once_per_round_and_never_both_masks_of_one_site():
    _, grid = _federation(True, rounds=1)
    context = grid.contexts[11]
    with pytest.raises(SecAggError, match="already revealed"):  # the server already unmasked round 1
        answer_unmask(_unmask_request(grid, 11, [11, 22], [33]), context)
    _, grid = _federation(True, rounds=1, fail={(n, f"query.{SECAGG_UNMASK}", 1) for n in NODES})
    with pytest.raises(SecAggError, match="both as survivors and as dropped"):
        answer_unmask(_unmask_request(grid, 11, [11, 22, 33], [33]), grid.contexts[11])


def test_with_secure_aggregation_on_a_site_never_sends_its_adapter_in_the_clear():
    context = Context(1, 11, {}, RecordDict(), {"federation.secure-aggregation": True})
    content = RecordDict({ARRAYS: _initial(), CONFIG: ConfigRecord({SERVER_ROUND: 1})})
    msg = Message(content, dst_node_id=11, message_type=MessageType.TRAIN)
    with pytest.raises(SecAggError, match="no update in the clear"):
        secure_aggregation_mod(msg, context, _train)


def test_the_site_applies_the_absolute_norm_bound_and_the_round_goes_on_without_it():
    """Under secure aggregation the server cannot measure norms: site 33 (target 4.0, the largest step) refuses
    its own update, and the round is the mean of the other two."""
    from server.strategies import build_strategy

    run_config = {
        "federation.secure-aggregation": True,
        "federation.fraction-evaluate": 0.0,
        "federation.max-update-norm": 6.0,
    }
    config = load_run_config(run_config)
    grid = SitesGrid(run_config)
    result = build_strategy(config.federation, privacy=config.privacy).start(
        grid=grid, initial_arrays=_initial(), num_rounds=1, timeout=10.0
    )
    flat = np.concatenate([result.arrays[name].numpy().astype(np.float64).ravel() for name in sorted(LAYOUT)])
    start = _plain_fedavg(NODES, rounds=0)
    expected = np.average([0.5 * start + 0.5 * TARGETS[n] for n in (11, 22)], axis=0, weights=[3.0, 10.0])
    np.testing.assert_allclose(flat, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"federation.strategy": "fedmedian"}, "federation.strategy"),
        ({"federation.strategy": "krum"}, "federation.strategy"),
        ({"federation.lora-aggregation": "product"}, "federation.lora-aggregation"),
        ({"federation.compression": "int8"}, "federation.compression"),
        ({"privacy.client-dp": "server-fixed"}, "privacy.client-dp"),
    ],
)
def test_unsupported_combinations_are_refused_when_the_config_is_loaded(settings, key):
    with pytest.raises(ConfigError, match=f"secure-aggregation = true cannot be combined with {key}"):
        load_run_config({"federation.secure-aggregation": True, **settings})
    load_run_config(settings)  # each setting alone is fine


def test_secure_aggregation_is_off_by_default():
    assert FederationConfig().secure_aggregation is False
