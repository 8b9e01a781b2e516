"""A TPE-style density model over an enumerated set of candidate configurations (numpy only).

TPE (tree-structured Parzen estimator) splits the measured configurations into a good group (the best
fraction ``gamma``) and a bad group (the rest, failures included), fits a kernel density to each, l(x) and
g(x), and proposes where l(x)/g(x) is largest. Here both densities are *multivariate* products of
per-parameter kernels, and they are evaluated on the enumerated valid, unmeasured candidates only, so no
proposal is ever spent on an invalid or already measured configuration.

Kernels per parameter, each a distribution over that parameter's choices:
- ordinal (numbers): a Gaussian over the value's rank in sorted order (neighbourhood-aware: 64 is close to
  32 and 128), truncated to the choices and normalised;
- categorical: keep the observed value with probability 1 - eps, else any other one uniformly.

Each observation's kernel, evaluated at every candidate, is computed once when it is added (a row of a
matrix), so scoring all candidates costs two matrix-vector products per proposal.
"""
from __future__ import annotations

import numpy as np

from .space import Space


def axis_kernels(space: Space, *, bandwidth: float, min_bandwidth: float, eps: float) -> list[np.ndarray]:
    """One (choices x choices) matrix per parameter: row i is the kernel centred on choice i.

    Args:
        space: the search space (its ordinal flags and choice positions).
        bandwidth: Gaussian standard deviation of ordinal kernels, as a fraction of the number of choices.
        min_bandwidth: the smallest standard deviation, in rank steps.
        eps: probability mass a categorical kernel gives to the other choices.
    """
    out = []
    for size, ordinal, pos in zip(space.sizes, space.ordinal, space.positions):
        if size == 1:
            out.append(np.ones((1, 1)))
        elif ordinal:
            sigma = max(min_bandwidth, bandwidth * size)
            k = np.exp(-0.5 * ((pos[:, None] - pos[None, :]) / sigma) ** 2)
            out.append(k / k.sum(axis=1, keepdims=True))
        else:
            k = np.full((size, size), eps / (size - 1))
            np.fill_diagonal(k, 1.0 - eps)
            out.append(k)
    return out


class KernelRows:
    """Kernel values of observed configurations at every candidate, one row per observation.

    Args:
        kernels: per-parameter kernel matrices from ``axis_kernels``.
        candidates: (C, D) choice indices of the candidate configurations.
    """

    def __init__(self, kernels: list[np.ndarray], candidates: np.ndarray):
        self.kernels = kernels
        self.candidates = candidates
        self.observed = np.zeros((0, candidates.shape[1]), dtype=np.int64)
        self._rows = np.zeros((16, len(candidates)), dtype=np.float32)  # float32: half the memory
        self.total = np.zeros(len(candidates))  # sum of all rows
        self.n = 0

    def kernel_at(self, index: np.ndarray, points: np.ndarray) -> np.ndarray:
        """Product kernel centred on each row of ``index`` (n, D), evaluated at ``points`` (m, D): (n, m)."""
        out = np.ones((len(index), len(points)))
        for d, k in enumerate(self.kernels):
            if k.shape[0] > 1:
                out *= k[index[:, d]][:, points[:, d]]
        return out

    def add(self, index: np.ndarray) -> None:
        """Add one observed configuration (its choice indices)."""
        if self.n == len(self._rows):
            self._rows = np.concatenate([self._rows, np.zeros_like(self._rows)])
        self._rows[self.n] = self.kernel_at(index[None, :], self.candidates)[0]
        self.total += self._rows[self.n]
        self.observed = np.concatenate([self.observed, index[None, :]])
        self.n += 1

    def add_candidates(self, points: np.ndarray) -> None:
        """Extend every row to new candidate configurations ``points`` (m, D)."""
        new = np.zeros((len(self._rows), len(points)), dtype=np.float32)
        new[:self.n] = self.kernel_at(self.observed, points)
        self._rows = np.concatenate([self._rows, new], axis=1)
        self.total = np.concatenate([self.total, new.sum(axis=0, dtype=np.float64)])
        self.candidates = np.concatenate([self.candidates, points])

    def sum_rows(self, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Kernel sums at every candidate over the observations in mask ``which`` and over the others."""
        inside = self._rows[np.flatnonzero(which)].sum(axis=0, dtype=np.float64)
        return inside, np.maximum(self.total - inside, 0.0)

    def mean_density(self, index: np.ndarray, *, chunk: int = 64) -> np.ndarray:
        """Mean kernel of many configurations ``index`` (n, D) at every candidate, without storing rows."""
        total = np.zeros(len(self.candidates))
        for i in range(0, len(index), chunk):
            total += self.kernel_at(index[i:i + chunk], self.candidates).sum(axis=0)
        return total / max(1, len(index))


def split_good(values: np.ndarray, gamma: float, max_good: int) -> np.ndarray:
    """Boolean mask of the good group: the ceil(gamma * n_finite) lowest finite values (at least one)."""
    good = np.zeros(len(values), dtype=bool)
    finite = np.flatnonzero(np.isfinite(values))
    if len(finite) == 0:
        return good
    n_good = int(min(max_good, max(1, np.ceil(gamma * len(finite)))))
    order = finite[np.argsort(values[finite], kind="stable")]
    good[order[:n_good]] = True
    return good
