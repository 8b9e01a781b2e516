"""The GEMM kernel family: ``C = act(alpha * A @ B + beta * bias)``, batched, any strides, fused epilogue.

Three layers: the Triton kernels (``_gemm_kernel`` and the split-K epilogue), the launcher ``gemm()``
that the custom ops call, and ``GemmFamily`` (space, validity, known configurations, inputs, reference)
that the tuner searches. The space and the problem description live in ``gemm_space`` (pure Python).

Kernel design (for Hopper and Ampere):
- grouped tile order (GROUP_M rows of tiles share B tiles in L2); batch folded into grid axis 0, split-K
  programs on axis 1;
- fp32 accumulation; float32 operands use ``input_precision`` "ieee" or "tf32" following
  ``torch.get_float32_matmul_precision()``; under the interpreter bf16 operands are upcast to fp32
  before ``tl.dot`` (``_compat.UPCAST_BF16_DOT``), since it multiplies bf16 as raw bits;
- the main K loop runs without masks: M/N edges are wrapped (``% M``) on an operand's strided dim and
  masked only on its contiguous dim (keeping vectorised loads), the K remainder is one peeled, masked
  iteration, left out entirely when BLOCK_K * SPLIT_K divides K (EVEN_K);
- with TMA=1 on Hopper (and under the interpreter, which emulates them), operands are read through
  tensor descriptors (``tl.make_tensor_descriptor``), whose out-of-bounds zero fill needs no masks;
  ``gemm()`` falls back to pointers when the strides or the alignment do not allow descriptors;
  variants of that path: PERSISTENT (one program per SM walks the tiles), WARP_SPEC, HOST_DESC
  (descriptors made on the host once per launch, ``triton.tools.tensor_descriptor``), TMA_STORE (the
  output written through a descriptor) and EPI_SUBTILE (epilogue and store on two halves of the tile);
- epilogue fused: alpha, bias (scalar, row, column or full, any strides, in fp32), activation, cast on
  store; SPLIT_K > 1 stores each split's fp32 partial sum into its slice of a workspace (no zeroing, no
  atomics) and a second small kernel adds them up in split order and applies the epilogue (the space
  still drops SPLIT_K under deterministic algorithms, as when the partials were added atomically).

``gemm()`` works out every argument at each call; ``bind()`` does it once for calls that differ only in
their tensors (the run-time dispatch's key fixes sizes, strides, dtypes and scalars) and returns a
``BoundGemm`` that launches the compiled kernel directly (``_launch.Launcher``).
"""
from __future__ import annotations

import functools
from typing import Mapping

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..errors import InvalidConfig, UnsupportedProblem
from . import _compat
from ._jit import ACTIVATION_CODES, activate, mma, tile_order
from .base import Config, DeviceLimits, KernelFamily, Value
from .gemm_space import (DESCRIPTOR_STORE_AXES, TORCH_DTYPES, GemmProblem, check, gemm_problem,
                         known_configs, space)

__all__ = ["gemm", "bind", "BoundGemm", "GemmFamily", "GemmProblem", "gemm_problem", "GEMM", "ACTIVATIONS"]

ACTIVATIONS = ACTIVATION_CODES
# BIAS constexpr: how the epilogue reads the bias.
_NO_BIAS, _BIAS_VALUE, _BIAS_SCALAR, _BIAS_ROW, _BIAS_COL, _BIAS_FULL = range(6)
_INT32_MAX = 2**31 - 1
_EPILOGUE_BLOCK = 64


@triton.jit
def _epilogue(acc, rm, rn, M, N, bias_ptr, stride_xm, stride_xn, beta, bias_value,
              BIAS: tl.constexpr, ACT: tl.constexpr):
    """acc (fp32, alpha already applied) + beta * bias, then the activation, all in fp32."""
    if BIAS == 1:  # a Python number, beta already applied
        acc += bias_value
    elif BIAS == 2:  # one element, broadcast
        acc += beta * tl.load(bias_ptr).to(tl.float32)
    elif BIAS == 3:  # a row vector over N
        x = tl.load(bias_ptr + rn * stride_xn, mask=rn < N, other=0.0)
        acc += beta * x.to(tl.float32)[None, :]
    elif BIAS == 4:  # a column vector over M
        x = tl.load(bias_ptr + rm * stride_xm, mask=rm < M, other=0.0)
        acc += beta * x.to(tl.float32)[:, None]
    elif BIAS == 5:  # a full M x N matrix
        x = tl.load(bias_ptr + rm[:, None] * stride_xm + rn[None, :] * stride_xn,
                    mask=(rm < M)[:, None] & (rn < N)[None, :], other=0.0)
        acc += beta * x.to(tl.float32)
    return activate(acc, ACT)


