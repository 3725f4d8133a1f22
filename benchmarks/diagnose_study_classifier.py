"""Diagnosis: how far did each arm of a finished study move its classifier from the starting one?

A GT-plane AUC read alone cannot tell a classifier that learned from one that stayed where it started (a fresh
fusion head has some ranking of the lesions too, by chance better or worse than 0.5). For every model of a study
folder (``fedabus study --out OUT``) and every test site this prints, from the study's own files:

* ``start_auc``: the GT-plane AUC of the starting classifier (the base with a fresh adapter, as every arm starts);
* ``auc``: the chosen model's GT-plane AUC (the study's ``auc_gt_planes``, recomputed from ``cases.csv``);
* ``corr_start``: Pearson correlation of the chosen model's GT-plane probabilities with the start's over the
  site's test lesions (near 1: the ranking is still the start's);
* ``head_change``: ‖head − head at start‖ / ‖head at start‖ of the fusion head, and ``lora_b``: ‖B‖ over the
  classifier's LoRA B matrices (0 at the start).

Only the classifier runs (the GT planes of each test lesion, no segmentation): a minute on a CPU for the demo.

    .venv/bin/python benchmarks/diagnose_study_classifier.py --study OUT [--base BASE] [--out report.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from harness import REPO, machine, write_report

sys.path.insert(0, str(REPO))


def _model_folder(study: Path, model: dict) -> Path:
    """The model's folder inside ``study`` (the job file records the path the study was written to)."""
    recorded = Path(model["adapter"])
    parts = recorded.parts
    return study.joinpath(*parts[parts.index("models") : -2])


def _start_probabilities(
    base_path: Path, sites_dir: Path, config
) -> dict[tuple[str, str], tuple[int, float]]:
    """(site, case id) -> (label, malignancy probability of the starting classifier on the GT planes)."""
    import numpy as np
    import torch

    from shared.adapters import model_specs
    from shared.base import load_base, wrap_for_training
    from shared.data.loaders import cls_dataset
    from shared.training.cls import predict_lesions
    from shared.training.site import open_site

    base = load_base(base_path)
    torch.manual_seed(config.train.seed)  # as every arm's fresh adapter (shared.study.arms)
    cls = wrap_for_training(base, model_specs(config))["cls"]
    out = {}
    for site_dir in sorted(p for p in sites_dir.iterdir() if p.is_dir()):
        site = open_site(site_dir)
        items = cls_dataset(list(site.test_cases), config.data, site_config=site.site_config, training=False)
        items = [items[i] for i in range(len(items))]
        probs = predict_lesions(cls, np.stack([it["planes"].numpy() for it in items]), "cpu")
        for item, prob in zip(items, probs, strict=True):
            out[(site.name, item["case_id"])] = (int(item["label"]), float(prob))
    return out


def _weights(model_dir: Path, base_path: Path) -> dict[str, float]:
    """The chosen adapter's fusion-head change from the base's head and the norm of its classifier LoRA B."""
    from safetensors.torch import load_file

    adapter = load_file(str(model_dir / "server" / "chosen_adapter.safetensors"))
    base = load_file(str(base_path))
    heads = [k for k in adapter if k.startswith("cls.head.")]
    change = sum(float(((adapter[k] - base[k]) ** 2).sum()) for k in heads)
    size = sum(float((base[k] ** 2).sum()) for k in heads)
    lora_b = sum(float((t**2).sum()) for k, t in adapter.items() if k.startswith("cls.") and ".lora_B." in k)
    return {"head_change": (change / size) ** 0.5, "lora_b": lora_b**0.5} if heads else {}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study", type=Path, required=True, help="a finished study's output folder")
    parser.add_argument("--base", type=Path, help="the study's base (default: the cached demo base)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    import numpy as np

    from shared.config import load_config
    from shared.pretrain import ensure_base
    from shared.statistics import delong_auc

    config = load_config({"model.cls-depth": 18, "train.progress": False})
    base_path = args.base or ensure_base(config)
    jobs = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((args.study / "jobs").glob("*.json"))]
    cases = list(csv.DictReader((args.study / "cases.csv").open(encoding="utf-8")))
    folders = {m["name"]: _model_folder(args.study, m) for job in jobs for m in job["models"]}
    sites_dir = next(iter(folders.values())) / "sites"
    start = _start_probabilities(base_path, sites_dir, config)
    rows = []
    for name, folder in folders.items():
        weights = _weights(folder, base_path)
        for site in sorted({c["test_site"] for c in cases if c["model"] == name}):
            mine = [c for c in cases if c["model"] == name and c["test_site"] == site and c["prob_gt"]]
            labels = np.array([int(c["label"]) for c in mine])
            probs = np.array([float(c["prob_gt"]) for c in mine])
            before = np.array([start[(site, c["case_id"])][1] for c in mine])
            rows.append(
                {
                    "model": name,
                    "site": site,
                    "n": len(mine),
                    "start_auc": delong_auc(labels, before).value,
                    "auc": delong_auc(labels, probs).value,
                    "corr_start": float(np.corrcoef(probs, before)[0, 1]),
                    **weights,
                }
            )
    print("| model | site | n | start GT-AUC | GT-AUC | corr. with start | head change | ‖LoRA B‖ |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['site']} | {r['n']} | {r['start_auc']:.2f} | {r['auc']:.2f} | "
            f"{r['corr_start']:+.2f} | {r.get('head_change', float('nan')):.3f} | {r.get('lora_b', float('nan')):.3f} |"
        )
    if args.out:
        write_report(args.out, {"machine": machine(), "study": str(args.study), "rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
