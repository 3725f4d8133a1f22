"""One synthetic ABUS-like case (:func:`generate_case`): breast tissue, one lesion (occasionally two), scanner.

Each case is one breast volume in the canonical orientation of :mod:`shared.data.transforms` — array axes
(z, y, x) = (sweep, depth from the skin, lateral) — with its lesion mask:

* **tissue**: no-contact gap above the skin (exact zeros), bright skin line, hypoechoic subcutaneous fat with
  lobular texture, hyperechoic heterogeneous fibroglandular layer with fat islands, retromammary fat and a
  striated pectoral muscle; layer boundaries undulate smoothly across the sweep and lateral axes;
* **ultrasound physics**: fully developed speckle (the envelope of a correlated complex Gaussian field, hence
  Rayleigh amplitudes) with a per-site correlation size in mm, depth attenuation (dB/mm), electronic noise,
  log compression to uint8 with a per-site gain and dynamic range;
* **malignant lesions** (label 1): more often taller-than-wide, angular/microlobulated, rough or spiculated
  margins, blurred edges and an echogenic halo, darker and heterogeneous inside, microcalcifications,
  frequently posterior acoustic shadowing;
* **benign lesions** (label 0): oval, wider-than-tall (parallel to the skin), circumscribed, sometimes a thin
  echogenic capsule, homogeneous; a quarter are anechoic cysts; posterior enhancement is common.

Every feature is drawn from overlapping benign/malignant distributions (``SynthOptions.class_separation``
scales the gap), so the classes are learnable but not trivially separable. Lesion volumes follow a shifted
log-normal skewed small like seed 000 (Tables 2/3: min 1.64, median 3.39, mean 6.99 cm³, 62 % under 5 cm³),
scaled to the small field of view (median ``lesion_median_cm3``, 0.7 cm³ by default) and redrawn until they
fit it. BI-RADS-like categories (3, 4A, 4B, 4C, 5, 6) follow a
suspicion score built from the drawn features, so they correlate with the label (benign never above 4C).

How sites differ (:class:`SiteStyle`) and how cases become site folders: :mod:`shared.data.synth`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = [
    "BIRADS_CATEGORIES",
    "SiteStyle",
    "SynthCase",
    "SynthOptions",
    "generate_case",
    "rng_for",
]

#: BI-RADS-like categories written in the manifest's ``birads`` column.
BIRADS_CATEGORIES = ("3", "4A", "4B", "4C", "5", "6")
#: Purposes that keep the random streams independent (``SeedSequence([seed, purpose, site, case])``).
SITE_STREAM, CASE_STREAM, LABEL_STREAM, SPLIT_STREAM = 1, 2, 3, 4


@dataclass(frozen=True)
class SynthOptions:
    """Consortium-wide knobs (docs/data.md, "Synthetic consortium").

    ``shape`` (D, H, W) voxels = (sweep, depth, lateral); lesion volume: a log-normal shifted so that its
    minimum is ``lesion_min_ratio`` × its median ``lesion_median_cm3``, log-σ ``lesion_sigma`` (fitted to seed
    000), redrawn when larger than the largest lesion that fits the field of view; ``class_separation`` scales
    every benign/malignant difference (0: none, 1: default);
    ``second_lesion_prob``: chance of a second, smaller lesion in the same case; ``split_fractions``: train/val/
    test per class, at least ``min_test_per_class`` test cases per class when a class has 3 cases or more.
    """

    shape: tuple[int, int, int] = (64, 96, 96)
    lesion_median_cm3: float = 0.7
    lesion_sigma: float = 1.5
    lesion_min_ratio: float = 0.48
    class_separation: float = 1.0
    second_lesion_prob: float = 0.08
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    min_test_per_class: int = 2

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 24:
            raise ValueError(f"synth: shape {self.shape} must be 3 sizes (D, H, W) of at least 24 voxels")
        if self.lesion_median_cm3 <= 0 or self.lesion_sigma < 0 or not 0 < self.lesion_min_ratio <= 1:
            raise ValueError(
                "synth: lesion_median_cm3 > 0, lesion_sigma >= 0 and 0 < lesion_min_ratio <= 1 needed"
            )
        if self.class_separation < 0 or not 0 <= self.second_lesion_prob <= 1:
            raise ValueError("synth: class_separation >= 0 and 0 <= second_lesion_prob <= 1 needed")
        if len(self.split_fractions) != 3 or min(self.split_fractions) < 0 or sum(self.split_fractions) <= 0:
            raise ValueError(f"synth: split_fractions {self.split_fractions} must be 3 non-negative numbers")


@dataclass(frozen=True)
class SiteStyle:
    """One site's scanner and population (the domain shift between sites).

    ``spacing_mm`` and ``speckle_mm`` (speckle correlation length) are (z, y, x); ``orientation`` is the DICOM
    code the files are stored in (``LPS`` = canonical); ``gain_db`` shifts brightness, ``dynamic_range_db``
    sets the log-compression contrast; ``attenuation_db_per_mm`` is the depth loss left after TGC; ``noise``
    the electronic noise amplitude relative to fat; ``malignant_fraction`` the share of malignant cases.
    """

    name: str
    layout: str
    orientation: str
    spacing_mm: tuple[float, float, float]
    gain_db: float
    dynamic_range_db: float
    speckle_mm: tuple[float, float, float]
    attenuation_db_per_mm: float
    noise: float
    malignant_fraction: float


@dataclass(frozen=True)
class SynthCase:
    """One generated case: ``image`` (D, H, W) uint8 and ``mask`` (D, H, W) uint8 0/1 in canonical orientation,
    ``spacing_mm`` (z, y, x), ``label`` (1 malignant), ``birads`` and ``features`` (the drawn truth)."""

    image: np.ndarray
    mask: np.ndarray
    spacing_mm: tuple[float, float, float]
    label: int
    birads: str
    features: dict[str, float] = field(default_factory=dict)


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """The random stream of ``seed`` and ``keys`` (a purpose above, then site and case numbers)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *keys]))


