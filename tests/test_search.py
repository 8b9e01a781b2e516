"""Generic search (torchtune_ops.search) with fake objectives: no GPU, no torch, deterministic."""
from __future__ import annotations

import itertools
import math
import statistics
import subprocess
import sys

import pytest

from torchtune_ops.errors import InvalidConfig as ErrorsInvalidConfig
from torchtune_ops.search import InvalidConfig, RandomStrategy, Space, TPEStrategy, Trial, TuneResult, tune
from torchtune_ops.search import engine, pool

# A space with ordinal (powers of two, a linear range), categorical and boolean parameters and a constraint
# that rejects about half of it.
PARAMS = {"BLOCK_M": [16, 32, 64, 128, 256], "BLOCK_N": [16, 32, 64, 128, 256], "stages": [1, 2, 3, 4, 5],
          "order": ["row", "col", "swizzle"], "flag": [False, True]}


def fits(cfg):
    return cfg["BLOCK_M"] * cfg["BLOCK_N"] * cfg["stages"] <= 64 * 128 * 3


def cost(cfg):
    """A smooth objective with one optimum at BLOCK_M=64, BLOCK_N=128, stages=3, order=swizzle, flag=True."""
    return (1.0 + abs(math.log2(cfg["BLOCK_M"] / 64)) + abs(math.log2(cfg["BLOCK_N"] / 128))
            + 0.5 * abs(cfg["stages"] - 3) + 0.7 * (cfg["order"] != "swizzle") + 0.3 * (not cfg["flag"]))


def valid_configs(params=PARAMS, constraint=fits):
    names = list(params)
    return [dict(zip(names, v)) for v in itertools.product(*params.values()) if constraint(dict(zip(names, v)))]


class Recorder:
    """An objective that checks the constraint and records every call."""

    def __init__(self, fn=cost, constraint=fits):
        self.fn, self.constraint, self.calls = fn, constraint, []

    def __call__(self, cfg):
        assert self.constraint(cfg), f"invalid config reached the objective: {cfg}"
        self.calls.append(dict(cfg))
        return self.fn(cfg)


STRATEGIES = [pytest.param(lambda: "tpe", id="tpe"), pytest.param(lambda: "random", id="random"),
              pytest.param(lambda: TPEStrategy(n_ei_candidates=8, local_every=0), id="tpe-sampled"),
              pytest.param(lambda: TPEStrategy(gp_fit="ard"), id="tpe-gp-ard"),
              pytest.param(lambda: RandomStrategy(), id="random-object")]


# ---- the shared suite every strategy must pass ----

@pytest.mark.parametrize("make", STRATEGIES)
@pytest.mark.parametrize("max_trials", [1, 7, 40])
def test_strategy_respects_constraint_budget_and_never_repeats(make, max_trials):
    obj = Recorder()
    result = tune(Space(PARAMS, constraint=fits), obj, max_trials=max_trials, seed=3, strategy=make())
    assert len(obj.calls) == len(result.trials) == max_trials
    keys = [tuple(c.values()) for c in obj.calls]
    assert len(set(keys)) == len(keys)
    assert [t.config for t in result.trials] == obj.calls
    assert result.stop_reason == "max_trials"
    assert result.best_value == min(cost(c) for c in obj.calls)
    assert cost(result.best_config) == result.best_value


@pytest.mark.parametrize("make", STRATEGIES)
def test_strategy_exhausts_a_small_space_cleanly(make):
    params = {"a": [1, 2, 3], "b": ["x", "y"], "c": [7]}
    constraint = lambda c: not (c["a"] == 3 and c["b"] == "y")  # noqa: E731
    obj = Recorder(fn=lambda c: c["a"] + (c["b"] == "y"), constraint=constraint)
    result = tune(Space(params, constraint=constraint), obj, max_trials=100, seed=0, strategy=make())
    assert result.stop_reason == "exhausted"
    assert sorted(tuple(c.values()) for c in obj.calls) == sorted(
        tuple(c.values()) for c in valid_configs(params, constraint))
    assert result.best_config == {"a": 1, "b": "x", "c": 7} and result.best_value == 1.0
    assert result.n_candidates == 5


