#!/usr/bin/env bash
# One section of benchmarks/gpu_suite.py per device call. Expected time: 9 minutes per call (BUDGET_S 480 s
# + 60 s), one call per 15-minute GPU session, after benchmarks/gpu_quick.sh (docs/gpu.md).
#
#   scripts/gpu_run.sh kernels|search|e2e|report [extra gpu_suite.py arguments]
#
# 1. installs the wheels the GPU machine lacks (optuna & co.) from .whl/ (carry [".whl"]; fill it here first
#    with `bash ../shared/device/wheels.sh`) into /tmp/site;
# 2. runs the section with a time budget (BUDGET_S, default 480 s: no measurement starts after it; the
#    whole command is cut at BUDGET_S + 60 s), resuming from benchmarks/results/gpu_suite-<gpu>.json;
# 3. leaves in $OUT (at most 4 files): gpu_suite-<gpu>.json and .md (rewritten after every measurement, so
#    a killed run keeps what it measured), the log, and for `search` spaces.tgz (the recorded spaces).
# Back on the development machine: copy the .json/.md into benchmarks/results/ and unpack spaces.tgz in the
# repository root, then commit; the next call resumes from there.
set -uo pipefail
cd "$(dirname "$0")/.."
section=${1:?usage: scripts/gpu_run.sh kernels|search|e2e|report [gpu_suite.py args]}
shift
OUT_DIR="${OUT:-benchmarks/out/gpu_run}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_run: installing .whl failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_run: no .whl/*.whl (run 'bash ../shared/device/wheels.sh' in the checkout and carry .whl):" \
         "without optuna, tuning and the replay fail" >&2
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

BUDGET=${BUDGET_S:-480}
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,temperature.gpu,clocks.sm --format=csv,noheader \
    2>/dev/null | tee "$OUT_DIR/gpu_suite-$section.log"
timeout --signal=TERM --kill-after=10 $((BUDGET + 60)) \
    "$PY" benchmarks/gpu_suite.py --section "$section" --budget-s "$BUDGET" --mirror "$OUT_DIR" "$@" 2>&1 \
    | tee -a "$OUT_DIR/gpu_suite-$section.log"
rc=${PIPESTATUS[0]}
if [ "$section" = search ] && [ -d benchmarks/results/spaces ]; then
    tar czf "$OUT_DIR/spaces.tgz" benchmarks/results/spaces
fi
[ "$rc" -eq 124 ] && echo "gpu_run: cut at $((BUDGET + 60)) s; what was measured is in $OUT_DIR; run '$section' again"
exit "$rc"
