#!/usr/bin/env bash
# The GPU day in one command (docs/performance.md, "GPU path"): encoder reference vs fast × fp32/bf16/fp16,
# the SDPA kernel checks, a training step of both models and click latency, into benchmarks/results/gpu.json.
# Extra arguments go to benchmarks/bench_gpu.py (e.g. --device cuda:1, --repeats 10, --out FILE).
# Without CUDA it stops with a message; `benchmarks/gpu.sh --device cpu --quick` is the smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" benchmarks/bench_gpu.py "$@"
