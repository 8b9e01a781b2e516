"""The performance model (perfmodel.py): trees, features, training and ranking, persistence, and its three
uses: warm start and pruning in the tuner, zero-shot predictions in the run-time dispatch (verified against
PyTorch at first use), with misleading histories that must never make the final choice worse than aten."""
from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch

import torchtune_ops.runtime.ops  # noqa: F401  (registers the ops)
from torchtune_ops.runtime import dispatch, launch
from torchtune_ops.tuning import perfmodel
from torchtune_ops import settings
from torchtune_ops.kernels.base import Config, DeviceLimits, KernelFamily
from torchtune_ops.storage.store import Entry, Store, default_store, problem_key
from torchtune_ops.tuning.timing import FakeTimer
from torchtune_ops.tuning.tuner import tune_problem

FP = "fake-gpu|cc9.0|sm8|test"
LIMITS = DeviceLimits("fake", 1 << 20, 8, (0, 0), True)
ops = torch.ops.torchtune_ops


@pytest.fixture(autouse=True)
def _fresh():
    perfmodel.forget()
    dispatch.reset()
    dispatch.set_tune_options(timer=None)
    yield
    perfmodel.forget()
    dispatch.reset()
    dispatch.set_tune_options(timer=None)


# ------------------------------------------------------------------------------------------ a toy family

@dataclasses.dataclass(frozen=True)
class ToyProblem:
    n: int
    dtype: str = "float32"


class ToyFamily(KernelFamily):
    """y = 2x - 1, "tiled" by BLOCK; the best BLOCK grows with n (so a model must use the problem)."""

    name = "toy"
    problem_type = ToyProblem

    def __init__(self, *, wrong=lambda c: False):
        self.wrong = wrong

    def space(self, problem):
        return {"BLOCK": (1, 2, 4, 8, 16, 32, 64, 128), "MODE": ("row", "col"), "UNROLL": (1, 2, 4),
                "W": (1, 2, 4, 8)}

    def check(self, config, problem, limits):
        return "too big" if config["BLOCK"] * config["UNROLL"] > 256 else None

    def known_configs(self, problem, limits):
        return [Config.of(BLOCK=1, MODE="col", UNROLL=1, W=1)]

    def make_inputs(self, problem, device, *, seed=0):
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(problem.n, generator=gen).to(device),)

    def reference(self, problem, inputs):
        return inputs[0] * 2 - 1

    def launch(self, config, problem, inputs, out=None):
        cfg = dict(config.as_dict() if isinstance(config, Config) else config)
        y = inputs[0] * 2 - 1
        return y + 1.0 if self.wrong(cfg) else y


def toy_time(n: int, cfg: dict) -> float:
    """A smooth, learnable time: the best BLOCK is about n/64, UNROLL 2, W 4, MODE row."""
    best = max(1.0, n / 64)
    return (1.0 + 0.4 * abs(math.log2(cfg["BLOCK"]) - math.log2(best)) + 0.3 * abs(math.log2(cfg["UNROLL"]) - 1)
            + 0.2 * abs(math.log2(cfg["W"]) - 2) + 0.25 * (cfg["MODE"] == "col")) * n / 1000


TOY = ToyFamily()


def toy_configs(n: int) -> list[dict]:
    return [c.as_dict() for c in TOY.valid_configs(ToyProblem(n), LIMITS)]


def toy_timer(n: int, *, aten: float | None = None) -> FakeTimer:
    times = {Config.from_dict(c).to_json(): toy_time(n, c) for c in toy_configs(n)}
    best = min(times.values())
    return FakeTimer(dict(times, aten=aten if aten is not None else 2.0 * best))


def seed_history(store: Store, sizes, *, fp: str = FP, value=toy_time, aten_factor: float = 2.0,
                 per_problem: int | None = None, seed: int = 0) -> None:
    """Store an entry and a trial history per toy problem (every valid config, or a random sample)."""
    rng = np.random.default_rng(seed)
    for n in sizes:
        cfgs = toy_configs(n)
        if per_problem is not None:
            cfgs = [cfgs[i] for i in rng.choice(len(cfgs), per_problem, replace=False)]
        trials = [(c, value(n, c)) for c in cfgs]
        best_c, best_t = min(trials, key=lambda t: t[1])
        pkey = problem_key(TOY.problem_to_dict(ToyProblem(n)))
        store.put(Entry(fp, "toy", pkey, Config.from_dict(best_c).to_json(), best_t, aten_factor * best_t,
                        trials=len(trials)), trials)