# ---------------------------------------------------------------- random fields


def _field(shape: Sequence[int], sigma_vox: Sequence[float] | float, rng: np.random.Generator) -> np.ndarray:
    """A smooth Gaussian random field of ``shape``, zero mean and unit standard deviation (float32).

    Fields smoother than 3 voxels are drawn on a grid twice as coarse and interpolated (same look, 1/8 work).
    """
    shape = tuple(int(n) for n in shape)
    sigma = np.broadcast_to(np.asarray(sigma_vox, dtype=float), (len(shape),))
    coarse = len(shape) == 3 and sigma.min() >= 3.0 and min(shape) >= 8
    grid = tuple(math.ceil(n / 2) for n in shape) if coarse else shape
    noise = rng.standard_normal(grid, dtype=np.float32)
    smooth = ndimage.gaussian_filter(noise, sigma / 2 if coarse else sigma, mode="reflect", truncate=3.0)
    if coarse:
        smooth = ndimage.zoom(
            smooth, [n / g for n, g in zip(shape, grid, strict=True)], order=1, mode="nearest", grid_mode=True
        )
    return (smooth - smooth.mean()) / max(float(smooth.std()), 1e-6)


# ---------------------------------------------------------------- tissue


@dataclass(frozen=True)
class _Layers:
    """Depths (mm) of the layer boundaries per (z, x) column, each (D, W) float32."""

    skin_top: np.ndarray
    fat_top: np.ndarray
    gland_top: np.ndarray
    gland_bottom: np.ndarray
    muscle_top: np.ndarray


def _layers(shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator) -> _Layers:
    """Layer boundaries that undulate over about 6 mm along the sweep and lateral axes; towards the lateral
    edges the skin may curve away from the transducer (no contact: zeros)."""
    columns = (shape[0], shape[2])
    sigma = (6.0 / spacing[0], 6.0 / spacing[2])

    def thickness(low: float, high: float, wobble: float, least: float) -> np.ndarray:
        return np.maximum(least, rng.uniform(low, high) + wobble * _field(columns, sigma, rng))

    lateral = np.abs(np.linspace(-1.0, 1.0, shape[2], dtype=np.float32))[None, :]
    no_contact = rng.uniform(0.0, 15.0) * np.maximum(0.0, lateral - 0.6) ** 2
    skin_top = thickness(0.3, 1.5, 0.3, 0.0) + no_contact
    fat_top = skin_top + rng.uniform(1.2, 2.2)
    gland_top = fat_top + thickness(3.0, 8.0, 1.2, 1.5)
    gland_bottom = gland_top + thickness(14.0, 24.0, 2.5, 6.0)
    muscle_top = gland_bottom + rng.uniform(1.5, 3.5)
    surfaces = (skin_top, fat_top, gland_top, gland_bottom, muscle_top)
    return _Layers(*(np.asarray(a, dtype=np.float32) for a in surfaces))


