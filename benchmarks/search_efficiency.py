"""Search efficiency on replayed, fully measured GPU tuning spaces: tune() vs random search vs plain Optuna TPE.

    .venv/bin/python benchmarks/search_efficiency.py            # every development space, 5 seeds, 200
    .venv/bin/python benchmarks/search_efficiency.py --smoke    # one space, 2 seeds, 50 measurements
    .venv/bin/python benchmarks/search_efficiency.py --space recorded.json.gz   # a space we recorded

Replay rules (../shared/datasets/README.md): valid iff the configuration is in the file's cache; a valid one
costs one measurement (failed ones return +inf); an invalid proposal costs nothing. Reports the mean
fraction of the optimum after 10/20/50/100/200 measurements and the median measurements to reach within 5%,
prints a markdown table and writes JSON (with machine, versions, date) under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time

# One BLAS thread per worker: the search's linear algebra is small, and --jobs workers share the cores.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from replay import (ReplaySpace, best_so_far, list_spaces, load_space, run_logged, summarize,  # noqa: E402
                    tpe_knobs, trace_metrics, write_results)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATASETS = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "datasets"))
CHECKPOINTS = (10, 20, 50, 100, 200)

# ../shared/datasets/BASELINES.md: mean fraction at 50 / at 200 of plain Optuna TPE and Kernel Tuner's
# bayes_opt, genetic and diff_evo (the best of them is the bar to reach).
BASELINES = {
    "convolution_kt/RTX_2080_Ti": [(0.924, 0.982), (0.861, 0.861), (0.775, 0.939), (0.761, 0.911)],
    "convolution_kt/RTX_3090": [(0.912, 0.994), (0.803, 0.803), (0.835, 0.994), (0.882, 0.962)],
    "convolution_kt/RTX_Titan": [(0.923, 0.995), (0.728, 0.728), (0.778, 1.000), (0.746, 0.899)],
    "convolution_kt/RTX_3060_laptop": [(0.959, 0.986), (0.863, 0.863), (0.841, 0.987), (0.910, 0.973)],
    "dedispersion_milo/MI250X": [(0.781, 0.889), (0.992, 1.000), (0.766, 0.996), (0.820, 0.975)],
    "dedispersion_milo/W6600": [(0.956, 0.975), (0.945, 0.995), (0.918, 0.963), (0.908, 0.963)],
    "dedispersion_milo/W7800": [(0.924, 0.981), (0.977, 0.996), (0.925, 0.994), (0.926, 0.982)],
}


def run_tune(space: ReplaySpace, seed: int, budget: int, tpe: dict | None = None) -> dict:
    from torchtune_ops.search import Space, TPEStrategy, tune

    configs = space.configs()
    calls = []

    def objective(cfg):
        t = space.time_of(cfg)
        calls.append(t)
        return t

    result = tune(Space(space.params), objective, candidates=configs, max_trials=budget, seed=seed,
                  strategy=TPEStrategy(**(tpe or {})))
    assert len(calls) == len(result.trials) and None not in calls
    return {"values": [v for _, v in result.trials]}


def run_tune_prior(space: ReplaySpace, seed: int, budget: int, related: list[ReplaySpace] = (),
                   tpe: dict | None = None) -> dict:
    """tune() warm-started with a history from related spaces (the same kernel on the other GPUs): from
    each, its 100 best configurations and 400 others drawn at random, times divided by its optimum."""
    import numpy as np
    from torchtune_ops.search import Space, TPEStrategy, tune

    rng = np.random.default_rng(1000 + seed)
    prior = []
    for other in related:
        cfgs, times = other.configs(), np.asarray(list(other.times.values()))
        order = np.argsort(times, kind="stable")
        pick = np.concatenate([order[:100], rng.choice(order[100:], min(400, len(order) - 100), replace=False)])
        prior += [(cfgs[i], float(times[i] / other.optimum)) for i in pick]
    result = tune(Space(space.params), space.time_of, candidates=space.configs(), max_trials=budget, seed=seed,
                  prior=prior, strategy=TPEStrategy(**(tpe or {})))
    return {"values": [v for _, v in result.trials]}


def run_random(space: ReplaySpace, seed: int, budget: int) -> dict:
    import numpy as np

    times = list(space.times.values())
    order = np.random.default_rng(seed).permutation(len(times))[:budget]
    return {"values": [times[i] for i in order]}


def run_optuna(space: ReplaySpace, seed: int, budget: int, max_proposals: int = 20000) -> dict:
    """Plain Optuna TPE with defaults (multivariate off); an invalid proposal is told through the
    constraints mechanism and costs nothing; a repeated one is told its recorded value and costs nothing."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(sampler=sampler)
    values, seen, invalid, repeated = [], set(), 0, 0
    worst = 0.0
    for _ in range(max_proposals):
        if len(values) >= budget:
            break
        trial = study.ask()
        cfg = {k: trial.suggest_categorical(k, v) for k, v in space.params.items()}
        t = space.time_of(cfg)
        if t is None:
            invalid += 1
            trial.set_constraint("valid", 1.0)
            study.tell(trial, worst)
            continue
        trial.set_constraint("valid", 0.0)
        key = space.key(cfg, space.names)
        if key in seen:
            repeated += 1
        else:
            seen.add(key)
            values.append(t)
            if math.isfinite(t):
                worst = max(worst, t)
        study.tell(trial, t if math.isfinite(t) else 10 * max(worst, 1.0))
    return {"values": values, "invalid_proposals": invalid, "repeated_proposals": repeated}


