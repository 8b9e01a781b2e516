"""Search strategies: which valid, unmeasured candidate to measure next.

A strategy sees the candidates as a (C, D) matrix of choice indices (see ``Space``) and a boolean mask of the
ones still available; it never sees the objective. ``tune()`` owns the budget, the initial configurations,
failures and bookkeeping. Every strategy passes the shared suite in tests/test_search.py.
"""
from __future__ import annotations

import math
from typing import Protocol, Sequence

import numpy as np

from .gp import CandidateGP
from .space import Space
from .tpe import KernelRows, axis_kernels, split_good


class Strategy(Protocol):
    """What ``tune()`` asks of a strategy. Deterministic given the generator passed to ``start``."""

    def start(self, space: Space, candidates: np.ndarray, prior: Sequence[tuple[np.ndarray, float]],
              rng: np.random.Generator) -> None:
        """Called once. ``prior``: (choice indices, value) pairs measured on a related problem."""

    def add_candidates(self, points: np.ndarray) -> None:
        """New candidates (m, D) appended after the existing ones (sampled spaces grow around good configs)."""

    def observe(self, candidate: int, value: float) -> None:
        """A measurement of candidate row ``candidate`` (math.inf when it failed)."""

    def propose(self, available: np.ndarray) -> int:
        """The row of the next candidate to measure; ``available`` is a non-empty boolean mask."""


class RandomStrategy:
    """Uniform random search without replacement (the baseline)."""

    def start(self, space, candidates, prior, rng):
        self.rng = rng

    def add_candidates(self, points):
        pass

    def observe(self, candidate, value):
        pass

    def propose(self, available):
        return int(self.rng.choice(np.flatnonzero(available)))


DESIGNS = ("cover", "cover-even", "random")
LOCAL_SCORES = ("gp", "tpe")


