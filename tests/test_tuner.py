"""The per-problem tuner, with a fake kernel family (pure torch, made wrong or failing on purpose) and fake
timers, plus a small real-kernel run through the Triton interpreter."""
from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from typing import Any, Callable, Mapping

import pytest
import torch

from torchtune_ops.errors import InvalidConfig, KernelFailure, WrongResult
from torchtune_ops.kernels.base import Config, DeviceLimits, KernelFamily
from torchtune_ops.storage.store import Entry, Store, problem_key
from torchtune_ops.tuning.timing import FakeTimer
from torchtune_ops.tuning.tuner import TuneProgress, tune_problem

FP = "fake-gpu|test"


@dataclasses.dataclass(frozen=True)
class ScaleProblem:
    n: int
    dtype: str = "float32"


Pred = Callable[[Mapping[str, Any]], bool]


class ScaleFamily(KernelFamily):
    """y = 3x + 1, "tiled" by BLOCK; configs can be made wrong, failing or interrupting on purpose."""

    name = "scale"
    problem_type = ScaleProblem

    def __init__(self, *, wrong: Pred = lambda c: False, fail: Pred = lambda c: False,
                 error: type[BaseException] = RuntimeError, interrupt: Pred = lambda c: False,
                 interruption: type[BaseException] = KeyboardInterrupt) -> None:
        self.wrong, self.fail, self.error, self.interrupt = wrong, fail, error, interrupt
        self.interruption = interruption
        self.launches = 0
        self.seeds: list[int] = []

    def space(self, problem):
        return {"BLOCK": (1, 2, 4, 8, 16), "MODE": ("row", "col"), "UNROLL": (1, 2)}

    def check(self, config, problem, limits):
        if config["BLOCK"] == 16 and config["UNROLL"] == 2:
            return "too big"
        return None

    def known_configs(self, problem, limits):
        return [Config.of(BLOCK=4, MODE="row", UNROLL=1)]

    def make_inputs(self, problem, device, *, seed=0):
        self.seeds.append(seed)
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(problem.n, generator=gen).to(device),)

    def reference(self, problem, inputs):
        return inputs[0] * 3 + 1

    def launch(self, config, problem, inputs, out=None):
        self.launches += 1
        cfg = dict(config.as_dict() if isinstance(config, Config) else config)
        if self.interrupt(cfg):
            raise self.interruption
        if self.fail(cfg):
            raise self.error(f"cannot run {cfg}")
        (x,) = inputs
        y = torch.cat([c * 3 + 1 for c in x.split(cfg["BLOCK"])]) if x.numel() else x * 3 + 1
        return y + 0.5 if self.wrong(cfg) else y


PROBLEM = ScaleProblem(n=37)
ALL = ScaleFamily().valid_configs(PROBLEM, DeviceLimits("fake", 1 << 20, 1, (0, 0), True))


def cfg(**kw) -> str:
    return Config.of(**kw).to_json()


def times(fast: Mapping[str, float] = {}, *, slow: float = 2.0) -> dict[str, float]:
    """Every valid config at ``slow`` ms except the ones listed."""
    t = {c.to_json(): slow for c in ALL}
    t.update(fast)
    return t


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "c.sqlite") as s:
        yield s


def run(family, store, timer, **kw) -> Entry:
    kw.setdefault("max_trials", len(ALL))
    kw.setdefault("patience", 0)
    return tune_problem(family, PROBLEM, device="cpu", store=store, timer=timer, fingerprint=FP, **kw)


def test_fake_space_has_18_valid_configs():
    assert len(ALL) == 18


def test_aten_wins_when_no_config_is_faster(store):
    timer = FakeTimer({"aten": 1.0, **times(slow=2.0)})
    e = run(ScaleFamily(), store, timer)
    assert e.winner == "aten" and e.is_aten
    assert e.time_ms == e.aten_ms == 1.0
    assert e.trials == len(ALL)
    assert store.get(FP, "scale", problem_key({"n": 37, "dtype": "float32"}), refresh=True) == e
    assert len(store.trials(FP, "scale")) == len(ALL)