def rows_for(sizes, value=toy_time):
    return [({"n": n, "dtype": "float32"}, c, value(n, c), 2.0) for n in sizes for c in toy_configs(n)]


# ----------------------------------------------------------------------------------------- the model

def test_trees_learn_a_nonlinear_function_and_round_trip():
    rng = np.random.default_rng(0)
    X = rng.random((2000, 4))
    y = np.sin(5 * X[:, 0]) + 2 * X[:, 1] * X[:, 2]
    trees = perfmodel._Trees.fit(X[:1500], y[:1500], n_trees=80, depth=4)
    p = trees.predict(X[1500:])
    assert perfmodel.spearman(p, y[1500:]) > 0.9
    again = perfmodel._Trees.from_dict(json.loads(json.dumps(trees.to_dict())))
    np.testing.assert_allclose(again.predict(X[1500:]), p)


def test_spearman_handles_ties_and_constants():
    assert perfmodel.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert perfmodel.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert perfmodel.spearman([1, 1, 2, 2], [1, 1, 2, 2]) == pytest.approx(1.0)
    assert math.isnan(perfmodel.spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(perfmodel.spearman([1], [1]))


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (7, 13, 1), (1000, 999, 1001), (16, 4096, 4096), (33, 17, 4000)])
def test_gemm_features_are_finite_and_derived_right(M, N, K):
    p = {"op": "mm", "batch": 1, "M": M, "N": N, "K": K, "dtype": "float16", "a_layout": "col",
         "b_layout": "row", "precision": "ieee"}
    cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 4, "num_stages": 3,
           "SPLIT_K": 2, "TMA": 0}
    X, names = perfmodel.featurize("gemm", p, [cfg], sms=132)
    f = dict(zip(names, X[0]))
    assert np.isfinite(X).all() and X.shape == (1, len(names))
    tiles = math.ceil(M / 64) * math.ceil(N / 32) * 2
    assert f["logtiles"] == pytest.approx(math.log2(tiles))
    assert f["pad_m"] == pytest.approx(math.ceil(M / 64) * 64 / M)
    assert f["pad_k"] == pytest.approx(math.ceil(K / 32) * 32 / K)
    assert f["logsmem"] == pytest.approx(math.log2(3 * (64 * 16 + 16 * 32) * 2))
    assert f["a_layout"] == 1 and f["es"] == 2


def test_conv_features_use_the_gemm_view():
    p = {"N": 2, "C": 6, "H": 9, "W": 7, "K": 4, "R": 3, "S": 3, "stride": [2, 1], "padding": [1, 1, 0, 0],
         "dilation": [1, 1], "groups": 2, "dtype": "float32", "layout": "nhwc", "bias": True,
         "activation": "relu", "precision": "ieee"}
    cfg = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 2, "num_stages": 2,
           "SPLIT_K": 1}
    X, names = perfmodel.featurize("conv2d", p, [cfg])
    f = dict(zip(names, X[0]))
    P, Q = (9 + 2 - 3) // 2 + 1, (7 - 3) + 1
    assert f["logM"] == pytest.approx(math.log2(2 * P * Q)) and f["logN"] == pytest.approx(1.0)
    assert f["logK"] == pytest.approx(math.log2(3 * 9)) and f["a_layout"] == 1 and f["es"] == 4


def test_generic_features_need_no_problem_fields():
    X, names = perfmodel.featurize("kt:conv", {"gpu": "A100"}, [{"a": 1, "b": "x"}, {"a": 4, "b": "y"}])
    assert names == ["cfg.a", "cfg.b"] and X.shape == (2, 2) and X[0, 1] != X[1, 1]
    # numeric problem fields add their log2 and its ratio to each numeric parameter, zeros included
    for cfgs in ([{"a": 0, "b": "x"}], [{"a": 8, "b": "y"}, {"a": 2, "b": "x"}]):
        X, names = perfmodel.featurize("toy", {"n": 64, "tag": "z"}, cfgs)
        assert names == ["cfg.a", "cfg.b", "prob.n", "prob.n/cfg.a"] and np.isfinite(X).all()
    assert X[0, 3] == pytest.approx(3.0)


