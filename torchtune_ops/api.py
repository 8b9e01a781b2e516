"""What users call: ``optimize(model)`` and ``explain()``.

    import torchtune_ops
    model = torchtune_ops.optimize(model, autotune=True)   # tune each new problem once, then cache it
    model(x)
    torchtune_ops.explain()                                 # which kernel every problem ran
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Any, TextIO

import torch

from . import settings

__all__ = ["optimize", "explain", "explain_text"]


def optimize(model_or_fn: Any, *, autotune: bool | str | None = None, cache_dir: str | os.PathLike | None = None,
             max_trials: int | None = None, time_budget_s: float | None = None, dynamic: bool | None = None,
             compiler: str = "inductor", fullgraph: bool = False, bucket: str | None = None,
             strict: bool | None = None, mode: str | None = None, **compile_kwargs: Any) -> Any:
    """Compile ``model_or_fn`` so that its matmuls and convolutions run tuned Triton kernels.

    The result is ``torch.compile(model_or_fn, backend=<torchtune_ops backend>)``: a module's parameters,
    buffers, ``state_dict`` and attributes are the original's. Arguments given here take precedence over
    the ``TORCHTUNE_OPS_*`` environment variables, for this model only (they travel with its graphs).

    Args:
        model_or_fn: an ``nn.Module`` or a function.
        autotune: True/"on" tunes each problem the first time it appears on a device (blocking), "background"
            serves PyTorch's kernel while a thread tunes, False/"off" never tunes; None (default): the
            environment's ``TORCHTUNE_OPS_AUTOTUNE`` (off unless set).
        cache_dir: directory of the tuning cache; None (default): ``TORCHTUNE_OPS_CACHE_DIR`` or the user
            cache directory.
        max_trials: most configurations measured per problem; None (default): ``TORCHTUNE_OPS_MAX_TRIALS``.
        time_budget_s: most seconds of tuning per problem; None (default): ``TORCHTUNE_OPS_TIME_BUDGET``.
        dynamic: torch.compile's ``dynamic`` (True: compile once for varying sizes; tuning still happens per
            real shape at run time). Default None (PyTorch's automatic dynamic shapes).
        compiler: "inductor" (default) compiles everything else with Inductor; "eager" runs the AOT graphs
            as Python (fast compiles, for debugging and tests).
        fullgraph: torch.compile's ``fullgraph`` (default False).
        bucket: "pow2" tunes GEMMs with M rounded up to a power of two (many batch sizes share a tuned
            configuration); None (default): ``TORCHTUNE_OPS_BUCKET``.
        strict: True raises kernel failures instead of falling back to PyTorch; None: ``TORCHTUNE_OPS_STRICT``.
        mode: torch.compile's mode ("reduce-overhead" uses CUDA graphs); default None.
        **compile_kwargs: further ``torch.compile`` arguments; ``options`` is merged into the backend's
            options (Inductor config patches).

    Returns:
        The compiled module or function. With ``TORCHTUNE_OPS_DISABLE=1`` it is plain ``torch.compile``
        (Inductor or AOT eager), with no custom op in its graphs.
    """
    # one validation for every source (settings.check): a bad value fails here, not at the first call
    overrides = settings.validated(autotune=autotune, cache_dir=cache_dir, max_trials=max_trials,
                                   time_budget=time_budget_s, bucket=bucket, strict=strict)
    options = dict(compile_kwargs.pop("options", None) or {})
    options["compiler"] = compiler
    options["settings"] = overrides
    options["graph"] = _model_name(model_or_fn)
    if compiler not in ("inductor", "eager"):
        raise settings.SettingsError(f"compiler must be 'inductor' or 'eager', got {compiler!r}")
    from .runtime.backend import torchtune_ops_backend

    def backend(gm, example_inputs):
        return torchtune_ops_backend(gm, example_inputs, mode=mode, options=options)

    backend.__name__ = "torchtune_ops"
    compiled = torch.compile(model_or_fn, backend=backend, dynamic=dynamic, fullgraph=fullgraph, **compile_kwargs)
    if isinstance(model_or_fn, torch.nn.Module) and type(compiled) is _optimized_module_type():
        compiled.__class__ = _tuned_module_type()
    return compiled


_names: dict[str, int] = {}
_names_lock = threading.Lock()


def _model_name(model_or_fn: Any) -> str:
    """``<class or function name>#<n>``: the n-th optimize() of that name in this process (explain() rows
    carry it, with the graph's number, to tell models apart)."""
    base = type(model_or_fn).__name__ if isinstance(model_or_fn, torch.nn.Module) else \
        getattr(model_or_fn, "__name__", type(model_or_fn).__name__)
    with _names_lock:
        _names[base] = n = _names.get(base, 0) + 1
    return f"{base}#{n}"


def _optimized_module_type() -> type:
    from torch._dynamo.eval_frame import OptimizedModule

    return OptimizedModule


_TUNED: list[type] = []


def _tuned_module_type() -> type:
    """torch.compile's OptimizedModule whose state_dict and named parameters/buffers are the original's
    (no ``_orig_mod.`` prefix), so checkpoints move freely between the original and the optimized model."""
    if not _TUNED:
        base = _optimized_module_type()

        class TunedModule(base):  # type: ignore[misc, valid-type]
            def state_dict(self, *args, **kwargs):
                return self._orig_mod.state_dict(*args, **kwargs)

            def load_state_dict(self, *args, **kwargs):
                return self._orig_mod.load_state_dict(*args, **kwargs)

            def named_parameters(self, *args, **kwargs):
                return self._orig_mod.named_parameters(*args, **kwargs)

            def named_buffers(self, *args, **kwargs):
                return self._orig_mod.named_buffers(*args, **kwargs)

        TunedModule.__module__ = __name__
        _TUNED.append(TunedModule)
    return _TUNED[0]


def explain_text() -> str:
    """The text ``explain()`` prints: what was intercepted (and left to PyTorch, with why) at compile time;
    per op its calls split by where their choice came from (the columns add up to ``calls``) and how many
    ran PyTorch's kernel; then per problem its graph, shape, kernel and source."""
    from .runtime import backend, dispatch
    from .runtime.choices import SOURCES

    st = dispatch.stats()
    lines = []
    counts = {k: v for k, v in backend.intercepted().items() if not k.startswith("skipped:")}
    if counts:
        lines.append("intercepted at compile time: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    for why, n in sorted(backend.passthrough().items()):
        lines.append(f"left to Inductor unchanged: {n} graph{'s' if n != 1 else ''} ({why}; no kernel of ours "
                     "could run there)")
    for why, n in sorted(backend.skipped().items()):
        lines.append(f"left to PyTorch at compile time: {why} (x{n})")
    used = [s for s in SOURCES if any(c["by_source"].get(s) for c in st["ops"].values())]
    used += sorted({s for c in st["ops"].values() for s in c["by_source"] if s not in SOURCES and c["by_source"][s]})
    if st["ops"]:
        lines.append("calls per op, by where their choice came from (" + " + ".join(used or ["-"]) + " = calls):")
        head = f"{'op':<9} {'calls':>8} {'hits':>8} {'misses':>7} " + " ".join(f"{s:>{max(7, len(s))}}" for s in used)
        lines.append(head + f" {'PyTorch':>8}")
        for op, c in sorted(st["ops"].items()):
            cols = " ".join(f"{c['by_source'].get(s, 0):>{max(7, len(s))}}" for s in used)
            lines.append(f"{op:<9} {c['calls']:>8} {c['hits']:>8} {c.get('misses', 0):>7} {cols} "
                         f"{c['aten_calls']:>8}")
    from .tuning.perfmodel import prior_notes

    for fp, note in sorted(prior_notes().items()):
        lines.append(f"performance prior on {fp.split('|', 1)[0]}: {note}")
    if st["problems"]:
        lines.append("")
        lines.append(f"{'op':<9} {'graph':<14} {'dtype':<9} {'shape':<40} {'source':<12} {'calls':>7} {'decided':<8} kernel")
        for p in st["problems"]:
            lines.append(f"{p['op']:<9} {p['graph'] or '-':<14} {p['dtype']:<9} {p['shape']:<40} "
                         f"{p['source']:<12} {p['calls']:>7} {p.get('decided') or '-':<8} {p['kernel']}")
    return "\n".join(lines)


def explain(*, file: TextIO | None = None, print_it: bool = True) -> dict[str, Any]:
    """Print (to ``file``, default stdout) and return what the intercepted ops did in this process.

    Args:
        file: where to print; None (default): sys.stdout.
        print_it: False returns the data without printing (default True).

    Returns:
        ``{"intercepted": {...}, "skipped": {...}, "passthrough": {...}, "ops": {...}, "problems": [...]}``: the compile-time
        interception counts under the run-time op names (``backend.intercepted()``), why ops were left to
        PyTorch at compile time (``backend.skipped()``), the graphs left to Inductor unchanged because
        no Triton kernel can run on their devices, by reason (``backend.passthrough()``), per-op run-time counts (calls; ``by_source``: the
        calls of each source, which add up to calls; ``aten_calls``; hits, misses and the keys resolved
        per source; see ``runtime.choices.stats``) and one row per problem (op, graph, shape, dtype,
        kernel: "aten" or the configuration, source, calls, times, trials and which time decided when tuned);
        ``"prior"``: per device fingerprint the shipped GEMM prior used, and which GPU's data it rests on.
    """
    from .runtime import backend, dispatch

    data = dict(dispatch.stats())
    data["intercepted"] = backend.intercepted()
    data["passthrough"] = backend.passthrough()
    data["skipped"] = backend.skipped()
    from .tuning.perfmodel import prior_notes

    data["prior"] = prior_notes()
    if print_it:
        print(explain_text(), file=file or sys.stdout)
    return data
