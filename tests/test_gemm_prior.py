"""The shipped GEMM prior (tuning/gemm_prior.py): its file, its trees, and its use by the tuner and the
zero-shot path on a fresh install (an empty cache) on a faked GPU fingerprint."""
from __future__ import annotations

import json

import numpy as np
import pytest

from torchtune_ops import settings
from torchtune_ops.kernels import gemm as kgemm
from torchtune_ops.kernels.base import CPU_INTERPRETER, Config
from torchtune_ops.kernels.gemm_space import GemmProblem
from torchtune_ops.storage.store import Store
from torchtune_ops.tuning import gemm_prior, perfmodel
from torchtune_ops.tuning.timing import FakeTimer
from torchtune_ops.tuning.tuner import tune_problem

H100 = "NVIDIA H100 80GB HBM3|cc9.0|sm132|torch2.13.0|triton3.9.0|kabc"
L4 = "NVIDIA L4|cc8.9|sm58|torch2.13.0|triton3.9.0|kabc"


@pytest.fixture(autouse=True)
def _fresh():
    perfmodel.forget()
    perfmodel._prior_notes.clear()
    yield
    perfmodel.forget()
    perfmodel._prior_notes.clear()


def test_the_shipped_prior_is_small_and_says_where_it_comes_from():
    path = gemm_prior.SHIPPED_PATH
    assert path.exists() and path.stat().st_size < 1_000_000
    prior = gemm_prior.shipped()
    assert prior is not None
    meta = prior.meta
    assert meta["version"] == "gemm_inductor_v1" and "AutoHeuristic" in meta["source"] and meta["date"]
    assert len(meta["files"]) == 4 and {g["name"] for g in prior.gpus} == {"A100", "H100"}
    assert prior.quality["fraction"] > 0.9  # held out across GPUs (benchmarks/perfmodel_eval.py --ship)


@pytest.mark.parametrize("M, N, K", [(1, 4096, 4096), (257, 1031, 61), (8192, 8192, 8192), (97, 13, 5)])
def test_prior_predicts_finite_scores_for_odd_shapes(M, N, K):
    model = gemm_prior.shipped().for_device(sms=132, smem=232448, capability=(9, 0))
    prob = GemmProblem("mm", 1, M, N, K, "float16", "row", "col")
    cands = [c.as_dict() for c in kgemm.GEMM.valid_configs(prob, CPU_INTERPRETER)]
    s = model.predict(kgemm.GEMM.problem_to_dict(prob), cands)
    assert s.shape == (len(cands),) and np.isfinite(s).all() and s.std() > 0


def test_empty_cache_on_an_h100_measures_the_priors_top_predictions_first(tmp_path):
    store = Store.open(tmp_path / "c.db")
    prob = GemmProblem("mm", 1, 127, 67, 95, "float16", "row", "col")
    pdict = kgemm.GEMM.problem_to_dict(prob)
    cands = [c.as_dict() for c in kgemm.GEMM.valid_configs(prob, CPU_INTERPRETER)]
    model = gemm_prior.shipped().for_device(sms=132, smem=232448, capability=(9, 0))
    top = [Config.from_dict(cands[i]).to_json() for i in np.argsort(model.predict(pdict, cands), kind="stable")[:4]]

    timer = FakeTimer({"aten": 1.0}, default=2.0, run=False)
    tune_problem(kgemm.GEMM, prob, device="cpu", store=store, timer=timer, fingerprint=H100, max_trials=6)
    measured = [k for k in timer.calls if k != "aten"]
    assert measured[:4] == top
    assert "H100" in perfmodel.prior_notes()[H100] and "this GPU" in perfmodel.prior_notes()[H100]
    from torchtune_ops.api import explain_text

    assert "performance prior on NVIDIA H100 80GB HBM3: GEMM prior gemm_inductor_v1" in explain_text()

    # without the prior (or on the interpreter's fingerprint) the tuner starts from the known configurations
    known = [c.to_json() for c in kgemm.GEMM.known_configs(prob, CPU_INTERPRETER)]
    for fp, override in ((H100, {"perfmodel_prior": False}), ("cpu-interp|cc0.0|sm0|t|t|k", {})):
        timer = FakeTimer({"aten": 1.0}, default=2.0, run=False)
        with settings.override(**override):
            tune_problem(kgemm.GEMM, prob, device="cpu", store=Store.open(tmp_path / f"{len(override)}.db"),
                         timer=timer, fingerprint=fp, max_trials=6)
        assert [k for k in timer.calls if k != "aten"][:4] == known[:4]


