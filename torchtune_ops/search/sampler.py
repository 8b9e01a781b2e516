"""Our search as an Optuna sampler: ``Sampler(space)`` proposes whole configurations of a ``Space``.

    import optuna
    from torchtune_ops.search import Sampler, Space

    space = Space({"BLOCK_M": [32, 64, 128], "num_warps": [4, 8]}, constraint=lambda c: ...)
    sampler = Sampler(space, seed=0)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda trial: measure(sampler.suggest(trial)), n_trials=50)

Importing this module imports Optuna; ``torchtune_ops.search`` imports it only when ``Sampler`` is first
used. See docs/search.md.
"""
from __future__ import annotations

import logging
import math
import numbers
import threading
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from .pool import Pool
from .space import Space
from .strategies import Strategy, make_strategy

log = logging.getLogger("torchtune_ops")

_NATIVE = (type(None), bool, int, float, str)  # the choice types Optuna stores as they are


def _native(value: Any) -> Any:
    """The value Optuna stores for a choice: itself when Optuna accepts its type, else a number's
    Python value (numpy scalars) or its repr (tuples and other hashables)."""
    if type(value) in _NATIVE:
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return repr(value)


class OptunaSpace:
    """A ``Space``'s parameters as Optuna categorical distributions, and the way back.

    Args:
        space: the search space.

    Raises:
        ValueError: two choices of one parameter that Optuna would store as the same value.
    """

    def __init__(self, space: Space):
        self.space = space
        self.distributions: dict[str, CategoricalDistribution] = {}
        self._back: dict[str, dict[Any, Any]] = {}
        for name, choices in space.params.items():
            native = [_native(c) for c in choices]
            back = {(type(n), n): c for n, c in zip(native, choices)}
            if len(back) != len(choices):
                raise ValueError(f"parameter {name!r}: Optuna would store two of its choices {choices!r} as "
                                 "the same value")
            self.distributions[name] = CategoricalDistribution(native)
            self._back[name] = back

    def to_optuna(self, config: Mapping[str, Any]) -> dict:
        """``config`` (the space's values) as Optuna parameters."""
        return {n: _native(config[n]) for n in self.space.names}

    def from_optuna(self, params: Mapping[str, Any]) -> dict | None:
        """The configuration (the space's values) of Optuna parameters; None when a parameter of the space
        is missing or holds a value that is not one of its choices."""
        try:
            return {n: self._back[n][(type(params[n]), params[n])] for n in self.space.names}
        except (KeyError, TypeError):
            return None

    def suggest(self, trial: optuna.Trial) -> dict:
        """Suggest every parameter of the space in ``trial`` (``trial.suggest_categorical``) and return the
        configuration, in the space's values."""
        params = {n: trial.suggest_categorical(n, d.choices) for n, d in self.distributions.items()}
        config = self.from_optuna(params)
        assert config is not None
        return config