METHODS = {"tune": run_tune, "random": run_random, "optuna_tpe": run_optuna, "tune_prior": run_tune_prior}


@functools.lru_cache(maxsize=None)
def _load(path: str, name: str | None) -> ReplaySpace:
    return load_space(path, name=name)


def _job(args):
    path, name, method, seed, budget, related, tpe = args
    space = _load(path, name)
    t0 = time.perf_counter()
    if method == "tune_prior":
        out = run_tune_prior(space, seed, budget, [_load(p, n) for p, n in related], tpe)
    elif method == "tune":
        out = run_tune(space, seed, budget, tpe)
    else:
        out = METHODS[method](space, seed, budget)
    out["seconds"] = time.perf_counter() - t0
    out.update(trace_metrics(best_so_far(out["values"]), space.optimum, checkpoints=CHECKPOINTS))
    del out["values"]
    return name, method, seed, out


def _cell(s: dict, budget: int) -> str:
    f50 = s["fraction"].get(50, float("nan"))
    fb = s["fraction"].get(min(200, budget), float("nan"))
    med = s["median_to_within"]
    med_txt = f"{med:.1f}" if math.isfinite(med) else f">{budget}"
    return f"{f50:.3f} / {fb:.3f} / {med_txt} ({s['reached']}/{s['seeds']})"


def _deciles(s: dict) -> str:
    """"f@20 / f@50 / f@200 [worst decile at the same]" of one method on one space."""
    cps = [c for c in (20, 50, 200) if c in s["fraction"]]
    return (" / ".join(f"{s['fraction'][c]:.3f}" for c in cps) + " ["
            + " / ".join(f"{s['worst_decile'][c]:.3f}" for c in cps) + "]")


def kt_bars(path: str) -> dict:
    """Kernel Tuner's strategies in a kernel_tuner_baseline.py results file: space -> strategy -> summary."""
    with open(path) as f:
        data = json.load(f)
    return {name: {m: {k: {int(c): v for c, v in r[k].items()} for k in ("fraction", "worst_decile")}
                   for m, r in by.items()} for name, by in data["summary"].items()}


