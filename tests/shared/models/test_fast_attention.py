"""The ``fast`` padded-window attention equals the ``reference`` one: fixture, general windows, gradients, LoRA."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from torch import nn

from shared.models.sam_med3d import build_sam_med3d, fast_attention, load_state_dict_strict
from shared.models.sam_med3d.fast_attention import padded_window_attention
from shared.models.sam_med3d.image_encoder import Block3D, ImageEncoderViT3D

FIXTURE = Path(__file__).resolve().parents[3].parent / "shared" / "reference" / "sam_med3d_fixture_small.pt"
LORA_TARGETS = r"blocks\.\d+\.attn\.qkv"


def perturb(module: nn.Module, *, rel_pos_std: float, qkv_bias_std: float, seed: int) -> None:
    """Random rel-pos tables and absolute position embedding; large qkv biases so q0/k0/v0 matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * rel_pos_std)
            elif name.endswith("qkv.bias"):
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * qkv_bias_std)


def windowed(block: Block3D, x: torch.Tensor, impl: str) -> torch.Tensor:
    block.attention_impl = impl
    return block._windowed_attention(x)


# ------------------------------------------------------------------------------------------ official fixture


@pytest.fixture(scope="module")
def fixture() -> dict:
    if not FIXTURE.is_file():
        pytest.fail(f"reference fixture missing at {FIXTURE} (../shared/reference beside the repository)")
    return torch.load(FIXTURE, weights_only=True)


def test_fixture_encoder_and_replay_with_fast(fixture):
    model = build_sam_med3d(fixture["config"], attention_impl="fast").eval()
    load_state_dict_strict(model, fixture["state_dict"], source=str(FIXTURE))
    outputs = fixture["outputs"]
    points = (fixture["point_coords"], fixture["point_labels"])
    with torch.no_grad():
        fast = model.image_encoder(fixture["image"])
        masks, iou = model.decode(fast, points, fixture["prev_mask_logits"])
        masks_nomask, iou_nomask = model.decode(fast, points, None)
        model.image_encoder.set_attention_impl("reference")
        reference = model.image_encoder(fixture["image"])
    assert (fast - reference).abs().max().item() <= 1e-5
    got = {
        "image_embeddings": fast,
        "low_res_masks": masks,
        "iou_predictions": iou,
        "low_res_masks_nomask": masks_nomask,
        "iou_predictions_nomask": iou_nomask,
    }
    for name, value in got.items():
        err = (value - outputs[name]).abs().max().item()
        assert err <= 1e-4, f"{name}: max abs diff {err:.3g} > 1e-4 with attention_impl='fast'"


def test_fast_is_the_default_and_unknown_names_are_refused():
    with torch.device("meta"):
        model = build_sam_med3d("small")
    assert {block.attention_impl for block in model.image_encoder.blocks} == {"fast"}
    with pytest.raises(ValueError, match="attention_impl"):
        model.image_encoder.set_attention_impl("flash")


# ---------------------------------------------------------------------------- general window configurations

# (grid (D, H, W), window size, rel-pos table rows or None for 2·ws − 1)
WINDOW_CASES = [
    ((8, 8, 8), 3, None),  # 3 windows per axis, last one 2 tokens deep: 8 shape classes
    ((8, 8, 8), 5, None),  # 1 full + 1 partial (3) per axis
    ((6, 6, 6), 4, None),
    ((8, 6, 5), 4, None),  # non-cube grid: no padding in D, different partial extents in H and W
    ((8, 8, 8), 4, None),  # grid a multiple of the window: no padding at all
    ((8, 8, 8), 8, None),  # one window exactly covering the grid
    ((8, 8, 8), 14, None),  # the SAM-Med3D case: one 14³ window around 8³ real tokens
    ((5, 7, 3), 9, None),  # window larger than every axis
    ((6, 6, 6), 4, 9),  # table of 9 rows resized to 7 by get_rel_pos
    ((8, 8, 8), 14, 15),  # a global-size table resized to the 27 rows of a 14³ window
]


def make_block(ws: int, table_rows: int | None, *, dim: int = 32, heads: int = 4, seed: int = 0) -> Block3D:
    torch.manual_seed(seed)
    block = Block3D(dim=dim, num_heads=heads, window_size=ws, use_rel_pos=True)
    if table_rows is not None:
        head_dim = dim // heads
        for axis in "dhw":
            setattr(block.attn, f"rel_pos_{axis}", nn.Parameter(torch.zeros(table_rows, head_dim)))
    return block


def batch_for(window_size: int) -> int:
    """B = 2 where it is cheap; the reference's 14³ windows are costly, so B = 1 there."""
    return 2 if window_size < 8 else 1


