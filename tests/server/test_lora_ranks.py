"""Heterogeneous LoRA ranks under federation.lora-aggregation = product: exact ΔW aggregation across ranks, the
optimal projection to a site's rank, PEFT's per-rank scaling, one rank per record, admission, the product
strategy on Flower replies at mixed ranks, and compression's refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from server.admission import AdmissionLimits, Candidate, admit
from shared.config import FederationConfig
from shared.lora_aggregation import (
    delta_weight,
    layout_rank,
    product_aggregate,
    project,
    rank_layout,
    scaling_at_rank,
)
from shared.metric_names import LORA_DISCARDED_ENERGY
from shared.protocol import (
    adapter_to_record,
    record_rank,
    record_to_adapter,
    travelling_layout,
    update_to_record,
)

# `lora`: tests/server/conftest.py


def test_rank_layout_and_the_scaling_rule_keep_alpha(lora):
    assert rank_layout(lora.layout(4), 2) == lora.layout(2)
    assert layout_rank(lora.layout(3)) == 3
    assert scaling_at_rank(lora.scaling(4), 4, 2) == lora.scaling(2)  # alpha / r at every rank


@pytest.mark.parametrize("global_rank", [6, 8])
def test_mixed_ranks_aggregate_to_the_exact_weighted_mean_of_their_delta_w(global_rank, lora):
    """Sites at rank 2 and 4 (alpha fixed, so scalings 8 and 4): with a global rank >= 2 + 4 the aggregate's ΔW is
    exactly Σ wᵢ sᵢ Bᵢ Aᵢ, and nothing is discarded."""
    sites, weights = [lora.site(2, 1), lora.site(4, 2)], [3.0, 1.0]
    result = product_aggregate(
        sites,
        weights,
        layout=lora.layout(global_rank),
        scaling=lora.scaling(global_rank),
        site_scaling=[lora.scaling(2), lora.scaling(4)],
    )
    assert result.discarded_energy == pytest.approx(0.0, abs=1e-12)
    for module in (lora.LIN, lora.CONV):
        want = lora.dense_mean(sites, weights, module, [lora.alpha / 2, lora.alpha / 4])
        got = lora.delta(result.tensors, module, lora.alpha / global_rank)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        result.tensors["seg.mask_decoder.w"],
        0.75 * sites[0]["seg.mask_decoder.w"] + 0.25 * sites[1]["seg.mask_decoder.w"],
    )


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_projection_to_a_site_rank_is_the_optimal_truncated_svd(rank, lora):
    """project() gives torch.linalg.svd's rank-r truncation of the global ΔW (at the site's own scaling), and its
    error is the discarded singular values' energy (Eckart–Young)."""
    global_adapter = lora.site(4, 7)
    projected = project(global_adapter, rank=rank, scaling=lora.scaling(4), to_scaling=lora.scaling(rank))
    assert {n: tuple(t.shape) for n, t in projected.items()} == lora.layout(rank)
    torch.testing.assert_close(projected["seg.mask_decoder.w"], global_adapter["seg.mask_decoder.w"])
    for module in (lora.LIN, lora.CONV):
        full = lora.delta(global_adapter, module, lora.alpha / 4)
        u, s, vh = torch.linalg.svd(full)
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        got = lora.delta(projected, module, lora.alpha / rank)
        torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-5)
        error = float(torch.linalg.matrix_norm(full - got) ** 2)
        assert error == pytest.approx(float(s[rank:].square().sum()), rel=1e-5)


def test_projection_to_a_higher_rank_is_exact(lora):
    global_adapter = lora.site(2, 3)
    projected = project(global_adapter, rank=4, scaling=lora.scaling(2), to_scaling=lora.scaling(4))
    for module in (lora.LIN, lora.CONV):
        torch.testing.assert_close(
            lora.delta(projected, module, lora.alpha / 4),
            lora.delta(global_adapter, module, lora.alpha / 2),
            rtol=1e-6,
            atol=1e-6,
        )


