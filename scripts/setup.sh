#!/usr/bin/env bash
# Create .venv and install the project with its dev extras.
# Torch is installed first, pinned, so nothing later pulls a different (CUDA) build:
#   TORCH_SPEC       the torch requirement (default torch==2.13.0)
#   TORCH_INDEX_URL  an index to take it from, e.g. PyTorch's CPU wheel index for a CPU-only box
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
"$PY" -m pip install --quiet --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
"$PY" -m pip install --quiet -e ".[dev]"
