"""federation.compression on the server: the global adapter leaves encoded, updates are decoded before admission
(so every strategy and client-level DP see float32), another encoding is refused, and the bytes are logged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from server.strategies import build_strategy
from shared.config import ConfigError, FederationConfig, PrivacyConfig
from shared.metric_names import metric_direction
from shared.protocol import (
    ARRAYS,
    METRICS,
    NUM_EXAMPLES,
    SERVER_ROUND,
    SITE,
    SITE_ID,
    adapter_to_record,
    layout_of,
    payload_bytes,
    record_encoding,
    record_to_adapter,
    update_to_record,
)

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _global() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    shapes = {
        "seg.qkv.lora_A.weight": (2, 6),
        "seg.qkv.lora_B.weight": (6, 2),
        "seg.head": (40,),
        "cls.fc": (9,),
    }
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def _round(
    compression: str, *, strategy: str = "fedavg", privacy: PrivacyConfig | None = None, sites: int = 3
):
    """A strategy after configure_train of round 1 with :func:`_global`; returns (strategy, train messages)."""
    built = build_strategy(
        FederationConfig(strategy=strategy, min_sites=sites, compression=compression), privacy=privacy
    )
    built.adapter_layout = layout_of(_global())
    messages = list(
        built.configure_train(
            1, adapter_to_record(_global()), ConfigRecord(), FakeGrid(list(range(1, sites + 1)))
        )
    )
    return built, messages


def _site_reply(message: Message, delta: float, compression: str, *, mode: str = "naive") -> Message:
    """What a site sends: it decodes the global adapter, adds ``delta`` everywhere and encodes its update."""
    received = record_to_adapter(
        message.content[ARRAYS], layout_of(_global()), mode=mode, compression=compression
    )
    update = {name: t + delta for name, t in received.items()}
    record, _ = update_to_record(update, received, mode=mode, compression=compression)
    node = message.metadata.dst_node_id
    content = RecordDict(
        {
            ARRAYS: record,
            METRICS: MetricRecord({NUM_EXAMPLES: 10, "train/seg_loss": 0.5}),
            SITE: ConfigRecord({SITE_ID: f"site-{node}", SERVER_ROUND: 1}),
        }
    )
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content, reply_to=request)


@pytest.mark.parametrize("compression", ["none", "fp16", "int8"])
def test_fedavg_round_trip_and_bytes_per_site(compression):
    strategy, messages = _round(compression)
    assert {record_encoding(m.content[ARRAYS]) for m in messages} == {compression}
    deltas = (0.01, 0.02, 0.06)
    agg, _ = strategy.aggregate_train(
        1, [_site_reply(m, d, compression) for m, d in zip(messages, deltas, strict=True)]
    )
    assert record_encoding(agg) == "none"  # the strategy's global adapter stays float32
    got = record_to_adapter(agg, layout_of(_global()))
    for name, start in _global().items():
        # the server adds the decoded differences to its exact global adapter: only their encoding error is left
        tolerance = 0.06 / 127 / 2 + 1e-6 if compression == "int8" else 1e-5
        torch.testing.assert_close(got[name], start + np.mean(deltas), atol=tolerance, rtol=0)
    sent = payload_bytes(messages[0].content[ARRAYS])
    elements = sum(t.numel() for t in _global().values())
    per_element = {"none": 4, "fp16": 2, "int8": 1}[compression]
    assert elements * per_element <= sent < elements * per_element + 600  # + .npy headers and int8 scales
    metrics = strategy.last_train_metrics["site-1"]
    assert metrics["train/download_bytes"] == sent
    assert metrics["train/upload_bytes"] == pytest.approx(sent, abs=600)
    assert metric_direction("train/upload_bytes") == metric_direction("train/download_bytes") == "count"


@pytest.mark.parametrize(("server", "site"), [("int8", "none"), ("none", "int8"), ("int8", "fp16")])
def test_an_update_of_another_encoding_is_refused_naming_both(server, site):
    strategy, messages = _round(server, sites=2)
    good = _site_reply(messages[0], 0.01, server)
    # the site decodes what it was sent, but encodes its reply with its own (other) setting
    received = record_to_adapter(messages[1].content[ARRAYS], layout_of(_global()), compression=server)
    record, _ = update_to_record(received, received, compression=site)
    other = _site_reply(messages[1], 0.0, server)
    other.content[ARRAYS] = record
    strategy.min_train_nodes = 1
    agg, _ = strategy.aggregate_train(1, [good, other])
    assert agg is not None
    assert list(strategy.last_refusals) == [f"site-{messages[1].metadata.dst_node_id}"]
    reason = next(iter(strategy.last_refusals.values()))
    assert f"federation.compression = '{site}'" in reason and f"federation.compression = '{server}'" in reason


@pytest.mark.parametrize("name", ["fedmedian", "krum", "fedtrimmedavg", "fedadam"])
def test_robust_strategies_see_decoded_updates(name):
    strategy, messages = _round("int8", strategy=name, sites=5)
    replies = [_site_reply(m, 0.01, "int8") for m in messages]
    agg, _ = strategy.aggregate_train(1, replies)
    assert agg is not None and not strategy.last_refusals
    assert all(np.isfinite(array.numpy()).all() for array in agg.values())  # FedAdam's are float64


def test_server_side_client_dp_clips_decoded_updates_and_site_side_clipping_needs_none():
    privacy = PrivacyConfig(client_dp="server-fixed", client_clip_norm=10.0, client_noise_multiplier=0.0)
    strategy, messages = _round("int8", privacy=privacy)
    agg, _ = strategy.aggregate_train(1, [_site_reply(m, 0.01, "int8") for m in messages])
    got = record_to_adapter(agg, layout_of(_global()))
    for name, start in _global().items():
        torch.testing.assert_close(got[name], start + 0.01, atol=0.01 / 127 + 1e-6, rtol=0)
    with pytest.raises(
        ConfigError, match="federation.compression = 'int8' cannot be combined with privacy.client"
    ):
        build_strategy(FederationConfig(compression="int8"), privacy=PrivacyConfig(client_dp="client-fixed"))


def test_product_aggregation_sees_decoded_updates():
    built = build_strategy(FederationConfig(min_sites=2, lora_aggregation="product", compression="fp16"))
    built.adapter_layout, built.lora_scaling = layout_of(_global()), {"seg": 1.0, "cls": 1.0}
    messages = list(built.configure_train(1, adapter_to_record(_global()), ConfigRecord(), FakeGrid([1, 2])))
    agg, _ = built.aggregate_train(1, [_site_reply(m, 0.0, "fp16") for m in messages])
    got = record_to_adapter(agg, layout_of(_global()))
    torch.testing.assert_close(got["seg.head"], _global()["seg.head"], atol=1e-5, rtol=0)


def test_an_unknown_compression_is_a_config_error():
    with pytest.raises(ConfigError, match="federation.compression = 'zip'; allowed: none, fp16, int8"):
        FederationConfig(compression="zip")


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_fedadam_keeps_its_float64_global_adapter_but_sends_float32(compression):
    strategy, messages = _round(compression, strategy="fedadam")
    agg, _ = strategy.aggregate_train(1, [_site_reply(m, 0.01, compression) for m in messages])
    assert {array.numpy().dtype.name for array in agg.values()} == {"float64"}  # Flower's FedAdam state
    nodes = FakeGrid([1, 2, 3])
    train = list(strategy.configure_train(2, agg, ConfigRecord(), nodes))
    assert {a.dtype for a in strategy.current_arrays.values()} == {np.dtype(np.float64)}  # kept by the server
    evaluate = list(strategy.configure_evaluate(2, agg, ConfigRecord(), nodes))
    elements = sum(t.numel() for t in _global().values())
    for message, sent in [(m, compression) for m in train] + [(m, "none") for m in evaluate]:
        record = message.content[ARRAYS]
        assert "float64" not in {record[key].dtype for key in record.keys()}
        assert record_encoding(record) == sent
        got = record_to_adapter(record, layout_of(_global()), compression=sent)
        want = record_to_adapter(agg, layout_of(_global()))
        for name in want:  # float32 of the server's float64 values (int8: within its quantisation step)
            tolerance = float(want[name].abs().max()) / 127 if sent == "int8" else 0.0
            torch.testing.assert_close(got[name], want[name], atol=tolerance, rtol=0)
    if compression == "none":
        assert payload_bytes(train[0].content[ARRAYS]) < elements * 4 + 600  # float32, not 8 bytes each


def test_payload_bytes_reach_each_site_s_run_and_their_total_the_parent_run():
    from server.reports import RoundReport

    strategy, messages = _round("int8")
    strategy.aggregate_train(1, [_site_reply(m, 0.01, "int8") for m in messages])
    report = RoundReport.from_site_metrics(1, training=strategy.last_train_metrics)
    per_site = [report.site_metrics(site)["train/upload_bytes"] for site in report.sites]
    assert len(per_site) == 3 and all(b > 0 for b in per_site)
    parent = report.parent_metrics()
    assert parent["global/train/upload_bytes_total"] == pytest.approx(sum(per_site))
    assert parent["global/train/download_bytes_total"] == 3 * payload_bytes(messages[0].content[ARRAYS])


def test_ffa_with_int8_scales_only_what_travels():
    built = build_strategy(FederationConfig(min_sites=2, lora_aggregation="ffa", compression="int8"))
    layout = layout_of(_global())
    built.adapter_layout = layout
    messages = list(
        built.configure_train(1, adapter_to_record(_global(), mode="ffa"), ConfigRecord(), FakeGrid([1, 2]))
    )
    sent = messages[0].content[ARRAYS]
    assert sent["seg/scale"].numpy().shape == (2,)  # lora_B and head; no lora_A travels
    replies = [_site_reply(m, 0.01, "int8", mode="ffa") for m in messages]
    agg, _ = built.aggregate_train(1, replies)
    got = record_to_adapter(agg, layout, mode="ffa")
    assert "seg.qkv.lora_A.weight" not in got
    torch.testing.assert_close(got["seg.head"], _global()["seg.head"] + 0.01, atol=0.01 / 127, rtol=0)
