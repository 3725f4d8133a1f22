#!/usr/bin/env bash
# The main job's budget (issue 18): `make demo` in a fresh clone of this repository with an empty HOME (no pip
# cache, no pretrained base), with `yes` keeping one core busy, every output line stamped with the seconds since
# the start. Writes the stamped log and the total to OUT (default benchmarks/results/demo_budget.log).
#   bash benchmarks/demo_budget.sh [OUT]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$repo/benchmarks/results/demo_budget.log}"
work="$(mktemp -d /tmp/fedabus-demo-budget-XXXXXX)"
git clone -q "$repo" "$work/main"
[ -d "$repo/../shared" ] && cp -r "$repo/../shared" "$work/shared"
mkdir -p "$work/home" "$(dirname "$out")"
yes > /dev/null &
busy=$!
trap 'kill $busy 2>/dev/null || true' EXIT
{
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  start=$(date +%s)
  (cd "$work/main" && HOME="$work/home" PYTHONUNBUFFERED=1 make demo 2>&1) |
    while IFS= read -r line; do printf '%s %s\n' "$(( $(date +%s) - start ))" "$line"; done
  echo "TOTAL $(( $(date +%s) - start )) s"
  echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$out"
tail -n 3 "$out"