def test_triton_config_wins_and_is_stored_with_history(store):
    best = cfg(BLOCK=8, MODE="col", UNROLL=2)
    timer = FakeTimer({"aten": 1.0, **times({best: 0.5})})
    e = run(ScaleFamily(), store, timer)
    assert e.winner == best and e.config() == {"BLOCK": 8, "MODE": "col", "UNROLL": 2}
    assert (e.time_ms, e.aten_ms, e.source) == (0.5, 1.0, "tuned")
    hist = store.trials(FP, "scale")
    assert sorted(t.config for t in hist) == sorted(c.to_json() for c in ALL)  # each measured once
    assert [t.ordinal for t in hist] == list(range(len(ALL)))
    assert hist[0].config == cfg(BLOCK=4, MODE="row", UNROLL=1)  # the known config first
    # the winner and aten were re-timed before the choice
    assert timer.calls.count(best) == 2 and timer.calls.count("aten") == 2


@pytest.mark.parametrize("best_ms, spread, expect_triton", [
    (0.98, 0.0, False),   # 2% faster: inside the minimum margin
    (0.96, 0.0, True),    # 4% faster: beyond 3%
    (0.92, 0.10, False),  # 8% faster but the timings spread over 10%
    (0.85, 0.10, True),
])
def test_winner_must_beat_aten_beyond_the_noise(store, best_ms, spread, expect_triton):
    best = cfg(BLOCK=2, MODE="row", UNROLL=1)
    timer = FakeTimer({"aten": 1.0, **times({best: best_ms})}, spread=spread)
    e = run(ScaleFamily(), store, timer)
    assert (e.winner == best) is expect_triton
    assert e.time_ms == (best_ms if expect_triton else 1.0)


def test_aten_drift_between_timings_counts_as_noise(store):
    best = cfg(BLOCK=2, MODE="row", UNROLL=1)
    # aten measured 1.0 then 0.9: 11% drift, so 0.85 (5.6% under the second) is not enough
    timer = FakeTimer({"aten": [1.0, 0.9], **times({best: 0.85})})
    assert run(ScaleFamily(), store, timer).winner == "aten"


def test_retiming_overrules_a_lucky_first_measurement(store):
    lucky, steady = cfg(BLOCK=1, MODE="col", UNROLL=1), cfg(BLOCK=16, MODE="row", UNROLL=1)
    timer = FakeTimer({"aten": 1.0, **times({lucky: [0.3, 0.9], steady: 0.5})})
    e = run(ScaleFamily(), store, timer)
    assert e.winner == steady and e.time_ms == 0.5


def test_correctness_gate_rejects_a_wrong_kernel(store, caplog):
    bad, good = cfg(BLOCK=8, MODE="row", UNROLL=1), cfg(BLOCK=2, MODE="col", UNROLL=2)
    fam = ScaleFamily(wrong=lambda c: c["BLOCK"] == 8)
    timer = FakeTimer({"aten": 1.0, **times({bad: 0.2, good: 0.6})})
    e = run(fam, store, timer)
    assert e.winner == good
    assert "wrong result" in caplog.text
    stored = {t.config: t.value_ms for t in store.trials(FP, "scale")}
    assert stored[bad] == math.inf and stored[good] == 0.6  # never learnt as fast


def test_wrong_kernel_is_never_the_winner_even_when_all_are_wrong(store):
    fam = ScaleFamily(wrong=lambda c: True)
    timer = FakeTimer({"aten": 1.0, **times({cfg(BLOCK=1, MODE="row", UNROLL=1): 0.1}, slow=0.2)})
    assert run(fam, store, timer).winner == "aten"


def test_strict_mode_raises_wrong_result_and_stores_nothing(store):
    bad = cfg(BLOCK=8, MODE="row", UNROLL=1)
    fam = ScaleFamily(wrong=lambda c: c["BLOCK"] == 8)
    timer = FakeTimer({"aten": 1.0, **times({bad: 0.2})})
    with pytest.raises(WrongResult):
        run(fam, store, timer, strict=True)
    assert store.entries() == [] and store.trials() == []
    assert not store.claimed(FP, "scale", problem_key({"n": 37, "dtype": "float32"}))


