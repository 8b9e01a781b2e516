"""Compile kernel launches for a GPU without having one, and read what the compiler made of them.

Triton compiles for any NVIDIA target with the ptxas it ships, so registers, spills and shared memory of
an sm_90a (H100) or sm_80 (A100) build can be read on a CPU machine. ``compile_launch`` specialises a
launch exactly as ``kernel[grid](*args, **consts)`` would on that GPU: it runs the kernel's own argument
binder (pointer alignment, integers equal to 1 or divisible by 16) against a backend for the target, so
the families' launch planners (``gemm._plan``, ``conv._plan``) can be reused with CPU tensors.

Needs a process where ``TRITON_INTERPRET`` is unset (interpreted kernels cannot be compiled); tests run
it in a child process. Results are cached per process (the same specialisation compiles once).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from typing import Any, Mapping

from . import _compat
from .base import DeviceLimits

#: compile targets: capability and the limits of the GPU they stand for
TARGETS: dict[str, tuple[int, DeviceLimits]] = {
    "sm_90a": (90, DeviceLimits(name="H100 (sm_90a)", smem_per_block=232448, num_sms=132, capability=(9, 0))),
    "sm_80": (80, DeviceLimits(name="A100 (sm_80)", smem_per_block=166912, num_sms=108, capability=(8, 0))),
}
#: registers per SM (and per block) on sm_80 and sm_90; a thread may use at most 255
REGS_PER_BLOCK = 65536
MAX_REGS_PER_THREAD = 255


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What the compiler made of one launch: per-thread registers, spill bytes (stores + loads as ptxas
    reports them, stores counted), stack frame, allocated shared memory, and a few facts from the PTX."""

    kernel: str
    arch: str
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    mma: str  # "wgmma", "mma" (mma.sync), "fma" (no tensor cores) or "none"
    vector_loads: int  # widest global load in bits (ld.global / cp.async / TMA)
    cp_async: bool
    tma: bool
    tma_store: bool = False  # the output written by a TMA store (cp.async.bulk.tensor global <- shared)
    host_desc: bool = False  # a tensor descriptor is a kernel argument (made on the host)
    ptx: str = dataclasses.field(repr=False, compare=False, default="")

    def problems(self, limits: DeviceLimits) -> list[str]:
        """Why this build would not run well or at all on the target: any spill (even the few bytes
        ptxas spends to reach an occupancy step, gemm_space's ``_spill_rule``), over the shared memory or
        the register file."""
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B")
        if self.shared_bytes > limits.smem_per_block:
            out.append(f"shared {self.shared_bytes} B > {limits.smem_per_block} B")
        if self.registers * 32 * self.num_warps > REGS_PER_BLOCK:
            out.append(f"{self.registers} registers x {32 * self.num_warps} threads > {REGS_PER_BLOCK}")
        return out


_CACHE: dict[Any, Compiled] = {}
_BACKENDS: dict[int, Any] = {}
_BINDERS: dict[Any, Any] = {}


def _backend(cap: int):
    b = _BACKENDS.get(cap)
    if b is None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        b = _BACKENDS[cap] = make_backend(GPUTarget("cuda", cap, 32))
    return b


def _ptxas_log(backend, ptx: str, options, cap: int) -> str:
    """Run the backend's own ptxas step again with its log printed (when Triton's cache answered the
    compile and no log was captured): same ptxas binary and flags as the compile."""
    from triton import knobs

    log = io.StringIO()
    with knobs.nvidia.scope():
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            backend.make_cubin(ptx, {}, options, cap)
    return log.getvalue()


def _int(pattern: str, text: str) -> int:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else 0


