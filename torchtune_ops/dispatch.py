"""Run-time dispatch: which kernel a custom op runs for the tensors in front of it.

The hot path (a problem already met in this process) is a tuple of tensor attributes looked up in a dict::

    key = (op, dtypes, device, sizes, strides, bias kind, activation, alpha/beta, opts, fp32 precision)
    choice = _memo.get(key)  -> choice.fn(*args)

A miss resolves the key once: inputs the kernels do not cover (integer, bool, complex and float64 dtypes,
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
import threading
import time
import warnings
from typing import Any, Callable

import torch

from . import settings
from .errors import TorchTuneOpsError, UnsupportedProblem

log = logging.getLogger("torchtune_ops")

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_get_precision = torch.get_float32_matmul_precision


class Choice:
    """What one key runs: ``fn`` (the kernel call or PyTorch's op) and what explain() shows."""

    __slots__ = ("fn", "op", "kernel", "source", "problem", "calls", "family", "problem_key", "aten",
                 "time_ms", "aten_ms", "trials", "strict")

    def __init__(self, fn: Callable, *, op: str, kernel: str, source: str, aten: Callable,
                 problem: Any = None, family: Any = None, problem_key: str | None = None,
                 time_ms: float | None = None, aten_ms: float | None = None, trials: int = 0):
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


_memo: dict[tuple, Choice] = {}
_lock = threading.RLock()
_failed: set[tuple[str, str]] = set()   # (family, problem key) whose kernel raised: never retried
_counts: dict[str, dict[str, int]] = {}


def _count(op: str, what: str, n: int = 1) -> None:
    c = _counts.setdefault(op, {})
    c[what] = c.get(what, 0) + n


# ---------------------------------------------------------------------------------------------------------
# The ops' implementations (registered for CPU and CUDA by ops.py). Each builds its key, looks it up and
# calls the choice; everything else happens once per key in ``_resolve``.

def mm(a: torch.Tensor, b: torch.Tensor, opts: str = "") -> torch.Tensor:
    key = ("mm", a.dtype, b.dtype, a.device, a.shape, b.shape, a.stride(), b.stride(), opts, _get_precision())
    c = _memo.get(key)
    if c is None:
        c = _resolve(key, "mm", (a, b), opts)
    c.calls += 1
    return c.fn(a, b)


def bmm(a: torch.Tensor, b: torch.Tensor, opts: str = "") -> torch.Tensor:
    key = ("bmm", a.dtype, b.dtype, a.device, a.shape, b.shape, a.stride(), b.stride(), opts,
           _get_precision())
    c = _memo.get(key)
    if c is None:
        c = _resolve(key, "bmm", (a, b), opts)
    c.calls += 1
    return c.fn(a, b)


def addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta=1, alpha=1, opts: str = "") -> torch.Tensor:
    key = ("addmm", a.dtype, b.dtype, bias.dtype, a.device, a.shape, b.shape, bias.shape, a.stride(),
           b.stride(), bias.stride(), beta, alpha, opts, _get_precision())
    c = _memo.get(key)
    if c is None:
        c = _resolve(key, "addmm", (bias, a, b, beta, alpha), opts)
    c.calls += 1
    return c.fn(bias, a, b, beta, alpha)


def baddbmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta=1, alpha=1,
            opts: str = "") -> torch.Tensor:
    key = ("baddbmm", a.dtype, b.dtype, bias.dtype, a.device, a.shape, b.shape, bias.shape, a.stride(),
           b.stride(), bias.stride(), beta, alpha, opts, _get_precision())
    c = _memo.get(key)
    if c is None:
        c = _resolve(key, "baddbmm", (bias, a, b, beta, alpha), opts)
    c.calls += 1
    return c.fn(bias, a, b, beta, alpha)


def mm_act(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, activation: str,
           opts: str = "") -> torch.Tensor:
    if bias is None:
        key = ("mm_act", a.dtype, b.dtype, None, a.device, a.shape, b.shape, None, a.stride(), b.stride(),
               None, activation, opts, _get_precision())
    else:
        key = ("mm_act", a.dtype, b.dtype, bias.dtype, a.device, a.shape, b.shape, bias.shape, a.stride(),
               b.stride(), bias.stride(), activation, opts, _get_precision())
    c = _memo.get(key)
    if c is None:
        c = _resolve(key, "mm_act", (a, b, bias, activation), opts)
    c.calls += 1
    return c.fn(a, b, bias, activation)


def conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups: int,
           opts: str = "") -> torch.Tensor:
    key = ("conv2d", x.dtype, w.dtype, None if bias is None else bias.dtype, x.device, x.shape, w.shape,
           None if bias is None else bias.shape, x.stride(), w.stride(), tuple(stride), tuple(padding),
           tuple(dilation), groups, opts, _get_precision())
    c = _memo.get(key)
    if c is None:
        c = _resolve(key, "conv2d", (x, w, bias, stride, padding, dilation, groups), opts)
    c.calls += 1
    return c.fn(x, w, bias, stride, padding, dilation, groups)


# ---------------------------------------------------------------------------------------------------------
# PyTorch's kernels, with the same call signature as the choice functions.

def activation_ref(x: torch.Tensor, activation: str) -> torch.Tensor:
    """PyTorch's own activation ("none", "relu", "gelu_tanh" or "silu") applied to ``x``."""
    if activation == "relu":
        return torch.relu(x)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if activation == "silu":
        return torch.nn.functional.silu(x)
    if activation == "none":
        return x
    raise ValueError(f"unknown activation {activation!r}; expected none, relu, gelu_tanh or silu")


def _aten_mm_act(a, b, bias, activation):
    return activation_ref(torch.mm(a, b) if bias is None else torch.addmm(bias, a, b), activation)


def _aten_addmm(bias, a, b, beta, alpha):
    return torch.addmm(bias, a, b, beta=beta, alpha=alpha)


def _aten_baddbmm(bias, a, b, beta, alpha):
    return torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)


ATEN: dict[str, Callable] = {
    "mm": torch.mm,
    "bmm": torch.bmm,
    "addmm": _aten_addmm,
    "baddbmm": _aten_baddbmm,
    "mm_act": _aten_mm_act,
    "conv2d": torch.conv2d,
}


# ---------------------------------------------------------------------------------------------------------
# Resolving a key (once per key and process).

def _opts_overrides(opts: str) -> dict[str, Any]:
    if not opts:
        return {}
    try:
        data = json.loads(opts)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def encode_opts(overrides: dict[str, Any]) -> str:
    """The ``opts`` string the backend writes into each op call: settings overrides as canonical JSON
    (values that are None are dropped; "" when nothing is overridden)."""
    kept = {k: v for k, v in overrides.items() if v is not None}
    return json.dumps(kept, sort_keys=True, separators=(",", ":")) if kept else ""


def _triton_usable(device: torch.device) -> bool:
    """True when Triton kernels can run on ``device`` (CUDA, or CPU through the interpreter)."""
    if device.type not in ("cuda", "cpu"):
        return False
    try:
        from .kernels import _compat
    except ImportError:
        return False
    if device.type == "cpu":
        return bool(_compat.INTERPRET)
    return True


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _resolve(key: tuple, op: str, args: tuple, opts: str) -> Choice:
    aten = ATEN[op]
    device = args[1].device if op in ("addmm", "baddbmm") else args[0].device
    if not _plain(args, device):
        # Tensors on several devices (PyTorch accepts a meta tensor beside CPU ones) or a lazy view share the
        # key of the well-formed calls, so their choice must not be remembered for them: PyTorch's kernel,
        # for this call only.
        return Choice(aten, op=op, kernel="aten", source="unsupported", aten=aten,
                      problem="tensors on different devices, or a negative or conjugate view")
    capturing = _capturing(device)
    with settings.override(**_opts_overrides(opts)):
        strict = settings.current().strict
        try:
            choice = _decide(op, args, device, aten, capturing)
        except UnsupportedProblem as e:
            choice = Choice(aten, op=op, kernel="aten", source="unsupported", aten=aten)
            choice.problem = str(e)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # resolving must never take the model down (strict mode re-raises)
            if strict:
                raise
            _warn_once(("resolve", op, type(e).__name__),
                       f"torchtune_ops: could not resolve {op} ({type(e).__name__}: {e}); using PyTorch's kernel")
            choice = Choice(aten, op=op, kernel="aten", source="failed", aten=aten)
    if capturing:
        return choice          # no Python state change inside a CUDA graph capture
    with _lock:
        _count(op, "misses")
        _count(op, choice.source)
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
            from .kernels import conv as kconv
            x, w, bias, stride, padding, dilation, groups = args
            if x.dim() != 4 or w.dim() != 4:
                raise UnsupportedProblem("conv2d needs 4-D input and weight")
            problem = kconv.conv_problem(x, w, bias=bias, stride=tuple(stride), padding=tuple(padding),
                                         dilation=tuple(dilation), groups=groups)
            return kconv.CONV2D, problem, kconv.conv2d
        from .kernels import gemm as kgemm
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
    from .store import problem_key

    return problem_key(family.problem_to_dict(problem))


