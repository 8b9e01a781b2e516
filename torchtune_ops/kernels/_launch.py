"""A kernel launch bound once: the compiled kernel, its constant arguments and grid kept, only tensors per call.

Triton's ``kernel[grid](*args, **constexprs)`` binds and specialises every argument and computes a cache key
at every call (about 10 us of Python on Triton 3.6, plus the key) before the C launcher runs. Where the
caller knows that everything but the tensors is the same at every call (the run-time dispatch does: sizes,
strides, dtypes and scalars are in its key), ``Launcher`` does that work once:

    launch = Launcher(kernel, grid, fixed, constexprs, num_warps=4, num_stages=3)
    launch(tensors)   # the leading arguments; ``fixed`` the rest of the positional ones   # first call: Triton's JIT (compiles or finds the kernel), the compiled kernel is kept;
                      # later calls: compiled.run(grid, stream, ..., *tensors, *fixed arguments)

The call passes the compiled kernel's launcher exactly the arguments ``JITFunction.run`` passes it (the
same on Triton 3.6 and 3.9: grid, stream, function, packed metadata, launch metadata, the launch hooks,
then every parameter in signature order, constexprs included). What the compiled kernel assumed of the
tensors (a pointer divisible by 16 or not) is the caller's guard (``aligned``): a call that does not meet
it must go through ``kernel[grid]`` again. While a launch hook is installed (a profiler), calls go through
the JIT so the hook sees them. Under the interpreter there is no compiled kernel: every call runs
``kernel[grid]`` with the arguments bound here.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import triton

_knobs = getattr(getattr(triton, "knobs", None), "runtime", None)


def _hooks_idle() -> bool:
    """True when no launch hook is installed (Triton >= 3.4 keeps them in ``knobs.runtime``; a caller
    launching through ``Launcher.parts()`` reads the same two attributes inline)."""
    if _knobs is None:
        return False
    enter, leave = _knobs.launch_enter_hook, _knobs.launch_exit_hook   # None, a function or a HookChain
    return not getattr(enter, "calls", enter) and not getattr(leave, "calls", leave)


def allocator(device: Any) -> Callable[[tuple, tuple, Any], Any]:
    """``alloc(size, stride, dtype)``: a new tensor on ``device`` (the current CUDA device for CUDA; the
    callers launch only there). Inductor's own allocation helpers where this torch has them (a third of
    ``torch.empty``'s cost), else ``torch.empty_strided``."""
    import torch

    try:
        from torch._C._dynamo.guards import _empty_strided_cpu, _empty_strided_cuda
    except ImportError:
        _empty_strided_cpu = _empty_strided_cuda = None
    if device.type == "cpu" and _empty_strided_cpu is not None:
        return _empty_strided_cpu
    if device.type == "cuda" and _empty_strided_cuda is not None:
        return _empty_strided_cuda
    return lambda size, stride, dtype: torch.empty_strided(size, stride, dtype=dtype, device=device)


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def aligned(tensors: Sequence[Any]) -> tuple[bool, ...]:
    """Per tensor, whether its pointer is divisible by 16: what Triton specialises a pointer on."""
    return tuple(t.data_ptr() % 16 == 0 for t in tensors)


class Launcher:
    """One kernel launch whose leading (tensor) arguments change per call and nothing else does.

    Args:
        kernel: the ``@triton.jit`` function (a ``JITFunction``, or the interpreter's function).
        grid: the launch grid, 1 to 3 ints.
        fixed: the positional arguments after the tensors (sizes, strides, scalars), the same at every call.
        constexprs: the keyword (constexpr) arguments.
        num_warps, num_stages: Triton's launch options.
    """

    __slots__ = ("kernel", "grid", "fixed", "constexprs", "options", "compiled", "tail", "g", "bound", "stream",
                 "device")

    def __init__(self, kernel: Any, grid: Sequence[int], fixed: Sequence[Any], constexprs: dict, *,
                 num_warps: int, num_stages: int) -> None:
        self.kernel = kernel
        self.grid = tuple(grid)
        self.fixed = tuple(fixed)
        self.constexprs = constexprs
        self.options = {"num_warps": num_warps, "num_stages": num_stages}
        self.compiled = None
        self.tail: tuple = ()
        g = self.grid + (1, 1)
        self.g = (g[0], g[1], g[2])
        self.bound = 0        # launches that went straight to the compiled kernel (tests read it)
        self.stream = self.device = None

    def __call__(self, tensors: tuple) -> None:
        ck = self.compiled
        if ck is not None and _hooks_idle():
            self.bound += 1
            g0, g1, g2 = self.g
            ck.run(g0, g1, g2, self.stream(self.device), ck.function, ck.packed_metadata, None, None, None, *tensors, *self.tail)
            return
        self.jit(tensors)

    def parts(self) -> tuple | None:
        """What ``__call__`` passes the compiled kernel, for a caller that launches it from its own hot path
        (one Python frame less): ``(run, g0, g1, g2, get_stream, device, function, packed_metadata, tail)``,
        called as ``run(g0, g1, g2, get_stream(device), function, packed_metadata, None, None, None,
        *tensors, *tail)`` while ``hooks_idle()``. None before a launch kept the compiled kernel, under the
        interpreter, and on a Triton without ``knobs.runtime`` (hooks unknown: every call through the JIT)."""
        ck = self.compiled
        if ck is None or _knobs is None:
            return None
        return (ck.run, *self.g, self.stream, self.device, ck.function, ck.packed_metadata, self.tail)

    def jit(self, tensors: tuple) -> None:
        """Launch through Triton's JIT (binding, specialisation, cache key); keep the compiled kernel."""
        got = self.kernel[self.grid](*tensors, *self.fixed, **self.constexprs, **self.options)
        if self.compiled is None and _is_compiled(got):
            names = list(getattr(self.kernel, "arg_names", ()))
            n = len(tensors) + len(self.fixed)
            if names[n:] and set(names[n:]) == set(self.constexprs) and len(names) == n + len(self.constexprs):
                from triton.runtime.driver import driver

                d = driver.active   # the device is the caller's (its key's) at every call
                self.stream, self.device = d.get_current_stream, d.get_current_device()
                self.tail = self.fixed + tuple(self.constexprs[k] for k in names[n:])
                self.compiled = got


def _is_compiled(obj: Any) -> bool:
    return obj is not None and hasattr(obj, "run") and hasattr(obj, "function") and hasattr(obj, "packed_metadata")

