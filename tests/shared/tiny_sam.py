"""The ``small`` SAM-Med3D architecture shrunk for fast tests: 32³ crops, patch 8, a 4³ token grid in one window."""

from __future__ import annotations

from shared.models.sam_med3d import resolve_config

P = 32
TINY_SAM = {
    **resolve_config("small"),
    "img_size": P,
    "input_image_size": [P] * 3,
    "patch_size": 8,
    "image_embedding_size": [4, 4, 4],
    "window_size": 4,
}
