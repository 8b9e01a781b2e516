#!/usr/bin/env bash
# Expected time: about 8 minutes on an H100 (estimate). Since issue 18 the first command on a GPU is
# benchmarks/gpu_quick.sh (docs/gpu.md); this one is a follow-up for a second session:
#   1. the kernel tests on the GPU: the normal suite plus the @pytest.mark.gpu realistic sizes;
#   2. the other @pytest.mark.gpu tests of the project;
#   3. benchmarks/bench_kernels.py on the full suite (a reduced sweep: SWEEP=32 configs per shape,
#      BUDGET=20 s per shape; run bench_kernels.py alone for the full 128-config sweep).
# Logs and results go to $OUT when it is set, else benchmarks/results/. Exit status: non-zero when a test
# failed or the benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    PY=.venv/bin/python
fi
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: no CUDA device visible to $PY; nothing to do" >&2
    exit 2
fi

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
    "$PY" -c "import torch, triton, platform; p = torch.cuda.get_device_properties(0); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'python', platform.python_version()); \
print(p.name, 'sm_%d%d' % (p.major, p.minor), p.multi_processor_count, 'SMs', \
getattr(p, 'shared_memory_per_block_optin', '?'), 'B shared/block (opt-in)')"
} 2>&1 | tee "$OUT_DIR/gpu_env.txt"

# Compiling dominates: run test files across processes when pytest-xdist is there.
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi

KERNEL_TESTS=(tests/test_gemm.py)
for f in tests/test_conv*.py; do [ -e "$f" ] && KERNEL_TESTS+=("$f"); done

echo "== kernel tests on CUDA: ${KERNEL_TESTS[*]}"
"$PY" -m pytest -q -ra -p no:cacheprovider "${XDIST[@]}" "${KERNEL_TESTS[@]}" 2>&1 | tee "$OUT_DIR/gpu_kernel_tests.log"
rc_kernel=${PIPESTATUS[0]}

echo "== other @pytest.mark.gpu tests"
IGNORES=()
for f in "${KERNEL_TESTS[@]}"; do IGNORES+=(--ignore="$f"); done
"$PY" -m pytest -q -ra -p no:cacheprovider -m gpu --continue-on-collection-errors "${IGNORES[@]}" tests \
    2>&1 | tee "$OUT_DIR/gpu_other_tests.log"
rc_other=${PIPESTATUS[0]}
[ "$rc_other" -eq 5 ] && rc_other=0  # none collected

echo "== kernel benchmark"
"$PY" benchmarks/bench_kernels.py --sweep "${SWEEP:-32}" --budget "${BUDGET:-20}" --max-known "${MAX_KNOWN:-24}" --rep-ms "${REP_MS:-30}" \
    --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench_kernels.log"
rc_bench=${PIPESTATUS[0]}

echo "gpu_check: kernel tests rc=$rc_kernel, other gpu tests rc=$rc_other, bench rc=$rc_bench; results in $OUT_DIR"
[ "$rc_kernel" -eq 0 ] && [ "$rc_other" -eq 0 ] && [ "$rc_bench" -eq 0 ]