def _tissue(
    shape: Sequence[int], spacing: Sequence[float], layers: _Layers, rng: np.random.Generator
) -> np.ndarray:
    """Mean echo amplitude (fat ≈ 1) of the breast without lesion, (D, H, W) float32; 0 above the skin."""
    depth = (np.arange(shape[1], dtype=np.float32) * spacing[1])[None, :, None]

    def below(surface: np.ndarray) -> np.ndarray:
        return depth >= surface[:, None, :]

    texture = _field(shape, [1.5 / s for s in spacing], rng)  # fat lobules and gland texture
    islands = _field(shape, [2.5 / s for s in spacing], rng) > 1.0  # fat islands inside the gland
    fat = rng.uniform(0.8, 1.0) * np.exp(0.25 * texture)
    gland = np.where(islands, fat, rng.uniform(1.5, 2.1) * np.exp(0.35 * texture))
    period = rng.uniform(1.2, 2.0)
    wobble = 0.8 * _field((shape[0], shape[2]), [3.0 / spacing[0], 3.0 / spacing[2]], rng)[:, None, :]
    muscle = 1.3 * (1.0 + 0.35 * np.sin(2 * np.pi * depth / period + wobble))
    echo = np.zeros(tuple(shape), dtype=np.float32)
    echo = np.where(below(layers.skin_top), rng.uniform(2.2, 3.0), echo)
    echo = np.where(below(layers.fat_top), fat, echo)
    echo = np.where(below(layers.gland_top), gland, echo)
    echo = np.where(below(layers.gland_bottom), fat, echo)
    echo = np.where(below(layers.muscle_top), muscle, echo)
    return echo.astype(np.float32)


# ---------------------------------------------------------------- lesion features


def _benign_or(label: int, benign: float, malignant: float, separation: float) -> float:
    """A feature value: ``benign`` for benign cases, moved ``separation`` of the way to ``malignant``."""
    return benign + label * separation * (malignant - benign)


def _lesion_features(label: int, rng: np.random.Generator, separation: float) -> dict[str, float]:
    """Draw the shape and echo features of one lesion (overlapping class distributions)."""
    s = separation
    cyst = float(label == 0 and rng.uniform() < 0.25)
    spiculated = float(rng.uniform() < _benign_or(label, 0.05, 0.75, s))
    aspect = rng.normal(_benign_or(label, 0.7, 0.95, s), _benign_or(label, 0.15, 0.25, s))
    echo = rng.uniform(0.05, 0.15) if cyst else rng.uniform(0.35, _benign_or(label, 0.9, 0.7, s))
    heterogeneity = 0.02 if cyst else rng.uniform(0.05, 0.25) + label * s * rng.uniform(0.0, 0.35)
    calcified = rng.uniform() < _benign_or(label, 0.04, 0.3, s)
    return {
        "cyst": cyst,
        "aspect": float(np.clip(aspect, 0.4, 1.8)),
        "elongation": float(rng.uniform(0.8, 1.3)),
        "tilt_deg": float(rng.normal(0.0, _benign_or(label, 8.0, 22.0, s))),
        "lobes": float(rng.integers(0, 4) + label * round(s * rng.integers(0, 4))),
        "lobe_sharpness": float(rng.uniform(3.0, 8.0) + label * s * rng.uniform(0.0, 12.0)),
        "spicules": spiculated * float(rng.integers(6, 17)),
        "roughness": float(rng.uniform(0.0, 0.08) + label * s * rng.uniform(0.0, 0.14)),
        "echo": float(echo),
        "heterogeneity": float(heterogeneity),
        "blur_mm": float(rng.uniform(0.1, 0.4) + label * s * rng.uniform(0.0, 0.8)),
        "halo": float(rng.uniform(0.3, 0.8)) if rng.uniform() < _benign_or(label, 0.03, 0.4, s) else 0.0,
        "capsule": float(rng.uniform(0.3, 0.7)) if rng.uniform() < _benign_or(label, 0.4, 0.05, s) else 0.0,
        "posterior_per_mm": _posterior(label, cyst, rng, s),
        "calcifications": float(rng.integers(3, 13)) if calcified else 0.0,
    }


