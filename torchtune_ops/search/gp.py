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
        lengthscale: Matern 5/2 length scale in the [0, 1] coordinates. Default 0.35.
        noise: observation noise variance, relative to the (standardised) signal. Default 1e-2.
    """

    def __init__(self, space: Space, candidates: np.ndarray, *, lengthscale: float = 0.35, noise: float = 1e-2):
        self.space = space
        self.lengthscale = lengthscale
        self.noise = noise
        self.x = features(space, candidates)
        self._k = np.zeros((len(candidates), 16), dtype=np.float32)  # kernel(candidate, measurement)
        self.measured: list[int] = []

    def _kernel(self, points: np.ndarray, centre: np.ndarray) -> np.ndarray:
        r = np.sqrt(((points - centre) ** 2).sum(axis=1)) / self.lengthscale
        return (1.0 + _SQRT5 * r + (5.0 / 3.0) * r * r) * np.exp(-_SQRT5 * r)

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

    def expected_improvement(self, values: np.ndarray, rows: np.ndarray, rng: np.random.Generator, *,
                             max_variance_rows: int = 2000, incumbent: np.ndarray | None = None) -> np.ndarray:
        """Expected improvement of log-time below the best measured, at candidate ``rows``.

        ``values``: the measured values in the order of ``add`` (math.inf for failures, which are modelled as
        slow as the slowest success). Where more than ``max_variance_rows`` rows are asked for, the variance
        is computed for the half with the lowest mean and a random half of the rest; the others get -inf.
        ``incumbent``: a boolean mask over the measurements; the improvement is then counted below the best of
        those (another region's best) rather than the best of all. Default None: all.
        """
        n = len(self.measured)
        finite = np.isfinite(values)
        y = np.log(np.where(finite, values, np.nan))
        y = np.where(finite, y, np.nanmax(y))
        y = (y - y.mean()) / (y.std() + 1e-12)
        k_all = self._k[:, :n]
        chol = np.linalg.cholesky(k_all[self.measured].astype(np.float64) + self.noise * np.eye(n))
        alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, y))
        k_rows = k_all[rows].astype(np.float64)
        mean = k_rows @ alpha
        out = np.full(len(rows), -np.inf)
        keep = np.arange(len(rows))
        if len(rows) > max_variance_rows:
            half = max_variance_rows // 2
            order = np.argsort(mean, kind="stable")
            keep = np.concatenate([order[:half], rng.choice(order[half:], half, replace=False)])
        v = np.linalg.solve(chol, k_rows[keep].T)
        sd = np.sqrt(np.maximum(1.0 - (v * v).sum(axis=0), 1e-12))
        best = y.min() if incumbent is None or not (incumbent & finite).any() else y[incumbent & finite].min()
        gain = best - mean[keep]
        z = gain / sd
        cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)).astype(float))
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        out[keep] = np.maximum(gain * cdf + sd * pdf, 0.0)
        return out
