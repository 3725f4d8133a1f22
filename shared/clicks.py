"""Simulated radiologist clicks for SAM-Med3D, shared by training and evaluation (seed 000).

The first click is a random voxel inside the lesion. Each corrective round compares the current prediction
with the ground truth, takes the union of the false-negative (missed) and false-positive (wrongly included)
voxels, and picks one random voxel from every 2D slice of that union that is not empty: a positive click
(label 1) where the lesion was missed, a negative click (label 0) where background was included. A session
accumulates clicks up to a total cap (11 in seed 000); a cap per round is optional.

Coordinates are integer voxel indices in array order ``(z, y, x) = (D, H, W)`` of one volume, i.e. of the
``(B, 1, D, H, W)`` tensor fed to SAM-Med3D without the batch and channel axes. Randomness comes only from the
``numpy.random.Generator`` (or integer seed) the caller passes: the same seed gives the same clicks.

Feeding the previous low-resolution logits back as the mask prompt belongs to the model loop; the
``predict`` callable given to :func:`simulate_clicks` keeps them between rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from shared.metrics import as_binary_mask, dice

__all__ = [
    "DEFAULT_MAX_TOTAL_CLICKS",
    "PAD_LABEL",
    "ClickEpisode",
    "ClickSession",
    "as_generator",
    "corrective_clicks",
    "first_click",
    "simulate_clicks",
]

#: Total clicks per case in seed 000 (the first click plus corrective ones).
DEFAULT_MAX_TOTAL_CLICKS = 11
#: Label of padding points when the cases of a batch have different click counts; SAM's prompt encoder
#: embeds label -1 as "not a point" (``not_a_point_embed``).
PAD_LABEL = -1


def as_generator(rng: np.random.Generator | int) -> np.random.Generator:
    """Return ``rng`` itself, or ``numpy.random.default_rng(rng)`` for an integer seed.

    None is refused: clicks must be reproducible, so the caller chooses the seed.
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, int | np.integer) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy.random.Generator or an int seed, got {type(rng).__name__}")


def _volume(mask: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    array = as_binary_mask(mask, name=name)
    if array.ndim != 3:
        raise ValueError(f"{name} must be one volume of shape (D, H, W), got shape {array.shape}")
    return array


def _empty_clicks() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 3), dtype=np.int64), np.zeros((0,), dtype=np.int64)


def first_click(
    gt_mask: np.ndarray | torch.Tensor, rng: np.random.Generator | int
) -> tuple[np.ndarray, np.ndarray]:
    """One positive click at a uniformly random voxel of the lesion.

    ``gt_mask`` is a binary volume ``(D, H, W)``. Returns points ``(1, 3)`` int64 voxel indices ``(z, y, x)``
    and labels ``(1,)`` int64 equal to 1. Raises ValueError when the mask has no lesion voxel.
    """
    gt = _volume(gt_mask, "gt_mask")
    flat = np.flatnonzero(gt)
    if flat.size == 0:
        raise ValueError("gt_mask has no lesion voxel: the first click needs a lesion to click in")
    index = flat[as_generator(rng).integers(flat.size)]
    point = np.array(np.unravel_index(index, gt.shape), dtype=np.int64).reshape(1, 3)
    return point, np.ones((1,), dtype=np.int64)


