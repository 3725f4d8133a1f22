"""Heterogeneous LoRA ranks under federation.lora-aggregation = product: exact ΔW aggregation across ranks, the
optimal projection to a site's rank, PEFT's per-rank scaling, one rank per record, and admission."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from server.admission import AdmissionLimits, Candidate, admit
from shared.lora_aggregation import (
    delta_weight,
    layout_rank,
    product_aggregate,
    project,
    rank_layout,
    scaling_at_rank,
)
from shared.protocol import adapter_to_record, record_rank, record_to_adapter, travelling_layout

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LIN = "seg.enc.qkv"
CONV = "cls.conv"
ALPHA = 16.0


def site(rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A site adapter at ``rank``: one linear and one conv LoRA module, one fully trained tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"{LIN}.lora_A.weight": torch.randn(rank, 5, generator=g),
        f"{LIN}.lora_B.weight": torch.randn(6, rank, generator=g),
        f"{CONV}.lora_A.weight": torch.randn(rank, 3, 3, 3, generator=g),
        f"{CONV}.lora_B.weight": torch.randn(4, rank, 1, 1, generator=g),
        "seg.mask_decoder.w": torch.randn(3, generator=g),
    }


def layout(rank: int) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in site(rank, 0).items()}


def scaling(rank: int) -> dict[str, float]:
    return {"seg": ALPHA / rank, "cls": ALPHA / rank}


def delta(tensors, module: str, s: float) -> torch.Tensor:
    return delta_weight(tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"], s)


def test_rank_layout_and_the_scaling_rule_keep_alpha():
    assert rank_layout(layout(4), 2) == layout(2)
    assert layout_rank(layout(3)) == 3
    assert scaling_at_rank(scaling(4), 4, 2) == scaling(2)  # alpha / r at every rank


@pytest.mark.parametrize("global_rank", [6, 8])
def test_mixed_ranks_aggregate_to_the_exact_weighted_mean_of_their_delta_w(global_rank):
    """Sites at rank 2 and 4 (alpha fixed, so scalings 8 and 4): with a global rank >= 2 + 4 the aggregate's ΔW is
    exactly Σ wᵢ sᵢ Bᵢ Aᵢ, and nothing is discarded."""
    sites, weights = [site(2, 1), site(4, 2)], [3.0, 1.0]
    result = product_aggregate(
        sites,
        weights,
        layout=layout(global_rank),
        scaling=scaling(global_rank),
        site_scaling=[scaling(2), scaling(4)],
    )
    assert result.discarded_energy == pytest.approx(0.0, abs=1e-12)
    for module in (LIN, CONV):
        want = 0.75 * delta(sites[0], module, ALPHA / 2) + 0.25 * delta(sites[1], module, ALPHA / 4)
        got = delta(result.tensors, module, ALPHA / global_rank)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        result.tensors["seg.mask_decoder.w"],
        0.75 * sites[0]["seg.mask_decoder.w"] + 0.25 * sites[1]["seg.mask_decoder.w"],
    )


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_projection_to_a_site_rank_is_the_optimal_truncated_svd(rank):
    """project() gives torch.linalg.svd's rank-r truncation of the global ΔW (at the site's own scaling), and its
    error is the discarded singular values' energy (Eckart–Young)."""
    global_adapter = site(4, 7)
    projected = project(global_adapter, rank=rank, scaling=scaling(4), to_scaling=scaling(rank))
    assert {n: tuple(t.shape) for n, t in projected.items()} == layout(rank)
    torch.testing.assert_close(projected["seg.mask_decoder.w"], global_adapter["seg.mask_decoder.w"])
    for module in (LIN, CONV):
        full = delta(global_adapter, module, ALPHA / 4)
        u, s, vh = torch.linalg.svd(full)
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        got = delta(projected, module, ALPHA / rank)
        torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-5)
        error = float(torch.linalg.matrix_norm(full - got) ** 2)
        assert error == pytest.approx(float(s[rank:].square().sum()), rel=1e-5)