def _posterior(label: int, cyst: float, rng: np.random.Generator, separation: float) -> float:
    """Extra attenuation inside the lesion (1/mm): > 0 casts a shadow, < 0 gives posterior enhancement."""
    if cyst:
        return float(rng.uniform(-0.09, -0.05))
    draw = rng.uniform()
    shadow = _benign_or(label, 0.08, 0.65, separation)
    enhance = _benign_or(label, 0.35, 0.05, separation)
    if draw < shadow:
        return float(rng.uniform(0.05, 0.1) + label * separation * rng.uniform(0.0, 0.1))
    if draw < shadow + enhance:
        return float(rng.uniform(-0.06, -0.02))
    return float(rng.uniform(-0.01, 0.015))


def _birads(label: int, features: dict[str, float], rng: np.random.Generator) -> str:
    """A BI-RADS-like category from a suspicion score of the drawn features.

    Per-class thresholds on the score give roughly 45/30/18/7 % of 3/4A/4B/4C for benign lesions and
    5/15/45/27 % of 4A/4B/4C/5 for malignant ones, 8 % of which become 6 (biopsy-proven).
    """
    score = (
        1.5 * (features["aspect"] - 0.9)
        + 0.9 * (features["spicules"] > 0)
        + 4.0 * features["roughness"]
        + 0.7 * (features["posterior_per_mm"] > 0.04)
        + 1.5 * features["heterogeneity"]
        + 0.5 * (features["halo"] > 0)
        - 0.6 * (features["capsule"] > 0)
        - 1.5 * features["cyst"]
        + rng.normal(0.0, 0.35)
    )
    if label:
        if rng.uniform() < 0.08:
            return "6"
        return BIRADS_CATEGORIES[1 + int(np.searchsorted([0.9, 1.65, 2.75], score))]
    return BIRADS_CATEGORIES[int(np.searchsorted([-0.4, 0.2, 0.8], score))]


# ---------------------------------------------------------------- lesion geometry


def _lesion_volume_mm3(options: SynthOptions, rng: np.random.Generator, largest_mm3: float) -> float:
    """A lesion volume (mm³): ``median · (r + (1 - r) · exp(σ·N(0, 1)))``, redrawn while above ``largest_mm3``.

    This shifted log-normal reproduces seed 000's cohort with r = 0.48, σ = 1.5: minimum 0.48 × median
    (1.64 vs 3.39 cm³), mean ≈ 2.1 × median (6.99 cm³) and about two thirds below 1.5 × median (62 % < 5 cm³).
    """
    median = options.lesion_median_cm3 * 1000.0
    ratio = options.lesion_min_ratio
    high = max(largest_mm3, median * ratio)
    for _ in range(100):
        volume = median * (ratio + (1.0 - ratio) * math.exp(options.lesion_sigma * rng.standard_normal()))
        if volume <= high:
            return volume
    return float(min(median, high))


def _rotation(yaw: float, tilt: float) -> np.ndarray:
    """Rotation (z, y, x) coordinates: yaw about the depth axis, then tilt in the depth-lateral plane."""
    cy, sy, ct, st = math.cos(yaw), math.sin(yaw), math.cos(tilt), math.sin(tilt)
    about_depth = np.array([[cy, 0.0, -sy], [0.0, 1.0, 0.0], [sy, 0.0, cy]])
    in_plane = np.array([[1.0, 0.0, 0.0], [0.0, ct, -st], [0.0, st, ct]])
    return in_plane @ about_depth


def _semi_axes(volume_mm3: float, features: dict[str, float]) -> np.ndarray:
    """Semi-axes (z, y, x) mm of the base ellipsoid: depth = aspect × lateral, sweep = elongation × lateral."""
    aspect, elongation = features["aspect"], features["elongation"]
    lateral = (3.0 * volume_mm3 / (4.0 * math.pi * aspect * elongation)) ** (1.0 / 3.0)
    return np.array([elongation * lateral, aspect * lateral, lateral])


def _bumps(features: dict[str, float], rng: np.random.Generator) -> list[tuple[np.ndarray, float, float]]:
    """Lobules and spicules: (unit direction, amplitude, sharpness) of radial bumps ``amp·max(0, u·d)^sharp``."""
    bumps = []
    for _ in range(int(features["lobes"])):
        bumps.append((rng.normal(size=3), rng.uniform(0.06, 0.22), features["lobe_sharpness"]))
    for _ in range(int(features["spicules"])):
        bumps.append((rng.normal(size=3), rng.uniform(0.35, 0.9), rng.uniform(150.0, 600.0)))
    return [(d / np.linalg.norm(d), float(a), float(p)) for d, a, p in bumps]


