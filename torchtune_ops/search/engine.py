"""tune(): measure the most promising valid, unmeasured configurations of a space, within a budget."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from ..errors import InvalidConfig
from .space import ENUMERATE_LIMIT, Space
from .strategies import Strategy, make_strategy


class Trial(NamedTuple):
    """One measurement: the configuration and its value (math.inf when it failed)."""

    config: dict
    value: float


class Progress(NamedTuple):
    """What the progress callback receives after each measurement."""

    number: int  # 1-based count of measurements so far
    max_trials: int
    config: dict
    value: float
    best_config: dict | None
    best_value: float


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """The outcome of ``tune()``.

    Attributes:
        best_config: the configuration with the lowest finite value, or None when every measurement failed
            (or nothing was measured).
        best_value: its value, math.inf when there is none.
        trials: every measurement in order, as ``Trial(config, value)`` (unpacks as a pair).
        stop_reason: why the search stopped: "max_trials", "time_budget", "patience", "should_stop" or
            "exhausted" (every valid configuration was measured).
        n_candidates: how many valid configurations the search chose from.
        elapsed_s: seconds spent in tune() (by its clock).
    """

    best_config: dict | None
    best_value: float
    trials: list[Trial]
    stop_reason: str
    n_candidates: int
    elapsed_s: float


def _candidate_matrix(space: Space, candidates: Iterable[Mapping[str, Any]] | None,
                      seed: int) -> tuple[np.ndarray, bool]:
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


def _mapped(space: Space, pairs, what: str) -> list:
    out = []
    for cfg, *rest in pairs:
        space.check_keys(cfg, what=what)
        index = space.encode(cfg)
        if index is not None:
            out.append((index, *rest))
    return out


def _record_in_study(study, space: Space):
    import optuna  # lazily: only when the caller asked for an Optuna study

    dists = {n: optuna.distributions.CategoricalDistribution(list(c)) for n, c in space.params.items()}

    def record(config: dict, value: float) -> None:
        if math.isfinite(value):
            trial = optuna.trial.create_trial(params=config, distributions=dists, value=value)
        else:
            trial = optuna.trial.create_trial(params=config, distributions=dists,
                                              state=optuna.trial.TrialState.FAIL)
        study.add_trial(trial)

    return record


def tune(space: Space, objective: Callable[[dict], float], *, max_trials: int = 50,
         time_budget_s: float | None = None, seed: int = 0,
         initial: Sequence[Mapping[str, Any]] = (), prior: Sequence[tuple[Mapping[str, Any], float]] = (),
         patience: int | None = None, candidates: Iterable[Mapping[str, Any]] | None = None,
         callback: Callable[[Progress], None] | None = None, should_stop: Callable[[], bool] | None = None,
         strategy: str | Strategy = "tpe", clock: Callable[[], float] = time.monotonic,
         study: Any = None) -> TuneResult:
    """Find a configuration of ``space`` with a low ``objective``, measuring as few as possible.

    Only valid configurations are measured, each at most once. The default strategy scores every valid,
    unmeasured configuration with a multivariate TPE density model (see docs/search.md).

    Args:
        space: the parameters, their choices and the validity rule.
        objective: ``objective(config) -> float``, lower is better. Return math.inf (or NaN) or raise
            ``InvalidConfig`` when the configuration fails: it is scored as failed and the search goes on.
            Any other exception (KeyboardInterrupt included) propagates.
        max_trials: most measurements (calls of ``objective``). Default 50.
        time_budget_s: no new measurement starts after this many seconds. Default None: no time limit.
        seed: seed of every random choice; the search is deterministic for a seed (given a deterministic
            objective). Default 0.
        initial: configurations to measure first, in order (for instance well-known good ones); invalid,
            out-of-space and repeated ones are skipped. Default none.
        prior: (config, value) pairs measured on a related problem (another shape or GPU; or a performance
            model's predictions). Only their ranking is used: its good region is tried first and weighs in
            the density model. Configurations outside the space are ignored. Default none.
        patience: stop after this many measurements in a row without improving on the best. Default None:
            no early stop.
        candidates: the valid configurations, when the caller has enumerated them; each must use the
            space's keys and choices, and ones the constraint rejects are dropped. Default None: the space
            is enumerated (or, beyond 2**18 combinations, sampled and grown around good configurations).
        callback: called after each measurement with a ``Progress`` (number, max_trials, config, value,
            best_config, best_value), e.g. to print a progress line. Default None.
        should_stop: called before each measurement; True stops the search. Default None.
        strategy: "tpe" (default), "random", or an object following ``strategies.Strategy``.
        clock: the time source for ``time_budget_s`` (tests inject a fake). Default time.monotonic.
        study: an Optuna study to record every measurement in (for Optuna's storages and visualisations;
            failures are recorded as FAIL). Default None: Optuna is not imported.

    Returns:
        A ``TuneResult``.

    Raises:
        ValueError: bad options, or a configuration in ``initial``, ``prior`` or ``candidates`` with keys
            that do not match the space.

    Example:
        >>> space = Space({"x": [1, 2, 4, 8, 16], "y": ["a", "b"]}, constraint=lambda c: c["x"] != 16)
        >>> result = tune(space, lambda c: abs(c["x"] - 4) + (c["y"] == "b"), max_trials=20, seed=0)
        >>> result.best_config, result.best_value, len(result.trials)
        ({'x': 4, 'y': 'a'}, 0.0, 8)
    """
    if max_trials < 0:
        raise ValueError(f"max_trials must be >= 0, got {max_trials}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if time_budget_s is not None and not time_budget_s >= 0:
        raise ValueError(f"time_budget_s must be >= 0, got {time_budget_s}")
    start = clock()
    strat = make_strategy(strategy)
    initial_index = [p[0] for p in _mapped(space, ((c,) for c in initial), "initial config")]
    prior_pairs = [(np.asarray(i), float(v)) for i, v in _mapped(space, prior, "prior config")]
    matrix, complete = _candidate_matrix(space, candidates, seed)
    row_of = {tuple(r): i for i, r in enumerate(matrix.tolist())}
    if not complete:  # a sampled space: initial and prior configurations join the pool when valid
        extra = [i for i in initial_index + [tuple(int(x) for x in p[0]) for p in prior_pairs]
                 if i not in row_of and space._accepts(space.decode(i))]
        matrix = _append(matrix, row_of, extra)
    rng = np.random.default_rng(seed)
    strat.start(space, matrix, prior_pairs, rng)
    record = _record_in_study(study, space) if study is not None else None

    available = np.ones(len(matrix), dtype=bool)
    queue = [row_of[i] for i in dict.fromkeys(initial_index) if i in row_of]
    trials: list[Trial] = []
    best_config, best_value, since_best = None, math.inf, 0
    stop_reason = "max_trials"
    while True:
        if len(trials) >= max_trials:
            break
        if not available.any():
            stop_reason = "exhausted"
            break
        if time_budget_s is not None and clock() - start >= time_budget_s:
            stop_reason = "time_budget"
            break
        if patience is not None and since_best >= patience:
            stop_reason = "patience"
            break
        if should_stop is not None and should_stop():
            stop_reason = "should_stop"
            break
        queue = [r for r in queue if available[r]]
        row = queue.pop(0) if queue else strat.propose(available)
        if not available[row]:
            raise RuntimeError(f"strategy {strat!r} proposed an unavailable candidate")
        available[row] = False
        config = space.decode(matrix[row])
        try:
            value = float(objective(dict(config)))
        except InvalidConfig:
            value = math.inf
        if math.isnan(value):
            value = math.inf
        trials.append(Trial(config, value))
        strat.observe(row, value)
        if record is not None:
            record(config, value)
        if value < best_value:
            best_config, best_value, since_best = config, value, 0
            if not complete:  # grow the sampled pool around the new best
                new = [n for n in space.neighbours(tuple(int(x) for x in matrix[row])) if n not in row_of]
                if new:
                    matrix = _append(matrix, row_of, new)
                    available = np.concatenate([available, np.ones(len(new), dtype=bool)])
                    strat.add_candidates(matrix[-len(new):])
        else:
            since_best += 1
        if callback is not None:
            callback(Progress(len(trials), max_trials, config, value, best_config, best_value))
    return TuneResult(best_config=best_config, best_value=best_value, trials=trials, stop_reason=stop_reason,
                      n_candidates=len(matrix), elapsed_s=clock() - start)


def _append(matrix: np.ndarray, row_of: dict, rows: list[tuple[int, ...]]) -> np.ndarray:
    rows = list(dict.fromkeys(rows))
    for r in rows:
        row_of[r] = len(row_of)
    if not rows:
        return matrix
    return np.concatenate([matrix, np.asarray(rows, dtype=np.int64).reshape(len(rows), matrix.shape[1])])
