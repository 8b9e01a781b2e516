"""Measuring kernels: one CUDA timer, one CPU timer, one fake, all behind the same call.

A *timer* is any callable ``timer(fn, *, key) -> Timing``: it runs ``fn`` (a no-argument closure that
launches one kernel) enough times to measure it and returns the summary; its optional ``eager`` method
measures calls back to back without flushing (``benchmark_eager``), the host's cost of a call included. ``key`` names what is measured
("aten" or a configuration's JSON); real timers ignore it, ``FakeTimer`` uses it to return predetermined
times, so the tuner's tests and the replay benchmarks are exact and fast.

    from torchtune_ops.tuning.timing import benchmark, make_timer
    t = benchmark(lambda: a @ b, device="cuda")          # Timing(median_ms=..., p20_ms=..., ...)
    timer = make_timer("cuda"); timer(lambda: a @ b, key="aten")

On CUDA the method is Triton's ``do_bench``'s: CUDA events around each repetition, the L2 cache flushed
before each one by writing a 256 MB buffer, warm-up and repetition budgets in milliseconds, then the
median. It is re-implemented here (a few lines) because ``do_bench``'s return options differ between the
Triton versions we support and we need the raw samples for the noise estimate. On CPU (kernels through
the Triton interpreter) ``time.perf_counter`` is used the same way, without a flush.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

__all__ = ["Timing", "Timer", "benchmark", "benchmark_eager", "make_timer", "FakeTimer", "L2_FLUSH_BYTES"]

#: bytes written between CUDA repetitions to evict the L2 cache (larger than any current GPU's L2)
L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Timing:
    """Summary of repeated measurements of one kernel, in milliseconds.

    ``spread`` is the relative width of the middle 60% of the samples, (p80 - p20) / median: the noise
    the tuner must see a winner beat.
    """

    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    n: int

    @property
    def spread(self) -> float:
        if not self.median_ms > 0 or not math.isfinite(self.median_ms):
            return 0.0
        return (self.p80_ms - self.p20_ms) / self.median_ms

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> "Timing":
        """Summarise raw per-repetition times (ms); at least one sample."""
        if not samples:
            raise ValueError("no timing samples")
        s = sorted(float(x) for x in samples)
        return cls(median_ms=_quantile(s, 0.5), p20_ms=_quantile(s, 0.2), p80_ms=_quantile(s, 0.8),
                   min_ms=s[0], n=len(s))

    @classmethod
    def exact(cls, ms: float, *, spread: float = 0.0, n: int = 1) -> "Timing":
        """A timing of ``ms`` whose p20/p80 lie ``spread``/2 below/above it (for fakes)."""
        half = ms * spread / 2
        return cls(median_ms=ms, p20_ms=ms - half, p80_ms=ms + half, min_ms=ms - half, n=n)


def _quantile(sorted_samples: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted samples."""
    n = len(sorted_samples)
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_samples[lo] * (1 - frac) + sorted_samples[hi] * frac


class Timer(Protocol):
    """What the tuner calls to measure one candidate: ``timer(fn, key=...) -> Timing``. A timer may also
    have ``eager(fn, key=...) -> Timing | None``: the time of a call as a model run eagerly pays it, host
    cost included (``benchmark_eager``); the tuner then judges the final choice on both."""

    def __call__(self, fn: Callable[[], Any], *, key: str) -> Timing: ...


