#!/usr/bin/env bash
# The first command on a lent GPU (expected time: at most 8 minutes on an H100, self-limiting).
# Needs no extra wheels: torch, Triton, numpy and pytest (pytest-xdist when there) are enough.
#   run(command="bash benchmarks/gpu_quick.sh", timeout_s=540)
# Writes $OUT/gpu_quick.json after every row (benchmarks/results/ when OUT is unset) and prints a short
# table last. DEADLINE_S (default 420) is when no new measurement starts; the whole command is cut at
# 470 s even if a measurement hangs. Extra arguments go to benchmarks/gpu_quick.py (e.g. --skip tests).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=python3
command -v "$PY" >/dev/null || PY=python
timeout -k 10 470 "$PY" benchmarks/gpu_quick.py --out "$OUT_DIR" --deadline-s "${DEADLINE_S:-420}" "$@" \
    2>&1 | tee "$OUT_DIR/gpu_quick.log"
rc=${PIPESTATUS[0]}
echo "gpu_quick: rc=$rc; results in $OUT_DIR/gpu_quick.json"
exit "$rc"
