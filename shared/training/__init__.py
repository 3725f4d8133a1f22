"""Training loops in plain torch (no Flower): segmentation (``seg``, evaluated by ``seg_eval``) and the tri-plane
classifier (``cls``).

Used by the Flower client, ``fedabus train-local`` and ``fedabus pretrain``.
"""
