"""What running tune() through Optuna costs: the same search as a plain loop, trial for trial, and the added
time per trial (the target: far below one GPU measurement, under 2 ms).

    .venv/bin/python benchmarks/sampler_overhead.py             # every development space, 3 seeds, 200
    .venv/bin/python benchmarks/sampler_overhead.py --smoke     # one space, 1 seed, 50 measurements

For each replayed space of ../shared/datasets (the replay rules of search_efficiency.py) and seed, runs
``tune()`` (an Optuna study, in memory, sampled by ``search.Sampler``) and the direct loop
(``engine._tune_direct``: the strategy's proposals measured in a plain loop, as tune() did before), in
alternating order, ``--repeat`` times each, with the default TPE strategy. Checks the two traces are
identical. The objective is a dictionary lookup; the time spent in the strategy (the same proposals in both)
is counted and set aside, so what is compared is the rest: the loop's bookkeeping, and Optuna's and the
sampler's. Times are CPU seconds of this process (``time.process_time``: other processes on a shared
machine do not inflate them); "added" is the difference per trial between each path's least disturbed
repeat; the JSON also holds the difference of the medians. Optuna is imported before the first run.
Prints a table and writes JSON (machine, versions, load average) under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from replay import load_space, write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATASETS = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "datasets"))


def _spaces(datasets: str) -> list[tuple[str, str]]:
    return [(os.path.join(datasets, d, f), f"{d}/{f[:-len('.json.gz')]}")
            for d in sorted(os.listdir(datasets)) if os.path.isdir(os.path.join(datasets, d))
            for f in sorted(os.listdir(os.path.join(datasets, d))) if f.endswith(".json.gz")]


class TimedStrategy:
    """A strategy that counts the seconds spent in the strategy it wraps (the same proposals): the rest of
    a run is bookkeeping, which is what going through Optuna changes."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def _timed(self, name, *args):
        t0 = time.process_time()
        out = getattr(self.inner, name)(*args)
        self.seconds += time.process_time() - t0
        return out

    def start(self, *args):
        return self._timed("start", *args)

    def add_candidates(self, *args):
        return self._timed("add_candidates", *args)

    def observe(self, *args):
        return self._timed("observe", *args)

    def propose(self, *args):
        return self._timed("propose", *args)


def measure(space, seed: int, budget: int, repeat: int) -> dict:
    from torchtune_ops.search import Space, TPEStrategy, tune
    from torchtune_ops.search.engine import _tune_direct

    configs = space.configs()
    rest = {"direct": [], "optuna": []}  # seconds per trial outside the strategy
    strategy_s, traces = [], {}
    for r in range(repeat):
        order = ("direct", "optuna") if r % 2 == 0 else ("optuna", "direct")
        for how in order:
            run = _tune_direct if how == "direct" else tune
            timed = TimedStrategy(TPEStrategy())
            t0 = time.process_time()
            result = run(Space(space.params), space.time_of, candidates=configs, max_trials=budget, seed=seed,
                         strategy=timed)
            total = time.process_time() - t0
            n = max(1, len(result.trials))
            rest[how].append((total - timed.seconds) / n)
            strategy_s.append(timed.seconds / n)
            traces[how] = result.trials
    # the least disturbed of the repeats (the machine is shared), and the median
    added_min = min(rest["optuna"]) - min(rest["direct"])
    return {"seed": seed, "trials": len(traces["optuna"]), "identical": traces["direct"] == traces["optuna"],
            "strategy_ms": statistics.median(strategy_s) * 1e3,
            "direct_rest_ms": min(rest["direct"]) * 1e3, "optuna_rest_ms": min(rest["optuna"]) * 1e3,
            "added_ms": added_min * 1e3,
            "added_ms_median": (statistics.median(rest["optuna"]) - statistics.median(rest["direct"])) * 1e3}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="one space, 1 seed, 50 measurements, 1 repeat")
    p.add_argument("--datasets", default=DEFAULT_DATASETS)
    p.add_argument("--only", default="", help="comma-separated substrings of the spaces to run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=int, default=200)
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each path per space and seed")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)

    import optuna

    import torchtune_ops.search.sampler  # noqa: F401  (imported here, not inside the first timed run)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    paths = _spaces(a.datasets) if os.path.isdir(a.datasets) else []
    if a.only:
        paths = [x for x in paths if any(s in x[1] for s in a.only.split(","))]
    if a.smoke:
        paths = [x for x in paths if x[1] == "convolution_kt/RTX_3090"] or paths[:1]
        a.seeds, a.budget, a.repeat = 1, 50, 1
    if not paths:
        p.error(f"no spaces under {a.datasets}")
    rows, lines = {}, ["| space | valid | trials | identical traces | strategy ms/trial | rest, direct loop "
                       "ms/trial | rest, through Optuna ms/trial | added ms/trial |",
                       "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    t0 = time.perf_counter()
    for path, name in paths:
        space = load_space(path, name=name)
        runs = [measure(space, seed, a.budget, a.repeat) for seed in range(a.seeds)]
        rows[name] = runs
        med = {k: statistics.median(r[k] for r in runs)
               for k in ("strategy_ms", "direct_rest_ms", "optuna_rest_ms", "added_ms")}
        lines.append(f"| {name} | {len(space.times)} | {runs[0]['trials']} | "
                     f"{sum(r['identical'] for r in runs)}/{len(runs)} | {med['strategy_ms']:.2f} | "
                     f"{med['direct_rest_ms']:.3f} | {med['optuna_rest_ms']:.3f} | {med['added_ms']:.3f} |")
        print(lines[-1], flush=True)
    added = [r["added_ms"] for runs in rows.values() for r in runs]
    identical = all(r["identical"] for runs in rows.values() for r in runs)
    table = "\n".join(lines)
    print(f"\n{table}\n\nadded time per trial: median {statistics.median(added):.3f} ms, max {max(added):.3f} ms "
          f"(target < 2 ms); traces identical: {identical}; {time.perf_counter() - t0:.0f} s")

    import numpy
    import torchtune_ops
    record = {
        "benchmark": "sampler_overhead", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
        "versions": {"torchtune_ops": torchtune_ops.__version__, "optuna": optuna.__version__,
                     "numpy": numpy.__version__},
        "seeds": a.seeds, "budget": a.budget, "repeat": a.repeat, "smoke": a.smoke, "runs": rows,
        "added_ms_median": statistics.median(added), "added_ms_max": max(added), "identical": identical,
        "table": table,
    }
    write_results(record, a.out, f"sampler_overhead{'-smoke' if a.smoke else ''}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
