#!/usr/bin/env bash
# Create .venv (if missing) and install torchtune_ops with its test tools into it.
# Where no NVIDIA GPU is present, the CPU build of torch is installed first, so that pip does not pull a
# multi-GB CUDA build. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VPY" -m pip install -q torch
  else
    echo "setup: no NVIDIA GPU found; installing the CPU build of torch 2.13.0" >&2
    "$VPY" -m pip install -q torch==2.13.0
  fi
fi
# fleet: SQLAlchemy and psycopg (fleet tests); dashboard: optuna-dashboard (tests/test_dashboard.py);
# train: scikit-learn (the GEMM prior's export test, benchmarks/perfmodel_eval.py);
# baselines: kernel_tuner (the Kernel Tuner replay's smoke test); plot: matplotlib (report --plot)
"$VPY" -m pip install -q -e ".[test,fleet,dashboard,train,baselines,plot]"
