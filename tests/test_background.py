"""The background tuner: one problem at a time, never blocking the caller, winners handed back, a
per-process budget after which it stops. Uses fake tune functions (no kernels)."""
from __future__ import annotations

import threading
import time

import pytest

from torchtune_ops.tuning import background
from torchtune_ops import settings


class Fam:
    name = "gemm"


def make(budget_s=None, work_s=0.02, fail=()):
    calls, done, active, peak = [], [], [0], [0]
    lock = threading.Lock()

    def tune(family, problem, device, s):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        calls.append((problem, s.time_budget))
        time.sleep(work_s)
        with lock:
            active[0] -= 1
        if problem in fail:
            raise RuntimeError("boom")
        return f"entry-{problem}"

    w = background.BackgroundTuner(tune=tune, on_done=lambda f, k, e: done.append((k, e)), budget_s=budget_s)
    return w, calls, done, peak


def test_tunes_one_at_a_time_in_order_and_hands_back_winners():
    w, calls, done, peak = make()
    for p in (1, 7, 13):
        assert w.submit(Fam, p, ("k", p), "cpu")
    assert w.join(30)
    assert [c[0] for c in calls] == [1, 7, 13]
    assert done == [(("k", 1), "entry-1"), (("k", 7), "entry-7"), (("k", 13), "entry-13")]
    assert peak[0] == 1
    assert w.stats()["tuned"] == 3


def test_submit_never_waits_for_tuning():
    w, calls, done, _ = make(work_s=0.5)
    t0 = time.perf_counter()
    for p in range(5):
        w.submit(Fam, p, p, "cpu")
    assert time.perf_counter() - t0 < 0.1
    w.stop()
    w.join(30)


def test_same_problem_is_submitted_once():
    w, calls, done, _ = make()
    assert w.submit(Fam, 3, "same", "cpu")
    assert not w.submit(Fam, 3, "same", "cpu")
    assert w.submit(Fam, 3, "same", "cuda:1")  # another device is another problem
    w.join(30)
    assert len(calls) == 2


def test_budget_bounds_each_problem_and_stops_the_worker(caplog, monkeypatch):
    monkeypatch.setattr(background, "MIN_JOB_S", 0.03)
    w, calls, done, _ = make(budget_s=0.1, work_s=0.04)
    with settings.override(time_budget=30.0):
        for p in range(10):
            w.submit(Fam, p, p, "cpu")
    assert w.join(30)
    st = w.stats()
    assert st["exhausted"] or w.remaining_s < 0.03
    assert 1 <= st["tuned"] <= 3 and st["tuned"] + st["dropped"] == 10
    # each problem got at most the time left, never the full 30 s, and never less than MIN_JOB_S
    assert calls[0][1] == pytest.approx(0.1) and all(0.03 <= b <= 0.1 for _, b in calls)
    assert not w.submit(Fam, 99, 99, "cpu")
    assert sum("budget" in r.message for r in caplog.records) == 1


def test_no_problem_is_started_in_a_sliver_of_budget():
    w, calls, done, _ = make(budget_s=0.5)
    with settings.override(time_budget=30.0):
        w.submit(Fam, 1, 1, "cpu")  # 0.5 s left < MIN_JOB_S (1 s): not started, nothing stored
    w.join(30)
    assert calls == [] and w.stats()["dropped"] == 1
    w2, calls2, _, _ = make(budget_s=0.5)
    with settings.override(time_budget=0.2):  # a problem's own budget below MIN_JOB_S is enough
        w2.submit(Fam, 1, 1, "cpu")
    w2.join(30)
    assert [b for _, b in calls2] == [0.2]


def test_budget_comes_from_the_settings():
    w, *_ = make(budget_s=None)
    with settings.override(background_budget=12.5):
        w.submit(Fam, 1, 1, "cpu")
    assert w.budget_s == 12.5
    w.join(30)


def test_a_failing_problem_does_not_stop_the_others(caplog):
    w, calls, done, _ = make(fail=(2,))
    for p in (1, 2, 3):
        w.submit(Fam, p, p, "cpu")
    w.join(30)
    assert [k for k, _ in done] == [1, 3]
    assert w.stats()["failed"] == 1
    assert any("boom" in r.message for r in caplog.records)


def test_process_worker_is_shared_and_reset():
    background.reset()
    a = background.worker(tune=lambda *a: None, on_done=lambda *a: None)
    b = background.worker(tune=lambda *a: 1 / 0, on_done=lambda *a: None)
    assert a is b and background.current() is a
    assert background.join(5)
    background.reset()
    assert background.current() is None


def test_through_the_ops_the_budget_stops_background_tuning():
    """End to end: AUTOTUNE=background serves PyTorch's kernel at once; once the process budget is spent,
    later problems stay on PyTorch's kernel, untuned (tests/test_ops.py checks the winner swap-in)."""
    import torch

    import torchtune_ops.runtime.ops  # noqa: F401  (registers the ops)
    from torchtune_ops.runtime import dispatch
    from torchtune_ops.tuning.timing import FakeTimer

    ops = torch.ops.torchtune_ops
    dispatch.reset()
    dispatch.set_tune_options(timer=FakeTimer({"aten": 10.0}, default=1.0, run=False))
    try:
        with settings.override(autotune="background", max_trials=2, time_budget=30, background_budget=0.001):
            a, b = torch.randn(9, 10), torch.randn(10, 11)
            torch.testing.assert_close(ops.mm(a, b), torch.mm(a, b))
            # served by aten at once (its choice may already be swapped out again: the fake tuning is fast)
            assert dispatch.stats()["ops"]["mm"]["background"] == 1
            dispatch.wait_background()
            torch.testing.assert_close(ops.mm(a, b), torch.mm(a, b), rtol=1e-4, atol=1e-4)
            # the worker has stopped: a new problem is served by aten and never submitted
            c, d = torch.randn(5, 7), torch.randn(7, 3)
            torch.testing.assert_close(ops.mm(c, d), torch.mm(c, d))
            dispatch.wait_background()
            ops.mm(c, d)
        rows = {p["shape"]: p for p in dispatch.stats()["problems"]}
        # 1 ms of budget is too little to start a search: nothing is tuned or stored, the worker stops
        for shape in ("[9,10] x [10,11]", "[5,7] x [7,3]"):
            assert rows[shape]["source"] == "background" and rows[shape]["kernel"] == "aten"
        st = background.current().stats()
        assert st["submitted"] == 1 and st["tuned"] == 0 and st["dropped"] == 1
        from torchtune_ops.storage.store import default_store

        assert default_store().entries() == []
    finally:
        dispatch.set_tune_options(timer=None)
        dispatch.reset()
