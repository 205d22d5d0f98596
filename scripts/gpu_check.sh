#!/usr/bin/env bash
# One command that proves the CUDA path on a device (docs/performance.md, "CUDA readiness"):
# parity against PEFT in fp16/bf16, the sync budget of a steady-state step under
# torch.cuda.set_sync_debug_mode, CUDA-graph replay without recompiles after warm-up, and the
# decode benchmark (eager vs compiled), written to one report:
#   bench/results/gpu_check/gpu_check.md (and .json), or the folder given as $1.
#   scripts/gpu_check.sh [DIR] [--no-bench] [--only parity,syncs,reroute_syncs,graphs,bench]
#                        [--step compiled|static|eager]
# Run it from a checkout with the dev environment (it imports bench/ and tests/, which the
# serving images do not ship).
# Exit status: 0 when every check passed, 1 when one failed; on a machine without CUDA it says so
# and exits 0. Extra arguments go to `python -m bench.gpu_check` (e.g. --no-bench).
# PYTHON picks the interpreter (default: the repo's .venv, else python3).
set -euo pipefail
OUT="$(cd "$(dirname "$0")/.." && pwd)/bench/results/gpu_check"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # a first argument that is not an option is the folder
  case "$1" in /*) OUT="$1" ;; *) OUT="$PWD/$1" ;; esac  # relative to where it was called from
  shift
fi
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m bench.gpu_check --out "$OUT" "$@"
