"""SamPredictor3D: crop placement, embedding reuse, mask-prompt feedback and full-size masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import shared.predictor as predictor_module
from shared.adapters import LoraSpec, attach_lora
from shared.models.sam_med3d import build_sam_med3d
from shared.predictor import SamPredictor3D
from shared.training.seg import sam_parts
from tests.shared.tiny_sam import TINY_SAM as TINY
from tests.shared.tiny_sam import P

SHAPE = (40, 70, 45)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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
    real_decode = predictor_module.decode_clicks

    def recording(model, embeddings, coords, labels, mask_logits):
        low_res, iou = real_decode(model, embeddings, coords, labels, mask_logits)
        seen.append({"n": labels.shape[1], "prompt": mask_logits, "out": low_res})
        return low_res, iou

    monkeypatch.setattr(predictor_module, "decode_clicks", recording)
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
