"""Poisson sampling of a site's cases for DP-SGD, and one sample per case for the classifier.

* :func:`poisson_sampling`: sample rate q = min(1, B / n) for an expected batch size B over n cases, and
  ceil(n / B) steps per epoch (as many as the non-private loader takes).
* :func:`poisson_loader`: every step includes each case independently with probability q (Opacus'
  ``UniformWithReplacementSampler``), for exactly ``steps_per_epoch`` steps per pass; an empty draw is yielded
  as ``[]`` (the training loops turn it into a noise-only step). Opacus' own ``DPDataLoader`` is not used: it
  derives the step count as ``int(1 / q)``, which is one short for many n (e.g. q = 1/93 gives 92), and it reads
  ``dataset[0]`` eagerly, i.e. a whole ABUS volume.
* :class:`OneFramePerCase`: the classifier's privacy unit is the case, so under DP a case contributes one
  frame-triplet per draw (a frame chosen uniformly at random each time), not its F frames.

The sampling and frame generators are seeded from the operating system's entropy unless a seed is given
(tests only): the privacy amplification of subsampling assumes the selection is secret, and the training seed
in the run config is not.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from shared.privacy.opacus_loader import load_opacus

__all__ = ["OneFramePerCase", "poisson_loader", "poisson_sampling", "secret_seed"]


def secret_seed() -> int:
    """A 63-bit seed from the operating system's entropy."""
    return secrets.randbits(63)


def poisson_sampling(n_cases: int, batch_size: int) -> tuple[float, int]:
    """(sample rate q = min(1, B / n), steps per epoch = ceil(n / B)) for n cases and expected batch size B."""
    if n_cases < 1 or batch_size < 1:
        raise ValueError(
            f"Poisson sampling needs n_cases >= 1 and batch_size >= 1, got {n_cases}, {batch_size}"
        )
    return min(1.0, batch_size / n_cases), math.ceil(n_cases / batch_size)


class _Collate:
    """Default collation of the chosen ``keys`` of mapping items (all of a tuple item); ``[]`` when empty."""

    def __init__(self, keys: Sequence[str] | None) -> None:
        self.keys = tuple(keys) if keys is not None else None

    def __call__(self, items: list[Any]) -> Any:
        if not items:
            return []
        if self.keys is not None:
            items = [{key: item[key] for key in self.keys} for item in items]
        return default_collate(items)


def poisson_loader(
    dataset: Dataset,
    *,
    sample_rate: float,
    steps_per_epoch: int,
    keys: Sequence[str] | None = None,
    seed: int | None = None,
) -> DataLoader:
    """A loader drawing ``steps_per_epoch`` Poisson batches per pass over ``dataset`` (module docstring).

    Args:
        dataset: map-style dataset of the site's cases (one item per case).
        sample_rate: probability q that a case is in a batch, in (0, 1].
        steps_per_epoch: batches per pass (iteration of the loader).
        keys: for mapping items, the keys to collate (e.g. ``("image", "mask")``; strings such as case ids
            would make empty batches fail); None collates whole items.
        seed: seed of the sampling generator; None (always in production) draws one from the OS entropy.

    Returns:
        a DataLoader (single process) whose ``batch_sampler`` is Opacus' ``UniformWithReplacementSampler``;
        batches are collated items, or ``[]`` for an empty draw.
    """
    load_opacus()
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample rate {sample_rate!r} must lie in (0, 1]")
    if steps_per_epoch < 1:
        raise ValueError(f"steps per epoch must be >= 1, got {steps_per_epoch}")
    generator = torch.Generator().manual_seed(secret_seed() if seed is None else int(seed))
    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset), sample_rate=sample_rate, generator=generator, steps=steps_per_epoch
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_Collate(keys), num_workers=0)


class OneFramePerCase(Dataset):
    """One frame-triplet per case and draw: ``lesions[i]`` holds ``planes`` (3, F, S, S) and ``label``;
    item i is ``(frames (3, 1, S, S) float32, label () int64)`` of a frame chosen uniformly at random."""

    def __init__(self, lesions: Dataset, *, seed: int | None = None) -> None:
        self.lesions = lesions
        self._rng = np.random.default_rng(secret_seed() if seed is None else seed)

    def __len__(self) -> int:
        return len(self.lesions)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.lesions[index]
        if not isinstance(item, Mapping) or "planes" not in item or "label" not in item:
            raise KeyError(f"case {index}: a classifier item needs 'planes' (3, F, S, S) and 'label'")
        planes = torch.as_tensor(item["planes"])
        if planes.ndim != 4 or planes.shape[1] < 1:
            raise ValueError(f"case {index}: planes of shape {tuple(planes.shape)}; expected (3, F, S, S)")
        frame = int(self._rng.integers(planes.shape[1]))
        frames = planes[:, frame : frame + 1].to(torch.float32)
        return frames, torch.as_tensor(item["label"], dtype=torch.int64).reshape(())
