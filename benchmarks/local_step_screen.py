"""Screen other scores for the search's local steps on replayed spaces, without changing the library.

A local step (every third model proposal, ``TPEStrategy(local_score="gp")``) measures the one-parameter
neighbour of the best configuration with the highest expected improvement (EI) under the search's Gaussian
process. This script replaces that score, for local steps only, by one of:

- ``ei``: the default, unchanged (checks that the harness reproduces search_efficiency.py);
- ``ts``: Thompson sampling, a draw from each neighbour's posterior, the lowest taken;
- ``lcb<beta>``: the lowest posterior mean minus beta standard deviations (``lcb1``, ``lcb2``);
- ``basin``: EI under a Gaussian process that sees only the measurements in the best's basin (fewer than
  ``far`` parameters from it), so a value never tried there is predicted from the basin, not from the whole
  space (falls back to ``ei`` below 3 such measurements);
- ``ard``: EI under a copy of the Gaussian process with one length scale per parameter fitted by marginal
  likelihood (``CandidateGP(fit="ard")``), so a flat parameter's far values are not "uncertain".

    python benchmarks/local_step_screen.py ts --only pnpoly --seeds 200 --first-seed 3000

Prints, per space, the mean fraction of the optimum [worst decile of seeds] after 20 and 50 measurements.
The scores are patched into ``CandidateGP.expected_improvement`` for calls over few rows (a local step's
neighbours; global proposals score thousands of candidates); this is a screening tool, not an API.
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from replay import list_spaces, load_space, worst_decile  # noqa: E402
from search_efficiency import DEFAULT_DATASETS  # noqa: E402

from torchtune_ops.search import Space, TPEStrategy, tune  # noqa: E402
from torchtune_ops.search import gp as gp_module  # noqa: E402

VARIANTS = ("ei", "ts", "lcb1", "lcb2", "basin", "ard")
LOCAL_ROWS = 80  # a local step scores at most this many neighbours on the development spaces
_ei = gp_module.CandidateGP.expected_improvement
_current: list[TPEStrategy] = []


class _Tracked(TPEStrategy):
    """The default strategy, remembered so that the patched score can see its measurements' basin."""

    def start(self, *args):
        super().start(*args)
        _current[:] = [self]


def _patched(variant: str):
    def score(self, values, rows, rng, **kw):
        if variant == "ei" or len(rows) > LOCAL_ROWS or kw.get("incumbent") is not None:
            return _ei(self, values, rows, rng, **kw)
        if variant == "ard":
            fitted = copy.deepcopy(self)
            fitted.fit, fitted._fitted_at = "ard", 0
            return _ei(fitted, values, rows, rng, **kw)
        if variant == "basin":
            s = _current[0]
            inside = np.flatnonzero(s._basin(s._best_row())[np.asarray(s.cands)])
            if len(inside) < 3:
                return _ei(self, values, rows, rng, **kw)
            mean, sd, y = self.posterior(values, rows, use=inside)
            return gp_module.improvement(y.min() - mean, sd)
        mean, sd, _ = self.posterior(values, rows)
        if variant == "ts":
            return -(mean + sd * rng.standard_normal(len(rows)))
        return -(mean - float(variant[3:]) * sd)  # lcb<beta>
    return score


def _run(job) -> tuple[str, list[float]]:
    variant, path, name, seed, budget = job
    gp_module.CandidateGP.expected_improvement = _patched(variant)
    space = load_space(path, name=name)
    values: list[float] = []

    def objective(cfg):
        values.append(space.time_of(cfg))
        return values[-1]

    tune(Space(space.params), objective, candidates=space.configs(), max_trials=budget, seed=seed,
         strategy=_Tracked())
    best = np.minimum.accumulate(values)
    return name, [space.optimum / best[min(c, len(best)) - 1] for c in (20, budget)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variant", choices=VARIANTS)
    p.add_argument("--only", default="", help="comma-separated substrings of the space names")
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--first-seed", type=int, default=3000)
    p.add_argument("--budget", type=int, default=50)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--datasets", default=DEFAULT_DATASETS, help="folder of development spaces")
    a = p.parse_args(argv)
    if a.budget < 20 or a.seeds < 1:
        p.error("--budget must be at least 20 and --seeds at least 1")
    if not os.path.isdir(a.datasets):
        p.error(f"no folder of tuning spaces at {a.datasets}; give it with --datasets DIR")
    spaces = [(path, name) for path, name in list_spaces(a.datasets)
              if (not a.only or any(o in name for o in a.only.split(",")))]
    if not spaces:
        p.error(f"no replay space under {a.datasets!r} matches --only {a.only!r}")
    jobs = [(a.variant, path, name, seed, a.budget) for path, name in spaces
            for seed in range(a.first_seed, a.first_seed + a.seeds)]
    if a.jobs > 1:
        with multiprocessing.Pool(a.jobs) as pool:
            results = pool.map(_run, jobs, chunksize=4)
    else:
        results = [_run(j) for j in jobs]
    for _, name in spaces:
        f = np.asarray([r for n, r in results if n == name])
        print(f"{a.variant:6s} {name:32s} @20 {f[:, 0].mean():.3f} [{worst_decile(f[:, 0]):.3f}]  "
              f"@{a.budget} {f[:, 1].mean():.3f} [{worst_decile(f[:, 1]):.3f}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