@pytest.mark.parametrize("error", [RuntimeError, InvalidConfig, KernelFailure, "triton"])
def test_failing_candidates_are_scored_not_fatal(store, error):
    if error == "triton":
        from triton.runtime.errors import OutOfResources

        error = lambda msg: OutOfResources(99999, 1000, "shared memory")  # noqa: E731
    best = cfg(BLOCK=4, MODE="col", UNROLL=2)
    fam = ScaleFamily(fail=lambda c: c["MODE"] == "row", error=error)
    timer = FakeTimer({"aten": 1.0, **times({best: 0.4, cfg(BLOCK=1, MODE="row", UNROLL=1): 0.1})})
    e = run(fam, store, timer)
    assert e.winner == best
    values = {t.config: t.value_ms for t in store.trials(FP, "scale")}
    assert len(values) == len(ALL)
    assert all((v == math.inf) == ('"row"' in c) for c, v in values.items())


def test_all_candidates_failing_gives_aten(store):
    timer = FakeTimer({"aten": 1.0}, default=0.1)
    e = run(ScaleFamily(fail=lambda c: True), store, timer)
    assert e.winner == "aten" and e.trials == len(ALL)


def test_strict_mode_raises_on_a_failing_candidate(store):
    timer = FakeTimer({"aten": 1.0}, default=0.5)
    with pytest.raises(KernelFailure):
        run(ScaleFamily(fail=lambda c: c["BLOCK"] == 4), store, timer, strict=True)
    assert store.entries() == []


def test_unexpected_errors_propagate_and_release_the_claim(store):
    timer = FakeTimer({"aten": 1.0}, default=0.5)
    with pytest.raises(ZeroDivisionError):
        run(ScaleFamily(fail=lambda c: True, error=ZeroDivisionError), store, timer)
    assert store.entries() == [] and not store.claimed(FP, "scale", problem_key({"n": 37, "dtype": "float32"}))


def test_cache_hit_measures_nothing_and_miss_tunes(store):
    timer = FakeTimer({"aten": 1.0}, default=0.5)
    first = run(ScaleFamily(), store, timer)
    n = len(timer.calls)
    assert run(ScaleFamily(), store, timer) == first and len(timer.calls) == n  # hit
    other = tune_problem(ScaleFamily(), ScaleProblem(n=38), device="cpu", store=store, timer=timer,
                         fingerprint=FP, max_trials=2)
    assert len(timer.calls) > n and other.problem != first.problem  # miss: a new problem is tuned


def test_a_different_device_fingerprint_misses_the_cache(store):
    timer = FakeTimer({"aten": 1.0}, default=0.5)
    run(ScaleFamily(), store, timer, max_trials=2)
    n = len(timer.calls)
    e = tune_problem(ScaleFamily(), PROBLEM, device="cpu", store=store, timer=timer, fingerprint="other-gpu",
                     max_trials=2)
    assert len(timer.calls) > n and e.fingerprint == "other-gpu"
    assert len(store.entries()) == 2


def test_default_fingerprint_is_the_devices(store):
    from torchtune_ops.storage.device import fingerprint

    e = tune_problem(ScaleFamily(), PROBLEM, device="cpu", store=store,
                     timer=FakeTimer({"aten": 1.0}, default=0.5), max_trials=1)
    assert e.fingerprint == fingerprint("cpu").key


def test_force_retunes_and_replaces(store):
    best = cfg(BLOCK=1, MODE="row", UNROLL=1)
    run(ScaleFamily(), store, FakeTimer({"aten": 1.0}, default=2.0))
    e = run(ScaleFamily(), store, FakeTimer({"aten": 1.0, **times({best: 0.5})}), force=True)
    assert e.winner == best and store.get(*e.key, refresh=True) == e
    assert len({t.run for t in store.trials(FP)}) == 2  # both histories kept


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_ctrl_c_leaves_no_entry_and_no_claim(store, interruption):
    fam = ScaleFamily(interrupt=lambda c: c["BLOCK"] == 2, interruption=interruption)
    timer = FakeTimer({"aten": 1.0}, default=0.5)
    with pytest.raises(interruption):
        run(fam, store, timer)
    key = (FP, "scale", problem_key({"n": 37, "dtype": "float32"}))
    assert store.get(*key, refresh=True) is None
    assert store.entries() == [] and store.trials() == []
    assert not store.claimed(*key)
    # the next attempt tunes normally
    assert run(ScaleFamily(), store, timer).trials == len(ALL)