def _open_store(s: settings.Settings):
    """The store of the settings in force (call inside their override)."""
    from .store import default_store

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
    from .device import fingerprint

    fp = fingerprint(device).key
    entry, source = _lookup_or_tune(family, problem, pkey, fp, device, s)
    if source == "predicted":
        return _predicted_choice(op, launch, entry, base, device, s)
    if entry is None:
        if s.tuning and s.autotune == "background":
            return Choice(aten, kernel="aten", source="background", **base)
        return Choice(aten, kernel="aten", source="untuned", **base)
    info = dict(time_ms=getattr(entry, "time_ms", None), aten_ms=getattr(entry, "aten_ms", None),
                trials=_ntrials(entry))
    winner = entry.winner
    beat = (winner != "aten" and info["time_ms"] is not None and info["aten_ms"] is not None
            and info["time_ms"] < info["aten_ms"])
    if not beat:
        return Choice(aten, kernel="aten", source=source, **base, **info)
    from .kernels.base import Config

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


def _plain(args: tuple, device: torch.device) -> bool:
    """True when every tensor in ``args`` is on ``device`` and reads as its memory holds (no negative or
    conjugate bit): what a kernel chosen for the key may be launched on. The key names one operand's
    device and no lazy bit (to stay cheap), so a call can share a key without fitting its kernel."""
    for t in args:
        if isinstance(t, torch.Tensor) and (t.device != device or t.is_neg() or t.is_conj()):
            return False
    return True


def _invalid(family: Any, problem: Any, config: Any, device: torch.device) -> str | None:
    """Why ``config`` is not one of ``family``'s valid configurations for ``problem`` here, or None
    (the same validation as a bundle's entries)."""
    from .bundles import check_config
    from .errors import BundleError
    from .kernels.base import device_limits

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


def _lookup_or_tune_local(family, problem, pkey, fp, device, s):
    store = None
    try:
        store = _open_store(s)
        entry = store.get(fp, family.name, pkey)
    except (TorchTuneOpsError, OSError) as e:
        _warn_once(("store", s.cache_dir), f"torchtune_ops: cache unavailable ({e}); using memory only")
        entry = None
    shipped = _bundle_entry(family, problem, fp, s)
    if shipped is not None and (entry is None or shipped.time_ms < entry.time_ms):
        return shipped, "bundle"
    if entry is not None:
        return entry, "store"
    if s.record:  # deployment: remember the unseen problem for offline tuning (record.py)
        from . import record

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
        return run(*args)

    choice.fn = fn


def _bundle_entry(family, problem, fp, s):
    """The entry of the read-only bundles (TORCHTUNE_OPS_BUNDLES, shipped ones) for a device compatible
    with ``fp``, or None (bundles.py validates them; a bad bundle or entry is skipped with one warning)."""
    if not s.bundles and not s.use_shipped:
        return None
    from . import bundles

    try:
        return bundles.overlay(s).get(fp, family.name, problem)
    except (TorchTuneOpsError, OSError, ValueError) as e:
        _warn_once(("bundles",), f"torchtune_ops: bundles unavailable ({e}); using the cache only")
        return None


