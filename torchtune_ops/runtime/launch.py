"""Calling a chosen kernel: the guarded launch with its fall-back to PyTorch's kernel, and the performance
model's predicted configuration, checked against PyTorch's output at its first call."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import torch

from .. import settings
from .choices import Choice, _count, _failed, _lock, _memo, log


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _plain(args: tuple, device: torch.device) -> bool:
    """True when every tensor in ``args`` is on ``device`` and reads as its memory holds (no negative or
    conjugate bit): what a kernel chosen for the key may be launched on. The key names one operand's
    device and no lazy bit (to stay cheap), so a call can share a key without fitting its kernel."""
    for t in args:
        if isinstance(t, torch.Tensor) and (t.device != device or t.is_neg() or t.is_conj()):
            return False
    return True


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
    from ..tuning import perfmodel
    from ..kernels.base import Config, device_limits

    try:
        limits = device_limits(device)
        model = perfmodel.model_with_prior(store, fp, family.name, limits=limits, reuse=True)
        if model is None or not model.confident():
            return None
        cands = [c.as_dict() for c in family.valid_configs(problem, limits)]
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
    from ..kernels.base import Config

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
    from ..kernels.base import relative_error

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
        from ..tuning.timing import benchmark

        t_k = benchmark(lambda: kernel(*args), warmup_ms=5, rep_ms=20, device=device)
        t_a = benchmark(lambda: c.aten(*args), warmup_ms=5, rep_ms=20, device=device)
        c.time_ms, c.aten_ms = t_k.median_ms, t_a.median_ms
        if not t_k.median_ms < t_a.median_ms * (1 - PREDICTED_MARGIN):
            return f"not faster than aten ({t_k.median_ms:.4g} ms vs {t_a.median_ms:.4g} ms)"
    return None


# ---------------------------------------------------------------------------------------------------------
# Calling a tuned kernel, with the fall-back to PyTorch's kernel.

def _binder(launch: Callable) -> Callable | None:
    """``bind`` of the kernel module that defines ``launch`` (``gemm.bind``, ``conv.bind``), or None."""
    import sys

    module = getattr(launch, "__module__", "") or ""
    if not module.startswith(__package__.rsplit(".", 1)[0] + ".kernels."):
        return None
    return getattr(sys.modules.get(module), "bind", None)


def _kernel_fn(op: str, launch: Callable, config: Any, c: Choice, device: torch.device) -> Callable:
    """The function a tuned choice runs: our kernel with the same arguments as PyTorch's op, launched only
    on tensors that are all on ``device`` (the key's) and carry no negative or conjugate bit.

    The first call binds the launch (``gemm.bind`` / ``conv.bind``: every argument but the tensors worked
    out once, the compiled kernel kept); later calls of the key only allocate the output and launch. The key
    fixes everything the binding assumed but the pointers, which the bound launcher checks itself."""
    bind = _binder(launch)
    bound: list = [None]
    # A matmul's key holds the float32 matmul precision (its problem's "ieee"/"tf32"): passed explicitly,
    # the bound GEMM need not read the global setting at every call. (A convolution's follows cuDNN's TF32
    # flag, which the key does not hold: its bound launcher keeps checking it.)
    precision = getattr(c.problem, "precision", None) if op != "conv2d" else None
    extra = {"precision": precision} if precision in ("ieee", "tf32") else {}

    def unbound(*args):
        return _with_op_args(op, launch, config, args, **extra)

    def first(*args):   # bind at the first call (the arguments of the key), then launch through it
        b = None if bind is None else _with_op_args(op, bind, config, args, **extra)
        bound[0] = run = unbound if b is None else _bound_call(op, b)
        fn = None
        if c.fn is guarded:   # later calls skip this indirection (a kernel failure replaces c.fn itself)
            c.fn = fn = _guarded(op, run, c, device)
        out = run(*args)
        # the binding's single closure once its first launch compiled the kernel (gemm: BoundGemm.specialised)
        fast = getattr(b, "specialised", None)
        fast = fast() if fast is not None else None
        if fast is not None:
            bound[0] = run = _bound_call(op, fast)
            if fn is not None and c.fn is fn:
                c.fn = _guarded(op, run, c, device)
        return out

    bound[0] = first
    guarded = _guarded(op, lambda *args: bound[0](*args), c, device)
    return guarded


def _guarded(op: str, run: Callable, c: Choice, device: torch.device) -> Callable:
    """``run`` on the calls it fits, PyTorch's kernel on the others; a failure of ``run`` makes PyTorch's
    kernel take over the problem.

    A call of the same key as the kernel's inputs may still not fit it: a lazy view (the kernel would read
    the raw memory) or a tensor on another device (a meta tensor's null pointer, a CPU bias beside CUDA
    operands). PyTorch's kernel takes such a call, and the problem keeps its kernel. The key fixes the
    first operand's device and every dtype, so only the other tensors' devices and the lazy bits are read
    (the conjugate bit only where a dtype may be complex)."""
    cpu, index = device.type == "cpu", device.index
    check_conj = _complex_key(c)

    if op in ("mm", "bmm"):
        def guarded(a, b):
            if ((not b.is_cpu if cpu else b.get_device() != index or not b.is_cuda) or a.is_neg() or b.is_neg()
                    or (check_conj and (a.is_conj() or b.is_conj()))):
                return c.aten(a, b)
            try:
                return run(a, b)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # never crash the model: PyTorch's kernel takes over for this problem
                return _kernel_failed(c, (a, b), e)

        return guarded

    def unfit(t) -> bool:   # on another device, or a lazy view
        return ((not t.is_cpu if cpu else t.get_device() != index or not t.is_cuda) or t.is_neg()
                or (check_conj and t.is_conj()))

    # the positions of the key's operand, the other operand and the third tensor (addmm's bias; an optional
    # bias for mm_act and conv2d)
    k, o, x = (1, 2, 0) if op in ("addmm", "baddbmm") else (0, 1, 2)

    def guarded(*args):
        t, v = args[k], args[x]
        if (t.is_neg() or (check_conj and t.is_conj()) or unfit(args[o])
                or (v is not None and unfit(v))):
            return c.aten(*args)
        try:
            return run(*args)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # never crash the model: PyTorch's kernel takes over for this problem
            return _kernel_failed(c, args, e)

    return guarded


def _complex_key(c: Choice) -> bool:
    """Whether the choice's problem may see complex operands (only they can carry a conjugate bit)."""
    dtype = getattr(c.problem, "dtype", None)   # the families' problems name it ("float32")
    return dtype is None or "complex" in str(dtype)


