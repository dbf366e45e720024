#!/usr/bin/env bash
# One-time (and idempotent) set-up on a fresh machine:
#   1. a virtual environment in .venv (VENV=... to change it);
#   2. torch first (TORCH_SPEC, default torch==2.13.0), so that DeepSpeed's `torch` requirement cannot pull in
#      a multi-GB CUDA build. Where pip reaches the public PyPI, torch==2.13.0 on Linux *is* the CUDA build:
#      TORCH_INDEX=https://download.pytorch.org/whl/cpu ./scripts/setup.sh takes the CPU one from PyTorch's index
#      (the machines this was measured on serve the CPU wheel from their own index, so the default leaves it);
#   3. this package with its dependencies (transformers, accelerate, datasets, trl, deepspeed, ...);
#   4. the offline assets (SmolLM2-135M-Instruct teacher, news articles) converted into
#      $ONPOLICY_KD_CACHE_DIR (default ~/.cache/onpolicy_kd), never into the repo.
# Re-running it does only what is missing (the install re-runs when pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-}

[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PY="$VENV/bin/python"
stamp="$VENV/.onpolicy_kd-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install --quiet ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"
  "$PY" -m pip install --quiet -e ".[dev]"
  touch "$stamp"
fi
HF_HUB_DISABLE_PROGRESS_BARS=1 "$PY" -m onpolicy_kd.assets
