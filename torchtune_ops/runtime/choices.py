"""The run-time state: what each key runs (``Choice``), the in-memory choices, counts and ``stats()``.

The hot path (``dispatch.py``) reads ``_memo``; the resolution of a new key (``resolve.py``) writes it under
``_lock``. Nothing here imports a higher layer.
"""
from __future__ import annotations

import logging
import threading
import warnings
from typing import Any, Callable

import torch

log = logging.getLogger("torchtune_ops")

class Choice:
    """What one key runs: ``fn`` (the kernel call or PyTorch's op) and what explain() shows."""

    __slots__ = ("fn", "op", "kernel", "source", "problem", "calls", "family", "problem_key", "aten",
                 "time_ms", "aten_ms", "trials", "strict", "decided")

    def __init__(self, fn: Callable, *, op: str, kernel: str, source: str, aten: Callable,
                 problem: Any = None, family: Any = None, problem_key: str | None = None,
                 time_ms: float | None = None, aten_ms: float | None = None, trials: int = 0,
                 decided: str = ""):
        self.fn = fn
        self.op = op
        self.kernel = kernel          # "aten" or the config string
        self.source = source          # unsupported | memory | store | tuned | untuned | failed | background
        #                               | predicted (zero-shot, perfmodel.py) | predicted-rejected
        self.problem = problem
        self.family = family
        self.problem_key = problem_key
        self.aten = aten
        self.calls = 0
        self.time_ms = time_ms
        self.aten_ms = aten_ms
        self.trials = trials
        self.strict = False           # re-raise kernel failures (the settings in force when resolved)
        self.decided = decided        # which time decided the tuned entry: "device", "host" or "" (store.Entry)


_memo: dict[tuple, Choice] = {}
_lock = threading.RLock()
_failed: set[tuple[str, str]] = set()   # (family, problem key) whose kernel raised: never retried
_counts: dict[str, dict[str, int]] = {}


def _count(op: str, what: str, n: int = 1) -> None:
    c = _counts.setdefault(op, {})
    c[what] = c.get(what, 0) + n


_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def stats() -> dict[str, Any]:
    """Per-op counts and the choice of every problem met in this process.

    Returns ``{"ops": {op: {"calls", "hits", "misses", <source>: n, "failures"}}, "problems": [...]}``;
    each problem row has op, shape, dtype, kernel ("aten" or the configuration), source (unsupported,
    store, tuned, untuned, failed, background, broadcast, invalid, too-large, claimed-elsewhere), calls and, when tuned, time_ms, aten_ms, trials and decided ("device": the GPU time chose,
    "host": the host-inclusive time of an eager call overruled it, "": not measured).
    """
    with _lock:
        ops: dict[str, dict[str, int]] = {op: dict(c) for op, c in _counts.items()}
        problems = []
        for key, c in _memo.items():
            o = ops.setdefault(c.op, {})
            o["calls"] = o.get("calls", 0) + c.calls
            problems.append({"op": c.op, "shape": _shape_text(key) + _layout_text(c.problem),
                             "dtype": str(key[1]).replace("torch.", ""),
                             "kernel": c.kernel, "source": c.source, "calls": c.calls, "time_ms": c.time_ms,
                             "aten_ms": c.aten_ms, "trials": c.trials, "decided": c.decided})
        for o in ops.values():
            o.setdefault("calls", 0)
            o["hits"] = max(o["calls"] - o.get("misses", 0), 0)
    return {"ops": ops, "problems": problems}


def _layout_text(problem: Any) -> str:
    """A note such as " (row, col)" for GEMM operands that are not both row-major; empty otherwise."""
    la, lb = getattr(problem, "a_layout", "row"), getattr(problem, "b_layout", "row")
    if la == "row" and lb == "row":
        return ""
    return f" ({la}, {lb})"


def _shape_text(key: tuple) -> str:
    shapes = [tuple(x) for x in key if isinstance(x, torch.Size)]
    return " x ".join("[" + ",".join(str(d) for d in s) + "]" for s in shapes)


