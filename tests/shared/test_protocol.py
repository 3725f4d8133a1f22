"""The packed adapter encoding: exact round trip, one array per model, refusal of foreign layouts."""

from __future__ import annotations

import pytest
import torch

from shared.adapters import AdapterMismatchError
from shared.protocol import adapter_to_record, layout_of, record_to_adapter, travelling_layout


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
