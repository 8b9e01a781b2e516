"""Kernel Tuner's search strategies replayed on the development spaces, under our replay rules.

    .venv/bin/python benchmarks/kernel_tuner_baseline.py --seeds 50 --first-seed 1000
    .venv/bin/python benchmarks/kernel_tuner_baseline.py --smoke     # one space, 2 seeds, 2 strategies

Kernel Tuner (``pip install kernel_tuner``, 1.5.0 here) runs in simulation mode on each space's cache file:
every configuration it evaluates is looked up, not run. Validity is a restriction (a configuration is valid
iff it is a key of the cache, failed ones included, as in ../shared/datasets/README.md); a failed one costs
one evaluation and counts as +inf. ``max_fevals`` is the budget of unique evaluations; the trace is the
order in which unique configurations were first evaluated. Python's and numpy's generators are seeded per
run (Kernel Tuner 1.5 takes no seed). pnpoly's cache files give ``problem_size`` as a bare integer, which
Kernel Tuner's ``tune_kernel`` rejects; it is passed as a tuple.

Writes ``kernel_tuner_baseline-<stamp>.json`` under benchmarks/results/ with the same summary fields as
search_efficiency.py (mean, worst decile, per-seed fractions), which ``search_efficiency.py --kt FILE``
reads as the bar to reach.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import gzip
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import warnings

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from replay import best_so_far, list_spaces, run_logged, summarize, trace_metrics, write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATASETS = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "datasets"))
CHECKPOINTS = (10, 20, 50, 100, 200)
STRATEGIES = ("genetic_algorithm", "diff_evo", "bayes_opt", "pso", "simulated_annealing", "firefly_algorithm",
              "basinhopping", "greedy_ils", "mls", "dual_annealing")


@functools.lru_cache(maxsize=None)
def _cache_file(path: str) -> tuple[str, dict]:
    """An uncompressed copy of ``path`` (Kernel Tuner reads .json only) and its contents."""
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        data = json.load(f)
    if isinstance(data.get("problem_size"), int):
        data["problem_size"] = [data["problem_size"]]
    out = os.path.join(tempfile.mkdtemp(prefix="kt_replay_"), "cache.json")
    with open(out, "w") as f:
        json.dump(data, f)
    return out, data


def _reuse_parsed_files() -> None:
    """Kernel Tuner parses the cache file on every call (half of a run's time on dedispersion); a worker
    parses each once (simulation mode only reads it). Its search space is still built per run: sharing it
    would change how the strategies draw their random numbers."""
    from kernel_tuner import util

    if not getattr(util.read_cache, "_replay", False):
        read = functools.lru_cache(maxsize=None)(util.read_cache)
        util.read_cache = lambda cachefile, open_cache=True: read(cachefile, open_cache)
        util.read_cache._replay = True


def run_kernel_tuner(path: str, strategy: str, seed: int, budget: int) -> dict:
    from constraint import FunctionConstraint
    import numpy as np
    from kernel_tuner import tune_kernel

    _reuse_parsed_files()
    cache_path, data = _cache_file(path)
    keys = data["tune_params_keys"]
    valid = {tuple(rec[k] for k in keys) for rec in data["cache"].values()}

    def restriction(*values):
        return values in valid

    random.seed(seed)
    np.random.seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results, _ = tune_kernel(data["kernel_name"], "", tuple(data["problem_size"]), [],
                                 {k: data["tune_params"][k] for k in keys},
                                 restrictions=[FunctionConstraint(restriction)], cache=cache_path,
                                 simulation_mode=True, strategy=strategy, quiet=True,
                                 strategy_options={"max_fevals": budget})
    values, seen = [], set()
    for r in results:
        key = tuple(r[k] for k in keys)
        if key in seen:
            continue
        seen.add(key)
        t = r.get("time")
        ok = "__error__" not in r and isinstance(t, (int, float)) and math.isfinite(t)
        values.append(float(t) if ok else math.inf)
    return {"values": values[:budget]}


def _job(args):
    path, name, strategy, seed, budget = args
    optimum = _optimum(path)
    t0 = time.perf_counter()
    try:
        out = run_kernel_tuner(path, strategy, seed, budget)
    except Exception as e:  # a strategy that cannot run on a space is reported, not fatal
        return name, strategy, seed, {"error": f"{type(e).__name__}: {e}"}
    out["seconds"] = time.perf_counter() - t0
    out["measured"] = len(out["values"])
    out.update(trace_metrics(best_so_far(out.pop("values")), optimum, checkpoints=CHECKPOINTS))
    return name, strategy, seed, out


@functools.lru_cache(maxsize=None)
def _optimum(path: str) -> float:
    from replay import load_space

    return load_space(path).optimum


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="one space, 2 seeds, 2 strategies, 50 evaluations")
    p.add_argument("--datasets", default=DEFAULT_DATASETS)
    p.add_argument("--only", default="", help="comma-separated substrings: replay only matching spaces")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=200)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--log", default="", help="append every finished run to this JSON-lines file (a long run "
                   "that is stopped keeps what it finished); with --summarize, the file to summarise")
    p.add_argument("--summarize", action="store_true", help="run nothing: summarise the runs in --log")
    a = p.parse_args(argv)

    paths = list_spaces(a.datasets)
    strategies = [s for s in a.strategies.split(",") if s]
    if a.smoke:
        paths = [x for x in paths if x[1] == "pnpoly_kt/RTX_3090"] or paths[:1]
        a.seeds, a.budget, strategies = 2, 50, ["genetic_algorithm", "diff_evo"]
    if a.only:
        paths = [x for x in paths if any(s in x[1] for s in a.only.split(","))]
    seeds = range(a.first_seed, a.first_seed + a.seeds)
    # seed-major order: a run stopped early has every space and strategy on its first seeds
    jobs = [(path, name, s, seed, a.budget) for seed in seeds for path, name in paths for s in strategies]
    t0 = time.perf_counter()
    if a.summarize:
        with open(a.log) as f:
            done = [tuple(json.loads(line)) for line in f if line.strip()]
        names = {n for _, n in paths}
        done = [d for d in done if d[0] in names and d[1] in strategies]
        seeds = sorted({d[2] for d in done})
        a.seeds, a.first_seed = len(seeds), (seeds[0] if seeds else 0)
        for d in done:
            d[3]["fraction"] = {int(c): v for c, v in d[3].get("fraction", {}).items()}
    else:
        done = run_logged(_job, jobs, a.jobs, a.log)
    runs, errors = {}, {}
    for name, strategy, seed, out in done:
        if "error" in out:
            errors.setdefault(name, {}).setdefault(strategy, out["error"])
        else:
            runs.setdefault(name, {}).setdefault(strategy, []).append(out)
    summary = {name: {s: summarize(r, a.budget, CHECKPOINTS) for s, r in by.items()} for name, by in runs.items()}
    for name, by in summary.items():
        for s, r in by.items():
            r["short_runs"] = sum(x["measured"] < a.budget for x in runs[name][s])  # space or strategy ran out
    elapsed = time.perf_counter() - t0

    for name, by in summary.items():
        print(name)
        for s, r in sorted(by.items(), key=lambda kv: -kv[1]["fraction"].get(min(200, a.budget), 0)):
            f, w = r["fraction"], r["worst_decile"]
            print(f"  {s:20s} " + "  ".join(f"@{c}: {f[c]:.3f} (worst 10% {w[c]:.3f})" for c in (20, 50, 200)
                                            if c in f) + f"  {r['seconds_per_run']:.1f} s/run")
    for name, errs in errors.items():
        for s, e in errs.items():
            print(f"  {name} {s}: {e}")
    print(f"\n{len(jobs)} runs in {elapsed:.0f} s")

    import kernel_tuner
    import numpy
    record = {
        "benchmark": "kernel_tuner_baseline", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "versions": {"kernel_tuner": kernel_tuner.__version__, "numpy": numpy.__version__},
        "seeds": a.seeds, "first_seed": a.first_seed, "budget": a.budget, "smoke": a.smoke,
        "seed_list": sorted({d[2] for d in done}),
        "strategies": strategies, "summary": summary, "errors": errors, "seconds": elapsed,
    }
    write_results(record, a.out, f"kernel_tuner_baseline{'-smoke' if a.smoke else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
