#!/usr/bin/env bash
# Download, on a machine with a network, the wheels benchmarks/gpu_check.sh needs on a GPU
# image that has torch, numpy, scikit-learn, safetensors and pytest but no network:
#   bash benchmarks/gpu_wheels.sh [DIR] [PYTHON_VERSION]      (defaults: .whl and 3.12)
# then: bash benchmarks/gpu_check.sh DIR
set -euo pipefail
DIR="${1:-.whl}"
PYVER="${2:-3.12}"
mkdir -p "$DIR"
# --no-deps on purpose: every dependency is named here, and torch is never fetched (a
# dependency resolver would pull a multi-GB CUDA build for torch-pruning and torchao).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d "$DIR" \
    optuna==5.0.0 plotly==7.1.0 narwhals==2.29.0 sqlalchemy==2.1.9 greenlet==3.5.6 alembic==1.20.1 \
    mako==1.4.3 colorlog==6.12.0 torch-pruning==1.6.1 torchao==0.18.0
ls -1 "$DIR"