def test_claimed_elsewhere_returns_unstored_aten(store, tmp_path):
    key = (FP, "scale", problem_key({"n": 37, "dtype": "float32"}))
    with Store.open(store.path) as other:
        assert other.claim(*key, lease_s=60)
        timer = FakeTimer({"aten": 1.0}, default=0.5)
        t0 = time.monotonic()
        e = run(ScaleFamily(), store, timer, wait_s=0.3)
        assert 0.25 <= time.monotonic() - t0 < 5
        assert e.winner == "aten" and e.source == "claimed-elsewhere" and math.isnan(e.time_ms)
        assert timer.calls == [] and store.entries() == []
        assert other.claimed(*key)  # still theirs


def test_waiting_for_another_process_returns_its_result(store):
    key = (FP, "scale", problem_key({"n": 37, "dtype": "float32"}))
    theirs = Entry(*key, winner=cfg(BLOCK=1, MODE="row", UNROLL=1), time_ms=0.3, aten_ms=1.0, trials=5)
    with Store.open(store.path) as other:
        assert other.claim(*key, lease_s=60)

        def finish():
            time.sleep(0.2)
            other.put(theirs)
            other.release(*key)

        th = threading.Thread(target=finish)
        th.start()
        timer = FakeTimer({"aten": 1.0}, default=0.5)
        e = run(ScaleFamily(), store, timer, wait_s=10)
        th.join()
    assert e == theirs and timer.calls == []


def test_a_released_claim_without_result_lets_the_waiter_tune(store):
    key = (FP, "scale", problem_key({"n": 37, "dtype": "float32"}))
    with Store.open(store.path) as other:
        assert other.claim(*key, lease_s=60)
        th = threading.Timer(0.2, lambda: other.release(*key))
        th.start()
        e = run(ScaleFamily(), store, FakeTimer({"aten": 1.0}, default=0.5), wait_s=10)
        th.join()
    assert e.source == "tuned" and store.get(*key) == e


def test_budget_limits_trials(store):
    timer = FakeTimer({"aten": 1.0}, default=0.5)
    e = run(ScaleFamily(), store, timer, max_trials=3)
    assert e.trials == 3 and len(store.trials(FP)) == 3


def test_budgets_default_from_settings(store):
    from torchtune_ops import settings

    with settings.override(max_trials=4):
        e = tune_problem(ScaleFamily(), PROBLEM, device="cpu", store=store, fingerprint=FP,
                         timer=FakeTimer({"aten": 1.0}, default=0.5))
    assert e.trials == 4


def test_a_spent_time_budget_measures_no_config_and_a_zero_one_is_an_error(store):
    from torchtune_ops.errors import SettingsError

    timer = FakeTimer({"aten": 1.0}, default=0.5)
    with pytest.raises(SettingsError, match="time_budget"):
        run(ScaleFamily(), store, timer, time_budget_s=0.0)
    assert store.entries() == [] and timer.calls == []
    e = run(ScaleFamily(), store, timer, time_budget_s=1e-9)
    assert e.winner == "aten" and e.trials == 0 and set(timer.calls) == {"aten"}


def test_progress_line_per_trial(store, capsys):
    run(ScaleFamily(), store, FakeTimer({"aten": 1.0}, default=0.5), max_trials=3, progress=True)
    err = capsys.readouterr().err
    lines = [ln for ln in err.split("\r") if ln.strip()]
    assert len(lines) == 3
    assert "trial 3/3" in lines[-1] and "scale n=37" in lines[-1] and "aten 1 ms" in lines[-1]
    assert "best 0.5 ms" in lines[-1] and err.endswith("\n")