def _lesion_mask(
    shape: Sequence[int],
    spacing: np.ndarray,
    centre_mm: np.ndarray,
    axes_mm: np.ndarray,
    features: dict[str, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """Voxelise one lesion: (D, H, W) bool, drawn inside its bounding box only."""
    bumps = _bumps(features, rng)
    lobes = sum(a for _, a, p in bumps if p < 100.0)
    spike = max([a for _, a, p in bumps if p >= 100.0], default=0.0)
    reach = axes_mm.max() * (1.1 + lobes + spike + 3 * features["roughness"])  # the lesion is cut to this box
    low = np.maximum(0, np.floor((centre_mm - reach) / spacing)).astype(int)
    high = np.minimum(np.asarray(shape), np.ceil((centre_mm + reach) / spacing) + 1).astype(int)
    axes = [
        (np.arange(a, b) * s - c).astype(np.float32)
        for a, b, s, c in zip(low, high, spacing, centre_mm, strict=True)
    ]
    rotation = _rotation(rng.uniform(0, np.pi), math.radians(features["tilt_deg"])).astype(np.float32)
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1) @ rotation
    scaled = points / axes_mm.astype(np.float32)
    radius = np.linalg.norm(scaled, axis=-1)
    unit = scaled / np.maximum(radius, 1e-6)[..., None]
    limit = 1.0 + features["roughness"] * _field(radius.shape, [1.5 / s for s in spacing], rng)
    for direction, amplitude, sharpness in bumps:
        limit += amplitude * np.maximum(unit @ direction, 0.0) ** sharpness
    mask = np.zeros(tuple(shape), dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(low, high, strict=True))] = radius <= limit
    return mask