def benchmark(fn: Callable[[], Any], *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
              device: Any = None, min_reps: int = 3, max_reps: int = 1000,
              flush_l2: bool = True) -> Timing:
    """Time ``fn`` and return the summary of its repetitions.

    Args:
        fn: a no-argument callable launching the work once. Exceptions it raises propagate (the first
            call is the warm-up, so compile errors surface before any timing).
        warmup_ms: time spent running ``fn`` before measuring (default 25 ms; at least one call).
        rep_ms: time budget of the measured repetitions (default 100 ms); the count is estimated from
            the warm-up and clamped to ``[min_reps, max_reps]``.
        device: where ``fn`` runs. A CUDA device uses CUDA events and flushes L2; anything else (CPU,
            the Triton interpreter) uses ``time.perf_counter``. None (default) means CUDA when a GPU is
            available, else CPU.
        min_reps: fewest measured repetitions (default 3).
        max_reps: most measured repetitions (default 1000).
        flush_l2: on CUDA, write ``L2_FLUSH_BYTES`` before each repetition (default True), so every
            repetition starts with a cold L2 like a kernel inside a model.

    Returns:
        Timing: median, p20, p80, min (ms) and the number of repetitions.
    """
    dev = _resolve_device(device)
    if dev.type == "cuda":
        return _bench_cuda(fn, dev, warmup_ms, rep_ms, min_reps, max_reps, flush_l2)
    return _bench_cpu(fn, warmup_ms, rep_ms, min_reps, max_reps)


def benchmark_eager(fn: Callable[[], Any], *, device: Any = None, calls: int = 20, rep_ms: float = 20.0,
                    min_reps: int = 3, max_reps: int = 50) -> Timing:
    """Time ``fn`` as a model running eagerly calls it: ``calls`` back-to-back calls, no flush and no
    synchronisation between them, timed on the host's clock up to the device finishing; the host's cost
    of a call (Python, binding, launch) is included wherever it exceeds the device's time.

    Args:
        fn: a no-argument callable launching the work once.
        device: where ``fn`` runs (None: CUDA when available, else CPU).
        calls: calls per repetition (default 20).
        rep_ms: budget of the measured repetitions (default 20 ms), clamped to ``[min_reps, max_reps]``.
        min_reps, max_reps: fewest (default 3) and most (default 50) repetitions.

    Returns:
        Timing of one call (each sample is a repetition's time divided by ``calls``).
    """
    dev = _resolve_device(device)
    if dev.type == "cuda":
        import torch

        sync = torch.cuda.synchronize
    else:
        def sync() -> None:
            return None
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    first = (time.perf_counter() - t0) * 1e3
    n = max(min_reps, min(max_reps, int(rep_ms / max(first, 1e-6))))
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        samples.append((time.perf_counter() - t) * 1e3 / calls)
    return Timing.from_samples(samples)


def _resolve_device(device: Any):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _bench_cpu(fn, warmup_ms, rep_ms, min_reps, max_reps) -> Timing:
    t0 = time.perf_counter()
    fn()
    first = (time.perf_counter() - t0) * 1e3
    spent = first
    while spent < warmup_ms:
        t = time.perf_counter()
        fn()
        spent += (time.perf_counter() - t) * 1e3
    estimate = max(first, 1e-6)
    n = max(min_reps, min(max_reps, int(rep_ms / estimate)))
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return Timing.from_samples(samples)


_flush_buffers: dict = {}


def _flush_buffer(dev):
    import torch

    buf = _flush_buffers.get(dev)
    if buf is None:
        buf = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=dev)
        _flush_buffers[dev] = buf
    return buf


