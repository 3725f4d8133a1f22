"""LoRA product aggregation in ΔW space: exactness, optimality of the rank truncation, and edge cases."""

from __future__ import annotations

import pytest
import torch

from shared.lora_aggregation import (
    delta_weight,
    lora_modules,
    product_aggregate,
    refactorise,
    weighted_mean,
)

# `lora`: tests/server/conftest.py


def test_product_is_the_exact_weighted_mean_of_delta_w_when_the_rank_suffices(lora):
    updates, weights, scaling = [lora.site(2, 1), lora.site(2, 2)], [3.0, 1.0], {"seg": 0.5, "cls": 2.0}
    result = product_aggregate(updates, weights, layout=lora.layout(4), scaling=scaling)
    for module, prefix in ((lora.LIN, "seg"), (lora.CONV, "cls")):
        a, b = result.tensors[f"{module}.lora_A.weight"], result.tensors[f"{module}.lora_B.weight"]
        assert a.shape[0] == 4 and b.shape[1] == 4 and a.dtype == torch.float32
        got = delta_weight(a, b, scaling[prefix])
        torch.testing.assert_close(
            got, lora.dense_mean(updates, weights, module, scaling[prefix]), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(
        result.tensors["seg.mask_decoder.w"],
        0.75 * updates[0]["seg.mask_decoder.w"] + 0.25 * updates[1]["seg.mask_decoder.w"],
    )
    assert result.discarded_energy == pytest.approx(0.0, abs=1e-10)


def test_product_keeps_sites_of_another_scaling_consistent(lora):
    updates, weights = [lora.site(2, 3), lora.site(4, 4)], [1.0, 1.0]
    site_scaling = [{"seg": 2.0, "cls": 2.0}, {"seg": 1.0, "cls": 1.0}]  # alpha 4, ranks 2 and 4
    result = product_aggregate(
        updates,
        weights,
        layout=lora.layout(6),
        scaling={"seg": 4.0 / 6, "cls": 4.0 / 6},
        site_scaling=site_scaling,
    )
    want = lora.dense_mean(updates, weights, lora.LIN, [2.0, 1.0])
    torch.testing.assert_close(lora.delta(result.tensors, lora.LIN, 4.0 / 6), want, atol=1e-5, rtol=1e-5)


def test_truncation_is_the_optimal_rank_r_approximation(lora):
    updates, weights, s = [lora.site(2, 5), lora.site(2, 6), lora.site(2, 7)], [1.0, 2.0, 3.0], 1.5
    result = product_aggregate(updates, weights, layout=lora.layout(2), scaling={"seg": s, "cls": s})
    target = lora.dense_mean(updates, weights, lora.LIN, s)
    a, b = result.tensors[f"{lora.LIN}.lora_A.weight"], result.tensors[f"{lora.LIN}.lora_B.weight"]
    error = torch.linalg.norm(target - delta_weight(a, b, s))
    u, sigma, vh = torch.linalg.svd(target)
    best = u[:, :2] @ torch.diag(sigma[:2]) @ vh[:2]
    assert float(error) == pytest.approx(float(torch.linalg.norm(target - best)), rel=1e-5)
    g = torch.Generator().manual_seed(0)
    b_opt, a_opt = u[:, :2] * sigma[:2].sqrt(), sigma[:2].sqrt()[:, None] * vh[:2]
    for _ in range(20):  # random rank-2 matrices, and rank-2 perturbations of the optimum, are worse
        rb = torch.randn(6, 2, generator=g, dtype=torch.float64)
        ra = torch.randn(2, 5, generator=g, dtype=torch.float64)
        assert torch.linalg.norm(target - rb @ ra) > error
        assert torch.linalg.norm(target - (b_opt + 1e-3 * rb) @ (a_opt + 1e-3 * ra)) > error
    # the reported energy is over both modules: check the linear one on its own
    _, _, dropped, total = refactorise(
        [
            (w / 6 * s * u_[f"{lora.LIN}.lora_B.weight"].double(), u_[f"{lora.LIN}.lora_A.weight"].double())
            for w, u_ in zip(weights, updates, strict=True)
        ],
        rank=2,
        scaling=s,
    )
    assert dropped / total == pytest.approx(float(sigma[2:].square().sum() / sigma.square().sum()), rel=1e-6)
    assert 0 < result.discarded_energy < 1


def test_refactorise_with_more_rank_than_the_sum_is_exact_and_pads():
    g = torch.Generator().manual_seed(1)
    b, a = (
        torch.randn(6, 1, generator=g, dtype=torch.float64),
        torch.randn(1, 5, generator=g, dtype=torch.float64),
    )
    new_b, new_a, dropped, _ = refactorise([(b, a)], rank=3, scaling=1.0)
    torch.testing.assert_close(new_b @ new_a, b @ a)
    assert new_a.shape == (3, 5) and dropped == pytest.approx(0.0, abs=1e-20)


def test_zero_update_keeps_lora_trainable(lora):
    update = lora.site(2, 8)
    update[f"{lora.LIN}.lora_B.weight"].zero_()
    result = product_aggregate([update], [1.0], layout=lora.layout(2), scaling={"seg": 1.0, "cls": 1.0})
    assert torch.count_nonzero(result.tensors[f"{lora.LIN}.lora_B.weight"]) == 0
    rows = torch.linalg.norm(result.tensors[f"{lora.LIN}.lora_A.weight"], dim=1)
    torch.testing.assert_close(rows, torch.full((2,), 3**-0.5))


def test_refusals(lora):
    with pytest.raises(ValueError, match="no partner"):
        lora_modules(["seg.x.lora_A.weight"])
    with pytest.raises(ValueError, match="no partner"):
        lora_modules(["seg.x.lora_B.weight"])
    with pytest.raises(ValueError, match="weights"):
        weighted_mean([lora.site(2, 0)], [0.0])
    with pytest.raises(ValueError, match="product"):
        delta_weight(torch.zeros(2, 5), torch.zeros(6, 3), 1.0)
