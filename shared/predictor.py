"""Interactive SAM-Med3D inference on a full volume: clicks in, a full-size mask out.

Like segment-anything's ``SamPredictor``, :class:`SamPredictor3D` computes the costly image embedding once
and reuses it for every new click:

* :meth:`SamPredictor3D.set_image` takes a preprocessed volume ``(D, H, W)`` (the output of
  :func:`shared.data.transforms.preprocess_case`) and its spacing;
* :meth:`SamPredictor3D.predict` takes all clicks so far, ``(z, y, x)`` voxel indices of that volume with
  labels 1 (lesion) / 0 (background). The **first click places the crop**: a ``P``³ cube centred on it,
  moved inside the volume on every axis at least ``P`` long (the click stays inside), centred on the volume
  on shorter axes and padded with the volume's pad value. The embedding is cached per crop, so clicks added
  in the same crop cost one decoder pass each. **Later clicks outside the crop are ignored** with a
  ``UserWarning`` and listed in :attr:`Prediction.ignored_clicks` (start again with a new first click to
  look elsewhere); a click outside the volume is an error.
* The previous low-resolution logits are fed back as the mask prompt: those of the earlier prediction, in
  the same crop, whose clicks are the longest strict prefix of the current ones (none for a first click).
  Calling ``predict`` with clicks ``[a]``, then ``[a, b]``, then ``[a, b, c]`` is exactly the evaluation's
  one-click-per-round episode; :meth:`SamPredictor3D.predict_sequential` does this for a list at once.
* The logits are upsampled to the crop (trilinear), thresholded at 0 and pasted into a ``(D, H, W)`` mask
  that is False outside the crop.

A further click costs one prompt-encoder and mask-decoder pass plus the mask: the dense positional encoding
of the embedding grid is computed once per image (not once per click), only the crop's part of the mask is
written and counted, and :meth:`SamPredictor3D.predict_sequential` builds the full-size mask of the last
click only. Outputs are bitwise those of the plain per-click ``decode_clicks`` path (docs/performance.md,
"Interactive latency").
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.data.blocks import Block
from shared.data.transforms import crop_or_pad
from shared.metrics import lesion_volume_cm3
from shared.precision import Precision
from shared.training.seg import encode_images, patch_size_of, sam_parts, upsample_logits

__all__ = ["Prediction", "SamPredictor3D"]

Click = tuple[int, int, int]


@dataclass(frozen=True)
class Prediction:
    """Result of one :meth:`SamPredictor3D.predict` call.

    ``mask`` (D, H, W) bool on the volume given to ``set_image``; ``iou`` the model's predicted IoU;
    ``crop_start`` the (z, y, x) voxel of the crop's first voxel (may be negative where padded);
    ``low_res_logits`` (1, 1, L, L, L) on the CPU; ``clicks_used`` how many clicks reached the model;
    ``ignored_clicks`` the clicks outside the crop; ``volume_cm3`` of the mask (None without a spacing).
    """

    mask: np.ndarray
    iou: float
    crop_start: Click
    low_res_logits: torch.Tensor
    clicks_used: int
    ignored_clicks: tuple[Click, ...]
    volume_cm3: float | None


class SamPredictor3D:
    """Click-to-mask inference with a cached image embedding (see the module docstring).

    Args:
        model: SAM-Med3D, plain or with an adapter (PEFT); moved to ``device`` and put in eval mode.
        patch_size: crop side P in voxels; None takes the model's input size, another value must equal it.
        device: where the model runs.
        precision: ``train.precision`` of the encoder and decoder (:mod:`shared.precision`); the low-resolution
            logits are kept in float32, so masks, IoU and volumes are float32 computations.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        patch_size: int | None = None,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
    ) -> None:
        model_patch = patch_size_of(model)
        if patch_size is not None and patch_size != model_patch:
            raise ValueError(f"patch_size = {patch_size} but the model takes {model_patch}³ crops")
        self.device = torch.device(device)
        self._precision = Precision.on(precision, self.device)
        self.model = model.to(self.device).eval()
        self.patch_size = model_patch
        #: How many times the image encoder ran since construction (one per new crop of an image).
        self.encoder_calls = 0
        self._volume: np.ndarray | None = None
        self._spacing_mm: tuple[float, float, float] | None = None
        self._pad_value = 0.0
        self._embeddings: dict[Click, torch.Tensor] = {}
        self._dense_pe: torch.Tensor | None = None
        self._logits: dict[Click, dict[tuple[tuple[Click, int], ...], torch.Tensor]] = {}

    def set_image(
        self, volume: np.ndarray, spacing_mm: Sequence[float] | None = None, *, pad_value: float = 0.0
    ) -> None:
        """Set the preprocessed volume (D, H, W) float32, its spacing (mm, z y x) and the value that pads
        crops past its edge (:attr:`shared.data.transforms.Preprocessed.pad_value`); clears every cache."""
        array = np.asarray(volume, dtype=np.float32)
        if array.ndim != 3 or 0 in array.shape:
            raise ValueError(
                f"set_image needs one non-empty volume of shape (D, H, W), got shape {array.shape}"
            )
        if spacing_mm is not None and len(spacing_mm) != 3:
            raise ValueError(f"spacing_mm must hold 3 values (z, y, x) in mm, got {tuple(spacing_mm)}")
        self._volume = array
        self._spacing_mm = None if spacing_mm is None else tuple(float(s) for s in spacing_mm)
        self._pad_value = float(pad_value)
        self._dense_pe = None  # recomputed once per image, so a model changed in between is seen
        self._embeddings.clear()
        self._logits.clear()

    def crop_start(self, first_click: Sequence[int]) -> Click:
        """The (z, y, x) start of the crop placed by ``first_click`` (module docstring)."""
        volume = self._require_image()
        start = []
        for c, length in zip(first_click, volume.shape, strict=True):
            if length >= self.patch_size:
                start.append(int(min(max(c - self.patch_size // 2, 0), length - self.patch_size)))
            else:
                start.append(-((self.patch_size - length) // 2))
        return tuple(start)

    def predict(self, clicks: Sequence[Sequence[int]], labels: Sequence[int]) -> Prediction:
        """Mask of the lesion pointed at by ``clicks`` ((z, y, x) voxel indices; the first places the crop)
        with ``labels`` (1 lesion, 0 background), as the module docstring describes."""
        start, used, ignored = self._place(clicks, labels)
        if ignored:
            warnings.warn(
                f"clicks {list(ignored)} lie outside the {self.patch_size}³ crop at {start} placed by the first "
                "click and are ignored; start a new click list to segment elsewhere",
                UserWarning,
                stacklevel=2,
            )
        low_res, iou = self._decode(start, used)
        return self._prediction(start, low_res, iou, len(used), ignored)

    def predict_sequential(self, clicks: Sequence[Sequence[int]], labels: Sequence[int]) -> Prediction:
        """Predict after each click in turn (``clicks[:1]``, ``clicks[:2]``, …) and return the last result:
        the interactive session in which the clicks were placed one at a time."""
        if len(clicks) != len(labels) or not clicks:
            raise ValueError(
                f"need at least one click and one label per click, got {len(clicks)} clicks, {len(labels)} labels"
            )
        for count in range(1, len(clicks)):  # earlier clicks: their logits are needed, not their masks
            start, used, _ = self._place(clicks[:count], labels[:count])
            self._decode(start, used)
        return self.predict(clicks, labels)

    # ------------------------------------------------------------------------------------ internals
    def _require_image(self) -> np.ndarray:
        if self._volume is None:
            raise RuntimeError("no image set: call set_image(volume, spacing_mm) before predicting")
        return self._volume

    def _place(
        self, clicks: Sequence[Sequence[int]], labels: Sequence[int]
    ) -> tuple[Click, tuple[tuple[Click, int], ...], tuple[Click, ...]]:
        """(crop start, (click, label) pairs inside the crop, clicks outside it) of a click list."""
        volume = self._require_image()
        points, point_labels = self._check_clicks(clicks, labels, volume.shape)
        start = self.crop_start(points[0])
        inside = [all(0 <= p - s < self.patch_size for p, s in zip(pt, start, strict=True)) for pt in points]
        ignored = tuple(pt for pt, ok in zip(points, inside, strict=True) if not ok)
        used = tuple((pt, lab) for pt, lab, ok in zip(points, point_labels, inside, strict=True) if ok)
        return start, used, ignored

    @staticmethod
    def _check_clicks(
        clicks: Sequence[Sequence[int]], labels: Sequence[int], shape: Sequence[int]
    ) -> tuple[list[Click], list[int]]:
        if len(clicks) == 0 or len(clicks) != len(labels):
            raise ValueError(
                f"need at least one click and one label per click, got {len(clicks)} clicks, {len(labels)} labels"
            )
        points: list[Click] = []
        for click in clicks:
            point = tuple(int(v) for v in click)
            if len(point) != 3 or not all(0 <= p < n for p, n in zip(point, shape, strict=True)):
                raise ValueError(
                    f"click {tuple(click)} is not a (z, y, x) voxel index inside the volume of shape {tuple(shape)}"
                )
            points.append(point)
        point_labels = [int(v) for v in labels]
        if any(v not in (0, 1) for v in point_labels):
            raise ValueError(f"click labels must be 1 (lesion) or 0 (background), got {list(labels)}")
        return points, point_labels

    def _embedding(self, start: Click) -> torch.Tensor:
        if start not in self._embeddings:
            crop = crop_or_pad(self._require_image(), start, self.patch_size, pad_value=self._pad_value)
            with torch.inference_mode(), self._precision.autocast():
                self._embeddings[start] = encode_images(
                    self.model, torch.from_numpy(crop)[None, None].to(self.device)
                )
            self.encoder_calls += 1
        return self._embeddings[start]

    def _decode(self, start: Click, used: tuple[tuple[Click, int], ...]) -> tuple[torch.Tensor, float]:
        history = self._logits.setdefault(start, {})
        previous = next((history[used[:n]] for n in range(len(used) - 1, 0, -1) if used[:n] in history), None)
        coords = torch.tensor(
            [[[float(v) - s for v, s in zip(pt, start, strict=True)] for pt, _ in used]], device=self.device
        )
        labels = torch.tensor([[lab for _, lab in used]], dtype=torch.int64, device=self.device)
        embedding = self._embedding(start)
        with torch.inference_mode(), self._precision.autocast():
            low_res, iou = self._run_decoder(embedding, coords, labels, previous)
        low_res, iou = low_res.float(), iou.float()
        history[used] = low_res
        return low_res, float(iou.reshape(-1)[0])

    def _run_decoder(
        self,
        embedding: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        previous: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`shared.training.seg.decode_clicks` with the image's dense positional encoding cached."""
        sam = sam_parts(self.model)
        if self._dense_pe is None:
            self._dense_pe = sam.prompt_encoder.get_dense_pe()
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=previous)
        return sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=self._dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )

    def _prediction(
        self, start: Click, low_res: torch.Tensor, iou: float, clicks_used: int, ignored: tuple[Click, ...]
    ) -> Prediction:
        volume = self._require_image()
        with torch.inference_mode():
            crop_mask = (upsample_logits(low_res, self.patch_size)[0, 0] > 0).cpu().numpy()
        mask = np.zeros(volume.shape, dtype=bool)  # pages outside the crop are never written
        inside, part = Block(start, self.patch_size, 0).overlap(volume.shape)
        visible = crop_mask[part]
        mask[inside] = visible
        # the mask is False outside the crop: count the crop's part only, not the whole volume
        volume_cm3 = None if self._spacing_mm is None else lesion_volume_cm3(visible, self._spacing_mm)
        return Prediction(mask, iou, start, low_res.detach().cpu(), clicks_used, ignored, volume_cm3)