def _bench_cuda(fn, dev, warmup_ms, rep_ms, min_reps, max_reps, flush_l2) -> Timing:
    import torch

    if dev.index is None:  # one flush buffer per physical device, however it is named
        dev = torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(dev):
        flush = _flush_buffer(dev) if flush_l2 else None
        fn()  # compile and warm caches
        torch.cuda.synchronize()
        # estimate one call's time from 5 calls
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            if flush is not None:
                flush.zero_()
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end) / 5, 1e-4)
        for _ in range(max(1, int(warmup_ms / estimate))):
            fn()
        n = max(min_reps, min(max_reps, int(rep_ms / estimate)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            if flush is not None:
                flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return Timing.from_samples([s.elapsed_time(e) for s, e in zip(starts, ends)])


def make_timer(device: Any = None, *, warmup_ms: float | None = None, rep_ms: float | None = None,
               min_reps: int | None = None) -> Timer:
    """The real timer for ``device``: ``benchmark`` with budgets suited to tuning there.

    Args:
        device: the device kernels run on (None: CUDA when available, else CPU).
        warmup_ms: warm-up budget; default 10 ms on CUDA, 0 on CPU (one call only: interpreter
            launches are slow and their timings only rank, never decide, anything real).
        rep_ms: repetition budget; default 40 ms on CUDA, 10 ms on CPU.
        min_reps: fewest repetitions; default 5 on CUDA, 1 on CPU.
    """
    dev = _resolve_device(device)
    cuda = dev.type == "cuda"
    w = warmup_ms if warmup_ms is not None else (10.0 if cuda else 0.0)
    r = rep_ms if rep_ms is not None else (40.0 if cuda else 10.0)
    m = min_reps if min_reps is not None else (5 if cuda else 1)

    def timer(fn: Callable[[], Any], *, key: str = "") -> Timing:
        return benchmark(fn, warmup_ms=w, rep_ms=r, device=dev, min_reps=m)

    def eager(fn: Callable[[], Any], *, key: str = "") -> Timing:
        return benchmark_eager(fn, device=dev, rep_ms=r / 2)

    timer.eager = eager  # type: ignore[attr-defined]
    return timer


def key_of(what: Any) -> str:
    """The timer key of ``what``: a string as is, a Config (anything with ``to_json``) or a dict as
    canonical JSON."""
    if isinstance(what, str):
        return what
    if hasattr(what, "to_json"):
        return what.to_json()
    if isinstance(what, Mapping):
        return json.dumps(dict(what), sort_keys=True, separators=(",", ":"))
    raise TypeError(f"cannot make a timer key of {what!r}")


class FakeTimer:
    """A timer returning predetermined times per key, for tests and replays.

    Args:
        times: key -> milliseconds, or a sequence of milliseconds returned by successive calls for that
            key (the last repeats). Keys are "aten", Configs, dicts or config JSON strings.
        default: time for keys not in ``times``; None (default) raises KeyError for them.
        spread: relative noise reported with every timing (p80 - p20 over the median; default 0).
        run: call ``fn`` once before answering (default True), so a failing launch still raises.
        eager: key -> milliseconds per call with the host's cost included, answered by ``eager()``; None
            (default): ``eager()`` answers None (not measured). Keys missing there take their ``times``.

    ``calls`` lists the keys in the order they were timed (``eager:<key>`` for the eager measure).
    """

    def __init__(self, times: Mapping[Any, float | Sequence[float]], *, default: float | None = None,
                 spread: float = 0.0, run: bool = True, eager: Mapping[Any, float] | None = None) -> None:
        self.eager_times = None if eager is None else {key_of(k): float(v) for k, v in eager.items()}
        self.times = {key_of(k): v for k, v in times.items()}
        self.default = default
        self.spread = spread
        self.run = run
        self.calls: list[str] = []

    def __call__(self, fn: Callable[[], Any], *, key: str) -> Timing:
        k = key_of(key)
        if self.run:
            fn()
        if k in self.times:
            v = self.times[k]
        elif self.default is not None:
            v = self.default
        else:
            raise KeyError(f"FakeTimer has no time for {k}")
        if not isinstance(v, (int, float)):
            seq = list(v)
            v = seq[min(self.calls.count(k), len(seq) - 1)]
        self.calls.append(k)
        return Timing.exact(float(v), spread=self.spread)

    def eager(self, fn: Callable[[], Any], *, key: str) -> Timing | None:
        if self.eager_times is None:
            return None
        k = key_of(key)
        if self.run:
            fn()
        v = self.eager_times.get(k)
        if v is None:
            v = self.times[k] if k in self.times else self.default
            if not isinstance(v, (int, float)):
                v = list(v)[-1]
        self.calls.append("eager:" + k)
        return Timing.exact(float(v), spread=self.spread)