def _place(
    shape: Sequence[int], spacing: np.ndarray, layers: _Layers, axes_mm: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A lesion centre (z, y, x) mm inside the gland, keeping the lesion inside the field of view."""
    extent = np.asarray(shape) * spacing
    half = axes_mm * 1.15  # a little room for lobules

    def along(axis: int) -> float:
        return rng.uniform(half[axis] + 1.0, max(half[axis] + 1.0, extent[axis] - half[axis] - 1.0))

    z, x = along(0), along(2)
    column = (min(int(z / spacing[0]), shape[0] - 1), min(int(x / spacing[2]), shape[2] - 1))
    top = float(layers.gland_top[column]) + 0.3 * half[1]
    bottom = min(float(layers.gland_bottom[column]), extent[1] - half[1] - 2.0)
    y = rng.uniform(top, max(top, bottom))
    return np.array([z, min(y, extent[1] - half[1] - 1.0), x])


def _largest_fitting_mm3(shape: Sequence[int], spacing: np.ndarray, features: dict[str, float]) -> float:
    """Volume (mm³) of the largest base ellipsoid with these proportions that fits the field of view."""
    extent = np.asarray(shape) * spacing
    unit = _semi_axes(4.0 * math.pi / 3.0, features)  # semi-axes whose product is 1
    scale = min((0.35 * extent[0]) / unit[0], (0.3 * extent[1]) / unit[1], (0.35 * extent[2]) / unit[2])
    return 4.0 * math.pi / 3.0 * scale**3


# ---------------------------------------------------------------- lesion appearance


def _shell(mask: np.ndarray, spacing: np.ndarray, thickness_mm: float) -> np.ndarray:
    """Voxels outside ``mask`` within about ``thickness_mm`` of it."""
    radius = np.maximum(1, np.round(thickness_mm / spacing)).astype(int)
    grown = ndimage.binary_dilation(mask, structure=np.ones(tuple(2 * r + 1 for r in radius), dtype=bool))
    return grown & ~mask


def _add_lesion(
    echo: np.ndarray,
    attenuation: np.ndarray,
    mask: np.ndarray,
    spacing: np.ndarray,
    features: dict[str, float],
    rng: np.random.Generator,
) -> None:
    """Paint one lesion into ``echo`` and its posterior attenuation (1/mm) into ``attenuation``, in place.

    Works inside the lesion's bounding box grown by the blur and halo reach (views of the full arrays).
    """
    points = np.argwhere(mask)
    grow = np.ceil((3 * features["blur_mm"] + 2.0) / spacing).astype(int) + 1
    region = tuple(
        slice(max(0, int(a) - g), min(n, int(b) + 1 + g))
        for a, b, g, n in zip(points.min(0), points.max(0), grow, mask.shape, strict=True)
    )
    echo, attenuation, mask = echo[region], attenuation[region], mask[region]  # views: painted in place
    weight = ndimage.gaussian_filter(mask.astype(np.float32), features["blur_mm"] / spacing, truncate=3.0)
    texture = np.exp(features["heterogeneity"] * _field(mask.shape, [0.9 / s for s in spacing], rng))
    inside = features["echo"] * texture
    voxels = np.argwhere(mask)
    count = min(len(voxels), int(features["calcifications"]))
    if count:  # microcalcifications: single bright voxels
        inside[tuple(voxels[rng.choice(len(voxels), size=count, replace=False)].T)] *= 8.0
    echo *= 1.0 - weight
    echo += weight * inside
    if features["halo"]:
        echo[_shell(mask, spacing, 1.5)] *= 1.0 + features["halo"]
    if features["capsule"]:
        echo[_shell(mask, spacing, 0.4)] *= 1.0 + 1.5 * features["capsule"]
    attenuation += features["posterior_per_mm"] * weight


# ---------------------------------------------------------------- scanner


def _scan(
    echo: np.ndarray, attenuation: np.ndarray, contact: np.ndarray, style: SiteStyle, rng: np.random.Generator
) -> np.ndarray:
    """Image the echo map: lesion attenuation, depth loss, Rayleigh speckle, noise, log compression → uint8."""
    spacing = np.asarray(style.spacing_mm)
    along_depth = np.cumsum(attenuation, axis=1) * spacing[1]
    shadow = np.exp(-ndimage.gaussian_filter(along_depth, (0.7 / spacing[0], 0.0, 0.7 / spacing[2])))
    depth_mm = np.arange(echo.shape[1], dtype=np.float32) * spacing[1]
    depth_loss = 10.0 ** (-style.attenuation_db_per_mm * depth_mm / 20.0)
    sigma = [m / s / 2.0 for m, s in zip(style.speckle_mm, spacing, strict=True)]
    speckle = (_field(echo.shape, sigma, rng) + 1j * _field(echo.shape, sigma, rng)) / math.sqrt(2.0)
    noise = (
        style.noise * (rng.standard_normal(echo.shape) + 1j * rng.standard_normal(echo.shape)) / math.sqrt(2)
    )
    amplitude = np.abs(echo * shadow * depth_loss[None, :, None] * speckle + noise)
    decibels = 20.0 * np.log10(amplitude + 1e-6) + style.gain_db + 0.45 * style.dynamic_range_db
    grey = np.clip(np.round(decibels / style.dynamic_range_db * 255.0), 0, 255).astype(np.uint8)
    grey[~contact] = 0
    return grey


def generate_case(
    style: SiteStyle, label: int, *, seed: int, site: int, case: int, options: SynthOptions
) -> SynthCase:
    """Generate one case of ``style`` with the given label (1 malignant); deterministic in all arguments."""
    rng = rng_for(seed, CASE_STREAM, site, case)
    shape, spacing = options.shape, np.asarray(style.spacing_mm, dtype=float)
    layers = _layers(shape, spacing, rng)
    echo = _tissue(shape, spacing, layers, rng)
    contact = echo > 0
    attenuation = np.zeros(shape, dtype=np.float32)
    mask = np.zeros(shape, dtype=bool)
    features = _lesion_features(label, rng, options.class_separation)
    volumes = []
    lesions = 2 if rng.uniform() < options.second_lesion_prob else 1
    for number in range(lesions):
        largest = _largest_fitting_mm3(shape, spacing, features)
        volume = _lesion_volume_mm3(options, rng, largest) * (1.0 if number == 0 else rng.uniform(0.15, 0.4))
        axes = _semi_axes(volume, features)
        lesion = _lesion_mask(shape, spacing, _place(shape, spacing, layers, axes, rng), axes, features, rng)
        lesion &= contact & ~ndimage.binary_dilation(mask, iterations=2)
        if lesion.any():
            _add_lesion(echo, attenuation, lesion, spacing, features, rng)
            mask |= lesion
            volumes.append(float(lesion.sum() * np.prod(spacing) / 1000.0))
    if not volumes:
        raise RuntimeError(
            f"synth: site {site} case {case} got no lesion voxel; use a larger shape or lesion"
        )
    image = _scan(echo, attenuation, contact, style, rng)
    truth = dict(features, lesions=float(len(volumes)), volume_cm3=round(sum(volumes), 4))
    birads = _birads(label, features, rng)
    return SynthCase(image, mask.astype(np.uint8), style.spacing_mm, label, birads, truth)