@pytest.mark.parametrize("make", STRATEGIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_strategy_is_deterministic_per_seed(make, seed):
    runs = [tune(Space(PARAMS, constraint=fits), cost, max_trials=25, seed=seed, strategy=make()).trials
            for _ in range(2)]
    assert runs[0] == runs[1]
    other = tune(Space(PARAMS, constraint=fits), cost, max_trials=25, seed=seed + 10, strategy=make()).trials
    assert other != runs[0]


# ---- tune() options ----

def test_result_shape_and_trials_unpack_as_pairs():
    result = tune(Space(PARAMS, constraint=fits), cost, max_trials=5, seed=0)
    assert isinstance(result, TuneResult)
    for trial in result.trials:
        assert isinstance(trial, Trial)
        config, value = trial
        assert value == cost(config)
    assert InvalidConfig is ErrorsInvalidConfig


def test_tpe_finds_the_optimum_faster_than_random():
    def measurements_to_optimum(strategy, seed):
        # the search stops at the optimum: the trials up to it are those of a search that goes on
        found = []
        result = tune(Space(PARAMS, constraint=fits), cost, max_trials=1000, seed=seed, strategy=strategy,
                      callback=lambda p: found.append(p.value == 1.0), should_stop=lambda: any(found))
        return next(i + 1 for i, (_, v) in enumerate(result.trials) if v == 1.0)

    tpe = [measurements_to_optimum("tpe", s) for s in range(5)]
    rnd = [measurements_to_optimum("random", s) for s in range(5)]
    n_valid = len(valid_configs())
    assert statistics.median(tpe) < n_valid / 4, tpe
    assert statistics.median(tpe) * 2 < statistics.median(rnd), (tpe, rnd)


def _stalled_strategy(stall, n_worse=None, **knobs):
    """A TPE strategy told: a best at (0,0,0,0), `n_worse` (default `stall`) worse neighbours of it, and one
    poorer measurement far away at (7,7,7,7); returns the strategy, its candidates and the available mask."""
    import numpy as np

    space = Space({n: list(range(8)) for n in "abcd"})
    cands = np.asarray(list(itertools.product(range(8), repeat=4)), dtype=np.int64)
    row = {tuple(r): i for i, r in enumerate(cands.tolist())}
    strat = TPEStrategy(n_startup=0, stall=stall, **knobs)
    strat.start(space, cands, [], np.random.default_rng(0))
    available = np.ones(len(cands), dtype=bool)
    told = [((7, 7, 7, 7), 3.5), ((0, 0, 0, 0), 1.0)]
    told += [(tuple(i + 1 if d == k else 0 for d in range(4)), 2.0 + i) for i in range(3) for k in range(4)]
    for point, value in told[:2 + (stall if n_worse is None else n_worse)]:
        strat.observe(row[point], value)
        available[row[point]] = False
    return strat, cands, available


def _measure(strat, cands, available, value):
    """Propose, mark the proposal measured with ``value``, and return its choice indices."""
    row = strat.propose(available)
    available[row] = False
    strat.observe(row, value)
    return cands[row]


def test_after_a_long_stall_a_restart_runs_a_local_search_outside_the_best_basin():
    # far steps off, to see the restarts alone; every proposal while stuck is a restart's (explore_every=1)
    strat, cands, available = _stalled_strategy(0, n_worse=10, explore_after=8, explore_every=1)
    start = _measure(strat, cands, available, 2.0)
    assert (start != 0).sum() >= 3  # out of the best's basin (one rank is far_rank of 8 choices)
    step = _measure(strat, cands, available, 1.5)
    assert (step != start).sum() == 1  # a one-parameter neighbour of the restart's start
    after = _measure(strat, cands, available, 1.8)
    assert (after != step).sum() == 1  # ... and then of the restart's best so far (1.5 beat 2.0)
    assert (after != 0).sum() >= 3
    _measure(strat, cands, available, 0.5)  # the restart finds a new best overall: exploration ends
    assert strat.stuck == 0 and not strat.restart


@pytest.mark.parametrize("backoff", [False, True])
def test_restart_backoff_waits_twice_as_long_after_a_restart_that_did_not_pay(backoff):
    strat, cands, available = _stalled_strategy(0, n_worse=10, explore_after=8, explore_every=1,
                                                restart_backoff=backoff)
    restarts = []
    for _ in range(24):  # stuck goes from 10 to 34; every measurement is worse than the best
        row = strat.propose(available)
        restarts.append(row == strat.pending)
        available[row] = False
        strat.observe(row, 3.0)
    # the first restart starts at once and ends after 8 of its measurements without improving (9 in all)
    assert restarts[:9] == [True] * 9
    if backoff:  # the next waits until 10 + 8 * 2 = 26 measurements without a new best
        assert restarts[9:16] == [False] * 7 and restarts[16]
    else:
        assert restarts[9]


def test_a_far_step_does_not_count_one_rank_moves_along_long_axes_as_leaving_the_basin():
    """Three 30-choice axes: a candidate one rank away on each of them is in the best's basin; a far step
    must go where at least three parameters moved by ``far_rank`` of their axis or more."""
    import numpy as np

    space = Space({n: list(range(30)) for n in "abc"} | {"d": [0, 1]})
    cands = np.asarray(list(itertools.product(range(30), range(30), range(30), range(2))), dtype=np.int64)
    row = {tuple(r): i for i, r in enumerate(cands.tolist())}
    strat = TPEStrategy(n_startup=0, stall=3)
    strat.start(space, cands, [], np.random.default_rng(0))
    available = np.ones(len(cands), dtype=bool)
    # The best at the corner; its basin (one rank up on a, b and c) measured as nearly as good.
    told = [((0, 0, 0, 0), 1.0), ((1, 1, 1, 0), 1.01), ((1, 1, 1, 1), 1.02), ((0, 1, 1, 1), 1.03),
            ((29, 29, 29, 1), 3.0)]
    for point, value in told:
        strat.observe(row[point], value)
        available[row[point]] = False
    far = cands[strat.propose(available)]
    moved = max(1, round(strat.far_rank * 29))
    assert (np.abs(far[:3]) >= moved).sum() >= 3, far


def test_without_far_steps_a_stalled_search_does_not_go_to_the_poorer_region():
    strat, cands, available = _stalled_strategy(10)
    strat.stall = 0
    assert (cands[strat.propose(available)] != 7).sum() >= 2


@pytest.mark.parametrize("far_every", [0, 2, 3])
def test_far_every_makes_every_kth_model_proposal_a_far_step_without_a_stall(far_every):
    # stall off, and only one measurement since the best: any far step is the portfolio's
    strat, cands, available = _stalled_strategy(0, n_worse=1, far_every=far_every)
    far = [(_measure(strat, cands, available, 5.0) != 0).sum() >= strat.far for _ in range(6)]
    if far_every:
        assert all(far[k - 1] for k in range(far_every, 7, far_every)), far
    else:
        assert far.count(True) < 6 // 3, far


@pytest.mark.parametrize("second_every", [0, 2])
def test_second_every_centres_every_kth_local_step_on_the_best_outside_the_best_basin(second_every):
    # every model proposal a local step; the runner-up is the far measurement at (7, 7, 7, 7)
    strat, cands, available = _stalled_strategy(0, n_worse=1, local_every=1, second_every=second_every)
    steps = [_measure(strat, cands, available, 5.0) for _ in range(6)]
    for k, step in enumerate(steps, 1):
        around = 7 if second_every and k % second_every == 0 else 0
        assert (step != around).sum() == 1, (k, step)


def test_gp_far_every_sends_every_kth_gp_proposal_outside_the_best_basin():
    # no local steps: model proposals alternate TPE, GP; every second GP proposal (the 4th, 8th, 12th) is far
    strat, cands, available = _stalled_strategy(0, n_worse=1, local_every=0, gp_far_every=2)
    steps = [_measure(strat, cands, available, 5.0) for _ in range(12)]
    assert all((steps[k - 1] != 0).sum() >= strat.far for k in (4, 8, 12)), steps


def test_a_local_step_takes_the_best_neighbour_by_the_gp_or_by_tpe():
    """With every model proposal a local step, the proposal is the one-parameter neighbour of the best with
    the highest expected improvement under the Gaussian process ("gp", the default) or the highest l/g
    ("tpe"); on these measurements the two differ."""
    import numpy as np

    space = Space({"a": list(range(30)), "b": list(range(5))})
    cands = np.asarray(list(itertools.product(range(30), range(5))), dtype=np.int64)
    row = {tuple(r): i for i, r in enumerate(cands.tolist())}
    told = [((0, 2), 1.0), ((15, 2), 1.001), ((29, 2), 1.002), ((0, 4), 2.0), ((15, 4), 2.0), ((29, 3), 1.5),
            ((6, 1), 1.2)]
    picks = {}
    for local_score in ("gp", "tpe"):
        strat = TPEStrategy(n_startup=0, stall=0, local_every=1, local_score=local_score)
        strat.start(space, cands, [], np.random.default_rng(0))
        available = np.ones(len(cands), dtype=bool)
        for point, value in told:
            strat.observe(row[point], value)
            available[row[point]] = False
        near = np.flatnonzero(available & ((cands != cands[row[(0, 2)]]).sum(axis=1) == 1))
        if local_score == "gp":
            values = np.asarray(strat.values, dtype=float)
            expected = near[np.argmax(strat.gp.expected_improvement(values, near, np.random.default_rng(0)))]
        else:
            expected = near[np.argmax(strat.log_ratio()[near])]
        picks[local_score] = strat.propose(available)
        assert picks[local_score] == expected, (local_score, cands[picks[local_score]], cands[expected])
    assert picks["gp"] != picks["tpe"]


def test_local_score_is_checked():
    with pytest.raises(ValueError, match="local_score"):
        TPEStrategy(local_score="ei")


@pytest.mark.parametrize("failure", ["inf", "nan", "raise"])
def test_failing_configs_are_scored_as_failed_and_the_search_goes_on(failure):
    def objective(cfg):
        if cfg["order"] == "row":
            if failure == "raise":
                raise InvalidConfig("out of shared memory")
            return math.inf if failure == "inf" else math.nan
        return cost(cfg)

    result = tune(Space(PARAMS, constraint=fits), objective, max_trials=60, seed=1)
    assert len(result.trials) == 60
    failed = [c for c, v in result.trials if c["order"] == "row"]
    assert failed, "the search should have tried some failing configs"
    assert all(v == math.inf for c, v in result.trials if c["order"] == "row")
    assert result.best_config["order"] != "row" and math.isfinite(result.best_value)


def test_every_config_failing_gives_no_best():
    result = tune(Space({"a": [1, 2, 3]}), lambda c: math.inf, max_trials=10, seed=0)
    assert result.best_config is None and result.best_value == math.inf
    assert result.stop_reason == "exhausted" and len(result.trials) == 3


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt, ValueError])
def test_other_exceptions_propagate(exc):
    calls = []

    def objective(cfg):
        calls.append(cfg)
        if len(calls) == 3:
            raise exc("boom")
        return cost(cfg)

    with pytest.raises(exc):
        tune(Space(PARAMS, constraint=fits), objective, max_trials=20, seed=0)
    assert len(calls) == 3


