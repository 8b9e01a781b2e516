"""search.Sampler (our search as an Optuna sampler) and tune() running through Optuna: fake objectives only."""
from __future__ import annotations

import itertools
import math
import random

import optuna
import pytest

from torchtune_ops.search import InvalidConfig, Sampler, Space, TPEStrategy, tune
from torchtune_ops.search.engine import _tune_direct

from test_search import PARAMS, cost, fits  # the shared space and objective: one optimum, 1.0

optuna.logging.set_verbosity(optuna.logging.WARNING)


def key(cfg):
    return tuple(cfg[n] for n in PARAMS)


def replay_space(seed=0, n=300):
    """A small replayed space in the format of ../shared/datasets: the valid configurations are the keys of
    a table of recorded times, about one in ten of them failed (+inf); everything else is invalid."""
    rng = random.Random(seed)
    params = {"block_x": [16, 32, 64, 128, 256], "block_y": [1, 2, 4, 8, 16], "tile": [1, 2, 3, 4],
              "unroll": [0, 1], "loop": ["a", "b", "c"]}
    combos = list(itertools.product(*params.values()))
    rng.shuffle(combos)
    times = {}
    for c in combos[:n]:
        cfg = dict(zip(params, c))
        smooth = abs(math.log2(cfg["block_x"] / 64)) + abs(math.log2(cfg["block_y"] / 4)) + abs(cfg["tile"] - 2)
        times[c] = math.inf if rng.random() < 0.1 else 1.0 + smooth + 0.3 * rng.random()
    return params, times


# ---- the sampler in a plain Optuna study

def test_sampler_in_a_plain_study_finds_the_optimum_without_invalid_or_repeated_proposals():
    space = Space(PARAMS, constraint=fits)
    sampler = Sampler(space, seed=0)
    seen = []

    def objective(trial):
        cfg = {n: trial.suggest_categorical(n, c) for n, c in PARAMS.items()}
        assert fits(cfg), f"invalid config proposed: {cfg}"
        seen.append(key(cfg))
        return cost(cfg)

    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, n_trials=60)
    assert len(seen) == len(set(seen)) == 60
    assert study.best_value == 1.0  # random search needs ~270 draws on average for it (540 valid, 1 optimum)
    assert study.best_params == {"BLOCK_M": 64, "BLOCK_N": 128, "stages": 3, "order": "swizzle", "flag": True}


def test_sampler_stops_optimize_when_every_candidate_was_measured():
    params = {"a": [1, 2, 3, 4], "b": ["x", "y"]}
    constraint = lambda c: not (c["a"] == 4 and c["b"] == "y")  # noqa: E731
    sampler = Sampler(Space(params, constraint=constraint), seed=1)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: sampler.suggest(t)["a"], n_trials=50)
    assert len(study.trials) == 7 and sampler.exhausted
    assert sorted((t.params["a"], t.params["b"]) for t in study.trials) == sorted(
        (a, b) for a in params["a"] for b in params["b"] if constraint({"a": a, "b": b}))


@pytest.mark.parametrize("how", ["raise", "inf", "prune"])
def test_failures_told_as_fail_or_pruned_are_not_proposed_again_and_count_as_bad(how):
    space = Space(PARAMS, constraint=fits)
    sampler = Sampler(space, seed=2)
    seen = []

    def objective(trial):
        cfg = sampler.suggest(trial)
        seen.append(key(cfg))
        if cfg["order"] == "row":
            if how == "raise":
                raise InvalidConfig("out of shared memory")
            if how == "prune":
                raise optuna.TrialPruned()
            return math.inf
        return cost(cfg)

    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, n_trials=60, catch=(InvalidConfig,))
    assert len(seen) == len(set(seen)) == 60
    states = {t.state for t in study.trials if t.params["order"] == "row"}
    assert states == {{"raise": optuna.trial.TrialState.FAIL, "prune": optuna.trial.TrialState.PRUNED,
                       "inf": optuna.trial.TrialState.COMPLETE}[how]}
    # A failed region is learned as bad: after the random start, few proposals go back to it.
    rows = sum(c[3] == "row" for c in seen[8:])
    assert rows < (len(seen) - 8) / 3, rows
    assert study.best_value == min(cost(dict(zip(PARAMS, c))) for c in seen if c[3] != "row")


def test_sampler_learns_from_trials_it_did_not_propose_and_skips_their_configs():
    space = Space(PARAMS, constraint=fits)
    sampler = Sampler(space, seed=0)
    study = optuna.create_study(sampler=sampler)
    valid = [dict(zip(PARAMS, v)) for v in itertools.product(*PARAMS.values()) if fits(dict(zip(PARAMS, v)))]
    earlier = valid[:40]
    for cfg in earlier:  # e.g. another worker's or an earlier session's measurements
        study.add_trial(optuna.trial.create_trial(params=cfg, distributions=sampler.optuna_space.distributions,
                                                  value=cost(cfg)))
    study.enqueue_trial(valid[100])  # Optuna's way to say "measure this one next"
    seen = []

    def objective(trial):
        seen.append(sampler.suggest(trial))
        return cost(seen[-1])

    study.optimize(objective, n_trials=30)
    assert seen[0] == valid[100]
    assert not {key(c) for c in earlier} & {key(c) for c in seen}
    assert len({key(c) for c in seen}) == len(seen)


