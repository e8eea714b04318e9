#!/usr/bin/env bash
# GPU engine benchmark: one NVIDIA GPU, offline (random-weight Llama-3-architecture model).
# Needs the project installed with a CUDA torch (scripts/setup.sh does that on a GPU machine).
# Each row prints as soon as it is measured; the vLLM backend (compiled, CUDA graphs) comes last.
# bench/gpu.sh --cpu-smoke: the same code paths with a tiny model on the CPU (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
timeout 590 "$PY" -m bench.gpu "$@"