def test_training_ranks_a_held_out_problem():
    model = perfmodel.PerfModel.fit(rows_for([64, 256, 1024, 4096, 16384]), family="toy", sms=8)
    held = 2048
    cfgs = toy_configs(held)
    pred = model.predict({"n": held, "dtype": "float32"}, cfgs)
    truth = [toy_time(held, c) for c in cfgs]
    assert perfmodel.spearman(pred, truth) > 0.8
    assert min(truth) / truth[int(np.argmin(pred))] > 0.9
    assert model.confident() and model.quality["fraction"] >= 0.9
    va = model.predict_vs_aten({"n": held, "dtype": "float32"}, cfgs)
    assert va is not None and math.exp(va.min()) < 0.7  # learned: the best is about twice as fast as aten


def test_too_little_history_gives_no_model():
    assert perfmodel.PerfModel.fit([], family="toy") is None
    assert perfmodel.PerfModel.fit(rows_for([64])[:50], family="toy") is None  # one problem
    one_each = [({"n": n}, {"BLOCK": 1, "MODE": "row", "UNROLL": 1, "W": 1}, 1.0, 2.0) for n in (1, 2, 3)]
    assert perfmodel.PerfModel.fit(one_each, family="toy") is None


def test_failures_are_learned_as_slow():
    def value(n, c):
        return math.inf if c["W"] == 8 else toy_time(n, c)

    model = perfmodel.PerfModel.fit(rows_for([64, 512, 4096], value), family="toy", cv=False)
    cfgs = toy_configs(1024)
    pred = model.predict({"n": 1024, "dtype": "float32"}, cfgs)
    failing = np.asarray([c["W"] == 8 for c in cfgs])
    assert pred[failing].min() > np.median(pred[~failing])


# ------------------------------------------------------------------------------------------ persistence

def test_save_load_round_trip_and_model_for_reuses_the_file(tmp_path):
    store = default_store()
    seed_history(store, [64, 1024, 16384])
    model = perfmodel.model_for(store, FP, "toy")
    path = perfmodel.model_path(store, FP, "toy")
    assert model is not None and path.exists() and path.parent == store.path.parent
    assert json.loads(path.read_text())["schema"] == perfmodel.SCHEMA  # data only: JSON
    cfgs = toy_configs(300)
    p = {"n": 300, "dtype": "float32"}
    loaded = perfmodel.PerfModel.load(path)
    np.testing.assert_allclose(loaded.predict(p, cfgs), model.predict(p, cfgs))
    assert loaded.quality == model.quality and loaded.n_trials == model.n_trials
    perfmodel.forget()
    mtime = path.stat().st_mtime_ns
    again = perfmodel.model_for(store, FP, "toy")
    assert path.stat().st_mtime_ns == mtime  # read, not retrained
    np.testing.assert_allclose(again.predict(p, cfgs), model.predict(p, cfgs))
    seed_history(store, [4096])  # more history: the model is retrained and saved again
    perfmodel.forget()
    newer = perfmodel.model_for(store, FP, "toy")
    assert newer.n_trials > model.n_trials and perfmodel.PerfModel.load(path).n_trials == newer.n_trials


@pytest.mark.parametrize("garbage", [b"", b"{not json", b'{"schema": 1}', b'{"schema": 99}', b"\x00\xff" * 10,
                                     b'{"schema":1,"family":"toy","sms":8,"params":null,"names":["a"],'
                                     b'"rank":{"feat":[[5,-1,-1]],"thr":[[0,0,0]],"val":[[0,0,0]],"base":0,'
                                     b'"depth":1},"vs_aten":null,"quality":{},"n_trials":1,"n_problems":1}'])