def test_a_maximizing_study_is_searched_for_its_maximum():
    sampler = Sampler(Space(PARAMS, constraint=fits), seed=0)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    study.optimize(lambda t: -cost(sampler.suggest(t)), n_trials=60)
    assert study.best_value == -1.0


def test_parallel_trials_never_measure_a_configuration_twice():
    sampler = Sampler(Space(PARAMS, constraint=fits), seed=0)
    study = optuna.create_study(sampler=sampler)
    seen = []
    study.optimize(lambda t: seen.append(key(sampler.suggest(t))) or 1.0, n_trials=40, n_jobs=4)
    assert len(seen) == len(set(seen)) == 40


def test_one_sampler_serves_one_study():
    sampler = Sampler(Space({"a": [1, 2, 3]}))
    optuna.create_study(sampler=sampler).optimize(lambda t: sampler.suggest(t)["a"], n_trials=1)
    with pytest.raises(ValueError, match="one study"):
        optuna.create_study(sampler=sampler).optimize(lambda t: sampler.suggest(t)["a"], n_trials=1)


def test_choices_optuna_cannot_store_are_mapped_back():
    import numpy as np

    params = {"tile": [(1, 2), (2, 2), (4, 1)], "w": list(np.asarray([4, 8]))}
    result = tune(Space(params), lambda c: c["tile"][0] * int(c["w"]), max_trials=10, seed=0)
    assert result.best_config == {"tile": (1, 2), "w": 4} and len(result.trials) == 6


# ---- tune() through Optuna

