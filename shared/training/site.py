"""One site's work: train both models on its training split, evaluate both on its test split.

Just over 500 lines on purpose: a site's round exists twice by necessity — plain and under sample-level DP —
and both must stay next to the one training order they share (:func:`_train_models`).

Used by ``fedabus train-local``, by the ClientApp every round, and by the demo. Plain torch; no Flower.
Only aggregate numbers come out of :func:`train_site` and :func:`evaluate_site` — no case ids, no images.

With ``privacy.sample-dp`` :func:`train_site` trains both models with DP-SGD (the privacy unit is one case)
according to a :class:`~shared.privacy.planning.RoundPlan` and records the spent steps in the site's
:class:`~shared.privacy.ledger.PrivacyLedger` once both models trained; see :mod:`shared.privacy`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shared.config import SLICE_SEG_MODELS, SPLITS, DataConfig, FedabusConfig, SiteConfig, load_site_config
from shared.data.layouts import CaseRecord
from shared.data.loaders import (
    cls_dataset,
    cls_loader,
    seg_eval_loader,
    seg_train_dataset,
    seg_train_loader,
    site_cases,
)
from shared.data.planes import BoxError, largest_lesion_box, planes_from_config
from shared.data.splits import carve_validation
from shared.data.validate import validate_site
from shared.metric_names import (
    CLS_EPSILON,
    CLS_LOSS,
    DELTA,
    DICE_AUTO,
    HD95_AUTO,
    HD95_MM,
    NOISE_MULTIPLIER_CLS,
    NOISE_MULTIPLIER_SEG,
    NUM_EXAMPLES,
    PRIVACY,
    SEG_EPSILON,
    SEG_LOSS,
    TEST,
    TRAIN,
    ci_names,
    dice_click_name,
    metric_key,
)
from shared.privacy.dp_sgd import frozen_parameters
from shared.privacy.ledger import PrivacyBudgetExceeded, PrivacyLedger
from shared.privacy.planning import RoundPlan
from shared.privacy.sampling import OneFramePerCase, poisson_loader
from shared.privacy.validation import validate_privacy
from shared.statistics import segmentation_estimates

if TYPE_CHECKING:
    from peft import PeftModel

    from shared.training.cls import ClsCase, evaluate_classifier, train_classifier, trainable_snapshot
    from shared.training.seg import dp_untrained_parameters, snapshot_parameters, train_segmentation
    from shared.training.seg_eval import evaluate_segmentation

#: The training and evaluation code, imported when first used (it imports PEFT, which imports transformers:
#: seconds that opening a site, e.g. for the handshake, does not need).
_TRAINING = {
    "ClsCase": "shared.training.cls",
    "evaluate_classifier": "shared.training.cls",
    "train_classifier": "shared.training.cls",
    "trainable_snapshot": "shared.training.cls",
    "snapshot_parameters": "shared.training.seg",
    "dp_untrained_parameters": "shared.training.seg",
    "train_segmentation": "shared.training.seg",
    "evaluate_segmentation": "shared.training.seg_eval",
}


def _load_training() -> None:
    """Import the training code into this module (a name already set, e.g. by a test's monkeypatch, stays)."""
    for name, module in _TRAINING.items():
        if name not in globals():
            globals()[name] = getattr(importlib.import_module(module), name)


def __getattr__(name: str) -> Any:
    if name in _TRAINING:
        _load_training()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SiteData", "evaluate_site", "find_site_config", "open_site", "train_site"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteData:
    """A validated site: its usable training, validation and test cases (bad cases already skipped and
    counted). ``val_carved`` says the validation cases were carved from ``train`` (the site has no ``val``)."""

    name: str
    site_dir: Path
    site_config: SiteConfig | None
    train_cases: tuple[CaseRecord, ...]
    test_cases: tuple[CaseRecord, ...]
    val_cases: tuple[CaseRecord, ...] = ()
    val_carved: bool = False

    def cases(self, split: str) -> tuple[CaseRecord, ...]:
        """The cases of ``split`` (``train``, ``val`` or ``test``)."""
        try:
            return {"train": self.train_cases, "val": self.val_cases, "test": self.test_cases}[split]
        except KeyError:
            raise ValueError(f"unknown split {split!r}; expected train, val or test") from None


def find_site_config(site_dir: str | Path) -> Path | None:
    """The site TOML of a site folder: ``SITE_DIR/site.toml``, else ``SITE_DIR/../<folder name>.toml``."""
    site_dir = Path(site_dir)
    for candidate in (site_dir / "site.toml", site_dir.parent / f"{site_dir.name}.toml"):
        if candidate.is_file():
            return candidate
    return None


def open_site(
    site_dir: str | Path,
    *,
    site_config_path: str | Path | None = None,
    cache: str | Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> SiteData:
    """Index and validate a site folder (``cache`` as in :func:`shared.data.validate.validate_site`); raises
    ValueError when it has no usable training case.

    A site without ``val`` cases gets ``val_fraction`` of each label's training cases as its validation split
    (:func:`shared.data.splits.carve_validation`, seeded by ``seed``; logged)."""
    site_dir = Path(site_dir)
    path = Path(site_config_path) if site_config_path else find_site_config(site_dir)
    site_config = load_site_config(path) if path else None
    report = validate_site(site_dir, site_config, cache=cache)  # once, for all three splits
    splits = {split: tuple(site_cases(report, site_config, splits=(split,))) for split in SPLITS}
    name = (site_config.name if site_config and site_config.name else "") or site_dir.name
    if not splits["train"]:
        raise ValueError(
            f"{site_dir}: no usable training case (run `fedabus validate {site_dir}` to see why)"
        )
    train, val, carved = splits["train"], splits["val"], False
    if not val and val_fraction > 0:
        train, val = carve_validation(train, val_fraction, seed)
        carved = bool(val)
        logger.info(
            "%s: no validation split; %d of its %d training cases (%.0f%% per label, seed %d) validate instead",
            name,
            len(val),
            len(splits["train"]),
            100 * val_fraction,
            seed,
        )
    return SiteData(name, site_dir, site_config, train, splits["test"], val, carved)


def train_site(
    models: dict[str, PeftModel],
    site: SiteData,
    config: FedabusConfig,
    *,
    device: torch.device,
    seed: int = 0,
    proximal: bool = False,
    plan: RoundPlan | None = None,
    ledger: PrivacyLedger | None = None,
) -> dict[str, float]:
    """Train ``models["seg"]`` and ``models["cls"]`` in place on the site's training split.

    Returns aggregate metrics: ``num-examples`` (training cases), ``train/seg_loss``, ``train/cls_loss``.
    With ``proximal`` the current adapter is the FedProx reference (``train.proximal-mu``).

    With ``privacy.sample-dp``, ``plan`` (:func:`shared.privacy.planning.plan_private_round` for this site and
    round, which must be allowed) and the site's ``ledger`` are required; see :func:`_train_site_private` for
    what differs (metrics ``privacy/...`` instead of the training losses).
    """
    _load_training()
    if config.privacy.sample_dp:
        return _train_site_private(
            models, site, config, device=device, seed=seed, proximal=proximal, plan=plan, ledger=ledger
        )
    cases = list(site.train_cases)

    def seg_step(model: PeftModel, **train: Any) -> dict[str, Any]:
        make_loader = seg_train_loader
        if config.model.seg_model in SLICE_SEG_MODELS:  # a 2D segmenter trains on sweep slices
            from shared.data.loaders2d import slice_train_loader as make_loader
        loader = make_loader(
            cases,
            config.data,
            batch_size=config.train.seg_batch_size,
            site_config=site.site_config,
            seed=seed,
        )
        return train_segmentation(model, loader, **train)

    def cls_step(model: PeftModel, *, box_errors: dict[str, BoxError] | None, **train: Any) -> dict[str, Any]:
        loader = cls_loader(
            cases,
            config.data,
            batch_size=config.train.cls_batch_size,
            site_config=site.site_config,
            seed=seed,
            box_errors=box_errors,
        )
        return train_classifier(model, loader, **train)

    seg_result, cls_result = _train_models(
        models,
        site,
        config,
        device=device,
        seed=seed,
        proximal=proximal,
        seg_step=seg_step,
        cls_step=cls_step,
    )
    seg_losses = seg_result["epoch_loss"]
    return {
        NUM_EXAMPLES: float(len(cases)),
        metric_key(SEG_LOSS, split=TRAIN): float(seg_losses[-1]) if seg_losses else float("nan"),
        metric_key(CLS_LOSS, split=TRAIN): float(cls_result["loss"]),
    }


def _train_models(
    models: dict[str, PeftModel],
    site: SiteData,
    config: FedabusConfig,
    *,
    device: torch.device,
    seed: int,
    proximal: bool,
    seg_step: Callable[..., dict[str, Any]],
    cls_step: Callable[..., dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one order of a site's round, private or not: the segmenter trains first (``seg_step(model, config=,
    device=, proximal_ref=)``), then the classifier (``cls_step`` with the same and ``box_errors=``, the boxes
    :func:`_classifier_boxes` measures with the segmenter just trained). ``config.train.seed`` is ``seed``; with
    ``proximal`` each model's adapter before training is its FedProx reference. Returns both steps' results."""
    train_config = replace(config.train, seed=seed)
    seg = models["seg"].to(device)
    seg_ref = snapshot_parameters(seg) if proximal else None
    seg_result = seg_step(seg, config=train_config, device=device, proximal_ref=seg_ref)
    cls = models["cls"].to(device)
    cls_ref = trainable_snapshot(cls) if proximal else None
    cls_result = cls_step(
        cls,
        config=train_config,
        device=device,
        proximal_ref=cls_ref,
        box_errors=_classifier_boxes(seg, site, config, device=device),
    )
    return seg_result, cls_result


def _classifier_boxes(
    seg: PeftModel, site: SiteData, config: FedabusConfig, *, device: torch.device
) -> dict[str, BoxError] | None:
    """With ``train.cls-boxes = predicted``: case id -> how the box of ``seg``'s mask of that training case (after
    the evaluation's clicks, as :func:`evaluate_site` predicts) misses the true box; cases where ``seg`` finds
    nothing are left out (their planes use the true box). None with ``ground-truth``."""
    if config.train.cls_boxes != "predicted":
        return None
    errors: dict[str, BoxError] = {}

    def measure(item: dict[str, Any], result: Any) -> None:
        predicted = result.prediction.full() if result.prediction is not None else None
        if predicted is not None and predicted.any():
            true = largest_lesion_box(np.asarray(item["mask"])[0] > 0)
            errors[str(item["case_id"])] = BoxError.between(true, largest_lesion_box(predicted))

    loader = seg_eval_loader(list(site.train_cases), config.data, site_config=site.site_config)
    evaluate_segmentation(
        seg,
        loader,
        config=config.train,
        data_config=config.data,
        device=device,
        on_case=measure,
        keep_masks=False,
        split=TRAIN,
    )
    seg.train()
    logger.info(
        "%s: classifier planes cut around the segmenter's boxes of %d of %d training cases",
        site.name,
        len(errors),
        len(site.train_cases),
    )
    return errors


def _check_private_round(
    site: SiteData, config: FedabusConfig, plan: RoundPlan | None, ledger: PrivacyLedger | None
) -> tuple[RoundPlan, PrivacyLedger]:
    if plan is None or ledger is None:
        raise ValueError(
            "privacy.sample-dp is on: train_site needs plan= (shared.privacy.planning.plan_private_round) and "
            "the site's ledger= (shared.privacy.ledger.PrivacyLedger.open(state folder))"
        )
    n_cases = len(site.train_cases)
    validate_privacy(config, n_cases)
    if plan.n_cases != n_cases:
        raise ValueError(
            f"{site.name}: the privacy plan is for {plan.n_cases} training cases, the site has {n_cases}"
        )
    if not plan.allowed:
        raise PrivacyBudgetExceeded(f"{site.name}: {plan.reason}")
    return plan, ledger


def _train_seg_private(
    model: PeftModel, site: SiteData, data: DataConfig, plan: RoundPlan, **train: Any
) -> dict[str, Any]:
    """DP-SGD of the SAM-Med3D adapter: one crop per case, Poisson-sampled, LoRA and the submodules of
    ``privacy.seg-trainable`` trained (the other fully trained ones keep their value); ``train`` holds the keyword
    arguments of :func:`train_segmentation` (``config``, ``device``, ``proximal_ref``)."""
    if plan.seg.steps == 0:
        return {"epoch_loss": [], "privacy_history": []}
    dataset = seg_train_dataset(
        list(site.train_cases), data, site_config=site.site_config, seed=train["config"].seed
    )
    loader = poisson_loader(
        dataset,
        sample_rate=plan.seg.sample_rate,
        steps_per_epoch=plan.seg.steps_per_epoch,
        keys=("image", "mask"),
    )
    with frozen_parameters(dp_untrained_parameters(model, plan.seg_trainable).values()):
        return train_segmentation(model, loader, privacy=plan.settings("seg"), **train)


def _train_cls_private(
    model: PeftModel,
    site: SiteData,
    data: DataConfig,
    plan: RoundPlan,
    *,
    box_errors: dict[str, BoxError] | None = None,
    **train: Any,
) -> dict[str, Any]:
    """DP-SGD of the classifier: one random frame-triplet per case and draw, Poisson-sampled; ``train`` holds
    the keyword arguments of :func:`train_classifier`; ``box_errors`` as :func:`_classifier_boxes`."""
    if plan.cls.steps == 0:
        return {"loss": float("nan"), "privacy_history": []}
    lesions = cls_dataset(
        list(site.train_cases),
        data,
        site_config=site.site_config,
        seed=train["config"].seed,
        box_errors=box_errors,
    )
    loader = poisson_loader(
        OneFramePerCase(lesions), sample_rate=plan.cls.sample_rate, steps_per_epoch=plan.cls.steps_per_epoch
    )
    return train_classifier(model, loader, privacy=plan.settings("cls"), **train)


def _train_site_private(
    models: dict[str, PeftModel],
    site: SiteData,
    config: FedabusConfig,
    *,
    device: torch.device,
    seed: int,
    proximal: bool,
    plan: RoundPlan | None,
    ledger: PrivacyLedger | None,
) -> dict[str, float]:
    """:func:`train_site` under sample-level DP.

    Both models train with DP-SGD by the plan (Poisson sampling at the plan's rate; the classifier on one
    random frame-triplet per case and draw). Only after both trained are their accountant histories recorded
    in the ledger and saved (atomically, re-checking the budget under the ledger's lock; an exceeded budget
    raises :class:`PrivacyBudgetExceeded` and the update must not leave the site). The training losses are
    logged at the site but not returned: they are computed from the patients' data outside DP-SGD. Returns
    ``num-examples``, ``privacy/seg_epsilon`` and ``privacy/cls_epsilon`` (cumulative ε of the site after
    this round, at ``privacy/delta``), ``privacy/delta``, ``privacy/noise_multiplier_seg`` and
    ``privacy/noise_multiplier_cls`` (0 for a model that trained no step).
    """
    plan, ledger = _check_private_round(site, config, plan, ledger)
    seg_result, cls_result = _train_models(
        models,
        site,
        config,
        device=device,
        seed=seed,
        proximal=proximal,
        seg_step=lambda model, **train: _train_seg_private(model, site, config.data, plan, **train),
        cls_step=lambda model, **train: _train_cls_private(model, site, config.data, plan, **train),
    )
    results = {"seg": seg_result, "cls": cls_result}
    for name, result in results.items():
        for sigma, rate, steps in result["privacy_history"]:
            ledger.record(
                name,
                noise_multiplier=sigma,
                sample_rate=rate,
                steps=steps,
                accountant=plan.accountant,
                round=plan.server_round,
                run=plan.run,
            )
    ledger.save(budget=plan.budget, delta=plan.delta)
    seg_losses = results["seg"]["epoch_loss"]
    logger.info(
        "%s: private round %d: seg loss %.4f, cls loss %.4f (kept at the site)",
        site.name,
        plan.server_round,
        seg_losses[-1] if seg_losses else float("nan"),
        results["cls"]["loss"],
    )
    return {
        NUM_EXAMPLES: float(len(site.train_cases)),
        metric_key(SEG_EPSILON, split=PRIVACY): ledger.epsilon("seg", plan.delta, accountant=plan.accountant),
        metric_key(CLS_EPSILON, split=PRIVACY): ledger.epsilon("cls", plan.delta, accountant=plan.accountant),
        metric_key(DELTA, split=PRIVACY): float(plan.delta),
        metric_key(NOISE_MULTIPLIER_SEG, split=PRIVACY): float(plan.seg.noise_multiplier),
        metric_key(NOISE_MULTIPLIER_CLS, split=PRIVACY): float(plan.cls.noise_multiplier),
    }


def evaluate_site(
    models: dict[str, PeftModel],
    site: SiteData,
    config: FedabusConfig,
    *,
    device: torch.device,
    split: str = TEST,
    split_cases: tuple[CaseRecord, ...] | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Evaluate both models on the site's ``split`` (``val`` to select, ``test`` once for the chosen model),
    the classifier end to end (planes from the predicted mask) and on ground-truth planes. Returns flat metrics
    (``{split}/dice_1click``, ``{split}/auc``, ..., ``num-examples`` = cases evaluated; only ``num-examples``
    = 0 when the split is empty). ``details``, when given, receives per-case records (they stay at the site).
    ``split_cases`` evaluates these cases instead, under the name ``split``."""
    _load_training()
    cases = list(site.cases(split) if split_cases is None else split_cases)
    if not cases:
        return {NUM_EXAMPLES: 0.0}
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
        split=split,
    )
    cls_eval = evaluate_classifier(cls, cls_cases, config=config.train, device=device)
    metrics = {
        **seg_eval.metrics,
        **_segmentation_bounds(seg_eval, split, seed=config.train.seed),
        **cls_eval.metrics_dict(split=split),
        NUM_EXAMPLES: float(len(cases)),
    }
    if details is not None:
        details["segmentation"] = seg_eval.to_json()
        details["classification"] = cls_eval.per_case()
    return {k: float(v) for k, v in metrics.items()}


def _segmentation_bounds(evaluation: Any, split: str, *, seed: int) -> dict[str, float]:
    """95% case-bootstrap bounds of Dice@1 and HD95: ``{split}/dice_1click_ci_low`` ... (aggregates of the
    site's cases, like the means); of ``dice_auto`` and ``hd95_mm_auto`` for an automatic segmenter."""
    dice = [case.dice for case in evaluation.cases]
    hd95 = [case.hd95_mm for case in evaluation.cases]
    if all(not case.dice_curve for case in evaluation.cases):  # automatic: no click curve
        from shared.training.seg_auto import auto_segmentation_estimates

        estimates, names = auto_segmentation_estimates(dice, hd95, seed=seed), (DICE_AUTO, HD95_AUTO)
    else:
        curves = [case.dice_curve for case in evaluation.cases]
        estimates, names = segmentation_estimates(curves, hd95, seed=seed), (dice_click_name(1), HD95_MM)
    out = {}
    for name in names:
        low, high = ci_names(name)
        out[metric_key(low, split=split)] = float(estimates[name].ci_low)
        out[metric_key(high, split=split)] = float(estimates[name].ci_high)
    return out
