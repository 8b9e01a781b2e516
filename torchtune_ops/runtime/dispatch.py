"""The hot path: each custom op builds its key, looks it up in memory and calls the choice.

    key = (op, dtypes, device, sizes, strides, bias kind, activation, alpha/beta, opts, fp32 precision)
    choice = _memo.get(key)  -> choice.fn(*args)

A key met for the first time goes to ``resolve._resolve`` once (store, bundles, prediction, tuning); nothing
else happens here. ``stats``, ``reset``, ``set_tune_options``, ``wait_background`` and ``encode_opts`` are
the runtime's controls, re-exported from where they live.
"""
from __future__ import annotations

import torch

from .choices import _memo, stats
from .resolve import _resolve, encode_opts, reset, set_tune_options, wait_background
from .aten import activation_ref

__all__ = ["mm", "bmm", "addmm", "baddbmm", "mm_act", "conv2d", "stats", "reset", "set_tune_options",
           "wait_background", "encode_opts", "activation_ref"]

_get_precision = getattr(torch._C, "_get_float32_matmul_precision", torch.get_float32_matmul_precision)


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