def test_progress_callable_gets_each_trial(store):
    seen: list[TuneProgress] = []
    best = cfg(BLOCK=4, MODE="row", UNROLL=1)
    run(ScaleFamily(), store, FakeTimer({"aten": 1.0, **times({best: 0.25})}), max_trials=5,
        progress=seen.append)
    assert [p.trial for p in seen] == [1, 2, 3, 4, 5]
    assert all(p.best_ms == 0.25 and p.aten_ms == 1.0 and p.max_trials == 5 for p in seen)


def test_prior_is_passed_to_the_search(store):
    best = cfg(BLOCK=16, MODE="col", UNROLL=1)
    timer = FakeTimer({"aten": 1.0, **times({best: 0.1})})
    prior = [(json.loads(best), 0.1), ({"BLOCK": 1, "MODE": "row", "UNROLL": 2}, 9.0)]
    run(ScaleFamily(), store, timer, max_trials=3, prior=prior)
    assert best in timer.calls[:4]  # the prior's best region is tried right after the known config


def test_zero_size_problem_tunes_without_error(store):
    e = tune_problem(ScaleFamily(), ScaleProblem(n=0), device="cpu", store=store, fingerprint=FP,
                     timer=FakeTimer({"aten": 1.0}, default=2.0), max_trials=3)
    assert e.winner == "aten"


# ------------------------------------------------------------------------------------------------ real kernel

def _real_problem(name: str):
    if name == "gemm":
        from torchtune_ops.kernels.gemm import GEMM, GemmProblem

        return GEMM, GemmProblem(op="mm", batch=1, M=17, N=13, K=19, dtype="float32")
    from torchtune_ops.kernels.conv import CONV2D, ConvProblem

    return CONV2D, ConvProblem(N=1, C=3, H=5, W=7, K=4, R=3, S=3, padding=(1, 1, 1, 1), dtype="float32")


@pytest.mark.parametrize("name", ["gemm", "conv2d"])
def test_real_kernel_through_the_interpreter(tmp_path, device, name):
    """A tiny GEMM / convolution tuned for real (interpreter on CPU): whatever wins must match PyTorch."""
    from torchtune_ops.kernels.base import relative_error
    from torchtune_ops.tuning.timing import make_timer

    family, problem = _real_problem(name)
    with Store.open(tmp_path / "real.sqlite") as st:
        e = tune_problem(family, problem, device=device, store=st, max_trials=2, time_budget_s=60,
                         timer=make_timer(device, rep_ms=0.0, min_reps=1))
        assert st.get(*e.key, refresh=True) == e and e.family == name
        trials = st.trials(e.fingerprint, name)
        assert 1 <= e.trials <= 2 and e.aten_ms > 0 and len(trials) == e.trials
        assert all(math.isfinite(t.value_ms) for t in trials)  # every configuration ran and was right
    if not e.is_aten:
        inputs = family.make_inputs(problem, device, seed=5)
        err = relative_error(family.launch(Config.from_dict(e.config()), problem, inputs),
                             family.reference(problem, inputs))
        assert err <= family.tolerance(problem)


def test_default_patience_stops_a_search_that_stopped_improving(store):
    # the known config is the best: after 10 more trials without improvement the search stops
    timer = FakeTimer({"aten": 1.0, **times({cfg(BLOCK=4, MODE="row", UNROLL=1): 0.5})})
    e = tune_problem(ScaleFamily(), PROBLEM, device="cpu", store=store, timer=timer, fingerprint=FP,
                     max_trials=18)
    assert e.trials == 11 and e.winner == cfg(BLOCK=4, MODE="row", UNROLL=1)


TWO_TUNERS = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from test_tuner import PROBLEM, ScaleFamily, FP
from torchtune_ops.storage.store import Store
from torchtune_ops.tuning.timing import FakeTimer
from torchtune_ops.tuning.tuner import tune_problem

class SlowTimer(FakeTimer):
    def __call__(self, fn, *, key):
        time.sleep(0.02)
        return super().__call__(fn, key=key)

start = float(sys.argv[3])
while time.time() < start:
    time.sleep(0.005)
