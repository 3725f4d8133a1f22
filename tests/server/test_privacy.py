"""Client-level DP around the fedabus strategies, on mocked replies (no processes)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from server.privacy import ClientPrivacyBudgetSpent, update_norm
from server.privacy_accountant import ClientPrivacyAccountant, ClientPrivacyJournalError
from server.round_numbering import RoundNumbering
from server.strategies import FedabusHooks, build_strategy
from shared.config import ConfigError, FederationConfig, PrivacyConfig
from shared.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, SITE

MODES = {
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    "server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
    "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping,
}
#: Packed adapter layout as shared.protocol sends it: one flat float32 array per model.
SIZES = {"cls": 6, "seg": 10}
SERVER_MODULES = [
    Path(__file__).resolve().parents[2] / "server" / name for name in ("federation_run.py", "round_end.py")
]


class FakeGrid:
    """Nodes online; ``send_and_receive`` answers train messages with ``train_reply(node, message)``."""

    def __init__(self, nodes: list[int], train_reply=None) -> None:
        self.nodes = nodes
        self.train_reply = train_reply

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == MessageType.TRAIN:
                replies.append(self.train_reply(node, msg))
            else:
                metrics = MetricRecord({NUM_EXAMPLES: 1, "test/dice": 0.5})
                content = RecordDict({METRICS: metrics, SITE: ConfigRecord({"site-id": f"s{node}"})})
                replies.append(Message(content, reply_to=msg))
        return replies


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


def packed(values: dict[str, np.ndarray] | float) -> ArrayRecord:
    if not isinstance(values, dict):
        values = {k: np.full(n, values, dtype=np.float32) for k, n in SIZES.items()}
    return ArrayRecord({k: Array(np.asarray(values[k], dtype=np.float32)) for k in sorted(SIZES)})


def direction(seed: int, norm: float) -> dict[str, np.ndarray]:
    """A fixed random update of the given L2 norm over both packed arrays."""
    flat = np.random.default_rng(seed).normal(size=sum(SIZES.values()))
    flat *= norm / np.linalg.norm(flat)
    return {"cls": flat[: SIZES["cls"]], "seg": flat[SIZES["cls"] :]}


def reply(
    node: int,
    site: str,
    update: ArrayRecord | None,
    *,
    examples: int = 1,
    norm_bit=None,
    server_round: int = 1,
) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = {NUM_EXAMPLES: examples, "train/seg_loss": 0.25}
    if norm_bit is not None:
        metrics[KEY_NORM_BIT] = norm_bit
    content = RecordDict({METRICS: MetricRecord(metrics)})
    site_record = {"site-id": site, "server-round": server_round}
    content[SITE] = ConfigRecord(site_record if update else {**site_record, "declined": "budget"})
    if update is not None:
        content[ARRAYS] = update
    return Message(content, reply_to=request)


def dp_strategy(
    mode: str,
    *,
    sigma: float = 0.0,
    clip: float = 1.0,
    delta: float = 1e-5,
    proximal_mu: float = 0.0,
    **federation,
):
    """A strategy under client-level DP ``mode``; ``federation``: FederationConfig fields (``min_sites`` 1)."""
    privacy = PrivacyConfig(
        client_dp=mode, client_noise_multiplier=sigma, client_clip_norm=clip, client_delta=delta
    )
    federation.setdefault("min_sites", 1)
    return build_strategy(FederationConfig(**federation), proximal_mu=proximal_mu, privacy=privacy)


def configure(strategy, nodes: list[int], global_arrays: ArrayRecord | None = None) -> list[Message]:
    arrays = global_arrays if global_arrays is not None else packed(0.0)
    return list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(nodes)))


def as_flat(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([record[k].numpy().astype(np.float64) for k in record.keys()])


def flat(values: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(values[k], dtype=np.float64) for k in sorted(SIZES)])


# ------------------------------------------------------------------------------------------ the hooks survive
def test_every_strategy_attribute_server_app_uses_is_offered_by_the_wrapper():
    used = {
        name
        for module in SERVER_MODULES
        for name in re.findall(r"\bstrategy\.(\w+)", module.read_text(encoding="utf-8"))
    }
    assert {
        "rounds",
        "last_train_metrics",
        "get_state",
        "set_state",
    } <= used  # the regex sees the server
    for mode in MODES:
        strategy = dp_strategy(mode)
        missing = [name for name in used if not hasattr(strategy, name)]
        assert not missing, f"{mode}: wrapper lacks {missing}"


@pytest.mark.parametrize("mode", MODES)
def test_wrapper_keeps_round_numbering_vetting_eval_interval_and_site_metrics(mode):
    strategy = dp_strategy(mode, clip=2.0, eval_interval=2)
    assert isinstance(strategy, MODES[mode]) and isinstance(strategy.strategy, FedabusHooks)
    strategy.rounds = RoundNumbering(done_before=4)
    strategy.node_vetting = lambda nodes: {n for n in nodes if n != 3}
    messages = configure(strategy, [1, 2, 3])
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]
    config = messages[0].content[CONFIG]
    assert config["server-round"] == 5 and strategy.strategy.rounds.done_before == 4
    assert (config.get(KEY_CLIPPING_NORM) == pytest.approx(2.0)) == mode.startswith("client-")
    assert (
        list(strategy.configure_evaluate(1, packed(0.0), ConfigRecord(), FakeGrid([1, 2]))) == []
    )  # round 5
    assert len(list(strategy.configure_evaluate(2, packed(0.0), ConfigRecord(), FakeGrid([1, 2])))) == 2
    bit = 0 if mode == "client-adaptive" else None
    replies = [reply(1, "a", packed(direction(0, 0.5)), norm_bit=bit, server_round=5), reply(2, "b", None)]
    arrays, _ = strategy.aggregate_train(1, replies)  # Flower's round 1 is the federation's round 5
    assert arrays is not None
    assert set(strategy.last_train_metrics) == {"a", "b"}
    assert KEY_NORM_BIT not in strategy.last_train_metrics["a"]  # a site's clip bit is not tracked
    assert strategy.client_privacy_spent() == (math.inf, 1e-5)  # σ = 0: clipped, not private
    assert strategy.privacy_metrics() == {"privacy/client_clip_norm": 2.0, "privacy/client_noise_std": 0.0}


def test_without_client_dp_the_strategy_is_unwrapped_and_reports_no_privacy():
    strategy = build_strategy(FederationConfig(strategy="krum", min_sites=1), privacy=PrivacyConfig())
    assert isinstance(strategy, FedabusHooks)
    assert strategy.client_privacy_spent() is None and strategy.privacy_metrics() == {}


def test_state_round_trips_clip_norm_and_ledger():
    strategy = dp_strategy("server-adaptive", sigma=1.0, clip=1.0)
    np.random.seed(0)  # Flower's clipped-count noise uses numpy's global generator
    for server_round in (1, 2):
        configure(strategy, [1, 2])
        replies = [
            reply(1, "a", packed(direction(1, 3.0)), server_round=server_round),
            reply(2, "b", packed(direction(2, 4.0)), server_round=server_round),
        ]
        strategy.aggregate_train(server_round, replies)
    state = strategy.get_state()
    fresh = dp_strategy("server-adaptive", sigma=1.0, clip=1.0)
    fresh.set_state(state)
    assert fresh.clipping_norm == strategy.clipping_norm != 1.0
    assert fresh.client_privacy_spent() == strategy.client_privacy_spent()
    assert fresh.client_accountant.releases == 2


# ------------------------------------------------------------------------------------------ clipping and noise
def test_server_fixed_clips_each_update_and_divides_by_the_sampled_sites():
    strategy = dp_strategy("server-fixed", clip=1.0)
    configure(strategy, [1, 2, 3])
    big, small = direction(1, 10.0), direction(2, 0.5)
    replies = [
        reply(1, "a", packed(big), examples=1),
        reply(2, "b", packed(small), examples=100),  # case counts do not weigh
        reply(3, "c", None),  # declined: a zero update
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = (flat(big) / 10.0 + flat(small)) / 3
    np.testing.assert_allclose(as_flat(arrays), expected, rtol=1e-5, atol=1e-7)


def test_server_fixed_clips_relative_to_the_global_adapter():
    strategy = dp_strategy("server-fixed", clip=0.5)
    start = packed(3.0)
    configure(strategy, [1], start)
    update = {k: np.full(n, 3.0) + direction(4, 2.0)[k] for k, n in SIZES.items()}
    arrays, _ = strategy.aggregate_train(1, [reply(1, "a", packed(update))])
    assert update_norm(arrays, start) == pytest.approx(0.5, rel=1e-5)


def test_failed_and_malformed_replies_count_as_zero_updates():
    strategy = dp_strategy("server-fixed", clip=1.0)
    configure(strategy, [1, 2, 3, 4])
    request = Message(content=RecordDict(), dst_node_id=3, message_type=MessageType.TRAIN)
    wrong = ArrayRecord({"seg": Array(np.ones(4, dtype=np.float32))})
    replies = [
        reply(1, "a", packed(direction(5, 0.3))),
        reply(2, "b", wrong),
        Message(Error(code=1, reason="site crashed"), reply_to=request),
        reply(4, "d", packed(math.nan)),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(as_flat(arrays), flat(direction(5, 0.3)) / 4, rtol=1e-5, atol=1e-7)


def test_client_fixed_sends_the_norm_and_reclips_an_unclipped_update():
    strategy = dp_strategy("client-fixed", clip=1.0)
    configure(strategy, [1, 2])
    unclipped, clipped = direction(6, 5.0), direction(7, 0.8)
    arrays, _ = strategy.aggregate_train(
        1, [reply(1, "a", packed(unclipped)), reply(2, "b", packed(clipped))]
    )
    expected = (flat(unclipped) / 5.0 + flat(clipped)) / 2
    np.testing.assert_allclose(as_flat(arrays), expected, rtol=1e-5, atol=1e-7)


def test_client_adaptive_drops_a_reply_without_norm_bit_and_adapts_the_norm():
    strategy = dp_strategy("client-adaptive", clip=1.0)
    configure(strategy, [1, 2])
    replies = [reply(1, "a", packed(direction(8, 1.0)), norm_bit=1), reply(2, "b", packed(direction(9, 0.4)))]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(as_flat(arrays), flat(direction(8, 1.0)) / 2, rtol=1e-5, atol=1e-7)
    assert strategy.clipping_norm == pytest.approx(math.exp(-0.2 * (1.0 - 0.5)))  # σ = 0: exact count


def test_noise_std_is_sigma_times_clip_norm_over_sampled_sites():
    sigma, clip, sites, size = 2.0, 0.5, 4, 40_000
    strategy = dp_strategy("server-fixed", sigma=sigma, clip=clip)
    strategy.noise_rng = np.random.default_rng(123)
    zeros = ArrayRecord({"seg": Array(np.zeros(size, dtype=np.float32))})
    strategy.configure_train(1, zeros, ConfigRecord(), FakeGrid(list(range(1, sites + 1))))
    update = ArrayRecord({"seg": Array(np.full(size, 1e-3, dtype=np.float32))})  # norm 0.2 < clip
    replies = [reply(n, f"s{n}", update) for n in range(1, sites + 1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    noise = arrays["seg"].numpy().astype(np.float64) - 1e-3
    std = sigma * clip / sites
    assert strategy.last_noise_std == pytest.approx(std)
    expected = np.random.default_rng(123).normal(0.0, std, size)  # the seeded draw, exactly
    np.testing.assert_allclose(noise, expected, rtol=0, atol=1e-6)
    assert np.std(noise) == pytest.approx(std, rel=0.02) and abs(np.mean(noise)) < 4 * std / math.sqrt(size)


def test_adaptive_noise_uses_the_norm_the_round_clipped_with():
    sigma, clip = 1.0, 1.0
    strategy = dp_strategy("server-adaptive", sigma=sigma, clip=clip)
    strategy.noise_rng = np.random.default_rng(0)
    np.random.seed(1)
    configure(strategy, [1, 2])
    strategy.aggregate_train(
        1, [reply(1, "a", packed(direction(1, 5.0))), reply(2, "b", packed(direction(2, 6.0)))]
    )
    count_std = max(2 / 20, sigma)  # fedabus' clipped-count noise
    update_sigma = (sigma**-2 - (2 * count_std) ** -2) ** -0.5
    assert strategy.last_noise_std == pytest.approx(update_sigma * clip / 2)
    assert strategy.clipping_norm != clip  # the next round clips with the adapted norm
    assert strategy.client_accountant.ledger() == [[sigma, 1.0]]  # accounted at the configured σ


# ------------------------------------------------------------------------------------------ accounting
def _rdp_gaussian_epsilon(rounds: int, sigma: float, delta: float, orders: list[float]) -> float:
    """Independent: RDP of the Gaussian mechanism α / (2σ²) per round, Balle et al. (2020) conversion."""
    best = math.inf
    for a in orders:
        rdp = rounds * a / (2 * sigma**2)
        best = min(best, rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1))
    return best


def _rdp_subsampled_integer(q: float, sigma: float, alpha: int) -> float:
    """Independent: sampled Gaussian RDP at integer α by binomial expansion (Mironov et al. 2019, eq. 3.3)."""
    log_terms = [
        math.log(math.comb(alpha, k))
        + (alpha - k) * math.log(1 - q)
        + k * math.log(q)
        + (k * k - k) / (2 * sigma**2)
        for k in range(alpha + 1)
    ]
    top = max(log_terms)
    return (top + math.log(math.fsum(math.exp(t - top) for t in log_terms))) / (alpha - 1)


def test_epsilon_grows_with_rounds_and_matches_the_gaussian_rdp_bound():
    sigma, delta = 1.5, 1e-5
    accountant = ClientPrivacyAccountant(delta)
    previous = accountant.epsilon()
    assert previous == 0.0
    for rounds in range(1, 6):
        accountant.compose(sigma, 1.0)
        epsilon = accountant.epsilon()
        assert epsilon > previous
        assert epsilon == pytest.approx(
            _rdp_gaussian_epsilon(rounds, sigma, delta, accountant.orders), rel=1e-9
        )
        previous = epsilon
    assert accountant.spent() == (previous, delta)


def test_sampling_amplification_matches_the_binomial_expansion():
    sigma, q, delta, rounds = 1.0, 0.25, 1e-4, 7
    orders = [float(a) for a in range(2, 40)]
    accountant = ClientPrivacyAccountant(delta, orders=orders)
    for _ in range(rounds):
        accountant.compose(sigma, q)
    independent = min(
        rounds * _rdp_subsampled_integer(q, sigma, int(a))
        + math.log((a - 1) / a)
        - (math.log(delta) + math.log(a)) / (a - 1)
        for a in orders
    )
    assert accountant.epsilon() == pytest.approx(independent, rel=1e-6)
    assert accountant.epsilon() < accountant.epsilon(amplification=False)
    restored = ClientPrivacyAccountant(delta, orders=orders)
    restored.restore(accountant.ledger())
    assert restored.epsilon() == accountant.epsilon()


def test_rounds_are_accounted_at_sampled_over_eligible_sites():
    strategy = dp_strategy("server-fixed", sigma=1.0, fraction_train=0.5)
    messages = configure(strategy, [1, 2, 3, 4])
    assert len(messages) == 2
    replies = [reply(m.metadata.dst_node_id, "x", packed(direction(3, 0.1))) for m in messages]
    strategy.aggregate_train(1, replies)
    assert strategy.client_accountant.ledger() == [[1.0, 0.5]]
    metrics = strategy.privacy_metrics()
    assert 0 < metrics["privacy/client_epsilon"] < metrics["privacy/client_epsilon_no_amplification"]


def clipped_reply(node: int, msg: Message) -> Message:
    """A site's train reply: the global adapter plus a fixed update of norm 0.5 (clipped at the site)."""
    sent = msg.content[ARRAYS]
    update = {k: sent[k].numpy() + direction(node, 0.5)[k] for k in SIZES}
    site = ConfigRecord({"site-id": f"s{node}", "server-round": msg.content[CONFIG]["server-round"]})
    content = {METRICS: MetricRecord({NUM_EXAMPLES: node}), ARRAYS: packed(update), SITE: site}
    return Message(RecordDict(content), reply_to=msg)


