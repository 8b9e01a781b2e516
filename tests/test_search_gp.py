"""The Gaussian-process companion of the search (torchtune_ops.search.gp) and how TPEStrategy uses it."""
import itertools
import math

import numpy as np
import pytest

from torchtune_ops.search import Space, TPEStrategy, tune
from torchtune_ops.search import gp as gp_module
from torchtune_ops.search.gp import CandidateGP, feature_groups, features


def _grid(*sizes):
    return np.asarray(list(itertools.product(*(range(n) for n in sizes))), dtype=np.int64)


def test_features_put_ordinal_ranks_in_0_1_categoricals_one_apart_and_drop_constant_parameters():
    space = Space({"block": [16, 128, 32, 64], "order": ["row", "col", "tile"], "one": [7]})
    x = features(space, _grid(4, 3, 1))
    assert x.shape == (12, 1 + 3)
    # block's choices by rank: 16 -> 0, 32 -> 1/3, 64 -> 2/3, 128 -> 1, whatever the listed order.
    assert x[_grid(4, 3, 1)[:, 1] == 0][:, 0].tolist() == pytest.approx([0.0, 1.0, 1 / 3, 2 / 3])
    cat = x[:3, 1:]  # block 16 with order row, col, tile
    for a, b in itertools.combinations(range(3), 2):
        assert np.linalg.norm(cat[a] - cat[b]) == pytest.approx(1.0)


def _gp_told(space, cands, told, **kw):
    gp = CandidateGP(space, cands, **kw)
    for row, _ in told:
        gp.add(row)
    return gp, np.asarray([v for _, v in told], dtype=float)


def test_expected_improvement_points_at_the_minimum_of_a_smooth_function_between_measurements():
    space = Space({"x": list(range(30))})
    cands = _grid(30)
    told = [(i, (i - 12) ** 2 + 10.0) for i in (0, 5, 9, 16, 22, 29)]
    gp, values = _gp_told(space, cands, told)
    rows = np.setdiff1d(np.arange(30), [i for i, _ in told])
    best = rows[np.argmax(gp.expected_improvement(values, rows, np.random.default_rng(0)))]
    assert 9 < best < 16, best


@pytest.mark.parametrize("offset", [0.0, -20.0])
def test_an_objective_that_reaches_zero_or_below_is_modelled_without_the_log(offset):
    """tune() takes any objective, lower is better: a value of 0 or below must not turn the model's
    log-times into -inf or NaN."""
    space = Space({"x": list(range(30))})
    cands = _grid(30)
    told = [(i, (i - 12) ** 2 / 10 + offset) for i in (0, 5, 9, 12, 16, 22, 29)]
    gp, values = _gp_told(space, cands, told)
    rows = np.setdiff1d(np.arange(30), [i for i, _ in told])
    with np.errstate(all="raise"):
        gain = gp.expected_improvement(values, rows, np.random.default_rng(0))
    assert np.isfinite(gain).all()
    assert 9 < rows[np.argmax(gain)] < 16


def test_expected_improvement_follows_a_trend_beyond_the_measured_range():
    """Time falls as a grows (b does not matter): measured a = 0..4 only, the next one to try is a > 4."""
    space = Space({"a": list(range(10)), "b": list(range(10))})
    cands = _grid(10, 10)
    told = [(a * 10 + b, 10.0 - a) for a in range(5) for b in (0, 5, 9)]
    gp, values = _gp_told(space, cands, told)
    rows = np.setdiff1d(np.arange(100), [r for r, _ in told])
    best = cands[rows[np.argmax(gp.expected_improvement(values, rows, np.random.default_rng(0)))]]
    assert best[0] > 4, best


