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

#: Run-config values of a whole site round on the tiny models (tests/shared/conftest.py ``tiny_site``,
#: ``tiny_models``): 32³ crops, 32-pixel planes of 2 frames, a ResNet-18 classifier, one epoch of batch 2 each.
TINY_RUN = {
    "data.patch-size": P,
    "data.crop-jitter-voxels": 2,
    "data.planes-frames": 2,
    "data.planes-size": 32,
    "model.cls-depth": 18,
    "model.cls-norm-groups": 8,
    "train.seg-epochs": 1,
    "train.seg-batch-size": 2,
    "train.cls-epochs": 1,
    "train.cls-batch-size": 2,
    "train.progress": False,
}
