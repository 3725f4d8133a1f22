"""SamPredictor3D: crop placement, embedding reuse, mask-prompt feedback and full-size masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import shared.predictor as predictor_module
from shared.adapters import LoraSpec, attach_lora
from shared.data.transforms import crop_or_pad
from shared.metrics import lesion_volume_cm3
from shared.models.sam_med3d import build_sam_med3d
from shared.predictor import SamPredictor3D
from shared.training.seg import decode_clicks, encode_images, sam_parts, upsample_logits
from tests.shared.tiny_sam import TINY_SAM as TINY
from tests.shared.tiny_sam import P

SHAPE = (40, 70, 45)




def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return attach_lora(build_sam_med3d(TINY, attention_impl="fast"), LoraSpec())


def volume(shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(0.0, 1.0, shape).astype(np.float32)


def counting(model: nn.Module) -> list[int]:
    calls = []
    sam_parts(model).image_encoder.register_forward_hook(lambda module, args, out: calls.append(1))
    return calls


class _PassPrompts(nn.Module):
    input_image_size = (P, P, P)

    def forward(self, points, boxes, masks):
        return torch.zeros(points[0].shape[0], 1, 1), masks

    def get_dense_pe(self):
        return torch.zeros(1)


class _EchoDecoder(nn.Module):
    """Returns the crop itself as logits: the predicted mask is then exactly ``crop > 0``."""

    def forward(
        self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output
    ):
        return image_embeddings, torch.full((image_embeddings.shape[0], 1), 0.5)


def echo_model() -> nn.Module:
    model = nn.Module()
    model.image_encoder = nn.Identity()
    model.prompt_encoder = _PassPrompts()
    model.mask_decoder = _EchoDecoder()
    return model


def test_added_clicks_in_the_same_crop_reuse_the_embedding():
    model = tiny_model()
    calls = counting(model)
    predictor = SamPredictor3D(model, patch_size=P)
    predictor.set_image(volume(), (0.5, 0.4, 0.6))
    first = (20, 30, 22)
    predictor.predict([first], [1])
    predictor.predict([first, (22, 33, 20)], [1, 0])
    result = predictor.predict([first, (22, 33, 20), (18, 28, 25)], [1, 0, 1])
    assert len(calls) == 1 and predictor.encoder_calls == 1
    assert result.clicks_used == 3 and result.ignored_clicks == ()
    predictor.predict([(5, 65, 40)], [1])  # a first click elsewhere: a new crop, a new embedding
    assert len(calls) == 2
    predictor.predict([first, (21, 31, 23)], [1, 1])  # back in the first crop: cached
    assert len(calls) == 2
    predictor.set_image(volume(), (0.5, 0.4, 0.6))  # a new image clears the cache
    predictor.predict([first], [1])
    assert len(calls) == 3


def test_mask_has_the_input_shape_and_is_pasted_at_the_crop():
    image = np.where(volume() > 0.3, 10.0, -10.0).astype(np.float32)
    predictor = SamPredictor3D(echo_model())
    predictor.set_image(image, (1.0, 1.0, 2.0), pad_value=-10.0)
    result = predictor.predict([(38, 3, 22)], [1])
    assert result.mask.shape == SHAPE and result.mask.dtype == bool
    assert result.crop_start == (SHAPE[0] - P, 0, 22 - P // 2)  # clamped inside the volume, centred on x
    crop = tuple(slice(s, s + P) for s in result.crop_start)
    expected = np.zeros(SHAPE, dtype=bool)
    expected[crop] = image[crop] > 0
    assert np.array_equal(result.mask, expected)
    assert result.volume_cm3 == pytest.approx(expected.sum() * 2.0 / 1000)
    assert result.iou == pytest.approx(0.5)


def test_a_volume_smaller_than_the_crop_is_padded():
    image = np.where(volume((20, 70, 10)) > 0, 10.0, -10.0).astype(np.float32)
    predictor = SamPredictor3D(echo_model())
    predictor.set_image(image, pad_value=-10.0)
    result = predictor.predict([(3, 60, 9)], [1])
    assert result.crop_start == (-6, 70 - P, -11)
    assert result.mask.shape == image.shape and result.volume_cm3 is None
    expected = np.zeros(image.shape, dtype=bool)
    expected[:, 70 - P :, :] = image[:, 70 - P :, :] > 0
    assert np.array_equal(result.mask, expected)


def test_previous_logits_of_the_longest_earlier_prefix_are_fed_back(monkeypatch):
    seen = []
    real_decode = predictor_module.SamPredictor3D._run_decoder

    def recording(self, embeddings, coords, labels, mask_logits):
        low_res, iou = real_decode(self, embeddings, coords, labels, mask_logits)
        seen.append({"n": labels.shape[1], "prompt": mask_logits, "out": low_res})
        return low_res, iou

    monkeypatch.setattr(predictor_module.SamPredictor3D, "_run_decoder", recording)
    predictor = SamPredictor3D(tiny_model())
    predictor.set_image(volume())
    a, b, c = (20, 30, 22), (24, 36, 20), (16, 26, 25)
    predictor.predict([a], [1])
    predictor.predict([a, b], [1, 1])
    predictor.predict([a, b, c], [1, 1, 0])
    predictor.predict([a, c], [1, 0])  # continues from [a], not from [a, b]
    assert seen[0]["prompt"] is None
    assert seen[1]["prompt"] is seen[0]["out"] and seen[2]["prompt"] is seen[1]["out"]
    assert seen[3]["prompt"] is seen[0]["out"]
    assert [s["n"] for s in seen] == [1, 2, 3, 2]


def test_predict_sequential_is_the_click_by_click_session_and_repeats_exactly():
    clicks, labels = [(20, 30, 22), (24, 36, 20), (16, 26, 25)], [1, 1, 0]
    model = tiny_model()
    manual = SamPredictor3D(model)
    manual.set_image(volume())
    for n in range(1, 4):
        expected = manual.predict(clicks[:n], labels[:n])
    at_once = SamPredictor3D(model)
    at_once.set_image(volume())
    result = at_once.predict_sequential(clicks, labels)
    assert np.array_equal(result.mask, expected.mask)
    torch.testing.assert_close(result.low_res_logits, expected.low_res_logits)
    again = at_once.predict(clicks, labels)
    assert np.array_equal(again.mask, result.mask) and at_once.encoder_calls == 1


def test_clicks_outside_the_crop_are_ignored_with_a_warning():
    predictor = SamPredictor3D(echo_model())
    predictor.set_image(volume())
    with pytest.warns(UserWarning, match="outside the 32³ crop"):
        result = predictor.predict([(20, 30, 22), (20, 69, 22)], [1, 0])
    assert result.ignored_clicks == ((20, 69, 22),) and result.clicks_used == 1


def test_invalid_calls_are_refused():
    predictor = SamPredictor3D(echo_model())
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict([(1, 1, 1)], [1])
    predictor.set_image(volume())
    with pytest.raises(ValueError, match="inside the volume"):
        predictor.predict([(40, 0, 0)], [1])
    with pytest.raises(ValueError, match="labels must be 1"):
        predictor.predict([(1, 1, 1)], [2])
    with pytest.raises(ValueError, match="one label per click"):
        predictor.predict([(1, 1, 1), (2, 2, 2)], [1])
    with pytest.raises(ValueError, match="shape"):
        predictor.set_image(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="patch_size = 64"):
        SamPredictor3D(echo_model(), patch_size=64)


def unoptimised_session(model, image, spacing, clicks, labels, pad_value=0.0):
    """The plain path the predictor's shortcuts must reproduce bit for bit: per click, ``decode_clicks``
    (dense positional encoding recomputed), the full-size mask and its volume counted over the whole volume."""
    predictor = SamPredictor3D(model)  # for the crop placement only
    predictor.set_image(image, spacing, pad_value=pad_value)
    start = predictor.crop_start(clicks[0])
    crop = crop_or_pad(image, start, P, pad_value=pad_value)
    results, previous = [], None
    with torch.inference_mode():
        embedding = encode_images(model, torch.from_numpy(crop)[None, None])
        for n in range(1, len(clicks) + 1):
            coords = torch.tensor(
                [[[float(v - s) for v, s in zip(c, start, strict=True)] for c in clicks[:n]]]
            )
            low_res, iou = decode_clicks(model, embedding, coords, torch.tensor([labels[:n]]), previous)
            previous = low_res
            crop_mask = (upsample_logits(low_res, P)[0, 0] > 0).numpy()
            mask = np.zeros(image.shape, dtype=bool)
            region = tuple(slice(max(s, 0), min(s + P, n_)) for s, n_ in zip(start, image.shape, strict=True))
            part = tuple(slice(r.start - s, r.stop - s) for r, s in zip(region, start, strict=True))
            mask[region] = crop_mask[part]
            results.append((mask, float(iou.reshape(-1)[0]), low_res, lesion_volume_cm3(mask, spacing)))
    return results


@pytest.mark.parametrize(
    "clicks",
    [
        [(20, 30, 22), (24, 36, 20), (16, 26, 25), (21, 31, 23)],
        [(38, 3, 44), (30, 10, 40), (35, 2, 30)],  # crop clamped at the volume's far edges
    ],
)
def test_the_click_path_is_bitwise_the_unoptimised_one(clicks):
    model = tiny_model()
    labels = [1, 0, 1, 1][: len(clicks)]
    spacing = (0.5, 0.4, 0.6)
    expected = unoptimised_session(model, volume(), spacing, clicks, labels)
    predictor = SamPredictor3D(model)
    predictor.set_image(volume(), spacing)
    for n, (mask, iou, low_res, cm3) in enumerate(expected, start=1):
        result = predictor.predict(clicks[:n], labels[:n])
        assert torch.equal(result.low_res_logits, low_res)
        assert np.array_equal(result.mask, mask) and result.iou == iou and result.volume_cm3 == cm3
    at_once = SamPredictor3D(model)
    at_once.set_image(volume(), spacing)
    last = at_once.predict_sequential(clicks, labels)
    assert torch.equal(last.low_res_logits, expected[-1][2]) and np.array_equal(last.mask, expected[-1][0])


def test_a_smaller_volume_than_the_crop_matches_the_unoptimised_path():
    model = tiny_model()
    image = volume((20, 70, 10))
    clicks, labels = [(3, 60, 9), (10, 50, 2)], [1, 1]
    expected = unoptimised_session(model, image, (1.0, 1.0, 1.0), clicks, labels, pad_value=-1.0)
    predictor = SamPredictor3D(model)
    predictor.set_image(image, (1.0, 1.0, 1.0), pad_value=-1.0)
    result = predictor.predict_sequential(clicks, labels)
    assert np.array_equal(result.mask, expected[-1][0]) and result.volume_cm3 == expected[-1][3]
    assert torch.equal(result.low_res_logits, expected[-1][2])


def test_the_positional_encoding_is_computed_once_per_image():
    model = tiny_model()
    calls = []
    prompt_encoder = sam_parts(model).prompt_encoder
    real = prompt_encoder.get_dense_pe
    prompt_encoder.get_dense_pe = lambda: calls.append(1) or real()
    predictor = SamPredictor3D(model)
    predictor.set_image(volume())
    predictor.predict_sequential([(20, 30, 22), (24, 36, 20), (16, 26, 25)], [1, 1, 0])
    assert len(calls) == 1
    predictor.set_image(volume())  # a new image: computed again, so a changed model is seen
    predictor.predict([(20, 30, 22)], [1])
    assert len(calls) == 2


def test_predict_sequential_builds_one_full_size_mask_and_warns_once(monkeypatch):
    built = []
    real = SamPredictor3D._prediction
    monkeypatch.setattr(SamPredictor3D, "_prediction", lambda self, *a: built.append(1) or real(self, *a))
    predictor = SamPredictor3D(echo_model())
    predictor.set_image(volume())
    with pytest.warns(UserWarning, match="outside") as record:
        result = predictor.predict_sequential([(20, 30, 22), (20, 69, 22), (21, 31, 23)], [1, 0, 1])
    assert len(built) == 1 and len(record) == 1
    assert result.ignored_clicks == ((20, 69, 22),) and result.clicks_used == 2
