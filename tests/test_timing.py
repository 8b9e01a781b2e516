"""Timing (real CPU timer, CUDA timer on a GPU, the fake) and device fingerprints."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from torchtune_ops.storage import device as device_mod
from torchtune_ops.storage.device import Fingerprint, compatible, fingerprint, incompatibility, kernel_source_version
from torchtune_ops.kernels.base import Config
from torchtune_ops.tuning.timing import FakeTimer, Timing, benchmark, key_of, make_timer


# ------------------------------------------------------------------------------------------------ Timing

def test_timing_from_samples_quantiles():
    t = Timing.from_samples([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.median_ms, t.min_ms, t.n) == (3.0, 1.0, 5)
    assert t.p20_ms == pytest.approx(1.8) and t.p80_ms == pytest.approx(4.2)
    assert t.spread == pytest.approx((4.2 - 1.8) / 3.0)


def test_timing_single_sample_and_exact():
    t = Timing.from_samples([2.5])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.spread) == (2.5, 2.5, 2.5, 0.0)
    e = Timing.exact(2.0, spread=0.1)
    assert (e.p20_ms, e.p80_ms) == (1.9, 2.1) and e.spread == pytest.approx(0.1)
    with pytest.raises(ValueError):
        Timing.from_samples([])


# ------------------------------------------------------------------------------------------------ CPU timer

def test_cpu_benchmark_counts_and_measures():
    calls = []

    def work():
        calls.append(1)
        time.sleep(0.002)

    t = benchmark(work, warmup_ms=0, rep_ms=20, device="cpu", min_reps=3, max_reps=50)
    assert 3 <= t.n <= 10 and len(calls) == 1 + t.n  # one warm-up call, then the repetitions
    assert 1.9 <= t.min_ms <= t.p20_ms <= t.median_ms <= t.p80_ms
    assert t.median_ms < 500


def test_cpu_benchmark_respects_max_reps_and_warmup():
    calls = []
    t = benchmark(lambda: calls.append(1), warmup_ms=1, rep_ms=1000, device="cpu", max_reps=7)
    assert t.n == 7 and len(calls) >= 1 + 7


def test_benchmark_propagates_the_first_error():
    def broken():
        raise RuntimeError("does not compile")

    with pytest.raises(RuntimeError):
        benchmark(broken, device="cpu")


def test_make_timer_on_cpu_times_a_matmul():
    a = torch.randn(31, 17)
    timer = make_timer("cpu")
    t = timer(lambda: a @ a.T, key="aten")
    assert isinstance(t, Timing) and t.median_ms > 0 and t.n >= 1


@pytest.mark.gpu
def test_cuda_benchmark_orders_small_and_large_matmuls():
    small = torch.randn(64, 64, device="cuda")
    large = torch.randn(2048, 2048, device="cuda")
    ts = benchmark(lambda: small @ small, device="cuda", rep_ms=20)
    tl = benchmark(lambda: large @ large, device="cuda", rep_ms=20)
    assert ts.n >= 3 and tl.n >= 3
    assert 0 < ts.median_ms < tl.median_ms


# ------------------------------------------------------------------------------------------------ FakeTimer

def test_fake_timer_returns_times_per_key_and_runs_fn():
    ran = []
    cfg = Config.of(BLOCK_M=64, num_warps=4)
    timer = FakeTimer({"aten": 1.0, cfg: 0.5, '{"BLOCK_M":32,"num_warps":4}': 0.7}, spread=0.2)
    assert timer(lambda: ran.append("a"), key="aten").median_ms == 1.0
    assert timer(lambda: ran.append("b"), key=cfg.to_json()).median_ms == 0.5
    t = timer(lambda: ran.append("c"), key={"num_warps": 4, "BLOCK_M": 32})
    assert t.median_ms == 0.7 and t.spread == pytest.approx(0.2)
    assert ran == ["a", "b", "c"]
    assert timer.calls == ["aten", cfg.to_json(), '{"BLOCK_M":32,"num_warps":4}']


def test_fake_timer_sequences_default_and_missing():
    timer = FakeTimer({"x": [3.0, 2.0]}, default=9.0, run=False)
    assert [timer(lambda: 1 / 0, key="x").median_ms for _ in range(3)] == [3.0, 2.0, 2.0]
    assert timer(lambda: None, key="y").median_ms == 9.0
    with pytest.raises(KeyError):
        FakeTimer({})(lambda: None, key="z")


def test_fake_timer_lets_launch_errors_through_unrecorded():
    timer = FakeTimer({}, default=1.0)

    def fails():
        raise RuntimeError("out of resources")

    with pytest.raises(RuntimeError):
        timer(fails, key="k")
    assert timer.calls == []


def test_key_of():
    assert key_of("aten") == "aten"
    assert key_of({"b": 1, "a": True}) == '{"a":true,"b":1}' == key_of(Config.of(a=True, b=1))
    with pytest.raises(TypeError):
        key_of(3)


# ------------------------------------------------------------------------------------------------ fingerprints

def test_cpu_fingerprint_is_the_interpreters_and_cached():
    fp = fingerprint("cpu")
    assert fp is fingerprint(torch.device("cpu"))
    assert fp.interpreter and fp.capability == (0, 0) and fp.sm_count == 0
    assert fp.gpu.startswith("triton-interpreter")
    assert fp.torch == torch.__version__ and fp.triton not in ("", "none")
    assert fp.kernels == kernel_source_version() and len(fp.kernels) == 12
    for part in (fp.gpu, fp.torch, fp.triton, fp.kernels):
        assert part in fp.key


@pytest.mark.gpu
def test_cuda_fingerprint_describes_the_gpu():
    fp = fingerprint("cuda")
    p = torch.cuda.get_device_properties(0)
    assert (fp.gpu, fp.capability, fp.sm_count) == (p.name, (p.major, p.minor), p.multi_processor_count)
    assert not fp.interpreter and fp.key != fingerprint("cpu").key


def test_fingerprint_dict_round_trip_and_validation():
    fp = fingerprint("cpu")
    assert Fingerprint.from_dict(fp.to_dict()) == fp
    for bad in ({"gpu": "x"}, {**fp.to_dict(), "sm_count": -1}, {**fp.to_dict(), "capability": [9]},
                {**fp.to_dict(), "gpu": ""}, {**fp.to_dict(), "torch": 2.1}, {**fp.to_dict(), "sm_count": True}):
        with pytest.raises(ValueError):
            Fingerprint.from_dict(bad)


H100 = Fingerprint(gpu="NVIDIA H100 80GB HBM3", capability=(9, 0), sm_count=132, torch="2.11.0+cu128",
                   triton="3.6.0", kernels="0123456789ab")


@pytest.mark.parametrize("change, ok", [
    ({}, True),
    ({"torch": "2.11.1"}, True),            # patch version
    ({"torch": "2.11.0+cu126"}, True),      # local tag
    ({"triton": "3.6.1"}, True),
    ({"torch": "2.12.0"}, False),           # minor version
    ({"triton": "3.7.0"}, False),
    ({"gpu": "NVIDIA H100 PCIe"}, False),
    ({"capability": (9, 1)}, False),
    ({"sm_count": 114}, False),
    ({"kernels": "ba9876543210"}, False),
])
def test_compatible_rules(change, ok):
    other = dataclasses.replace(H100, **change)
    assert compatible(H100, other) is ok and compatible(other, H100) is ok
    reason = incompatibility(H100, other)
    assert (reason is None) is ok
    if not ok:
        assert next(iter(change)) in reason


def test_any_difference_changes_the_key():
    keys = {H100.key}
    for change in ({"torch": "2.11.1"}, {"triton": "3.6.1"}, {"gpu": "A100"}, {"capability": (8, 0)},
                   {"sm_count": 108}, {"kernels": "ffffffffffff"}):
        keys.add(dataclasses.replace(H100, **change).key)
    assert len(keys) == 7


def test_kernel_source_version_follows_the_sources(tmp_path, monkeypatch):
    (tmp_path / "gemm.py").write_text("x = 1\n")
    monkeypatch.setattr(device_mod, "_KERNELS_DIR", tmp_path)
    kernel_source_version.cache_clear()
    try:
        v1 = kernel_source_version()
        (tmp_path / "gemm.py").write_text("x = 2\n")
        kernel_source_version.cache_clear()
        v2 = kernel_source_version()
        (tmp_path / "conv.py").write_text("")
        kernel_source_version.cache_clear()
        v3 = kernel_source_version()
        assert len({v1, v2, v3}) == 3
    finally:
        monkeypatch.undo()
        kernel_source_version.cache_clear()
    assert kernel_source_version() == fingerprint("cpu").kernels