def test_a_corrupt_model_file_is_ignored_with_one_warning(garbage):
    store = default_store()
    seed_history(store, [64, 1024, 16384])
    path = perfmodel.model_path(store, FP, "toy")
    path.write_bytes(garbage)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = perfmodel.model_for(store, FP, "toy")
        perfmodel._models.clear()  # a second process-level lookup: no second warning
        path.write_bytes(garbage)
        perfmodel.model_for(store, FP, "toy")
    ours = [w for w in caught if issubclass(w.category, perfmodel.PerfModelWarning)]
    assert len(ours) == 1 and model is not None
    assert perfmodel.PerfModel.load(path).n_trials == model.n_trials  # replaced by a good one


def test_readonly_store_trains_in_memory_and_writes_nothing(tmp_path):
    path = tmp_path / "db" / "tuning.sqlite"
    rw = Store.open(path, readonly=False)
    seed_history(rw, [64, 1024, 16384])
    rw.close()
    ro = Store.open(path, readonly=True)
    model = perfmodel.model_for(ro, FP, "toy")
    assert model is not None and not perfmodel.model_path(ro, FP, "toy").exists()


# --------------------------------------------------------------------------------- warm start, pruning

def test_search_hints_warm_start_and_pruning():
    model = perfmodel.PerfModel.fit(rows_for([64, 1024, 16384]), family="toy", sms=8)
    p = {"n": 2048, "dtype": "float32"}
    cfgs = toy_configs(2048)
    neighbour = {"BLOCK": 128, "MODE": "col", "UNROLL": 1, "W": 1}
    h = perfmodel.search_hints(model, p, cfgs, neighbours=[neighbour, {"BLOCK": 3}], known=TOY_KNOWN,
                               top=3, keep_fraction=0.25, floor=20)
    pred = model.predict(p, cfgs)
    top = [cfgs[i] for i in np.argsort(pred, kind="stable")[:3]]
    assert h.initial[:3] == top and neighbour in h.initial and {"BLOCK": 3} not in h.initial
    assert TOY_KNOWN[0] in h.initial
    assert len(h.candidates) == max(20, math.ceil(0.25 * len(cfgs))) + sum(
        1 for c in h.initial if c not in [cfgs[i] for i in np.argsort(pred, kind="stable")[:len(h.candidates)]])
    assert all(c in h.candidates for c in h.initial) and h.pruned == len(cfgs) - len(h.candidates)
    best = min(cfgs, key=lambda c: toy_time(2048, c))
    assert best in h.candidates  # the pruned ones are predicted slow, and are
    assert len(h.prior) == len(cfgs) and h.prior[0][0] == top[0]
    # never below the floor; no pruning when told not to or without a model
    assert len(perfmodel.search_hints(model, p, cfgs, keep_fraction=0.0, floor=50).candidates) >= 50
    assert perfmodel.search_hints(model, p, cfgs, prune=False).pruned == 0
    no_model = perfmodel.search_hints(None, p, cfgs, neighbours=[neighbour], known=TOY_KNOWN)
    assert no_model.pruned == 0 and no_model.initial == [neighbour] + TOY_KNOWN and no_model.prior == []


TOY_KNOWN = [{"BLOCK": 1, "MODE": "col", "UNROLL": 1, "W": 1}]


def test_related_hints_speed_up_the_generic_search():
    """Two "other GPUs" (distorted copies of the same timings) warm-start search.tune on a third."""
    from torchtune_ops.search import Space, tune

    n = 2048
    cfgs = toy_configs(n)
    rng = np.random.default_rng(3)
    sources = [[(c, toy_time(n, c) * s * float(np.exp(rng.normal(0, 0.05)))) for c in cfgs] for s in (0.5, 3.0)]
    h = perfmodel.related_hints(sources, cfgs, floor=40)
    assert 0 < h.pruned < len(cfgs) and all(c in h.candidates for c in h.initial)
    best = min(toy_time(n, c) for c in cfgs)

    def reach(**kw):
        res = tune(Space(TOY.space(ToyProblem(n))), lambda c: toy_time(n, c), max_trials=80, seed=0, **kw)
        return next(i + 1 for i, (_, v) in enumerate(res.trials) if v <= 1.05 * best)

    assert reach(initial=h.initial, prior=h.prior, candidates=h.candidates) * 3 <= reach(candidates=cfgs)
    assert perfmodel.related_hints([], cfgs).prior == []  # no sources: no model, nothing pruned


def test_doctests():
    import doctest

    assert doctest.testmod(perfmodel).failed == 0


