"""Tri-plane classifier training, evaluation and Grad-CAM (shared/training/cls.py)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score
from torch.utils.data import DataLoader

from shared.adapters import LoraSpec, attach_lora
from shared.config import TrainConfig
from shared.models.triplane import PLANES, build_triplane_classifier
from shared.training import cls
from shared.training.cls import (
    ClsCase,
    build_cls_optimizer,
    evaluate_classifier,
    frame_triplet_dataset,
    grad_cam,
    parse_cls_planes,
    predict_frame_probabilities,
    predict_lesions,
    save_grad_cam_images,
    train_classifier,
    trainable_snapshot,
)

SIZE = 32
LORA = LoraSpec(targets=r"branches\.\w+\..*conv\d*", trainable=("head",))
#: Seed 003 optimiser (SGD, lr 1e-3, momentum 0.9); 5 epochs of 2 batches.
CONFIG = TrainConfig(cls_epochs=5, cls_optimizer="sgd", cls_lr=1e-3, cls_batch_size=8, progress=False, seed=0)


def synthetic_lesions(n: int, frames: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Planes (n, 3, frames, size, size) and labels (n,) alternating 0, 1: benign lesions are bright round
    discs, malignant ones dark discs with a lobulated border, on noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size - 0.5
    planes = rng.normal(0.0, 0.3, (n, 3, frames, size, size)).astype(np.float32)
    for i, label in enumerate(labels):
        for p in range(3):
            for f in range(frames):
                cy, cx = rng.uniform(-0.08, 0.08, 2)
                angle = np.arctan2(yy - cy, xx - cx)
                lobes = 0.3 * np.sin(5 * angle + rng.uniform(0, 2 * np.pi)) if label else 0.0
                disc = np.hypot(yy - cy, xx - cx) < rng.uniform(0.18, 0.28) * (1 + lobes)
                planes[i, p, f][disc] += -1.0 if label else 1.0
    return planes, labels


def lora_classifier(planes: tuple[str, ...] = PLANES, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return attach_lora(build_triplane_classifier(depth=18, planes=planes, norm_groups=8), LORA)


def loader_for(planes: np.ndarray, labels: np.ndarray, *, shuffle: bool = True) -> DataLoader:
    dataset = frame_triplet_dataset(planes, labels)
    return DataLoader(dataset, batch_size=8, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def config_for(planes: tuple[str, ...], **changes: object) -> TrainConfig:
    return TrainConfig(**{**CONFIG.__dict__, "cls_planes": ",".join(planes), **changes})


def mean_loss(model: torch.nn.Module, planes: np.ndarray, labels: np.ndarray) -> float:
    frame_probs = predict_frame_probabilities(model, planes, "cpu")
    p_true = np.where(labels[:, None] == 1, frame_probs, 1 - frame_probs)
    return float(-np.log(np.clip(p_true, 1e-12, 1)).mean())


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """One intra-op thread: these tiny models gain nothing from two, and on a shared 2-core machine OpenMP
    threads that wait for each other make each step 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> dict:
    """One LoRA classifier (3 planes, ResNet-18, 32 px) trained for 10 steps, with its state before."""
    model = lora_classifier()
    planes, labels = synthetic_lesions(16, 1, SIZE, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_before = mean_loss(model, planes, labels)
    report = train_classifier(model, loader_for(planes, labels), config=CONFIG, device="cpu")
    return {
        "model": model,
        "before": before,
        "report": report,
        "loss_before": loss_before,
        "loss_after": mean_loss(model, planes, labels),
    }


def test_loss_falls_on_a_learnable_synthetic_problem(trained: dict) -> None:
    report = trained["report"]
    assert report["steps"] == 10 and report["num_examples"] == 16 and report["samples_seen"] == 80
    assert len(report["epoch_losses"]) == 5 and report["loss"] == report["epoch_losses"][-1]
    assert trained["loss_after"] < 0.6 * trained["loss_before"]  # cross-entropy on the training lesions
    assert report["epoch_losses"][-1] < 0.6 * report["epoch_losses"][0]


def test_only_trainable_parameters_change(trained: dict) -> None:
    model, before = trained["model"], trained["before"]
    trainable = {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("head.") for n in trainable)
    for name, value in model.state_dict().items():
        short = name.removeprefix("base_model.model.")
        if short in trainable and (short.startswith("head.") or "lora_B" in short):
            assert not torch.equal(value, before[name]), f"{name} did not change"
        elif short not in trainable:
            assert torch.equal(value, before[name]), f"frozen {name} changed"


def test_lesion_probability_is_the_mean_of_frame_probabilities(trained: dict) -> None:
    model = trained["model"]
    planes, _ = synthetic_lesions(3, 3, SIZE, seed=5)
    lesion = predict_lesions(model, planes, "cpu")
    expected = np.zeros(3)
    with torch.no_grad():
        model.eval()
        for i in range(3):
            for f in range(3):
                logits = model(torch.from_numpy(planes[i, :, f])[None, :, None])
                expected[i] += torch.softmax(logits, dim=1)[0, 1].item() / 3
        model.train()
    assert lesion.shape == (3,)
    np.testing.assert_allclose(lesion, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lesion, predict_frame_probabilities(model, planes, "cpu").mean(axis=1))


def test_metrics_on_a_hand_made_case_agree_with_scikit_learn(monkeypatch: pytest.MonkeyPatch) -> None:
    labels = [1, 1, 1, 0, 0, 0, 1, 0, 0]
    scores = [0.9, 0.6, 0.4, 0.3, 0.55, 0.1, 0.5, 0.5, 0.2]  # 0.5 is not "> 0.5": predicted benign
    score_of = {i: s for i, s in enumerate(scores)}

    def fake_predict(model: object, planes: np.ndarray, device: object, **options: object) -> np.ndarray:
        return np.array([score_of[int(p[0, 0, 0, 0])] for p in planes])

    monkeypatch.setattr(cls, "predict_lesions", fake_predict)
    model = build_triplane_classifier(depth=18, planes=("coronal",), norm_groups=8)
    cases = [ClsCase(f"c{i}", y, np.full((3, 1, 4, 4), i, np.float32), "pred") for i, y in enumerate(labels)]
    cases += [ClsCase("c0", 1, np.zeros((3, 1, 4, 4), np.float32), "gt"), ClsCase("c3", 0, None, "gt")]
    result = evaluate_classifier(model, cases, config=config_for(("coronal",)), device="cpu")

    pred = result.by_source["pred"]
    predicted = np.array(scores) > 0.5
    assert pred.case_ids == tuple(f"c{i}" for i in range(9))
    np.testing.assert_array_equal(pred.probabilities, scores)
    assert pred.auc.auc == pytest.approx(roc_auc_score(labels, scores))
    assert pred.auc.ci_low <= pred.auc.auc <= pred.auc.ci_high
    assert pred.binary.sensitivity == pytest.approx(recall_score(labels, predicted))
    assert pred.binary.specificity == pytest.approx(recall_score(labels, predicted, pos_label=0))
    assert pred.binary.ppv == pytest.approx(precision_score(labels, predicted))
    assert pred.binary.npv == pytest.approx(precision_score(labels, predicted, pos_label=0))
    assert pred.binary.accuracy == pytest.approx(accuracy_score(labels, predicted))
    assert pred.binary.f1 == pytest.approx(f1_score(labels, predicted))

    gt = result.by_source["gt"]
    np.testing.assert_array_equal(gt.probabilities, [0.9, cls.NO_LESION_PROBABILITY])
    assert gt.n_missing_planes == 1 and gt.binary.accuracy == 1.0
    metrics = result.metrics_dict()
    assert metrics["test/auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert metrics["test/accuracy_gt_planes"] == 1.0 and metrics["test/n_missing_planes_gt_planes"] == 1.0
    assert metrics["test/n_cases_cls"] == 9.0
    rows = result.per_case()
    assert len(rows) == 11 and rows[6] == {
        "case_id": "c6",
        "source": "pred",
        "label": 1,
        "probability": 0.5,
        "predicted_malignant": False,
    }


def test_evaluation_uses_the_model_probabilities(trained: dict) -> None:
    planes, labels = synthetic_lesions(6, 2, SIZE, seed=3)
    cases = [ClsCase(f"c{i}", int(y), p) for i, (p, y) in enumerate(zip(planes, labels, strict=True))]
    result = evaluate_classifier(trained["model"], cases, config=CONFIG, device="cpu")
    gt = result.by_source["gt"]
    assert set(result.by_source) == {"gt"}
    np.testing.assert_allclose(gt.probabilities, predict_lesions(trained["model"], planes, "cpu"))
    assert gt.auc.auc == pytest.approx(roc_auc_score(labels, gt.probabilities))
    assert "test/auc_gt_planes" in result.metrics_dict() and "test/auc" not in result.metrics_dict()


@pytest.mark.parametrize("planes", [("coronal",), ("transverse", "sagittal"), ("sagittal", "coronal")])
def test_plane_variants_train_and_evaluate_on_their_planes_only(planes: tuple[str, ...]) -> None:
    model = lora_classifier(planes)
    fed: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: fed.append(args[0].shape[1]))
    data, labels = synthetic_lesions(4, 2, SIZE, seed=1)
    config = config_for(planes, cls_epochs=1)
    report = train_classifier(model, loader_for(data, labels), config=config, device="cpu")
    result = evaluate_classifier(
        model,
        [ClsCase(str(i), int(y), p) for i, (p, y) in enumerate(zip(data, labels, strict=True))],
        config=config,
        device="cpu",
    )
    assert report["steps"] == 1 and math.isfinite(report["loss"])
    assert result.planes == planes and result.by_source["gt"].probabilities.shape == (4,)
    assert fed and set(fed) == {len(planes)}


def test_a_model_built_with_other_planes_is_refused() -> None:
    model = build_triplane_classifier(depth=18, planes=("coronal",), norm_groups=8)
    data, labels = synthetic_lesions(2, 1, 8, seed=0)
    with pytest.raises(ValueError, match="cls-planes"):
        train_classifier(model, loader_for(data, labels), config=CONFIG, device="cpu")
    with pytest.raises(ValueError, match="cls-planes"):
        evaluate_classifier(model, [ClsCase("a", 1, data[0])], config=CONFIG, device="cpu")
    with pytest.raises(ValueError, match="axial"):
        parse_cls_planes("transverse,axial")
    assert parse_cls_planes(" coronal , transverse") == ("transverse", "coronal")


def test_bad_inputs_are_refused() -> None:
    model = build_triplane_classifier(depth=18, planes=("coronal",), norm_groups=8)
    config = config_for(("coronal",))
    with pytest.raises(ValueError, match="case 'x'.*label"):
        evaluate_classifier(model, [ClsCase("x", 2, None)], config=config, device="cpu")
    with pytest.raises(ValueError, match="source"):
        evaluate_classifier(model, [ClsCase("x", 1, None, "mask")], config=config, device="cpu")
    with pytest.raises(ValueError, match="cls-optimizer"):
        build_cls_optimizer(model, config_for(("coronal",), cls_optimizer="lbfgs"))
    assert isinstance(
        build_cls_optimizer(model, config_for(("coronal",), cls_optimizer="adamw")), torch.optim.AdamW
    )
    with pytest.raises(ValueError, match="labels"):
        frame_triplet_dataset(np.zeros((2, 3, 1, 4, 4)), [0, 1, 1])


def test_empty_batches_are_skipped() -> None:
    model = lora_classifier(("coronal",))
    data, labels = synthetic_lesions(4, 1, SIZE, seed=2)
    x, y = frame_triplet_dataset(data, labels).tensors
    batches = [(x[:0], y[:0]), [], {"frames": x, "label": y}]
    report = train_classifier(model, batches, config=config_for(("coronal",), cls_epochs=1), device="cpu")
    assert report["skipped_empty_batches"] == 2 and report["steps"] == 1 and report["num_examples"] == 4


def test_lesion_level_batches_are_split_into_frames() -> None:
    model = lora_classifier(("coronal",))
    data, labels = synthetic_lesions(4, 2, SIZE, seed=2)
    batch = {"planes": torch.from_numpy(data), "label": torch.from_numpy(labels), "case_id": list("abcd")}
    report = train_classifier(model, [batch], config=config_for(("coronal",), cls_epochs=1), device="cpu")
    assert report["steps"] == 1 and report["samples_seen"] == 8


def distance(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> float:
    now = trainable_snapshot(model)
    return float(sum(((now[k] - reference[k]) ** 2).sum() for k in reference).sqrt())


def test_proximal_term_pulls_towards_the_reference() -> None:
    start = lora_classifier(("coronal",))
    reference = trainable_snapshot(start)
    data, labels = synthetic_lesions(16, 1, SIZE, seed=4)
    distances = {}
    for mu in (0.0, 10.0):
        model = copy.deepcopy(start)
        config = config_for(("coronal",), cls_epochs=2, cls_lr=0.02, proximal_mu=mu)
        train_classifier(
            model,
            loader_for(data, labels, shuffle=False),
            config=config,
            device="cpu",
            proximal_ref=reference,
        )
        distances[mu] = distance(model, reference)
    assert 0 < distances[10.0] < 0.8 * distances[0.0]
    with pytest.warns(UserWarning, match="proximal_ref"):
        train_classifier(
            copy.deepcopy(start), [], config=config_for(("coronal",), proximal_mu=1.0), device="cpu"
        )
    with pytest.raises(ValueError, match="proximal_ref does not fit"):
        train_classifier(
            copy.deepcopy(start),
            [],
            config=config_for(("coronal",), proximal_mu=1.0),
            device="cpu",
            proximal_ref={},
        )


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")
def test_training_runs_under_opacus_with_poisson_sampling(tmp_path) -> None:
    from opacus import PrivacyEngine

    start = lora_classifier()
    reference = trainable_snapshot(start)
    data, labels = synthetic_lesions(16, 1, SIZE, seed=6)
    runs = {}
    for mu in (0.0, 50.0):
        model = copy.deepcopy(start)
        config = config_for(PLANES, cls_epochs=1, proximal_mu=mu, cls_lr=0.01)
        engine = PrivacyEngine(accountant="rdp")
        torch.manual_seed(7)  # same Poisson batches and noise for both runs
        private, optimizer, loader = engine.make_private(
            module=model,
            optimizer=build_cls_optimizer(model, config),
            data_loader=loader_for(data, labels),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=True,
        )
        report = train_classifier(
            private, loader, config=config, device="cpu", optimizer=optimizer, proximal_ref=reference
        )
        assert report["steps"] >= 1 and report["steps"] + report["skipped_empty_batches"] == 2
        assert sum(steps for _, _, steps in engine.accountant.history) == report["steps"]
        assert engine.get_epsilon(delta=1e-3) > 0
        runs[mu] = (model, distance(private, reference))
    model, moved = runs[0.0]
    assert moved > 0
    for name, value in model.state_dict().items():
        if "lora_" not in name and ".head." not in name:
            assert torch.equal(value, start.state_dict()[name]), f"frozen {name} changed under DP"
    assert runs[50.0][1] < runs[0.0][1]  # the FedProx pull survives Opacus' gradient privatisation
    lesion_batch = {"planes": torch.from_numpy(data), "label": torch.from_numpy(labels)}
    with pytest.raises(ValueError, match="Opacus"):
        train_classifier(
            private, [lesion_batch], config=config, device="cpu", optimizer=optimizer, proximal_ref=reference
        )
    heatmaps = grad_cam(private, data[0])  # works on the Opacus wrapper too (hooks paused)
    assert set(heatmaps) == set(PLANES)


def test_grad_cam_heatmaps_and_images(trained: dict, tmp_path) -> None:
    model = trained["model"]
    planes, _ = synthetic_lesions(1, 2, 64, seed=9)  # 64 px: the last stage is 2 x 2
    grads_before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    heatmaps = grad_cam(model, planes[0], frame=1)
    with pytest.raises(ValueError, match="stage"):
        grad_cam(model, planes[0], stage="fc")
    assert set(heatmaps) == set(PLANES) and model.training
    for heatmap in heatmaps.values():
        assert heatmap.shape == (64, 64) and heatmap.dtype == np.float32
        assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0 and heatmap.max() in (0.0, 1.0)
    assert any(h.max() == 1.0 and h.min() < 1.0 for h in heatmaps.values())
    for name, param in model.named_parameters():
        before = grads_before[name]
        assert (param.grad is None) == (before is None) and (
            before is None or torch.equal(param.grad, before)
        )
    paths = save_grad_cam_images(heatmaps, planes[0], tmp_path / "cam", "case/01", frame=1)
    assert [p.name for p in paths] == [f"case_01_{plane}_gradcam.png" for plane in PLANES]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            assert image.size == (300, 300)
