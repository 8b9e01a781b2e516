"""Costs of the tuning cache (torchtune_ops/storage/store.py): the run-time hit, misses, writes, opening, loading.

    python benchmarks/bench_store.py            # full run (10,000 entries)
    python benchmarks/bench_store.py --smoke    # 500 entries, few repeats (CI on CPU)

Measured on a fresh SQLite file in a temporary directory (the cache's real code path, WAL mode):

- ``get_hit_ns``: ``store.get`` of an entry already in memory (the run-time hot path; target < 1 us);
- ``get_miss_ns``: a remembered miss (no query);
- ``get_refresh_us``: ``get(..., refresh=True)``, one SQLite query;
- ``put_ms``: ``put`` of one entry with 40 trials (one transaction);
- ``open_ms``: ``Store.open`` of the filled file; ``open_readonly_ms``: the same in read-only mode (copies
  the file into memory);
- ``preload_ms``: loading (and validating) every entry into memory; ``remember_ms``: ``remember`` of every entry (bundles).

Each figure is the best of several repeats. Results go to a JSON file (``--out``, default
benchmarks/results/bench_store-<host>.json) with the machine's name, versions and the date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _best(fn, *, n: int, repeats: int) -> float:
    """Best of ``repeats`` of the mean seconds per call over ``n`` calls."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def _machine() -> dict:
    return {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "sqlite": sqlite3.sqlite_version,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def run(*, entries: int, repeats: int) -> dict:
    from torchtune_ops.storage.store import Entry, Store, problem_key

    fp = "bench-gpu|cc9.0|sm132|torch2.11|triton3.6|k000000000000"
    winner = '{"BLOCK_K":64,"BLOCK_M":128,"BLOCK_N":128,"GROUP_M":8,"num_stages":3,"num_warps":8}'
    made = [Entry(fp, "gemm", problem_key({"op": "mm", "M": i, "N": 4096, "K": 4096, "dtype": "float16"}),
                  winner, 0.5, 0.6, 40) for i in range(entries)]
    trials = [({"BLOCK_M": 64 + j, "num_warps": 4}, 0.5 + j / 100) for j in range(40)]
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tuning.sqlite")
        with Store.open(path) as st:
            t = time.perf_counter()
            for e in made:
                st.put(e)
            res["fill_entries_per_s"] = round(entries / (time.perf_counter() - t))
            k = made[entries // 2].key
            st.get(*k)
            res["get_hit_ns"] = round(_best(lambda: st.get(*k), n=100_000 // repeats, repeats=repeats) * 1e9, 1)
            miss = (fp, "gemm", problem_key({"op": "mm", "M": -1}))
            st.get(*miss)
            res["get_miss_ns"] = round(_best(lambda: st.get(*miss), n=100_000 // repeats, repeats=repeats) * 1e9, 1)
            res["get_refresh_us"] = round(_best(lambda: st.get(*k, refresh=True), n=2000, repeats=repeats) * 1e6, 2)
            extra = iter(range(10**9))
            res["put_ms"] = round(_best(lambda: st.put(Entry(fp, "conv2d", problem_key({"N": next(extra)}), "aten", 1.0, 1.0, 40),
                                                       trials), n=200, repeats=repeats) * 1e3, 3)
        res["open_ms"] = round(_best(lambda: Store.open(path).close(), n=5, repeats=repeats) * 1e3, 2)
        res["open_readonly_ms"] = round(
            _best(lambda: Store.open(path, readonly=True).close(), n=5, repeats=repeats) * 1e3, 2)
        with Store.open(path) as st:
            res["preload_ms"] = round(_best(lambda: st.preload(fp), n=1, repeats=repeats) * 1e3, 2)
            res["remember_ms"] = round(_best(lambda: st.remember(made), n=1, repeats=repeats) * 1e3, 2)
        res["file_bytes"] = os.path.getsize(path)
    res["meets_hit_under_1us"] = res["get_hit_ns"] < 1000
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="500 entries, few repeats (CI on CPU)")
    p.add_argument("--entries", type=int, default=None, help="entries in the file (default 10,000; smoke 500)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/bench_store-<host>.json)")
    args = p.parse_args(argv)
    entries = args.entries or (500 if args.smoke else 10_000)
    repeats = 2 if args.smoke else 5
    results = {"machine": _machine(), "entries": entries, "repeats": repeats,
               "results": run(entries=entries, repeats=repeats)}
    out = args.out or os.path.join(HERE, "results", f"bench_store-{platform.node() or 'host'}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    for k, v in results["results"].items():
        print(f"{k:<22} {v}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