def test_a_gpu_outside_the_data_uses_its_limits_and_the_nearest_gpus_data():
    model = perfmodel.prior_for(L4, "gemm")
    assert model.sms == 58 and model.arch == 8.0 and not model.covered
    assert "not in its data" in model.note and "A100" in model.note and "58 SMs" in model.note
    assert perfmodel.prior_for(L4, "conv2d") is None
    assert perfmodel.prior_for("triton-interpreter-x86_64|cc0.0|sm0|t|t|k", "gemm") is None


def test_local_history_weighs_more_as_it_grows(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for n in range(3):
        prob = GemmProblem("mm", 1, 64 * (n + 1), 128, 256, "float16")
        pd = kgemm.GEMM.problem_to_dict(prob)
        for c in kgemm.GEMM.valid_configs(prob, CPU_INTERPRETER)[:40]:
            rows.append((pd, c.as_dict(), float(rng.random() + 0.1), 1.0))
    own = perfmodel.PerfModel.fit(rows, family="gemm", sms=132, cv=False, n_trees=10, n_bags=1)
    prior = perfmodel.prior_for(H100, "gemm")
    b = perfmodel.Blended(own, prior)
    assert b.weight == pytest.approx(3 / (3 + perfmodel.PRIOR_HALF_WEIGHT))
    pd, cfgs = rows[0][0], [r[1] for r in rows[:40]]
    np.testing.assert_allclose(b.predict(pd, cfgs),
                               b.weight * own.predict(pd, cfgs) + (1 - b.weight) * prior.predict(pd, cfgs))
    assert perfmodel.Blended(own, prior, half=1).weight > b.weight
    store = Store.open(tmp_path / "h.db")
    assert isinstance(perfmodel.model_with_prior(store, H100, "gemm"), gemm_prior.DeviceModel)


def test_forest_matches_scikit_learn_and_round_trips():
    import sklearn.ensemble as ensemble  # the train extra; scripts/setup.sh installs it
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 4))
    y = np.where(X[:, 0] > 0.3, 2.0, -1.0) + X[:, 1] * X[:, 2] + rng.normal(scale=0.05, size=500)
    est = ensemble.HistGradientBoostingRegressor(max_iter=10, max_leaf_nodes=8, random_state=0).fit(X, y)
    forest = gemm_prior.Forest.from_sklearn(est)
    Xt = rng.normal(size=(200, 4))
    np.testing.assert_allclose(forest.predict(Xt), est.predict(Xt), rtol=1e-6, atol=1e-6)
    back = gemm_prior.Forest.from_dict(json.loads(json.dumps(forest.to_dict())))
    np.testing.assert_allclose(back.predict(Xt), est.predict(Xt), rtol=1e-4, atol=1e-4)
    bad = forest.to_dict()
    bad["left"][0][0] = 10 ** 6
    with pytest.raises(ValueError):
        gemm_prior.Forest.from_dict(bad)


def test_zero_shot_uses_the_prior_with_an_empty_history(tmp_path, monkeypatch):
    import torch

    from torchtune_ops.runtime import launch

    seen = {}
    real = perfmodel.zero_shot

    def spy(model, problem, cands, **kw):
        seen["model"], seen["cands"] = model, cands
        seen["out"] = real(model, problem, cands, **kw)
        return seen["out"]

    monkeypatch.setattr(perfmodel, "zero_shot", spy)
    prob = GemmProblem("mm", 1, 127, 67, 95, "float16", "row", "col")
    pred = launch._predict(kgemm.GEMM, prob, H100, torch.device("cpu"), Store.open(tmp_path / "z.db"))
    model = seen["model"]
    assert isinstance(model, gemm_prior.DeviceModel) and model.confident()
    scores = model.predict(kgemm.GEMM.problem_to_dict(prob), seen["cands"])
    best = seen["cands"][int(np.argmin(scores))]
    if seen["out"] is None:  # the prior does not expect the best to beat cuBLAS by the margin: aten
        assert pred is None
    else:
        assert pred.winner == Config.from_dict(best).to_json() and pred.vs_aten < 1 - perfmodel.MIN_MARGIN
    with settings.override(perfmodel_prior=False):
        seen.clear()
        assert launch._predict(kgemm.GEMM, prob, H100, torch.device("cpu"), Store.open(tmp_path / "y.db")) is None
        assert not seen  # no model at all: zero-shot is not even asked
