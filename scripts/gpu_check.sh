#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): the worker loop on this machine's GPUs under torchrun, no
# Ray needed, one table at the end. Needs torch, transformers, deepspeed, datasets, evaluate and
# pydantic (the project's venv has them; on a bare GPU machine, pip install them first).
# `--dry` runs the same checks on the CPU with tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
exec "$PYTHON" scripts/gpu_check.py "$@"
