"""The state of one search: the valid candidates, which are still unmeasured, the initial queue, and the
strategy that ranks the rest. ``tune()`` and the Optuna ``Sampler`` both drive a search through it, so
they propose the same configurations in the same order for the same seed (numpy only; no Optuna).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .space import ENUMERATE_LIMIT, Space
from .strategies import Strategy


def _mapped(space: Space, pairs, what: str) -> list:
    out = []
    for cfg, *rest in pairs:
        space.check_keys(cfg, what=what)
        index = space.encode(cfg)
        if index is not None:
            out.append((index, *rest))
    return out


def candidate_matrix(space: Space, candidates: Iterable[Mapping[str, Any]] | None,
                     seed: int) -> tuple[np.ndarray, bool]:
    """(C, D) choice indices of the valid candidates, and whether they are every valid configuration of the
    space (False for a sampled space). ``candidates``: the caller's enumeration (deduplicated, those the
    constraint rejects dropped); None enumerates (or samples) the space."""
    if candidates is None:
        return space.valid_indices(limit=ENUMERATE_LIMIT, seed=seed)
    rows, seen = [], set()
    for cfg in candidates:
        index = space.encode(cfg)
        if index is None:
            raise ValueError(f"candidate {dict(cfg)!r} has a value that is not among the space's choices")
        if index not in seen and space._accepts(dict(cfg)):
            seen.add(index)
            rows.append(index)
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), len(space.sizes)), True


class Pool:
    """Candidates of one search and what has been measured of them.

    Args:
        space: the search space.
        strategy: ranks the unmeasured candidates (``strategies.Strategy``); None: bookkeeping only
            (``next_row`` is then unavailable).
        seed: seeds the strategy's generator and, for a space too large to enumerate, the sample.
        initial: configurations to propose first, in order (invalid, out-of-space and repeated ones skipped).
        prior: (config, value) pairs from a related problem (see ``tune``).
        model: ``model(configs) -> predicted values`` for the candidate configurations; its predictions
            are the prior when ``prior`` is empty. None: no model.
        candidates: the caller's enumeration of the valid configurations; None enumerates the space.

    Raises:
        ValueError: a configuration in ``initial``, ``prior`` or ``candidates`` does not match the space.
    """

    def __init__(self, space: Space, *, strategy: Strategy | None, seed: int = 0,
                 initial: Sequence[Mapping[str, Any]] = (), prior: Sequence[tuple[Mapping[str, Any], float]] = (),
                 model: Callable[[list[dict]], Sequence[float]] | None = None,
                 candidates: Iterable[Mapping[str, Any]] | None = None):
        self.space = space
        self.strategy = strategy
        initial_index = [p[0] for p in _mapped(space, ((c,) for c in initial), "initial config")]
        prior_pairs = [(np.asarray(i), float(v)) for i, v in _mapped(space, prior, "prior config")]
        self.matrix, self.complete = candidate_matrix(space, candidates, seed)
        self.row_of = {tuple(r): i for i, r in enumerate(self.matrix.tolist())}
        if model is not None and not prior_pairs and len(self.matrix):
            predicted = [float(v) for v in model([space.decode(r) for r in self.matrix])]
            if len(predicted) != len(self.matrix):
                raise ValueError(f"model returned {len(predicted)} predictions for {len(self.matrix)} candidates")
            prior_pairs = [(r, v) for r, v in zip(self.matrix, predicted)]
        if not self.complete:  # a sampled space: initial and prior configurations join the pool when valid
            self._append([i for i in initial_index + [tuple(int(x) for x in p[0]) for p in prior_pairs]
                          if i not in self.row_of and space._accepts(space.decode(i))], notify=False)
        self.rng = np.random.default_rng(seed)
        if strategy is not None:
            strategy.start(space, self.matrix, prior_pairs, self.rng)
        self.available = np.ones(len(self.matrix), dtype=bool)
        self.queue = [self.row_of[i] for i in dict.fromkeys(initial_index) if i in self.row_of]
        self.best_value = math.inf

    def __len__(self) -> int:
        return len(self.matrix)

    @property
    def exhausted(self) -> bool:
        """True when every candidate has been measured."""
        return not self.available.any()

    def config(self, row: int) -> dict:
        return self.space.decode(self.matrix[row])

    def row(self, config: Mapping[str, Any], *, grow: bool = False) -> int | None:
        """The candidate row of ``config``, None when it is not a candidate. ``grow``: a valid configuration
        of a sampled space that is not in the pool yet joins it."""
        try:
            index = self.space.encode(config)
        except ValueError:  # other keys: not a configuration of this space
            return None
        if index is None:
            return None
        row = self.row_of.get(index)
        if row is None and grow and not self.complete and self.space._accepts(dict(config)):
            self._append([index])
            row = self.row_of[index]
        return row

    def next_row(self, pending: np.ndarray | None = None) -> int | None:
        """The row to measure next: the first initial configuration still unmeasured, else the strategy's
        proposal among the available rows not in ``pending`` (a mask of rows being measured elsewhere).
        None when nothing is left to propose."""
        allowed = self.available if pending is None else self.available & ~pending
        while self.queue:
            row = self.queue.pop(0)
            if allowed[row]:
                return row
        if not allowed.any():
            return None
        row = self.strategy.propose(allowed)
        if not allowed[row]:
            raise RuntimeError(f"strategy {self.strategy!r} proposed an unavailable candidate")
        return row

    def tell(self, row: int, value: float) -> None:
        """The measurement of candidate ``row`` (math.inf when it failed). A row told twice keeps the first."""
        if not self.available[row]:
            return
        self.available[row] = False
        if self.strategy is not None:
            self.strategy.observe(row, value)
        if value < self.best_value:
            self.best_value = value
            if not self.complete:  # grow the sampled pool around the new best
                self._append([n for n in self.space.neighbours(tuple(int(x) for x in self.matrix[row]))
                              if n not in self.row_of])

    def _append(self, rows: list[tuple[int, ...]], *, notify: bool = True) -> None:
        rows = list(dict.fromkeys(rows))
        if not rows:
            return
        for r in rows:
            self.row_of[r] = len(self.row_of)
        new = np.asarray(rows, dtype=np.int64).reshape(len(rows), self.matrix.shape[1])
        self.matrix = np.concatenate([self.matrix, new])
        if notify:
            self.available = np.concatenate([self.available, np.ones(len(rows), dtype=bool)])
            if self.strategy is not None:
                self.strategy.add_candidates(new)
