"""The ClientApp's clipping mod, on hand-built messages (no training, no processes)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from client.privacy import client_dp_clipping_mod
from shared.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, SITE

#: Packed adapter as shared.protocol sends it: one flat float32 array per model.
GLOBAL = {"cls": np.linspace(-1, 1, 6), "seg": np.linspace(0, 2, 10)}


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


def record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(values[k], dtype=np.float32)) for k in sorted(values)})


def update(norm: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Global adapter plus an update of the given L2 norm."""
    flat = np.random.default_rng(seed).normal(size=16)
    flat *= norm / np.linalg.norm(flat)
    return {"cls": GLOBAL["cls"] + flat[:6], "seg": GLOBAL["seg"] + flat[6:]}


def request(clip_norm=None, kind: str = MessageType.TRAIN) -> Message:
    config = {"server-round": 1, "base-fingerprint": "abc"}
    if clip_norm is not None:
        config[KEY_CLIPPING_NORM] = clip_norm
    content = RecordDict({ARRAYS: record(GLOBAL), CONFIG: ConfigRecord(config)})
    return Message(content=content, dst_node_id=5, message_type=kind)


def context(mode: str = "off") -> Context:
    run = {"privacy.client-dp": mode, "num-server-rounds": 1}
    return Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config=run)


def handler(values: dict[str, np.ndarray] | None):
    """A stand-in for the train handler: replies with ``values`` (None: the site declines)."""
    calls = []

    def call(msg: Message, ctx: Context) -> Message:
        calls.append(msg)
        content = RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 3, "train/seg_loss": 0.1})})
        content[SITE] = ConfigRecord(
            {"site-id": "a"} if values is not None else {"site-id": "a", "declined": "x"}
        )
        if values is not None:
            content[ARRAYS] = record(values)
        return Message(content, reply_to=msg)

    call.calls = calls
    return call


def sent_update(reply: Message) -> np.ndarray:
    sent = reply.content[ARRAYS]
    return np.concatenate([sent[k].numpy().astype(np.float64) - GLOBAL[k] for k in sorted(GLOBAL)])


@pytest.mark.parametrize("mode", ["client-fixed", "client-adaptive", "server-fixed", "off"])
def test_update_is_clipped_to_the_norm_the_server_sent(mode):
    new = update(5.0)
    reply = client_dp_clipping_mod(request(clip_norm=0.7), context(mode), handler(new))
    assert not reply.has_error()
    sent = sent_update(reply)
    assert np.linalg.norm(sent) <= 0.7 * (1 + 1e-6)
    original = np.concatenate([new[k] - GLOBAL[k] for k in sorted(GLOBAL)])
    np.testing.assert_allclose(sent, original * 0.7 / 5.0, rtol=1e-5, atol=1e-6)  # same direction
    assert (KEY_NORM_BIT in reply.content[METRICS]) == (mode == "client-adaptive")


def test_adaptive_mode_reports_whether_the_update_was_clipped():
    small = client_dp_clipping_mod(request(clip_norm=1.0), context("client-adaptive"), handler(update(0.5)))
    big = client_dp_clipping_mod(request(clip_norm=1.0), context("client-adaptive"), handler(update(2.0)))
    assert small.content[METRICS][KEY_NORM_BIT] == 0 and big.content[METRICS][KEY_NORM_BIT] == 1
    assert np.linalg.norm(sent_update(small)) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("mode", ["off", "server-fixed", "server-adaptive"])
def test_without_a_clip_norm_the_reply_is_untouched(mode):
    new = update(5.0)
    reply = client_dp_clipping_mod(request(), context(mode), handler(new))
    for key in GLOBAL:
        np.testing.assert_array_equal(reply.content[ARRAYS][key].numpy(), new[key].astype(np.float32))
    assert KEY_NORM_BIT not in reply.content[METRICS]


def test_evaluate_messages_pass_through():
    call = handler(update(5.0))
    reply = client_dp_clipping_mod(
        request(clip_norm=0.1, kind=MessageType.EVALUATE), context("client-fixed"), call
    )
    assert len(call.calls) == 1 and np.linalg.norm(sent_update(reply)) == pytest.approx(5.0, rel=1e-5)


@pytest.mark.parametrize("mode", ["client-fixed", "client-adaptive"])
def test_a_site_that_should_clip_refuses_without_a_valid_norm(mode):
    for bad in (None, -1.0, float("nan")):
        call = handler(update(5.0))
        reply = client_dp_clipping_mod(request(clip_norm=bad), context(mode), call)
        assert reply.has_error() and "privacy.client-dp" in reply.error.reason
        assert call.calls == []  # nothing was trained, nothing is sent


def test_a_declined_reply_keeps_its_reason():
    reply = client_dp_clipping_mod(request(clip_norm=1.0), context("client-adaptive"), handler(None))
    assert not reply.has_error() and reply.content[SITE]["declined"] == "x"


@pytest.mark.parametrize("mode", ["client-fixed", "client-adaptive"])
def test_an_all_zero_update_is_sent_as_it_is(mode):
    reply = client_dp_clipping_mod(request(clip_norm=1.0), context(mode), handler(update(0.0)))
    assert not reply.has_error() and np.linalg.norm(sent_update(reply)) < 1e-6
    assert reply.content[METRICS].get(KEY_NORM_BIT, 0) == 0