def _tune(family, problem, device, store, s):
    from . import tuner

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
# Zero-shot: with tuning off, the performance model's configuration for an unseen problem (perfmodel.py),
# used only where the model is confident and only after it matched PyTorch's output (and, on a GPU, beat
# PyTorch's time) at its first call. Kept in memory: nothing is written.

#: on a GPU, a predicted configuration must beat aten's time by this fraction at its first call
PREDICTED_MARGIN = 0.03


@dataclasses.dataclass
class _Predicted:
    winner: str          # the configuration's JSON
    vs_aten: float       # the model's predicted time over aten's
    time_ms: float | None = None
    aten_ms: float | None = None
    trials: int = 0


def _predict(family, problem, fp: str, device: torch.device, store) -> _Predicted | None:
    from . import perfmodel
    from .kernels.base import Config, device_limits

    try:
        model = perfmodel.model_for(store, fp, family.name, reuse=True)
        if model is None or not model.confident():
            return None
        cands = [c.as_dict() for c in family.valid_configs(problem, device_limits(device))]
        pred = perfmodel.zero_shot(model, family.problem_to_dict(problem), cands)
    except Exception as e:  # noqa: BLE001 - a model problem means PyTorch's kernel, never a crash
        log.info("torchtune_ops: no zero-shot prediction for %s (%s: %s)", family.name, type(e).__name__, e)
        return None
    if pred is None:
        return None
    return _Predicted(winner=Config.from_dict(pred.config).to_json(), vs_aten=pred.vs_aten)


def _predicted_choice(op: str, launch: Callable, entry: _Predicted, base: dict, device: torch.device,
                      s: settings.Settings) -> Choice:
    """A choice that runs aten and the predicted kernel at its first call, keeps the kernel only when its
    output matches aten's within the family's tolerance (and, on CUDA, it is faster), and returns aten's
    output for that call."""
    from .kernels.base import Config

    config = Config.from_json(entry.winner)
    c = Choice(base["aten"], kernel=str(config), source="predicted", **base)
    c.strict = s.strict
    kernel = _kernel_fn(op, launch, config, c, device)

    def first(*args):
        ref = c.aten(*args)
        if _capturing(device) or not _plain(args, device):  # nothing to check the kernel on this time
            return ref
        why = _check_predicted(c, kernel, args, ref, device)
        with _lock:
            if why is None:
                c.fn = kernel
            else:
                c.fn, c.kernel, c.source = c.aten, "aten", "predicted-rejected"
        if why is not None:
            log.info("torchtune_ops: predicted %s configuration %s not used for %s: %s", c.family.name, config,
                     c.problem, why)
        return ref

    c.fn = first
    return c


def _check_predicted(c: Choice, kernel: Callable, args: tuple, ref: torch.Tensor,
                     device: torch.device) -> str | None:
    """Why the predicted kernel must not be used (None: it may): it failed, disagrees with aten, or, on
    CUDA, is not faster than aten by ``PREDICTED_MARGIN``."""
    from .kernels.base import relative_error

    try:
        out = kernel(*args)
    except Exception as e:  # noqa: BLE001 - strict mode re-raises from the kernel wrapper
        return f"it failed ({type(e).__name__}: {e})"
    if c.source == "failed":  # the guarded kernel raised and already fell back
        return "it failed"
    err = relative_error(out, ref)
    tol = c.family.tolerance(c.problem)
    if not err <= tol:
        warnings.warn(f"torchtune_ops: the predicted {c.family.name} configuration gives a wrong result on "
                      f"{c.problem} (relative error {err:.3g} > {tol:.3g}); using PyTorch's kernel",
                      RuntimeWarning, stacklevel=4)
        return f"relative error {err:.3g} > tolerance {tol:.3g}"
    if device.type == "cuda":
        from .timing import benchmark

        t_k = benchmark(lambda: kernel(*args), warmup_ms=5, rep_ms=20, device=device)
        t_a = benchmark(lambda: c.aten(*args), warmup_ms=5, rep_ms=20, device=device)
        c.time_ms, c.aten_ms = t_k.median_ms, t_a.median_ms
        if not t_k.median_ms < t_a.median_ms * (1 - PREDICTED_MARGIN):
            return f"not faster than aten ({t_k.median_ms:.4g} ms vs {t_a.median_ms:.4g} ms)"
    return None


