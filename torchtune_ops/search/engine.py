"""tune(): measure the most promising valid, unmeasured configurations of a space, within a budget.

The measurements run as trials of an Optuna study (ask/tell) whose sampler is ``sampler.Sampler``; the
search itself (``pool.Pool`` and a strategy) knows nothing of Optuna.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

from ..errors import InvalidConfig
from .pool import Pool
from .space import Space
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
        stop_reason: why the search stopped: "max_trials", "time_budget", "patience", "should_stop",
            "exhausted" (every valid configuration was measured) or "stalled" (a plain Optuna sampler made
            ``MAX_WASTED`` invalid or repeated proposals in a row).
        n_candidates: how many valid configurations the search chose from.
        elapsed_s: seconds spent in tune() (by its clock).
    """

    best_config: dict | None
    best_value: float
    trials: list[Trial]
    stop_reason: str
    n_candidates: int
    elapsed_s: float


def tune(space: Space, objective: Callable[[dict], float], *, max_trials: int = 50,
         time_budget_s: float | None = None, seed: int = 0,
         initial: Sequence[Mapping[str, Any]] = (), prior: Sequence[tuple[Mapping[str, Any], float]] = (),
         patience: int | None = None, candidates: Iterable[Mapping[str, Any]] | None = None,
         callback: Callable[[Progress], None] | None = None, should_stop: Callable[[], bool] | None = None,
         strategy: Any = "tpe", clock: Callable[[], float] = time.monotonic,
         study: Any = None, storage: Any = None, study_name: str | None = None) -> TuneResult:
    """Find a configuration of ``space`` with a low ``objective``, measuring as few as possible.

    Only valid configurations are measured, each at most once. The default strategy scores every valid,
    unmeasured configuration with a multivariate TPE density model (see docs/search.md). Each measurement
    is a trial of an Optuna study (``study.ask()``/``study.tell()``) sampled by ``Sampler``: in memory by
    default, in any Optuna storage with ``storage=`` (for optuna-dashboard, or to keep the history).

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
        strategy: "tpe" (default), "random", or an object following ``strategies.Strategy``; or, for
            comparison, one of Optuna's samplers: "optuna-tpe", "optuna-random", "optuna-nsga2" (seeded
            with ``seed``) or any ``optuna.samplers.BaseSampler``. Optuna's samplers propose parameters
            one by one: an invalid proposal is told FAIL and a repeated one its recorded value, neither
            measured nor counted (``initial`` configurations are enqueued trials).
        clock: the time source for ``time_budget_s`` (tests inject a fake). Default time.monotonic.
        study: an existing Optuna study (minimizing) to run the trials in; its sampler is replaced by ours
            for the call, and trials it already holds inform the search (their configurations are not
            measured again). Default None: a new study.
        storage: where the new study lives: an Optuna storage or URL (``"sqlite:///tune.db"``,
            ``optuna.storages.JournalStorage(...)``). Default None: in memory.
        study_name: the new study's name (an existing name is an error). Default None: Optuna's.

    Every measurement is one COMPLETE trial (FAIL when it failed), with the configuration as its
    parameters; ``TuneResult.trials`` holds this call's measurements in order.

    Returns:
        A ``TuneResult``.

    Raises:
        ValueError: bad options, a configuration in ``initial``, ``prior`` or ``candidates`` with keys
            that do not match the space, or a ``study_name`` the storage already has.

    Example:
        >>> space = Space({"x": [1, 2, 4, 8, 16], "y": ["a", "b"]}, constraint=lambda c: c["x"] != 16)
        >>> result = tune(space, lambda c: abs(c["x"] - 4) + (c["y"] == "b"), max_trials=20, seed=0)
        >>> result.best_config, result.best_value, len(result.trials)
        ({'x': 4, 'y': 'a'}, 0.0, 8)
    """
    _check_options(max_trials, patience, time_budget_s)
    start = clock()
    try:
        driver = _OptunaDriver(space, seed=seed, strategy=strategy, initial=initial, prior=prior,
                               candidates=candidates, study=study, storage=storage, study_name=study_name)
    except ModuleNotFoundError as e:
        # Optuna missing (a GPU box with only torch and Triton): our strategy's proposals are the same
        # through a plain loop, trial for trial; a study, a storage or Optuna's own samplers need Optuna.
        if e.name != "optuna" or study is not None or storage is not None or not _ours(strategy):
            raise
        logging.getLogger("torchtune_ops").info("tune(): Optuna is not installed; the search runs in a "
                                                "plain loop (same proposals, no study)")
        return _tune_direct(space, objective, max_trials=max_trials, time_budget_s=time_budget_s, seed=seed,
                            initial=initial, prior=prior, patience=patience, candidates=candidates,
                            callback=callback, should_stop=should_stop, strategy=strategy, clock=clock)
    try:
        return _loop(driver, objective, max_trials=max_trials, time_budget_s=time_budget_s, patience=patience,
                     callback=callback, should_stop=should_stop, clock=clock, start=start)
    finally:
        driver.close()


