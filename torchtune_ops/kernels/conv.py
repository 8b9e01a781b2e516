"""2-D convolution as an implicit GEMM in Triton, and its configuration space (the "conv2d" family).

For ``y = conv2d(x [N, C, H, W], w [K, C/groups, R, S])`` each group is a GEMM with
``M = N*P*Q`` rows (output pixels), ``K/groups`` columns (output channels) and a reduction over
``(C/groups)*R*S``; the input patch matrix is never materialised, its tiles are gathered from ``x`` through
its strides (NCHW, channels_last or any other strides, no copies).

Two reduction orders, picked per launch (``_use_flat_k``):

* channel-block order (the fast path): one loop over ``R*S*ceil(Cg/BLOCK_K)`` steps; each step is one
  filter tap (r, s) and BLOCK_K consecutive channels, so channels_last inputs are read contiguously and
  the spatial bounds mask is one vector per tap. With ``Cg % BLOCK_K == 0`` there is no channel mask and
  without padding no spatial mask (tail rows are wrapped onto valid rows and never stored).
* flat order, for few channels per group (the RGB stem, small groups): the reduction index runs over
  ``Cg*R*S`` directly, so a 3-channel 7x7 filter takes ceil(147/BLOCK_K) steps instead of 49.

Depthwise-like problems (one input channel per group, ``C/groups == 1``) would make a GEMM with a
reduction of only R*S and one useful column per group, so they take a separate elementwise kernel tiled
over output pixels and output channels (coalesced along channels in channels_last); BLOCK_K is unused
there and its space pins it to 16.

Problems with few outputs and a long reduction (late layers at batch 1) may split the reduction
(``SPLIT_K``): float32 partial sums go to a workspace that a second kernel adds up in a fixed order, so the
result stays deterministic.

Accumulation is float32; float32 inputs follow PyTorch's convolution precision (cuDNN's TF32 flag,
``torch.backends.cudnn.conv.fp32_precision`` / ``torch.backends.cudnn.allow_tf32``), captured in
``ConvProblem.precision``. Bias and an activation (none, relu, silu, gelu_tanh) are fused in the epilogue,
which casts to the output dtype on store. The output is channels_last when the input or the weight is
(cuDNN's rule), else contiguous NCHW.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import torch
import triton
import triton.language as tl

from ..errors import InvalidConfig, UnsupportedProblem
from . import _compat
from ._jit import ACTIVATION_CODES, activate, mma, tile_order
from .base import Config, DeviceLimits, KernelFamily, Value, iter_known

ACTIVATIONS = tuple(ACTIVATION_CODES)
_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_TORCH_DTYPE = {v: k for k, v in _DTYPES.items()}
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------- kernels

@triton.jit
def _output_pixel(m, P, Q):
    """Split flat output indices (over N*P*Q) into image, output row and output column."""
    img = m // (P * Q)
    pq = m - img * (P * Q)
    p = pq // Q
    return img, p, pq - p * Q


@triton.jit
def _conv2d_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr,
    H, W, P, Q, M, CG, KG, KDIM,
    sxn, sxc, sxh, sxw,
    swk, swc, swr, sws,
    syn, syc, syp, syq,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    R: tl.constexpr, S: tl.constexpr,
    HAS_PAD: tl.constexpr, FLAT_K: tl.constexpr, EVEN_C: tl.constexpr, BIG: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    g = tl.program_id(1)
    pid_m, pid_n = tile_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(KG, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Tail rows/columns wrap onto valid ones: their loads need no mask and they are never stored.
    m_ld = offs_m % M
    n_ld = offs_n % KG
    img, p, q = _output_pixel(m_ld, P, Q)
    ih0 = p * STRIDE_H - PAD_H
    iw0 = q * STRIDE_W - PAD_W
    if BIG:  # tensors over 2**31 elements: 64-bit image offsets
        img = img.to(tl.int64)
    x_rows = img * sxn + (ih0 * sxh + iw0 * sxw)
    x_ptr += (g * CG).to(tl.int64) * sxc
    w_ptr += (g * KG).to(tl.int64) * swk
    w_cols = n_ld * swk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    cb = tl.cdiv(CG, BLOCK_K)
    if FLAT_K:
        n_steps = tl.cdiv(KDIM, BLOCK_K)
    else:
        n_steps = R * S * cb
    lo = 0
    hi = n_steps
    if SPLIT_K > 1:  # this program reduces steps [lo, hi) of the split reduction
        per = tl.cdiv(n_steps, SPLIT_K)
        lo = tl.program_id(2) * per
        hi = tl.minimum(lo + per, n_steps)
    if FLAT_K:
        for step in range(lo, hi):
            kk = step * BLOCK_K + offs_k
            c = kk % CG
            rs = kk // CG
            r = rs // S
            s = rs - r * S
            dh = r * DIL_H
            dw = s * DIL_W
            k_ok = kk < KDIM
            a_mask = k_ok[None, :]
            if HAS_PAD:
                ih = ih0[:, None] + dh[None, :]
                iw = iw0[:, None] + dw[None, :]
                a_mask = a_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_ptr + (x_rows[:, None] + (c * sxc + dh * sxh + dw * sxw)[None, :]), mask=a_mask,
                        other=0.0)
            b = tl.load(w_ptr + (w_cols[None, :] + (c * swc + r * swr + s * sws)[:, None]), mask=k_ok[:, None],
                        other=0.0)
            acc = mma(a, b, acc, PRECISION, UPCAST)
    else:
        for it in range(lo, hi):
            rs = it // cb
            c0 = (it - rs * cb) * BLOCK_K
            r = rs // S
            s = rs - r * S
            c = c0 + offs_k
            a_ptrs = x_ptr + (x_rows[:, None] + (r * DIL_H * sxh + s * DIL_W * sxw) + (c * sxc)[None, :])
            b_ptrs = w_ptr + (w_cols[None, :] + (r * swr + s * sws) + (c * swc)[:, None])
            if HAS_PAD:
                ih = ih0 + r * DIL_H
                iw = iw0 + s * DIL_W
                sp_ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                if EVEN_C:
                    a = tl.load(a_ptrs, mask=sp_ok[:, None], other=0.0)
                else:
                    a = tl.load(a_ptrs, mask=sp_ok[:, None] & (c < CG)[None, :], other=0.0)
            else:
                if EVEN_C:
                    a = tl.load(a_ptrs)
                else:
                    a = tl.load(a_ptrs, mask=(c < CG)[None, :], other=0.0)
            if EVEN_C:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=(c < CG)[:, None], other=0.0)
            acc = mma(a, b, acc, PRECISION, UPCAST)

    mask = (offs_m < M)[:, None] & (offs_n < KG)[None, :]
    if SPLIT_K > 1:  # float32 partial sums to the workspace [SPLIT_K, M, K]; _splitk_reduce_kernel finishes
        ws_rows = (tl.program_id(2) * M + m_ld).to(tl.int64) * (KG * tl.num_programs(1))
        tl.store(ws_ptr + (g * KG + ws_rows[:, None] + offs_n[None, :]), acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + g * KG + n_ld).to(tl.float32)[None, :]
        acc = activate(acc, ACT)
        y_rows = img * syn + (p * syp + q * syq)
        y_ptrs = y_ptr + (g * KG).to(tl.int64) * syc + (y_rows[:, None] + (offs_n * syc)[None, :])
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr, b_ptr, y_ptr, M, KOUT, P, Q, syn, syc, syp, syq,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BIG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Sums the SPLIT_K partial results in a fixed order (deterministic), then bias, activation, cast.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < KOUT)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for sid in tl.static_range(SPLIT_K):
        rows = (sid * M + offs_m).to(tl.int64) * KOUT
        acc += tl.load(ws_ptr + (rows[:, None] + offs_n[None, :]), mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < KOUT, other=0.0).to(tl.float32)[None, :]
    acc = activate(acc, ACT)
    img, p, q = _output_pixel(offs_m, P, Q)
    if BIG:
        img = img.to(tl.int64)
    y_rows = img * syn + (p * syp + q * syq)
    tl.store(y_ptr + (y_rows[:, None] + (offs_n * syc)[None, :]), acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv2d_depthwise_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    H, W, P, Q, M, KOUT, MULT,
    sxn, sxc, sxh, sxw,
    swk, swr, sws,
    syn, syc, syp, syq,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    R: tl.constexpr, S: tl.constexpr,
    HAS_PAD: tl.constexpr, BIG: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    # One input channel per group: output channel k reads input channel k // MULT; no reduction over
    # channels, so the taps are accumulated elementwise in float32 over a [BLOCK_M, BLOCK_N] tile.
    pid_m, pid_n = tile_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(KOUT, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ld = offs_m % M
    n_ld = offs_n % KOUT
    img, p, q = _output_pixel(m_ld, P, Q)
    ih0 = p * STRIDE_H - PAD_H
    iw0 = q * STRIDE_W - PAD_W
    if BIG:
        img = img.to(tl.int64)
    x_rows = img * sxn + (ih0 * sxh + iw0 * sxw)
    x_cols = (n_ld // MULT) * sxc
    w_cols = n_ld * swk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for rs in range(0, R * S):
        r = rs // S
        s = rs - r * S
        a_ptrs = x_ptr + (x_rows[:, None] + (r * DIL_H * sxh + s * DIL_W * sxw) + x_cols[None, :])
        if HAS_PAD:
            ih = ih0 + r * DIL_H
            iw = iw0 + s * DIL_W
            sp_ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(a_ptrs, mask=sp_ok[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs)
        wv = tl.load(w_ptr + (w_cols + (r * swr + s * sws)))
        acc += a.to(tl.float32) * wv.to(tl.float32)[None, :]

    if HAS_BIAS:
        acc += tl.load(b_ptr + n_ld).to(tl.float32)[None, :]
    acc = activate(acc, ACT)
    y_rows = img * syn + (p * syp + q * syq)
    y_ptrs = y_ptr + (y_rows[:, None] + (offs_n * syc)[None, :])
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < KOUT)[None, :])


# ------------------------------------------------------------------------------------------------ problem

@dataclasses.dataclass(frozen=True)
class ConvProblem:
    """One conv2d problem: shapes, resolved hyper-parameters, dtype and layout (plain, JSON-friendly).

    ``padding`` is resolved to (top, bottom, left, right); ``layout`` is the input's memory layout
    ("nchw" or "nhwc" for channels_last); ``precision`` is the float32 dot precision ("tf32" or "ieee",
    always "ieee" for float16/bfloat16).
    """

    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    dtype: str = "float16"
    layout: str = "nchw"
    bias: bool = False
    activation: str = "none"
    precision: str = "ieee"

    @property
    def P(self) -> int:
        return (self.H + self.padding[0] + self.padding[1] - self.dilation[0] * (self.R - 1) - 1) \
            // self.stride[0] + 1

    @property
    def Q(self) -> int:
        return (self.W + self.padding[2] + self.padding[3] - self.dilation[1] * (self.S - 1) - 1) \
            // self.stride[1] + 1

    @property
    def gemm_mnk(self) -> tuple[int, int, int]:
        """The per-group GEMM view: (N*P*Q, K/groups, (C/groups)*R*S)."""
        return self.N * self.P * self.Q, self.K // self.groups, self.C // self.groups * self.R * self.S

    @property
    def depthwise(self) -> bool:
        """True when each group has one input channel (the elementwise kernel runs)."""
        return self.C // self.groups == 1


def _pair(v: int | tuple[int, ...] | list[int], what: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return v
    t = tuple(int(i) for i in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"{what} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def resolve_padding(padding: int | str | tuple[int, ...], *, kernel: tuple[int, int],
                    stride: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """Padding as (top, bottom, left, right).

    Args:
        padding: an int, a pair (h, w), a 4-tuple (top, bottom, left, right), "valid" (none) or "same"
            (output size = input size; stride must be 1; for an even span the extra row/column goes at
            the bottom/right, as in PyTorch).
        kernel: (R, S) filter size.
        stride: (stride_h, stride_w).
        dilation: (dilation_h, dilation_w).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            th, tw = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    if isinstance(padding, int):
        pads = (padding,) * 4
    else:
        t = tuple(int(p) for p in padding)
        if len(t) == 1:
            pads = t * 4
        elif len(t) == 2:
            pads = (t[0], t[0], t[1], t[1])
        elif len(t) == 4:
            pads = t
        else:
            raise ValueError(f"padding must have 1, 2 or 4 entries, got {padding!r}")
    if min(pads) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return pads  # type: ignore[return-value]


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def conv_problem(x: torch.Tensor, w: torch.Tensor, *, bias: torch.Tensor | None = None,
                 stride: int | tuple[int, int] = 1, padding: int | str | tuple[int, ...] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1,
                 activation: str = "none") -> ConvProblem:
    """The ``ConvProblem`` of ``conv2d(x, w, bias, ...)`` (cheap: shapes and flags only).

    Args:
        x: input [N, C, H, W] (any strides).
        w: weight [K, C/groups, R, S].
        bias: optional [K] bias (only its presence is recorded). Default None.
        stride, padding, dilation, groups: as in ``torch.nn.functional.conv2d`` (padding also takes a
            4-tuple (top, bottom, left, right)). Defaults 1, 0, 1, 1.
        activation: fused activation, one of ``ACTIVATIONS``. Default "none".

    Raises:
        UnsupportedProblem: dtype not float16/bfloat16/float32, or inputs that are not 4-D.
        ValueError: inconsistent shapes or hyper-parameters.
    """
    if x.dim() != 4 or w.dim() != 4:
        raise UnsupportedProblem(f"conv2d needs 4-D input and weight, got {x.dim()}-D and {w.dim()}-D")
    dtype = _DTYPES.get(x.dtype)
    if dtype is None or w.dtype != x.dtype:
        raise UnsupportedProblem(f"conv2d kernels take float16/bfloat16/float32, got {x.dtype}/{w.dtype}")
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    n, c, h, wd = x.shape
    k, cg, r, s = w.shape
    if groups < 1 or c % groups or k % groups or cg * groups != c:
        raise ValueError(f"groups={groups} does not fit input channels {c}, weight {tuple(w.shape)}")
    if k == 0:
        raise ValueError("conv2d needs at least one output channel (as PyTorch)")
    st, dil = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(st) < 1 or min(dil) < 1:
        raise ValueError(f"stride and dilation must be positive, got {stride!r}, {dilation!r}")
    pads = resolve_padding(padding, kernel=(r, s), stride=st, dilation=dil)
    precision = _compat.conv_fp32_precision() if dtype == "float32" else "ieee"
    prob = ConvProblem(N=n, C=c, H=h, W=wd, K=k, R=r, S=s, stride=st, padding=pads, dilation=dil,
                       groups=groups, dtype=dtype, layout="nhwc" if _is_channels_last(x) else "nchw",
                       bias=bias is not None, activation=activation, precision=precision)
    if prob.P < 1 or prob.Q < 1:
        raise ValueError(f"input {tuple(x.shape)} is smaller than the dilated kernel {tuple(w.shape)}")
    return prob