def test_nearest_winners_are_the_closest_problems_winners():
    store = default_store()
    seed_history(store, [16, 1024, 65536])
    got = perfmodel.nearest_winners(store, FP, "toy", {"n": 900, "dtype": "float32"}, k=2)
    win = {n: min(toy_configs(n), key=lambda c: toy_time(n, c)) for n in (16, 1024, 65536)}
    assert got == [win[1024], win[16]]


def _trials_to_best(calls: list[str], n: int) -> int:
    """Measurements (in the timer's order, aten left out) until one within 5% of the toy optimum."""
    best = min(toy_time(n, c) for c in toy_configs(n))
    values = [toy_time(n, json.loads(k)) for k in calls if k != "aten"]
    return next(i + 1 for i, v in enumerate(values) if v <= best * 1.05)


@pytest.mark.parametrize("n", [3000, 97])
def test_tuner_warm_start_needs_fewer_measurements(n):
    store = default_store()
    seed_history(store, [16, 64, 256, 1024, 4096, 16384], per_problem=40)
    problem = ToyProblem(n)
    pkey = problem_key(TOY.problem_to_dict(problem))
    runs = {}
    for use in (False, True):
        perfmodel.forget()
        timer = toy_timer(n)
        entry = tune_problem(TOY, problem, device="cpu", store=store, timer=timer, fingerprint=FP, max_trials=60,
                             patience=0, model=use, force=True)
        assert entry.winner != "aten" and store.get(FP, "toy", pkey) == entry
        runs[use] = timer.calls
    with_model = _trials_to_best(runs[True], n)
    without = _trials_to_best(runs[False], n)
    assert with_model <= 3 and with_model * 2 <= without
    # the first measurement after aten is the model's best prediction
    model = perfmodel.model_for(store, FP, "toy")
    cfgs = toy_configs(n)
    top = cfgs[int(np.argmin(model.predict(TOY.problem_to_dict(problem), cfgs)))]
    assert runs[True][1] == Config.from_dict(top).to_json()