def kt_targets(summary: dict, kt: dict) -> dict:
    """Issue 20's check: tune()'s mean at 20, 50 and 200 at or above every Kernel Tuner strategy's, plain
    Optuna TPE's and random's (at the bars' 3-decimal precision), and the same for the worst decile."""
    out = {}
    for name, by in summary.items():
        if "tune" not in by:
            continue
        rivals = {f"kt:{m}": r for m, r in kt.get(name, {}).items()}
        rivals.update({m: r for m, r in by.items() if m in ("optuna_tpe", "random")})
        s, row = by["tune"], {}
        for c in (20, 50, 200):
            if c not in s["fraction"] or not rivals:
                continue
            for key in ("fraction", "worst_decile"):
                best = max(rivals, key=lambda m: rivals[m][key].get(c, 0))
                bar = rivals[best][key].get(c, 0)
                row[f"{key}@{c}"] = {"tune": s[key][c], "bar": bar, "by": best,
                                     "ok": bool(round(s[key][c], 3) >= round(bar, 3))}
        out[name] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="one small space, 2 seeds, 50 measurements")
    p.add_argument("--datasets", default=DEFAULT_DATASETS, help="folder of development spaces")
    p.add_argument("--space", action="append", default=[], help="a recorded space file (repeatable); "
                   "when given, only these spaces are replayed")
    p.add_argument("--only", default="", help="comma-separated substrings: replay only matching spaces")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1 "
                   "(e.g. to check on seeds the knobs were not chosen on)")
    p.add_argument("--tpe", default="", help="TPEStrategy knobs for tune/tune_prior, e.g. "
                   "'gamma=0.25,stall=0' (an ablation); default: the library's defaults")
    p.add_argument("--budget", type=int, default=200)
    p.add_argument("--methods", default="tune,random,optuna_tpe",
                   help="comma-separated, of: tune, random, optuna_tpe, tune_prior (tune() warm-started with "
                        "the same kernel's spaces on the other GPUs)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--kt", default="", help="a kernel_tuner_baseline.py results file: its strategies are the bars "
                   "of issue 20's check (tune at or above each at 20, 50 and 200 measurements)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--log", default="", help="append every finished run to this JSON-lines file (to follow a "
                   "long run)")
    a = p.parse_args(argv)

    if a.space:
        paths = [(f, load_space(f).name) for f in a.space]
    elif not os.path.isdir(a.datasets):
        p.error(f"no folder of tuning spaces at {a.datasets}: the development spaces (*/*.json.gz) are not part "
                "of the repository (see ../shared/datasets/README.md where you have them); give that folder "
                "with --datasets DIR, or replay spaces you recorded with --space FILE")
    else:
        paths = list_spaces(a.datasets)
    if a.smoke:
        paths = [x for x in paths if x[1] == "convolution_kt/RTX_3090"] or paths[:1]
        a.seeds, a.budget = 2, 50
    if a.only:
        paths = [x for x in paths if any(s in (x[1] or x[0]) for s in a.only.split(","))]
    methods = [m for m in a.methods.split(",") if m]
    try:
        tpe = tpe_knobs(a.tpe)
    except ValueError as e:
        p.error(str(e))
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}")

    info = {}
    for path, name in paths:
        s = _load(path, name)
        info[s.name] = {"path": path, "valid": len(s.times), "optimum": s.optimum, "within_5pct": s.n_within(),
                        "random_expected_draws": s.random_expected_draws()}
    def related(path, name):  # the same kernel's spaces on the other GPUs (same folder and parameters)
        params = _load(path, name).params
        return tuple((p, n) for p, n in paths if os.path.dirname(p) == os.path.dirname(path) and p != path
                     and _load(p, n).params == params)

    seeds = range(a.first_seed, a.first_seed + a.seeds)
    jobs = [(path, name, m, seed, a.budget, related(path, name) if m == "tune_prior" else (), tpe)
            for path, name in paths for m in methods for seed in seeds]
    t0 = time.perf_counter()
    done = run_logged(_job, jobs, a.jobs, a.log)
    runs: dict = {}
    for name, method, seed, out in done:
        runs.setdefault(name, {}).setdefault(method, []).append(out)
    summary = {name: {m: summarize(r, a.budget, CHECKPOINTS) for m, r in by.items()} for name, by in runs.items()}

    # Target check (issue 3), on spaces where random needs more than 50 draws.
    targets = {}
    for name, by in summary.items():
        exp = info[name]["random_expected_draws"]
        if "tune" not in by or exp <= 50:
            continue
        s = by["tune"]
        ok_draws = s["median_to_within"] <= exp / 5
        bars = BASELINES.get(name, [])
        if "optuna_tpe" in by:
            bars = bars + [(by["optuna_tpe"]["fraction"].get(50, 0), by["optuna_tpe"]["fraction"].get(200, 0))]
        # The bars are published to 3 decimals (1.000 may be 0.9996), so the comparison is made at that precision.
        ok50 = all(round(s["fraction"].get(50, 0), 3) >= b[0] for b in bars)
        ok200 = all(round(s["fraction"].get(200, 0), 3) >= b[1] for b in bars) if a.budget >= 200 else None
        targets[name] = {"draws_ok": ok_draws, "limit": exp / 5, "fraction50_ok": ok50, "fraction200_ok": ok200}

    cols = " | ".join(methods)
    lines = [f"| space | valid | within 5% | random expected draws | {cols} | target |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in methods) + " | --- |"]
    for name in summary:
        i = info[name]
        t = targets.get(name)
        tt = "n/a (easy)" if t is None else ("met" if t["draws_ok"] and t["fraction50_ok"] and t["fraction200_ok"]
                                              is not False else
                                              f"draws {'ok' if t['draws_ok'] else 'MISS'} (<= {t['limit']:.0f}), "
                                              f"f50 {'ok' if t['fraction50_ok'] else 'MISS'}, "
                                              f"f200 {'ok' if t['fraction200_ok'] else 'MISS'}")
        cells = " | ".join(_cell(summary[name][m], a.budget) if m in summary[name] else "-" for m in methods)
        lines.append(f"| {name} | {i['valid']} | {i['within_5pct']} | {i['random_expected_draws']:.0f} | "
                     f"{cells} | {tt} |")
    table = "\n".join(lines)
    # Every method's f@20 / f@50 / f@200 and the worst decile of seeds (the mean of the lowest tenth).
    dlines = [f"| space | {cols} |", "| --- | " + " | ".join("---" for _ in methods) + " |"]
    for name in summary:
        dlines.append(f"| {name} | " + " | ".join(_deciles(summary[name][m]) if m in summary[name] else "-"
                                                  for m in methods) + " |")
    decile_table = "\n".join(dlines)
    kt_check = kt_targets(summary, kt_bars(a.kt)) if a.kt else {}
    print(f"Each cell: mean fraction of optimum at 50 / at {min(200, a.budget)} measurements / median "
          f"measurements to within 5% (seeds that got there). Seeds {seeds.start}-{seeds.stop - 1}, budget "
          f"{a.budget}{', tune knobs ' + a.tpe if tpe else ''}.\n")
    print(table)
    print("\nf@20 / f@50 / f@200 [worst decile of seeds at the same]\n")
    print(decile_table)
    if kt_check:
        print(f"\nAgainst {os.path.basename(a.kt)} (Kernel Tuner), plain Optuna TPE and random (kt: ok/MISS "
              "per checkpoint, mean then worst decile):")
        for name, row in kt_check.items():
            print(f"  {name}: " + ", ".join(f"{k} {v['tune']:.3f} vs {v['bar']:.3f} ({v['by']}) "
                                            f"{'ok' if v['ok'] else 'MISS'}" for k, v in row.items()))
    for name, by in summary.items():
        full = ", ".join(f"{m}: " + " ".join(f"{c}:{v:.3f}" + (f"±{s['fraction_se'][c]:.3f}"
                                                                 if s["fraction_se"][c] is not None else "")
                                             for c, v in s["fraction"].items())
                         for m, s in by.items())
        print(f"  {name}: {full}")
        if "optuna_tpe" in by:
            o = by["optuna_tpe"]
            print(f"    optuna_tpe wasted proposals per run: {o['invalid_proposals']:.0f} invalid, "
                  f"{o['repeated_proposals']:.0f} repeated")
    elapsed = time.perf_counter() - t0
    print(f"\n{len(jobs)} runs in {elapsed:.0f} s")

    import numpy
    import optuna
    import torchtune_ops
    record = {
        "benchmark": "search_efficiency", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "versions": {"torchtune_ops": torchtune_ops.__version__, "optuna": optuna.__version__,
                     "numpy": numpy.__version__},
        "seeds": a.seeds, "first_seed": a.first_seed, "tpe": tpe, "budget": a.budget, "smoke": a.smoke, "spaces": info, "summary": summary,
        "targets": targets, "table": table, "decile_table": decile_table, "kt": a.kt, "kt_check": kt_check,
        "seconds": elapsed,
    }
    write_results(record, a.out, f"search_efficiency{'-smoke' if a.smoke else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