def test_initial_configs_are_measured_first_in_order_and_invalid_ones_skipped():
    initial = [{"BLOCK_M": 64, "BLOCK_N": 64, "stages": 2, "order": "row", "flag": True},
               {"BLOCK_M": 256, "BLOCK_N": 256, "stages": 5, "order": "row", "flag": True},  # violates fits
               {"BLOCK_M": 48, "BLOCK_N": 64, "stages": 2, "order": "row", "flag": True},  # 48: not a choice
               {"BLOCK_M": 16, "BLOCK_N": 32, "stages": 1, "order": "col", "flag": False},
               {"BLOCK_M": 64, "BLOCK_N": 64, "stages": 2, "order": "row", "flag": True}]  # repeated
    obj = Recorder()
    result = tune(Space(PARAMS, constraint=fits), obj, max_trials=10, seed=0, initial=initial)
    assert obj.calls[:2] == [initial[0], initial[3]]
    assert len(obj.calls) == 10 and obj.calls.count(initial[0]) == 1
    assert result.trials[0] == (initial[0], cost(initial[0]))


def test_initial_with_unknown_or_missing_keys_is_an_error():
    space = Space(PARAMS, constraint=fits)
    with pytest.raises(ValueError, match="BLOCK_K"):
        tune(space, cost, initial=[{**valid_configs()[0], "BLOCK_K": 32}])
    with pytest.raises(ValueError):
        tune(space, cost, initial=[{"BLOCK_M": 64}])
    with pytest.raises(ValueError):
        tune(space, cost, prior=[({"nope": 1}, 1.0)])