def test_federation_loop_reports_epsilon_after_every_round():
    strategy = dp_strategy("client-fixed", sigma=1.0, clip=0.5, min_sites=2)
    strategy.noise_rng = np.random.default_rng(0)

    def train_reply(node, msg):
        assert msg.content[CONFIG][KEY_CLIPPING_NORM] == pytest.approx(0.5)
        return clipped_reply(node, msg)

    epsilons = []

    def after_round(server_round, arrays):
        if server_round:
            epsilons.append(strategy.privacy_metrics()["privacy/client_epsilon"])

    strategy.start(
        grid=FakeGrid([1, 2], train_reply), initial_arrays=packed(0.0), num_rounds=3, evaluate_fn=after_round
    )
    accountant = ClientPrivacyAccountant(1e-5)
    for expected in epsilons:
        accountant.compose(1.0, 1.0)
        assert expected == pytest.approx(accountant.epsilon())
    assert len(epsilons) == 3 and epsilons == sorted(set(epsilons))


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"client_dp": "local"}, "privacy.client-dp = 'local'"),
        ({"client_noise_multiplier": -0.5}, "privacy.client-noise-multiplier = -0.5"),
        ({"client_noise_multiplier": math.nan}, "privacy.client-noise-multiplier = nan"),
        ({"client_clip_norm": 0.0}, "privacy.client-clip-norm = 0.0"),
        ({"client_clip_norm": -1.0}, "privacy.client-clip-norm = -1.0"),
        ({"client_delta": 0.0}, "privacy.client-delta = 0.0"),
        ({"client_delta": 1.0}, "privacy.client-delta = 1.0"),
    ],
)
def test_invalid_privacy_settings_are_refused(settings, message):
    privacy = PrivacyConfig(**{"client_dp": "server-fixed", **settings})
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_strategy(FederationConfig(min_sites=1), privacy=privacy)


