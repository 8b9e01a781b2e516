"""Fleet tuning: wall-clock time of 1 worker versus 3 workers on the same problem list.

The timer is a fake that sleeps for every measurement (``--sleep`` seconds) and never runs the kernel, so
the figure shows the coordination overhead (the queue in Optuna's RDB storage, heartbeats, the shared
results tables), not GPU speed. Everything else is real: the tuner searches, the correctness gate runs the
Triton interpreter on the tiny problems, results go to the database. Workers are processes forked from
this one after the imports and a warm-up, so start-up (importing torch and Optuna) is not counted; each
run starts from an empty database. The ideal 3-worker time is the 1-worker time over 3.

    python benchmarks/bench_fleet.py --smoke                    # seconds, CPU only
    python benchmarks/bench_fleet.py --storage postgresql://... # default: starts PostgreSQL itself
    python benchmarks/bench_fleet.py --backend sqlite

Writes JSON (machine, versions, date, figures) under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from torchtune_ops.tuning import fleet  # noqa: E402
from torchtune_ops.storage.device import fingerprint  # noqa: E402
from torchtune_ops.tuning.timing import FakeTimer  # noqa: E402


def problems(n: int) -> list[tuple[str, dict]]:
    """``n`` distinct small GEMM problems (odd sizes)."""
    return [("gemm", {"op": "mm", "batch": 1, "M": 3 + 2 * i, "N": 13, "K": 11, "dtype": "float32"})
            for i in range(n)]


def _worker(url: str, probs: list, sleep_s: float, max_trials: int, fp: str, out: str, t0: float) -> None:
    fake = FakeTimer({"aten": 1.0}, default=0.5, run=False)
    slept = [0.0]

    def timer(fn, *, key):
        time.sleep(sleep_s)
        slept[0] += sleep_s
        return fake(fn, key=key)

    tuning = [0.0, 0.0]  # seconds inside tune_problem (measuring included), start of the current one

    first_last = [None, None]  # seconds after the fork of the first start and the last finish

    def on_problem(event, family, key):
        now = time.perf_counter()
        if event == "start":
            tuning[1] = now
            if first_last[0] is None:
                first_last[0] = now - t0
        else:
            tuning[0] += now - tuning[1]
            first_last[1] = now - t0

    r = fleet.run_worker(storage=url, problems=probs, device="cpu", timer=timer, max_trials=max_trials,
                         heartbeat_s=2, lease_s=10, poll_s=0.2, fingerprint=fp, on_problem=on_problem)
    Path(out).write_text(json.dumps({"tuned": len(r.tuned), "failed": len(r.failed), "slept_s": slept[0],
                                     "tuning_s": tuning[0], "elapsed_s": r.elapsed_s,
                                     "first_start_s": first_last[0], "last_end_s": first_last[1]}))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def run(url: str, n_workers: int, probs: list, sleep_s: float, max_trials: int, fp: str) -> dict:
    """Wall-clock seconds for ``n_workers`` forked workers to finish ``probs`` on an empty database."""
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"w{i}.json") for i in range(n_workers)]
        t0 = time.perf_counter()
        procs = [ctx.Process(target=_worker, args=(url, probs, sleep_s, max_trials, fp, o, t0)) for o in outs]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        wall = time.perf_counter() - t0
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"a worker failed (exit codes {[p.exitcode for p in procs]})")
        reports = [json.loads(Path(o).read_text()) for o in outs]
    tuned = sum(r["tuned"] for r in reports)
    if tuned != len(probs):
        raise SystemExit(f"{tuned} problems tuned, expected {len(probs)}: not exactly once")
    slept = sum(r["slept_s"] for r in reports)
    tuning = sum(r["tuning_s"] for r in reports)
    return {"workers": n_workers, "wall_s": round(wall, 3), "problems": len(probs),
            "tuned_per_worker": [r["tuned"] for r in reports], "measuring_s": round(slept, 3),
            "tuning_s": round(tuning, 3),
            # None for a worker that found the queue empty (on small lists the others took every problem)
            "first_start_s": [_round(r["first_start_s"]) for r in reports],
            "last_end_s": [_round(r["last_end_s"]) for r in reports],
            # worker-seconds outside tune_problem (queue, heartbeats, results, start-up, idle), per problem
            "coordination_per_problem_s": round((wall * n_workers - tuning) / len(probs), 4)}


def fresh_database(kind: str, server: str | None, tmp: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp}/fleet-{uuid.uuid4().hex[:8]}.sqlite"
    name = "bench_" + uuid.uuid4().hex[:10]
    admin = sa.create_engine(fleet.normalize_url(server), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return server.rsplit("/", 1)[0] + "/" + name


def server_version(url: str) -> str:
    if url.startswith("sqlite"):
        import sqlite3

        return "sqlite " + sqlite3.sqlite_version
    engine = sa.create_engine(fleet.normalize_url(url))
    with engine.connect() as c:
        v = c.execute(sa.text("SHOW server_version")).scalar()
    engine.dispose()
    return f"postgresql {v}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run (6 problems, short sleeps)")
    ap.add_argument("--backend", choices=["postgresql", "sqlite"], default="postgresql")
    ap.add_argument("--storage",
                    help="PostgreSQL server URL (default: start one with scripts/start_postgres.sh)")
    ap.add_argument("--problems", type=int, default=None, help="problems in the list (default 24; smoke 6)")
    ap.add_argument("--sleep", type=float, default=None,
                    help="seconds per fake measurement (0.1; smoke 0.02)")
    ap.add_argument("--max-trials", type=int, default=8)
    ap.add_argument("--out", help="results JSON (default benchmarks/results/bench_fleet-<date>.json)")
    args = ap.parse_args()
    n = args.problems or (6 if args.smoke else 24)
    sleep_s = args.sleep if args.sleep is not None else (0.02 if args.smoke else 0.1)
    probs = problems(n)
    fp = fingerprint("cpu").key

    started = None
    server = args.storage
    if args.backend == "postgresql" and server is None:
        p = subprocess.run(["bash", str(ROOT / "scripts" / "start_postgres.sh"), "--env"],
                           capture_output=True, text=True, check=True)
        env = dict(line.split("=", 1) for line in p.stdout.split())
        server, started = env["TEST_POSTGRES_URL"], env["TEST_POSTGRES_DIR"]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # warm up in this process (imports Optuna and the tuner, fills Python's caches), so that the
            # forked workers start warm and the figures hold no import time
            run(f"sqlite:///{tmp}/warmup.sqlite", 1, problems(1), 0.0, args.max_trials, fp)
            _worker(f"sqlite:///{tmp}/warmup2.sqlite", problems(1), 0.0, args.max_trials, fp,
                    f"{tmp}/warmup.json", time.perf_counter())
            rows = []
            for workers in (1, 3):
                url = fresh_database(args.backend, server, tmp)
                rows.append(run(url, workers, probs, sleep_s, args.max_trials, fp))
                print(json.dumps(rows[-1]), flush=True)
            version = server_version(url)
    finally:
        if started:
            subprocess.run(["bash", str(ROOT / "scripts" / "start_postgres.sh"), "--stop", started])
    one, three = rows[0]["wall_s"], rows[1]["wall_s"]
    import optuna
    import torch

    result = {
        "benchmark": "bench_fleet", "smoke": args.smoke, "backend": args.backend, "database": version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "optuna": optuna.__version__,
        "sqlalchemy": sa.__version__, "problems": n, "sleep_per_measurement_s": sleep_s,
        "max_trials": args.max_trials, "runs": rows,
        "speedup_3_vs_1": round(one / three, 3), "efficiency_3": round(one / three / 3, 3),
    }
    print(f"{args.backend}: 1 worker {one:.2f} s, 3 workers {three:.2f} s "
          f"(speedup {one / three:.2f}x, ideal 3x; {n} problems, {sleep_s} s per measurement)")
    out = args.out or HERE / "results" / (f"bench_fleet-{args.backend}{'-smoke' if args.smoke else ''}-"
                                          f"{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
