"""Benchmark: what secure aggregation (``federation.secure-aggregation``) costs per round, in bytes and seconds.

Builds the adapter of a random base (``--config``, default the ``small`` test preset; nothing is downloaded) and
runs one round of the masking maths of :mod:`shared.secagg` for ``--sites`` sites, as the sites and the server
run it (:mod:`client.secure_aggregation`, :mod:`server.secure_aggregation`), one site dropping after the share
exchange when ``--drop`` is given:

* per site: ``keys`` (two X25519 pairs), ``shares`` (Shamir split of two secrets, one encrypted box per peer),
  ``mask`` (ring encoding, decrypting the peers' boxes, one ChaCha20 expansion per peer and the self mask);
* server: ``unmask`` (rebuilding t-of-n secrets, removing the masks, decoding);
* bytes per site: the upload with and without secure aggregation (uint64 vs float32 per adapter element) and the
  key and share messages.

Medians over ``--repeats``. Not a test: run it by hand.

    .venv/bin/python benchmarks/bench_secagg.py --out benchmarks/results/secagg.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from harness import REPO, Conditions, write_report


def _adapter_elements(config: str, cls_depth: int) -> int:
    from shared.adapters import extract_adapter, lora_specs_from_config
    from shared.base import build_random_base, working_copy, wrap_for_training
    from shared.config import AdapterConfig
    from shared.protocol import adapter_to_record

    base = build_random_base(config, cls_depth=cls_depth, seed=0)
    specs = lora_specs_from_config(AdapterConfig())
    adapter = extract_adapter(
        wrap_for_training(working_copy(base, specs), specs), base_fingerprints=base.fingerprints
    )
    record = adapter_to_record(adapter.tensors)
    return sum(record[key].numpy().size for key in record.keys())


def _round(length: int, sites: int, drop: bool) -> dict[str, Any]:
    """One round's timings (seconds) and message sizes (bytes) for ``sites`` sites of ``length`` elements."""
    import numpy as np

    from shared import secagg

    ids = list(range(1, sites + 1))
    threshold = secagg.threshold_for(sites)
    rng = np.random.default_rng(0)
    updates = {i: rng.normal(scale=1e-2, size=length) for i in ids}
    t0 = time.perf_counter()
    masking = {i: secagg.KeyPair.generate() for i in ids}
    sharing = {i: secagg.KeyPair.generate() for i in ids}
    keys_s = (time.perf_counter() - t0) / sites
    t0 = time.perf_counter()
    seeds, boxes = {}, {}
    for i in ids:
        seeds[i] = secagg.new_seed()
        seed_shares = secagg.split_secret(seeds[i], threshold=threshold, num_shares=sites)
        key_shares = secagg.split_secret(masking[i].private, threshold=threshold, num_shares=sites)
        for k, j in enumerate(ids):
            shares = secagg.SiteShares(seed_shares[k], key_shares[k])
            boxes[(i, j)] = secagg.encrypt_shares(
                shares,
                private=sharing[i].private,
                peer_public=sharing[j].public,
                server_round=1,
                src=i,
                dst=j,
            )
    shares_s = (time.perf_counter() - t0) / sites
    survivors = ids[:-1] if drop else ids
    t0 = time.perf_counter()
    inputs, held = {}, {}
    for i in ids:
        held[i] = {
            j: secagg.decrypt_shares(
                boxes[(j, i)],
                private=sharing[i].private,
                peer_public=sharing[j].public,
                server_round=1,
                src=j,
                dst=i,
            )
            for j in ids
        }
        pairs = {
            j: secagg.pair_seed(masking[i].private, masking[j].public, server_round=1, me=i, peer=j)
            for j in ids
            if j != i
        }
        encoded = secagg.encode(updates[i], 100.0, num_sites=sites)
        inputs[i] = secagg.mask(encoded, me=i, self_seed=seeds[i], pair_seeds=pairs)
    mask_s = (time.perf_counter() - t0) / sites
    t0 = time.perf_counter()
    answering = survivors[:threshold]
    rebuilt = {
        u: secagg.combine_secret([held[a][u].self_seed for a in answering], threshold=threshold)
        for u in survivors
    }
    dropped = {
        v: secagg.combine_secret([held[a][v].mask_key for a in answering], threshold=threshold)
        for v in ids
        if v not in survivors
    }
    total = sum((inputs[u] for u in survivors[1:]), inputs[survivors[0]])
    ring = secagg.unmask(
        total,
        self_seeds=rebuilt,
        dropped_keys=dropped,
        public_keys={i: masking[i].public for i in ids},
        server_round=1,
    )
    mean = secagg.decode(ring, 100.0 * len(survivors))
    unmask_s = time.perf_counter() - t0
    error = float(np.max(np.abs(mean - np.mean([updates[u] for u in survivors], axis=0))))
    box_bytes = len(boxes[(1, 2)])
    return {
        "site_keys_s": keys_s,
        "site_shares_s": shares_s,
        "site_mask_s": mask_s,
        "server_unmask_s": unmask_s,
        "max_abs_error_of_the_mean": error,
        "upload_bytes_plain": 4 * length,
        "upload_bytes_masked": 8 * length,
        "keys_message_bytes": 2 * secagg.SEED_BYTES,
        "shares_message_bytes": (sites - 1) * box_bytes,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "secagg.json")
    parser.add_argument("--config", default="small", help="SAM-Med3D preset (default small)")
    parser.add_argument(
        "--cls-depth", type=int, default=18, help="ResNet depth of the classifier (default 18)"
    )
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--drop", action="store_true", help="one site drops after the share exchange")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    conditions = Conditions()
    length = _adapter_elements(args.config, args.cls_depth)
    runs = [_round(length, args.sites, args.drop) for _ in range(args.repeats)]
    result = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    report = {
        "config": args.config,
        "cls_depth": args.cls_depth,
        "adapter_elements": length,
        "sites": args.sites,
        "drop": args.drop,
        "repeats": args.repeats,
        "result": result,
        **conditions.report(),
    }
    write_report(args.out, report)
    for key, value in result.items():
        print(f"{key:28s} {value:.4g}")
    return report


if __name__ == "__main__":
    main()
