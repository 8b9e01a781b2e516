"""A Gaussian-process model over an enumerated set of candidate configurations (numpy only).

TPE's product densities say *where the good measurements are*; they cannot say that a trend continues (block
size 8 beat 4, 16 beat 8, so try 32). A Gaussian process on the measured log-times does: its mean follows
trends across parameters together and its variance says where nothing has been measured. The strategy asks
it, now and then, for the candidate of highest expected improvement.

Each configuration becomes a point in [0, 1]^k: an ordinal parameter its rank over (choices - 1), a
categorical one a one-hot vector scaled so that any two different choices are 1 apart. The kernel is a
Matern 5/2 with one length scale. Kernel values between every candidate and each measurement are computed
once, when the measurement arrives, so a proposal costs a Cholesky factorisation of the measurements and
two matrix products.
"""
from __future__ import annotations

import math

import numpy as np

from .space import Space

_SQRT5 = math.sqrt(5.0)
_erf = np.frompyfunc(math.erf, 1, 1)


def _matern52(r: np.ndarray) -> np.ndarray:
    """The Matern 5/2 kernel at scaled distances ``r``."""
    return (1.0 + _SQRT5 * r + (5.0 / 3.0) * r * r) * np.exp(-_SQRT5 * r)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) squared Euclidean distances between the rows of ``a`` and ``b``."""
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)


FITS = ("fixed", "iso", "ard")
FAILURES = ("slowest", "feasibility")


def feature_groups(space: Space) -> np.ndarray:
    """The parameter (its index among the parameters of more than one choice) of each column of
    ``features``: an ordinal parameter has one column, a categorical one a column per choice."""
    groups, g = [], 0
    for size, ordinal in zip(space.sizes, space.ordinal):
        if size > 1:
            groups.extend([g] * (1 if ordinal else size))
            g += 1
    return np.asarray(groups or [0], dtype=np.int64)


def features(space: Space, points: np.ndarray) -> np.ndarray:
    """(m, k) coordinates in [0, 1] of configurations given as choice indices ``points`` (m, D)."""
    where = space.positions_of(points)
    cols = []
    for d, (size, ordinal) in enumerate(zip(space.sizes, space.ordinal)):
        if size == 1:
            continue
        if ordinal:
            cols.append(where[:, d] / (size - 1))
        else:
            cols.extend((points[:, d] == c) / math.sqrt(2.0) for c in range(size))
    if not cols:
        return np.zeros((len(points), 1), dtype=np.float32)
    return np.stack(cols, axis=1).astype(np.float32)


class CandidateGP:
    """Gaussian process over the candidates of one search.

    Args:
        space: the search space.
        candidates: (C, D) choice indices of the candidates.
        lengthscale: Matern 5/2 length scale in the [0, 1] coordinates; with ``fit``, the centre of the
            length scales' prior and the first guess. Default 0.35.
        noise: observation noise variance, relative to the (standardised) signal. Default 1e-2.
        fit: "fixed" (default): every parameter keeps ``lengthscale``; "iso": one length scale for all,
            chosen among ``LENGTH_GRID`` x ``lengthscale`` by the log marginal likelihood of the measured
            log-times plus a log-normal prior around ``lengthscale`` (``prior_sd``); "ard": that one, then
            a length scale per parameter (its relevance: a parameter that does not change the time gets a
            long one) by coordinate search over the same grid. Refitted as measurements arrive (every one
            up to 30, then each time their number grew by 10%).
        prior_sd: the standard deviation of log(length scale) under the prior. Default log(4).
        failures: how failed measurements enter the model. "slowest" (default): as slow as the slowest
            success; "feasibility": the regression sees only the successes, and the expected improvement is
            weighed by a kernel-smoothed chance that the candidate runs, (1 + sum of kernel values to the
            successes) / (2 + sum to all measurements), so a failure lowers the chance of its neighbours
            without making the region look slow.
    """

    LENGTH_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

    def __init__(self, space: Space, candidates: np.ndarray, *, lengthscale: float = 0.35, noise: float = 1e-2,
                 fit: str = "fixed", prior_sd: float = math.log(4.0), failures: str = "slowest"):
        if fit not in FITS:
            raise ValueError(f"unknown fit {fit!r}; choose one of {FITS}")
        self.space = space
        self.lengthscale = lengthscale
        self.noise = noise
        self.fit = fit
        self.prior_sd = prior_sd
        if failures not in FAILURES:
            raise ValueError(f"unknown failures {failures!r}; choose one of {FAILURES}")
        self.failures = failures
        self.x = features(space, candidates)
        self.groups = feature_groups(space)
        self.scales = np.full(int(self.groups.max()) + 1, float(lengthscale))  # length scale per parameter
        self._k = np.zeros((len(candidates), 16), dtype=np.float32)  # kernel(candidate, measurement)
        self.measured: list[int] = []
        self._fitted_at = 0  # measurements at the last fit

    def _scaled(self, x: np.ndarray) -> np.ndarray:
        return x / self.scales[self.groups].astype(np.float32)

    def _kernel(self, points: np.ndarray, centre: np.ndarray) -> np.ndarray:
        if self.fit == "fixed":
            r = np.sqrt(((points - centre) ** 2).sum(axis=1)) / self.lengthscale
        else:
            r = np.sqrt((self._scaled(points - centre) ** 2).sum(axis=1))
        return _matern52(r)

    def add(self, row: int) -> None:
        """Record that candidate ``row`` was measured (its value is passed to ``expected_improvement``)."""
        n = len(self.measured)
        if n == self._k.shape[1]:
            self._k = np.concatenate([self._k, np.zeros_like(self._k)], axis=1)
        self._k[:, n] = self._kernel(self.x, self.x[row])
        self.measured.append(row)

    def add_candidates(self, points: np.ndarray) -> None:
        """New candidates (m, D) appended after the existing ones."""
        x = features(self.space, points)
        k = np.zeros((len(points), self._k.shape[1]), dtype=np.float32)
        for j, row in enumerate(self.measured):
            k[:, j] = self._kernel(x, self.x[row])
        self.x = np.concatenate([self.x, x])
        self._k = np.concatenate([self._k, k])

    def log_evidence(self, y: np.ndarray, scales: np.ndarray, use: np.ndarray | None = None) -> float:
        """Log marginal likelihood of standardised values ``y`` at the measurements (in ``add`` order; only
        those at positions ``use`` when given) under per-parameter length scales ``scales``, plus the log
        prior of those scales."""
        measured = np.asarray(self.measured) if use is None else np.asarray(self.measured)[use]
        x = self.x[measured] / scales[self.groups]
        k = _matern52(np.sqrt(_sq_dists(x, x).astype(np.float64))) + self.noise * np.eye(len(y))
        try:
            chol = np.linalg.cholesky(k)
        except np.linalg.LinAlgError:
            return -math.inf
        a = np.linalg.solve(chol, y)
        z = np.log(scales / self.lengthscale) / self.prior_sd
        return float(-0.5 * a @ a - np.log(np.diag(chol)).sum() - 0.5 * (z * z).sum())

    def fit_scales(self, values: np.ndarray) -> None:
        """Choose the length scales (see ``fit``) for the measured ``values`` and recompute the cached kernel
        values when they changed."""
        n = len(self.measured)
        if self.fit == "fixed" or n < 3 or (n > 30 and n < 1.1 * self._fitted_at):
            return
        use = self._regressed(values)
        if len(use) < 3:
            return
        self._fitted_at = n
        y = _standardised(values[use])
        grid = [self.lengthscale * g for g in self.LENGTH_GRID]
        best = max(grid, key=lambda s: self.log_evidence(y, np.full(len(self.scales), s), use))
        scales = np.full(len(self.scales), best)
        if self.fit == "ard" and len(scales) > 1:
            score = self.log_evidence(y, scales, use)
            for _ in range(2):  # coordinate search, two sweeps
                moved = False
                for p in range(len(scales)):
                    for s in grid:
                        if s == scales[p]:
                            continue
                        trial = scales.copy()
                        trial[p] = s
                        t = self.log_evidence(y, trial, use)
                        if t > score + 1e-9:
                            scales, score, moved = trial, t, True
                if not moved:
                    break
        if not np.array_equal(scales, self.scales):
            self.scales = scales
            xs = self._scaled(self.x)
            m = xs[self.measured]
            self._k[:, :n] = _matern52(np.sqrt(_sq_dists(xs, m)))

    def uncertainty(self, rows: np.ndarray) -> np.ndarray:
        """The prior-relative posterior standard deviation (0 to 1) at candidate ``rows``: how far they are,
        in the kernel's sense, from everything measured. It does not depend on the measured values."""
        n = len(self.measured)
        if n == 0:
            return np.ones(len(rows))
        k_all = self._k[:, :n]
        chol = np.linalg.cholesky(k_all[self.measured].astype(np.float64) + self.noise * np.eye(n))
        v = np.linalg.solve(chol, k_all[rows].astype(np.float64).T)
        return np.sqrt(np.maximum(1.0 - (v * v).sum(axis=0), 0.0))

    def posterior(self, values: np.ndarray, rows: np.ndarray, *,
                  use: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The posterior at candidate ``rows``: (mean, standard deviation, the standardised values regressed on),
        in the units of those standardised log-times (lower is faster).

        ``values``: as for ``expected_improvement``. ``use``: the positions (in ``add`` order) of the measurements
        to regress on; default None: those the model sees (all, or the successes with
        ``failures="feasibility"``).
        """
        self.fit_scales(values)
        use = self._regressed(values) if use is None else np.asarray(use)
        y, chol, alpha = self._regression(values, use)
        k_rows = self._k[np.ix_(rows, use)].astype(np.float64)
        return k_rows @ alpha, self._sd(chol, k_rows), y

    def expected_improvement(self, values: np.ndarray, rows: np.ndarray, rng: np.random.Generator, *,
                             max_variance_rows: int = 2000, incumbent: np.ndarray | None = None) -> np.ndarray:
        """Expected improvement of log-time below the best measured, at candidate ``rows``.

        ``values``: the measured values in the order of ``add`` (math.inf for failures, which are modelled as
        slow as the slowest success). Where more than ``max_variance_rows`` rows are asked for, the variance
        is computed for the half with the lowest mean and a random half of the rest; the others get -inf.
        ``incumbent``: a boolean mask over the measurements; the improvement is then counted below the best of
        those (another region's best) rather than the best of all. Default None: all.
        """
        self.fit_scales(values)
        n = len(self.measured)
        use = self._regressed(values)
        finite = np.isfinite(values)[use]
        y, chol, alpha = self._regression(values, use)
        k_rows = self._k[np.ix_(rows, use)].astype(np.float64)
        mean = k_rows @ alpha
        if incumbent is not None:
            incumbent = incumbent[use]
        out = np.full(len(rows), -np.inf)
        keep = np.arange(len(rows))
        if len(rows) > max_variance_rows:
            half = max_variance_rows // 2
            order = np.argsort(mean, kind="stable")
            keep = np.concatenate([order[:half], rng.choice(order[half:], half, replace=False)])
        sd = self._sd(chol, k_rows[keep])
        best = y.min() if incumbent is None or not (incumbent & finite).any() else y[incumbent & finite].min()
        out[keep] = improvement(best - mean[keep], sd)
        if len(use) < n:  # weigh by the chance that the candidate runs: successes and failures nearby
            ok = np.isfinite(values).astype(np.float64)
            near = self._k[rows[keep], :n].astype(np.float64)
            out[keep] *= (1.0 + near @ ok) / (2.0 + near.sum(axis=1))
        return out

    def _regression(self, values: np.ndarray, use: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(standardised values, Cholesky factor of their kernel matrix plus noise, its weights) of the
        measurements at positions ``use``."""
        y = _standardised(values[use])
        measured = np.asarray(self.measured)[use]
        chol = np.linalg.cholesky(self._k[np.ix_(measured, use)].astype(np.float64) + self.noise * np.eye(len(use)))
        return y, chol, np.linalg.solve(chol.T, np.linalg.solve(chol, y))

    @staticmethod
    def _sd(chol: np.ndarray, k_rows: np.ndarray) -> np.ndarray:
        """Posterior standard deviation (prior 1) of the candidates whose kernel values to the measurements are
        ``k_rows``."""
        v = np.linalg.solve(chol, k_rows.T)
        return np.sqrt(np.maximum(1.0 - (v * v).sum(axis=0), 1e-12))

    def _regressed(self, values: np.ndarray) -> np.ndarray:
        """Positions of the measurements the regression sees: all, or with ``failures="feasibility"`` the
        successes (when there are at least 2)."""
        finite = np.isfinite(values)
        if self.failures == "feasibility" and finite.sum() >= 2:
            return np.flatnonzero(finite)
        return np.arange(len(values))


def improvement(gain: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Expected improvement of a normal posterior: ``gain`` is the best value minus the mean, ``sd`` its
    standard deviation."""
    z = gain / sd
    cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)).astype(float))
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return np.maximum(gain * cdf + sd * pdf, 0.0)


def _standardised(values: np.ndarray) -> np.ndarray:
    """Log-times with mean 0 and standard deviation 1; failures (inf) count as the slowest success. An
    objective that is not a time (a value of 0 or below) is standardised as it is, without the log."""
    finite = np.isfinite(values)
    y = np.where(finite, values, np.nan)
    if np.nanmin(y) > 0:
        y = np.log(y)
    y = np.where(finite, y, np.nanmax(y))
    return (y - y.mean()) / (y.std() + 1e-12)