@triton.jit
def _known_multiple(x, DIV: tl.constexpr):
    """``x`` with the compiler told that the power of two DIV divides it (it must)."""
    if DIV > 1:
        x = (x // DIV) * DIV
    return x


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    stride_xb, stride_xm, stride_xn,
    alpha, beta, bias_value,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    A_ROW: tl.constexpr, A_COL: tl.constexpr, B_ROW: tl.constexpr, B_COL: tl.constexpr,
    BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    USE_TMA: tl.constexpr, INDEX_64: tl.constexpr,
    A_DIV: tl.constexpr = 1, B_DIV: tl.constexpr = 1, C_DIV: tl.constexpr = 1,
    WARP_SPEC: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
    HOST_DESC: tl.constexpr = False, TMA_STORE: tl.constexpr = False, EPI_SPLIT: tl.constexpr = 1,
):
    # A_ROW: A's K dim is contiguous; A_COL: its M dim is (A transposed). At most one is set.
    # B_ROW: B's N dim is contiguous; B_COL: its K dim is (B transposed, e.g. a linear weight).
    # A_DIV/B_DIV/C_DIV: a power of two dividing the operand's leading and batch strides, which a launch
    # does not tell the compiler (Triton only specialises integers on divisibility by 16); multiplying
    # back by the constexpr does, so rows stay aligned and loads/stores vectorise (e.g. 8-byte loads of
    # fp16 rows with a leading dimension of 4100).
    stride_ab = _known_multiple(stride_ab, A_DIV)
    if A_ROW:
        stride_am = _known_multiple(stride_am, A_DIV)
    else:
        stride_ak = _known_multiple(stride_ak, A_DIV)
    stride_bb = _known_multiple(stride_bb, B_DIV)
    if B_ROW:
        stride_bk = _known_multiple(stride_bk, B_DIV)
    else:
        stride_bn = _known_multiple(stride_bn, B_DIV)
    stride_cb = _known_multiple(stride_cb, C_DIV)
    stride_cm = _known_multiple(stride_cm, C_DIV)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tiles = num_pid_m * num_pid_n
    if PERSISTENT:
        # One program per SM walks the output tiles (TMA, batch 1, SPLIT_K 1; the launcher ensures it):
        # the descriptors are made once per program, not once per tile.
        if HOST_DESC:  # made on the host, once per launch (a_ptr, b_ptr are TensorDescriptors)
            a_desc, b_desc = a_ptr, b_ptr
        else:
            a_desc, b_desc = _descriptors(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                                          BLOCK_M, BLOCK_N, BLOCK_K, A_ROW, B_ROW)
        for t in tl.range(tl.program_id(0), tiles, tl.num_programs(0)):
            pid_m, pid_n = tile_order(t, num_pid_m, num_pid_n, GROUP_M)
            acc = _tma_mainloop(a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, 0, K, BLOCK_M, BLOCK_N,
                                BLOCK_K, 1, A_ROW, B_ROW, PRECISION, UPCAST, WARP_SPEC)
            if TMA_STORE:
                _store_tile_tma(acc, pid_m, pid_n, 0, c_ptr, bias_ptr, M, N, stride_cb, stride_cm,
                                stride_xb, stride_xm, stride_xn, alpha, beta, bias_value, BLOCK_M, BLOCK_N,
                                BIAS, ACT, INDEX_64, HOST_DESC, EPI_SPLIT)
            else:
                _store_tile(acc, pid_m, pid_n, 0, 0, c_ptr, bias_ptr, M, N, stride_cb, stride_cm, stride_cn,
                            stride_xb, stride_xm, stride_xn, alpha, beta, bias_value, BLOCK_M, BLOCK_N, 1,
                            BIAS, ACT, INDEX_64)
    else:
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_b = (pid // tiles).to(tl.int64)
        pid_m, pid_n = tile_order(pid % tiles, num_pid_m, num_pid_n, GROUP_M)
        if USE_TMA:
            # Descriptors zero-fill out-of-bounds reads: no masks, no wrapping. Host-made ones (HOST_DESC)
            # come as the a_ptr/b_ptr arguments (batch 1; the launcher ensures it).
            if HOST_DESC:
                a_desc, b_desc = a_ptr, b_ptr
            else:
                a_desc, b_desc = _descriptors(a_ptr + pid_b * stride_ab, b_ptr + pid_b * stride_bb, M, N, K,
                                              stride_am, stride_ak, stride_bk, stride_bn,
                                              BLOCK_M, BLOCK_N, BLOCK_K, A_ROW, B_ROW)
            acc = _tma_mainloop(a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, pid_k, K, BLOCK_M, BLOCK_N,
                                BLOCK_K, SPLIT_K, A_ROW, B_ROW, PRECISION, UPCAST, WARP_SPEC)
        else:
            acc = _pointer_mainloop(a_ptr + pid_b * stride_ab, b_ptr + pid_b * stride_bb, M, N, K,
                                    stride_am, stride_ak, stride_bk, stride_bn,
                                    pid_m, pid_n, pid_k, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, EVEN_K,
                                    A_COL, B_ROW, PRECISION, UPCAST, INDEX_64)
        if TMA_STORE:  # SPLIT_K == 1 (the launcher ensures it)
            _store_tile_tma(acc, pid_m, pid_n, pid_b, c_ptr, bias_ptr, M, N, stride_cb, stride_cm,
                            stride_xb, stride_xm, stride_xn, alpha, beta, bias_value, BLOCK_M, BLOCK_N,
                            BIAS, ACT, INDEX_64, HOST_DESC, EPI_SPLIT)
        else:
            _store_tile(acc, pid_m, pid_n, pid_b, pid_k, c_ptr, bias_ptr, M, N, stride_cb, stride_cm,
                        stride_cn, stride_xb, stride_xm, stride_xn, alpha, beta, bias_value, BLOCK_M, BLOCK_N,
                        SPLIT_K, BIAS, ACT, INDEX_64)


@triton.jit
def _descriptors(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 A_ROW: tl.constexpr, B_ROW: tl.constexpr):
    """Device-side tensor descriptors of A and B (a column-major operand is described transposed)."""
    if A_ROW:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
    else:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[K, M], strides=[stride_ak, 1],
                                           block_shape=[BLOCK_K, BLOCK_M])
    if B_ROW:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_bk, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    return a_desc, b_desc