def test_tuner_prunes_configs_predicted_slow():
    store = default_store()
    seed_history(store, [16, 64, 256, 1024, 4096, 16384])
    n = 2000
    timer = toy_timer(n)
    tune_problem(TOY, ToyProblem(n), device="cpu", store=store, timer=timer, fingerprint=FP, max_trials=500,
                 patience=0)
    model = perfmodel.model_for(store, FP, "toy")
    cfgs = toy_configs(n)
    measured = {k for k in timer.calls if k != "aten"}
    # every valid config was available, yet the search ran out of candidates: the rest were pruned
    assert len(measured) < len(cfgs)
    pred = model.predict({"n": n, "dtype": "float32"}, cfgs)
    order = [Config.from_dict(cfgs[i]).to_json() for i in np.argsort(pred, kind="stable")]
    worst = set(order[-len(cfgs) // 4:])
    known = {c.to_json() for c in TOY.known_configs(None, LIMITS)}  # measured first whatever the model says
    assert measured & worst <= known


def test_tuner_without_history_or_with_model_off_is_unchanged():
    store = default_store()
    n = 500
    a = toy_timer(n)
    tune_problem(TOY, ToyProblem(n), device="cpu", store=store, timer=a, fingerprint=FP, max_trials=10)
    seed_history(store, [16, 1024, 16384])
    b = toy_timer(n)
    with settings.override(perfmodel=False):
        tune_problem(TOY, ToyProblem(n), device="cpu", store=store, timer=b, fingerprint=FP, max_trials=10,
                     force=True)
    assert a.calls == b.calls and not perfmodel.model_path(store, FP, "toy").exists()


def test_a_misleading_history_never_makes_the_final_choice_worse_than_aten():
    """The history says BLOCK=1 configurations are by far the fastest; on the new problem they give wrong
    results, and everything Triton is slower than aten: the tuner's gate and aten race keep aten."""
    store = default_store()

    def lie(n, c):
        return 0.01 if c["BLOCK"] == 1 else 10.0

    seed_history(store, [16, 64, 256, 1024, 4096], value=lie, aten_factor=100.0)
    n = 1500
    fam = ToyFamily(wrong=lambda c: c["BLOCK"] == 1)
    times = {Config.from_dict(c).to_json(): (0.1 if c["BLOCK"] == 1 else 3.0) for c in toy_configs(n)}
    timer = FakeTimer(dict(times, aten=1.0))
    entry = tune_problem(fam, ToyProblem(n), device="cpu", store=store, timer=timer, fingerprint=FP,
                         max_trials=20, patience=0)
    first = [k for k in timer.calls if k != "aten"][:3]
    assert all(json.loads(k)["BLOCK"] == 1 for k in first)  # the model was followed...
    assert entry.winner == "aten" and entry.time_ms <= entry.aten_ms  # ...and did not win


# ------------------------------------------------------------------------------------------ zero-shot

def test_zero_shot_needs_confidence_and_a_margin():
    good = perfmodel.PerfModel.fit(rows_for([64, 1024, 4096, 16384]), family="toy")
    p, cfgs = {"n": 2048, "dtype": "float32"}, toy_configs(2048)
    pred = perfmodel.zero_shot(good, p, cfgs)
    assert pred is not None and pred.vs_aten < 1 - perfmodel.MIN_MARGIN
    assert toy_time(2048, pred.config) <= 1.1 * min(toy_time(2048, c) for c in cfgs)
    # aten about as fast as the best: no margin, no prediction
    close = perfmodel.PerfModel.fit([(p_, c, t, 1.02 * best) for p_, c, t, best in
                                     _with_best(rows_for([64, 1024, 4096, 16384]))], family="toy")
    assert perfmodel.zero_shot(close, p, cfgs) is None
    # unlearnable noise: not confident
    rng = np.random.default_rng(0)
    noise = [(p_, c, float(rng.random() + 0.1), 5.0) for p_, c, _, _ in rows_for([64, 1024, 4096, 16384])]
    noisy = perfmodel.PerfModel.fit(noise, family="toy")
    assert not noisy.confident() and perfmodel.zero_shot(noisy, p, cfgs) is None
    assert perfmodel.zero_shot(None, p, cfgs) is None
    no_cv = perfmodel.PerfModel.fit(rows_for([64, 1024, 4096]), family="toy", cv=False)
    assert not no_cv.confident()


def _with_best(rows):
    """(problem, config, time, the problem's best time) for each row."""
    best = {}
    for p, c, t, _ in rows:
        best[p["n"]] = min(best.get(p["n"], math.inf), t)
    return [(p, c, t, best[p["n"]]) for p, c, t, _ in rows]


def _fake_choice(wrong: bool):
    """A predicted choice for a fake "mm" whose launch adds 1 when ``wrong``."""
    calls = []

    def fake_launch(a, b, *, config):
        calls.append(config)
        return torch.mm(a, b) + (1.0 if wrong else 0.0)

    class Fam:
        name = "fake-mm"

        def tolerance(self, problem):
            return 1e-4

    base = dict(op="mm", aten=torch.mm, problem="p", family=Fam(), problem_key="k")
    entry = launch._Predicted(winner=json.dumps({"BLOCK": 4}), vs_aten=0.5)
    c = launch._predicted_choice("mm", fake_launch, entry, base, torch.device("cpu"), settings.current())
    return c, calls


@pytest.mark.parametrize("wrong", [False, True])
def test_predicted_choice_is_verified_at_first_use(wrong):
    c, calls = _fake_choice(wrong)
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(c.fn(a, b), torch.mm(a, b))
    ours = [w for w in caught if "predicted" in str(w.message)]
    if wrong:
        assert c.source == "predicted-rejected" and c.kernel == "aten" and c.fn is torch.mm
        assert len(calls) == 1 and len(ours) == 1
    else:
        assert c.source == "predicted" and c.kernel != "aten" and len(calls) == 3 and not ours


def _gemm_history(store: Store, fp: str, *, value, aten_factor: float = 3.0) -> None:
    """A GEMM history on the interpreter's fingerprint: every valid config of a few small problems."""
    from torchtune_ops.kernels import gemm as kgemm
    from torchtune_ops.kernels.base import CPU_INTERPRETER
    from torchtune_ops.kernels.gemm_space import GemmProblem

    for m, n, k in [(16, 16, 16), (32, 64, 48), (64, 32, 96), (100, 60, 40), (48, 48, 200)]:
        prob = GemmProblem("mm", 1, m, n, k, "float32")
        cfgs = [c.as_dict() for c in kgemm.GEMM.valid_configs(prob, CPU_INTERPRETER)]
        trials = [(c, value(c)) for c in cfgs]
        best_c, best_t = min(trials, key=lambda t: t[1])
        store.put(Entry(fp, "gemm", problem_key(kgemm.GEMM.problem_to_dict(prob)),
                        Config.from_dict(best_c).to_json(), best_t, aten_factor * best_t), trials)


def _smooth(c):
    return (1 + 0.5 * abs(math.log2(c["BLOCK_M"]) - 5) + 0.5 * abs(math.log2(c["BLOCK_N"]) - 4)
            + 0.3 * abs(math.log2(c["BLOCK_K"]) - 4) + 0.1 * c["num_stages"] + 0.2 * (c["num_warps"] != 2)
            + 0.3 * (c["SPLIT_K"] != 1))


def test_zero_shot_end_to_end_with_tuning_off_and_read_only(monkeypatch):
    from torchtune_ops.storage.device import fingerprint

    store = default_store()
    fp = fingerprint("cpu").key
    _gemm_history(store, fp, value=_smooth)
    a, b = torch.randn(33, 40), torch.randn(40, 17)
    with settings.override(readonly=True):
        for _ in range(2):
            torch.testing.assert_close(ops.mm(a, b), torch.mm(a, b), rtol=1e-4, atol=1e-4)
    [p] = dispatch.stats()["problems"]
    assert p["source"] == "predicted" and p["kernel"] != "aten"
    assert not perfmodel.model_path(store, fp, "gemm").exists()  # read-only: nothing written
    assert store.get(fp, "gemm", dispatch._memo[next(iter(dispatch._memo))].problem_key) is None
    # the same with the predicted kernel giving a wrong result: verified, rejected, aten from then on
    dispatch.reset()
    from torchtune_ops.kernels import gemm as kgemm

    real = kgemm.gemm
    monkeypatch.setattr(kgemm, "gemm", lambda *args, **kw: real(*args, **kw) + 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.testing.assert_close(ops.mm(a, b), torch.mm(a, b), rtol=1e-4, atol=1e-4)
    [p] = dispatch.stats()["problems"]
    assert p["source"] == "predicted-rejected" and p["kernel"] == "aten"
    assert len([w for w in caught if "wrong result" in str(w.message)]) == 1


def test_zero_shot_not_confident_or_off_uses_aten():
    from torchtune_ops.storage.device import fingerprint

    store = default_store()
    fp = fingerprint("cpu").key
    rng = np.random.default_rng(1)
    _gemm_history(store, fp, value=lambda c: float(rng.random() + 0.1))
    a, b = torch.randn(33, 40), torch.randn(40, 17)
    torch.testing.assert_close(ops.mm(a, b), torch.mm(a, b), rtol=1e-4, atol=1e-4)
    [p] = dispatch.stats()["problems"]
    assert p["source"] == "untuned" and p["kernel"] == "aten"
    dispatch.reset()
    perfmodel.forget()
    store.clear()
    _gemm_history(store, fp, value=_smooth)
    with settings.override(perfmodel=False):
        ops.mm(a, b)
    [p] = dispatch.stats()["problems"]
    assert p["source"] == "untuned" and p["kernel"] == "aten"


@pytest.mark.gpu
def test_zero_shot_on_a_gpu_is_kept_only_when_faster_than_aten():
    from torchtune_ops.storage.device import fingerprint

    store = default_store()
    fp = fingerprint("cuda").key
    _gemm_history(store, fp, value=_smooth, aten_factor=10.0)
    a = torch.randn(1000, 999, device="cuda", dtype=torch.float16)
    b = torch.randn(999, 1001, device="cuda", dtype=torch.float16)
    for _ in range(3):
        torch.testing.assert_close(ops.mm(a, b), torch.mm(a, b), rtol=2e-2, atol=2e-1)
    [c] = dispatch._memo.values()
    assert c.source in ("predicted", "predicted-rejected")
    if c.source == "predicted":
        assert c.time_ms < c.aten_ms
    else:
        assert c.kernel == "aten"