@pytest.mark.parametrize("grid,ws,table_rows", WINDOW_CASES)
def test_fast_equals_reference_float32(grid, ws, table_rows):
    block = make_block(ws, table_rows)
    perturb(block, rel_pos_std=0.5, qkv_bias_std=1.0, seed=1)
    x = torch.randn(batch_for(ws), *grid, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = windowed(block, x, "reference")
        got = windowed(block, x, "fast")
    assert got.shape == want.shape == x.shape
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("grid,ws,table_rows", WINDOW_CASES)
def test_fast_is_exact_in_float64_with_large_padding_terms(grid, ws, table_rows):
    """In float64 the two differ by rounding only, even when q0/k0/v0 and the rel-pos terms are large."""
    block = make_block(ws, table_rows, dim=16, heads=2).double()
    perturb(block, rel_pos_std=1.0, qkv_bias_std=3.0, seed=3)
    x = torch.randn(batch_for(ws), *grid, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(
            windowed(block, x, "fast"), windowed(block, x, "reference"), rtol=0, atol=1e-10
        )


@pytest.mark.parametrize("grid,ws", [((8, 6, 5), 4), ((8, 8, 8), 8), ((5, 5, 5), 14)])
def test_fast_without_relative_positions(grid, ws):
    torch.manual_seed(5)
    block = Block3D(dim=16, num_heads=2, window_size=ws, use_rel_pos=False).double()
    perturb(block, rel_pos_std=0.0, qkv_bias_std=2.0, seed=5)
    x = torch.randn(1, *grid, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            windowed(block, x, "fast"), windowed(block, x, "reference"), rtol=0, atol=1e-10
        )


def test_bf16_autocast_keeps_the_mask_in_float32(monkeypatch):
    """Under bf16 autocast SDPA gets bf16 q/k/v but a float32 mask (rel-pos bias and log-mass), and the fast
    path stays as accurate as the reference."""
    block = make_block(14, None)
    perturb(block, rel_pos_std=0.5, qkv_bias_std=1.0, seed=6)
    x = torch.randn(1, 8, 8, 8, 32, generator=torch.Generator().manual_seed(7))
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        seen.append((q.dtype, attn_mask.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(fast_attention.F, "scaled_dot_product_attention", recording_sdpa)
    with torch.no_grad():
        exact = windowed(block, x, "reference")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast_bf16 = windowed(block, x, "fast").float()
            reference_bf16 = windowed(block, x, "reference").float()
    assert seen == [(torch.bfloat16, torch.float32)]
    fast_err = (fast_bf16 - exact).abs().max().item()
    reference_err = (reference_bf16 - exact).abs().max().item()
    assert fast_err <= 1.5 * reference_err, f"bf16 error: fast {fast_err:.3g}, reference {reference_err:.3g}"


def test_invalid_arguments_are_refused():
    block = make_block(4, None)
    with pytest.raises(ValueError, match="window_size"):
        padded_window_attention(block.attn, torch.zeros(1, 4, 4, 4, 32), 0)
    with pytest.raises(ValueError, match=r"\(B, D, H, W, C\)"):
        padded_window_attention(block.attn, torch.zeros(4, 4, 4, 32), 4)


# ------------------------------------------------------------------------------------------------ gradients


def small_encoder(window_size: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> ImageEncoderViT3D:
    """Grid 8³ (16³ image, patch 2), one windowed and one global block, small dims."""
    torch.manual_seed(seed)
    encoder = ImageEncoderViT3D(
        img_size=16,
        patch_size=2,
        embed_dim=16,
        depth=2,
        num_heads=2,
        out_chans=8,
        window_size=window_size,
        global_attn_indexes=(1,),
    ).to(dtype)
    perturb(encoder, rel_pos_std=0.3, qkv_bias_std=1.0, seed=seed + 1)
    return encoder


def run_and_backward(model: nn.Module, encoder: ImageEncoderViT3D, impl: str) -> dict[str, torch.Tensor]:
    """Forward a fixed image (B = 2) with ``impl``, backward a fixed projection of the output.

    Returns the gradients of the image (key ``image``) and of every trainable parameter.
    """
    dtype = encoder.patch_embed.proj.weight.dtype
    encoder.set_attention_impl(impl)
    model.zero_grad(set_to_none=True)
    image = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(8)).to(dtype)
    image.requires_grad_(True)
    out = model(image)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    (out * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return {"image": image.grad, **grads}


def assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float) -> None:
    """Max abs difference within ``rel`` times max(1, max |grad|) for every gradient.

    The float32 bar is 5e-5: the reference itself is about 1e-5 away from float64 on some tables' gradients
    (its 2,744-key softmax sums), and ``fast`` is closer to float64 than the reference everywhere.
    """
    assert set(got) == set(want)
    for name, grad in want.items():
        scale = max(grad.abs().max().item(), 1.0)
        err = (got[name] - grad).abs().max().item()
        assert err <= rel * scale, f"{name}: gradient differs by {err:.3g} (max |grad| {scale:.3g})"


@pytest.mark.parametrize("window_size", [3, 10])
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 5e-5), (torch.float64, 1e-10)])
def test_gradients_of_input_and_all_parameters_match(window_size, dtype, rel):
    encoder = small_encoder(window_size, dtype)
    want = run_and_backward(encoder, encoder, "reference")
    got = run_and_backward(encoder, encoder, "fast")
    assert len(want) == 1 + len(list(encoder.parameters()))
    assert want["blocks.0.attn.rel_pos_d"].abs().max() > 0  # the padded-window terms reach the tables
    assert_same_grads(got, want, rel)


@pytest.mark.parametrize("window_size", [3, 10])
def test_gradients_with_peft_lora_on_qkv_match(window_size):
    encoder = small_encoder(window_size)
    model = peft.get_peft_model(encoder, peft.LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT initialises lora_B to zero: make the adapter act
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all("lora_" in name for name in trainable)  # A and B of two blocks
    want = run_and_backward(model, encoder, "reference")
    got = run_and_backward(model, encoder, "fast")
    assert all(grad.abs().max() > 0 for grad in want.values())
    assert_same_grads(got, want, 5e-5)


# ------------------------------------------------------------------- global blocks and the fused-kernel layout


@pytest.fixture
def cuda_layout(monkeypatch) -> None:
    """The layout ``fast`` takes on CUDA (aligned masks, global blocks through SDPA), forced on this CPU."""
    monkeypatch.setattr(fast_attention, "fused_kernel_layout", lambda device: True)


@pytest.mark.usefixtures("cuda_layout")
@pytest.mark.parametrize("grid", [(8, 8, 8), (5, 5, 5)])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_global_blocks_run_as_one_unpadded_window_and_equal_reference(monkeypatch, grid, dtype, atol):
    """``fast`` (CUDA layout) runs a global block over a cubic grid through the same SDPA path (no explicit
    softmax); it equals the explicit form."""
    calls = []
    monkeypatch.setattr(fast_attention, "_window_class_attention", _counting(calls))
    torch.manual_seed(11)
    block = Block3D(dim=16, num_heads=2, window_size=0, use_rel_pos=True, input_size=grid).to(dtype)
    perturb(block, rel_pos_std=1.0, qkv_bias_std=2.0, seed=12)
    x = torch.randn(2, *grid, 16, generator=torch.Generator().manual_seed(13)).to(dtype)
    with torch.no_grad():
        block.attention_impl = "fast"
        got = block._global_attention(x)
        block.attention_impl = "reference"
        want = block._global_attention(x)
    assert len(calls) == 1  # fast only
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


def _counting(calls: list) -> object:
    original = fast_attention._window_class_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    return counted


@pytest.mark.usefixtures("cuda_layout")
@pytest.mark.parametrize("window_size", [3, 10])
def test_gradients_match_in_the_cuda_layout(window_size):
    encoder = small_encoder(window_size)
    assert_same_grads(
        run_and_backward(encoder, encoder, "fast"), run_and_backward(encoder, encoder, "reference"), 5e-5
    )


@pytest.mark.parametrize("grid,ws", [((8, 8, 8), 14), ((5, 5, 5), 5), ((8, 6, 5), 4)])
@pytest.mark.parametrize("use_rel_pos", [True, False])
@pytest.mark.usefixtures("cuda_layout")
def test_masks_reach_sdpa_with_rows_aligned_for_the_fused_cuda_kernel(monkeypatch, grid, ws, use_rel_pos):
    """CUDA's memory-efficient kernel reads a float mask in place only when every stride but the last is a
    multiple of 8 (else torch copies it, padded, on every call): there the masks come as views of padded
    buffers, with the same outputs."""
    masks = []
    sdpa = fast_attention.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(fast_attention.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(14)
    block = Block3D(dim=16, num_heads=2, window_size=ws, use_rel_pos=use_rel_pos, input_size=grid)
    x = torch.randn(1, *grid, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            windowed(block, x, "fast"), windowed(block, x, "reference"), rtol=0, atol=1e-5
        )
    checked = [m for m in masks if m is not None]
    assert masks and (checked or not use_rel_pos)
    for mask in checked:
        assert mask.stride(-1) == 1 and all(
            s % fast_attention.MASK_ALIGNMENT == 0 for s in mask.stride()[:-1]
        )