# ------------------------------------------------------------------------------------------------ launch

@functools.lru_cache(maxsize=4096)
def _params(config: Config) -> tuple[int, int, int, int, int, int, int]:
    try:
        return (int(config["BLOCK_M"]), int(config["BLOCK_N"]), int(config["BLOCK_K"]),
                int(config["GROUP_M"]), int(config["num_warps"]), int(config["num_stages"]),
                int(config.get("SPLIT_K", 1)))
    except KeyError as e:
        raise InvalidConfig(f"conv2d config lacks {e.args[0]}: {config}") from None


def _use_flat_k(cg: int, r: int, s: int, block_k: int) -> bool:
    """Flat reduction order when it saves more than 20% of the steps of the channel-block order."""
    blocked = r * s * -(-cg // block_k)
    flat = -(-(cg * r * s) // block_k)
    return flat < 0.8 * blocked


def _max_offset(t: torch.Tensor, first_dim: int = 1) -> int:
    # largest element offset over dims first_dim.. (1: inside one image)
    return sum((n - 1) * abs(st) for n, st in zip(t.shape[first_dim:], t.stride()[first_dim:]) if n > 0)


def _needs_int64(t: torch.Tensor) -> bool:
    if t.numel() <= _INT32_MAX and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        return False
    return _max_offset(t, 0) > _INT32_MAX


def _torch_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(y)
    if activation == "silu":
        return torch.nn.functional.silu(y)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(y, approximate="tanh")
    return y


def conv2d(x: torch.Tensor, w: torch.Tensor, *, config: Config | Mapping[str, Value],
           bias: torch.Tensor | None = None, stride: int | tuple[int, int] = 1,
           padding: int | str | tuple[int, ...] = 0, dilation: int | tuple[int, int] = 1, groups: int = 1,
           activation: str = "none", out: torch.Tensor | None = None,
           precision: str | None = None) -> torch.Tensor:
    """``activation(torch.nn.functional.conv2d(x, w, bias, stride, padding, dilation, groups))`` in Triton.

    Args:
        x: input [N, C, H, W], float16/bfloat16/float32, on CUDA (or CPU under TRITON_INTERPRET=1);
            any strides (NCHW, channels_last, sliced), read in place.
        w: weight [K, C/groups, R, S], same dtype and device; any strides.
        config: a conv2d configuration (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages);
            see ``CONV2D.known_configs`` / ``CONV2D.space``. Not checked here (``CONV2D.check`` does).
        bias: optional [K] bias, added in float32 in the epilogue. Default None.
        stride: int or (sh, sw). Default 1.
        padding: int, (ph, pw), (top, bottom, left, right), "same" or "valid". Default 0.
        dilation: int or (dh, dw). Default 1.
        groups: number of channel groups (C for depthwise). Default 1.
        activation: "none", "relu", "silu" or "gelu_tanh", applied after the bias. Default "none".
        out: optional output [N, K, P, Q] of x's dtype and device, any strides, written in place.
            Default None: a new tensor, channels_last when x or w is channels_last, else contiguous.
        precision: float32 dot precision, "tf32" or "ieee"; None (default) follows PyTorch's conv
            setting (``torch.backends.cudnn.conv.fp32_precision`` / ``allow_tf32``). Ignored for 16-bit.

    Returns:
        The output tensor (``out`` when given).

    Raises:
        UnsupportedProblem: dtypes, devices or sizes the kernels do not cover.
        InvalidConfig: a config without the needed entries.
        ValueError: inconsistent shapes or hyper-parameters.
    """
    if not (x.is_cuda or _compat.INTERPRET):
        raise UnsupportedProblem(f"conv2d kernels run on CUDA (or CPU under TRITON_INTERPRET=1), got {x.device}")
    out, launches = _plan(x, w, config, bias, stride, padding, dilation, groups, activation, out, precision)
    if launches:
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                for kernel, grid, args, consts, num_warps, num_stages in launches:
                    kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
        else:
            for kernel, grid, args, consts, num_warps, num_stages in launches:
                kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
    return out


def bind(x: torch.Tensor, w: torch.Tensor, *, config: Config | Mapping[str, Value],
         bias: torch.Tensor | None = None, stride: int | tuple[int, int] = 1,
         padding: int | str | tuple[int, ...] = 0, dilation: int | tuple[int, int] = 1, groups: int = 1,
         activation: str = "none", precision: str | None = None) -> "BoundConv | None":
    """``conv2d()`` bound once for calls whose tensors differ from ``x``, ``w`` and ``bias`` only in their
    data (same sizes, strides, dtypes, device; the same hyper-parameters), as the run-time dispatch's key
    guarantees.

    Args:
        x, w, config, bias, stride, padding, dilation, groups, activation, precision: as ``conv2d()``.

    Returns:
        A ``BoundConv`` (``bound(x, w, bias)`` returns a new output), or None where there is nothing to
        launch (zero-size output or no input channels): ``conv2d()`` serves those.
    """
    if not (x.is_cuda or _compat.INTERPRET):
        raise UnsupportedProblem(f"conv2d kernels run on CUDA (or CPU under TRITON_INTERPRET=1), got {x.device}")
    out, launches = _plan(x, w, config, bias, stride, padding, dilation, groups, activation, None, precision)
    if not launches:
        return None
    return BoundConv(x, w, bias, out, launches, dict(config=config, stride=stride, padding=padding,
                                                     dilation=dilation, groups=groups, activation=activation,
                                                     precision=precision))


class BoundConv:
    """A convolution bound by ``bind()``: per call the output (and split-K workspace) is allocated and the
    kernels are launched with the new tensors. A call whose tensor pointers differ from the bound ones in
    divisibility by 16, that runs under another float32 convolution precision than the bound one, or on
    another current CUDA device, goes through ``conv2d()``."""

    __slots__ = ("launches", "shape", "strides", "dtype", "device", "ws_shape", "ws_strides", "align", "kwargs",
                 "has_bias", "precision", "cuda", "index", "alloc")

    _ROLES = ("x", "w", "b", "out", "ws")

    def __init__(self, x, w, bias, out, launches, kwargs: dict) -> None:
        import operator

        from ._launch import Launcher, aligned, allocator, contiguous_strides

        self.ws_shape = None
        self.launches = []
        for kernel, grid, args, consts, num_warps, num_stages in launches:
            picks = []
            for a in args:
                if not isinstance(a, torch.Tensor):
                    break
                if a is x:
                    picks.append(0)
                elif a is w:
                    picks.append(1)
                elif bias is not None and a is bias:
                    picks.append(2)
                elif a is out:
                    picks.append(3)
                else:
                    picks.append(4)
                    self.ws_shape = tuple(a.shape)
            pick = operator.itemgetter(*picks)
            self.launches.append((pick, Launcher(kernel, grid, args[len(picks):], consts, num_warps=num_warps,
                                                 num_stages=num_stages)))
        self.shape, self.strides, self.dtype, self.device = tuple(out.shape), out.stride(), out.dtype, out.device
        self.ws_strides = None if self.ws_shape is None else contiguous_strides(self.ws_shape)
        self.alloc = allocator(out.device)
        self.has_bias = bias is not None
        self.align = aligned((x, w) + ((bias,) if bias is not None else ()))
        self.precision = (_compat.conv_fp32_precision() if x.dtype == torch.float32
                          and kwargs["precision"] is None else None)
        self.kwargs = kwargs
        self.cuda, self.index = x.is_cuda, x.device.index

    def __call__(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        align = self.align
        if ((x.data_ptr() % 16 == 0) is not align[0] or (w.data_ptr() % 16 == 0) is not align[1]
                or (self.has_bias and (bias.data_ptr() % 16 == 0) is not align[2])
                or (self.precision is not None and _compat.conv_fp32_precision() != self.precision)
                or (self.cuda and torch.cuda.current_device() != self.index)):
            return conv2d(x, w, bias=bias, **self.kwargs)
        out = self.alloc(self.shape, self.strides, self.dtype)
        ws = out if self.ws_shape is None else self.alloc(self.ws_shape, self.ws_strides, torch.float32)
        vals = (x, w, bias if self.has_bias else out, out, ws)
        for pick, launch in self.launches:
            t = pick(vals)
            launch(t if type(t) is tuple else (t,))
        return out


def _plan(x, w, config, bias, stride, padding, dilation, groups, activation, out, precision):
    """Validate, allocate the output and pick the kernels: (out, launches), each launch being
    (kernel, grid, args, constexprs, num_warps, num_stages); none when nothing is left to compute."""
    if x.dim() != 4 or w.dim() != 4:
        raise UnsupportedProblem(f"conv2d needs 4-D input and weight, got {x.dim()}-D and {w.dim()}-D")
    if x.dtype not in _DTYPES or w.dtype != x.dtype:
        raise UnsupportedProblem(f"conv2d kernels take float16/bfloat16/float32, got {x.dtype}/{w.dtype}")
    if w.device != x.device or (bias is not None and bias.device != x.device):
        raise UnsupportedProblem("conv2d inputs must be on one device")
    act = ACTIVATION_CODES.get(activation)
    if act is None:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    block_m, block_n, block_k, group_m, num_warps, num_stages, split_k = _params(
        config if isinstance(config, Config) else Config.from_dict(config))

    n, c, h, wd = x.shape
    k, cg, r, s = w.shape
    if groups < 1 or k % groups or cg * groups != c:
        raise ValueError(f"groups={groups} does not fit input channels {c}, weight {tuple(w.shape)}")
    if k == 0:
        raise ValueError("conv2d needs at least one output channel (as PyTorch)")
    if bias is not None and tuple(bias.shape) != (k,):
        raise ValueError(f"bias must have shape ({k},), got {tuple(bias.shape)}")
    sh, sw = (stride, stride) if isinstance(stride, int) else _pair(stride, "stride")
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else _pair(dilation, "dilation")
    if sh < 1 or sw < 1 or dh < 1 or dw < 1:
        raise ValueError(f"stride and dilation must be positive, got {stride!r}, {dilation!r}")
    if isinstance(padding, int) and padding >= 0:
        pt = pb = pl = pr = padding
    elif type(padding) is tuple and len(padding) == 2 and min(padding) >= 0:
        pt, pb, pl, pr = padding[0], padding[0], padding[1], padding[1]
    else:
        pt, pb, pl, pr = resolve_padding(padding, kernel=(r, s), stride=(sh, sw), dilation=(dh, dw))
    p_out = (h + pt + pb - dh * (r - 1) - 1) // sh + 1
    q_out = (wd + pl + pr - dw * (s - 1) - 1) // sw + 1
    if p_out < 1 or q_out < 1:
        raise ValueError(f"input {tuple(x.shape)} is smaller than the dilated kernel {tuple(w.shape)}")

    if out is None:
        fmt = torch.channels_last if (_is_channels_last(x) or _is_channels_last(w)) else torch.contiguous_format
        out = torch.empty((n, k, p_out, q_out), dtype=x.dtype, device=x.device, memory_format=fmt)
    elif tuple(out.shape) != (n, k, p_out, q_out) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be {(n, k, p_out, q_out)} {x.dtype} on {x.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    m = n * p_out * q_out
    if m == 0:
        return out, ()
    if cg == 0:  # no input channels: the sum is empty
        if bias is None:
            out.zero_()
        else:
            out.copy_(_torch_activation(bias.float(), activation).to(out.dtype).view(1, k, 1, 1).expand_as(out))
        return out, ()
    big = _needs_int64(x) or _needs_int64(out)
    if (big or m > _INT32_MAX or _needs_int64(w)) and \
            max(_max_offset(x), _max_offset(out), _max_offset(w, 0), m) > _INT32_MAX:
        raise UnsupportedProblem("conv2d kernels index one image, the weight and the rows with 32-bit integers")

    has_pad = (pt | pb | pl | pr) != 0
    b_arg = bias if bias is not None else out  # any pointer; never read without HAS_BIAS
    sx, sww, sy = x.stride(), w.stride(), out.stride()
    if cg == 1:
        grid = (-(-m // block_m) * -(-k // block_n),)
        kernel, args, consts = _conv2d_depthwise_kernel, (
            x, w, b_arg, out, h, wd, p_out, q_out, m, k, k // groups,
            sx[0], sx[1], sx[2], sx[3], sww[0], sww[2], sww[3], sy[0], sy[1], sy[2], sy[3],
            sh, sw, pt, pl, dh, dw), dict(
            R=r, S=s, HAS_PAD=has_pad, BIG=big, HAS_BIAS=bias is not None, ACT=act,
            BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=group_m)
        return out, ((kernel, grid, args, consts, num_warps, num_stages),)
    else:
        kg = k // groups
        if x.dtype == torch.float32:
            prec = precision if precision is not None else _compat.conv_fp32_precision()
        else:
            prec = "tf32"  # unused by 16-bit dots; Triton's default
        upcast = _compat.UPCAST_BF16_DOT and x.dtype == torch.bfloat16
        grid = (-(-m // block_m) * -(-kg // block_n), groups, split_k)
        ws = torch.empty((split_k, m, k), dtype=torch.float32, device=x.device) if split_k > 1 else out
        kernel, args, consts = _conv2d_kernel, (
            x, w, b_arg, out, ws, h, wd, p_out, q_out, m, cg, kg, cg * r * s,
            sx[0], sx[1], sx[2], sx[3], sww[0], sww[1], sww[2], sww[3], sy[0], sy[1], sy[2], sy[3],
            sh, sw, pt, pl, dh, dw), dict(
            R=r, S=s, HAS_PAD=has_pad, FLAT_K=_use_flat_k(cg, r, s, block_k), EVEN_C=cg % block_k == 0,
            BIG=big, HAS_BIAS=bias is not None, ACT=act, PRECISION="ieee" if upcast else prec, UPCAST=upcast,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, SPLIT_K=split_k)
        if split_k == 1:
            return out, ((kernel, grid, args, consts, num_warps, num_stages),)
        reduce = (_splitk_reduce_kernel, (-(-m // 64), -(-k // 64)),
                  (ws, b_arg, out, m, k, p_out, q_out, sy[0], sy[1], sy[2], sy[3]),
                  dict(SPLIT_K=split_k, HAS_BIAS=bias is not None, ACT=act, BIG=big, BLOCK_M=64, BLOCK_N=64), 4, 1)
        return out, ((kernel, grid, args, consts, num_warps, num_stages), reduce)


def conv1d(x: torch.Tensor, w: torch.Tensor, *, config: Config | Mapping[str, Value],
           bias: torch.Tensor | None = None, stride: int = 1, padding: int | str = 0, dilation: int = 1,
           groups: int = 1, activation: str = "none", out: torch.Tensor | None = None,
           precision: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.conv1d`` through ``conv2d`` on views [N, C, 1, L] and [K, C/groups, 1, S].

    Args:
        x: input [N, C, L]; w: weight [K, C/groups, S]; bias: optional [K]. No copies are made.
        stride, padding, dilation: ints along L (padding also "same", "valid" or a pair (left, right)).
        groups, activation, config, precision: as in ``conv2d``.
        out: optional output [N, K, L_out], written in place.

    Returns:
        The output [N, K, L_out] (``out`` when given).
    """
    if x.dim() != 3 or w.dim() != 3:
        raise UnsupportedProblem(f"conv1d needs 3-D input and weight, got {x.dim()}-D and {w.dim()}-D")
    if isinstance(padding, str):
        pad2: Any = padding
    elif isinstance(padding, int):
        pad2 = (0, padding)
    else:
        left, right = (tuple(padding) * 2)[:2] if len(tuple(padding)) == 1 else tuple(padding)
        pad2 = (0, 0, left, right)
    y = conv2d(x.unsqueeze(2), w.unsqueeze(2), config=config, bias=bias, stride=(1, _pair(stride, "stride")[1]),
               padding=pad2, dilation=(1, _pair(dilation, "dilation")[1]), groups=groups,
               activation=activation, out=None if out is None else out.unsqueeze(2), precision=precision)
    return y.squeeze(2) if out is None else out


# ------------------------------------------------------------------------------------------------ family

_BLOCKS_M = (16, 32, 64, 128, 256, 512, 1024)
_BLOCKS_N = (16, 32, 64, 128, 256)
_BLOCKS_K = (16, 32, 64, 128)
_GROUPS_M = (1, 8)
_WARPS = (2, 4, 8)
_STAGES = (1, 2, 3, 4, 5)
_SPLITS_K = (1, 2, 4, 8, 16)
_SPLIT_K_MAX_OUTPUTS = 1 << 20  # split-K only where N*P*Q*K is this small (few output tiles, workspace <= 64 MiB)
_SPLIT_K_MIN_REDUCTION = 256
_FLAT_MAX_WARPS = 4  # the flat reduction loop (few channels per group): see check()
_FLAT_MAX_TILE_REGS = 96  # ... and its largest accumulator + operand elements a thread

# Inductor's conv_configs (BM, BN, BK, stages, warps), the same in every torch version read ...
_INDUCTOR_CONV = (
    (64, 256, 16, 2, 4), (256, 64, 16, 2, 4), (1024, 16, 16, 1, 8), (128, 128, 32, 2, 8),
    (64, 64, 32, 2, 4), (64, 256, 32, 2, 8), (256, 64, 32, 2, 8),
)
# ... then deeper-K, more-stage tiles from Inductor's mm_configs and Triton's matmul tutorial, which
# implicit GEMM on tensor cores (Ampere/Hopper, channels_last) tends to prefer over BK=16/32 at 2 stages.
_MM_EXTRA = (
    (64, 128, 64, 3, 4), (128, 128, 64, 3, 4), (128, 128, 64, 5, 8), (128, 256, 64, 3, 8),
    (128, 128, 32, 4, 4), (128, 64, 32, 4, 4),
)
# ... and, where split-K is in the space, one mid-size tile at split factors 2, 4 and 8.
_SPLIT_EXTRA = ((64, 64, 64, 3, 4, 2), (64, 64, 64, 3, 4, 4), (64, 64, 64, 3, 4, 8))


def _pow2_cap(n: int) -> int:
    """Largest useful block for a dimension of n: next power of two, at least 16."""
    return max(16, 1 << max(0, n - 1).bit_length())


class ConvFamily(KernelFamily):
    """Implicit-GEMM conv2d (see the module docstring); problems are ``ConvProblem``."""

    name = "conv2d"
    problem_type = ConvProblem

    def _caps(self, problem: ConvProblem) -> tuple[int, int, int]:
        m, n, k = problem.gemm_mnk
        return _pow2_cap(m), _pow2_cap(n), 16 if problem.depthwise else _pow2_cap(k)

    @staticmethod
    def _split_k_allowed(problem: ConvProblem) -> bool:
        # few output tiles and a long reduction: split the reduction over more programs, each writing
        # float32 partial sums that a second kernel adds up in a fixed order (deterministic)
        m, _, kdim = problem.gemm_mnk
        return not problem.depthwise and m * problem.K <= _SPLIT_K_MAX_OUTPUTS and kdim >= _SPLIT_K_MIN_REDUCTION

    def space(self, problem: ConvProblem) -> dict[str, tuple[Value, ...]]:
        cm, cn, ck = self._caps(problem)
        return {
            "SPLIT_K": _SPLITS_K if self._split_k_allowed(problem) else (1,),
            "BLOCK_M": tuple(b for b in _BLOCKS_M if b <= cm),
            "BLOCK_N": tuple(b for b in _BLOCKS_N if b <= cn),
            "BLOCK_K": tuple(b for b in _BLOCKS_K if b <= ck),
            "GROUP_M": _GROUPS_M,
            "num_warps": _WARPS,
            "num_stages": _STAGES[:3] if problem.depthwise else _STAGES,
        }

    def check(self, config: Mapping[str, Value], problem: ConvProblem, limits: DeviceLimits) -> str | None:
        try:
            bm, bn, bk = int(config["BLOCK_M"]), int(config["BLOCK_N"]), int(config["BLOCK_K"])
            group_m, warps, stages = int(config["GROUP_M"]), int(config["num_warps"]), int(config["num_stages"])
        except (KeyError, TypeError, ValueError) as e:
            return f"config lacks or mistypes {e}"
        for name, b in (("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", bk)):
            if b < 16 or b & (b - 1):
                return f"{name}={b} must be a power of two >= 16"
        if group_m < 1 or stages < 1 or warps not in (1, 2, 4, 8, 16):
            return "GROUP_M and num_stages must be >= 1, num_warps a power of two <= 16"
        cm, cn, ck = self._caps(problem)
        if bm > cm or bn > cn or bk > ck:
            return f"blocks ({bm}, {bn}, {bk}) exceed the problem's ({cm}, {cn}, {ck})"
        split_k = config.get("SPLIT_K", 1)
        if not isinstance(split_k, int) or split_k < 1:
            return f"SPLIT_K={split_k!r} must be a positive int"
        if split_k > 1:
            if not self._split_k_allowed(problem):
                return "SPLIT_K > 1 only for problems with few outputs and a reduction of at least 256"
            cg = problem.C // problem.groups
            steps = (-(-cg * problem.R * problem.S // bk) if _use_flat_k(cg, problem.R, problem.S, bk)
                     else problem.R * problem.S * -(-cg // bk))
            if split_k > steps:
                return f"SPLIT_K={split_k} exceeds the {steps} reduction steps of BLOCK_K={bk}"
        if -(-bm * bn // (warps * 32)) > 255:
            return f"accumulator needs {-(-bm * bn // (warps * 32))} registers per thread (> 255)"
        if not problem.depthwise:
            if limits.is_hopper and warps < 4 and bm * bn >= 512:
                # wgmma (Hopper's tensor cores) is issued by a warpgroup of 4 warps: 2 warps fall back to
                # mma.sync. The depthwise kernel has no dot and keeps 2 warps.
                return "fewer than 4 warps cannot use Hopper's wgmma"
            cg = problem.C // problem.groups
            if _use_flat_k(cg, problem.R, problem.S, bk):
                if warps > _FLAT_MAX_WARPS:
                    # The flattened filter-tap loop with 8 warps is the pattern Inductor found miscompiled
                    # on H100 (pytorch/pytorch#173068); Inductor caps it at 4 warps, and so do we.
                    return f"the flat reduction loop is capped at {_FLAT_MAX_WARPS} warps (pytorch issue 173068)"
                if -(-bm * bn // (32 * warps)) + -(-(bm + bn) * bk // (32 * warps)) > _FLAT_MAX_TILE_REGS:
                    # The flat loop gathers every element with its own address (channel and tap vary
                    # along BLOCK_K): on sm_90a the stem's tiles spilled from 160 accumulator + operand
                    # elements a thread, and 96 did not.
                    return "the flat reduction loop's tile would spill"
        if not limits.interpreter:
            elem = 4 if problem.dtype == "float32" else 2
            # depthwise: no dot, nothing staged unless the loads get pipelined ((stages - 1) buffers)
            smem = (stages - 1) * bm * bn * elem if problem.depthwise else stages * (bm * bk + bk * bn) * elem
            if smem > limits.smem_per_block:
                return f"shared memory {smem} B > {limits.smem_per_block} B"
        return None

    def known_configs(self, problem: ConvProblem, limits: DeviceLimits) -> list[Config]:
        cm, cn, ck = self._caps(problem)
        max_stages = self.space(problem)["num_stages"][-1]
        entries = [e + (1,) for e in _INDUCTOR_CONV + _MM_EXTRA]
        if self._split_k_allowed(problem):
            entries += _SPLIT_EXTRA
        cands = []
        cg = problem.C // problem.groups
        for bm, bn, bk, stages, warps, split_k in entries:
            bm, bn, bk = min(bm, cm), min(bn, cn), min(bk, ck)
            # warps: one per 256 accumulator elements (Inductor's fit), at least 4 on Hopper where the
            # tile allows (wgmma), at most 4 on the flat reduction loop (see check)
            floor = 4 if limits.is_hopper and not problem.depthwise and bm * bn >= 512 else 2
            warps = max(floor, min(warps, bm * bn // 256))
            if not problem.depthwise and _use_flat_k(cg, problem.R, problem.S, bk):
                warps = min(warps, _FLAT_MAX_WARPS)
            cands.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SPLIT_K=split_k,
                              num_warps=warps, num_stages=min(stages, max_stages)))
        return [c for c in iter_known(cands) if self.check(c.as_dict(), problem, limits) is None]

    def make_inputs(self, problem: ConvProblem, device: torch.device | str, *, seed: int = 0) -> tuple:
        gen = torch.Generator().manual_seed(seed)
        dtype = _TORCH_DTYPE[problem.dtype]
        cg = problem.C // problem.groups
        x = torch.randn(problem.N, problem.C, problem.H, problem.W, generator=gen)
        w = torch.randn(problem.K, cg, problem.R, problem.S, generator=gen)
        w /= math.sqrt(max(1, cg * problem.R * problem.S))
        b = torch.randn(problem.K, generator=gen) if problem.bias else None
        fmt = torch.channels_last if problem.layout == "nhwc" else torch.contiguous_format
        x = x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        w = w.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        if b is not None:
            b = b.to(device=device, dtype=dtype)
        return x, w, b

    def reference(self, problem: ConvProblem, inputs: tuple) -> torch.Tensor:
        x, w, b = inputs
        pt, pb, pl, pr = problem.padding
        if pt == pb and pl == pr:
            pad = (pt, pl)
        else:
            x, pad = torch.nn.functional.pad(x, (pl, pr, pt, pb)), (0, 0)
        with _compat.conv_fp32_precision_set(problem.precision):
            y = torch.nn.functional.conv2d(x, w, b, problem.stride, pad, problem.dilation, problem.groups)
        return _torch_activation(y, problem.activation)

    def launch(self, config: Config | Mapping[str, Value], problem: ConvProblem, inputs: tuple,
               out: torch.Tensor | None = None) -> torch.Tensor:
        x, w, b = inputs
        return conv2d(x, w, config=config, bias=b, stride=problem.stride, padding=problem.padding,
                      dilation=problem.dilation, groups=problem.groups, activation=problem.activation,
                      out=out, precision=problem.precision)

    def bound_launch(self, config: Config | Mapping[str, Value], problem: ConvProblem, inputs: tuple):
        x, w, b = inputs
        bound = bind(x, w, config=config, bias=b, stride=problem.stride, padding=problem.padding,
                     dilation=problem.dilation, groups=problem.groups, activation=problem.activation,
                     precision=problem.precision)
        if bound is None:
            return super().bound_launch(config, problem, inputs)
        return lambda: bound(x, w, b)

    def plan_launches(self, config: Config | Mapping[str, Value], problem: ConvProblem, inputs: tuple,
                      capability: int) -> tuple:
        x, w, b = inputs
        return _plan(x, w, config, b, problem.stride, problem.padding, problem.dilation, problem.groups,
                     problem.activation, None, problem.precision)[1]

    def flops(self, problem: ConvProblem) -> float:
        m, n, k = problem.gemm_mnk
        return 2.0 * m * n * k * problem.groups

    def tolerance(self, problem: ConvProblem) -> float:
        if problem.dtype == "float32" and problem.precision == "ieee":
            return 1e-4
        return super().tolerance(problem)


CONV2D = ConvFamily()