class Sampler(BaseSampler):
    """Our search (``tune()``'s strategy) as an Optuna sampler over the valid configurations of a space.

    Each trial gets a whole configuration at once (Optuna's *relative* sampling): the sampler enumerates
    the valid candidates of ``space`` once and proposes the unmeasured one its strategy ranks first, so it
    never proposes an invalid configuration, nor one measured or being measured by another trial of the
    study. It learns from every finished trial of the study, whoever ran it: a COMPLETE trial counts with
    its value (negated for a study that maximizes), a FAIL or PRUNED one as a failed configuration (slower
    than any other; it is not proposed again). Trials whose parameters are not a candidate are ignored.

    The objective suggests the space's parameters with ``trial.suggest_categorical(name, choices)`` and the
    space's choices, in the space's order (``sampler.suggest(trial)`` does it and returns the config);
    parameters outside the space are sampled at random. When every candidate has been measured, a study run
    by ``study.optimize`` is stopped (as Optuna's ``BruteForceSampler`` does); further trials get random
    (repeated) configurations. One sampler serves one study. Single-objective studies only.

    Args:
        space: the parameters, their choices and the validity rule. Choices that Optuna cannot store as
            they are (numpy numbers, tuples) are stored as Python numbers or their repr.
        seed: seed of every random choice; with trials run one after another, the proposals are the same
            as ``tune()``'s for the same seed. Default 0.
        strategy: ranks the candidates: "tpe" (default), "random", or an object following
            ``strategies.Strategy`` (e.g. ``TPEStrategy(**knobs)``).
        initial: configurations proposed first, in order (well-known good ones, last winners); invalid,
            out-of-space and repeated ones are skipped. Default none.
        prior: (config, value) pairs measured on a related problem (another shape or GPU); only their
            ranking is used (see ``tune``). Default none.
        model: a performance model: ``model(configs) -> predicted values`` (lower is better) for a list of
            candidate configurations; its predictions serve as the prior when ``prior`` is empty.
            Default None.
        candidates: the valid configurations, when the caller has enumerated them; default None: the space
            is enumerated (or, beyond 2**18 combinations, sampled and grown around good configurations).

    Raises:
        ValueError: a configuration in ``initial``, ``prior`` or ``candidates`` with keys that do not match
            the space, or an unknown strategy.

    Example:
        >>> import optuna
        >>> space = Space({"x": [1, 2, 4, 8, 16], "y": ["a", "b"]}, constraint=lambda c: c["x"] != 16)
        >>> sampler = Sampler(space, seed=0)
        >>> study = optuna.create_study(sampler=sampler)
        >>> study.optimize(lambda t: abs(t.suggest_categorical("x", [1, 2, 4, 8, 16]) - 4)
        ...                + (t.suggest_categorical("y", ["a", "b"]) == "b"), n_trials=20)
        >>> study.best_params, len(study.trials)
        ({'x': 4, 'y': 'a'}, 8)
    """

    def __init__(self, space: Space, *, seed: int = 0, strategy: str | Strategy = "tpe",
                 initial: Sequence[Mapping[str, Any]] = (),
                 prior: Sequence[tuple[Mapping[str, Any], float]] = (),
                 model: Callable[[list[dict]], Sequence[float]] | None = None,
                 candidates: Iterable[Mapping[str, Any]] | None = None):
        self.space = space
        self.optuna_space = OptunaSpace(space)
        self.pool = Pool(space, strategy=make_strategy(strategy), seed=seed, initial=initial, prior=prior,
                         model=model, candidates=candidates)
        self._independent = RandomSampler(seed=seed)
        self._lock = threading.RLock()
        self._told: set[int] = set()  # numbers of the trials the pool has been told
        self._scan = 0  # trials before this index (in number order) have all been told
        self._proposed: dict[int, int] = {}  # trial number -> candidate row, for unfinished trials
        self._study: str | None = None  # the name of the study it serves
        self._maximize = False
        self._warned = False

    @property
    def n_candidates(self) -> int:
        """How many valid configurations the sampler chooses from."""
        return len(self.pool)

    @property
    def exhausted(self) -> bool:
        """True when every candidate has been measured (by a finished trial)."""
        return self.pool.exhausted

    def suggest(self, trial: optuna.Trial) -> dict:
        """Suggest the space's parameters in ``trial`` and return the configuration (the space's values)."""
        return self.optuna_space.suggest(trial)

    # ---- BaseSampler

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self.optuna_space.distributions)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        self._raise_error_if_multi_objective(study)
        with self._lock:
            self._bind(study)
            pending = self._sync(study, trial)
            fixed = trial.system_attrs.get("fixed_params", {})
            if all(n in fixed for n in self.space.names):  # an enqueued configuration: Optuna uses it
                return {}
            row = self.pool.next_row(pending)
            if row is None:
                if not self._warned:
                    log.warning("torchtune_ops Sampler: every candidate has been measured or is being "
                                "measured; further trials get random configurations")
                    self._warned = True
                return {}
            self._proposed[trial.number] = row
            params = self.optuna_space.to_optuna(self.pool.config(row))
        return {n: v for n, v in params.items() if n in search_space}

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._independent.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        with self._lock:
            self._bind(study)
            self._tell(study, trial.number, trial.params, state, values)
            if self.pool.exhausted:
                try:
                    study.stop()  # only possible inside study.optimize
                except RuntimeError:
                    pass

    def reseed_rng(self) -> None:
        self._independent.reseed_rng()

    # ---- bookkeeping

    def _bind(self, study: Study) -> None:
        if self._study is None:
            self._study = study.study_name
            self._maximize = study.directions[0] == StudyDirection.MAXIMIZE
        elif self._study != study.study_name:
            raise ValueError("a torchtune_ops Sampler serves one study; create one per study")

    def _row(self, params: Mapping[str, Any], *, grow: bool = False) -> int | None:
        config = self.optuna_space.from_optuna(params)
        return None if config is None else self.pool.row(config, grow=grow)

    def _tell(self, study: Study, number: int, params: Mapping[str, Any], state: TrialState,
              values: Sequence[float] | None) -> None:
        if number in self._told:
            return
        self._told.add(number)
        self._proposed.pop(number, None)
        row = self._row(params, grow=True)
        if row is None:
            return
        value = math.inf
        if state == TrialState.COMPLETE and values:
            value = float(values[0])
            if self._maximize:
                value = -value
            if math.isnan(value):
                value = math.inf
        self.pool.tell(row, value)

    def _sync(self, study: Study, trial: FrozenTrial) -> np.ndarray:
        """Tell the pool every finished trial it has not seen (other processes' included, in trial order);
        return the mask of candidates that other unfinished trials are measuring."""
        trials = study.get_trials(deepcopy=False)  # in trial-number order
        while self._scan < len(trials) and trials[self._scan].number in self._told:
            self._scan += 1  # every trial before _scan has been told
        busy = []
        for t in trials[self._scan:]:
            if t.number == trial.number or t.number in self._told:
                continue
            if t.state.is_finished():
                self._tell(study, t.number, t.params, t.state, t.values)
            else:  # RUNNING or WAITING
                row = self._row(t.params or t.system_attrs.get("fixed_params", {}))
                busy.append(self._proposed.get(t.number) if row is None else row)
        pending = np.zeros(len(self.pool), dtype=bool)
        pending[[r for r in busy if r is not None]] = True
        return pending


#: Optuna's own samplers under the names ``tune(strategy=...)`` accepts, for comparison. They sample each
#: parameter on its own and learn validity only by trying: ``tune()`` counts an invalid or repeated
#: proposal as no measurement (it is told FAIL, resp. the recorded value).
OPTUNA_STRATEGIES: dict[str, Callable[[int], BaseSampler]] = {
    "optuna-tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "optuna-random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "optuna-nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed),
}
