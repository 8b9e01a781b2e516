"""The hot path: each custom op builds its key, looks it up in memory and calls the choice.

    key = (op, dtypes, device, sizes, strides, bias kind, activation, alpha/beta, opts, fp32 precision)
    choice = _memo.get(key)  -> choice.fn(*args)

A key met for the first time goes to ``resolve._resolve`` once (store, bundles, prediction, tuning); nothing
else happens here. ``stats``, ``reset``, ``set_tune_options``, ``wait_background`` and ``encode_opts`` are
the runtime's controls, re-exported from where they live.

Call sites (``SITES``): Inductor's generated code for a graph with static shapes calls ``<op>_site(...,
site)`` instead of the op, with a constant ``site`` id per call in the code (``backend._register_lowerings``).
Everything the key holds but the float32 matmul precision is fixed at such a call (sizes, strides, dtypes and
device are the code's own buffers or asserted inputs), so the matmul sites keep the choice their first call
resolved and later calls run it while it is live (``Choice.live``: ``_memo`` still holds it) and the
precision is the same: no key built, hashed or looked up. (The convolution sites keep the key.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from .choices import _grad_input, _lock, _memo, stats
from .resolve import _resolve, encode_opts, reset, set_tune_options, wait_background
from .aten import ACT_INPLACE, activation_ref

__all__ = ["mm", "bmm", "addmm", "baddbmm", "mm_act", "conv2d", "conv2d_grad_input", "conv2d_backward",
           "linear_act", "stats",
           "reset", "set_tune_options", "wait_background", "encode_opts", "activation_ref", "SITES"]

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


def _mm_act_key(a, b, bias, activation, opts):
    if bias is None:
        return ("mm_act", a.dtype, b.dtype, None, a.device, a.shape, b.shape, None, a.stride(), b.stride(),
                None, activation, opts, _get_precision())
    return ("mm_act", a.dtype, b.dtype, bias.dtype, a.device, a.shape, b.shape, bias.shape, a.stride(),
            b.stride(), bias.stride(), activation, opts, _get_precision())


def mm_act(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, activation: str,
           opts: str = "") -> torch.Tensor:
    key = _mm_act_key(a, b, bias, activation, opts)
    c = _memo.get(key)
    if c is None:
        c = _resolve(key, "mm_act", (a, b, bias, activation), opts)
    c.calls += 1
    return c.fn(a, b, bias, activation)


def _conv_key(x, w, bias, stride, padding, dilation, groups, opts):
    return ("conv2d", x.dtype, w.dtype, None if bias is None else bias.dtype, x.device, x.shape, w.shape,
            None if bias is None else bias.shape, x.stride(), w.stride(), tuple(stride), tuple(padding),
            tuple(dilation), groups, opts, _get_precision())


def conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups: int,
           opts: str = "") -> torch.Tensor:
    key = _conv_key(x, w, bias, stride, padding, dilation, groups, opts)
    c = _memo.get(key)
    if c is None:
        c = _resolve(key, "conv2d", (x, w, bias, stride, padding, dilation, groups), opts)
    c.calls += 1
    return c.fn(x, w, bias, stride, padding, dilation, groups)


# ---------------------------------------------------------------------------------------------------------
# The input gradient of a stride-1, undilated, ungrouped conv2d: a conv2d of the output gradient with the
# flipped, transposed weight (the problem the conv2d kernels are tuned on). Only a Triton kernel needs the
# flipped copy: where PyTorch's kernel serves the problem, PyTorch's own input gradient (a transposed
# convolution of the weight as it is) runs, with no flip and no copy.

def _flipped(w: torch.Tensor) -> torch.Tensor:
    return w.transpose(0, 1).flip(2, 3)


class _GradInput:
    """What one input-gradient key runs: the conv2d key of its flipped problem. The flipped weight is not
    kept between calls: in training the weight changes between two backward passes, and no cheap check
    proves it did not (writes through ``.data`` leave the version counter as it was)."""

    __slots__ = ("conv_key", "pad")

    def __init__(self, conv_key: tuple, pad: list) -> None:
        self.conv_key, self.pad = conv_key, pad

    def run(self, grad: torch.Tensor, w: torch.Tensor, padding) -> torch.Tensor | None:
        """The input gradient, or None where the conv2d key is not in memory (reset, swapped)."""
        c = _memo.get(self.conv_key)
        if c is None:
            return None
        c.calls += 1
        if c.fn is c.aten:
            return torch.conv_transpose2d(grad, w, None, 1, padding)
        return c.fn(grad, _flipped(w), None, (1, 1), self.pad, (1, 1), 1)


    def run_both(self, grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, padding):
        """The input and weight gradients, or None where the conv2d key is not in memory. Where PyTorch's
        kernel serves the input gradient, one aten convolution_backward makes both (as Inductor's graph
        would); else the tuned kernel makes the input gradient (in the memory format aten's would have) and
        aten the weight's."""
        c = _memo.get(self.conv_key)
        if c is None:
            return None
        c.calls += 1
        if c.fn is c.aten:
            gx, gw, _ = _conv_bwd(grad, x, w, None, _ONES, padding, _ONES, False, _ZEROS, 1, _INPUT_WEIGHT)
            return gx, gw
        gx = c.fn(grad, _flipped(w), None, (1, 1), self.pad, (1, 1), 1)
        return _like_aten_grad(gx, x, w), _grad_weight(grad, x, w, padding)


_conv_bwd = torch.ops.aten.convolution_backward.default
_ONES, _ZEROS = [1, 1], [0, 0]
_INPUT_WEIGHT, _WEIGHT = [True, True, False], [False, True, False]


def _grad_weight(grad, x, w, padding) -> torch.Tensor:
    return _conv_bwd(grad, x, w, None, _ONES, padding, _ONES, False, _ZEROS, 1, _WEIGHT)[1]


def _like_aten_grad(gx: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``gx`` in the memory format aten's convolution_backward gives its input gradient (channels-last where
    the input or the weight is), which the compiled graph's fake values assume."""
    fmt = (torch.channels_last if torch.channels_last in (suggest_memory_format(x), suggest_memory_format(w))
           else torch.contiguous_format)
    return gx if gx.is_contiguous(memory_format=fmt) else gx.contiguous(memory_format=fmt)


def _grad_input_key(grad, w, padding, opts) -> tuple:
    return (grad.dtype, w.dtype, grad.device, grad.shape, w.shape, grad.stride(), w.stride(), padding[0],
            padding[1], opts, _get_precision())


def conv2d_grad_input(grad: torch.Tensor, w: torch.Tensor, padding, opts: str = "") -> torch.Tensor:
    """Input gradient of a stride-1, undilated, ungrouped conv2d with ``padding``."""
    key = _grad_input_key(grad, w, padding, opts)
    g = _grad_input.get(key)
    if g is not None:
        out = g.run(grad, w, padding)
        if out is not None:
            return out
    return _grad_input_miss(key, grad, w, padding, opts)


def _grad_input_miss(key: tuple, grad, w, padding, opts) -> torch.Tensor:
    kh, kw = w.shape[2], w.shape[3]
    pad = [kh - 1 - padding[0], kw - 1 - padding[1]]
    wf = _flipped(w)
    g = _GradInput(_conv_key(grad, wf, None, (1, 1), pad, (1, 1), 1, opts), pad)
    with _lock:
        _grad_input[key] = g
    return conv2d(grad, wf, None, (1, 1), pad, (1, 1), 1, opts)


def conv2d_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, padding,
                    opts: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Input and weight gradients of a stride-1, undilated, ungrouped conv2d with ``padding`` (the input
    gradient's problem as ``conv2d_grad_input``'s; see ``_GradInput.run_both``)."""
    key = _grad_input_key(grad, w, padding, opts)
    g = _grad_input.get(key)
    if g is not None:
        out = g.run_both(grad, x, w, padding)
        if out is not None:
            return out
    gx = _grad_input_miss(key, grad, w, padding, opts)
    return _like_aten_grad(gx, x, w), _grad_weight(grad, x, w, padding)


def linear_act(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, activation: str,
               opts: str = "") -> torch.Tensor:
    """``activation(F.linear(x, w, bias))`` for any leading dims of ``x``: one tuned mm_act on the
    flattened rows."""
    if x.dim() == 2 and w.dim() == 2:  # the common case: one mm_act as it is
        return mm_act(x, w.t(), bias, activation, opts)
    if not _one_mm_act(x, w, bias):
        return activation_ref(F.linear(x, w, bias), activation)
    out = mm_act(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), w.t(), bias, activation, opts)  # K = 0 included
    return out.reshape(*x.shape[:-1], w.shape[0])


def _one_mm_act(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether one mm_act on the flattened rows of ``x`` computes ``F.linear(x, w, bias)``. Not for shapes
    F.linear takes but one matmul of the rows does not (a 1-D weight, a bias of 2 or more dims beside a
    vector or batched input) nor its errors (0-d input): those stay PyTorch's own."""
    xd = x.dim()
    return xd != 0 and w.dim() == 2 and not (bias is not None and bias.dim() > 1 and xd != 2)


# ---------------------------------------------------------------------------------------------------------
# Call sites of Inductor's generated code (static shapes): the key built once per site.

_sites: dict[str, tuple] = {}   # site id -> (Choice, its fp32 precision[, ...]); conv: (key or _GradInput, precision)


def _keep(site: str, key: tuple, *extra) -> None:
    """Keep the choice of ``key`` (if ``_memo`` kept it) for the call site ``site``: its later calls read
    the choice itself while it is live, without hashing the key."""
    c = _memo.get(key)
    if c is not None:
        _sites[site] = (c, key[-1], *extra)


def _ab_site(op: str, call):
    """The site function of ``mm`` or ``bmm`` (``call``)."""
    def site_fn(a, b, opts, site):
        s = _sites.get(site)
        if s is not None:
            c = s[0]
            if c.live and s[1] == _get_precision():
                c.calls += 1
                return c.fn(a, b)
        out = call(a, b, opts)
        _keep(site, (op, a.dtype, b.dtype, a.device, a.shape, b.shape, a.stride(), b.stride(), opts,
                     _get_precision()))
        return out

    site_fn.__name__ = f"{op}_site"
    return site_fn


def _bias_site(op: str, call):
    """The site function of ``addmm`` or ``baddbmm`` (``call``)."""
    def site_fn(bias, a, b, beta, alpha, opts, site):
        s = _sites.get(site)
        if s is not None:
            c = s[0]
            if c.live and s[1] == _get_precision():
                c.calls += 1
                return c.fn(bias, a, b, beta, alpha)
        out = call(bias, a, b, beta, alpha, opts)
        _keep(site, (op, a.dtype, b.dtype, bias.dtype, a.device, a.shape, b.shape, bias.shape, a.stride(),
                     b.stride(), bias.stride(), beta, alpha, opts, _get_precision()))
        return out

    site_fn.__name__ = f"{op}_site"
    return site_fn


mm_site, bmm_site = _ab_site("mm", mm), _ab_site("bmm", bmm)
addmm_site, baddbmm_site = _bias_site("addmm", addmm), _bias_site("baddbmm", baddbmm)


def mm_act_site(a, b, bias, activation, opts, site):
    s = _sites.get(site)
    if s is not None:
        c = s[0]
        if c.live and s[1] == _get_precision():
            c.calls += 1
            return c.fn(a, b, bias, activation)
    out = mm_act(a, b, bias, activation, opts)
    _keep(site, _mm_act_key(a, b, bias, activation, opts))
    return out


def linear_act_site(x, w, bias, activation, opts, site):
    """A ``linear_act`` site keeps the choice of its mm_act (on the flattened rows of an input of any rank);
    where PyTorch's kernel serves it, PyTorch's linear runs (the activation in place on its fresh output),
    without the transposed view of ``w`` or reshapes; our kernel runs on the rows, reshaped back."""
    s = _sites.get(site)
    if s is not None:
        c = s[0]
        if c.live and s[1] == _get_precision():
            c.calls += 1
            if c.fn is c.aten:
                act = ACT_INPLACE[activation]
                return F.linear(x, w, bias) if act is None else act(F.linear(x, w, bias))
            rows = s[2]
            if rows is None:
                return c.fn(x, w.t(), bias, activation)
            return c.fn(x.reshape(rows, x.shape[-1]), w.t(), bias, activation).reshape(s[3])
    out = linear_act(x, w, bias, activation, opts)
    if activation in ACT_INPLACE and _one_mm_act(x, w, bias):   # the key that linear_act's mm_act built
        if x.dim() == 2:
            _keep(site, _mm_act_key(x, w.t(), bias, activation, opts), None, None)
        else:
            rows = math.prod(x.shape[:-1])
            _keep(site, _mm_act_key(x.reshape(rows, x.shape[-1]), w.t(), bias, activation, opts), rows,
                  (*x.shape[:-1], w.shape[0]))
    return out


def conv2d_site(x, w, bias, stride, padding, dilation, groups, opts, site):
    s = _sites.get(site)
    if s is not None and s[1] == _get_precision():
        c = _memo.get(s[0])
        if c is not None:
            c.calls += 1
            return c.fn(x, w, bias, stride, padding, dilation, groups)
    key = _conv_key(x, w, bias, stride, padding, dilation, groups, opts)
    _sites[site] = (key, key[-1])
    return conv2d(x, w, bias, stride, padding, dilation, groups, opts)


def conv2d_grad_input_site(grad, w, padding, opts, site):
    s = _sites.get(site)
    if s is not None and s[1] == _get_precision():
        out = s[0].run(grad, w, padding)
        if out is not None:
            return out
    key = _grad_input_key(grad, w, padding, opts)
    out = conv2d_grad_input(grad, w, padding, opts)
    _sites[site] = (_grad_input[key], key[-1])
    return out


def conv2d_backward_site(grad, x, w, padding, opts, site):
    s = _sites.get(site)
    if s is not None and s[1] == _get_precision():
        out = s[0].run_both(grad, x, w, padding)
        if out is not None:
            return out
    key = _grad_input_key(grad, w, padding, opts)
    out = conv2d_backward(grad, x, w, padding, opts)
    _sites[site] = (_grad_input[key], key[-1])
    return out


#: the site function of each op (what Inductor's code calls where shapes are static)
SITES = {"mm": mm_site, "bmm": bmm_site, "addmm": addmm_site, "baddbmm": baddbmm_site, "mm_act": mm_act_site,
         "linear_act": linear_act_site, "conv2d": conv2d_site, "conv2d_grad_input": conv2d_grad_input_site,
         "conv2d_backward": conv2d_backward_site}