def test_uncertainty_is_one_far_from_measurements_and_small_at_them():
    space = Space({"x": list(range(30))})
    gp, _ = _gp_told(space, _grid(30), [(0, 1.0), (1, 2.0)])
    sd = gp.uncertainty(np.arange(30))
    assert sd[0] < 0.2 and sd[29] > 0.99 and np.all(np.diff(sd[1:]) >= -1e-9)  # grows with the distance
    assert CandidateGP(space, _grid(30)).uncertainty(np.arange(3)).tolist() == [1.0, 1.0, 1.0]


def test_expected_improvement_against_another_region_s_incumbent():
    """Below a region's own best (x >= 20, best 5.0) rather than the global best (1.0 at x = 0): candidates
    there that could beat 5.0 gain, though none could beat 1.0."""
    space = Space({"x": list(range(30))})
    told = [(0, 1.0), (1, 1.2), (20, 5.0), (25, 6.0), (29, 8.0)]
    gp, values = _gp_told(space, _grid(30), told)
    rows = np.arange(21, 25)
    rng = np.random.default_rng(0)
    region = np.asarray([False, False, True, True, True])
    assert (gp.expected_improvement(values, rows, rng, incumbent=region)
            > gp.expected_improvement(values, rows, rng) + 1e-6).all()


def test_failed_measurements_count_as_the_slowest_and_keep_the_model_finite():
    space = Space({"x": list(range(20))})
    cands = _grid(20)
    told = [(0, math.inf), (1, math.inf), (10, 2.0), (15, 1.0), (19, 3.0)]
    gp, values = _gp_told(space, cands, told)
    rows = np.setdiff1d(np.arange(20), [r for r, _ in told])
    gain = gp.expected_improvement(values, rows, np.random.default_rng(0))
    assert np.isfinite(gain).all() and (gain >= 0).all()
    assert cands[rows[np.argmax(gain)]][0] in range(12, 19)  # around the best, away from the failures


def test_candidates_added_later_are_scored_as_if_there_from_the_start():
    space = Space({"a": list(range(8)), "b": list(range(8))})
    cands = _grid(8, 8)
    told = [(3, 5.0), (20, 2.0), (41, 4.0), (60, 3.0)]
    whole, values = _gp_told(space, cands, told)
    grown, _ = _gp_told(space, cands[:40], [t for t in told if t[0] < 40][:2])
    grown.add_candidates(cands[40:])
    for row, _ in told[2:]:
        grown.add(row)
    rows = np.arange(64)
    rng = np.random.default_rng
    assert grown.expected_improvement(values, rows, rng(0)) == pytest.approx(
        whole.expected_improvement(values, rows, rng(0)), rel=1e-4)


def test_variance_is_computed_for_the_promising_half_and_a_sample_when_rows_are_many():
    space = Space({"a": list(range(40)), "b": list(range(40))})
    cands = _grid(40, 40)
    told = [(r, 1.0 + (r % 7)) for r in range(0, 1600, 97)]
    gp, values = _gp_told(space, cands, told)
    rows = np.arange(1600)
    gain = gp.expected_improvement(values, rows, np.random.default_rng(0), max_variance_rows=200)
    assert np.isfinite(gain).sum() == 200
    again = gp.expected_improvement(values, rows, np.random.default_rng(0), max_variance_rows=200)
    assert np.array_equal(gain, again)  # deterministic given the generator


def _run(strategy, seed=0):
    def cost(cfg):
        return 1.0 + abs(cfg["a"] - 13) + 0.5 * abs(cfg["b"] - 2) + (0.0 if cfg["c"] == "y" else 3.0)

    space = Space({"a": list(range(20)), "b": list(range(6)), "c": ["x", "y", "z"]})
    return tune(space, cost, max_trials=40, seed=seed, strategy=strategy)


