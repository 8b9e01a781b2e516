"""The space-filling start of TPEStrategy (``design``): coverage of every parameter's values, extremes
included, within the valid candidates only; deterministic per seed."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from torchtune_ops.search import Space, TPEStrategy, tune
from torchtune_ops.search.strategies import covering_pick, design_strata

# A long ordinal axis (19 values, not a multiple of the 8 strata), a short one, a categorical, a boolean.
PARAMS = {"tile": list(range(1, 20)), "block": [32, 64, 128], "method": ["a", "b", "c", "d"],
          "flag": [False, True]}


def _start(params, constraint=None, *, seed, n=8, design="cover"):
    """The first ``n`` configurations tune() measures (a constant objective: only the design acts)."""
    result = tune(Space(params, constraint=constraint), lambda c: 1.0, max_trials=n, seed=seed,
                  strategy=TPEStrategy(n_startup=n, design=design))
    return [t.config for t in result.trials]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_start_covers_every_value_of_short_axes_and_both_ends_of_long_ones(seed):
    configs = _start(PARAMS, seed=seed)
    assert len({tuple(c.values()) for c in configs}) == 8
    for name in ("block", "method", "flag"):
        assert {c[name] for c in configs} == set(PARAMS[name]), name
    tiles = sorted(c["tile"] for c in configs)
    assert tiles[0] == 1 and tiles[-1] == 19
    # one value per stratum: the 17 interior values fall into 6 strata of 2-3 consecutive values
    assert len(set(tiles)) == 8 and max(np.diff(tiles)) <= 5


def test_random_starts_miss_values_the_design_covers():
    # the same check fails for uniform random starts on most seeds: the test can tell the two apart
    misses = sum(min(c["tile"] for c in cfgs) != 1 or max(c["tile"] for c in cfgs) != 19
                 or {c["method"] for c in cfgs} != set(PARAMS["method"])
                 for cfgs in (_start(PARAMS, seed=s, design="random") for s in range(10)))
    assert misses >= 7


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_the_start_stays_within_the_constraint_and_covers_what_it_allows(seed):
    # the largest tile and method "d" never with flag True
    def allowed(c):
        return not ((c["tile"] == 19 or c["method"] == "d") and c["flag"])

    configs = _start(PARAMS, allowed, seed=seed)
    assert all(allowed(c) for c in configs)
    assert max(c["tile"] for c in configs) == 19
    assert {c["method"] for c in configs} == set(PARAMS["method"])


@pytest.mark.parametrize("seed", [0, 5])
def test_the_start_is_deterministic_per_seed(seed):
    assert _start(PARAMS, seed=seed) == _start(PARAMS, seed=seed)
    assert _start(PARAMS, seed=seed) != _start(PARAMS, seed=seed + 1)


def test_initial_configs_count_toward_the_coverage():
    first = {"tile": 19, "block": 128, "method": "d", "flag": True}
    result = tune(Space(PARAMS), lambda c: 1.0, max_trials=4, seed=0, initial=[first],
                  strategy=TPEStrategy(n_startup=4))
    configs = [t.config for t in result.trials]
    assert configs[0] == first
    rest = configs[1:]  # three more cover the other three methods and the other tile end
    assert {c["method"] for c in rest} == {"a", "b", "c"}
    assert 1 in {c["tile"] for c in rest} and 19 not in {c["tile"] for c in rest}


@pytest.mark.parametrize("n, size, extremes, expected", [
    (8, 19, True, None), (8, 19, False, None), (8, 5, True, [0, 1, 2, 3, 4]), (1, 7, True, [0] * 7),
    (8, 8, True, list(range(8))), (2, 9, True, [0] * 5 + [1] * 4), (3, 10, True, [0] + [1] * 8 + [2])])
def test_strata_are_consecutive_ranks_of_equal_size(n, size, extremes, expected):
    space = Space({"x": list(range(size, 0, -1)), "c": ["u", "v", "w"]})  # values in descending order
    strata = design_strata(space, n, extremes=extremes)
    by_rank = strata[0][np.argsort(space.positions[0])]  # stratum of each value in ascending order
    assert list(strata[1]) == [0, 1, 2]  # categorical: one stratum per value
    assert np.all(np.diff(by_rank) >= 0) and by_rank[0] == 0 and by_rank[-1] == min(n, size) - 1
    if expected is not None:
        assert list(by_rank) == expected
    else:
        sizes = np.bincount(by_rank)
        assert len(sizes) == 8
        if extremes:
            assert sizes[0] == sizes[-1] == 1 and sizes[1:-1].max() - sizes[1:-1].min() <= 1
        else:
            assert sizes.max() - sizes.min() <= 1


def test_covering_pick_prefers_uncovered_strata_and_ignores_values_no_candidate_has():
    space = Space({"a": [1, 2, 3], "b": [1, 2, 3]})
    cands = np.asarray(list(itertools.product(range(3), repeat=2)), dtype=np.int64)
    strata = design_strata(space, 3)
    rng = np.random.default_rng(0)
    available = np.ones(len(cands), dtype=bool)
    available[[0, 8]] = False  # (1, 1) and (3, 3) measured: only a=2 and b=2 are uncovered
    assert {covering_pick(cands, strata, available, rng) for _ in range(10)} == {4}
    # no candidate has a=3: with a=1 and a=2 covered, every candidate ties on a, and b=3 decides
    cands = cands[cands[:, 0] < 2]
    available = np.ones(len(cands), dtype=bool)
    available[[0, 4]] = False  # (1, 1) and (2, 2)
    picks = {tuple(cands[covering_pick(cands, strata, available, rng)]) for _ in range(20)}
    assert picks == {(0, 2), (1, 2)}


def test_unknown_design_is_an_error():
    with pytest.raises(ValueError):
        TPEStrategy(design="sobol")
