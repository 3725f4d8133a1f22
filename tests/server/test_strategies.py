"""Strategies with fedabus hooks, on mocked replies (no processes)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from server.replies import site_of
from server.round_numbering import RoundNumbering
from server.strategies import FederationStalled, build_strategy
from shared.config import ConfigError, FederationConfig, PrivacyConfig
from shared.metric_names import LORA_DISCARDED_ENERGY
from shared.protocol import (
    ARRAYS,
    METRICS,
    NUM_EXAMPLES,
    SITE,
    adapter_to_record,
    layout_of,
    record_to_adapter,
)


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


def arrays(value: float) -> ArrayRecord:
    return ArrayRecord({"seg.w": Array(np.full((2, 3), value, dtype=np.float32))})


def reply(
    node: int, site: str, *, value: float | None, examples: int, dice: float = 0.5, server_round: int = 1
) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: examples, "train/loss": dice})})
    content[SITE] = ConfigRecord(
        {"site-id": site, "server-round": server_round}
        if value is not None
        else {"site-id": site, "declined": "budget", "server-round": server_round}
    )
    if value is not None:
        content[ARRAYS] = arrays(value)
    return Message(content, reply_to=request)


def test_fedavg_weights_by_training_examples_and_remembers_sites():
    strategy = build_strategy(FederationConfig(strategy="fedavg", min_sites=2))
    list(strategy.configure_train(1, arrays(0.0), ConfigRecord(), FakeGrid([1, 2])))
    replies = [reply(1, "a", value=1.0, examples=1), reply(2, "b", value=5.0, examples=3)]
    agg, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(agg["seg.w"].numpy(), np.full((2, 3), (1 * 1 + 3 * 5) / 4))
    assert metrics["train/loss"] == pytest.approx(0.5)
    assert set(strategy.last_train_metrics) == {"a", "b"}


def test_sites_without_update_or_with_errors_are_dropped():
    strategy = build_strategy(FederationConfig(strategy="fedavg", min_sites=1))
    list(strategy.configure_train(1, arrays(0.0), ConfigRecord(), FakeGrid([1, 2, 3])))
    request = Message(content=RecordDict(), dst_node_id=3, message_type=MessageType.TRAIN)
    failed = Message(Error(code=1, reason="site crashed"), reply_to=request)
    replies = [reply(1, "a", value=2.0, examples=2), reply(2, "b", value=None, examples=0), failed]
    agg, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(agg["seg.w"].numpy(), 2.0)
    assert site_of(replies[1]) == "b"
    assert strategy.aggregate_train(2, [reply(2, "b", value=None, examples=0)]) == (None, None)


def test_resumed_round_numbering_and_eval_interval():
    strategy = build_strategy(
        FederationConfig(strategy="fedprox", min_sites=1, eval_interval=2), proximal_mu=0.1
    )
    strategy.rounds = RoundNumbering(done_before=4)
    messages = list(strategy.configure_train(1, arrays(0.0), ConfigRecord(), FakeGrid([1, 2])))
    assert len(messages) == 2
    config = messages[0].content["config"]
    assert config["server-round"] == 5 and config["proximal-mu"] == pytest.approx(0.1)
    assert (
        list(strategy.configure_evaluate(1, arrays(0.0), ConfigRecord(), FakeGrid([1, 2]))) == []
    )  # round 5
    assert len(list(strategy.configure_evaluate(2, arrays(0.0), ConfigRecord(), FakeGrid([1, 2])))) == 2


def test_sampling_gives_up_after_the_deadline():
    strategy = build_strategy(FederationConfig(strategy="fedavg", min_sites=3, sample_timeout=0.5))
    started = time.monotonic()
    with pytest.raises(FederationStalled, match=r"Round 1 stopped: only 1 site\(s\) admitted") as stall:
        strategy.configure_train(1, arrays(0.0), ConfigRecord(), FakeGrid([1]))
    assert time.monotonic() - started < 5
    record = stall.value.record()  # what summary.json and the MLflow stop tags get
    assert record["reason"] == "federation-stalled" and record["round"] == 1
    assert (record["admitted_sites"], record["online_sites"], record["needed_sites"]) == (1, 1, 3)
    assert record["message"] == str(stall.value)


def test_refused_nodes_are_never_sampled():
    strategy = build_strategy(FederationConfig(strategy="fedavg", min_sites=1))
    strategy.allowed_nodes = {2}
    messages = list(strategy.configure_train(1, arrays(0.0), ConfigRecord(), FakeGrid([1, 2, 3])))
    assert [m.metadata.dst_node_id for m in messages] == [2]


def test_fedadam_state_round_trips():
    strategy = build_strategy(FederationConfig(strategy="fedadam", min_sites=1))
    list(strategy.configure_train(1, arrays(0.0), ConfigRecord(), FakeGrid([1])))
    strategy.aggregate_train(1, [reply(1, "a", value=1.0, examples=1)])
    state = strategy.get_state()
    assert {k.split("/")[0] for k in state} == {"m_t", "v_t"}
    fresh = build_strategy(FederationConfig(strategy="fedadam", min_sites=1))
    fresh.set_state(state)
    np.testing.assert_array_equal(fresh.m_t["seg.w"], strategy.m_t["seg.w"])


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'"):
        build_strategy(FederationConfig(strategy="fedsgd", min_sites=1))


def test_an_error_reply_names_the_site_the_message_went_to():
    class Vetting:
        accepted = {7: "hospital-x", 8: "hospital-y"}

        def __call__(self, nodes):
            return set(self.accepted)

    strategy = build_strategy(FederationConfig(strategy="fedavg", min_sites=2))
    strategy.node_vetting = Vetting()
    messages = list(strategy.configure_train(1, arrays(0.0), ConfigRecord(), FakeGrid([7, 8])))
    for number, message in enumerate(messages):  # what the grid does when it pushes them
        message.metadata.__dict__["_message_id"] = f"id-{number}"
    to_y = next(m for m in messages if m.metadata.dst_node_id == 8)
    failed = Message(Error(code=1, reason="node unavailable"), reply_to=to_y)
    failed.metadata.__dict__["_src_node_id"] = 1  # error replies come from the SuperLink
    assert site_of(failed, strategy.recipients) == "hospital-y"


def test_sampling_patches_nothing_in_flower_and_samples_a_fraction_of_the_admitted_sites():
    import flwr.serverapp.strategy.fedavg as fedavg_module

    original = fedavg_module.sample_nodes
    strategy = build_strategy(FederationConfig(strategy="fedavg", min_sites=2, fraction_train=0.5))
    strategy.allowed_nodes = {1, 2, 3, 4}  # node 5 is not admitted
    messages = list(strategy.configure_train(1, arrays(0.0), ConfigRecord(), FakeGrid([1, 2, 3, 4, 5])))
    assert fedavg_module.sample_nodes is original
    assert len(messages) == 2 and {m.metadata.dst_node_id for m in messages} <= {1, 2, 3, 4}
    assert strategy.last_sample_population == 4


def test_each_strategy_keeps_its_own_recipients():
    one, two = (
        build_strategy(FederationConfig(strategy="fedavg", min_sites=1)),
        build_strategy(FederationConfig(strategy="fedprox", min_sites=1)),
    )
    list(one.configure_train(1, arrays(0.0), ConfigRecord(), FakeGrid([1])))
    assert one.recipients.sent and not two.recipients.sent


def test_the_strategy_takes_its_settings_from_the_federation_section():
    federation = FederationConfig(
        strategy="FedAdam", min_sites=3, eval_interval=0, sample_timeout=7.0, round_timeout=9.0, server_lr=0.5
    )
    strategy = build_strategy(federation)
    assert strategy.eta == pytest.approx(0.5) and strategy.min_available_nodes == 3
    assert (strategy.eval_interval, strategy.sample_timeout, strategy.connect_timeout) == (1, 7.0, 9.0)
    krum = build_strategy(FederationConfig(strategy="krum", num_malicious=1))
    assert krum.num_malicious_nodes == 1


def lora_site(seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "seg.qkv.lora_A.weight": torch.randn(rank, 5, generator=g),
        "seg.qkv.lora_B.weight": torch.randn(6, rank, generator=g),
        "seg.mask_decoder.w": torch.randn(3, generator=g),
    }


def lora_reply(
    node: int, tensors: dict[str, torch.Tensor], examples: int, mode: str, server_round: int = 1
) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    site = ConfigRecord({"site-id": f"s{node}", "server-round": server_round})
    content = RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: examples}), SITE: site})
    content[ARRAYS] = adapter_to_record(tensors, mode=mode)
    return Message(content, reply_to=request)


def test_product_strategy_averages_delta_w_and_reports_the_discarded_energy():
    strategy = build_strategy(FederationConfig(strategy="fedavg", min_sites=2, lora_aggregation="product"))
    layout = layout_of(lora_site(0))
    strategy.adapter_layout, strategy.lora_scaling = layout, {"seg": 0.5}
    global_record = adapter_to_record(lora_site(0), mode="product")
    list(strategy.configure_train(1, global_record, ConfigRecord(), FakeGrid([1, 2])))
    # a shared A keeps Σ wᵢ Bᵢ Aᵢ at rank 2: the rank-2 global adapter holds it exactly
    sites = [lora_site(1), {**lora_site(2), "seg.qkv.lora_A.weight": lora_site(1)["seg.qkv.lora_A.weight"]}]
    agg, metrics = strategy.aggregate_train(
        1, [lora_reply(1, sites[0], 1, "product"), lora_reply(2, sites[1], 3, "product")]
    )
    out = record_to_adapter(agg, layout, mode="product")
    want = sum(
        w * s["seg.qkv.lora_B.weight"].double() @ s["seg.qkv.lora_A.weight"].double()
        for w, s in zip((0.25, 0.75), sites, strict=True)
    )
    got = out["seg.qkv.lora_B.weight"].double() @ out["seg.qkv.lora_A.weight"].double()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert metrics is not None  # Flower still aggregates the metrics
    assert strategy.aggregation_metrics() == {LORA_DISCARDED_ENERGY: pytest.approx(0.0, abs=1e-9)}
    sites[1] = lora_site(2)  # ΔW of rank 4 now: the rank-2 truncation drops energy
    list(strategy.configure_train(2, agg, ConfigRecord(), FakeGrid([1, 2])))
    strategy.aggregate_train(
        2, [lora_reply(1, sites[0], 1, "product", 2), lora_reply(2, sites[1], 3, "product", 2)]
    )
    assert 0 < strategy.aggregation_metrics()[LORA_DISCARDED_ENERGY] < 1


def test_ffa_keeps_lora_a_bit_identical_over_rounds():
    strategy = build_strategy(FederationConfig(strategy="fedavg", min_sites=2, lora_aggregation="ffa"))
    initial = lora_site(0)
    layout = layout_of(initial)
    global_adapter = dict(initial)
    for server_round in (1, 2):
        sites = [
            {**lora_site(10 * server_round + i), "seg.qkv.lora_A.weight": torch.zeros(1)} for i in (1, 2)
        ]
        sites = [{k: v for k, v in s.items() if "lora_A" not in k} for s in sites]  # ffa sites extract no A
        sending = adapter_to_record(global_adapter, mode="ffa")
        list(strategy.configure_train(server_round, sending, ConfigRecord(), FakeGrid([1, 2])))
        agg, _ = strategy.aggregate_train(
            server_round, [lora_reply(i + 1, s, 1, "ffa", server_round) for i, s in enumerate(sites)]
        )
        sent = record_to_adapter(agg, layout, mode="ffa")  # what RoundEnd does
        global_adapter = {name: sent.get(name, frozen) for name, frozen in initial.items()}
        torch.testing.assert_close(
            global_adapter["seg.qkv.lora_B.weight"],
            (sites[0]["seg.qkv.lora_B.weight"] + sites[1]["seg.qkv.lora_B.weight"]) / 2,
        )
    assert torch.equal(global_adapter["seg.qkv.lora_A.weight"], initial["seg.qkv.lora_A.weight"])


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "fedadam"])
def test_product_is_refused_with_strategies_that_are_not_a_weighted_mean(name):
    with pytest.raises(
        ConfigError,
        match=f"federation.lora-aggregation = 'product' cannot be combined with federation.strategy = '{name}'",
    ):
        build_strategy(FederationConfig(strategy=name, lora_aggregation="product"))
    assert build_strategy(FederationConfig(strategy=name, lora_aggregation="ffa")) is not None


def test_product_is_refused_with_client_dp_and_unknown_modes_at_config_time():
    privacy = PrivacyConfig(client_dp="server-fixed")
    with pytest.raises(
        ConfigError, match="lora-aggregation = 'product' cannot be combined with privacy.client-dp"
    ):
        build_strategy(FederationConfig(strategy="fedavg", lora_aggregation="product"), privacy=privacy)
    assert (
        build_strategy(
            FederationConfig(strategy="fedavg", lora_aggregation="ffa"), privacy=privacy
        ).aggregation_metrics()
        == {}
    )
    with pytest.raises(
        ConfigError, match="federation.lora-aggregation = 'fedsvd'; allowed: naive, ffa, product"
    ):
        FederationConfig(lora_aggregation="fedsvd")