def design_strata(space: Space, n: int, *, extremes: bool = True) -> list[np.ndarray]:
    """Per parameter, the stratum of each choice for a start of ``n`` measurements (a Latin-hypercube-like
    design): an ordinal parameter's sorted values fall into ``min(n, choices)`` strata of consecutive ranks,
    its smallest and its largest value each a stratum of their own when ``extremes``; every other parameter
    has one stratum per value."""
    out = []
    for size, ordinal, pos in zip(space.sizes, space.ordinal, space.positions):
        rank = pos.astype(np.int64)  # the rank in sorted order (ordinal) or the index (categorical)
        k = min(max(1, n), size)
        if not ordinal or k == size:
            out.append(rank)
        elif extremes and k >= 3:  # ranks 0 and size-1 alone, the interior in k-2 equal strata
            inner = 1 + ((rank - 1) * (k - 2)) // (size - 2)
            out.append(np.where(rank == 0, 0, np.where(rank == size - 1, k - 1, inner)))
        else:
            out.append((rank * k) // size)
    return out


def covering_pick(candidates: np.ndarray, strata: list[np.ndarray], available: np.ndarray,
                  rng: np.random.Generator) -> int:
    """An available candidate that covers the most parameters' least-covered strata, drawn at random among
    the ties. Coverage counts every candidate no longer available (measured, or being measured), so
    successive picks spread over each parameter's values like a Latin hypercube, within the valid
    candidates only."""
    taken = ~available
    score = np.zeros(len(candidates))
    for d, of in enumerate(strata):
        if len(of) == 1:
            continue
        s = of[candidates[:, d]]
        counts = np.bincount(s[taken], minlength=len(of))
        reachable = np.bincount(s[available], minlength=len(of)) > 0
        score += counts[s] == counts[reachable].min()
    rows = np.flatnonzero(available)
    best = rows[score[rows] == score[rows].max()]
    return int(rng.choice(best))


class TPEStrategy:
    """Multivariate TPE over the enumerated candidates, with a local-search mix, far steps out of a stalled
    basin, a Gaussian-process companion and prior warm-start.

    Args:
        n_startup: proposals made before the model is used (initial configurations count toward it).
            Default 8; with a prior, ``n_startup_prior`` (default 0) instead.
        design: how those first proposals are chosen. "cover" (default): a space-filling design over the
            valid candidates (``covering_pick``), each proposal covering the least-covered strata of every
            parameter, an ordinal parameter's smallest and largest values included; "cover-even": the same
            with equal strata of consecutive values (the extremes not singled out); "random": uniformly.
        gamma: fraction of the finite measurements in the good group. Default 0.15.
        max_good: most configurations in the good group. Default 20.
        bandwidth: ordinal kernel width as a fraction of the number of choices. Default 0.1.
        min_bandwidth: smallest ordinal kernel width, in rank steps. Default 1.0.
        eps: categorical kernel mass on the other choices. Default 0.2.
        prior_weight: how many pseudo-observations a prior counts for in each group. Default 12.
        prior_gamma: fraction of the prior in its good group. Default 0.1.
        prior_max_good: most prior configurations in its good group. Default 50.
        n_ei_candidates: when set, the proposal is the best l/g among this many candidates drawn with
            probability proportional to l/g (more exploration); None (default) takes the best l/g of all
            available candidates.
        local_every: every this many model proposals, search only among the one-parameter neighbours of
            the best configuration so far (exploitation). 0 turns it off. Default 3.
        local_score: how a local step chooses among those neighbours: "gp" (default), the highest expected
            improvement under the Gaussian process (``gp.CandidateGP``), which weighs the predicted gain
            against what is not known yet, so it does not walk a long axis value by value next to values
            already measured; "tpe", the highest l/g (the neighbours most like the best). "gp" falls back
            to l/g before 3 successful measurements.
        stall: after this many measurements in a row without improvement, make one *far step*: propose
            among the candidates at least ``far`` parameters away from the best, scored by a density whose
            good group is drawn from the measurements in that region only (so a search stuck in one basin
            tries the most promising other one). Repeats every ``stall`` measurements while stuck. 0 turns
            it off. Default 10.
        far: how many parameters a far step's candidates differ from the best in, at least. Default 3.
        far_rank: an ordinal parameter counts as different for ``far`` only when its rank moved by at least
            ``max(1, round(far_rank * (choices - 1)))``: one step along a long axis (224 to 232 threads) stays
            in the same basin. Default 0.15.
        gp_every: every this many model proposals that are not local steps, propose the candidate of highest
            expected improvement under a Gaussian process on the measured log-times (``gp.CandidateGP``)
            instead of TPE's best l/g: it follows trends that TPE's densities cannot. 0 turns it off.
            Default 2.
        gp_lengthscale: the Gaussian process's length scale, in coordinates where each parameter spans 1.
            Default 0.35.
        gp_noise: its observation noise, relative to the signal's variance. Default 1e-2.
        gp_fit: how the Gaussian process's length scales are set (``gp.CandidateGP``'s ``fit``): "fixed"
            (default) keeps ``gp_lengthscale``; "iso" fits one length scale and "ard" one per parameter by
            marginal likelihood, ``gp_lengthscale`` then the centre of their prior.
        gp_failures: how failed measurements enter it (``gp.CandidateGP``'s ``failures``): "slowest"
            (default) as the slowest success, "feasibility" as a chance of failing that weighs its proposals.
        explore_after: after this many measurements in a row without a new best (far steps do not restart
            the count), every ``explore_every``-th proposal belongs to a *restart*: a local search outside
            the best's basin (candidates at least ``far`` parameters from it), started where the Gaussian
            process is least certain or, every second restart, from the best measurement outside the basin
            not yet used; each step measures the one-parameter neighbour of the restart's own best with the
            highest expected improvement over that best, and a restart ends after
            ``explore_after // explore_every`` of its measurements without improving. A new best overall ends
            the exploration. 0 (default) turns it off: on the development spaces it cost pnpoly at 200
            measurements and helped nowhere (docs/search.md).
        explore_every: while exploring, every this many proposals is an exploration proposal. Default 2.
        restart_backoff: when True, after a restart ends the next one waits until ``explore_after * 2**k``
            more measurements have gone without a new best (k: restarts since the last new best). Default
            False: restarts follow one another. (On pnpoly it gave back only part of what restarts cost.)
        far_every: a *portfolio*: every this many model proposals is a far step (as for ``stall``, but without
            waiting for one), so a search that settled early in a second-best basin also tries the most
            promising other basin. 0 (default) turns it off.
        second_every: every this many local steps searches the one-parameter neighbours of the *runner-up*
            (the best measurement outside the best's basin, ``far`` parameters away) instead of the best's,
            so a second basin is refined alongside the first. 0 (default) turns it off.
        gp_far_every: every this many Gaussian-process proposals takes the candidate of highest expected
            improvement *outside* the best's basin, over the best measured there (a portfolio led by the
            model's uncertainty). 0 (default) turns it off.
            The three portfolios above were screened and judged on the development spaces and not adopted
            (docs/search.md, "early basin switching").
    """

    def __init__(self, *, n_startup: int = 8, n_startup_prior: int = 0, design: str = "cover",
                 gamma: float = 0.15, max_good: int = 20, bandwidth: float = 0.1, min_bandwidth: float = 1.0,
                 eps: float = 0.2,
                 prior_weight: float = 12.0, prior_gamma: float = 0.1, prior_max_good: int = 50,
                 n_ei_candidates: int | None = None, local_every: int = 3, local_score: str = "gp",
                 stall: int = 10, far: int = 3, far_rank: float = 0.15, gp_every: int = 2,
                 gp_lengthscale: float = 0.35, gp_noise: float = 1e-2, gp_fit: str = "fixed",
                 gp_failures: str = "slowest", explore_after: int = 0, explore_every: int = 2,
                 restart_backoff: bool = False, far_every: int = 0, second_every: int = 0,
                 gp_far_every: int = 0):
        self.n_startup = n_startup
        self.n_startup_prior = n_startup_prior
        if design not in DESIGNS:
            raise ValueError(f"unknown design {design!r}; choose one of {DESIGNS}")
        self.design = design
        self.gamma = gamma
        self.max_good = max_good
        self.bandwidth = bandwidth
        self.min_bandwidth = min_bandwidth
        self.eps = eps
        self.prior_weight = prior_weight
        self.prior_gamma = prior_gamma
        self.prior_max_good = prior_max_good
        self.n_ei_candidates = n_ei_candidates
        self.local_every = local_every
        if local_score not in LOCAL_SCORES:
            raise ValueError(f"unknown local_score {local_score!r}; choose one of {LOCAL_SCORES}")
        self.local_score = local_score
        self.stall = stall
        self.far = far
        self.far_rank = far_rank
        self.gp_every = gp_every
        self.gp_lengthscale = gp_lengthscale
        self.gp_noise = gp_noise
        self.gp_fit = gp_fit
        self.gp_failures = gp_failures
        self.explore_after = explore_after
        self.explore_every = explore_every
        self.restart_backoff = restart_backoff
        self.far_every = far_every
        self.second_every = second_every
        self.gp_far_every = gp_far_every

    def start(self, space, candidates, prior, rng):
        self.rng = rng
        self.rows = KernelRows(axis_kernels(space, bandwidth=self.bandwidth, min_bandwidth=self.min_bandwidth,
                                            eps=self.eps), candidates)
        self.uniform = 1.0 / math.prod(space.sizes)
        self.space = space
        self.moved = np.asarray([max(1.0, round(self.far_rank * (n - 1))) if o else 1.0
                                 for n, o in zip(space.sizes, space.ordinal)])
        self.where = space.positions_of(candidates)  # (C, D) position of every candidate's choices
        self.strata = design_strata(space, self.n_startup, extremes=self.design == "cover")
        self.gp = (CandidateGP(space, candidates, lengthscale=self.gp_lengthscale, noise=self.gp_noise,
                               fit=self.gp_fit, failures=self.gp_failures)
                   if self.gp_every or (self.local_every and self.local_score == "gp") else None)
        self.n_global = 0  # model proposals that were not local steps
        self.values: list[float] = []
        self.cands: list[int] = []
        self.n_model = self.n_local = 0
        self.since_best, self.best_value = 0, math.inf
        self.stuck = 0  # measurements since the last new best (far steps do not reset it)
        self.restart: list[int] = []  # indices of the current restart's measurements
        self.restart_best, self.restart_since = math.inf, 0
        self.used_seeds: set[int] = set()
        self.pending = -1  # the row of the last restart proposal
        self.n_explore = self.n_restarts = 0
        self.next_restart = self.explore_after
        self.region_model = [0, 0]  # the restarts' own model-proposal counters (all, global)
        self.prior_good = self.prior_bad = None
        if prior:
            index = np.asarray([p[0] for p in prior], dtype=np.int64)
            values = np.asarray([p[1] for p in prior], dtype=float)
            good = split_good(values, self.prior_gamma, self.prior_max_good)
            bad_rows = np.flatnonzero(~good)
            if len(bad_rows) > 256:  # a sample of the bad group is enough for its density
                bad_rows = np.sort(rng.choice(bad_rows, 256, replace=False))
            self.prior_good_index, self.prior_bad_index = index[good], index[bad_rows]
            self._prior_densities()

    def _prior_densities(self):
        if len(self.prior_good_index):
            self.prior_good = self.rows.mean_density(self.prior_good_index)
        if len(self.prior_bad_index):
            self.prior_bad = self.rows.mean_density(self.prior_bad_index)

    def add_candidates(self, points):
        self.rows.add_candidates(points)
        self.where = np.concatenate([self.where, self.space.positions_of(points)])
        if self.gp is not None:
            self.gp.add_candidates(points)
        if self.prior_good is not None or self.prior_bad is not None:
            self._prior_densities()

    def observe(self, candidate, value):
        self.cands.append(candidate)
        self.values.append(value)
        self.rows.add(self.rows.candidates[candidate])
        if self.gp is not None:
            self.gp.add(candidate)
        if candidate == self.pending:  # a restart's measurement
            self.pending = -1
            if not self.restart or value < self.restart_best:
                self.restart_best, self.restart_since = value, 0
            else:
                self.restart_since += 1
            self.restart.append(len(self.values) - 1)
        if value < self.best_value:
            self.best_value, self.since_best, self.stuck = value, 0, 0
            self.restart, self.n_explore = [], 0  # a new best ends the exploration
            self.n_restarts, self.next_restart = 0, self.explore_after
        else:
            self.since_best += 1
            self.stuck += 1

    def _startup(self) -> int:
        return self.n_startup_prior if (self.prior_good is not None) else self.n_startup

    def log_ratio(self) -> np.ndarray:
        """log l(x) - log g(x) at every candidate."""
        values = np.asarray(self.values, dtype=float)
        good = split_good(values, self.gamma, self.max_good)
        good_sum, bad_sum = self.rows.sum_rows(good)
        l_num, g_num = self.uniform + good_sum, self.uniform + bad_sum
        l_den, g_den = 1.0 + good.sum(), 1.0 + (~good).sum()
        if self.prior_good is not None:
            l_num = l_num + self.prior_weight * self.prior_good
            l_den += self.prior_weight
        if self.prior_bad is not None:
            g_num = g_num + self.prior_weight * self.prior_bad
            g_den += self.prior_weight
        return np.log(l_num / l_den) - np.log(g_num / g_den)

    def propose(self, available):
        finite = [v for v in self.values if math.isfinite(v)]
        if len(self.values) < self._startup() or (not finite and self.prior_good is None):
            if self.design == "random" or len(self.values) >= self._startup():
                return int(self.rng.choice(np.flatnonzero(available)))
            return covering_pick(self.rows.candidates, self.strata, available, self.rng)
        if self.stall and finite and self.since_best >= self.stall:
            self.since_best = 0  # the next far step waits for another stall
            row = self._far_step(available)
            if row is not None:
                return row
        if self.explore_after and finite:
            row = self._explore(available)
            if row is not None:
                return row
        self.n_model += 1
        if self.far_every and finite and self.n_model % self.far_every == 0:
            row = self._far_step(available)
            if row is not None:
                return row
        local = bool(self.local_every and finite and self.n_model % self.local_every == 0)
        if not local and self.gp_every and len(finite) >= 3:
            self.n_global += 1
            if self.n_global % self.gp_every == 0:
                values = np.asarray(self.values, dtype=float)
                if self.gp_far_every and (self.n_global // self.gp_every) % self.gp_far_every == 0:
                    basin = self._basin(self._best_row())
                    outside = ~basin[np.asarray(self.cands)]
                    rows = np.flatnonzero(available & ~basin)
                    if len(rows) and outside.any():
                        gain = self.gp.expected_improvement(values, rows, self.rng, incumbent=outside)
                        return int(rows[np.argmax(gain)])
                rows = np.flatnonzero(available)
                gain = self.gp.expected_improvement(values, rows, self.rng)
                return int(rows[np.argmax(gain)])
        pool = available
        if local:
            centre = self._best_row()
            self.n_local += 1
            if self.second_every and self.n_local % self.second_every == 0:
                centre = self._runner_up(centre)
            near = (self.rows.candidates != self.rows.candidates[centre]).sum(axis=1) == 1
            if (near & available).any():
                pool = near & available
                if self.local_score == "gp" and len(finite) >= 3:
                    rows = np.flatnonzero(pool)
                    gain = self.gp.expected_improvement(np.asarray(self.values, dtype=float), rows, self.rng)
                    return int(rows[np.argmax(gain)])
        score = self.log_ratio()  # TPE's l/g: only where a proposal is scored by it
        rows = np.flatnonzero(pool)
        if self.n_ei_candidates:
            l = np.exp(score[rows] - score[rows].max())
            pick = self.rng.choice(rows, size=min(self.n_ei_candidates, len(rows)), replace=False,
                                   p=l / l.sum())
            rows = np.unique(pick)
        return int(rows[np.argmax(score[rows])])

    def _basin(self, row: int) -> np.ndarray:
        """Which candidates are fewer than ``far`` parameters (counted with ``far_rank``) from candidate
        ``row``: its basin."""
        return (np.abs(self.where - self.where[row]) >= self.moved).sum(axis=1) < self.far

    def _explore(self, available: np.ndarray) -> int | None:
        """A restart's proposal when one is due (see ``explore_after``), else None."""
        if self.restart and self.restart_since >= max(3, self.explore_after // self.explore_every):
            self.restart = []  # this restart is stuck too
        if not self.restart and self.stuck < self.next_restart:
            return None
        self.n_explore += 1
        if self.n_explore % self.explore_every:
            return None
        pool = available & ~self._basin(self._best_row())
        if not pool.any():
            return None
        values = np.asarray(self.values, dtype=float)
        if not self.restart:
            self.n_restarts += 1
            if self.restart_backoff:  # each restart that does not pay waits for a stall twice as long
                self.next_restart = self.stuck + self.explore_after * 2 ** self.n_restarts
            start = self._restart_seed(pool, values)
            if start is not None:  # restart from a good measurement outside the best's basin
                self.used_seeds.add(start)
                self.restart, self.restart_best, self.restart_since = [start], values[start], 0
            else:  # restart where the model knows least
                rows = np.flatnonzero(pool)
                if self.gp is not None:
                    pick = rows if len(rows) <= 4000 else self.rng.choice(rows, 4000, replace=False)
                    self.pending = int(pick[np.argmax(self.gp.uncertainty(pick))])
                else:
                    good_sum, bad_sum = self.rows.sum_rows(np.zeros(len(values), dtype=bool))
                    self.pending = int(rows[np.argmax(-np.log(self.uniform + bad_sum[rows]))])
                return self.pending
        # A restart is a local search: the neighbour (one parameter changed) of its best measurement of highest
        # expected improvement over that best (TPE's l/g without a Gaussian process).
        mine = np.zeros(len(values), dtype=bool)
        mine[self.restart] = True
        own = np.where(mine, values, math.inf)
        centre = self.cands[int(np.argmin(own))]
        near = ((self.rows.candidates != self.rows.candidates[centre]).sum(axis=1) == 1) & pool
        if not near.any():
            self.restart = []  # nothing left around this one: the next exploration proposal restarts
            return None
        rows = np.flatnonzero(near)
        if self.gp is not None and np.isfinite(values).sum() >= 3:
            gain = self.gp.expected_improvement(values, rows, self.rng, incumbent=mine)
            self.pending = int(rows[np.argmax(gain)])
        else:
            self.pending = self._best_scored(near, own)
        return self.pending

    def _restart_seed(self, pool: np.ndarray, values: np.ndarray) -> int | None:
        """Every second restart (the first starts where the model knows least, returning None): the best
        measurement outside the best's basin not yet used as a seed (its index in the measurements)."""
        if self.n_restarts % 2 == 1:
            return None
        outside = ~self._basin(self._best_row())[np.asarray(self.cands)]
        order = [int(i) for i in np.argsort(values, kind="stable")
                 if outside[i] and math.isfinite(values[i]) and int(i) not in self.used_seeds]
        return order[0] if order else None

    def _runner_up(self, best: int) -> int:
        """Candidate row of the best finite measurement outside the basin of candidate ``best`` (``best`` when
        there is none)."""
        values = np.asarray(self.values, dtype=float)
        outside = ~self._basin(best)[np.asarray(self.cands)] & np.isfinite(values)
        if not outside.any():
            return best
        return self.cands[int(np.argmin(np.where(outside, values, math.inf)))]

    def _best_scored(self, pool: np.ndarray, values: np.ndarray) -> int:
        """The candidate in ``pool`` of highest l/g, with the good group drawn from ``values`` (inf: not in it)
        and every other measurement in the bad group."""
        good = split_good(values, self.gamma, self.max_good)
        good_sum, bad_sum = self.rows.sum_rows(good)
        score = np.log(self.uniform + good_sum) - np.log(self.uniform + bad_sum)
        rows = np.flatnonzero(pool)
        return int(rows[np.argmax(score[rows])])

    def _best_row(self) -> int:
        """Candidate row of the best configuration measured so far."""
        return self.cands[int(np.argmin(np.asarray(self.values, dtype=float)))]

    def _far_step(self, available: np.ndarray) -> int | None:
        """The best-scored available candidate at least ``far`` parameters from the best so far (counted with
        ``far_rank``), under a density whose good group holds only measurements that far away (None when
        there is no candidate)."""
        values = np.asarray(self.values, dtype=float)
        far = (np.abs(self.where - self.where[self._best_row()]) >= self.moved).sum(axis=1) >= self.far
        pool = available & far
        if not pool.any():
            return None
        good = split_good(np.where(far[np.asarray(self.cands)], values, math.inf), self.gamma, self.max_good)
        good_sum, bad_sum = self.rows.sum_rows(good)
        # l(x) from the far good group against every other measurement (the best's basin included); with no
        # far measurement yet, this prefers the least explored candidates.
        score = np.log(self.uniform + good_sum) - np.log(self.uniform + bad_sum)
        rows = np.flatnonzero(pool)
        return int(rows[np.argmax(score[rows])])


STRATEGIES = {"tpe": TPEStrategy, "random": RandomStrategy}


def make_strategy(strategy) -> Strategy:
    """A strategy instance from a name in STRATEGIES or an object that follows the Strategy protocol."""
    if isinstance(strategy, str):
        try:
            return STRATEGIES[strategy]()
        except KeyError:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}") from None
    for method in ("start", "add_candidates", "observe", "propose"):
        if not callable(getattr(strategy, method, None)):
            raise ValueError(f"strategy {strategy!r} lacks a {method}() method")
    return strategy