def test_max_trials_zero_measures_nothing():
    result = tune(Space(PARAMS), lambda c: pytest.fail("measured"), max_trials=0)
    assert result.trials == [] and result.best_config is None and result.stop_reason == "max_trials"


def test_time_budget_with_a_fake_clock():
    now = [100.0]

    def objective(cfg):
        now[0] += 2.0  # every measurement takes two fake seconds
        return cost(cfg)

    result = tune(Space(PARAMS, constraint=fits), objective, max_trials=100, time_budget_s=9.0, seed=0,
                  clock=lambda: now[0])
    # measurements start at 0, 2, 4, 6 and 8 seconds; none starts at 10
    assert len(result.trials) == 5 and result.stop_reason == "time_budget"
    assert result.elapsed_s == pytest.approx(10.0)


def test_tiny_real_time_budget_stops():
    result = tune(Space(PARAMS), cost, max_trials=10_000, time_budget_s=0.0)
    assert result.trials == [] and result.stop_reason == "time_budget"


def test_patience_stops_when_nothing_improves():
    result = tune(Space(PARAMS), lambda c: 5.0, max_trials=100, patience=7, seed=0)
    assert len(result.trials) == 8 and result.stop_reason == "patience"
    improving = iter(range(100, 0, -1))
    result = tune(Space(PARAMS), lambda c: float(next(improving)), max_trials=30, patience=3, seed=0)
    assert len(result.trials) == 30 and result.stop_reason == "max_trials"