def test_projecting_a_wide_module_up_factorises_only_the_small_core(monkeypatch):
    """A site of rank 8 receiving a rank-4 global adapter of a classifier convolution (in = 512·3·3): ΔW exact, the
    four new components trainable (B columns zero, A rows at PEFT's initial norm, orthogonal to the received ones),
    and no SVD of anything larger than the 8 × 8 core. Found by the end-to-end federation test: the full SVD with
    the complete 4608 × 4608 V it did before took minutes per module and round."""
    shapes = []
    real_svd = torch.linalg.svd

    def svd(matrix, *args, **kwargs):
        shapes.append(tuple(matrix.shape))
        return real_svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "cls.conv.lora_A.weight": torch.randn(4, 512, 3, 3, generator=g),
        "cls.conv.lora_B.weight": torch.randn(512, 4, 1, 1, generator=g),
    }
    projected = project(tensors, rank=8, scaling={"cls": 1.0}, to_scaling={"cls": 0.5})
    assert shapes and all(max(shape) <= 8 for shape in shapes), shapes
    a, b = (
        projected["cls.conv.lora_A.weight"].reshape(8, -1),
        projected["cls.conv.lora_B.weight"].reshape(512, 8),
    )
    before = tensors["cls.conv.lora_B.weight"].reshape(512, 4) @ tensors["cls.conv.lora_A.weight"].reshape(
        4, -1
    )
    torch.testing.assert_close(0.5 * b @ a, before, rtol=1e-5, atol=1e-4)
    assert torch.count_nonzero(b[:, 4:]) == 0
    torch.testing.assert_close(torch.linalg.norm(a[4:], dim=1), torch.full((4,), 3**-0.5))
    gram = a @ a.mT
    torch.testing.assert_close(gram - torch.diag(torch.diagonal(gram)), torch.zeros(8, 8), rtol=0, atol=1e-4)


def test_the_delta_w_is_what_peft_applies_at_each_rank(lora):
    """A PEFT-wrapped nn.Linear at r=2 and r=4, both alpha 16: the ΔW the aggregation uses (scaling alpha / r) is
    PEFT's own merged weight delta."""
    from peft import LoraConfig, get_peft_model

    for rank in (2, 4):
        torch.manual_seed(rank)
        base = nn.Sequential()
        base.add_module("lin", nn.Linear(5, 6, bias=False))
        weight = base.lin.weight.detach().clone()
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=lora.alpha, target_modules=["lin"]))
        layer = model.base_model.model.lin
        nn.init.normal_(layer.lora_B["default"].weight)  # PEFT starts B at 0
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        s = scaling_at_rank({"seg": lora.alpha / 4}, 4, rank)["seg"]
        merged = model.merge_and_unload().lin.weight.detach()
        torch.testing.assert_close(delta_weight(a, b, s).float(), merged - weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["naive", "ffa", "product"])
def test_a_record_decodes_at_exactly_one_rank(mode, lora):
    record = adapter_to_record(lora.site(2, 1), mode=mode)
    shapes = {key: tuple(record[key].shape) for key in record.keys()}
    assert record_rank(shapes, lora.layout(4), mode) == 2
    assert record_rank(shapes, lora.layout(1), mode) == 2
    wrong = {**shapes, "seg": (shapes["seg"][0] + 1,)}
    assert record_rank(wrong, lora.layout(4), mode) is None
    decoded = record_to_adapter(record, rank_layout(lora.layout(4), 2), mode=mode)
    assert set(decoded) == set(travelling_layout(lora.layout(2), mode))


def _packed(tensors) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in adapter_to_record(tensors, mode="product").items()}


def test_a_reply_at_another_rank_is_refused_outside_product_mode(lora):
    reference = _packed(lora.site(4, 0))
    candidate = Candidate("site-2", 1, _packed(lora.site(2, 1)), {"num-examples": 3.0}, rank=2)
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


def test_a_reply_at_another_rank_is_admitted_in_product_mode_against_the_projected_global(lora):
    global_adapter = lora.site(4, 0)
    projected = _packed(project(global_adapter, rank=2, scaling=lora.scaling(4), to_scaling=lora.scaling(2)))
    update = _packed(lora.site(2, 1))
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


def _start(global_adapter, global_rank: int, rank: int, lora):
    """What a site of ``rank`` trains from: the global adapter, projected to its rank when that is another."""
    if rank == global_rank:
        return dict(global_adapter)
    return project(
        global_adapter, rank=rank, scaling=lora.scaling(global_rank), to_scaling=lora.scaling(rank)
    )


