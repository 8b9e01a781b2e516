"""GEMM problems and the GEMM configuration space (pure Python: no Triton here).

A ``GemmProblem`` is what the tuner keys on: the op, the sizes, the dtype, the operand layouts and the
epilogue. The space is BLOCK_M/N/K x GROUP_M x num_warps x num_stages x SPLIT_K x TMA; ``check`` rejects
what cannot run (shared memory, registers), what cannot help (blocks far larger than the problem, stages
beyond the K loop, SPLIT_K where there are enough output tiles, GROUP_M where it changes nothing) and
what is forbidden (SPLIT_K under deterministic algorithms, TMA off Hopper). ``known_configs`` is
Inductor's and Triton's tutorial lists fitted to the problem the way Inductor fits them.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from ..errors import UnsupportedProblem
from .base import Config, DeviceLimits, Value

OPS = ("mm", "addmm", "bmm", "baddbmm", "linear")
ELEMENT_SIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
LAYOUTS = ("row", "col", "strided")
BIAS_KINDS = ("none", "scalar", "row", "col", "full")
ACTIVATIONS = ("none", "relu", "gelu_tanh", "silu")
PRECISIONS = ("ieee", "tf32")

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
TORCH_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}

BLOCKS = (16, 32, 64, 128, 256)
GROUP_MS = (1, 4, 8)
WARPS = (2, 4, 8)
STAGES = (1, 2, 3, 4, 5)
SPLIT_KS = (1, 2, 4, 8, 16)
TMAS = (0, 1)

#: Streaming multiprocessors assumed where the device has none to tell (the interpreter): an H100's.
NOMINAL_SMS = 132
#: Most registers a thread may spend on the fp32 accumulator (Inductor's exhaustive-search rule).
MAX_ACC_REGS = 255
#: float32 "ieee" (FMA, no tensor cores): most accumulator registers a thread that do not spill
FMA_MAX_ACC_REGS = 64
#: ... and operand elements a thread (one A and one B tile)
FMA_MAX_OPERAND_REGS = 64
#: before Hopper (mma.sync): most accumulator + operand elements a thread that did not spill on sm_80
MMA_SYNC_MAX_TILE_REGS = 256
#: rows not 16-byte aligned (pointer path): most accumulator + operand elements a thread, by the
#: widest aligned load, that did not spill on sm_90a with Triton 3.6 and 3.9 (2-byte loads: 64; 4- and
#: 8-byte: 128, where 3.6's ptxas spilled from 160 and 3.9's from 208)
NARROW_MAX_TILE_REGS = ((4, 64), (16, 128))


def _max_tile_regs(vector_bytes: int) -> int:
    for below, cap in NARROW_MAX_TILE_REGS:
        if vector_bytes < below:
            return cap
    return 1 << 30
#: decode-like problems (M at most this): split-K variants come early in the known list
DECODE_M = 16
#: wgmma (Hopper's tensor-core instruction) is issued by a warpgroup of 4 warps
HOPPER_MIN_WARPS = 4

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); GROUP_M = 8 for all. See /work/shared/KNOWN_CONFIGS.md.
INDUCTOR_MM = (
    (32, 32, 16, 1, 2), (32, 32, 128, 2, 4), (32, 64, 32, 5, 8), (64, 32, 32, 5, 8),
    (64, 32, 128, 5, 4), (64, 64, 16, 2, 4), (64, 64, 32, 2, 4), (64, 64, 64, 3, 8),
    (64, 64, 128, 5, 4), (64, 128, 32, 3, 4), (64, 128, 32, 4, 8), (64, 128, 64, 3, 4),
    (64, 128, 128, 4, 4), (128, 64, 32, 3, 4), (128, 64, 32, 4, 8), (128, 128, 32, 2, 8),
    (128, 128, 32, 3, 4), (128, 128, 64, 3, 4), (128, 128, 64, 5, 8), (128, 128, 128, 4, 8),
)
TRITON_TUTORIAL = (
    (128, 256, 64, 3, 8), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4), (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4), (128, 32, 32, 4, 4), (64, 32, 32, 5, 2), (32, 64, 32, 5, 2),
    (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (256, 64, 128, 4, 4), (64, 256, 128, 4, 4),
    (128, 128, 128, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 32, 64, 4, 4),
)
# Inductor's persistent-TMA list (Hopper) and its skinny-M (mixed_mm) list.
INDUCTOR_PERSISTENT = (
    (128, 256, 64, 3, 8), (128, 128, 64, 3, 8), (128, 128, 128, 3, 8), (128, 128, 128, 3, 4),
    (128, 128, 64, 4, 8), (128, 128, 64, 5, 8), (256, 128, 64, 4, 8), (128, 128, 64, 5, 4),
)
INDUCTOR_SKINNY = ((16, 128, 256, 3, 4), (16, 128, 256, 5, 8))


@dataclasses.dataclass(frozen=True)
class GemmProblem:
    """One GEMM: ``C[b] = act(alpha * A[b] @ B[b] + beta * bias)`` with A: M x K, B: K x N.

    ``batch`` is 1 for the 2-D ops; ``a_layout``/``b_layout`` are "row" (last dim contiguous), "col"
    (second-to-last contiguous, e.g. a transposed operand) or "strided"; ``precision`` is "tf32" for
    float32 under PyTorch's "high"/"medium" matmul precision, else "ieee".
    """

    op: str
    batch: int
    M: int
    N: int
    K: int
    dtype: str
    a_layout: str = "row"
    b_layout: str = "row"
    bias: str = "none"
    activation: str = "none"
    precision: str = "ieee"

    def __post_init__(self):
        for field, value, allowed in (("op", self.op, OPS), ("dtype", self.dtype, ELEMENT_SIZE),
                                      ("a_layout", self.a_layout, LAYOUTS), ("b_layout", self.b_layout, LAYOUTS),
                                      ("bias", self.bias, BIAS_KINDS), ("activation", self.activation, ACTIVATIONS),
                                      ("precision", self.precision, PRECISIONS)):
            if value not in allowed:
                raise ValueError(f"GemmProblem.{field} must be one of {tuple(allowed)}, got {value!r}")
        if min(self.batch, self.M, self.N, self.K) < 0:
            raise ValueError("GemmProblem sizes must be non-negative")

    @property
    def element_size(self) -> int:
        return ELEMENT_SIZE[self.dtype]


def layout_of(t: torch.Tensor) -> str:
    """"row" if the last dim is contiguous, "col" if the one before it is, else "strided"."""
    st = t.stride()
    if st[-1] == 1:
        return "row"
    if st[-2] == 1:
        return "col"
    return "strided"


def bias_kind(bias, M: int, N: int) -> str:
    """The ``GemmProblem.bias`` kind of a bias broadcast to an (M, N) (or (B, M, N)) result."""
    if bias is None:
        return "none"
    if not isinstance(bias, torch.Tensor) or bias.dim() == 0 or bias.numel() == 1:
        return "scalar"
    shape = bias.shape
    if bias.dim() == 1 or shape[-2] == 1:
        return "row"
    if shape[-1] == 1:
        return "col"
    return "full"


def matmul_precision(dtype: str) -> str:
    """"tf32" for float32 when PyTorch's float32 matmul precision is not "highest", else "ieee"."""
    if dtype == "float32" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def gemm_problem(a: torch.Tensor, b: torch.Tensor, *, bias=None, activation: str = "none",
                 op: str = "mm") -> GemmProblem:
    """Describe ``act(a @ b + bias)`` as a GemmProblem (cheap: shapes and strides only).

    Args:
        a: [B,] M x K operand (any strides).
        b: [B,] K x N operand (any strides); for ``linear`` pass the transposed weight (``weight.t()``).
        bias: None (default), a Python number or 0-d/1-element tensor ("scalar"), an N-vector or 1 x N
            ("row"), an M x 1 tensor ("col") or an [B,] M x N tensor ("full").
        activation: "none" (default), "relu", "gelu_tanh" or "silu".
        op: the PyTorch op this call stands for: "mm" (default), "addmm", "bmm", "baddbmm" or "linear".

    Raises:
        UnsupportedProblem: a dtype other than float16/bfloat16/float32, or mixed dtypes.
    """
    dtype = DTYPE_NAMES.get(a.dtype)
    if dtype is None or b.dtype != a.dtype:
        raise UnsupportedProblem(f"GEMM supports float16/bfloat16/float32 operands of one dtype, "
                                 f"got {a.dtype} and {b.dtype}")
    sa, sb = a.shape, b.shape
    batch = sa[0] if len(sa) == 3 else (sb[0] if len(sb) == 3 else 1)
    M, K, N = sa[-2], sa[-1], sb[-1]
    return GemmProblem(op, batch, M, N, K, dtype, layout_of(a), layout_of(b), bias_kind(bias, M, N),
                       activation, matmul_precision(dtype))


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _blocks_for(dim: int) -> tuple[int, ...]:
    cap = max(16, _pow2_at_least(dim))
    return tuple(b for b in BLOCKS if b <= cap)