def test_callback_and_should_stop():
    seen = []
    result = tune(Space(PARAMS, constraint=fits), cost, max_trials=12, seed=0, callback=seen.append,
                  should_stop=lambda: len(seen) >= 4)
    assert result.stop_reason == "should_stop" and len(result.trials) == 4
    assert [p.number for p in seen] == [1, 2, 3, 4]
    assert all(p.max_trials == 12 for p in seen)
    assert seen[-1].best_value == min(v for _, v in result.trials) == result.best_value
    assert [(p.config, p.value) for p in seen] == [tuple(t) for t in result.trials]


def test_explicit_candidates_are_the_only_ones_measured():
    cands = valid_configs()[::7]
    obj = Recorder()
    result = tune(Space(PARAMS, constraint=fits), obj, candidates=cands + cands[:3], max_trials=1000, seed=0)
    assert result.stop_reason == "exhausted" and result.n_candidates == len(cands)
    assert sorted(map(str, obj.calls)) == sorted(map(str, cands))


def test_candidates_outside_the_space_are_an_error():
    with pytest.raises(ValueError):
        tune(Space(PARAMS), cost, candidates=[{**valid_configs()[0], "BLOCK_M": 48}])


def test_candidates_rejected_by_the_constraint_are_dropped():
    space = Space(PARAMS, constraint=fits)
    bad = {"BLOCK_M": 256, "BLOCK_N": 256, "stages": 5, "order": "row", "flag": True}
    result = tune(space, Recorder(), candidates=[bad, valid_configs()[0]], max_trials=5)
    assert result.n_candidates == 1 and len(result.trials) == 1


def test_prior_from_a_related_problem_speeds_up_the_search():
    # A larger space; the related problem's optimum is one step away from this problem's.
    params = {"x": list(range(0, 40)), "y": [2 ** i for i in range(10)], "c": ["a", "b", "c", "d"]}

    def make(ox, oy, oc):
        return lambda g: 1 + abs(g["x"] - ox) / 4 + abs(math.log2(g["y"]) - oy) + (g["c"] != oc)

    target, related = make(27, 6, "c"), make(28, 6, "c")
    space = Space(params)
    prior = [(g, related(g)) for g in valid_configs(params, lambda g: True)[::3]]

    def to_optimum(prior_pairs, seed):
        result = tune(space, target, max_trials=150, seed=seed, prior=prior_pairs,
                      should_stop=lambda: bool(seen) and seen[-1].best_value == 1.0, callback=seen.append)
        seen.clear()
        return next((i + 1 for i, (_, v) in enumerate(result.trials) if v == 1.0), 151)

    seen = []

    cold = [to_optimum((), s) for s in range(4)]
    warm = [to_optimum(prior, s) for s in range(4)]
    assert statistics.median(warm) * 2 <= statistics.median(cold), (warm, cold)
    # A prior with configurations outside the space (another GPU's choices) is fine: they are ignored.
    odd = prior + [({"x": 99, "y": 3, "c": "z"}, 0.1)]
    assert tune(space, target, max_trials=5, seed=0, prior=odd).trials


def test_study_records_every_measurement():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()

    def objective(cfg):
        if cfg["order"] == "row":
            raise InvalidConfig("failed")
        return cost(cfg)

    result = tune(Space(PARAMS, constraint=fits), objective, max_trials=15, seed=0, study=study)
    assert len(study.trials) == 15
    for t, (cfg, v) in zip(study.trials, result.trials):
        assert t.params == cfg
        assert (t.state == optuna.trial.TrialState.FAIL) == (v == math.inf)
    assert study.best_value == result.best_value