@pytest.mark.parametrize("local_score", ["tpe", "gp"])
def test_every_second_global_model_proposal_is_the_gp_argmax(local_score):
    calls = []

    class Spy(CandidateGP):
        def expected_improvement(self, values, rows, rng, **kw):
            gain = super().expected_improvement(values, rows, rng, **kw)
            calls.append(int(rows[np.argmax(gain)]))
            return gain

    import torchtune_ops.search.strategies as strategies
    original = strategies.CandidateGP
    strategies.CandidateGP = Spy
    try:
        strat = TPEStrategy(gp_every=2, local_score=local_score)
        result = _run(strat)
    finally:
        strategies.CandidateGP = original
    measured = [strat.rows.candidates[c] for c in strat.cands]
    assert calls, "the GP was never asked"
    # Every GP answer was measured next. Of the model's proposals, every third is a local step and half of
    # the others are GP steps: a third from the GP with local steps by l/g, two thirds with local steps by
    # the GP's expected improvement.
    assert all(any((strat.rows.candidates[c] == m).all() for m in measured) for c in calls)
    model = len(result.trials) - strat.n_startup
    if local_score == "tpe":
        assert model / 4 <= len(calls) <= model / 2
    else:
        assert model / 2 <= len(calls) <= model * 3 / 4


def test_gp_every_0_with_local_steps_by_l_over_g_is_plain_tpe_and_builds_no_model():
    strat = TPEStrategy(gp_every=0, local_score="tpe")
    result = _run(strat)
    assert strat.gp is None
    assert result.best_value == 1.0
    # gp_every=0 alone turns off the GP's global steps only: the local steps still use it
    strat = TPEStrategy(gp_every=0)
    _run(strat)
    assert strat.gp is not None and strat.n_global == 0


# ---- length scales fitted by marginal likelihood (fit="iso" / "ard") ----

def test_feature_groups_name_the_parameter_of_each_feature_column():
    space = Space({"block": [16, 32, 64], "one": [7], "order": ["row", "col", "tile"], "warps": [2, 4]})
    groups = feature_groups(space)
    assert len(groups) == features(space, _grid(3, 1, 3, 2)).shape[1]
    # block (ordinal, 1 column), one (dropped), order (categorical, 3 columns), warps (two values: categorical)
    assert groups.tolist() == [0, 1, 1, 1, 2, 2]


def _matern(r):
    return (1 + math.sqrt(5) * r + 5 / 3 * r * r) * np.exp(-math.sqrt(5) * r)


@pytest.mark.parametrize("fit", ["iso", "ard"])
def test_refitted_kernel_cache_equals_the_kernel_at_the_fitted_scales(fit):
    space = Space({"a": list(range(7)), "b": ["x", "y", "z"], "c": list(range(5))})
    cands = _grid(7, 3, 5)
    rng = np.random.default_rng(1)
    rows = rng.choice(len(cands), 17, replace=False)
    told = [(int(r), 1.0 + cands[r][0] + 0.1 * cands[r][2] ** 2) for r in rows]
    gp, values = _gp_told(space, cands, told, fit=fit)
    gp.expected_improvement(values, np.arange(len(cands)), rng)  # fits
    x = features(space, cands) / gp.scales[feature_groups(space)]
    want = _matern(np.linalg.norm(x[:, None, :] - x[None, rows, :], axis=2))
    assert gp._k[:, :len(rows)] == pytest.approx(want, abs=1e-5)
    if fit == "iso":
        assert len(set(gp.scales.tolist())) == 1
    gp.add_candidates(cands[:4])  # new candidates get kernel values at the fitted scales too
    assert gp._k[len(cands):, :len(rows)] == pytest.approx(want[:4], abs=1e-5)


def test_ard_gives_a_parameter_that_does_not_change_the_time_a_longer_length_scale():
    """Time depends on a only (a rough, non-monotone function of it); b is irrelevant."""
    space = Space({"a": list(range(12)), "b": list(range(12))})
    cands = _grid(12, 12)
    rows = np.random.default_rng(0).choice(len(cands), 40, replace=False)
    told = [(int(r), 2.0 + math.sin(2.0 * cands[r][0])) for r in rows]
    gp, values = _gp_told(space, cands, told, fit="ard")
    gp.fit_scales(values)
    assert gp.scales[1] > 2 * gp.scales[0], gp.scales
    # ... which is also what the marginal likelihood prefers to a single scale for both
    y = np.log(values)
    y = (y - y.mean()) / y.std()
    assert gp.log_evidence(y, gp.scales) > gp.log_evidence(y, np.full(2, gp.scales[0]))


