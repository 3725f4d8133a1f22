"""One site's work: train both models on its training split, evaluate both on its test split.

Used by ``fedabus train-local``, by the ClientApp every round, and by the demo. Plain torch; no Flower.
Only aggregate numbers come out of :func:`train_site` and :func:`evaluate_site` — no case ids, no images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from shared.config import FedabusConfig, SiteConfig, load_site_config
from shared.data.layouts import CaseRecord
from shared.data.loaders import cls_loader, seg_eval_loader, seg_train_loader, site_cases
from shared.data.planes import planes_from_config
from shared.training.cls import ClsCase, evaluate_classifier, train_classifier, trainable_snapshot
from shared.training.seg import snapshot_parameters, train_segmentation
from shared.training.seg_eval import evaluate_segmentation

__all__ = ["SiteData", "evaluate_site", "find_site_config", "open_site", "train_site"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteData:
    """A validated site: its usable training and test cases (bad cases already skipped and counted)."""

    name: str
    site_dir: Path
    site_config: SiteConfig | None
    train_cases: tuple[CaseRecord, ...]
    test_cases: tuple[CaseRecord, ...]


def find_site_config(site_dir: str | Path) -> Path | None:
    """The site TOML of a site folder: ``SITE_DIR/site.toml``, else ``SITE_DIR/../<folder name>.toml``."""
    site_dir = Path(site_dir)
    for candidate in (site_dir / "site.toml", site_dir.parent / f"{site_dir.name}.toml"):
        if candidate.is_file():
            return candidate
    return None


def open_site(
    site_dir: str | Path, *, site_config_path: str | Path | None = None, cache: str | Path | None = None
) -> SiteData:
    """Index and validate a site folder; raises ValueError when it has no usable training case."""
    site_dir = Path(site_dir)
    path = Path(site_config_path) if site_config_path else find_site_config(site_dir)
    site_config = load_site_config(path) if path else None
    train = tuple(site_cases(site_dir, site_config, splits=("train",), cache=cache))
    test = tuple(site_cases(site_dir, site_config, splits=("test",), cache=cache))
    name = (site_config.name if site_config and site_config.name else "") or site_dir.name
    if not train:
        raise ValueError(
            f"{site_dir}: no usable training case (run `fedabus validate {site_dir}` to see why)"
        )
    return SiteData(name, site_dir, site_config, train, test)


def train_site(
    models: dict[str, PeftModel],
    site: SiteData,
    config: FedabusConfig,
    *,
    device: torch.device,
    seed: int = 0,
    proximal: bool = False,
) -> dict[str, float]:
    """Train ``models["seg"]`` and ``models["cls"]`` in place on the site's training split.

    Returns aggregate metrics: ``num-examples`` (training cases), ``train/seg_loss``, ``train/cls_loss``.
    With ``proximal`` the current adapter is the FedProx reference (``train.proximal-mu``).
    """
    train_config = replace(config.train, seed=seed)
    cases = list(site.train_cases)
    seg = models["seg"].to(device)
    seg_ref = snapshot_parameters(seg) if proximal else None
    seg_loader = seg_train_loader(
        cases, config.data, batch_size=train_config.seg_batch_size, site_config=site.site_config, seed=seed
    )
    seg_result = train_segmentation(seg, seg_loader, config=train_config, device=device, proximal_ref=seg_ref)
    cls = models["cls"].to(device)
    cls_ref = trainable_snapshot(cls) if proximal else None
    loader = cls_loader(
        cases, config.data, batch_size=train_config.cls_batch_size, site_config=site.site_config, seed=seed
    )
    cls_result = train_classifier(cls, loader, config=train_config, device=device, proximal_ref=cls_ref)
    return {
        "num-examples": float(len(cases)),
        "train/seg_loss": float(seg_result["epoch_loss"][-1]) if seg_result["epoch_loss"] else float("nan"),
        "train/cls_loss": float(cls_result["loss"]),
    }


def evaluate_site(
    models: dict[str, PeftModel],
    site: SiteData,
    config: FedabusConfig,
    *,
    device: torch.device,
    split_cases: tuple[CaseRecord, ...] | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Evaluate both models on the site's test split, the classifier end to end (planes from the predicted
    mask) and on ground-truth planes. Returns flat metrics (``test/dice_1click``, ``test/auc``, ...,
    ``num-examples`` = test cases). ``details``, when given, receives per-case records (they stay at the site)."""
    cases = list(site.test_cases if split_cases is None else split_cases)
    if not cases:
        return {"num-examples": 0.0}
    seg, cls = models["seg"].to(device), models["cls"].to(device)
    cls_cases: list[ClsCase] = []

    def planes_of(item: dict[str, Any], result: Any) -> None:
        image = np.asarray(item["image"])[0]
        kwargs = {"spacing_mm": item["spacing_mm"], "pad_value": item["pad_value"]}
        gt = planes_from_config(image, np.asarray(item["mask"])[0] > 0, config.data, **kwargs)
        cls_cases.append(ClsCase(str(item["case_id"]), int(item["label"]), gt, source="gt"))
        predicted = result.prediction.full() if result.prediction is not None else None
        pred_planes = None
        if predicted is not None and predicted.any():
            pred_planes = planes_from_config(image, predicted, config.data, **kwargs)
        cls_cases.append(ClsCase(str(item["case_id"]), int(item["label"]), pred_planes, source="pred"))

    loader = seg_eval_loader(cases, config.data, site_config=site.site_config)
    seg_eval = evaluate_segmentation(
        seg,
        loader,
        config=config.train,
        data_config=config.data,
        device=device,
        on_case=planes_of,
        keep_masks=False,
    )
    cls_eval = evaluate_classifier(cls, cls_cases, config=config.train, device=device)
    metrics = {**seg_eval.metrics, **cls_eval.metrics_dict(split="test"), "num-examples": float(len(cases))}
    if details is not None:
        details["segmentation"] = seg_eval.to_json()
        details["classification"] = cls_eval.per_case()
    return {k: float(v) for k, v in metrics.items()}
