"""Resolving a key met for the first time: which kernel a custom op runs for the tensors in front of it.


``_resolve`` runs once per key and process (the hot path is ``dispatch.py``): inputs the kernels do not cover (integer, bool, complex and float64 dtypes,
zero-size or malformed problems, devices where Triton cannot run: CPU tensors without TRITON_INTERPRET=1,
MPS, ...) get PyTorch's kernel; otherwise the family's problem is built (M rounded up to a power of two
with ``bucket="pow2"``), looked up in the on-disk store under the device fingerprint, and, when missing
there and tuning is switched on, tuned now (``autotune="on"``) or in a background thread
(``autotune="background"``: PyTorch's kernel serves the op until the winner is swapped in). A tuned
configuration is used only if its entry says it beat PyTorch's kernel. With tuning off, an unseen problem
may run the performance model's predicted configuration (perfmodel.py, docs/perfmodel.md) when the model is
confident; it is checked against PyTorch's output (and, on CUDA, its time) at its first call and kept in
memory only.

Never worse than PyTorch: a kernel that raises at run time is replaced by PyTorch's kernel for that problem
with one warning (``strict`` re-raises); inputs PyTorch itself rejects raise PyTorch's own error.

Under CUDA graph capture nothing is tuned and no Python state changes: a problem not already in memory runs
PyTorch's kernel. Under an initialized torch.distributed process group, rank 0 decides each new problem
(store or tuning) and broadcasts the choice, so every rank runs the same kernel.

``stats()`` reports per-op counts and the kernel of every problem; ``reset()`` forgets the memory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Callable

import torch

from .. import settings
from ..errors import TorchTuneOpsError, UnsupportedProblem

from .choices import (Choice, _count, _counts, _dtypes, _failed, _grad_input, _layout_text, _lock, _memo,
                      _retire, _retired, _shape_text, _warn_once, _warned)
from .aten import aten_for
from .launch import _capturing, _kernel_fn, _plain, _predict, _predicted_choice

log = logging.getLogger("torchtune_ops")

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ---------------------------------------------------------------------------------------------------------
# Resolving a key (once per key and process).

def _decode_opts(opts: str) -> tuple[dict[str, Any], str]:
    """(settings overrides, graph name) of an ``opts`` string (see ``encode_opts``)."""
    if not opts:
        return {}, ""
    try:
        data = json.loads(opts)
    except ValueError:
        return {}, ""
    if not isinstance(data, dict):
        return {}, ""
    graph = data.pop(_GRAPH, "")
    return data, graph if isinstance(graph, str) else ""


_GRAPH = "graph"  # the key of the compiled graph's name in opts (not a setting)


def encode_opts(overrides: dict[str, Any], *, graph: str | None = None) -> str:
    """The ``opts`` string the backend writes into each op call: settings overrides as canonical JSON
    (values that are None are dropped; "" when nothing is overridden), with the compiled graph's name
    under "graph" when given (explain() shows it)."""
    kept = {k: v for k, v in overrides.items() if v is not None}
    if graph:
        kept[_GRAPH] = graph
    return json.dumps(kept, sort_keys=True, separators=(",", ":")) if kept else ""


def _triton_usable(device: torch.device) -> bool:
    """True when Triton kernels can run on ``device`` (CUDA, or CPU through the interpreter)."""
    if device.type not in ("cuda", "cpu"):
        return False
    try:
        from ..kernels import _compat
    except ImportError:
        return False
    if device.type == "cpu":
        return bool(_compat.INTERPRET)
    return True


def _resolve(key: tuple, op: str, args: tuple, opts: str) -> Choice:
    aten = aten_for(op, args)
    device = args[1].device if op in ("addmm", "baddbmm") else args[0].device
    overrides, graph = _decode_opts(opts)
    if not _plain(args, device):
        # Tensors on several devices (PyTorch accepts a meta tensor beside CPU ones) or a lazy view share the
        # key of the well-formed calls, so their choice must not be remembered for them: PyTorch's kernel,
        # for this call only (counted here: the choice is not kept).
        c = Choice(aten, op=op, kernel="aten", source="unsupported", aten=aten,
                   problem="tensors on different devices, or a negative or conjugate view")
        c.graph = graph
        with _lock:
            _count(op, "misses")
            _count(op, c.source)
            _retire(c, calls=1)
        return c
    capturing = _capturing(device)
    with settings.override(**overrides):
        s = settings.current()
        strict = s.strict
        try:
            choice = _decide(op, args, device, aten, capturing)
        except UnsupportedProblem as e:
            choice = Choice(aten, op=op, kernel="aten", source="unsupported", aten=aten)
            choice.problem = str(e)
            if s.record and not capturing:
                _warn_once(("record-unsupported",),
                           f"torchtune_ops: TORCHTUNE_OPS_RECORD={s.record}: {op} {_shape_text(key)} "
                           f"({', '.join(_dtypes(key))}) is not recorded: {e}. Only problems the kernels cover "
                           "are recorded (this warning is shown once per process)")
        except KeyboardInterrupt:
            raise
        except Exception as e:  # resolving must never take the model down (strict mode re-raises)
            if strict:
                raise
            _warn_once(("resolve", op, type(e).__name__),
                       f"torchtune_ops: could not resolve {op} ({type(e).__name__}: {e}); using PyTorch's kernel")
            choice = Choice(aten, op=op, kernel="aten", source="failed", aten=aten)
    choice.graph = graph
    if capturing:
        return choice          # no Python state change inside a CUDA graph capture
    with _lock:
        _count(op, "misses")
        _count(op, choice.source)
        old = _memo.get(key)
        if old is not None:    # another thread resolved the key meanwhile: keep its calls counted
            _retire(old)
        _memo[key] = choice
    if choice.source == "claimed-elsewhere":
        _retry_later(key, choice)
    if not _logging_ready:
        _configure_logging()
    if log.isEnabledFor(logging.INFO):
        log.info("torchtune_ops: %s %s%s -> %s (%s)", op, _shape_text(key), _layout_text(choice.problem),
                 choice.kernel, choice.source)
    return choice


_logging_ready = False


def _configure_logging() -> None:
    """Apply TORCHTUNE_OPS_LOG to the 'torchtune_ops' logger once per process (INFO shows every choice;
    a stderr handler is added when the application configured none)."""
    global _logging_ready
    _logging_ready = True
    level = getattr(logging, settings.current().log, logging.WARNING)
    log.setLevel(level)
    if level < logging.WARNING and not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


def _family_and_problem(op: str, args: tuple, s: settings.Settings):
    """(family, problem, launch) for the kernels; UnsupportedProblem when they do not cover the inputs."""
    tensors = [t for t in args if isinstance(t, torch.Tensor)]
    dtype = tensors[0].dtype
    if dtype not in _SUPPORTED_DTYPES or any(t.dtype != dtype for t in tensors):
        raise UnsupportedProblem(f"dtype {dtype} (kernels cover float16, bfloat16, float32, all alike)")
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise UnsupportedProblem("tensors on different devices")
    if not _triton_usable(device):
        raise UnsupportedProblem(f"Triton cannot run on {device} here")
    if any(t.numel() == 0 for t in tensors):
        raise UnsupportedProblem("zero-size tensor")
    if op in ("addmm", "baddbmm") and args[4] == 0:
        raise UnsupportedProblem("alpha = 0: PyTorch's kernel ignores the product, NaN and Inf included")
    try:
        if op == "conv2d":
            from ..kernels import conv as kconv
            x, w, bias, stride, padding, dilation, groups = args
            if x.dim() != 4 or w.dim() != 4:
                raise UnsupportedProblem("conv2d needs 4-D input and weight")
            problem = kconv.conv_problem(x, w, bias=bias, stride=tuple(stride), padding=tuple(padding),
                                         dilation=tuple(dilation), groups=groups)
            return kconv.CONV2D, problem, kconv.conv2d
        from ..kernels import gemm as kgemm
    except ImportError as e:
        raise UnsupportedProblem(f"kernels not available: {e}") from None
    if op in ("mm", "bmm"):
        a, b = args
        bias, activation = None, "none"
    elif op in ("addmm", "baddbmm"):
        bias, a, b = args[0], args[1], args[2]
        activation = "none"
    else:
        a, b, bias, activation = args
    want = 3 if op.startswith("b") else 2
    if a.dim() != want or b.dim() != want or a.shape[-1] != b.shape[-2]:
        raise UnsupportedProblem("malformed matmul")
    name = ("mm" if bias is None else "addmm") if op == "mm_act" else op
    problem = kgemm.gemm_problem(a, b, bias=bias, activation=activation, op=name)
    return kgemm.GEMM, problem, kgemm.gemm


def _bucketed(family: Any, problem: Any, s: settings.Settings) -> Any:
    """With ``bucket="pow2"``, the GEMM problem with M rounded up to a power of two (the key tuned and
    looked up; the kernel still runs at the real M)."""
    if s.bucket != "pow2" or family.name != "gemm" or not dataclasses.is_dataclass(problem):
        return problem
    m = int(problem.M)
    p = 1
    while p < m:
        p <<= 1
    return dataclasses.replace(problem, M=p) if p != m else problem


def _problem_key(family: Any, problem: Any) -> str:
    from ..storage.store import problem_key

    return problem_key(family.problem_to_dict(problem))


def _open_store(s: settings.Settings):
    """The store of the settings in force (call inside their override)."""
    from ..storage.store import default_store

    return default_store()


def _decide(op: str, args: tuple, device: torch.device, aten: Callable, capturing: bool) -> Choice:
    s = settings.current()
    family, problem, launch = _family_and_problem(op, args, s)
    problem = _bucketed(family, problem, s)
    pkey = _problem_key(family, problem)
    base = dict(op=op, aten=aten, problem=problem, family=family, problem_key=pkey)
    if (family.name, pkey) in _failed:
        return Choice(aten, kernel="aten", source="failed", **base)
    if capturing:
        return Choice(aten, kernel="aten", source="untuned", **base)
    from ..storage.device import fingerprint

    fp = fingerprint(device).key
    entry, source = _lookup_or_tune(family, problem, pkey, fp, device, s)
    if source == "predicted":
        return _predicted_choice(op, launch, entry, base, device, s)
    if entry is None:
        if s.tuning and s.autotune == "background":
            return Choice(aten, kernel="aten", source="background", **base)
        return Choice(aten, kernel="aten", source="untuned", **base)
    info = dict(time_ms=getattr(entry, "time_ms", None), aten_ms=getattr(entry, "aten_ms", None),
                trials=_ntrials(entry), decided=getattr(entry, "decided", ""))
    winner = entry.winner
    if not _beats_aten(entry):
        return Choice(aten, kernel="aten", source=source, **base, **info)
    from ..kernels.base import Config

    config = Config.from_json(winner) if isinstance(winner, str) else winner
    why = _invalid(family, problem, config, device)
    if why is not None:  # a cache row is untrusted data: only a valid configuration of ours may run
        _warn_once(("invalid", family.name, pkey), f"torchtune_ops: ignoring the cached {family.name} "
                   f"configuration for {problem}: {why}; using PyTorch's kernel")
        return Choice(aten, kernel="aten", source="invalid", **base, **info)
    c = Choice(aten, kernel=str(config), source=source, **base, **info)
    c.strict = s.strict
    c.fn = _kernel_fn(op, launch, config, c, device)
    return c


def _invalid(family: Any, problem: Any, config: Any, device: torch.device) -> str | None:
    """Why ``config`` is not one of ``family``'s valid configurations for ``problem`` here, or None
    (the same validation as a bundle's entries)."""
    from ..storage.bundles import check_config
    from ..errors import BundleError
    from ..kernels.base import device_limits

    try:
        check_config(family.name, config.as_dict(), problem, device_limits(device), "cache entry")
    except BundleError as e:
        return str(e)
    return None


def _ntrials(entry: Any) -> int:
    t = getattr(entry, "trials", 0)
    return len(t) if isinstance(t, (list, tuple)) else int(t or 0)


def _lookup_or_tune(family, problem, pkey: str, fp: str, device: torch.device, s: settings.Settings):
    """(entry or None, source). Under torch.distributed rank 0 decides and broadcasts."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _lookup_or_tune_distributed(family, problem, pkey, fp, device, s)
    return _lookup_or_tune_local(family, problem, pkey, fp, device, s)


def _found(family, problem, pkey: str, fp: str, s: settings.Settings):
    """(store or None, [(entry, "store" | "bundle")], the entries final for the settings ``s``): with tuning
    on, an answer tuned with a smaller budget than asked now (or untuned) is tuned again, so not final."""
    store = None
    try:
        store = _open_store(s)
        entry = store.get(fp, family.name, pkey)
    except (TorchTuneOpsError, OSError) as e:
        _warn_once(("store", s.cache_dir), f"torchtune_ops: cache unavailable ({e}); using memory only")
        entry = None
    shipped = _bundle_entry(family, problem, fp, s)
    found = [(e, src) for e, src in ((entry, "store"), (shipped, "bundle")) if e is not None]
    enough = [f for f in found if not s.tuning or f[0].covers(s.max_trials, s.time_budget)]
    return store, found, enough


def _beats_aten(entry: Any) -> bool:
    """Whether a tuned entry's winner is a configuration of ours that beat PyTorch's kernel."""
    time_ms, aten_ms = getattr(entry, "time_ms", None), getattr(entry, "aten_ms", None)
    return entry.winner != "aten" and time_ms is not None and aten_ms is not None and time_ms < aten_ms


def decided_aten(op: str, args: tuple, opts: str) -> str | None:
    """At compile time: why PyTorch's kernel is already the final choice of an op call, or None where our
    op must stay in the graph.

    Args:
        op: our op's run-time name ("mm", "addmm", "mm_act", "conv2d", ...).
        args: its arguments as the run-time dispatch would see them (fake tensors of the graph, static
            shapes), without ``opts``.
        opts: the op's ``opts`` string (settings overrides).

    Read-only, as ``_resolve`` would decide but without tuning, prediction or writes: a problem the
    kernels do not cover, a store or bundle entry that is final for the settings in force (with tuning
    on, one tuned with at least the budget asked now) and whose winner is PyTorch's kernel, or a miss
    with tuning off, nothing to record and no confident performance model. A miss otherwise (tuned
    at its first call, predicted or recorded), an entry to be tuned again (in the background or not), a
    Triton winner, dynamic shapes, torch.distributed (rank 0 decides at run time) and any failure of the
    lookup keep our op. The in-process memory is not read: its decided choices come from the store and
    bundles (tuned entries are stored); the rest (predicted, untuned, claimed by another process) is not
    final.
    """
    try:
        tensors = [t for t in args if isinstance(t, torch.Tensor)]
        if not tensors or not all(isinstance(d, int) for t in tensors for d in (*t.shape, *t.stride())):
            return None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return None
        overrides, _graph = _decode_opts(opts)
        with settings.override(**overrides):
            s = settings.current()
            if s.disable:
                return None
            try:
                family, problem, _launch = _family_and_problem(op, args, s)
            except UnsupportedProblem as e:
                return f"the kernels do not cover it: {e}"
            problem = _bucketed(family, problem, s)
            pkey = _problem_key(family, problem)
            from ..storage.device import fingerprint

            fp = fingerprint(tensors[0].device).key
            store, found, enough = _found(family, problem, pkey, fp, s)
            if not enough:
                return _untuned_is_final(family, tensors[0].device, fp, store, found, s)
            entry, src = min(enough, key=lambda f: f[0].time_ms)
            if _beats_aten(entry):
                return None
            return f"PyTorch's kernel is the cached winner ({'shipped bundle' if src == 'bundle' else 'store'})"
    except KeyboardInterrupt:
        raise
    except Exception:  # compile-time resolution is an optimisation: keep our op, as before it
        return None


def _untuned_is_final(family, device, fp: str, store, found: list, s: settings.Settings) -> str | None:
    """A miss that PyTorch's kernel serves for the whole process, as its first call would find: tuning
    off, nothing to record, and no confident performance model to predict a kernel of ours."""
    if found or s.tuning or s.record:
        return None
    if s.perfmodel and store is not None:
        from ..kernels.base import device_limits
        from ..tuning import perfmodel

        model = perfmodel.model_with_prior(store, fp, family.name, limits=device_limits(device), reuse=True)
        if model is not None and model.confident():
            return None
    return "tuning is off and nothing is cached for it: PyTorch's kernel serves (TORCHTUNE_OPS_AUTOTUNE tunes)"


def _lookup_or_tune_local(family, problem, pkey, fp, device, s):
    store, found, enough = _found(family, problem, pkey, fp, s)
    if enough:
        return min(enough, key=lambda f: f[0].time_ms)  # the store's on a tie
    if found and s.autotune == "background":  # serve the answer we have while a better one is sought
        _background().submit(family, problem, pkey, device, s)
        return min(found, key=lambda f: f[0].time_ms)[0], "retuning"
    if s.record:  # deployment: remember the unseen problem for offline tuning (record.py)
        from ..storage import record

        record.note(family.name, family.problem_to_dict(problem), key=pkey)
    if not s.tuning:
        if s.perfmodel and store is not None:
            predicted = _predict(family, problem, fp, device, store)
            if predicted is not None:
                return predicted, "predicted"
        return None, "untuned"
    if s.autotune == "background":
        _background().submit(family, problem, pkey, device, s)
        return None, "background"
    entry = _tune(family, problem, device, store, s)
    if found and (entry is None or entry.source in _UNSTORED):  # could not tune again: the answer we had
        return min(found, key=lambda f: f[0].time_ms)
    # an unstored aten answer of the tuner says why: too large to tune here, or tuned by another process
    return entry, entry.source if entry is not None and entry.source in _UNSTORED else "tuned"


_UNSTORED = ("too-large", "claimed-elsewhere")

#: seconds a problem that another process is tuning runs PyTorch's kernel before it is looked up again
CLAIM_RETRY_S = 30.0


def _retry_later(key: tuple, choice: Choice) -> None:
    """Serve PyTorch's kernel for now and forget the choice after CLAIM_RETRY_S, so that the next call
    looks the problem up again: it finds the other process's result, or tunes if that process died (its
    claim's lease has run out). Only this rare path pays for the clock read."""
    deadline = time.monotonic() + CLAIM_RETRY_S
    run = choice.fn

    def fn(*args):
        if time.monotonic() >= deadline:
            with _lock:
                if _memo.get(key) is choice:
                    del _memo[key]
                    _retire(choice)
        return run(*args)

    choice.fn = fn


def _bundle_entry(family, problem, fp, s):
    """The entry of the read-only bundles (TORCHTUNE_OPS_BUNDLES, shipped ones) for a device compatible
    with ``fp``, or None (bundles.py validates them; a bad bundle or entry is skipped with one warning)."""
    if not s.bundles and not s.use_shipped:
        return None
    from ..storage import bundles

    try:
        return bundles.overlay(s).get(fp, family.name, problem)
    except (TorchTuneOpsError, OSError, ValueError) as e:
        _warn_once(("bundles",), f"torchtune_ops: bundles unavailable ({e}); using the cache only")
        return None


def _tune(family, problem, device, store, s):
    from ..tuning import tuner

    log.info("torchtune_ops: tuning %s %s on %s", family.name, problem, device)
    try:
        return tuner.tune_problem(family, problem, device=device, store=store, max_trials=s.max_trials,
                                  time_budget_s=s.time_budget, **_TUNE_OPTIONS)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failed search must never take the model down
        if s.strict:
            raise
        _warn_once(("tune", family.name, str(problem)),
                   f"torchtune_ops: tuning {family.name} {problem} failed ({type(e).__name__}: {e}); "
                   "using PyTorch's kernel")
        return None


def _lookup_or_tune_distributed(family, problem, pkey, fp, device, s):
    import torch.distributed as dist

    payload: list[Any] = [None]
    if dist.get_rank() == 0:
        entry, source = _lookup_or_tune_local(family, problem, pkey, fp, device, s)
        if entry is not None and source != "predicted":  # zero-shot choices stay local (ranks use aten)
            payload[0] = {"winner": entry.winner, "time_ms": entry.time_ms, "aten_ms": entry.aten_ms,
                          "trials": _ntrials(entry), "source": source}
    dist.broadcast_object_list(payload, src=0)
    got = payload[0]
    if got is None:
        return None, "untuned"
    entry = _Broadcast(winner=got["winner"], time_ms=got["time_ms"], aten_ms=got["aten_ms"],
                       trials=got["trials"])
    return entry, got["source"] if dist.get_rank() == 0 else "broadcast"


@dataclasses.dataclass
class _Broadcast:
    winner: str
    time_ms: float | None
    aten_ms: float | None
    trials: int


# ---------------------------------------------------------------------------------------------------------
# Progress reporting and background tuning.

_TUNE_OPTIONS: dict[str, Any] = {}


def set_tune_options(**options: Any) -> None:
    """Extra keyword arguments for every ``tuner.tune_problem`` call of this process (e.g. ``progress``,
    a fake ``timer`` in tests, ``seed``); a value of None removes that option. Replaces nothing else."""
    for k, v in options.items():
        if v is None:
            _TUNE_OPTIONS.pop(k, None)
        else:
            _TUNE_OPTIONS[k] = v


def _background_tune(family, problem, device, s):
    with settings.override(**dataclasses.asdict(s)):  # the submitter's settings (time_budget: what is left)
        return _tune(family, problem, device, _open_store(s), s)


def _swap_in(family, pkey: str, entry) -> None:
    """Replace every in-memory choice of this problem by a fresh resolution from the stored entry."""
    with _lock:
        stale = [k for k, c in _memo.items() if c.problem_key == pkey and c.family is family
                 and c.source in ("background", "retuning")]
        for k in stale:
            _retire(_memo.pop(k))  # the next call resolves again and finds the stored entry


def _background():
    """The process's background tuner (background.py: one problem at a time, per-process budget)."""
    from ..tuning import background

    return background.worker(tune=_background_tune, on_done=_swap_in)


def wait_background() -> None:
    """Block until the background tuner has finished every submitted problem (tests, demos)."""
    from ..tuning import background

    background.join()


def reset() -> None:
    """Forget every in-memory choice, count and failure mark (the on-disk cache is untouched); the log
    level is read again from the settings at the next miss."""
    global _logging_ready
    _logging_ready = False
    wait_background()
    from ..tuning import background

    background.reset()
    with _lock:
        for c in _memo.values():
            c.live = False
        _memo.clear()
        _grad_input.clear()
        _failed.clear()
        _counts.clear()
        _retired.clear()
        _warned.clear()