@pytest.mark.parametrize("rough", [False, True])
def test_iso_fit_takes_a_short_length_scale_for_a_rough_function_and_a_long_one_for_a_smooth_one(rough):
    space = Space({"x": list(range(40))})
    cands = _grid(40)
    f = (lambda i: 2.0 + (i % 2)) if rough else (lambda i: 1.0 + i / 10.0)
    told = [(i, f(i)) for i in range(0, 40, 3)]
    gp, values = _gp_told(space, cands, told, fit="iso")
    gp.fit_scales(values)
    if rough:
        assert gp.scales[0] < 0.35
    else:
        assert gp.scales[0] > 0.35


def test_fixed_fit_keeps_the_length_scale_and_unknown_fits_are_refused():
    space = Space({"x": list(range(10))})
    gp, values = _gp_told(space, _grid(10), [(0, 1.0), (4, 3.0), (9, 2.0), (6, 1.5)])
    gp.expected_improvement(values, np.arange(10), np.random.default_rng(0))
    assert gp.scales.tolist() == [0.35]
    assert gp._k[:, 0] == pytest.approx(_matern(np.arange(10) / 9 / 0.35), abs=1e-6)
    with pytest.raises(ValueError, match="fit"):
        CandidateGP(space, _grid(10), fit="mle")


def test_feasibility_mode_regresses_on_successes_and_discounts_candidates_next_to_failures():
    """Time falls as x grows, but x >= 25 fails. "slowest" counts the failures as slow; "feasibility" leaves
    them out of the regression and only lowers the chance that their neighbours run."""
    space = Space({"x": list(range(30))})
    told = [(i, 30.0 - i) for i in (0, 6, 12, 18)] + [(27, math.inf), (29, math.inf)]
    rows = np.asarray([20, 24, 26])
    gains = {}
    for mode in ("slowest", "feasibility"):
        gp, values = _gp_told(space, _grid(30), told, failures=mode)
        gains[mode] = gp.expected_improvement(values, rows, np.random.default_rng(0))
    assert gains["feasibility"][2] < gains["feasibility"][0]  # 26 sits between the two failures
    assert gains["feasibility"][0] > gains["slowest"][0]  # 20 is not dragged towards the failures' "slowness"
    with pytest.raises(ValueError, match="failures"):
        CandidateGP(space, _grid(30), failures="ignore")


def test_posterior_interpolates_its_measurements_and_gives_the_expected_improvement():
    """posterior(): near the measured values (standardised) at the measurements, certain there and uncertain far
    away; improvement() of its mean and sd is expected_improvement(); use= regresses on a subset only."""
    space = Space({"x": list(range(30))})
    cands = _grid(30)
    told = [(i, (i - 12) ** 2 + 10.0) for i in (0, 5, 9, 16, 22, 29)]
    gp, values = _gp_told(space, cands, told)
    rows = np.arange(30)
    mean, sd, y = gp.posterior(values, rows)
    measured = [i for i, _ in told]
    assert mean[measured] == pytest.approx(y, abs=0.1) and (sd[measured] < 0.15).all()  # noise 1e-2
    assert sd[12] > sd[9] and sd[2] > sd[0]
    assert gp_module.improvement(y.min() - mean, sd) == pytest.approx(
        gp.expected_improvement(values, rows, np.random.default_rng(0)))
    near, sd_near, y_near = gp.posterior(values, rows, use=[2, 3])  # only x = 9 and x = 16
    alone, _ = _gp_told(space, cands, told[2:4])
    assert (near, sd_near, y_near) == tuple(pytest.approx(a) for a in alone.posterior(values[2:4], rows))
