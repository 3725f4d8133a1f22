"""The packed adapter encoding: exact round trip, one array per model, refusal of foreign layouts; compression
(``none`` exact, ``fp16``/``int8`` within their error bounds, error feedback, refusal of another encoding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from shared.adapters import AdapterMismatchError
from shared.protocol import (
    adapter_to_record,
    encode_record,
    float32_record,
    layout_of,
    payload_bytes,
    record_encoding,
    record_to_adapter,
    record_to_update,
    travelling_layout,
    update_to_record,
)


def _adapter() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = {
        "seg.b.lora_A.weight": (4, 8),
        "seg.a.bias": (3,),
        "seg.scale": (),
        "cls.head.weight": (2, 5),
        "cls.head.bias": (2,),
    }
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def test_round_trip_is_exact_with_one_float32_array_per_model():
    tensors = _adapter()
    record = adapter_to_record(tensors)
    assert sorted(record.keys()) == ["cls", "seg"]
    assert record["seg"].numpy().shape == (4 * 8 + 3 + 1,)
    assert record["cls"].numpy().dtype.name == "float32"
    back = record_to_adapter(record, layout_of(tensors))
    assert layout_of(back) == layout_of(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(back[name], tensor), name


def test_packing_order_does_not_depend_on_insertion_order():
    tensors = _adapter()
    reversed_order = dict(reversed(list(tensors.items())))
    first, second = adapter_to_record(tensors), adapter_to_record(reversed_order)
    for key in ("seg", "cls"):
        assert (first[key].numpy() == second[key].numpy()).all()


def test_a_record_of_another_layout_is_refused_with_the_sizes():
    tensors = _adapter()
    other = {**tensors, "seg.extra": torch.zeros(7)}
    with pytest.raises(AdapterMismatchError, match=r"seg: expected \(36,\), found \(43,\)"):
        record_to_adapter(adapter_to_record(other), layout_of(tensors))
    only_seg = {k: v for k, v in tensors.items() if k.startswith("seg.")}
    with pytest.raises(AdapterMismatchError, match="missing: cls"):
        record_to_adapter(adapter_to_record(only_seg), layout_of(tensors))


def test_ffa_records_leave_lora_a_out_and_a_record_of_another_mode_is_refused():
    tensors = {**_adapter(), "seg.b.lora_B.weight": torch.zeros(6, 4)}
    layout = layout_of(tensors)
    assert "seg.b.lora_A.weight" not in travelling_layout(layout, "ffa")
    assert travelling_layout(layout, "product") == travelling_layout(layout, "naive") == layout
    record = adapter_to_record(tensors, mode="ffa")
    assert record["seg"].numpy().shape == (6 * 4 + 3 + 1,)  # half the LoRA traffic: B only
    back = record_to_adapter(record, layout, mode="ffa")
    assert set(back) == set(tensors) - {"seg.b.lora_A.weight"}
    assert all(torch.equal(back[n], tensors[n]) for n in back)
    with pytest.raises(
        AdapterMismatchError, match=r"lora-aggregation = 'naive'.*fits federation.lora-aggregation = 'ffa'"
    ):
        record_to_adapter(record, layout, mode="naive")
    with pytest.raises(
        AdapterMismatchError, match=r"'ffa'.*fits federation.lora-aggregation = 'naive' or 'product'"
    ):
        record_to_adapter(adapter_to_record(tensors), layout, mode="ffa")
    with pytest.raises(ValueError, match="lora-aggregation = 'fedlora'"):
        travelling_layout(layout, "fedlora")


def _int8_scales(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """The per-tensor int8 step: max |x| / 127."""
    return {name: float(t.abs().max()) / 127 for name, t in tensors.items()}


@pytest.mark.parametrize("mode", ["naive", "ffa"])
def test_none_is_exact_and_today_s_bytes(mode):
    tensors = _adapter()
    record = adapter_to_record(tensors, mode=mode, compression="none")
    assert record_encoding(record) == "none"
    today = adapter_to_record(tensors, mode=mode)
    assert payload_bytes(record) == payload_bytes(today)
    back = record_to_adapter(record, layout_of(tensors), mode=mode, compression="none")
    assert all(torch.equal(back[n], tensors[n]) for n in back)


def test_a_float64_record_travels_as_float32_and_a_float32_one_unchanged():
    tensors = _adapter()
    float32 = adapter_to_record(tensors)
    assert float32_record(float32) is float32  # nothing to cast: no copy
    wide = ArrayRecord({key: Array(float32[key].numpy().astype(np.float64) / 3) for key in float32.keys()})
    sent = encode_record(wide, layout_of(tensors), compression="none")
    assert {sent[key].dtype for key in sent.keys()} == {"float32"}
    elements = sum(t.numel() for t in tensors.values())
    assert payload_bytes(wide) - payload_bytes(sent) == 4 * elements  # 4 bytes per value, not 8
    for key in wide.keys():  # the float32 rounding of each value, nothing else
        np.testing.assert_array_equal(sent[key].numpy(), wide[key].numpy().astype(np.float32))
    assert wide["seg"].dtype == "float64"  # the sender's record is not changed


def test_fp16_and_int8_round_trips_stay_within_their_bounds_and_bytes():
    tensors = {**_adapter(), "seg.zero": torch.zeros(5)}
    layout = layout_of(tensors)
    elements = sum(t.numel() for t in tensors.values())
    header = payload_bytes(adapter_to_record(tensors)) - 4 * elements  # the .npy headers, one per array
    fp16 = adapter_to_record(tensors, compression="fp16")
    assert record_encoding(fp16) == "fp16"
    assert payload_bytes(fp16) - header == 2 * elements
    back = record_to_adapter(fp16, layout, compression="fp16")
    for name, tensor in tensors.items():  # float16 rounding: relative error <= 2**-11 (normal range)
        assert torch.allclose(back[name], tensor, rtol=2**-11, atol=1e-7), name
    int8 = adapter_to_record(tensors, compression="int8")
    assert record_encoding(int8) == "int8"
    assert sorted(int8.keys()) == ["cls", "cls/scale", "seg", "seg/scale"]
    assert int8["seg/scale"].numpy().shape == (4,)  # one float32 scale per seg tensor
    back = record_to_adapter(int8, layout, compression="int8")
    for name, scale in _int8_scales(tensors).items():  # max abs error <= scale / 2 per tensor
        assert float((back[name] - tensors[name]).abs().max()) <= scale / 2 * (1 + 1e-5), name
    assert torch.equal(back["seg.zero"], torch.zeros(5))
    # int8 data + 4 bytes per tensor scale + 4 array headers (2 models x values and scales)
    assert payload_bytes(int8) == elements + 4 * len(tensors) + 2 * header


def test_fp16_refuses_values_it_cannot_hold():
    tensors = {**_adapter(), "seg.big": torch.full((2,), 1e5)}
    with pytest.raises(ValueError, match="does not fit federation.compression = 'fp16'"):
        adapter_to_record(tensors, compression="fp16")


@pytest.mark.parametrize(("sent", "expected"), [("none", "int8"), ("int8", "none"), ("fp16", "int8")])
def test_a_record_of_another_encoding_is_refused_naming_both(sent, expected):
    tensors = _adapter()
    record = adapter_to_record(tensors, compression=sent)
    with pytest.raises(
        AdapterMismatchError,
        match=rf"encoded as federation.compression = '{sent}', but this run uses federation.compression = "
        rf"'{expected}'",
    ):
        record_to_adapter(record, layout_of(tensors), compression=expected)


def test_a_compressed_record_of_another_layout_is_refused_with_the_sizes():
    tensors = _adapter()
    other = {**tensors, "seg.extra": torch.zeros(7)}
    with pytest.raises(AdapterMismatchError, match=r"seg/scale: expected \(3,\), found \(4,\)"):
        record_to_adapter(
            adapter_to_record(other, compression="int8"), layout_of(tensors), compression="int8"
        )


def test_uplink_none_sends_the_update_itself_and_the_server_gets_it_exactly():
    received, update = _adapter(), {n: t + 0.01 for n, t in _adapter().items()}
    record, residual = update_to_record(update, received, compression="none")
    assert residual is None
    reference = adapter_to_record(received)
    back = record_to_update(record, reference, layout_of(update), compression="none")
    exact = adapter_to_record(update)
    assert all(np.array_equal(back[k].numpy(), exact[k].numpy()) for k in exact.keys())


@pytest.mark.parametrize("compression", ["fp16", "int8"])
def test_error_feedback_keeps_the_sum_of_decoded_updates_within_one_step(compression):
    """Rounds of small updates: the server's global adapter minus the start (the sum of decoded updates) equals the
    sum of the true updates minus the residual the site holds, and that residual is one step's quantisation error
    (int8: <= scale / 2 of the last value sent; fp16: its float16 rounding), so the error does not grow."""
    generator = torch.Generator().manual_seed(1)
    start = _adapter()
    layout = layout_of(start)
    server = adapter_to_record(start)  # the server's exact global adapter (float32 packed)
    true_sum = {n: torch.zeros_like(t) for n, t in start.items()}
    residual = None
    for _ in range(12):
        # the site trains from the global adapter as it decoded it (lossy downlink)
        downlink = adapter_to_record(record_to_adapter(server, layout), compression=compression)
        received = record_to_adapter(downlink, layout, compression=compression)
        delta = {n: 1e-3 * torch.randn(t.shape, generator=generator) + 3e-4 for n, t in start.items()}
        sent_value = {n: delta[n] + (residual[n] if residual else 0.0) for n in start}
        update = {n: received[n] + delta[n] for n in start}
        record, residual = update_to_record(update, received, compression=compression, residual=residual)
        server = record_to_update(record, server, layout, compression=compression)
        now = record_to_adapter(server, layout)
        for n in start:
            true_sum[n] += delta[n]
            assert torch.allclose(now[n] - start[n], true_sum[n] - residual[n], atol=1e-5), n
            one_step = (
                float(sent_value[n].abs().max()) / 127 / 2
                if compression == "int8"
                else float(sent_value[n].abs().max()) * 2**-11
            )
            assert float(residual[n].abs().max()) <= one_step * (1 + 1e-3) + 1e-7, n
            assert float((now[n] - start[n] - true_sum[n]).abs().max()) <= one_step + 2e-5, n