@triton.jit
def _tma_mainloop(a_desc, b_desc, off_m, off_n, pid_k, K,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                  A_ROW: tl.constexpr, B_ROW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  WARP_SPEC: tl.constexpr):
    """The K loop through descriptors; WARP_SPEC lets Triton split it into producer (TMA) and consumer
    (wgmma) warps (honoured on Hopper with 4 warps in Triton 3.6, ignored elsewhere)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    STEP: tl.constexpr = BLOCK_K * SPLIT_K
    for ki in tl.range(0, tl.cdiv(K, STEP), warp_specialize=WARP_SPEC):
        off_k = (ki * SPLIT_K + pid_k) * BLOCK_K
        if A_ROW:
            a = a_desc.load([off_m, off_k])
        else:
            a = a_desc.load([off_k, off_m]).T
        if B_ROW:
            b = b_desc.load([off_k, off_n])
        else:
            b = b_desc.load([off_n, off_k]).T
        acc = mma(a, b, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _pointer_mainloop(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n, pid_k,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, A_COL: tl.constexpr, B_ROW: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, INDEX_64: tl.constexpr):
    """The K loop through pointers (any strides)."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    STEP: tl.constexpr = BLOCK_K * SPLIT_K
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    # On an operand's contiguous dim keep offsets contiguous (vector loads) and mask the edge;
    # on its strided dim wrap the edge instead (wrapped rows/columns are never stored).
    if A_COL:
        am = tl.max_contiguous(tl.multiple_of(rm, BLOCK_M), BLOCK_M)
    else:
        am = rm % M
    if B_ROW:
        bn = tl.max_contiguous(tl.multiple_of(rn, BLOCK_N), BLOCK_N)
    else:
        bn = rn % N
    if INDEX_64:
        am = am.to(tl.int64)
        bn = bn.to(tl.int64)
        rk_off = rk.to(tl.int64)
    else:
        rk_off = rk
    a_ptrs = a_ptr + am[:, None] * stride_am + rk_off[None, :] * stride_ak
    b_ptrs = b_ptr + rk_off[:, None] * stride_bk + bn[None, :] * stride_bn
    a_step = STEP * stride_ak
    b_step = STEP * stride_bk
    k_full = K // STEP
    for _ in range(0, k_full):
        if A_COL:
            a = tl.load(a_ptrs, mask=(rm < M)[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs)
        if B_ROW:
            b = tl.load(b_ptrs, mask=(rn < N)[None, :], other=0.0)
        else:
            b = tl.load(b_ptrs)
        acc = mma(a, b, acc, PRECISION, UPCAST)
        a_ptrs += a_step
        b_ptrs += b_step
    if not EVEN_K:  # the K remainder: one masked iteration
        k_ok = rk < K - k_full * STEP
        if A_COL:
            a = tl.load(a_ptrs, mask=(rm < M)[:, None] & k_ok[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        if B_ROW:
            b = tl.load(b_ptrs, mask=k_ok[:, None] & (rn < N)[None, :], other=0.0)
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = mma(a, b, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _store_tile(acc, pid_m, pid_n, pid_b, pid_k, c_ptr, bias_ptr, M, N, stride_cb, stride_cm, stride_cn,
                stride_xb, stride_xm, stride_xn, alpha, beta, bias_value,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, BIAS: tl.constexpr,
                ACT: tl.constexpr, INDEX_64: tl.constexpr):
    """alpha, the epilogue and the masked store of one tile (the fp32 partial sum into split ``pid_k``'s
    slice of the workspace when SPLIT_K > 1)."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if INDEX_64:
        cm = rm.to(tl.int64)
        cn = rn.to(tl.int64)
    else:
        cm = rm
        cn = rn
    c_ptrs = c_ptr + pid_b * stride_cb + cm[:, None] * stride_cm + cn[None, :] * stride_cn
    acc = acc * alpha
    if SPLIT_K == 1:
        acc = _epilogue(acc, cm, cn, M, N, bias_ptr + pid_b * stride_xb, stride_xm, stride_xn, beta,
                        bias_value, BIAS, ACT)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:  # c_ptr is the fp32 workspace [batch, SPLIT_K, M, N]: this split's partial sum, which
        # _splitk_epilogue_kernel adds up in a fixed order (no zeroing, no atomics)
        if INDEX_64:
            c_ptrs += pid_k.to(tl.int64) * M * N
        else:
            c_ptrs += pid_k * M * N
        tl.store(c_ptrs, acc, mask=mask)


@triton.jit
def _store_tile_tma(acc, pid_m, pid_n, pid_b, c_ptr, bias_ptr, M, N, stride_cb, stride_cm,
                    stride_xb, stride_xm, stride_xn, alpha, beta, bias_value,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BIAS: tl.constexpr, ACT: tl.constexpr,
                    INDEX_64: tl.constexpr, HOST_DESC: tl.constexpr, EPI_SPLIT: tl.constexpr):
    """alpha, the epilogue and a TMA store of one output tile (the store clips the tile at M and N, no
    masks). ``c_ptr`` is the output's host-made descriptor (HOST_DESC) or its pointer (a descriptor is
    made here). EPI_SPLIT = 2 runs the epilogue and the store on the two halves of the tile along N in
    turn (epilogue subtiling: half the live fp32 registers and half the shared staging buffer)."""
    SUB_N: tl.constexpr = BLOCK_N // EPI_SPLIT
    if HOST_DESC:
        c_desc = c_ptr
    else:
        c_desc = tl.make_tensor_descriptor(c_ptr + pid_b * stride_cb, shape=[M, N], strides=[stride_cm, 1],
                                           block_shape=[BLOCK_M, SUB_N])
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, SUB_N)
    if INDEX_64:
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
    bias_ptr += pid_b * stride_xb
    acc = acc * alpha
    if EPI_SPLIT == 2:
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, SUB_N)), (0, 2, 1))
        acc0, acc1 = tl.split(halves)
        acc0 = _epilogue(acc0, rm, rn, M, N, bias_ptr, stride_xm, stride_xn, beta, bias_value, BIAS, ACT)
        c_desc.store([off_m, off_n], acc0.to(c_desc.dtype))
        acc1 = _epilogue(acc1, rm, rn + SUB_N, M, N, bias_ptr, stride_xm, stride_xn, beta, bias_value, BIAS,
                         ACT)
        c_desc.store([off_m, off_n + SUB_N], acc1.to(c_desc.dtype))
    else:
        acc = _epilogue(acc, rm, rn, M, N, bias_ptr, stride_xm, stride_xn, beta, bias_value, BIAS, ACT)
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


@triton.jit
def _splitk_epilogue_kernel(
    ws_ptr, c_ptr, bias_ptr,
    M, N,
    stride_cb, stride_cm, stride_cn,
    stride_xb, stride_xm, stride_xn,
    beta, bias_value,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BIAS: tl.constexpr, ACT: tl.constexpr, INDEX_64: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Sum of the split-K partials (contiguous fp32 workspace B x SPLIT_K x M x N, in split order), then
    bias, activation and cast."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * num_pid_n
    pid_b = (pid // tiles).to(tl.int64)
    pid = pid % tiles
    rm = (pid // num_pid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    if INDEX_64:
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    ws_ptrs = ws_ptr + pid_b * SPLIT_K * M * N + rm[:, None] * N + rn[None, :]
    acc = tl.load(ws_ptrs, mask=mask, other=0.0)
    for _ in tl.static_range(1, SPLIT_K):
        ws_ptrs += M * N
        acc += tl.load(ws_ptrs, mask=mask, other=0.0)
    acc = _epilogue(acc, rm, rn, M, N, bias_ptr + pid_b * stride_xb, stride_xm, stride_xn, beta,
                    bias_value, BIAS, ACT)
    c_ptrs = c_ptr + pid_b * stride_cb + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------

_DOT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32))
# Config -> (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, SPLIT_K, TMA, WARP_SPEC, PERSISTENT,
#            HOST_DESC, TMA_STORE, EPI_SUBTILE)
_PARSED: dict[Config, tuple[int, ...]] = {}
_TORCH_ACT = {1: F.relu, 2: lambda x: F.gelu(x, approximate="tanh"), 3: F.silu}


def _parse(config: Config | Mapping[str, Value]) -> tuple[int, ...]:
    key = config if isinstance(config, Config) else Config.from_dict(config)
    p = _PARSED.get(key)
    if p is None:
        try:
            p = (int(key["BLOCK_M"]), int(key["BLOCK_N"]), int(key["BLOCK_K"]), int(key.get("GROUP_M", 8)),
                 int(key.get("num_warps", 4)), int(key.get("num_stages", 3)), int(key.get("SPLIT_K", 1)),
                 int(key.get("TMA", 0)), int(key.get("WARP_SPEC", 0)), int(key.get("PERSISTENT", 0)),
                 int(key.get("HOST_DESC", 0)), int(key.get("TMA_STORE", 0)), int(key.get("EPI_SUBTILE", 0)))
        except KeyError as e:
            raise ValueError(f"GEMM config {key} lacks {e}") from None
        _PARSED[key] = p
    return p


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a jit function: slow to call from Python


def _dot_precision(dtype: torch.dtype, precision: str | None) -> str:
    if dtype != torch.float32:
        return "tf32"  # ignored by tl.dot for 16-bit operands
    if precision is None:
        precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee', 'tf32' or None, got {precision!r}")
    return precision


@functools.lru_cache(maxsize=None)
def _tma_usable(device: torch.device) -> bool:
    if not _compat.HAS_TENSOR_DESCRIPTOR:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return _compat.INTERPRET  # the interpreter emulates descriptors: lets CPU tests cover the path


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Programs of a persistent launch: the SM count; 3 under the interpreter, so that small test
    problems make each program walk several tiles."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3


def _tma_aligned(t: torch.Tensor, lead: int, batch_stride: int) -> bool:
    es = t.element_size()
    return (lead > 0 and (lead * es) % 16 == 0 and (batch_stride * es) % 16 == 0
            and t.data_ptr() % 16 == 0)


def _lead_div(es: int, lead: int, batch: int) -> int:
    """A power of two (elements, at most 16 bytes' worth) dividing the leading and batch strides, for
    the kernel's A_DIV/B_DIV/C_DIV; 1 when Triton's own divisibility-16 specialisation already holds."""
    if lead % 16 == 0 and batch % 16 == 0:
        return 1
    d = 16 // es
    for v in (lead, batch):
        if v:
            d = min(d, v & -v)
    return d


def _host_descriptors(a, b, c, M, N, K, sam, sak, sbk, sbn, ocm, a_row, b_row, bm, bn, bk, c_split):
    """Host-made tensor descriptors of A and B (a column-major operand described transposed, as on the
    device), and of the output C when ``c_split`` (the TMA store's subtiles along N) is not 0."""
    TD = _compat.TensorDescriptor
    da = TD(a, [M, K], [sam, 1], [bm, bk]) if a_row else TD(a, [K, M], [sak, 1], [bk, bm])
    db = TD(b, [K, N], [sbk, 1], [bk, bn]) if b_row else TD(b, [N, K], [sbn, 1], [bn, bk])
    dc = TD(c, [M, N], [ocm, 1], [bm, bn // c_split]) if c_split else c
    return da, db, dc


def _rebased(proto, base):
    """``proto`` (a TensorDescriptor validated when bound) describing ``base`` instead: same sizes,
    strides and blocks, no re-validation (the bound call's guards cover the pointer)."""
    d = _TD_NEW(type(proto))
    d.__dict__.update(proto.__dict__)
    d.base = base
    return d


_TD_NEW = object.__new__


def _apply_torch_act(x: torch.Tensor, act: int) -> torch.Tensor:
    return _TORCH_ACT[act](x) if act else x


def gemm(a: torch.Tensor, b: torch.Tensor, *, config: Config | Mapping[str, Value], bias=None,
         alpha: float = 1.0, beta: float = 1.0, activation: str = "none", out: torch.Tensor | None = None,
         precision: str | None = None) -> torch.Tensor:
    """``act(alpha * a @ b + beta * bias)`` with the Triton GEMM kernel and ``config``.

    Args:
        a: M x K or B x M x K operand, float16/bfloat16/float32, any strides (used as they are).
        b: K x N or B x K x N operand of a's dtype and device, any strides. A 2-D operand beside a 3-D
            one, or a batch of 1, is broadcast over the batch (batch stride 0).
        config: a GEMM configuration (``Config`` or mapping with BLOCK_M, BLOCK_N, BLOCK_K and optionally
            GROUP_M=8, num_warps=4, num_stages=3, SPLIT_K=1, TMA=0, and the descriptor-path variants
            WARP_SPEC, PERSISTENT, HOST_DESC, TMA_STORE, EPI_SUBTILE, all 0). It is not validated here:
            ``GEMM.check`` is the tuner's job.
        bias: None (default), a Python number, or a tensor broadcastable to the result (0-d, N, M x 1,
            M x N, B x M x N, ...; any strides and float dtype; added in fp32).
        alpha: scale of the product (default 1.0).
        beta: scale of the bias (default 1.0); with beta == 0 the bias is not read (as torch.addmm).
        activation: "none" (default), "relu", "gelu_tanh" or "silu", applied after the bias.
        out: optional result buffer of the result's shape, a's dtype and device, any strides; it must
            not overlap ``a`` or ``b`` but may be the bias itself (in-place addmm). Default: a new
            contiguous tensor.
        precision: float32 dot precision, "ieee" or "tf32"; None (default) follows
            ``torch.get_float32_matmul_precision()`` ("highest" -> "ieee"). Ignored for 16-bit dtypes.

    Returns:
        ``out`` (or a new tensor) holding the result: M x N, or B x M x N when an operand is 3-D.

    Raises:
        InvalidConfig: SPLIT_K > 1 while ``torch.are_deterministic_algorithms_enabled()`` (the space does
            not offer it there), e.g. a winner tuned before determinism was switched on.
        UnsupportedProblem: dtypes, devices or ranks the kernel does not cover.
        ValueError: mismatched shapes, a bad ``out``, activation or config.
    """
    out, launches = _plan(a, b, config, bias, alpha, beta, activation, out, precision, None)
    if not launches:
        return out
    device = a.device
    dev_guard = device.type == "cuda" and device.index != torch.cuda.current_device()
    if dev_guard:
        guard = torch.cuda.device(device)
        guard.__enter__()
    try:
        if device.type == "cuda" and launches[0][3]["USE_TMA"]:
            _compat.ensure_tma_allocator()
        for kernel, grid, args, consts, warps, stages in launches:
            kernel[grid](*args, **consts, num_warps=warps, num_stages=stages)
    finally:
        if dev_guard:
            guard.__exit__(None, None, None)
    return out


def _plan(a, b, config, bias, alpha, beta, activation, out, precision, tma_capable):
    """Validate, allocate the result and pick the kernels: (out, launches), each launch being
    (kernel, grid, args, constexprs, num_warps, num_stages); none when nothing is left to compute.
    ``tma_capable`` None asks the operands' device; True/False stands for a compile target
    (``kernels.inspect`` plans launches for a GPU with CPU tensors)."""
    bm, bn, bk, gm, warps, stages, sk, tma, warp_spec, persistent, host_desc, tma_store, subtile = _parse(config)
    if sk > 1 and torch.are_deterministic_algorithms_enabled():
        raise InvalidConfig("SPLIT_K > 1 is not allowed under deterministic algorithms")
    act = ACTIVATIONS.get(activation)
    if act is None:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    dtype, device = a.dtype, a.device
    if dtype not in _DOT_DTYPES or b.dtype != dtype:
        raise UnsupportedProblem(f"GEMM needs float16/bfloat16/float32 operands of one dtype, got {a.dtype}, {b.dtype}")
    if b.device != device:
        raise UnsupportedProblem(f"operands on different devices: {a.device}, {b.device}")
    ad, bd = a.dim(), b.dim()
    if ad not in (2, 3) or bd not in (2, 3):
        raise UnsupportedProblem(f"GEMM takes 2-D or 3-D operands, got {ad}-D and {bd}-D")
    M, K = a.shape[-2], a.shape[-1]
    K2, N = b.shape[-2], b.shape[-1]
    if K != K2:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    sa, sb = a.stride(), b.stride()
    batched = ad == 3 or bd == 3
    if batched:
        ba = a.shape[0] if ad == 3 else 1
        bb = b.shape[0] if bd == 3 else 1
        if ba != bb and ba != 1 and bb != 1:
            raise ValueError(f"batch sizes differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
        batch = max(ba, bb)
        sab = sa[0] if ba > 1 else 0
        sbb = sb[0] if bb > 1 else 0
        shape = (batch, M, N)
    else:
        batch, sab, sbb, shape = 1, 0, 0, (M, N)
    sam, sak, sbk, sbn = sa[-2], sa[-1], sb[-2], sb[-1]

    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    elif tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be {shape} {dtype} on {device}, got {tuple(out.shape)} {out.dtype} "
                         f"on {out.device}")
    if M == 0 or N == 0 or batch == 0:
        return out, ()

    # Bias: how the epilogue reads it.
    bias_t, bias_value, sxb, sxm, sxn = a, 0.0, 0, 0, 0
    if bias is None or beta == 0:
        bias_kind = _NO_BIAS
    elif not isinstance(bias, torch.Tensor):
        bias_kind, bias_value = _BIAS_VALUE, float(beta) * float(bias)
    else:
        if bias.device != device:
            raise UnsupportedProblem(f"bias on {bias.device}, operands on {device}")
        if bias.dim() == 1 and bias.shape[0] == N:  # the common linear bias: skip expand()
            bias_t, sxb, sxm, sxn = bias, 0, 0, bias.stride(0)
        else:
            try:
                bias_t = bias.expand(shape)
            except RuntimeError:
                raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to {shape}") from None
            st = bias_t.stride()
            sxb, sxm, sxn = (st if batched else (0,) + st)
        bias_kind = (_BIAS_SCALAR if sxm == 0 and sxn == 0 else _BIAS_ROW if sxm == 0
                     else _BIAS_COL if sxn == 0 else _BIAS_FULL)

    if K == 0:  # the product is empty: the result is act(beta * bias)
        if bias_kind == _NO_BIAS:
            out.zero_()
        elif bias_kind == _BIAS_VALUE:
            out.fill_(float(_apply_torch_act(torch.tensor(bias_value), act)))
        else:
            out.copy_(_apply_torch_act(float(beta) * bias_t.float(), act).expand(shape))
        return out, ()

    a_row = sak == 1
    a_col = not a_row and sam == 1
    b_row = sbn == 1
    b_col = not b_row and sbk == 1
    use_tma = False
    if tma and (a_row or a_col) and (b_row or b_col) and (_tma_usable(device) if tma_capable is None else tma_capable):
        use_tma = (_tma_aligned(a, sam if a_row else sak, sab) and _tma_aligned(b, sbk if b_row else sbn, sbb))
    so = out.stride()
    ocb, ocm, ocn = so if batched else (0,) + so
    # Largest element offsets reached (all sizes >= 1 here): int64 offsets in the kernel past 2**31.
    bm1, m1, n1, k1 = batch - 1, M - 1, N - 1, K - 1
    index_64 = max(bm1 * sab + m1 * sam + k1 * sak, bm1 * sbb + k1 * sbk + n1 * sbn,
                   bm1 * sxb + m1 * sxm + n1 * sxn, bm1 * ocb + m1 * ocm + n1 * ocn,
                   batch * sk * M * N) > _INT32_MAX
    if sk > 1:
        c = torch.empty((batch, sk, M, N), dtype=torch.float32, device=device)
        scb, scm, scn = sk * M * N, N, 1
    else:
        c, scb, scm, scn = out, ocb, ocm, ocn
    es = a.element_size()
    a_div = _lead_div(es, sam if a_row else sak, sab) if (a_row or a_col) else 1
    b_div = _lead_div(es, sbk if b_row else sbn, sbb) if (b_row or b_col) else 1
    c_div = _lead_div(c.element_size(), scm, scb) if scn == 1 else 1
    grid = (_cdiv(M, bm) * _cdiv(N, bn) * batch, sk)
    # persistent: descriptors, one output (batch 1) and no split-K; else the same config runs one
    # program per tile
    persistent = bool(persistent and use_tma and sk == 1 and batch == 1)
    if persistent:
        grid = (min(grid[0], _num_sms(device)),)
    # TMA store of the final output (no split-K) where its rows are 16-byte aligned; host-made
    # descriptors (batch 1) where this Triton has them; else the same config stores through pointers
    # and makes its descriptors on the device
    tma_store = bool(tma_store and use_tma and sk == 1 and ocn == 1 and _tma_aligned(out, ocm, ocb))
    epi_split = 2 if tma_store and subtile and bn >= 32 else 1
    host_desc = bool(host_desc and use_tma and batch == 1 and _compat.HAS_HOST_TENSOR_DESCRIPTOR)
    ta, tb, tc = a, b, c
    if host_desc:
        ta, tb, tc = _host_descriptors(a, b, c, M, N, K, sam, sak, sbk, sbn, ocm, a_row, b_row,
                                       bm, bn, bk, epi_split if tma_store else 0)
    main = (_gemm_kernel, grid, (
        ta, tb, tc, bias_t, M, N, K,
        sab, sam, sak, sbb, sbk, sbn, scb, scm, scn, sxb, sxm, sxn,
        float(alpha), float(beta), bias_value), dict(
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, SPLIT_K=sk, EVEN_K=K % (bk * sk) == 0,
        A_ROW=a_row, A_COL=a_col, B_ROW=b_row, B_COL=b_col, BIAS=bias_kind, ACT=act,
        PRECISION=_dot_precision(dtype, precision),
        UPCAST=_compat.UPCAST_BF16_DOT and dtype == torch.bfloat16,
        USE_TMA=use_tma, INDEX_64=index_64, A_DIV=a_div, B_DIV=b_div, C_DIV=c_div,
        WARP_SPEC=bool(warp_spec and use_tma), PERSISTENT=persistent,
        HOST_DESC=host_desc, TMA_STORE=tma_store, EPI_SPLIT=epi_split), warps, stages)
    if sk == 1:
        return out, (main,)
    eg = (_cdiv(M, _EPILOGUE_BLOCK) * _cdiv(N, _EPILOGUE_BLOCK) * batch,)
    epilogue = (_splitk_epilogue_kernel, eg, (
        c, out, bias_t, M, N, ocb, ocm, ocn, sxb, sxm, sxn, float(beta), bias_value), dict(
        BLOCK_M=_EPILOGUE_BLOCK, BLOCK_N=_EPILOGUE_BLOCK, BIAS=bias_kind, ACT=act,
        INDEX_64=index_64, SPLIT_K=sk), 4, 1)
    return out, (main, epilogue)


def bind(a: torch.Tensor, b: torch.Tensor, *, config: Config | Mapping[str, Value], bias=None,
         alpha: float = 1.0, beta: float = 1.0, activation: str = "none",
         precision: str | None = None) -> "BoundGemm | None":
    """``gemm()`` bound once for calls whose operands differ from ``a``, ``b`` and ``bias`` only in their
    data: the same sizes, strides, dtypes and device, and the same ``alpha``, ``beta``, ``activation``,
    ``precision`` (what the run-time dispatch's key fixes).

    Args:
        a, b, bias, config, alpha, beta, activation, precision: as ``gemm()`` (bias a tensor or None).

    Returns:
        A ``BoundGemm`` (``bound(a, b, bias)`` returns a new result tensor), or None where a call has
        nothing to launch (zero-size, K = 0): ``gemm()`` serves those.

    Raises:
        TypeError: a bias that is neither a tensor nor None.
        What ``gemm()`` raises for these inputs.
    """
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError("bind() takes a tensor bias or None")
    out, launches = _plan(a, b, config, bias, alpha, beta, activation, None, precision, None)
    if not launches:
        return None
    return BoundGemm(a, b, bias, out, launches, dict(config=config, alpha=alpha, beta=beta,
                                                     activation=activation, precision=precision))


class BoundGemm:
    """A GEMM bound by ``bind()``: the launches ``_plan`` made (grids, sizes, strides, scalars and every
    constexpr: alignment A_DIV/B_DIV/C_DIV, TMA, WARP_SPEC, PERSISTENT and its grid) kept, per call only the
    output (and split-K workspace) allocated and the kernels launched with the new tensors. A call whose
    operand or bias pointers differ from the bound ones in divisibility by 16 (what the compiled kernel and
    the TMA choice assumed), that runs under another float32 matmul precision than the bound one (when
    ``precision`` is None), or with another current CUDA device, goes through ``gemm()``."""

    __slots__ = ("main", "epilogue", "shape", "strides", "dtype", "ws_shape", "ws_strides", "align", "kwargs",
                 "has_bias", "tma", "cuda", "index", "alloc", "fp32_precision", "descs")

    def __init__(self, a, b, bias, out, launches, kwargs: dict) -> None:
        from ._launch import Launcher, aligned, allocator, contiguous_strides

        (kernel, grid, args, consts, warps, stages), *rest = launches
        args_main = args
        # _gemm_kernel(a, b, c, bias_t, *fixed): c the output or the split-K workspace, bias_t the bias
        # (perhaps expanded: the same pointer) or ``a`` where none is read
        self.main = Launcher(kernel, grid, args[4:], consts, num_warps=warps, num_stages=stages)
        ws = args[2]
        ws = getattr(ws, "base", ws)  # the output under a host-made descriptor (TMA store)
        self.ws_shape = None if ws is out else tuple(ws.shape)
        self.ws_strides = None if ws is out else contiguous_strides(ws.shape)
        self.epilogue = None
        if rest:   # _splitk_epilogue_kernel(ws, out, bias_t, *fixed)
            kernel, grid, args, consts, warps, stages = rest[0]
            self.epilogue = Launcher(kernel, grid, args[3:], consts, num_warps=warps, num_stages=stages)
        self.shape, self.strides, self.dtype = tuple(out.shape), out.stride(), out.dtype
        self.has_bias = isinstance(bias, torch.Tensor) and kwargs["beta"] != 0
        self.align = aligned((a, b, bias if self.has_bias else a))
        self.tma = launches[0][3]["USE_TMA"]
        self.alloc = allocator(out.device)
        self.kwargs = kwargs
        self.cuda, self.index = out.device.type == "cuda", out.device.index
        self.fp32_precision = (torch.get_float32_matmul_precision()
                               if a.dtype == torch.float32 and kwargs["precision"] is None else None)
        # HOST_DESC: the bound descriptors of A, B (and C for a TMA store) as prototypes, re-based on
        # each call's tensors (the Triton launcher encodes them per launch)
        self.descs = None
        if launches[0][3].get("HOST_DESC"):
            dc = args_main[2]
            self.descs = (args_main[0], args_main[1], None if isinstance(dc, torch.Tensor) else dc)

    def __call__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        align = self.align
        bt = bias if self.has_bias else a
        if ((a.data_ptr() % 16 == 0) is not align[0] or (b.data_ptr() % 16 == 0) is not align[1]
                or (bt.data_ptr() % 16 == 0) is not align[2]
                or (self.fp32_precision is not None
                    and torch.get_float32_matmul_precision() != self.fp32_precision)
                or (self.cuda and torch.cuda.current_device() != self.index)):
            return gemm(a, b, bias=bias, **self.kwargs)
        out = self.alloc(self.shape, self.strides, self.dtype)
        if self.tma and self.cuda:
            _compat.ensure_tma_allocator()
        ta, tb, tc = a, b, out
        if self.descs is not None:
            ta, tb, tc = self._host_descs(a, b, out)
        if self.epilogue is None:
            self.main((ta, tb, tc, bt))
            return out
        if torch.are_deterministic_algorithms_enabled():
            raise InvalidConfig("SPLIT_K > 1 is not allowed under deterministic algorithms")
        ws = self.alloc(self.ws_shape, self.ws_strides, torch.float32)
        self.main((ta, tb, ws, bt))
        self.epilogue((ws, out, bt))
        return out

    def specialised(self):
        """This binding's call as one closure, once its kernel is compiled and kept (after the first call):
        the same checks and launch as ``__call__`` with every bound value a local, the launcher's frame
        and the hook check's inlined (about 0.8 us less per call on the host). Only for a single launch
        without descriptors or TMA (split-K, TMA and host descriptors keep ``__call__``); None otherwise, or
        before the kernel is compiled (under the interpreter: never)."""
        if self.epilogue is not None or self.descs is not None or self.tma:
            return None
        parts = self.main.parts()
        if parts is None:
            return None
        from ._launch import _knobs as knobs

        run, g0, g1, g2, get_stream, device, function, packed, tail = parts
        main, general = self.main, self.__call__
        al0, al1, al2 = self.align
        has_bias, alloc, shape, strides, dtype = self.has_bias, self.alloc, self.shape, self.strides, self.dtype
        fp32, cuda, index = self.fp32_precision, self.cuda, self.index
        precision, current = torch.get_float32_matmul_precision, torch.cuda.current_device

        def call(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            bt = bias if has_bias else a
            enter, leave = knobs.launch_enter_hook, knobs.launch_exit_hook
            if ((a.data_ptr() % 16 == 0) is not al0 or (b.data_ptr() % 16 == 0) is not al1
                    or (has_bias and (bt.data_ptr() % 16 == 0) is not al2)
                    or (fp32 is not None and precision() != fp32) or (cuda and current() != index)
                    or getattr(enter, "calls", enter) or getattr(leave, "calls", leave)):
                return general(a, b, bias)
            out = alloc(shape, strides, dtype)
            main.bound += 1
            run(g0, g1, g2, get_stream(device), function, packed, None, None, None, a, b, out, bt, *tail)
            return out

        return call

    def _host_descs(self, a, b, out):
        """HOST_DESC: the bound descriptors of A, B (and C for a TMA store) re-based on this call's tensors."""
        da, db, dc = self.descs
        return _rebased(da, a), _rebased(db, b), (out if dc is None else _rebased(dc, out))


# ---------------------------------------------------------------------------------------------------
# Family
# ---------------------------------------------------------------------------------------------------

def _unpack(inputs: tuple):
    """(a, b[, bias[, alpha[, beta]]]) -> (a, b, bias, alpha, beta)."""
    a, b, *rest = inputs
    rest += [None, 1.0, 1.0][len(rest):]
    return a, b, rest[0], float(rest[1]), float(rest[2])


def _operand(lead: tuple[int, ...], rows: int, cols: int, layout: str, dtype: torch.dtype,
             device, gen: torch.Generator) -> torch.Tensor:
    kw = dict(dtype=dtype, device=device, generator=gen)
    if layout == "row":
        return torch.randn(*lead, rows, cols, **kw)
    if layout == "col":
        return torch.randn(*lead, cols, rows, **kw).transpose(-1, -2)
    return torch.randn(*lead, rows, 2 * cols, **kw)[..., ::2]  # neither dim contiguous


class GemmFamily(KernelFamily):
    """The GEMM family: mm, addmm, bmm, baddbmm and linear with a fused bias/activation epilogue."""

    name = "gemm"
    problem_type = GemmProblem
    # issue 18: older bundles lack them
    optional_params = {"WARP_SPEC": 0, "PERSISTENT": 0, "HOST_DESC": 0, "TMA_STORE": 0, "EPI_SUBTILE": 0}

    def space(self, problem: GemmProblem) -> dict[str, tuple[Value, ...]]:
        return space(problem)

    def check(self, config: Mapping[str, Value], problem: GemmProblem, limits: DeviceLimits) -> str | None:
        return check(config, problem, limits)

    def known_configs(self, problem: GemmProblem, limits: DeviceLimits) -> list[Config]:
        return known_configs(problem, limits)

    def valid_configs(self, problem: GemmProblem, limits: DeviceLimits) -> list[Config]:
        """As the generic enumeration (same configurations, same order), but the descriptor-only axes
        (WARP_SPEC, PERSISTENT, HOST_DESC, TMA_STORE, EPI_SUBTILE) are varied only where TMA=1 and the
        config with them all 0 is valid (they only add rules): the rest of the product is invalid anyway,
        and checking it would multiply the time a tuning run spends here by 32."""
        import itertools

        sp = space(problem)
        names_x = [k for k in ("WARP_SPEC", "PERSISTENT", *DESCRIPTOR_STORE_AXES) if k in sp]
        extra = [sp.pop(k) for k in names_x]
        names = list(sp)
        zeros = dict.fromkeys(names_x, 0)
        out = []
        for values in itertools.product(*sp.values()):
            cfg = dict(zip(names, values), **zeros)
            if check(cfg, problem, limits) is not None:
                continue
            if extra and cfg["TMA"]:
                variants = [dict(cfg, **dict(zip(names_x, xs))) for xs in itertools.product(*extra)]
                out += [Config.from_dict(v) for v in variants if check(v, problem, limits) is None]
            else:
                out.append(Config.from_dict(cfg))
        return out

    def make_inputs(self, problem: GemmProblem, device: torch.device | str, *, seed: int = 0) -> tuple:
        """(a, b, bias) with the problem's layouts; 3-D operands for bmm/baddbmm or batch > 1; bias as a
        0-d tensor (scalar), N (row), M x 1 (col) or [B x] M x N (full)."""
        device = torch.device(device)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        dtype = TORCH_DTYPES[problem.dtype]
        p = problem
        lead = (p.batch,) if p.op in ("bmm", "baddbmm") or p.batch > 1 else ()
        a = _operand(lead, p.M, p.K, p.a_layout, dtype, device, gen)
        b = _operand(lead, p.K, p.N, p.b_layout, dtype, device, gen)
        shapes = {"none": None, "scalar": (), "row": (p.N,), "col": (p.M, 1), "full": lead + (p.M, p.N)}
        shape = shapes[p.bias]
        bias = None if shape is None else torch.randn(shape, dtype=dtype, device=device, generator=gen)
        return a, b, bias

    def reference(self, problem: GemmProblem, inputs: tuple) -> torch.Tensor:
        """torch.mm/addmm/bmm/baddbmm/linear with alpha and beta, then torch's activation."""
        a, b, bias, alpha, beta = _unpack(inputs)
        if a.dim() == 3 or b.dim() == 3:
            batch = max(a.shape[0] if a.dim() == 3 else 1, b.shape[0] if b.dim() == 3 else 1)
            a3 = a.expand(batch, *a.shape[-2:])
            b3 = b.expand(batch, *b.shape[-2:])
            if bias is None:
                r = torch.bmm(a3, b3)
                r = r * alpha if alpha != 1 else r
            else:
                if not isinstance(bias, torch.Tensor):
                    bias = torch.tensor(bias, dtype=a.dtype, device=a.device)
                r = torch.baddbmm(bias.expand(batch, a.shape[-2], b.shape[-1]), a3, b3, beta=beta, alpha=alpha)
        elif problem.op == "linear" and alpha == 1 and beta == 1 and (bias is None or bias.dim() == 1):
            r = F.linear(a, b.t(), bias)
        elif bias is None:
            r = torch.mm(a, b)
            r = r * alpha if alpha != 1 else r
        else:
            if not isinstance(bias, torch.Tensor):
                bias = torch.tensor(bias, dtype=a.dtype, device=a.device)
            r = torch.addmm(bias, a, b, beta=beta, alpha=alpha)
        act = ACTIVATIONS[problem.activation]
        return _apply_torch_act(r, act)

    def launch(self, config: Config | Mapping[str, Value], problem: GemmProblem, inputs: tuple,
               out: torch.Tensor | None = None) -> torch.Tensor:
        a, b, bias, alpha, beta = _unpack(inputs)
        return gemm(a, b, config=config, bias=bias, alpha=alpha, beta=beta, activation=problem.activation,
                    out=out, precision=problem.precision)

    def bound_launch(self, config: Config | Mapping[str, Value], problem: GemmProblem, inputs: tuple):
        a, b, bias, alpha, beta = _unpack(inputs)
        if bias is not None and not isinstance(bias, torch.Tensor):
            return super().bound_launch(config, problem, inputs)
        bound = bind(a, b, config=config, bias=bias, alpha=alpha, beta=beta, activation=problem.activation,
                     precision=problem.precision)
        if bound is None:
            return super().bound_launch(config, problem, inputs)
        return lambda: bound(a, b, bias)

    def plan_launches(self, config: Config | Mapping[str, Value], problem: GemmProblem, inputs: tuple,
                      capability: int) -> tuple:
        a, b, bias, alpha, beta = _unpack(inputs)
        return _plan(a, b, config, bias, alpha, beta, problem.activation, None, problem.precision,
                     capability >= 90 and _compat.HAS_TENSOR_DESCRIPTOR)[1]

    def flops(self, problem: GemmProblem) -> float:
        return 2.0 * problem.batch * problem.M * problem.N * problem.K

    def tolerance(self, problem: GemmProblem) -> float:
        """Relative error norm accepted against PyTorch: output rounding of the dtype with margin;
        float32 "ieee" is tight, "tf32" (10-bit mantissa products) looser."""
        if problem.dtype == "float32":
            return 1e-4 if problem.precision == "ieee" else 1e-2
        return {"float16": 1e-2, "bfloat16": 2e-2}[problem.dtype]


GEMM = GemmFamily()