def test_a_space_too_large_to_enumerate_is_sampled_and_grown(monkeypatch):
    monkeypatch.setattr(pool, "ENUMERATE_LIMIT", 2000)
    params = {f"p{i}": [1, 2, 4, 8, 16, 32] for i in range(6)}  # 46,656 combinations
    constraint = lambda c: sum(c.values()) <= 120  # noqa: E731
    opt = {"p0": 4, "p1": 8, "p2": 2, "p3": 16, "p4": 1, "p5": 32}

    def objective(cfg):
        assert constraint(cfg)
        return 1 + sum(abs(math.log2(cfg[k] / opt[k])) for k in cfg)

    result = tune(Space(params, constraint=constraint), objective, max_trials=150, seed=0)
    keys = [tuple(c.values()) for c, _ in result.trials]
    assert len(set(keys)) == len(keys) == 150
    assert result.best_value <= 2.0  # within one step of the optimum
    assert result.n_candidates > 0


# ---- Space ----

@pytest.mark.parametrize("params", [{}, {"a": []}, {"a": [1, 1]}, {"a": "abc"}, {1: [1, 2]}, {"a": 5}])
def test_space_rejects_bad_parameters(params):
    with pytest.raises(ValueError):
        Space(params)


def test_space_rejects_a_non_callable_constraint():
    with pytest.raises(ValueError):
        Space({"a": [1]}, constraint=True)


def test_space_validity_encoding_and_ordinal_positions():
    space = Space({"w": [8, 2, 4], "s": ["x", "y"], "k": [3]}, constraint=lambda c: c["w"] != 8 or c["s"] == "x")
    assert space.size == 6 and space.names == ("w", "s", "k")
    assert space.ordinal == (True, False, False)
    assert list(space.positions[0]) == [2.0, 0.0, 1.0]  # ranks in sorted order: 8 is next to 4
    assert space.is_valid({"w": 8, "s": "x", "k": 3}) and not space.is_valid({"w": 8, "s": "y", "k": 3})
    assert not space.is_valid({"w": 16, "s": "x", "k": 3})
    assert space.encode({"w": 4, "s": "y", "k": 3}) == (2, 1, 0)
    assert space.decode((2, 1, 0)) == {"w": 4, "s": "y", "k": 3}
    with pytest.raises(ValueError):
        space.is_valid({"w": 4, "s": "y"})
    rows, complete = space.valid_indices()
    assert complete and len(rows) == 5


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError):
        tune(Space(PARAMS), cost, strategy="annealing")
    with pytest.raises(ValueError):
        tune(Space(PARAMS), cost, strategy=object())


@pytest.mark.parametrize("kwargs", [{"max_trials": -1}, {"patience": 0}, {"time_budget_s": -1.0}])
def test_bad_options_are_errors(kwargs):
    with pytest.raises(ValueError):
        tune(Space(PARAMS), cost, **kwargs)


def test_importing_the_search_does_not_import_optuna():
    code = ("import sys, torchtune_ops, torchtune_ops.search; "
            "from torchtune_ops.search import Space, tune, TPEStrategy; "
            "Space({'a': [1, 2, 3]}); "
            "assert 'optuna' not in sys.modules, 'optuna imported'; "
            "from torchtune_ops.search import Sampler; "  # Sampler is an Optuna sampler: now it is
            "assert 'optuna' in sys.modules; "
            "tune(Space({'a': [1, 2, 3]}), lambda c: c['a'], max_trials=3); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docstring_examples_run():
    import doctest

    from torchtune_ops.search import space as space_module

    for module in (engine, space_module):
        failed, attempted = doctest.testmod(module)
        assert attempted and not failed, module.__name__


def test_tune_without_optuna_runs_the_same_search_in_a_plain_loop():
    # a GPU box with torch and Triton only: tune() must still search, proposing what the Optuna path proposes
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['optuna'] = None\n"
        "from torchtune_ops.search import Space, tune\n"
        "space = Space({'x': list(range(12)), 'y': ['a', 'b', 'c']}, constraint=lambda c: c['x'] != 5)\n"
        "r = tune(space, lambda c: (c['x'] - 7) ** 2 + (c['y'] != 'b'), max_trials=15, seed=3)\n"
        "print([(t.config['x'], t.config['y']) for t in r.trials])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    space = Space({"x": list(range(12)), "y": ["a", "b", "c"]}, constraint=lambda c: c["x"] != 5)
    ref = tune(space, lambda c: (c["x"] - 7) ** 2 + (c["y"] != "b"), max_trials=15, seed=3)
    assert out.stdout.strip() == str([(t.config["x"], t.config["y"]) for t in ref.trials])