def _tune_direct(space: Space, objective: Callable[[dict], float], *, max_trials: int = 50,
                 time_budget_s: float | None = None, seed: int = 0, initial: Sequence[Mapping[str, Any]] = (),
                 prior: Sequence[tuple[Mapping[str, Any], float]] = (), patience: int | None = None,
                 candidates: Iterable[Mapping[str, Any]] | None = None,
                 callback: Callable[[Progress], None] | None = None, should_stop: Callable[[], bool] | None = None,
                 strategy: str | Strategy = "tpe", clock: Callable[[], float] = time.monotonic) -> TuneResult:
    """``tune()`` without Optuna: the strategy's proposals measured in a plain loop (the reference that the
    Optuna path must reproduce trial for trial; tests and benchmarks/sampler_overhead.py use it)."""
    _check_options(max_trials, patience, time_budget_s)
    start = clock()
    pool = Pool(space, strategy=make_strategy(strategy), seed=seed, initial=initial, prior=prior,
                candidates=candidates)
    return _loop(_DirectDriver(pool), objective, max_trials=max_trials, time_budget_s=time_budget_s,
                 patience=patience, callback=callback, should_stop=should_stop, clock=clock, start=start)


def _ours(strategy: Any) -> bool:
    """False for one of Optuna's samplers (by name or as an object); True for a strategy of this package."""
    if isinstance(strategy, str):
        return not strategy.startswith("optuna")
    return not type(strategy).__module__.startswith("optuna")


