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
                 "time_ms", "aten_ms", "trials", "strict", "graph", "decided", "live")

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
        self.graph = ""               # the compiled graph whose op call met the key ("" for a direct call)
        self.decided = decided        # which time decided the tuned entry: "device", "host" or "" (store.Entry)
        self.live = True              # False once it left ``_memo`` (replaced, forgotten, reset): call sites
        #                               that keep the choice itself (dispatch.py) look their key up again


_memo: dict[tuple, Choice] = {}
#: input-gradient keys of conv2d_grad_input -> their flipped conv2d problem (dispatch._GradInput)
_grad_input: dict[tuple, Any] = {}
_lock = threading.RLock()
_failed: set[tuple[str, str]] = set()   # (family, problem key) whose kernel raised: never retried
_counts: dict[str, dict[str, int]] = {}
#: calls of choices no longer in ``_memo`` (swapped, retried, not kept), per op and (source, kernel is aten)
_retired: dict[str, dict[tuple[str, bool], int]] = {}


def _count(op: str, what: str, n: int = 1) -> None:
    c = _counts.setdefault(op, {})
    c[what] = c.get(what, 0) + n


def _retire(c: Choice, calls: int | None = None) -> None:
    """Keep the calls of a choice leaving ``_memo`` (or never kept there) in ``stats()`` (under ``_lock``)."""
    c.live = False
    r = _retired.setdefault(c.op, {})
    k = (c.source, c.kernel == "aten")
    r[k] = r.get(k, 0) + (c.calls if calls is None else calls)


_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


#: the sources of a choice, in the order explain() shows them
SOURCES = ("store", "bundle", "tuned", "predicted", "retuning", "broadcast", "untuned", "background",
           "unsupported", "claimed-elsewhere", "too-large", "predicted-rejected", "invalid", "failed")


def stats() -> dict[str, Any]:
    """Per-op counts and the choice of every problem met in this process.

    Returns ``{"ops": {op: {...}}, "problems": [...]}``. Per op: ``calls``; ``misses`` (keys resolved) and
    ``hits`` (calls - misses); ``by_source``: the calls served by choices of each source (store, bundle,
    tuned, predicted, retuning, broadcast, untuned, background, unsupported, claimed-elsewhere, too-large,
    predicted-rejected, invalid, failed: where the choice came from, or why PyTorch's kernel serves it),
    which add up to ``calls``; ``aten_calls``: the calls PyTorch's kernel ran; ``<source>``: the keys
    resolved from each source (they add up to ``misses``); ``failures``: kernels that failed at run time.
    A call counts under its choice's source when ``stats()`` runs (a kernel that failed: "failed").
    Each problem row has op, graph (the compiled graph: optimize()'s model name and graph number, "" for a
    direct call), shape (convolutions: with stride, padding, dilation and groups), dtype, kernel ("aten"
    or the configuration), source, calls and, when tuned, time_ms, aten_ms, trials. ``decided``: "device" (the GPU time chose),
    "host" (the host-inclusive time of an eager call overruled it) or "" (not measured).
    """
    with _lock:
        ops: dict[str, dict[str, Any]] = {op: dict(c) for op, c in _counts.items()}
        for op in _retired:
            ops.setdefault(op, {})
        for o in ops.values():
            o["calls"], o["by_source"], o["aten_calls"] = 0, {}, 0

        def add(op: str, source: str, aten: bool, n: int) -> None:
            o = ops.setdefault(op, {"calls": 0, "by_source": {}, "aten_calls": 0})
            o["calls"] += n
            o["by_source"][source] = o["by_source"].get(source, 0) + n
            o["aten_calls"] += n if aten else 0

        problems = []
        for key, c in _memo.items():
            add(c.op, c.source, c.kernel == "aten", c.calls)
            problems.append({"op": c.op, "graph": c.graph,
                             "shape": _shape_text(key) + _layout_text(c.problem) + _conv_text(key),
                             "dtype": str(key[1]).replace("torch.", ""),
                             "kernel": c.kernel, "source": c.source, "calls": c.calls, "time_ms": c.time_ms,
                             "aten_ms": c.aten_ms, "trials": c.trials, "decided": c.decided})
        for op, r in _retired.items():
            for (source, aten), n in r.items():
                add(op, source, aten, n)
        for o in ops.values():
            o["hits"] = max(o["calls"] - o.get("misses", 0), 0)
    return {"ops": ops, "problems": problems}


def _conv_text(key: tuple) -> str:
    """" stride (2,1) padding (1,1) dilation (1,1) groups 1" for a conv2d key; empty otherwise."""
    if key[0] != "conv2d":
        return ""
    stride, padding, dilation, groups = key[10:14]
    return (f" stride ({','.join(map(str, stride))}) padding ({','.join(map(str, padding))}) "
            f"dilation ({','.join(map(str, dilation))}) groups {groups}")


def _dtypes(key: tuple) -> list[str]:
    """The distinct dtypes named in a key, e.g. ["int64"]."""
    seen = []
    for x in key:
        if isinstance(x, torch.dtype):
            name = str(x).replace("torch.", "")
            if name not in seen:
                seen.append(name)
    return seen


def _layout_text(problem: Any) -> str:
    """A note such as " (row, col)" for GEMM operands that are not both row-major; empty otherwise."""
    la, lb = getattr(problem, "a_layout", "row"), getattr(problem, "b_layout", "row")
    if la == "row" and lb == "row":
        return ""
    return f" ({la}, {lb})"


def _shape_text(key: tuple) -> str:
    shapes = [tuple(x) for x in key if isinstance(x, torch.Size)]
    return " x ".join("[" + ",".join(str(d) for d in s) + "]" for s in shapes)