st = Store.open(sys.argv[2])
timer = SlowTimer({"aten": 1.0, '{"BLOCK":2,"MODE":"col","UNROLL":1}': 0.5}, default=0.9)
e = tune_problem(ScaleFamily(), PROBLEM, device="cpu", store=st, timer=timer, fingerprint=FP,
                 max_trials=18, patience=0, wait_s=60)
print(e.winner, e.source, len(timer.calls))
"""


def test_two_processes_tuning_the_same_problem_store_one_result(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "shared.sqlite"
    Store.open(path).close()
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", TWO_TUNERS, str(Path(__file__).parent), str(path),
                               str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = sorted(o[0].split() for o in outs)
    best = '{"BLOCK":2,"MODE":"col","UNROLL":1}'
    assert [r[0] for r in results] == [best, best]  # both use the same answer
    assert sorted(int(r[2]) for r in results)[0] == 0  # the waiting process measured nothing
    with Store.open(path) as st:
        assert len(st.entries()) == 1 and len({t.run for t in st.trials()}) == 1
        assert len(st.trials()) == 18 and not st.claimed(*st.entries()[0].key)


@pytest.mark.gpu
def test_real_gemm_on_the_gpu_is_never_slower_than_aten(tmp_path):
    from torchtune_ops.kernels.base import relative_error
    from torchtune_ops.kernels.gemm import GEMM, GemmProblem

    problem = GemmProblem(op="mm", batch=1, M=1000, N=517, K=769, dtype="float16")
    with Store.open(tmp_path / "gpu.sqlite") as st:
        e = tune_problem(GEMM, problem, device="cuda", store=st, max_trials=12, time_budget_s=60)
    assert e.time_ms <= e.aten_ms and e.trials >= 1
    if not e.is_aten:
        assert e.time_ms < e.aten_ms * 0.97
        inputs = GEMM.make_inputs(problem, "cuda", seed=11)
        err = relative_error(GEMM.launch(Config.from_dict(e.config()), problem, inputs),
                             GEMM.reference(problem, inputs))
        assert err <= GEMM.tolerance(problem)


def test_the_claim_is_renewed_while_tuning(store):
    key = (FP, "scale", problem_key({"n": 37, "dtype": "float32"}))

    class SlowTimer(FakeTimer):
        def __call__(self, fn, *, key):
            time.sleep(0.06)
            return super().__call__(fn, key=key)

    refused = []
    with Store.open(store.path) as other:
        def probe(p: TuneProgress) -> None:
            if p.trial in (10, 16):  # well past the 0.4 s lease
                refused.append(not other.claim(*key, lease_s=60))

        run(ScaleFamily(), store, SlowTimer({"aten": 1.0}, default=0.5), lease_s=0.4, progress=probe)
        assert refused == [True, True]
        assert other.claim(*key, lease_s=60)  # released at the end


def test_the_gate_uses_fresh_inputs(store):
    fam = ScaleFamily()
    best = cfg(BLOCK=8, MODE="col", UNROLL=2)
    run(fam, store, FakeTimer({"aten": 1.0, **times({best: 0.5})}), seed=7)
    assert fam.seeds == [7, 8]  # timing inputs, then the correctness check's own


@pytest.mark.parametrize("kernel_eager_ms, expect", [
    (3.0, "host"),     # twice as fast on the device, three times slower called eagerly: aten
    (0.6, "device"),   # faster both ways: the kernel
    (1.02, "device"),  # eagerly within the noise of aten: the device's time decides
])
def test_host_cost_can_decide_the_choice(store, kernel_eager_ms, expect):
    """The tuner times the best kernel and aten back to back as well (the timer's eager measure, host cost
    included): a kernel faster on the device but slower eagerly loses; the entry keeps both measures and
    which one decided."""
    best = cfg(BLOCK=8, MODE="row", UNROLL=1)
    timer = FakeTimer({"aten": 1.0, **times({best: 0.5})}, eager={"aten": 1.0, best: kernel_eager_ms})
    e = run(ScaleFamily(), store, timer)
    assert e.decided == expect
    assert (e.host_ms, e.aten_host_ms) == (kernel_eager_ms, 1.0)
    assert e.winner == ("aten" if expect == "host" else best)
    assert e.time_ms == (1.0 if expect == "host" else 0.5) and e.aten_ms == 1.0
    assert timer.calls.count("eager:" + best) == 1 and timer.calls.count("eager:aten") == 1
    assert store.get(*e.key, refresh=True) == e      # the new fields round-trip through the store
    assert Entry.from_dict(e.to_dict()) == e


def test_no_eager_measure_leaves_the_device_time_to_decide(store):
    best = cfg(BLOCK=8, MODE="row", UNROLL=1)
    e = run(ScaleFamily(), store, FakeTimer({"aten": 1.0, **times({best: 0.5})}))
    assert (e.winner, e.decided, e.host_ms, e.aten_host_ms) == (best, "", 0.0, 0.0)


def test_eager_measure_runs_the_bound_launch(store):
    """What is timed eagerly is the family's bound launch (as the run-time dispatch runs a cache hit)."""
    best = cfg(BLOCK=8, MODE="row", UNROLL=1)
    family = ScaleFamily()
    bound = []
    family.bound_launch = lambda config, problem, inputs: bound.append(config) or (
        lambda: family.launch(config, problem, inputs))
    run(family, store, FakeTimer({"aten": 1.0, **times({best: 0.5})}, eager={}))
    assert [c.to_json() for c in bound] == [best]