def _check_options(max_trials: int, patience: int | None, time_budget_s: float | None) -> None:
    if max_trials < 0:
        raise ValueError(f"max_trials must be >= 0, got {max_trials}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if time_budget_s is not None and not time_budget_s >= 0:
        raise ValueError(f"time_budget_s must be >= 0, got {time_budget_s}")


#: a plain Optuna sampler making this many invalid or repeated proposals in a row stops tune() ("stalled")
MAX_WASTED = 1000


class _DirectDriver:
    """Proposals straight from the pool's strategy."""

    def __init__(self, pool: Pool):
        self.pool = pool

    @property
    def n_candidates(self) -> int:
        return len(self.pool)

    def ask(self) -> tuple[Any, dict] | None:
        row = self.pool.next_row()
        return row, self.pool.config(row)

    def tell(self, row: int, value: float) -> None:
        self.pool.tell(row, value)

    def abandon(self, row: int) -> None:
        pass


class _OptunaDriver:
    """Proposals through an Optuna study (ask/tell), from our ``Sampler`` or a plain Optuna sampler."""

    def __init__(self, space: Space, *, seed: int, strategy: Any, initial: Sequence, prior: Sequence,
                 candidates: Iterable | None, study: Any, storage: Any, study_name: str | None):
        import optuna  # lazily: `import torchtune_ops.search` stays free of Optuna

        from .sampler import OPTUNA_STRATEGIES, OptunaSpace, Sampler

        self.optuna = optuna
        plain = None
        if isinstance(strategy, optuna.samplers.BaseSampler):
            plain = strategy
        elif isinstance(strategy, str) and strategy in OPTUNA_STRATEGIES:
            plain = OPTUNA_STRATEGIES[strategy](seed)
        elif isinstance(strategy, str) and strategy.startswith("optuna-"):
            raise ValueError(f"unknown strategy {strategy!r}; Optuna's are {sorted(OPTUNA_STRATEGIES)}")
        if plain is None:
            self.sampler = Sampler(space, seed=seed, strategy=strategy, initial=initial, prior=prior,
                                   candidates=candidates)
            self.pool, self.ospace = self.sampler.pool, self.sampler.optuna_space
        else:
            self.sampler = plain
            self.pool = Pool(space, strategy=None, seed=seed, initial=initial, prior=prior, candidates=candidates)
            self.ospace = OptunaSpace(space)
            self.values: dict[int, float] = {}
        self.plain = plain is not None
        self.restore = None
        if study is not None:
            if storage is not None or study_name is not None:
                raise ValueError("give either study= or storage=/study_name=, not both")
            if study._is_multi_objective() or study.direction != optuna.study.StudyDirection.MINIMIZE:
                raise ValueError("tune() needs a study that minimizes one objective")
            self.restore = study.sampler
            study.sampler = self.sampler
            self.study = study
        else:
            with _quiet_optuna(optuna):
                try:
                    self.study = optuna.create_study(storage=storage, sampler=self.sampler,
                                                     study_name=study_name, direction="minimize")
                except optuna.exceptions.DuplicatedStudyError:
                    raise ValueError(f"the storage already has a study named {study_name!r}") from None
        self.wasted = 0
        if self.plain:  # the initial configurations first, as Optuna does it: enqueued trials
            for row in self.pool.queue:
                self.study.enqueue_trial(self.ospace.to_optuna(self.pool.config(row)))
            self.pool.queue = []

    @property
    def n_candidates(self) -> int:
        return len(self.pool)

    def close(self) -> None:
        if self.restore is not None:
            self.study.sampler = self.restore

    def ask(self) -> tuple[Any, dict] | None:
        """A trial with a valid, unmeasured configuration; None after ``MAX_WASTED`` wasted proposals."""
        fail = self.optuna.trial.TrialState.FAIL
        for _ in range(MAX_WASTED):
            trial = self.study.ask()
            config = self.ospace.suggest(trial)
            row = self.pool.row(config, grow=True)
            if row is not None and self.pool.available[row]:
                return (trial, row), self.pool.config(row)
            if row is None:  # a plain sampler's invalid proposal: no measurement
                trial.set_user_attr("torchtune_ops", "invalid")
                self.study.tell(trial, state=fail)
            else:  # a repeated one: told its recorded value, no measurement
                trial.set_user_attr("torchtune_ops", "repeated")
                value = self.values.get(row, math.inf) if self.plain else math.inf
                self._tell(trial, value)
            self.wasted += 1
        return None

    def _tell(self, trial: Any, value: float) -> None:
        if math.isfinite(value):
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)

    def tell(self, handle: tuple[Any, int], value: float) -> None:
        trial, row = handle
        self._tell(trial, value)  # our sampler tells its pool in after_trial
        if self.plain:
            self.values[row] = value
            self.pool.tell(row, value)

    def abandon(self, handle: tuple[Any, int]) -> None:
        """The objective raised: the trial is told FAIL before the exception propagates."""
        self.study.tell(handle[0], state=self.optuna.trial.TrialState.FAIL)


_QUIET_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_optuna(optuna: Any) -> Iterator[None]:
    """Optuna logs each study it creates at INFO; tune() creates one per call."""
    with _QUIET_LOCK:
        before = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            yield
        finally:
            optuna.logging.set_verbosity(before)


def _loop(driver: Any, objective: Callable[[dict], float], *, max_trials: int, time_budget_s: float | None,
          patience: int | None, callback: Callable[[Progress], None] | None,
          should_stop: Callable[[], bool] | None, clock: Callable[[], float], start: float) -> TuneResult:
    trials: list[Trial] = []
    best_config, best_value, since_best = None, math.inf, 0
    stop_reason = "max_trials"
    while True:
        if len(trials) >= max_trials:
            break
        if driver.pool.exhausted:
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
        asked = driver.ask()
        if asked is None:
            stop_reason = "stalled"
            break
        handle, config = asked
        try:
            value = float(objective(dict(config)))
        except InvalidConfig:
            value = math.inf
        except BaseException:
            driver.abandon(handle)
            raise
        if math.isnan(value):
            value = math.inf
        trials.append(Trial(config, value))
        driver.tell(handle, value)
        if value < best_value:
            best_config, best_value, since_best = config, value, 0
        else:
            since_best += 1
        if callback is not None:
            callback(Progress(len(trials), max_trials, config, value, best_config, best_value))
    return TuneResult(best_config=best_config, best_value=best_value, trials=trials, stop_reason=stop_reason,
                      n_candidates=driver.n_candidates, elapsed_s=clock() - start)
