#!/usr/bin/env bash
# The GPU check, one short run (under 5 minutes on a CUDA machine, nothing downloaded):
#   1. the GPU-marked tests;
#   2. a 10-trial search of experiments/digits_cnn.toml on `cuda`;
#   3. the exported best model re-measured in a fresh process, beside the search's numbers.
#
#   bash benchmarks/gpu_check.sh [WHEEL_DIR]
#
# WHEEL_DIR: a folder of wheels for what this machine lacks (e.g. optuna, plotly, torch-pruning
# on a GPU image without network; benchmarks/gpu_wheels.sh downloads them on a machine that
# has a network). They are unpacked into a private folder, nothing is installed system-wide.
# On a machine without CUDA the CUDA parts are skipped with a message; GPU_CHECK_DEVICE=cpu
# runs steps 2 and 3 on the CPU instead (to check this script itself).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/slimsearch-gpu-check.XXXXXX")"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export SLIMSEARCH_LOCK_DIR="$WORK/locks"
START=$SECONDS

if [ -n "${1:-}" ]; then
    echo "== installing the wheels in $1 into $WORK/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$1"/*.whl
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

echo "== environment"
"$PY" - <<'EOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}")
missing = []
for name in ("optuna", "plotly", "torch_pruning", "sklearn", "safetensors", "pytest", "torchao"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '?')}")
    except ImportError:
        missing.append(name)
if missing:
    print(f"  not importable: {', '.join(missing)}")
if set(missing) - {"torchao"}:
    sys.exit("missing packages: give a folder of wheels as the first argument "
             "(benchmarks/gpu_wheels.sh makes one)")
EOF

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
DEVICE="${GPU_CHECK_DEVICE:-}"
if [ -z "$DEVICE" ]; then
    if [ "$HAS_CUDA" = 1 ]; then DEVICE=cuda; fi
fi

echo "== 1. GPU-marked tests"
if [ "$HAS_CUDA" = 1 ]; then
    "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
else
    echo "SKIPPED: no CUDA device here, so the GPU-marked tests would only skip"
fi

if [ -z "$DEVICE" ]; then
    echo "== 2. search on cuda: SKIPPED (no CUDA device; GPU_CHECK_DEVICE=cpu runs it on the CPU)"
    echo "== 3. fresh-process re-measure: SKIPPED (nothing was searched)"
    echo "== done in $((SECONDS - START)) s: CPU-only machine, the CUDA parts were skipped"
    exit 0
fi

TRIALS="${GPU_CHECK_TRIALS:-10}"
echo "== 2. $TRIALS-trial search of experiments/digits_cnn.toml on $DEVICE"
"$PY" - "$WORK/digits_cnn_gpu.toml" "$DEVICE" <<'EOF'
import re, sys
text = open("experiments/digits_cnn.toml").read()
text, n = re.subn(r'(?m)^device = "auto"', f'device = "{sys.argv[2]}"', text)
assert n == 1, "experiments/digits_cnn.toml no longer has device = \"auto\" in [target]"
open(sys.argv[1], "w").write(text)
EOF
"$PY" -m slimsearch run "$WORK/digits_cnn_gpu.toml" --trials "$TRIALS" --run-dir "$WORK/run"

echo "== 3. the exported best model, re-measured in a fresh process"
BEST=$("$PY" - "$WORK/run/pareto.json" <<'EOF'
import json, sys
pareto = json.load(open(sys.argv[1]))
# the most accurate Pareto trial that is not the teacher itself, smallest on ties
trials = [t for t in pareto["trials"] if t.get("baseline") != "teacher"] or pareto["trials"]
best = max(trials, key=lambda t: (t["metrics"]["val_accuracy"], -t["metrics"]["size_bytes"]))
print(best["number"])
EOF
)
"$PY" -m slimsearch export "$WORK/run" --trial "$BEST" --out "$WORK/bundle"
"$PY" benchmarks/remeasure.py "$WORK/run" "$WORK/bundle"
echo "== done in $((SECONDS - START)) s; run folder: $WORK/run"
