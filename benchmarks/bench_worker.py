"""What measuring candidates in a worker process costs: the worker's start (a new interpreter importing
torch and Triton, then the problem's inputs), the round trip of one request, and a whole tuning run of a
small GEMM in the worker against the same run in this process.

    .venv/bin/python benchmarks/bench_worker.py            # GPU when there is one, else the interpreter
    .venv/bin/python benchmarks/bench_worker.py --smoke    # tiny, CPU (CI)

Writes benchmarks/results/bench_worker-<host>-<date>.json with the machine, versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run on CPU through the Triton interpreter")
    ap.add_argument("--requests", type=int, default=200, help="round trips timed (default 200)")
    ap.add_argument("--trials", type=int, default=8, help="configurations measured per tuning run (default 8)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/bench_worker-<host>-<date>.json)")
    args = ap.parse_args()

    import torch

    if args.smoke or not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.requests, args.trials = 20, 2

    import triton

    from torchtune_ops.tuning import worker
    from torchtune_ops.kernels.gemm import GEMM, GemmProblem
    from torchtune_ops.storage.store import Store
    from torchtune_ops.tuning.tuner import tune_problem

    size = 1024 if device == "cuda" else 24
    problem = GemmProblem(op="mm", batch=1, M=size, N=size, K=size, dtype="float16" if device == "cuda" else "float32")

    worker.shutdown()
    t0 = time.perf_counter()
    timer = worker.WorkerTimer(GEMM, problem, device=device)
    timer(None, key="aten")  # start + set-up + first measurement
    start_s = time.perf_counter() - t0
    w = timer._worker
    trips = []
    for _ in range(args.requests):
        t = time.perf_counter()
        w.request({"cmd": "ping"}, 30.0)  # a pure round trip
        trips.append((time.perf_counter() - t) * 1e3)
    timer.close()

    runs = {}
    for isolate in (False, True):
        with tempfile.TemporaryDirectory() as d, Store.open(Path(d) / "c.sqlite") as st:
            t = time.perf_counter()
            e = tune_problem(GEMM, problem, device=device, store=st, max_trials=args.trials, patience=0,
                             isolate=isolate, time_budget_s=600)
            runs["worker" if isolate else "in_process"] = {"seconds": time.perf_counter() - t,
                                                            "trials": e.trials, "winner": e.winner}
    worker.shutdown()

    result = {
        "benchmark": "bench_worker",
        "machine": platform.node(),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.machine()}), Triton interpreter",
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "problem": GEMM.problem_to_dict(problem),
        "worker_start_s": round(start_s, 3),
        "round_trip_ms": {"median": round(statistics.median(trips), 4), "p90": round(sorted(trips)[int(0.9 * (len(trips) - 1))], 4)},
        "tuning_run": {k: {**v, "seconds": round(v["seconds"], 3)} for k, v in runs.items()},
        "note": "worker start includes a new interpreter importing torch and Triton; interpreter timings are not GPU timings",
    }
    out = Path(args.out) if args.out else (
        HERE / "results" / f"bench_worker-{platform.node()}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