@pytest.mark.parametrize("name", ["fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_aggregators_the_noise_cannot_protect_are_refused(name):
    with pytest.raises(ConfigError, match=f"federation.strategy = '{name}' cannot be combined"):
        dp_strategy("server-fixed", strategy=name)


def test_fedprox_is_accepted_and_keeps_its_proximal_term():
    strategy = dp_strategy("server-fixed", strategy="fedprox", proximal_mu=0.1)
    assert configure(strategy, [1])[0].content[CONFIG]["proximal-mu"] == pytest.approx(0.1)


def test_every_client_dp_mode_of_the_config_has_a_wrapper():
    from server.privacy import CLIENT_DP_WRAPPERS
    from shared.privacy.validation import CLIENT_DP_MODES

    assert set(CLIENT_DP_WRAPPERS) == set(CLIENT_DP_MODES) - {"off"}


def test_the_journal_keeps_releases_the_checkpoint_missed(tmp_path):
    journal = tmp_path / "client_privacy_journal.json"
    first = ClientPrivacyAccountant(1e-5)
    first.keep_journal(journal)
    for _ in range(3):  # three noisy adapters went out; the server died before checkpointing the third
        first.compose(1.0, 1.0)
    checkpointed = first.ledger()[:2]

    resumed = ClientPrivacyAccountant(1e-5)
    resumed.keep_journal(journal)
    resumed.restore(checkpointed)  # what the checkpoint holds
    assert resumed.releases == 3 and resumed.epsilon() == pytest.approx(first.epsilon())
    resumed.compose(1.0, 1.0)
    assert len(json.loads(journal.read_text(encoding="utf-8"))["releases"]) == 4

    journal.write_text("not json", encoding="utf-8")
    with pytest.raises(ValueError, match="unreadable client-level DP journal"):
        ClientPrivacyAccountant(1e-5).keep_journal(journal)
    assert journal.read_text(encoding="utf-8") == "not json"


# ------------------------------------------------------------------------------------------ budget stop
def epsilons_after_rounds(rounds: int, sigma: float = 1.0, delta: float = 1e-5) -> list[float]:
    """ε after 1, 2, ..., ``rounds`` releases at rate 1 (every site sampled), straight from the accountant."""
    accountant = ClientPrivacyAccountant(delta)
    out = []
    for _ in range(rounds):
        accountant.compose(sigma, 1.0)
        out.append(accountant.epsilon())
    return out


def budget_strategy(budget: float, journal: Path | None = None, done_before: int = 0):
    """Server-fixed client DP (σ 1, two sites) with ``privacy.client-epsilon-budget = budget``."""
    privacy = PrivacyConfig(
        client_dp="server-fixed", client_noise_multiplier=1.0, client_epsilon_budget=budget
    )
    strategy = build_strategy(FederationConfig(min_sites=2), privacy=privacy)
    strategy.noise_rng = np.random.default_rng(0)
    if journal is not None:
        strategy.keep_privacy_journal(journal)
    strategy.rounds = RoundNumbering(done_before=done_before)
    return strategy


def run_rounds(strategy, num_rounds: int) -> list[int]:
    """Run Flower's loop on two fake sites; the federation rounds whose adapter was released."""
    done = []
    strategy.start(
        grid=FakeGrid([1, 2], clipped_reply),
        initial_arrays=packed(0.0),
        num_rounds=num_rounds,
        evaluate_fn=lambda r, _: done.append(strategy.rounds.federation(r)) if r else None,
    )
    return done


@pytest.mark.parametrize("where", ["at", "between"])
def test_budget_stop_round_is_the_last_round_under_budget(where):
    eps = epsilons_after_rounds(4)
    budget = eps[2] if where == "at" else (eps[2] + eps[3]) / 2  # round 3 fits (exactly, or with room)
    strategy = budget_strategy(budget)
    done = []
    with pytest.raises(ClientPrivacyBudgetSpent) as stop:
        strategy.start(
            grid=FakeGrid([1, 2], clipped_reply),
            initial_arrays=packed(0.0),
            num_rounds=10,
            evaluate_fn=lambda r, _: done.append(r) if r else None,
        )
    assert done == [1, 2, 3] and strategy.client_accountant.releases == 3
    assert stop.value.server_round == 4
    assert stop.value.epsilon_spent == pytest.approx(eps[2]) and stop.value.epsilon_spent <= budget * (
        1 + 1e-9
    )
    assert stop.value.epsilon_after == pytest.approx(eps[3]) and stop.value.epsilon_after > budget
    record = stop.value.record()
    assert record["reason"] == "client-privacy-budget" and record["round"] == 4
    message = str(stop.value)
    assert "round 4 is not started" in message and f"privacy.client-epsilon-budget = {budget:g}" in message
    assert f"{eps[2]:.4g}" in message and f"{eps[3]:.4g}" in message


def test_no_budget_and_a_budget_no_round_fits():
    assert run_rounds(budget_strategy(0.0), 3) == [1, 2, 3]  # 0: no budget, as before
    with pytest.raises(ClientPrivacyBudgetSpent, match="round 1 is not started"):
        run_rounds(budget_strategy(epsilons_after_rounds(1)[0] / 2), 3)


def test_resume_continues_the_spent_budget_from_the_journal(tmp_path):
    journal = tmp_path / "client_privacy_journal.json"
    eps = epsilons_after_rounds(4)
    budget = (eps[2] + eps[3]) / 2
    first = budget_strategy(budget, journal)
    assert run_rounds(first, 2) == [1, 2]
    checkpoint = first.get_state()

    resumed = budget_strategy(budget, journal, done_before=2)
    resumed.set_state(checkpoint)
    with pytest.raises(ClientPrivacyBudgetSpent) as stop:
        assert run_rounds(resumed, 8) == [3]
    assert stop.value.server_round == 4 and stop.value.epsilon_spent == pytest.approx(eps[2])
    saved = json.loads(journal.read_text(encoding="utf-8"))
    assert saved["format"] == "fedabus-client-privacy-journal" and saved["releases"] == [[1.0, 1.0]] * 3


def test_resume_without_the_journal_is_refused_and_names_the_file(tmp_path):
    journal = tmp_path / "client_privacy_journal.json"
    first = budget_strategy(100.0, journal)
    run_rounds(first, 2)
    checkpoint = first.get_state()
    journal.unlink()

    resumed = budget_strategy(100.0, journal, done_before=2)
    with pytest.raises(ClientPrivacyJournalError, match=re.escape(f"{journal}: missing")):
        resumed.set_state(checkpoint)
    assert not journal.exists()
    draft = tmp_path / "client_privacy_journal.json.from-checkpoint"
    assert json.loads(draft.read_text(encoding="utf-8"))["releases"] == [[1.0, 1.0]] * 2
    draft.rename(journal)  # the operator's deliberate act: no release after the checkpoint
    resumed.set_state(checkpoint)
    assert resumed.client_accountant.releases == 2

    fresh = budget_strategy(100.0, tmp_path / "other.json")  # a checkpoint without releases needs no journal
    fresh.set_state({**checkpoint, "client-dp/ledger": []})
    assert fresh.client_accountant.releases == 0


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not json", "Expecting value"),
        ('{"format": "fedabus-privacy-ledger", "releases": []}', "format 'fedabus-privacy-ledger'"),
        ('{"format_version": 99, "releases": []}', "format_version 99"),
        ('{"releases": [[-1.0, 1.0]]}', "noise multiplier -1.0"),
        ('{"releases": [[1.0, 0.0]]}', "sampling rate 0.0"),
        ('{"delta": 1e-05}', "'releases'"),
    ],
)
def test_a_corrupt_journal_is_a_clear_error_naming_the_file_and_is_kept(tmp_path, content, problem):
    journal = tmp_path / "client_privacy_journal.json"
    journal.write_text(content, encoding="utf-8")
    with pytest.raises(ClientPrivacyJournalError) as error:
        budget_strategy(3.0, journal)
    assert str(error.value).startswith(f"{journal}: unreadable client-level DP journal")
    assert problem in str(error.value) and "restore it from a backup" in str(error.value)
    assert journal.read_text(encoding="utf-8") == content


@pytest.mark.parametrize("budget", [-1.0, math.inf, math.nan])
def test_invalid_budgets_are_refused(budget):
    with pytest.raises(ConfigError, match=re.escape(f"privacy.client-epsilon-budget = {budget!r}")):
        PrivacyConfig(client_epsilon_budget=budget)


def test_the_budget_key_is_read_from_the_run_config_and_needs_noise():
    from shared.config import load_run_config

    config = load_run_config({"privacy.client-dp": "server-fixed", "privacy.client-epsilon-budget": 2.5})
    assert config.privacy.client_epsilon_budget == 2.5
    dp_strategy("server-fixed", sigma=0.0)  # σ 0 without a budget: allowed (clipping only, with a warning)
    with pytest.raises(ConfigError, match="no round fits the budget"):
        build_strategy(
            FederationConfig(min_sites=1),
            privacy=PrivacyConfig(
                client_dp="server-fixed", client_noise_multiplier=0.0, client_epsilon_budget=1.0
            ),
        )