def _mixed_rank_round(train_round, lora, global_rank: int, sites: int, **federation):
    global_adapter = lora.site(global_rank, 0)
    config = FederationConfig(strategy="fedavg", lora_aggregation="product", **federation)
    rnd = train_round(
        config,
        sites=sites,
        global_value=_packed(global_adapter),
        adapter_layout=lora.layout(global_rank),
        lora_scaling=lora.scaling(global_rank),
    )
    return rnd, global_adapter


@pytest.mark.parametrize("global_rank", [6, 4])
def test_the_product_strategy_aggregates_flower_replies_at_mixed_ranks(train_round, lora, global_rank):
    """Flower Messages through build_strategy's product FedAvg: sites at rank 2 and 4 (3 and 1 training cases)
    each send their own-rank start plus a step. The absolute norm bound (2.0) admits them only because the
    server measures each against the global adapter projected to that site's rank; a third site's far-away
    rank-2 update is refused. The aggregate's ΔW is the dense weighted mean of the sites' ΔW (each at its own
    scaling alpha / rᵢ), exactly at global rank 6 = 2 + 4, and its optimal rank-4 truncation at global rank 4."""
    rnd, global_adapter = _mixed_rank_round(
        train_round, lora, global_rank, sites=3, min_sites=2, max_update_norm=2.0
    )
    ranks, weights = (2, 4), (3.0, 1.0)
    updates = []
    for node, rank in enumerate(ranks, start=1):
        step = lora.site(rank, 10 + node)
        start = _start(global_adapter, global_rank, rank, lora)
        updates.append({name: value + 0.1 * step[name] for name, value in start.items()})
    replies = [
        rnd.reply(node, adapter_to_record(update, mode="product"), examples=w)
        for node, (update, w) in enumerate(zip(updates, weights, strict=True), start=1)
    ]
    replies.append(rnd.reply(3, adapter_to_record(lora.site(2, 99), mode="product"), examples=5.0))
    arrays, _ = rnd.strategy.aggregate_train(1, replies)
    assert list(rnd.strategy.last_refusals) == ["site-3"] and "norm" in rnd.strategy.last_refusals["site-3"]
    out = record_to_adapter(arrays, lora.layout(global_rank), mode="product")
    for module in lora.MODULES:
        want = lora.dense_mean(updates, weights, module, [lora.alpha / r for r in ranks])
        if global_rank < sum(ranks):
            u, s, vh = torch.linalg.svd(want)
            want = u[:, :global_rank] @ torch.diag(s[:global_rank]) @ vh[:global_rank]
        got = lora.delta(out, module, lora.alpha / global_rank)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        out[lora.DECODER], 0.75 * updates[0][lora.DECODER] + 0.25 * updates[1][lora.DECODER]
    )
    energy = rnd.strategy.aggregation_metrics()[LORA_DISCARDED_ENERGY]
    assert (energy == pytest.approx(0.0, abs=1e-9)) == (global_rank >= sum(ranks))


@pytest.mark.parametrize("compression", ["fp16", "int8"])
def test_a_compressed_update_at_another_rank_is_refused_naming_the_site(train_round, lora, compression):
    """Mixed ranks and federation.compression: a lossy update is a difference from what the site received (its
    projection), at another layout than the server's reference, so the server refuses it with a reason (the site
    refuses to train that way in the first place: tests/client/test_site_rank.py); the site at the global rank
    is aggregated."""
    rnd, global_adapter = _mixed_rank_round(
        train_round, lora, 4, sites=2, min_sites=1, compression=compression
    )
    same, _ = update_to_record(lora.site(4, 1), global_adapter, mode="product", compression=compression)
    start = _start(global_adapter, 4, 2, lora)
    other, _ = update_to_record(lora.site(2, 2), start, mode="product", compression=compression)
    arrays, _ = rnd.strategy.aggregate_train(1, [rnd.reply(1, same), rnd.reply(2, other)])
    assert arrays is not None and list(rnd.strategy.last_refusals) == ["site-2"]
    reason = rnd.strategy.last_refusals["site-2"]
    assert "at LoRA rank 2, not 4" in reason and "federation.compression = 'none'" in reason, reason
    assert compression in reason, reason
