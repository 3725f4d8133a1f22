"""Tests of shared.clicks: every simulated click lies where it should, with the right label, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.clicks import (
    PAD_LABEL,
    ClickSession,
    as_generator,
    corrective_clicks,
    first_click,
    simulate_clicks,
)


def _blob_pair(seed: int, shape: tuple[int, int, int] = (20, 18, 16)) -> tuple[np.ndarray, np.ndarray]:
    """A ground-truth box and a prediction that is the box shifted, grown and sprinkled with noise."""
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, dtype=bool)
    gt[4:14, 5:13, 3:12] = True
    pred = np.roll(gt, shift=(2, -1, 1), axis=(0, 1, 2))
    pred ^= rng.random(shape) < 0.02
    return pred, gt


def _check_clicks(points: np.ndarray, labels: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> None:
    fn = gt & ~pred
    fp = pred & ~gt
    assert points.dtype == np.int64 and labels.dtype == np.int64
    assert points.shape == (len(labels), 3)
    for (z, y, x), label in zip(points, labels, strict=True):
        assert fn[z, y, x] or fp[z, y, x], f"click {(z, y, x)} outside FN and FP"
        assert label == (1 if fn[z, y, x] else 0), f"click {(z, y, x)} has label {label}"


# ------------------------------------------------------------------------------------------- first click
@pytest.mark.parametrize("seed", range(5))
def test_first_click_is_inside_the_lesion_with_label_one(seed: int) -> None:
    _, gt = _blob_pair(seed)
    points, labels = first_click(gt, seed)
    assert points.shape == (1, 3) and points.dtype == np.int64
    assert labels.tolist() == [1]
    assert gt[tuple(points[0])]


def test_first_click_is_deterministic_per_seed_and_varies_between_seeds() -> None:
    _, gt = _blob_pair(0)
    assert np.array_equal(first_click(gt, 7)[0], first_click(gt, 7)[0])
    assert len({tuple(first_click(gt, seed)[0][0]) for seed in range(20)}) > 1


def test_first_click_accepts_torch_and_refuses_an_empty_lesion() -> None:
    _, gt = _blob_pair(0)
    assert np.array_equal(first_click(torch.from_numpy(gt), 3)[0], first_click(gt, 3)[0])
    with pytest.raises(ValueError, match="no lesion voxel"):
        first_click(np.zeros((4, 4, 4), dtype=bool), 0)


def test_rng_must_be_explicit() -> None:
    with pytest.raises(TypeError, match="Generator or an int seed"):
        as_generator(None)  # type: ignore[arg-type]
    generator = np.random.default_rng(1)
    assert as_generator(generator) is generator


# ------------------------------------------------------------------------------------------- corrective clicks
@pytest.mark.parametrize("slice_axis", [0, 1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_corrective_clicks_one_per_nonempty_slice_inside_fp_fn(slice_axis: int, seed: int) -> None:
    pred, gt = _blob_pair(seed)
    points, labels = corrective_clicks(pred, gt, seed, slice_axis=slice_axis)
    _check_clicks(points, labels, pred, gt)
    error = pred != gt
    nonempty = np.flatnonzero(error.any(axis=tuple(a for a in range(3) if a != slice_axis)))
    assert sorted(points[:, slice_axis].tolist()) == nonempty.tolist()
    assert set(labels.tolist()) == {0, 1}


def test_corrective_clicks_labels_follow_missed_and_wrongly_included_regions() -> None:
    gt = np.zeros((6, 8, 8), dtype=bool)
    gt[1:3, 2:6, 2:6] = True  # slices 1-2: missed entirely
    pred = np.zeros_like(gt)
    pred[4, 0:2, 0:2] = True  # slice 4: wrongly included
    points, labels = corrective_clicks(pred, gt, 0)
    assert points[:, 0].tolist() == [1, 2, 4]
    assert labels.tolist() == [1, 1, 0]
    _check_clicks(points, labels, pred, gt)


def test_corrective_clicks_cap_keeps_a_valid_random_subset() -> None:
    pred, gt = _blob_pair(1)
    all_points, _ = corrective_clicks(pred, gt, 0)
    assert len(all_points) > 5
    subsets = set()
    for seed in range(10):
        points, labels = corrective_clicks(pred, gt, seed, max_clicks=5)
        assert len(points) == 5
        _check_clicks(points, labels, pred, gt)
        assert len(set(points[:, 0].tolist())) == 5  # still at most one per slice
        subsets.add(tuple(points[:, 0].tolist()))
    assert len(subsets) > 1
    assert corrective_clicks(pred, gt, 0, max_clicks=0)[0].shape == (0, 3)
    assert len(corrective_clicks(pred, gt, 0, max_clicks=10_000)[0]) == len(all_points)


def test_corrective_clicks_are_deterministic_per_seed() -> None:
    pred, gt = _blob_pair(2)
    first = corrective_clicks(pred, gt, np.random.default_rng(11), max_clicks=4)
    second = corrective_clicks(pred, gt, np.random.default_rng(11), max_clicks=4)
    other = corrective_clicks(pred, gt, np.random.default_rng(12), max_clicks=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_corrective_clicks_reach_every_voxel_of_a_slice() -> None:
    gt = np.zeros((3, 4, 4), dtype=bool)
    pred = np.zeros_like(gt)
    pred[1, 0, 0] = pred[1, 3, 3] = pred[1, 0, 3] = True
    chosen = {tuple(corrective_clicks(pred, gt, seed)[0][0]) for seed in range(60)}
    assert chosen == {(1, 0, 0), (1, 3, 3), (1, 0, 3)}


def test_corrective_clicks_empty_when_prediction_is_exact() -> None:
    _, gt = _blob_pair(0)
    points, labels = corrective_clicks(gt.copy(), gt, 0)
    assert points.shape == (0, 3) and labels.shape == (0,)
    assert points.dtype == np.int64 and labels.dtype == np.int64


def test_corrective_clicks_accept_torch_and_0_1_ints_but_refuse_probabilities() -> None:
    pred, gt = _blob_pair(3)
    expected = corrective_clicks(pred, gt, 5)
    got = corrective_clicks(torch.from_numpy(pred.astype(np.uint8)), torch.from_numpy(gt).float(), 5)
    assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))
    with pytest.raises(ValueError, match="pred_mask: expected only values 0 and 1"):
        corrective_clicks(pred * 0.7, gt, 0)
    with pytest.raises(ValueError, match="differs from gt_mask shape"):
        corrective_clicks(pred[:-1], gt, 0)
    with pytest.raises(ValueError, match="slice_axis"):
        corrective_clicks(pred, gt, 0, slice_axis=3)


def test_corrective_clicks_on_a_128_cube() -> None:
    gt = np.zeros((128, 128, 128), dtype=bool)
    gt[20:100, 30:110, 25:90] = True
    pred = np.roll(gt, 7, axis=2)
    points, labels = corrective_clicks(pred, gt, 0)
    assert len(points) == 80  # slices 20..99 along D
    _check_clicks(points, labels, pred, gt)


# ------------------------------------------------------------------------------------------- session
def _batch(*volumes: np.ndarray) -> np.ndarray:
    return np.stack(volumes)[:, None]


def test_session_accumulates_up_to_the_total_cap() -> None:
    _, gt = _blob_pair(0)
    empty = np.zeros_like(gt)
    session = ClickSession(torch.from_numpy(_batch(gt, gt)), 3, max_total_clicks=11)
    assert session.step() == [1, 1]
    previous = session.points(0)
    added = session.step(_batch(empty, gt))
    assert added == [10, 0]  # the empty prediction misses 10 slices; the exact one needs nothing
    assert session.n_clicks == [11, 1]
    points, labels = session.points(0)
    assert np.array_equal(points[:1], previous[0])  # earlier clicks are kept, in order
    _check_clicks(points[1:], labels[1:], empty, gt)
    assert session.step(_batch(empty, empty)) == [0, 10]  # case 0 has spent its budget
    assert session.n_clicks == [11, 11]


def test_session_per_step_cap_and_prompt_format() -> None:
    pred, gt = _blob_pair(4)
    session = ClickSession(_batch(gt, gt), np.random.default_rng(0), max_clicks_per_step=2)
    session.step()
    session.step(_batch(pred, gt))
    coords, labels = session.prompts()
    assert coords.dtype == torch.float32 and labels.dtype == torch.int64
    assert coords.shape == (2, 3, 3) and labels.shape == (2, 3)
    assert labels[1].tolist() == [1, PAD_LABEL, PAD_LABEL]
    assert coords[1, 1:].abs().sum() == 0
    points, case_labels = session.points(0)
    assert torch.equal(coords[0], torch.from_numpy(points).float())
    assert torch.equal(labels[0], torch.from_numpy(case_labels))
    _check_clicks(points[1:], case_labels[1:], pred, gt)


def test_session_is_deterministic_per_seed() -> None:
    pred, gt = _blob_pair(5)

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        session = ClickSession(_batch(gt, gt), seed, max_clicks_per_step=3)
        session.step()
        session.step(_batch(pred, pred))
        return session.prompts()

    assert all(torch.equal(a, b) for a, b in zip(run(1), run(1), strict=True))
    assert not torch.equal(run(1)[0], run(2)[0])


def test_session_refuses_misuse() -> None:
    _, gt = _blob_pair(0)
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        ClickSession(gt, 0)
    session = ClickSession(_batch(gt), 0)
    with pytest.raises(ValueError, match="no clicks yet"):
        session.prompts()
    with pytest.raises(ValueError, match="without pred_masks"):
        session.step(_batch(gt))
    session.step()
    with pytest.raises(ValueError, match="needs the current prediction"):
        session.step()
    with pytest.raises(ValueError, match="must be"):
        session.step(_batch(gt, gt))


def test_simulate_clicks_records_dice_per_round_and_stops_when_exact() -> None:
    pred, gt = _blob_pair(6)
    seen: list[int] = []

    def predict(coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(int((labels != PAD_LABEL).sum()))
        return torch.from_numpy(_batch(pred if len(seen) == 1 else gt))

    episode = simulate_clicks(predict, _batch(gt), 0, max_rounds=11, max_clicks_per_step=3)
    assert seen == [1, 4]  # first click, then three corrective clicks; exact after round 2
    assert len(episode.dice_curves[0]) == 2
    assert 0.0 < episode.dice_curves[0][0] < 1.0 and episode.dice_curves[0][1] == 1.0
    assert episode.n_clicks == [4]
    assert np.array_equal(episode.final_masks[0, 0], gt)


def test_simulate_clicks_stops_at_max_rounds() -> None:
    _, gt = _blob_pair(7)
    empty = torch.zeros((1, 1, *gt.shape), dtype=torch.bool)
    episode = simulate_clicks(lambda c, lab: empty, _batch(gt), 0, max_rounds=3, max_clicks_per_step=1)
    assert episode.dice_curves == [[0.0, 0.0, 0.0]]
    assert episode.n_clicks == [3]