def _with_op_args(op: str, fn: Callable, config: Any, args: tuple, **extra: Any) -> Any:
    """``fn(operand, operand, config=..., <the op's other arguments as keywords>, **extra)``: how the
    family's launcher (``gemm``, ``conv2d``) and its ``bind`` both take a call of ``op``."""
    if op in ("mm", "bmm"):
        a, b = args
        return fn(a, b, config=config, **extra)
    if op in ("addmm", "baddbmm"):
        bias, a, b, beta, alpha = args
        return fn(a, b, config=config, bias=bias, alpha=alpha, beta=beta, **extra)
    if op == "mm_act":
        a, b, bias, activation = args
        return fn(a, b, config=config, bias=bias, activation=activation, **extra)
    x, w, bias, stride, padding, dilation, groups = args
    return fn(x, w, config=config, bias=bias, stride=tuple(stride), padding=tuple(padding),
              dilation=tuple(dilation), groups=groups, **extra)


def _bound_call(op: str, bound: Callable) -> Callable:
    """A function with the op's arguments calling ``bound(a, b, bias)`` / ``bound(x, w, bias)``."""
    if op in ("mm", "bmm"):
        return bound
    if op in ("addmm", "baddbmm"):
        return lambda bias, a, b, beta, alpha: bound(a, b, bias)
    if op == "mm_act":
        return lambda a, b, bias, activation: bound(a, b, bias)
    return lambda x, w, bias, stride, padding, dilation, groups: bound(x, w, bias)


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