def _one_point_per_slice(region: np.ndarray, slice_axis: int, rng: np.random.Generator) -> np.ndarray:
    """One uniformly random voxel from each non-empty slice of ``region`` along ``slice_axis``, shape (K, 3).

    Vectorised: the voxels of the slice-first view are listed in slice order, so each slice's voxels form one
    run; a random offset inside each run picks the voxel. Points come out sorted by slice index.
    """
    view = np.moveaxis(region, slice_axis, 0)
    flat = np.flatnonzero(view)
    counts = np.bincount(flat // (view[0].size or 1), minlength=view.shape[0])
    counts = counts[counts > 0]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    chosen = flat[starts + rng.integers(0, counts)]
    coords_view = np.stack(np.unravel_index(chosen, view.shape), axis=1)
    view_axes = [slice_axis] + [axis for axis in range(3) if axis != slice_axis]
    return coords_view[:, [view_axes.index(axis) for axis in range(3)]].astype(np.int64)


def corrective_clicks(
    pred_mask: np.ndarray | torch.Tensor,
    gt_mask: np.ndarray | torch.Tensor,
    rng: np.random.Generator | int,
    *,
    max_clicks: int | None = None,
    slice_axis: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Corrective clicks for one volume: one random voxel per non-empty slice of the FN ∪ FP region.

    ``pred_mask`` and ``gt_mask`` are binary volumes ``(D, H, W)``. FN = ``gt & ~pred`` (missed lesion,
    label 1) and FP = ``pred & ~gt`` (wrongly included, label 0). Slices are taken along ``slice_axis``
    (0: the D axis). When more than ``max_clicks`` slices qualify, a random subset of ``max_clicks`` of them
    is kept (in slice order). Returns points ``(K, 3)`` int64 voxel indices ``(z, y, x)`` and labels ``(K,)``
    int64; both empty when the prediction equals the ground truth or ``max_clicks`` is 0.
    """
    pred = _volume(pred_mask, "pred_mask")
    gt = _volume(gt_mask, "gt_mask")
    if pred.shape != gt.shape:
        raise ValueError(f"pred_mask shape {pred.shape} differs from gt_mask shape {gt.shape}")
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2 (axis of the (D, H, W) volume), got {slice_axis}")
    if max_clicks is not None and max_clicks < 0:
        raise ValueError(f"max_clicks must be >= 0 or None, got {max_clicks}")
    error = pred != gt  # == FN | FP, which are disjoint
    if max_clicks == 0 or not error.any():
        return _empty_clicks()
    generator = as_generator(rng)
    points = _one_point_per_slice(error, slice_axis, generator)
    if max_clicks is not None and len(points) > max_clicks:
        points = points[np.sort(generator.choice(len(points), size=max_clicks, replace=False))]
    labels = gt[points[:, 0], points[:, 1], points[:, 2]].astype(np.int64)
    return points, labels


class ClickSession:
    """The cumulative clicks of a batch of cases during one interactive episode.

    ``gt_masks`` is the ground truth ``(B, 1, D, H, W)`` (torch or numpy, bool or 0/1). Call :meth:`step`
    without a prediction for the first click of every case, then with each new prediction for the
    corrective clicks; each call returns the cumulative prompts. A case never gets more than
    ``max_total_clicks`` clicks; ``max_clicks_per_step`` (None: unlimited) caps the clicks one corrective
    round adds per case. Cases are served in batch order from one generator, so a seed fixes the episode.
    """

    def __init__(
        self,
        gt_masks: np.ndarray | torch.Tensor,
        rng: np.random.Generator | int,
        *,
        max_total_clicks: int = DEFAULT_MAX_TOTAL_CLICKS,
        max_clicks_per_step: int | None = None,
        slice_axis: int = 0,
    ) -> None:
        gt = as_binary_mask(gt_masks, name="gt_masks")
        if gt.ndim != 5 or gt.shape[1] != 1:
            raise ValueError(f"gt_masks must have shape (B, 1, D, H, W), got {gt.shape}")
        if max_total_clicks < 1:
            raise ValueError(f"max_total_clicks must be >= 1 (the first click), got {max_total_clicks}")
        if max_clicks_per_step is not None and max_clicks_per_step < 0:
            raise ValueError(f"max_clicks_per_step must be >= 0 or None, got {max_clicks_per_step}")
        self._gt = gt[:, 0]
        self._rng = as_generator(rng)
        self.max_total_clicks = max_total_clicks
        self.max_clicks_per_step = max_clicks_per_step
        self.slice_axis = slice_axis
        self._points: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    @property
    def batch_size(self) -> int:
        """Number of cases B."""
        return int(self._gt.shape[0])

    @property
    def gt_masks(self) -> np.ndarray:
        """Ground truth as bool ``(B, D, H, W)`` (read-only view)."""
        view = self._gt.view()
        view.flags.writeable = False
        return view

    @property
    def n_clicks(self) -> list[int]:
        """Clicks so far per case (0 before the first step)."""
        return [len(labels) for labels in self._labels] or [0] * self.batch_size

    def step(self, pred_masks: np.ndarray | torch.Tensor | None = None) -> list[int]:
        """Add clicks: first clicks when ``pred_masks`` is None, else corrective clicks; return clicks added.

        ``pred_masks`` is the current binary prediction ``(B, 1, D, H, W)``; it is required after the first
        step and refused before it. The return value holds the number of clicks added per case (0 when the
        prediction is exact or the case already has ``max_total_clicks``).
        """
        if not self._labels:
            if pred_masks is not None:
                raise ValueError("the first step places the first clicks: call step() without pred_masks")
            for gt in self._gt:
                points, labels = first_click(gt, self._rng)
                self._points.append(points)
                self._labels.append(labels)
            return [1] * self.batch_size
        if pred_masks is None:
            raise ValueError("after the first step, step() needs the current prediction pred_masks")
        return self._add_corrective(pred_masks)

    def _add_corrective(self, pred_masks: np.ndarray | torch.Tensor) -> list[int]:
        pred = as_binary_mask(pred_masks, name="pred_masks")
        if pred.shape[0] != self.batch_size or pred.shape[1:] != (1, *self._gt.shape[1:]):
            raise ValueError(
                f"pred_masks shape {pred.shape} must be {(self.batch_size, 1, *self._gt.shape[1:])}"
            )
        added = []
        for case, gt in enumerate(self._gt):
            budget = self.max_total_clicks - len(self._labels[case])
            if self.max_clicks_per_step is not None:
                budget = min(budget, self.max_clicks_per_step)
            points, labels = corrective_clicks(
                pred[case, 0], gt, self._rng, max_clicks=budget, slice_axis=self.slice_axis
            )
            self._points[case] = np.concatenate([self._points[case], points])
            self._labels[case] = np.concatenate([self._labels[case], labels])
            added.append(len(labels))
        return added

    def points(self, case: int) -> tuple[np.ndarray, np.ndarray]:
        """Clicks of one case so far: points ``(N, 3)`` int64 voxel indices ``(z, y, x)``, labels ``(N,)``."""
        if not self._labels:
            return _empty_clicks()
        return self._points[case].copy(), self._labels[case].copy()

    def prompts(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cumulative clicks as SAM-Med3D prompts: coords ``(B, N, 3)`` float32, labels ``(B, N)`` int64.

        Coordinates are voxel indices ``(z, y, x)`` of the ``(B, 1, D, H, W)`` input; N is the largest click
        count in the batch, and shorter cases are padded with point (0, 0, 0) and label :data:`PAD_LABEL`.
        """
        if not self._labels:
            raise ValueError("no clicks yet: call step() first")
        n = max(len(labels) for labels in self._labels)
        coords = np.zeros((self.batch_size, n, 3), dtype=np.float32)
        labels = np.full((self.batch_size, n), PAD_LABEL, dtype=np.int64)
        for case, (case_points, case_labels) in enumerate(zip(self._points, self._labels, strict=True)):
            coords[case, : len(case_labels)] = case_points
            labels[case, : len(case_labels)] = case_labels
        return torch.from_numpy(coords).to(device), torch.from_numpy(labels).to(device)


#: ``predict(coords (B, N, 3) float32, labels (B, N) int64) -> binary mask (B, 1, D, H, W)``.
PredictFn = Callable[[torch.Tensor, torch.Tensor], "np.ndarray | torch.Tensor"]


@dataclass(frozen=True)
class ClickEpisode:
    """Outcome of :func:`simulate_clicks`.

    ``dice_curves[b][r]`` is case b's Dice after round r + 1 (all cases have the same number of rounds);
    ``n_clicks[b]`` its final click count; ``final_masks`` the last prediction ``(B, 1, D, H, W)`` bool.
    """

    dice_curves: list[list[float]]
    n_clicks: list[int]
    final_masks: np.ndarray


def simulate_clicks(
    predict: PredictFn,
    gt_masks: np.ndarray | torch.Tensor,
    rng: np.random.Generator | int,
    *,
    max_rounds: int = DEFAULT_MAX_TOTAL_CLICKS,
    max_total_clicks: int = DEFAULT_MAX_TOTAL_CLICKS,
    max_clicks_per_step: int | None = None,
    slice_axis: int = 0,
    device: torch.device | str | None = None,
) -> ClickEpisode:
    """Run an interactive episode: first click, predict, corrective clicks, predict, ... and record Dice.

    ``predict`` receives the cumulative prompts (on ``device``) and returns a binary mask
    ``(B, 1, D, H, W)``; it keeps the previous low-resolution logits itself to feed them back as the mask
    prompt. The episode stops after ``max_rounds`` predictions, or earlier when a round adds no click to any
    case (every prediction exact, or every click budget spent); :func:`shared.metrics.dice_vs_clicks` carries
    the last Dice forward for such cases.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    session = ClickSession(
        gt_masks,
        rng,
        max_total_clicks=max_total_clicks,
        max_clicks_per_step=max_clicks_per_step,
        slice_axis=slice_axis,
    )
    session.step()
    curves: list[list[float]] = [[] for _ in range(session.batch_size)]
    for round_index in range(max_rounds):
        pred = as_binary_mask(predict(*session.prompts(device)), name="predict() output")
        for case, curve in enumerate(curves):
            curve.append(dice(pred[case, 0], session.gt_masks[case]))
        if round_index + 1 == max_rounds or not any(session.step(pred)):
            break
    return ClickEpisode(dice_curves=curves, n_clicks=session.n_clicks, final_masks=pred)