# ---------------------------------------------------------------------------------------------------------
# Calling a tuned kernel, with the fall-back to PyTorch's kernel.

def _kernel_fn(op: str, launch: Callable, config: Any, c: Choice, device: torch.device) -> Callable:
    """The function a tuned choice runs: our kernel with the same arguments as PyTorch's op, launched only
    on tensors that are all on ``device`` (the key's) and carry no negative or conjugate bit."""
    if op in ("mm", "bmm"):
        def run(a, b):
            return launch(a, b, config=config)
    elif op in ("addmm", "baddbmm"):
        def run(bias, a, b, beta, alpha):
            return launch(a, b, config=config, bias=bias, alpha=alpha, beta=beta)
    elif op == "mm_act":
        def run(a, b, bias, activation):
            return launch(a, b, config=config, bias=bias, activation=activation)
    else:
        def run(x, w, bias, stride, padding, dilation, groups):
            return launch(x, w, config=config, bias=bias, stride=tuple(stride), padding=tuple(padding),
                          dilation=tuple(dilation), groups=groups)

    def guarded(*args):
        # Same key as the kernel's inputs but not fit for it: a lazy view (the kernel would read the raw
        # memory) or a tensor on another device (a meta tensor's null pointer, a CPU bias beside CUDA
        # operands). PyTorch's kernel takes this call, and the problem keeps its kernel.
        if not _plain(args, device):
            return c.aten(*args)
        try:
            return run(*args)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # never crash the model: PyTorch's kernel takes over for this problem
            return _kernel_failed(c, args, e)

    return guarded


def _kernel_failed(c: Choice, args: tuple, error: Exception) -> torch.Tensor:
    out = c.aten(*args)  # inputs PyTorch rejects raise PyTorch's own error here, and nothing is marked
    if c.strict or settings.current().strict:
        raise error
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return out
    with _lock:
        c.fn = c.aten
        c.source = "failed"
        c.kernel = "aten"
        _failed.add((c.family.name, c.problem_key))
        _count(c.op, "failures")
        for other in _memo.values():   # other keys of the same problem (other strides, opts)
            if other.problem_key == c.problem_key and other.family is c.family and other.fn is not other.aten:
                other.fn, other.source, other.kernel = other.aten, "failed", "aten"
    warnings.warn(f"torchtune_ops: the tuned {c.family.name} kernel failed on {c.problem} "
                  f"({type(error).__name__}: {error}); using PyTorch's kernel for this problem from now on",
                  RuntimeWarning, stacklevel=3)
    return out


_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


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
                 and c.source == "background"]
        for k in stale:
            del _memo[k]  # the next call resolves again and finds the stored entry


def _background():
    """The process's background tuner (background.py: one problem at a time, per-process budget)."""
    from . import background

    return background.worker(tune=_background_tune, on_done=_swap_in)


def wait_background() -> None:
    """Block until the background tuner has finished every submitted problem (tests, demos)."""
    from . import background

    background.join()


# ---------------------------------------------------------------------------------------------------------
# Introspection.

def stats() -> dict[str, Any]:
    """Per-op counts and the choice of every problem met in this process.

    Returns ``{"ops": {op: {"calls", "hits", "misses", <source>: n, "failures"}}, "problems": [...]}``;
    each problem row has op, shape, dtype, kernel ("aten" or the configuration), source (unsupported,
    store, tuned, untuned, failed, background, broadcast, invalid, too-large, claimed-elsewhere), calls and, when tuned, time_ms, aten_ms, trials.
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
                             "aten_ms": c.aten_ms, "trials": c.trials})
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


def reset() -> None:
    """Forget every in-memory choice, count and failure mark (the on-disk cache is untouched); the log
    level is read again from the settings at the next miss."""
    global _logging_ready
    _logging_ready = False
    wait_background()
    from . import background

    background.reset()
    with _lock:
        _memo.clear()
        _failed.clear()
        _counts.clear()
        _warned.clear()