def space(problem: GemmProblem) -> dict[str, tuple[Value, ...]]:
    """The GEMM space for ``problem``: blocks up to the problem's size (next power of two, at least 16),
    SPLIT_K only where K allows a full BLOCK_K per split and the problem has few output tiles."""
    bms, bns = _blocks_for(problem.M), _blocks_for(problem.N)
    tiles_at_largest = problem.batch * _cdiv(problem.M, bms[-1]) * _cdiv(problem.N, bns[-1])
    if torch.are_deterministic_algorithms_enabled() or tiles_at_largest >= 2 * NOMINAL_SMS:
        splits = (1,)
    else:
        splits = tuple(s for s in SPLIT_KS if s == 1 or problem.K // s >= 16)
    sp = {"BLOCK_M": bms, "BLOCK_N": bns, "BLOCK_K": _blocks_for(problem.K), "GROUP_M": GROUP_MS,
          "num_warps": WARPS, "num_stages": STAGES, "SPLIT_K": splits, "TMA": TMAS}
    if _descriptors_fit(problem):  # descriptor-only axes, only where descriptors can serve the problem
        sp.update(WARP_SPEC=(0, 1), PERSISTENT=(0, 1))
        sp.update(DESCRIPTOR_STORE_AXES)
    return sp


#: Axes of the descriptor path added after WARP_SPEC/PERSISTENT (issue 18): A/B (and C) descriptors made
#: on the host once per launch instead of in every program; the output written by a TMA store; its
#: epilogue and store run on two halves of the tile along N (epilogue subtiling). 0 = off, as before.
DESCRIPTOR_STORE_AXES = {"HOST_DESC": (0, 1), "TMA_STORE": (0, 1), "EPI_SUBTILE": (0, 1)}


def host_descriptors_available() -> bool:
    """Whether the installed Triton takes host-made tensor descriptors (``triton.tools.tensor_descriptor``,
    Triton >= 3.3; 3.6 and 3.9 have it, their interpreters too)."""
    from . import _compat  # imports Triton: only asked when a config sets HOST_DESC

    return _compat.HAS_HOST_TENSOR_DESCRIPTOR


def tma_possible(problem: GemmProblem, limits: DeviceLimits) -> bool:
    """Whether tensor descriptors can serve this problem on this device, assuming operands that are
    contiguous in their layout (``launch`` re-checks the real strides and falls back to pointers)."""
    return limits.is_hopper and _descriptors_fit(problem)


def _descriptors_fit(problem: GemmProblem) -> bool:
    if "strided" in (problem.a_layout, problem.b_layout):
        return False
    if problem.dtype == "float32" and problem.precision == "ieee":
        # No tensor cores for IEEE float32: the FMA dot on descriptor-loaded tiles spills 5-40 KB per
        # thread at every tile size compiled for sm_90a (docs/kernels.md), the pointer path does not.
        return False
    es = problem.element_size
    a_lead = problem.K if problem.a_layout == "row" else problem.M
    b_lead = problem.N if problem.b_layout == "row" else problem.K
    return (a_lead * es) % 16 == 0 and (b_lead * es) % 16 == 0


def vector_bytes(problem: GemmProblem) -> int:
    """Widest aligned load (bytes, at most 16) the pointer path can use on both operands' rows, for
    operands contiguous in their layout: the largest power of two dividing both leading strides in
    bytes (the kernel is told this divisibility, see gemm.py's A_DIV/B_DIV)."""
    es = problem.element_size
    if "strided" in (problem.a_layout, problem.b_layout):
        return es
    a_lead = problem.K if problem.a_layout == "row" else problem.M
    b_lead = problem.N if problem.b_layout == "row" else problem.K
    v = 16
    for lead in (a_lead, b_lead):
        if lead > 1:
            b = lead * es
            v = min(v, b & -b)
    return v


def check(config: Mapping[str, Value], problem: GemmProblem, limits: DeviceLimits) -> str | None:
    """None when ``config`` is valid for ``problem`` on ``limits``, else the reason (see module doc)."""
    try:
        bm, bn, bk = int(config["BLOCK_M"]), int(config["BLOCK_N"]), int(config["BLOCK_K"])
        gm, warps, stages = int(config["GROUP_M"]), int(config["num_warps"]), int(config["num_stages"])
        sk, tma = int(config.get("SPLIT_K", 1)), int(config.get("TMA", 0))
    except (KeyError, TypeError, ValueError) as e:
        return f"malformed GEMM config: {e!r}"
    if bm not in BLOCKS or bn not in BLOCKS or bk not in BLOCKS:
        return "block sizes must be powers of two in 16..256"
    if gm < 1 or warps not in (1, 2, 4, 8, 16) or stages < 1 or sk not in SPLIT_KS or tma not in TMAS:
        return "GROUP_M >= 1, num_warps in 1..16 (power of 2), num_stages >= 1, SPLIT_K in 1..16, TMA 0/1"
    M, N, K = problem.M, problem.N, problem.K
    if bm > max(16, _pow2_at_least(M)) or bn > max(16, _pow2_at_least(N)) or bk > max(16, _pow2_at_least(K)):
        return "a block is larger than the problem (next power of two)"
    if bm * bn < 128 * warps:
        return "more warps than 16x8 MMA tiles in the block"
    if _cdiv(bm * bn, warps * 32) > MAX_ACC_REGS:
        return "accumulator needs more than 255 registers per thread"
    acc_regs = _cdiv(bm * bn, 32 * warps)
    operand_regs = _cdiv((bm + bn) * bk, 32 * warps)  # one A and one B tile, elements per thread
    if problem.dtype == "float32" and problem.precision == "ieee" and acc_regs > FMA_MAX_ACC_REGS:
        # float32 "highest" runs on FMA units, whose dot keeps operand fragments in registers beside the
        # accumulator: 128 accumulator registers a thread spill on sm_90a and sm_80, 64 do not.
        return f"float32 'ieee' (FMA) tiles over {FMA_MAX_ACC_REGS} accumulator registers a thread spill"
    if problem.dtype == "float32" and problem.precision == "ieee" and operand_regs > FMA_MAX_OPERAND_REGS:
        # ... and over 64 operand elements a thread (e.g. 128x32x64 or 64x128x64 with 4 warps) they spilled
        # 0.4-2 KB on sm_80 (compile gate, --arch sm_80).
        return f"float32 'ieee' (FMA) tiles over {FMA_MAX_OPERAND_REGS} operand elements a thread spill"
    if limits.capability[0] < 9 and not limits.interpreter and acc_regs + operand_regs > MMA_SYNC_MAX_TILE_REGS:
        # Before Hopper, mma.sync takes its A and B fragments from registers (wgmma reads shared memory):
        # on sm_80 tiles of 384+ accumulator + operand elements a thread spilled, 256 did not.
        return "the tile's fragments would spill on mma.sync (before Hopper)"
    why = _spill_rule(bm, bn, bk, warps, tma, acc_regs, operand_regs, problem, limits)
    if why is not None:
        return why
    if not tma and acc_regs + operand_regs > _max_tile_regs(vector_bytes(problem)):
        # Rows that are not 16-byte aligned load in narrower pieces, each with its own 64-bit address:
        # 2-byte pieces (odd leading dimensions in 16-bit) also lose cp.async pipelining. Large tiles
        # spill there; the caps are what never spilled when compiled for sm_90a (docs/kernels.md).
        return "rows not 16-byte aligned load in narrow pieces: the tile would spill"
    if limits.is_hopper and warps < HOPPER_MIN_WARPS and bm * bn >= 128 * HOPPER_MIN_WARPS:
        # Hopper's tensor cores run wgmma, issued by a warpgroup (4 warps); with 2 warps Triton falls back
        # to Ampere's mma.sync at a fraction of the rate (seen in the compiled PTX, docs/kernels.md), and
        # Inductor keeps 2 warps out of its Hopper templates. Tiles too small for 4 warps keep 2.
        return "fewer than 4 warps cannot use Hopper's wgmma"
    es = problem.element_size
    smem = stages * (bm * bk + bk * bn) * es
    if int(config.get("TMA_STORE", 0)):
        # a TMA store stages the output tile (half of it when subtiled) in shared memory: beside the
        # pipeline's buffers in a persistent program, which goes on loading; in their place otherwise
        # (what Triton 3.6 and 3.9 allocate for sm_90a, compile gate)
        staging = bm * bn * es // (1 + int(config.get("EPI_SUBTILE", 0)))
        smem = smem + staging if int(config.get("PERSISTENT", 0)) else max(smem, staging)
    if not limits.interpreter and smem > limits.smem_per_block:
        return f"shared memory {smem} B exceeds the device's {limits.smem_per_block} B"
    if sk > 1:
        if torch.are_deterministic_algorithms_enabled():
            return "SPLIT_K > 1 is not offered under deterministic algorithms"
        if K // sk < bk:
            return "K / SPLIT_K is smaller than BLOCK_K"
        sms = NOMINAL_SMS if limits.interpreter else limits.num_sms
        tiles = problem.batch * _cdiv(M, bm) * _cdiv(N, bn)
        if tiles >= sms:
            return "enough output tiles to fill the device without SPLIT_K"
        if tiles * sk > 4 * sms:
            return "SPLIT_K splits K into more programs than 4 waves"
    if stages > max(2, _cdiv(K, bk * sk) + 1):
        return "more pipeline stages than K iterations"
    npm, npn = _cdiv(M, bm), _cdiv(N, bn)
    if gm != 8 and (npm <= 1 or npn <= 1):
        return "GROUP_M changes nothing with one tile row or column (8 stands for all)"
    if gm == 4 and npm <= 4:
        return "GROUP_M=4 orders tiles like GROUP_M=8 here"
    if tma and not tma_possible(problem, limits):
        return "tensor descriptors need Hopper, row/col layouts and 16-byte aligned leading strides"
    ws, persistent = int(config.get("WARP_SPEC", 0)), int(config.get("PERSISTENT", 0))
    if ws or persistent:
        if not tma:
            return "WARP_SPEC and PERSISTENT are variants of the descriptor (TMA) path"
        if ws and warps != 4:
            # Triton 3.6 and 3.9 honour warp_specialize on sm_90a with 4 warps and silently ignore it
            # with 8 (no setmaxnreg in the PTX): the 8-warp variant would only repeat the plain one.
            return "warp specialisation is honoured with 4 warps only"
        if ws and (problem.element_size != 2 or bn > 128):
            # Both Triton 3.6 and 3.9 fail to compile the warp-specialised loop for sm_90a with float32
            # (tf32) operands and with BLOCK_N = 256 ("failed to find valid wgmma layout"), compile gate.
            return "warp specialisation compiles only for 16-bit operands and BLOCK_N <= 128"
        if persistent:
            if sk > 1 or problem.batch > 1:
                return "the persistent variant walks the tiles of one output without split-K"
            sms = NOMINAL_SMS if limits.interpreter else limits.num_sms
            if _cdiv(M, bm) * _cdiv(N, bn) <= sms:
                # one tile per program anyway: persistence only pays with several tiles per SM
                return "the persistent variant needs more output tiles than SMs"
    return _check_descriptor_store(config, problem, tma, sk, bn)


def _check_descriptor_store(config: Mapping[str, Value], problem: GemmProblem, tma: int, sk: int,
                            bn: int) -> str | None:
    """The rules of HOST_DESC, TMA_STORE and EPI_SUBTILE (``DESCRIPTOR_STORE_AXES``)."""
    host, store, subtile = (int(config.get(k, 0)) for k in DESCRIPTOR_STORE_AXES)
    if not (host or store or subtile):
        return None
    if not tma:
        return "HOST_DESC, TMA_STORE and EPI_SUBTILE are variants of the descriptor (TMA) path"
    if host and problem.batch > 1:
        # a host descriptor describes one 2-D operand; batches would need 3-D descriptors
        return "host-made descriptors serve batch 1 only"
    if host and not host_descriptors_available():
        return "this Triton has no host-made tensor descriptors (triton.tools.tensor_descriptor)"
    if store and sk > 1:
        # split-K's partial sums go to the fp32 workspace through pointers; its epilogue kernel stores C
        return "the TMA store writes the final output: not with SPLIT_K"
    if store and (problem.N * problem.element_size) % 16:
        # a TMA descriptor's strides must be multiples of 16 bytes: the output's rows are N elements
        return "the TMA store needs 16-byte aligned output rows"
    if subtile and not store:
        return "epilogue subtiling is a variant of the TMA store"
    if subtile and bn < 32:
        return "epilogue subtiling halves BLOCK_N: needs BLOCK_N >= 32"
    if int(config.get("WARP_SPEC", 0)) and (host or subtile):
        # compiling for sm_90a fails ("PassManager::run failed") for the warp-specialised loop with
        # host-made descriptors on Triton 3.9 and with a subtiled epilogue on 3.6 (compile gate)
        return "warp specialisation does not compile with HOST_DESC or EPI_SUBTILE"
    return None


# --- rules against the last spills (issue 18): each from compiling the known configurations for sm_90a
# with Triton 3.6's ptxas 12.8 and Triton 3.9's ptxas 13 (which Triton runs with --regAllocOptLevel=2).
# Without a register limit ptxas aims at an occupancy step (at most 96, 128 or 168 registers for
# 128-thread blocks; 80 or 128 for 256-thread ones) and, when a kernel needs a little more, spills 4-20 B
# to get there (a `.maxnreg` in the PTX makes the same kernels compile without spills, at more
# registers). Which tiles sit just above a step is not predictable from the tile; these rules keep the
# tile families out whose register need lands there, for every problem, not single configurations.

#: float32 'ieee' (FMA) with fewer than 8 warps: most accumulator registers a thread
FMA_MAX_ACC_REGS_FEW_WARPS = 16
#: ... and most A + B tile elements a K step, whatever the warps (64 a thread at 4 warps, as before)
FMA_MAX_OPERAND_TILE = FMA_MAX_OPERAND_REGS * 128
#: operands loaded in 2-byte pieces (odd leading dimensions in 16-bit): most operand elements a thread
NARROW_MAX_OPERAND_REGS = 32
#: Hopper's pointer path on tiles of fewer rows than a warpgroup's wgmma (mma.sync): most columns
MMA_SYNC_POINTER_MAX_BLOCK_N = 128


def _fma(problem: GemmProblem) -> bool:
    return problem.dtype == "float32" and problem.precision == "ieee"


def _spill_rule(bm: int, bn: int, bk: int, warps: int, tma: int, acc_regs: int, operand_regs: int,
                problem: GemmProblem, limits: DeviceLimits) -> str | None:
    """Why a tile would spill a few bytes or more (see above), or None."""
    if _fma(problem) and warps < 8 and acc_regs > FMA_MAX_ACC_REGS_FEW_WARPS:
        # FMA tiles keep each thread's accumulator block and its operand slices in registers: 4-warp
        # tiles of 64x64 and more (32-64 accumulators a thread) needed 96-204 registers and spilled 4-20 B
        # in 5 of 26 builds (64x64, 128x64, 64x128 at 2-4 stages, both ptxas); over 8 warps the same tiles
        # never did on sm_90a. ``_fit`` spreads them over 8 warps.
        return (f"float32 'ieee' (FMA) tiles with fewer than 8 warps over {FMA_MAX_ACC_REGS_FEW_WARPS} "
                "accumulator registers a thread spill")
    if _fma(problem) and (bm + bn) * bk > FMA_MAX_OPERAND_TILE:
        # Spreading the tile over 8 warps does not spread the FMA dot's operand reads: 128x32x64 and
        # 64x128x64 with 8 warps (40 and 48 operand elements a thread) spilled 188 and 312 B on sm_80, as
        # they did with 4 (80 and 96, see FMA_MAX_OPERAND_REGS).
        return f"float32 'ieee' (FMA) tiles over {FMA_MAX_OPERAND_TILE} operand elements a K step spill"
    if not tma and vector_bytes(problem) < 4 and operand_regs > NARROW_MAX_OPERAND_REGS:
        # Each 2-byte piece is its own load with its own 64-bit address: the registers follow the operand
        # elements a thread (32: 168-250 registers; 36, e.g. 16x128x64 with 8 warps: 255 and 44 B spilled).
        return f"operands in 2-byte pieces: over {NARROW_MAX_OPERAND_REGS} elements a thread spill"
    if limits.is_hopper and not tma and bm < 64 and bn > MMA_SYNC_POINTER_MAX_BLOCK_N:
        # Under 64 rows Hopper runs mma.sync (B fragments in registers) and the pointer path keeps a
        # 64-bit address per 16-byte piece of the wide B tile: 16x256 tiles needed 64-137 registers and
        # spilled 4-8 B in 5 of 20 builds (decode, both ptxas), 16x128 in 1 of 12 (16x128x128 with 4
        # warps, no known configuration); the descriptor path's 16x256 tiles (48-68 registers) never.
        return f"Hopper's mma.sync pointer path over {MMA_SYNC_POINTER_MAX_BLOCK_N} columns spills"
    return None


def _fit(entry: tuple[int, int, int, int, int], problem: GemmProblem,
         limits: DeviceLimits | None = None) -> dict[str, Value]:
    """Fit one (BM, BN, BK, stages, warps) entry to the problem like Inductor does: blocks clamped to
    the dims' next power of two (at least 16), warps to one per 256 accumulator elements (at least 2;
    at least 4 on Hopper where the tile allows them, see ``check``; None: Inductor's own fit, floor 2)."""
    bm, bn, bk, stages, warps = entry
    bm = max(min(bm, _pow2_at_least(problem.M)), 16)
    bn = max(min(bn, _pow2_at_least(problem.N)), 16)
    bk = max(min(bk, _pow2_at_least(problem.K)), 16)
    floor = HOPPER_MIN_WARPS if limits is not None and limits.is_hopper and bm * bn >= 128 * HOPPER_MIN_WARPS else 2
    warps = max(floor, min(warps, bm * bn // 256))
    if _fma(problem):  # the same tile over more warps, as _spill_rule wants
        while warps < max(WARPS) and _cdiv(bm * bn, 32 * warps) > FMA_MAX_ACC_REGS_FEW_WARPS:
            warps *= 2
    stages = min(stages, max(2, _cdiv(problem.K, bk) + 1))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps,
            "num_stages": stages, "SPLIT_K": 1, "TMA": 0}


def _split_variant(cfg: dict[str, Value], problem: GemmProblem, limits: DeviceLimits) -> dict | None:
    sms = NOMINAL_SMS if limits.interpreter else limits.num_sms
    tiles = problem.batch * _cdiv(problem.M, int(cfg["BLOCK_M"])) * _cdiv(problem.N, int(cfg["BLOCK_N"]))
    for sk in (16, 8, 4, 2):
        if tiles * sk <= 2 * sms and problem.K // sk >= int(cfg["BLOCK_K"]):
            iters = _cdiv(problem.K, int(cfg["BLOCK_K"]) * sk)
            return dict(cfg, SPLIT_K=sk, num_stages=min(int(cfg["num_stages"]), max(2, iters + 1)))
    return None


def known_configs(problem: GemmProblem, limits: DeviceLimits) -> list[Config]:
    """Triton's tutorial list, Inductor's mm list (and its persistent list on Hopper, its skinny-M list
    for M <= 64), fitted to the problem, with TMA on where possible, then SPLIT_K variants for problems
    with few output tiles; filtered by ``check`` and deduplicated, in that order."""
    entries = list(TRITON_TUTORIAL) + list(INDUCTOR_MM)
    if limits.is_hopper:
        entries += INDUCTOR_PERSISTENT
    if problem.M <= 64:
        entries = list(INDUCTOR_SKINNY) + entries
    base = [_fit(e, problem, limits) for e in entries]
    if _descriptors_fit(problem):  # the space has the descriptor-only axes: so must its configs
        base = [dict(c, WARP_SPEC=0, PERSISTENT=0, HOST_DESC=0, TMA_STORE=0, EPI_SUBTILE=0) for c in base]
    ordered: list[dict[str, Value]] = []
    if tma_possible(problem, limits):
        tma = [dict(c, TMA=1) for c in base]
        # Hopper's variants early enough for a short budget: Inductor's persistent-TMA list as persistent
        # programs (large problems), and warp specialisation of the first 4-warp entries.
        persistent = [dict(_fit(e, problem, limits), TMA=1, WARP_SPEC=0, PERSISTENT=1, HOST_DESC=0, TMA_STORE=0,
                           EPI_SUBTILE=0) for e in INDUCTOR_PERSISTENT]
        ws = [dict(c, WARP_SPEC=1) for c in tma if c["num_warps"] == 4][:4]
        # ... and Triton's persistent-TMA tutorial's form: host-made descriptors, a TMA store with epilogue
        # subtiling, on the first persistent entries; plus a TMA store on the first plain ones
        host = [dict(c, HOST_DESC=1, TMA_STORE=1, EPI_SUBTILE=1) for c in persistent[:2]]
        host += [dict(c, HOST_DESC=1, TMA_STORE=1) for c in tma[:1]] + [dict(c, TMA_STORE=1) for c in tma[1:2]]
        ordered += tma[:8] + persistent[:4] + ws + host + tma[8:] + persistent[4:]
        ordered += base[:8]  # the pointer path too, in case descriptors lose on this shape
    else:
        ordered += base
    pairs = [(c, _split_variant(c, problem, limits)) for c in ordered[:12]]
    if problem.M <= DECODE_M:
        # Decode shapes: a handful of output tiles and a long K, where split-K is what fills the device;
        # a tuning budget of ~10 s measures only the first dozen or so, so each split variant follows
        # its unsplit configuration instead of trailing the list (it was number 41 of 50).
        ordered = [x for c, v in pairs for x in (c, v) if x is not None] + ordered[12:]
    else:
        ordered += [v for _, v in pairs if v is not None]
    seen: set[Config] = set()
    out: list[Config] = []
    for c in ordered:
        cfg = Config.from_dict(c)
        if cfg not in seen and check(c, problem, limits) is None:
            seen.add(cfg)
            out.append(cfg)
    return out