_TMA_STORE = re.compile(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared")


def _ptx_facts(ptx: str) -> tuple[str, int, bool, bool]:
    if "wgmma.mma_async" in ptx:
        mma = "wgmma"
    elif "mma.sync" in ptx:
        mma = "mma"
    elif "fma.rn.f32" in ptx:
        mma = "fma"
    else:
        mma = "none"
    widths = [0]
    for op in re.findall(r"\bld\.global\S*", ptx):  # e.g. ld.global.L1::evict_last.v4.b32
        vec = re.search(r"\.v(\d)\.", op)
        bits = re.search(r"\.[bfsu](\d+)$", op)
        if bits:
            widths.append(int(vec.group(1) if vec else 1) * int(bits.group(1)))
    for m in re.finditer(r"cp\.async\.c[ag]\.shared\.global(?:\.[a-z0-9_:]+)*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)", ptx):
        widths.append(8 * int(m.group(1), 0))
    tma = "cp.async.bulk.tensor" in ptx
    if tma:
        widths.append(128)
    return mma, max(widths), "cp.async.c" in ptx, tma


def compile_launch(kernel, args: tuple, consts: Mapping[str, Any], num_warps: int, num_stages: int, *,
                   arch: str = "sm_90a", keep_ptx: bool = False) -> Compiled:
    """Compile ``kernel[grid](*args, **consts, num_warps=, num_stages=)`` for ``arch`` ("sm_90a" or
    "sm_80") as a launch on that GPU would specialise it, and read registers, spills and shared memory.

    Args:
        kernel: a ``@triton.jit`` function (not interpreted: TRITON_INTERPRET must be unset).
        args: the positional arguments of the launch (tensors on any device: only dtype and data_ptr
            alignment matter).
        consts: the keyword (constexpr) arguments of the launch.
        num_warps, num_stages: the launch options.
        arch: a key of ``TARGETS``. Default "sm_90a".
        keep_ptx: keep the PTX text in the result (default False: it is large).

    Raises:
        RuntimeError: kernels are interpreted in this process.
        triton's compilation errors (e.g. out of resources) propagate.
    """
    import triton
    from triton.compiler import ASTSource

    if _compat.INTERPRET or not hasattr(kernel, "params"):
        raise RuntimeError("compile_launch needs TRITON_INTERPRET unset (run it in a separate process)")
    cap = TARGETS[arch][0]
    backend = _backend(cap)
    binder = _BINDERS.get((kernel, cap))
    if binder is None:
        from triton.runtime.jit import create_function_from_signature

        binder = _BINDERS[(kernel, cap)] = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(consts, num_warps=num_warps, num_stages=num_stages)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (kernel.fn.__qualname__, cap, tuple(map(str, specialization)), str(sorted(kwargs.items())))
    hit = _CACHE.get(key)
    if hit is not None and (hit.ptx or not keep_ptx):
        return hit
    from triton import knobs

    log = io.StringIO()
    with knobs.nvidia.scope():
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                               target=backend.target, options=options.__dict__)
    text = log.getvalue()
    ptx = k.asm["ptx"]
    if "Used" not in text:
        text = _ptxas_log(backend, ptx, options, cap)
    mma, vec, cp_async, tma = _ptx_facts(ptx)
    res = Compiled(kernel=kernel.fn.__name__, arch=arch, num_warps=num_warps, num_stages=num_stages,
                   registers=_int(r"Used (\d+) registers", text),
                   spill_bytes=_int(r"(\d+) bytes spill stores", text),
                   stack_bytes=_int(r"(\d+) bytes stack frame", text),
                   shared_bytes=int(k.metadata.shared), mma=mma, vector_loads=vec, cp_async=cp_async,
                   tma=tma, tma_store=_TMA_STORE.search(ptx) is not None,
                   host_desc=any(str(t).startswith("tensordesc") for t in signature.values()),
                   ptx=ptx if keep_ptx else "")
    _CACHE[key] = res
    return res


_INPUTS: dict[Any, tuple] = {}


def compile_config(family, problem, config, *, arch: str = "sm_90a", keep_ptx: bool = False) -> list[Compiled]:
    """Compile every launch of ``family.launch(config, problem, inputs)`` for ``arch`` (see
    ``compile_launch``); inputs are the family's own (``make_inputs`` on CPU, cached per problem), so
    strides and alignment are what a caller of the family would pass. The main kernel comes first."""
    key = (family.name, problem)
    inputs = _INPUTS.get(key)
    if inputs is None:
        if len(_INPUTS) > 4:
            _INPUTS.clear()
        inputs = _INPUTS[key] = family.make_inputs(problem, "cpu")
    cap = TARGETS[arch][0]
    return [compile_launch(kernel, args, consts, warps, stages, arch=arch, keep_ptx=keep_ptx)
            for kernel, _grid, args, consts, warps, stages in family.plan_launches(config, problem, inputs, cap)]