class WorkerLikeTimer(FakeTimer):
    """A worker-process timer's interface with fake times: ``relative_error`` (correctness measured in the
    worker) and an ``eager`` measure that ignores ``fn`` (the worker rebuilds the call from the key)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, run=False, **kwargs)
        self.eager_fns: list = []

    def eager(self, fn, *, key):
        self.eager_fns.append(fn)
        return super().eager(fn, key=key)

    def relative_error(self, key, *, seed):
        return 0.0


@pytest.mark.parametrize("kernel_eager_ms, expect", [(3.0, "host"), (0.6, "device")])
def test_a_worker_process_timer_takes_the_eager_measure_too(store, kernel_eager_ms, expect):
    """With isolation (TORCHTUNE_OPS_BENCH_SUBPROCESS, a worker-process timer), the host-inclusive measure
    is taken in the worker as well, so it decides as it does in process."""
    best = cfg(BLOCK=8, MODE="row", UNROLL=1)
    timer = WorkerLikeTimer({"aten": 1.0, **times({best: 0.5})}, eager={"aten": 1.0, best: kernel_eager_ms})
    e = run(ScaleFamily(), store, timer)
    assert (e.decided, e.host_ms, e.aten_host_ms) == (expect, kernel_eager_ms, 1.0)
    assert e.winner == ("aten" if expect == "host" else best)
    assert timer.calls.count("eager:" + best) == 1 and timer.calls.count("eager:aten") == 1
    assert timer.eager_fns == [None, None]   # nothing built in the parent: the worker makes the calls


def test_the_worker_server_times_the_bound_launch_eagerly():
    """The worker's ``eager`` request runs the timer's eager measure on the family's bound launch (a
    configuration) or its reference ("aten"), and answers None where the timer has none."""
    from torchtune_ops.tuning import worker

    family = ScaleFamily()
    bound = []
    family.bound_launch = lambda config, problem, inputs: bound.append(config.to_json()) or (
        lambda: family.launch(config, problem, inputs))
    server = worker._Server()
    server.family, server.problem, server.inputs = family, PROBLEM, family.make_inputs(PROBLEM, "cpu")
    best = cfg(BLOCK=8, MODE="row", UNROLL=1)
    server.timer = FakeTimer({}, eager={"aten": 2.0, best: 0.25})
    assert server.eager({"key": best})["timing"][0] == 0.25
    assert server.eager({"key": "aten"})["timing"][0] == 2.0
    assert bound == [best] and server.timer.calls == ["eager:" + best, "eager:aten"]
    server.timer = FakeTimer({"aten": 1.0})      # no eager measure
    assert server.eager({"key": "aten"})["timing"] is None