@pytest.mark.parametrize("strategy", ["tpe", "random"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tune_through_optuna_gives_the_direct_loops_trace_on_a_replayed_space(strategy, seed):
    params, times = replay_space(seed)
    configs = [dict(zip(params, c)) for c in times]

    def objective(cfg):
        return times[tuple(cfg.values())]

    kwargs = dict(candidates=configs, max_trials=80, seed=seed, strategy=strategy)
    direct = _tune_direct(Space(params), objective, **kwargs)
    through = tune(Space(params), objective, **kwargs)
    assert through.trials == direct.trials and len(direct.trials) == 80
    assert (through.best_config, through.best_value, through.stop_reason) == (
        direct.best_config, direct.best_value, direct.stop_reason)


@pytest.mark.parametrize("options", [
    dict(initial=[{"BLOCK_M": 64, "BLOCK_N": 64, "stages": 2, "order": "row", "flag": True}], max_trials=40),
    dict(prior="related", max_trials=40),
    dict(patience=6, max_trials=100),
    dict(max_trials=1000),  # until exhausted
])
def test_tune_through_optuna_gives_the_direct_loops_trace_with_options(options):
    options = dict(options)
    if options.get("prior") == "related":
        options["prior"] = [(dict(zip(PARAMS, v)), cost(dict(zip(PARAMS, v))) * (1 + 0.1 * (v[3] == "col")))
                            for v in itertools.product(*PARAMS.values())][::5]
    space = Space({"BLOCK_M": [32, 64, 128], "BLOCK_N": [64, 128, 256], "stages": [1, 3],
                   "order": PARAMS["order"], "flag": PARAMS["flag"]}, constraint=fits) \
        if options["max_trials"] == 1000 else Space(PARAMS, constraint=fits)
    direct = _tune_direct(space, cost, seed=3, **options)
    through = tune(space, cost, seed=3, **options)
    assert through.trials == direct.trials
    assert through.stop_reason == direct.stop_reason


def test_tune_through_optuna_gives_the_direct_trace_on_a_sampled_space(monkeypatch):
    from torchtune_ops.search import pool

    monkeypatch.setattr(pool, "ENUMERATE_LIMIT", 500)
    params = {f"p{i}": [1, 2, 4, 8, 16] for i in range(5)}  # 3,125 combinations: sampled, grown
    objective = lambda c: 1 + sum(abs(math.log2(c[k] / 4)) for k in c)  # noqa: E731
    direct = _tune_direct(Space(params), objective, max_trials=60, seed=0)
    through = tune(Space(params), objective, max_trials=60, seed=0)
    assert through.trials == direct.trials and through.n_candidates == direct.n_candidates > 500 * 0.9


def test_storage_keeps_every_trial(tmp_path):
    url = f"sqlite:///{tmp_path}/tune.db"

    def objective(cfg):
        if cfg["order"] == "row":
            raise InvalidConfig("failed")
        return cost(cfg)

    result = tune(Space(PARAMS, constraint=fits), objective, max_trials=12, seed=0, storage=url,
                  study_name="gemm 127x257")
    study = optuna.load_study(study_name="gemm 127x257", storage=url)
    assert len(study.trials) == 12
    for t, (cfg, v) in zip(study.trials, result.trials):
        assert t.params == cfg
        assert (t.state == optuna.trial.TrialState.FAIL) == (v == math.inf)
        assert v == math.inf or t.value == v
    assert study.best_value == result.best_value
    with pytest.raises(ValueError, match="already has a study"):
        tune(Space(PARAMS, constraint=fits), objective, max_trials=1, storage=url, study_name="gemm 127x257")


def test_journal_storage_keeps_every_trial(tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    tune(Space(PARAMS, constraint=fits), cost, max_trials=9, seed=0, storage=storage, study_name="s")
    again = JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    assert len(optuna.load_study(study_name="s", storage=again).trials) == 9


def test_an_exception_from_the_objective_fails_the_trial_and_propagates():
    study = optuna.create_study()

    def objective(cfg):
        if len(study.trials) == 3:
            raise RuntimeError("boom")
        return cost(cfg)

    with pytest.raises(RuntimeError):
        tune(Space(PARAMS, constraint=fits), objective, max_trials=10, study=study)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    assert isinstance(study.sampler, optuna.samplers.TPESampler)  # the study's own sampler is restored


@pytest.mark.parametrize("strategy", ["optuna-tpe", "optuna-random", "optuna-nsga2"])
def test_optuna_samplers_as_strategies_measure_only_valid_new_configs(strategy):
    calls = []

    def objective(cfg):
        assert fits(cfg)
        calls.append(key(cfg))
        return cost(cfg)

    initial = [{"BLOCK_M": 16, "BLOCK_N": 16, "stages": 1, "order": "col", "flag": False}]
    study = optuna.create_study()
    result = tune(Space(PARAMS, constraint=fits), objective, max_trials=30, seed=0, strategy=strategy,
                  initial=initial, study=study)
    assert len(calls) == len(set(calls)) == len(result.trials) == 30
    assert calls[0] == key(initial[0])
    wasted = [t for t in study.trials if t.user_attrs.get("torchtune_ops") in ("invalid", "repeated")]
    assert len(study.trials) == 30 + len(wasted)
    assert all(not fits(t.params) for t in wasted if t.user_attrs["torchtune_ops"] == "invalid")


def test_an_optuna_sampler_object_and_unknown_names():
    result = tune(Space(PARAMS, constraint=fits), cost, max_trials=5,
                  strategy=optuna.samplers.RandomSampler(seed=0))
    assert len(result.trials) == 5
    with pytest.raises(ValueError):
        tune(Space(PARAMS), cost, strategy="optuna-annealing")


def test_a_model_is_a_prior_over_the_candidates():
    space = Space(PARAMS, constraint=fits)
    configs = [dict(zip(PARAMS, v)) for v in itertools.product(*PARAMS.values()) if fits(dict(zip(PARAMS, v)))]

    def model(cfgs):
        return [cost(c) * (1.2 if c["flag"] else 1.0) for c in cfgs]  # right trends, a wrong preference

    def run(**inputs):
        sampler = Sampler(space, seed=0, **inputs)
        study = optuna.create_study(sampler=sampler)
        study.optimize(lambda t: cost(sampler.suggest(t)), n_trials=15)
        return [t.params for t in study.trials], study.best_value

    with_model, best = run(model=model)
    assert with_model == run(prior=list(zip(configs, model(configs))))[0]
    assert with_model != run()[0]
    assert best <= 1.3  # the model's region first: within a step of the optimum after 15 trials
    given = [(configs[0], 1.0)]
    assert run(model=model, prior=given)[0] == run(prior=given)[0]  # a prior wins over the model


def test_sampler_docstring_example_runs():
    import doctest

    from torchtune_ops.search import sampler as sampler_module

    failed, attempted = doctest.testmod(sampler_module)
    assert attempted and not failed


def test_tpe_knobs_reach_the_sampler():
    a = Sampler(Space(PARAMS, constraint=fits), seed=0, strategy=TPEStrategy(n_startup=2))
    study = optuna.create_study(sampler=a)
    study.optimize(lambda t: cost(a.suggest(t)), n_trials=12)
    b = Sampler(Space(PARAMS, constraint=fits), seed=0)
    study_b = optuna.create_study(sampler=b)
    study_b.optimize(lambda t: cost(b.suggest(t)), n_trials=12)
    # the same first draw (nothing is covered yet), then a shorter start and so another search
    assert [t.params for t in study.trials][:1] == [t.params for t in study_b.trials][:1]
    assert [t.params for t in study.trials] != [t.params for t in study_b.trials]
