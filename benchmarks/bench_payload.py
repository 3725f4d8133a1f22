"""Benchmark: bytes per site per round and encode/decode time of each ``federation.compression`` (issue 18 item 3).

Builds a ``vit_b_ori``-sized base with random weights (:func:`shared.base.build_random_base`; nothing is
downloaded), wraps it with the configured adapter and extracts the adapter with the real code
(:func:`shared.adapters.extract_adapter`); LoRA B, zero at initialisation, is filled with small random values so
the adapter is not trivially compressible. For each encoding it measures one train round through
:mod:`shared.protocol`, as the server and a site run it:

* ``down``: the server encodes the global adapter (:func:`~shared.protocol.encode_record`), the site decodes it
  (:func:`~shared.protocol.record_to_adapter`);
* ``up``: the site encodes its update, a random step of relative size 1e-3 from what it received
  (:func:`~shared.protocol.update_to_record`, error feedback included), the server decodes it
  (:func:`~shared.protocol.record_to_update`).

Reported per encoding: bytes of array data per model and in total each way (MiB = 2**20 bytes), the median
encode and decode seconds over ``--repeats``, and the error: max abs error over the int8 step (scale / 2 bound:
<= 0.5) and the relative L2 error of the update as the server sees it. Not a test: run it by hand.

    .venv/bin/python benchmarks/bench_payload.py --out benchmarks/results/payload.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from harness import REPO, Conditions, write_report

MIB = 2**20


def _timed(repeats: int, work):
    """(last result, median seconds) of ``repeats`` calls of ``work()``."""
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        seconds.append(time.perf_counter() - started)
    return result, statistics.median(seconds)


def _adapter(config: str, cls_depth: int, seed: int) -> tuple[dict[str, Any], float]:
    """The adapter tensors (name -> float32 tensor) of a random ``config`` base, and the seconds to build it."""
    import torch

    from shared.adapters import extract_adapter, lora_specs_from_config
    from shared.base import build_random_base, working_copy, wrap_for_training
    from shared.config import AdapterConfig

    started = time.perf_counter()
    base = build_random_base(config, cls_depth=cls_depth, seed=seed)
    specs = lora_specs_from_config(AdapterConfig())
    adapter = extract_adapter(
        wrap_for_training(working_copy(base, specs), specs), base_fingerprints=base.fingerprints
    )
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: (0.02 * torch.randn(t.shape, generator=generator) if ".lora_B." in name else t.float().clone())
        for name, t in adapter.tensors.items()
    }
    return tensors, time.perf_counter() - started


def _per_model_bytes(record) -> dict[str, int]:
    from shared.protocol import payload_bytes

    out: dict[str, int] = {}
    for key in record.keys():
        model = key.split("/", 1)[0]
        out[model] = out.get(model, 0) + payload_bytes(type(record)({key: record[key]}))
    return out


def _measure(tensors: dict[str, Any], compression: str, repeats: int, seed: int) -> dict[str, Any]:
    import torch

    from shared.protocol import (
        adapter_to_record,
        encode_record,
        layout_of,
        payload_bytes,
        record_to_adapter,
        record_to_update,
        update_to_record,
    )

    layout = layout_of(tensors)
    packed = adapter_to_record(tensors)  # the server's float32 global adapter
    down, down_encode_s = _timed(repeats, lambda: encode_record(packed, layout, compression=compression))
    received, down_decode_s = _timed(
        repeats, lambda: record_to_adapter(down, layout, compression=compression)
    )
    generator = torch.Generator().manual_seed(seed + 1)
    step = {n: 1e-3 * t.abs().mean() * torch.randn(t.shape, generator=generator) for n, t in received.items()}
    update = {n: received[n] + step[n] for n in received}
    (up, _), up_encode_s = _timed(
        repeats, lambda: update_to_record(update, received, compression=compression)
    )
    server, up_decode_s = _timed(
        repeats, lambda: record_to_update(up, packed, layout, compression=compression)
    )
    seen = record_to_adapter(server, layout)  # the update as admission and the strategies see it
    true = {n: tensors[n] + step[n] for n in tensors}  # what an exact channel would deliver
    diff = torch.cat([(seen[n] - true[n]).reshape(-1) for n in tensors]).double()
    moved = torch.cat([step[n].reshape(-1) for n in tensors]).double()
    down_err = max(
        float((received[n] - tensors[n]).abs().max()) / max(float(tensors[n].abs().max()) / 127, 1e-30)
        for n in tensors
    )
    return {
        "down_bytes": payload_bytes(down),
        "down_mib": payload_bytes(down) / MIB,
        "down_bytes_per_model": _per_model_bytes(down),
        "up_bytes": payload_bytes(up),
        "up_mib": payload_bytes(up) / MIB,
        "up_bytes_per_model": _per_model_bytes(up),
        "down_encode_s": down_encode_s,
        "down_decode_s": down_decode_s,
        "up_encode_s": up_encode_s,
        "up_decode_s": up_decode_s,
        "down_max_abs_error_over_int8_step": down_err,
        "up_relative_l2_error_of_the_step": float(diff.norm() / moved.norm()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "payload.json")
    parser.add_argument("--config", default="vit_b_ori", help="SAM-Med3D preset (default vit_b_ori)")
    parser.add_argument(
        "--cls-depth", type=int, default=50, help="ResNet depth of the classifier (default 50)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="encode/decode repetitions (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    conditions = Conditions()
    from shared.config import COMPRESSIONS

    tensors, build_s = _adapter(args.config, args.cls_depth, args.seed)
    elements = {
        model: sum(t.numel() for n, t in tensors.items() if n.startswith(f"{model}."))
        for model in ("seg", "cls")
    }
    results = {c: _measure(tensors, c, args.repeats, args.seed) for c in COMPRESSIONS}
    report = {
        "config": args.config,
        "cls_depth": args.cls_depth,
        "parameters_per_model": elements,
        "adapter_build_s": build_s,
        "repeats": args.repeats,
        "results": results,
        **conditions.report(),
    }
    write_report(args.out, report)
    for compression, r in results.items():
        print(
            f"{compression:5s} down {r['down_mib']:7.2f} MiB (seg {r['down_bytes_per_model']['seg'] / MIB:6.2f})  "
            f"up {r['up_mib']:7.2f} MiB  encode {r['up_encode_s']:.3f} s  decode {r['up_decode_s']:.3f} s  "
            f"up rel. error {r['up_relative_l2_error_of_the_step']:.2e}"
        )
    return report


if __name__ == "__main__":
    main()
