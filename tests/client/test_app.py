"""The ClientApp's replies, inspected: only the adapter and aggregate metrics leave a site."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import client.app as client_app
from client.egress import (
    EgressRefused,
    eval_metric_keys,
    outgoing_adapter,
    outgoing_metrics,
    outgoing_site_record,
)
from client.site_setup import SITE_SETUP
from shared.adapters import extract_adapter, lora_specs_from_config
from shared.base import build_random_base, save_base, wrap_for_training
from shared.config import load_config
from shared.data.synth import generate_consortium
from shared.protocol import ARRAYS, CONFIG, METRICS, SITE, adapter_to_record, layout_of, record_to_adapter

RUN_CONFIG = {
    "model.cls-depth": 18,
    "train.seg-epochs": 1,
    "train.cls-epochs": 1,
    "train.eval-clicks": 2,
    "train.seg-click-iterations": 1,
    "train.progress": False,
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("client")
    site_dir = generate_consortium(root / "sites", sites=1, cases=6, seed=11)[0]
    base = build_random_base("small", cls_depth=18, seed=0)
    base_path = save_base(base, root / "base")
    config = load_config(RUN_CONFIG)
    torch.manual_seed(0)
    models = wrap_for_training(base, lora_specs_from_config(config.adapter))
    adapter = extract_adapter(models, base_fingerprints=base.fingerprints)
    return {
        "site_dir": site_dir,
        "base_path": base_path,
        "adapter": adapter,
        "fingerprint": base.fingerprint,
        "state_dir": root / "state",
        "base": base,
    }


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


def _context(federation, *, run: dict | None = None, node: dict | None = None) -> Context:
    node = {
        "data-path": str(federation["site_dir"]),
        "device": "cpu",
        "state-dir": str(federation["state_dir"]),  # the site's caches, not the home folder's
        **(node or {}),
    }
    run = {
        **RUN_CONFIG,
        "model.base-path": str(federation["base_path"]),
        "num-server-rounds": 1,
        **(run or {}),
    }
    return Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config=run)


def _message(federation, kind: str, fingerprint: str | None = None, **config) -> Message:
    content = RecordDict(
        {
            ARRAYS: adapter_to_record(federation["adapter"].tensors),
            CONFIG: ConfigRecord(
                {"server-round": 1, "base-fingerprint": fingerprint or federation["fingerprint"], **config}
            ),
        }
    )
    return Message(content=content, dst_node_id=5, message_type=kind)


def test_train_reply_holds_only_the_adapter_and_aggregate_metrics(federation):
    reply = client_app.train(_message(federation, MessageType.TRAIN), _context(federation))
    content = reply.content
    assert set(content.array_records) == {ARRAYS}
    assert set(content.metric_records) == {METRICS}
    assert set(content.config_records) == {SITE}
    sent = content[ARRAYS]
    assert set(sent.keys()) == {"seg", "cls"}  # one packed array per model, nothing else
    for array in sent.values():
        assert array.numpy().dtype.name == "float32"
    layout = layout_of(federation["adapter"].tensors)
    update = record_to_adapter(sent, layout)
    assert layout_of(update) == layout
    changed = [n for n, t in update.items() if not torch.equal(t, federation["adapter"].tensors[n])]
    assert changed, "training changed no adapter tensor"
    assert set(content[METRICS].keys()) == {"num-examples", "train/seg_loss", "train/cls_loss"}
    assert content[METRICS]["num-examples"] > 0
    assert dict(content[SITE]) == {"site-id": federation["site_dir"].name, "server-round": 1}


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluate_reply_has_the_fixed_metric_keys_and_no_case_ids(federation, split):
    message = _message(federation, MessageType.EVALUATE, split=split)
    reply = client_app.evaluate(message, _context(federation))
    content = reply.content
    assert not content.array_records
    assert set(content[METRICS].keys()) == set(eval_metric_keys(2, split=split))
    assert all(isinstance(v, float) for v in content[METRICS].values())
    assert content[METRICS]["num-examples"] > 0  # the site evaluated cases of that split
    low, high = (content[METRICS][f"{split}/dice_1click_ci_{end}"] for end in ("low", "high"))
    assert low <= content[METRICS][f"{split}/dice_1click"] <= high  # bounds are aggregates too
    text = repr(dict(content[METRICS])) + repr(dict(content[SITE]))
    assert "site_a_0" not in text  # case ids never leave


def test_a_site_refuses_to_evaluate_another_split(federation):
    with pytest.raises(ValueError, match="val or test only"):
        client_app.evaluate(_message(federation, MessageType.EVALUATE, split="train"), _context(federation))


def test_site_with_another_base_declines_without_sending_weights(federation):
    reply = client_app.train(
        _message(federation, MessageType.TRAIN, "seg=sha256:0;cls=sha256:0"), _context(federation)
    )
    assert not reply.content.array_records
    assert "fingerprint" in reply.content[SITE]["declined"]


def test_query_reports_the_base_fingerprint(federation):
    request = Message(content=RecordDict(), dst_node_id=5, message_type=MessageType.QUERY)
    reply = client_app.query(request, _context(federation))
    assert reply.content[SITE]["base-fingerprint"] == federation["fingerprint"]


def test_messages_of_a_process_share_one_untouched_base_and_one_validation(federation):
    SITE_SETUP.clear()
    hashed, validated = SITE_SETUP.hashed, SITE_SETUP.validated
    request = Message(content=RecordDict(), dst_node_id=5, message_type=MessageType.QUERY)
    client_app.query(request, _context(federation))
    for _ in range(2):
        client_app.train(_message(federation, MessageType.TRAIN), _context(federation))
    assert (SITE_SETUP.hashed - hashed, SITE_SETUP.validated - validated) == (1, 1)
    (cached,) = SITE_SETUP.bases.values()
    fingerprints = dict(cached.base.fingerprints)
    assert cached.base.refresh_fingerprints() == fingerprints  # training left the shared base as it was


def test_egress_refuses_anything_else():
    expected = {"seg.a": (2, 2)}
    ok = outgoing_adapter({"seg.a": torch.zeros(2, 2)}, expected)
    assert ok["seg.a"].dtype == torch.float32
    with pytest.raises(EgressRefused, match="unexpected: seg.extra"):
        outgoing_adapter({"seg.a": torch.zeros(2, 2), "seg.extra": torch.zeros(1)}, expected)
    with pytest.raises(EgressRefused, match="shape mismatch"):
        outgoing_adapter({"seg.a": torch.zeros(3, 2)}, expected)
    with pytest.raises(EgressRefused, match="NaN or Inf"):
        outgoing_adapter({"seg.a": torch.full((2, 2), math.inf)}, expected)
    with pytest.raises(EgressRefused, match="dtype"):
        outgoing_adapter({"seg.a": torch.zeros(2, 2, dtype=torch.int64)}, expected)
    with pytest.raises(EgressRefused, match="not a number"):
        outgoing_metrics({"test/dice": "site_a_003"}, ("test/dice",))
    with pytest.raises(EgressRefused, match="not an aggregate metric name"):
        outgoing_metrics({"case/site_a_003": 1.0}, ("case/site_a_003",))
    assert math.isnan(outgoing_metrics({}, ("test/auc",))["test/auc"])
    assert outgoing_site_record({"site-id": "a", "server-round": 3}) == {"site-id": "a", "server-round": 3}
    with pytest.raises(EgressRefused, match="not on the allow-list"):
        outgoing_site_record({"site-id": "a", "case": "site_a_003"})
    with pytest.raises(EgressRefused, match="must be int"):
        outgoing_site_record({"site-id": "a", "server-round": "3"})


#: Sample-level DP with a target ε over 2 rounds; small noise so two rounds fit the default budget exactly.
DP_RUN = {"privacy.sample-dp": True, "privacy.target-epsilon": 8.0, "num-server-rounds": 2}


def test_dp_rounds_are_recorded_in_the_site_ledger_and_reported(federation, tmp_path):
    state = tmp_path / "state"
    context = lambda: _context(federation, run=DP_RUN, node={"state-dir": str(state)})
    first = client_app.train(_message(federation, MessageType.TRAIN), context())
    metrics = first.content[METRICS]
    assert {"privacy/seg_epsilon", "privacy/cls_epsilon", "privacy/delta"} <= set(metrics.keys())
    assert 0 < metrics["privacy/seg_epsilon"] < 8.0 and 0 < metrics["privacy/cls_epsilon"] < 8.0
    assert (state / "privacy_ledger.json").is_file()
    second = client_app.train(
        _message(federation, MessageType.TRAIN), context()
    )  # a fresh process per message
    assert second.content[METRICS]["privacy/seg_epsilon"] > metrics["privacy/seg_epsilon"]
    assert second.content[METRICS]["privacy/seg_epsilon"] <= 8.0 + 1e-6
    third = client_app.train(_message(federation, MessageType.TRAIN), context())  # beyond the planned run
    assert not third.content.array_records
    assert "privacy budget" in third.content[SITE]["declined"]
    assert third.content[METRICS]["num-examples"] == 0.0
    assert third.content[METRICS]["privacy/seg_epsilon"] == pytest.approx(
        second.content[METRICS]["privacy/seg_epsilon"]
    )


def test_a_site_budget_stricter_than_the_run_stops_it_before_training(federation, tmp_path):
    node = {"state-dir": str(tmp_path / "state"), "epsilon-budget": 0.5}
    reply = client_app.train(
        _message(federation, MessageType.TRAIN), _context(federation, run=DP_RUN, node=node)
    )
    assert not reply.content.array_records
    assert "budget 0.5" in reply.content[SITE]["declined"]
    assert not (tmp_path / "state" / "privacy_ledger.json").exists()  # nothing trained, nothing spent


def test_node_config_names_the_site_and_limits_threads(federation):
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the suite runs on one thread; the node config must bring it down itself
        node = {"site-id": "hospital-x", "threads": 1}
        request = Message(content=RecordDict(), dst_node_id=5, message_type=MessageType.QUERY)
        reply = client_app.query(request, _context(federation, node=node))
        assert reply.content[SITE]["site-id"] == "hospital-x"
        reply = client_app.evaluate(
            _message(federation, MessageType.EVALUATE), _context(federation, node=node)
        )
        assert reply.content[SITE]["site-id"] == "hospital-x"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(ValueError, match="threads must be numbers"):
        client_app.query(request, _context(federation, node={"threads": "many"}))


def test_ffa_site_trains_b_only_and_refuses_a_record_of_another_mode(federation):
    from shared.adapters import AdapterMismatchError

    run = {"federation.lora-aggregation": "ffa"}
    message = _message(federation, MessageType.TRAIN)
    message.content[ARRAYS] = adapter_to_record(federation["adapter"].tensors, mode="ffa")
    reply = client_app.train(message, _context(federation, run=run))
    layout = layout_of(federation["adapter"].tensors)
    update = record_to_adapter(reply.content[ARRAYS], layout, mode="ffa")  # no lora_A travels back
    assert update and not any(".lora_A." in name for name in update)
    assert any(".lora_B." in name for name in update)
    with pytest.raises(AdapterMismatchError, match="fits federation.lora-aggregation = 'naive'"):
        client_app.train(_message(federation, MessageType.TRAIN), _context(federation, run=run))


def test_int8_site_decodes_the_global_adapter_sends_its_difference_and_keeps_the_residual(
    federation, tmp_path
):
    from client.error_feedback import RESIDUAL_FILE
    from shared.adapters import AdapterMismatchError

    run = {"federation.compression": "int8"}
    context = _context(federation, run=run, node={"state-dir": str(tmp_path)})
    tensors = federation["adapter"].tensors
    layout = layout_of(tensors)
    message = _message(federation, MessageType.TRAIN)
    message.content[ARRAYS] = adapter_to_record(tensors, compression="int8")
    reply = client_app.train(message, context)
    sent = reply.content[ARRAYS]
    assert sorted(sent.keys()) == ["cls", "cls/scale", "seg", "seg/scale"]
    assert {sent[k].numpy().dtype.name for k in ("seg", "cls")} == {"int8"}
    difference = record_to_adapter(sent, layout, compression="int8")
    assert any(float(t.abs().max()) > 0 for t in difference.values()), "training changed nothing"
    assert (tmp_path / RESIDUAL_FILE).is_file()  # error feedback for the next round of this run
    with pytest.raises(AdapterMismatchError, match="encoded as federation.compression = 'none'.*'int8'"):
        client_app.train(_message(federation, MessageType.TRAIN), context)


#: The fully automatic segmenter at a tiny size (shared/models/auto_seg.py).
AUTO_RUN = {"model.seg-model": "segresnet", "model.auto-init-filters": 4, "model.auto-blocks-down": "1,1"}
#: The 2D ones (sweep slices, stacked back to 3D for evaluation) at tiny sizes of the same architectures.
SLICE_RUNS = {
    "dynunet2d": {"model.dynunet-levels": 3, "data.slice-size": 32, "model.auto-init-filters": 2},
    "u2net-lite": {"data.slice-size": 32, "model.auto-init-filters": 2, "train.seg-batch-size": 8},
}


@pytest.mark.parametrize("kind", ["segresnet", *SLICE_RUNS])
def test_an_automatic_site_trains_the_whole_network_and_reports_only_auto_metrics(federation, kind):
    from shared.adapters import AdapterMismatchError, model_specs

    run = AUTO_RUN if kind == "segresnet" else {"model.seg-model": kind, **SLICE_RUNS[kind]}
    base = federation["base"]
    torch.manual_seed(0)
    models = wrap_for_training(base, model_specs(load_config({**RUN_CONFIG, **run})))
    start = extract_adapter(models, base_fingerprints=base.fingerprints).tensors
    message = _message(federation, MessageType.TRAIN)
    message.content[ARRAYS] = adapter_to_record(start)
    reply = client_app.train(message, _context(federation, run=run))
    update = record_to_adapter(reply.content[ARRAYS], layout_of(start))
    seg = [name for name in update if name.startswith("seg.")]
    assert seg and all(name.startswith("seg.net.") for name in seg)
    assert any(not torch.equal(update[name], start[name]) for name in seg), f"the {kind} did not train"
    assert math.isfinite(reply.content[METRICS]["train/seg_loss"])

    message = _message(federation, MessageType.EVALUATE, split="val")
    message.content[ARRAYS] = adapter_to_record(update)
    reply = client_app.evaluate(message, _context(federation, run=run))
    assert set(reply.content[METRICS].keys()) == set(eval_metric_keys(2, split="val", automatic=True))
    assert 0.0 <= reply.content[METRICS]["val/dice_auto"] <= 1.0

    with pytest.raises(AdapterMismatchError):  # a SAM-Med3D adapter record at an automatic site
        client_app.train(_message(federation, MessageType.TRAIN), _context(federation, run=run))