def test_projection_to_a_higher_rank_is_exact():
    global_adapter = site(2, 3)
    projected = project(global_adapter, rank=4, scaling=scaling(2), to_scaling=scaling(4))
    for module in (LIN, CONV):
        torch.testing.assert_close(
            delta(projected, module, ALPHA / 4),
            delta(global_adapter, module, ALPHA / 2),
            rtol=1e-6,
            atol=1e-6,
        )


def test_the_delta_w_is_what_peft_applies_at_each_rank():
    """A PEFT-wrapped nn.Linear at r=2 and r=4, both alpha 16: the ΔW the aggregation uses (scaling alpha / r) is
    PEFT's own merged weight delta."""
    from peft import LoraConfig, get_peft_model

    for rank in (2, 4):
        torch.manual_seed(rank)
        base = nn.Sequential()
        base.add_module("lin", nn.Linear(5, 6, bias=False))
        weight = base.lin.weight.detach().clone()
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=["lin"]))
        layer = model.base_model.model.lin
        nn.init.normal_(layer.lora_B["default"].weight)  # PEFT starts B at 0
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        s = scaling_at_rank({"seg": ALPHA / 4}, 4, rank)["seg"]
        merged = model.merge_and_unload().lin.weight.detach()
        torch.testing.assert_close(delta_weight(a, b, s).float(), merged - weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["naive", "ffa", "product"])
def test_a_record_decodes_at_exactly_one_rank(mode):
    record = adapter_to_record(site(2, 1), mode=mode)
    shapes = {key: tuple(record[key].shape) for key in record.keys()}
    assert record_rank(shapes, layout(4), mode) == 2
    assert record_rank(shapes, layout(1), mode) == 2
    wrong = {**shapes, "seg": (shapes["seg"][0] + 1,)}
    assert record_rank(wrong, layout(4), mode) is None
    decoded = record_to_adapter(record, rank_layout(layout(4), 2), mode=mode)
    assert set(decoded) == set(travelling_layout(layout(2), mode))


def _packed(tensors) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in adapter_to_record(tensors, mode="product").items()}


def test_a_reply_at_another_rank_is_refused_outside_product_mode():
    reference = _packed(site(4, 0))
    candidate = Candidate("site-2", 1, _packed(site(2, 1)), {"num-examples": 3.0}, rank=2)
    for mode in ("naive", "ffa"):
        decision = admit(
            [candidate], reference=reference, server_round=1, limits=AdmissionLimits(), lora_aggregation=mode
        )
        assert decision.admitted == []
        ((_, site_name, reason),) = decision.refused
        assert site_name == "site-2"
        assert (
            "LoRA rank 2" in reason and "federation.lora-aggregation = 'product'" in reason and mode in reason
        )


def test_a_reply_at_another_rank_is_admitted_in_product_mode_against_the_projected_global():
    global_adapter = site(4, 0)
    projected = _packed(project(global_adapter, rank=2, scaling=scaling(4), to_scaling=scaling(2)))
    update = _packed(site(2, 1))
    candidate = Candidate("site-2", 1, update, {"num-examples": 3.0}, rank=2, reference=projected)
    decision = admit(
        [candidate],
        reference=_packed(global_adapter),
        server_round=1,
        limits=AdmissionLimits(),
        lora_aggregation="product",
    )
    assert decision.admitted == [0]
    want = np.sqrt(sum(float(np.sum((update[k] - projected[k]).astype(np.float64) ** 2)) for k in update))
    assert decision.norms[0] == pytest.approx(want)
    # sizes that match the rank's layout only approximately are refused
    bad = {**update, "seg": np.zeros(update["seg"].size + 1, np.float32)}
    decision = admit(
        [Candidate("site-2", 1, bad, {"num-examples": 3.0}, rank=2, reference=projected)],
        reference=_packed(global_adapter),
        server_round=1,
        limits=AdmissionLimits(),
        lora_aggregation="product",
    )
    assert decision.admitted == [] and "shape" in decision.refused[0][2]
