"""The custom ops of the ``torchtune_ops`` namespace: what the compile backend puts in place of aten's matmuls
and convolutions, and what users may call directly (``torch.ops.torchtune_ops.mm(a, b)``).

Each op has
- a CPU and a CUDA implementation: the run-time dispatch of ``dispatch.py`` (tuned Triton kernel or aten);
- a fake implementation that runs aten's own op on fake tensors, so shapes, strides and errors are exactly
  PyTorch's, under torch.compile (dynamic shapes included) and torch.export;
- an autograd formula whose backward products are themselves calls of these ops, so training runs the
  tuned kernels too (convolution: the input gradient where it is a stride-1 convolution, made in one call
  with aten's weight gradient where PyTorch's kernel serves it).

Ops are registered with ``torch.library.Library.define`` + ``impl`` rather than ``torch.library.custom_op``,
whose Python wrapper costs several microseconds per call. Every op takes a trailing ``opts`` string: the
settings overrides (canonical JSON) of the ``optimize()`` call that produced the graph; it only matters
when a problem is first met (see ``dispatch``).

Schemas (``Scalar`` arguments as in aten)::

    mm(Tensor self, Tensor mat2, str opts="") -> Tensor
    addmm(Tensor self, Tensor mat1, Tensor mat2, Scalar beta=1, Scalar alpha=1, str opts="") -> Tensor
    bmm(Tensor self, Tensor mat2, str opts="") -> Tensor
    baddbmm(Tensor self, Tensor batch1, Tensor batch2, Scalar beta=1, Scalar alpha=1, str opts="") -> Tensor
    mm_act(Tensor self, Tensor mat2, Tensor? bias, str activation, str opts="") -> Tensor
        activation(self @ mat2 + bias), activation in relu | gelu_tanh | silu | none
    conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation,
           int groups, str opts="") -> Tensor
    conv2d_grad_input(Tensor grad, Tensor weight, int[2] padding, str opts="") -> Tensor
        the input gradient of a stride-1, undilated, ungrouped conv2d (no autograd of its own)
    conv2d_backward(Tensor grad, Tensor input, Tensor weight, int[2] padding, str opts="") -> (Tensor, Tensor)
        its input and weight gradients: one aten convolution_backward where PyTorch's kernel serves the input
        gradient, else the tuned input gradient and aten's weight gradient (no autograd of its own)
    linear_act(Tensor input, Tensor weight, Tensor? bias, str activation, str opts="") -> Tensor
        activation(F.linear(input, weight, bias)) for any leading dims (one mm_act on flattened rows)
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from . import dispatch

NAMESPACE = "torchtune_ops"

ACTIVATIONS = ("none", "relu", "gelu_tanh", "silu")

_SCHEMAS = {
    "mm": "mm(Tensor self, Tensor mat2, str opts=\"\") -> Tensor",
    "addmm": "addmm(Tensor self, Tensor mat1, Tensor mat2, Scalar beta=1, Scalar alpha=1, "
             "str opts=\"\") -> Tensor",
    "bmm": "bmm(Tensor self, Tensor mat2, str opts=\"\") -> Tensor",
    "baddbmm": "baddbmm(Tensor self, Tensor batch1, Tensor batch2, Scalar beta=1, Scalar alpha=1, "
               "str opts=\"\") -> Tensor",
    "mm_act": "mm_act(Tensor self, Tensor mat2, Tensor? bias, str activation, str opts=\"\") -> Tensor",
    "conv2d": "conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
              "int[2] dilation, int groups, str opts=\"\") -> Tensor",
    "conv2d_grad_input": "conv2d_grad_input(Tensor grad, Tensor weight, int[2] padding, str opts=\"\") -> Tensor",
    "conv2d_backward": "conv2d_backward(Tensor grad, Tensor input, Tensor weight, int[2] padding, "
                       "str opts=\"\") -> (Tensor, Tensor)",
    "linear_act": "linear_act(Tensor input, Tensor weight, Tensor? bias, str activation, str opts=\"\") -> Tensor",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _schema in _SCHEMAS.values():
    _lib.define(_schema)

_IMPLS = {
    "mm": dispatch.mm,
    "addmm": dispatch.addmm,
    "bmm": dispatch.bmm,
    "baddbmm": dispatch.baddbmm,
    "mm_act": dispatch.mm_act,
    "conv2d": dispatch.conv2d,
    "conv2d_grad_input": dispatch.conv2d_grad_input,
    "conv2d_backward": dispatch.conv2d_backward,
    "linear_act": dispatch.linear_act,
}
_flipped = dispatch._flipped

for _name, _fn in _IMPLS.items():
    _lib.impl(_name, _fn, "CPU")
    _lib.impl(_name, _fn, "CUDA")

ops = torch.ops.torchtune_ops


# ---------------------------------------------------------------------------------------------------------
# Fake implementations: aten's own op on fake tensors (exact output metadata and PyTorch's own errors).

@torch.library.register_fake(f"{NAMESPACE}::mm", lib=_lib)
def _mm_fake(a, b, opts=""):
    return torch.mm(a, b)


@torch.library.register_fake(f"{NAMESPACE}::addmm", lib=_lib)
def _addmm_fake(bias, a, b, beta=1, alpha=1, opts=""):
    return torch.addmm(bias, a, b, beta=beta, alpha=alpha)


@torch.library.register_fake(f"{NAMESPACE}::bmm", lib=_lib)
def _bmm_fake(a, b, opts=""):
    return torch.bmm(a, b)


@torch.library.register_fake(f"{NAMESPACE}::baddbmm", lib=_lib)
def _baddbmm_fake(bias, a, b, beta=1, alpha=1, opts=""):
    return torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)


@torch.library.register_fake(f"{NAMESPACE}::mm_act", lib=_lib)
def _mm_act_fake(a, b, bias, activation, opts=""):
    pre = torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    return dispatch.activation_ref(pre, activation)


@torch.library.register_fake(f"{NAMESPACE}::conv2d", lib=_lib)
def _conv2d_fake(x, w, bias, stride, padding, dilation, groups, opts=""):
    return torch.conv2d(x, w, bias, stride, padding, dilation, groups)


@torch.library.register_fake(f"{NAMESPACE}::conv2d_grad_input", lib=_lib)
def _conv2d_grad_input_fake(grad, w, padding, opts=""):
    kh, kw = w.shape[2], w.shape[3]
    return torch.conv2d(grad, _flipped(w), None, 1, [kh - 1 - padding[0], kw - 1 - padding[1]])


@torch.library.register_fake(f"{NAMESPACE}::conv2d_backward", lib=_lib)
def _conv2d_backward_fake(grad, x, w, padding, opts=""):
    gx, gw, _ = torch.ops.aten.convolution_backward(grad, x, w, None, [1, 1], padding, [1, 1], False, [0, 0], 1,
                                                    [True, True, False])
    return gx, gw


@torch.library.register_fake(f"{NAMESPACE}::linear_act", lib=_lib)
def _linear_act_fake(x, w, bias, activation, opts=""):
    return dispatch.activation_ref(torch.nn.functional.linear(x, w, bias), activation)


# ---------------------------------------------------------------------------------------------------------
# Autograd: backward products go through our own ops (so they are tuned too).

def _needs(ctx, i: int) -> bool:
    return bool(ctx.needs_input_grad[i])


def _sum_to(g: torch.Tensor, shape) -> torch.Tensor:
    """Reduce a broadcast gradient ``g`` to ``shape`` (the shape of the broadcast input; it may have more
    dims than ``g``: F.linear of a vector with a (1, N) bias gives an (N,) output)."""
    if tuple(g.shape) == tuple(shape):
        return g
    if len(shape) > g.dim():
        g = g.reshape((1,) * (len(shape) - g.dim()) + tuple(g.shape))
    lead = g.dim() - len(shape)
    if lead:
        g = g.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if dims:
        g = g.sum(dim=dims, keepdim=True)
    return g.reshape(shape)


def _scale(t: torch.Tensor | None, s) -> torch.Tensor | None:
    return t if t is None or s == 1 else t * s


def _setup_ab(ctx, inputs, output):
    a, b = inputs[0], inputs[1]
    ctx.save_for_backward(a, b)
    ctx.opts = inputs[-1]


def _mm_backward(ctx, g):
    a, b = ctx.saved_tensors
    ga = ops.mm(g, b.t(), ctx.opts) if _needs(ctx, 0) else None
    gb = ops.mm(a.t(), g, ctx.opts) if _needs(ctx, 1) else None
    return ga, gb, None


def _bmm_backward(ctx, g):
    a, b = ctx.saved_tensors
    ga = ops.bmm(g, b.transpose(1, 2), ctx.opts) if _needs(ctx, 0) else None
    gb = ops.bmm(a.transpose(1, 2), g, ctx.opts) if _needs(ctx, 1) else None
    return ga, gb, None


def _setup_addmm(ctx, inputs, output):
    bias, a, b = inputs[0], inputs[1], inputs[2]
    ctx.save_for_backward(a, b)
    ctx.bias_shape = tuple(bias.shape)
    ctx.beta, ctx.alpha, ctx.opts = inputs[3], inputs[4], inputs[5]


def _addmm_backward(ctx, g):
    a, b = ctx.saved_tensors
    gbias = _sum_to(_scale(g, ctx.beta), ctx.bias_shape) if _needs(ctx, 0) else None
    ga = _scale(ops.mm(g, b.t(), ctx.opts), ctx.alpha) if _needs(ctx, 1) else None
    gb = _scale(ops.mm(a.t(), g, ctx.opts), ctx.alpha) if _needs(ctx, 2) else None
    return gbias, ga, gb, None, None, None


def _baddbmm_backward(ctx, g):
    a, b = ctx.saved_tensors
    gbias = _sum_to(_scale(g, ctx.beta), ctx.bias_shape) if _needs(ctx, 0) else None
    ga = _scale(ops.bmm(g, b.transpose(1, 2), ctx.opts), ctx.alpha) if _needs(ctx, 1) else None
    gb = _scale(ops.bmm(a.transpose(1, 2), g, ctx.opts), ctx.alpha) if _needs(ctx, 2) else None
    return gbias, ga, gb, None, None, None


def _setup_mm_act(ctx, inputs, output):
    a, b, bias, activation, opts = inputs
    ctx.activation, ctx.opts, ctx.has_bias = activation, opts, bias is not None
    ctx.bias_shape = tuple(bias.shape) if bias is not None else None
    # relu's derivative needs only the output; the others recompute the pre-activation (one more matmul,
    # itself a tuned op) instead of keeping it alive between forward and backward.
    ctx.save_for_backward(a, b, bias, output if activation == "relu" else None)


def _pre_activation_grad(g, out, activation, recompute_pre):
    """Gradient at the pre-activation: relu uses the saved output; gelu/silu recompute the pre-activation
    (through a tuned op) instead of keeping it alive between forward and backward."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(g, out, 0)
    if activation == "none":
        return g
    pre = recompute_pre()
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_backward(g, pre, approximate="tanh")
    return torch.ops.aten.silu_backward(g, pre)


def _mm_act_backward(ctx, g):
    a, b, bias, out = ctx.saved_tensors
    gpre = _pre_activation_grad(g, out, ctx.activation, lambda: ops.mm_act(a, b, bias, "none", ctx.opts))
    ga = ops.mm(gpre, b.t(), ctx.opts) if _needs(ctx, 0) else None
    gb = ops.mm(a.t(), gpre, ctx.opts) if _needs(ctx, 1) else None
    gbias = _sum_to(gpre, ctx.bias_shape) if ctx.has_bias and _needs(ctx, 2) else None
    return ga, gb, gbias, None, None


def _linear_act_backward(ctx, g):
    """Gradients of ``activation(F.linear(x, w, bias))`` for every shape F.linear takes: x of any rank >= 1,
    w of shape (N, K) or (K,) (read as (1, K) with the output's last dim dropped), K = 0 and zero rows
    included, a bias of any shape that broadcasts. Both products go through the tuned mm."""
    x, w, bias, out = ctx.saved_tensors
    gpre = _pre_activation_grad(g, out, ctx.activation, lambda: ops.linear_act(x, w, bias, "none", ctx.opts))
    k, rows = x.shape[-1], math.prod(x.shape[:-1])  # 1 for a vector
    n = w.shape[0] if w.dim() == 2 else 1
    mat_shape = x.shape[:-1] + w.shape[:-1]          # x @ w.T before the bias broadcasts it
    g2 = _sum_to(gpre, mat_shape).reshape(rows, n)   # explicit sizes: -1 is ambiguous with zero rows or n = 0
    gx = ops.mm(g2, w.reshape(n, k), ctx.opts).reshape(x.shape) if _needs(ctx, 0) else None
    gw = ops.mm(g2.t(), x.reshape(rows, k), ctx.opts).reshape(w.shape) if _needs(ctx, 1) else None
    gbias = _sum_to(gpre, ctx.bias_shape) if ctx.has_bias and _needs(ctx, 2) else None
    return gx, gw, gbias, None, None


def _setup_conv(ctx, inputs, output):
    x, w, bias, stride, padding, dilation, groups, opts = inputs
    ctx.save_for_backward(x, w)
    ctx.bias_shape = tuple(bias.shape) if bias is not None else None
    ctx.args = (list(stride), list(padding), list(dilation), groups)
    ctx.opts = opts


def _conv_backward(ctx, g):
    x, w = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.args
    want_x, want_w = _needs(ctx, 0), _needs(ctx, 1)
    want_b = ctx.bias_shape is not None and _needs(ctx, 2)
    kh, kw = w.shape[2], w.shape[3]
    gx = None
    # With stride 1, dilation 1, one group and padding < kernel size, the input gradient is a convolution
    # of the output gradient with the flipped, transposed weight: run it through our own (tuned) op.
    own_gx = (want_x and stride == [1, 1] and dilation == [1, 1] and groups == 1
              and padding[0] < kh and padding[1] < kw)
    if own_gx and want_w:
        gx, gw = ops.conv2d_backward(g, x, w, padding, ctx.opts)
        gb = torch.ops.aten.convolution_backward(g, x, w, list(ctx.bias_shape), stride, padding, dilation, False,
                                                 [0, 0], groups, [False, False, True])[2] if want_b else None
        return gx, gw, gb, None, None, None, None, None
    if own_gx:
        gx = ops.conv2d_grad_input(g, w, padding, ctx.opts)
    mask = [want_x and not own_gx, want_w, want_b]
    if any(mask):
        bias_sizes = list(ctx.bias_shape) if ctx.bias_shape is not None else None
        gx2, gw, gb = torch.ops.aten.convolution_backward(g, x, w, bias_sizes, stride, padding, dilation,
                                                          False, [0, 0], groups, mask)
        if not own_gx:
            gx = gx2
    else:
        gw = gb = None
    return gx, gw, gb, None, None, None, None, None


# Each op's Python signature, to fill in defaults before an autograd.Function sees the arguments.
_SIGNATURES = {
    "mm": lambda self, mat2, opts="": (self, mat2, opts),
    "bmm": lambda self, mat2, opts="": (self, mat2, opts),
    "addmm": lambda self, mat1, mat2, beta=1, alpha=1, opts="": (self, mat1, mat2, beta, alpha, opts),
    "baddbmm": lambda self, b1, b2, beta=1, alpha=1, opts="": (self, b1, b2, beta, alpha, opts),
    "mm_act": lambda self, mat2, bias, activation, opts="": (self, mat2, bias, activation, opts),
    "conv2d": lambda x, w, bias, stride, padding, dilation, groups, opts="": (
        x, w, bias, stride, padding, dilation, groups, opts),
    "linear_act": lambda x, w, bias, activation, opts="": (x, w, bias, activation, opts),
}


def _any_requires_grad_py(*args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


_any_requires_grad = getattr(torch._C, "_any_requires_grad", _any_requires_grad_py)
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)
#: tensor types whose data the implementation may read as it is (no subclass with its own dispatch)
_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter})


def _autograd_kernel(name: str, setup: Callable, backward: Callable) -> Callable:
    """The op's Autograd-key kernel.

    Recording for autograd goes through an ``autograd.Function`` whose backward calls our ops. Without
    grad, plain CPU/CUDA tensors (``torch.Tensor`` or ``Parameter``, no dispatch mode active) call the
    implementation directly: a kernel without the dispatch key set (``with_keyset``) and no second trip
    through the dispatcher (measured: the key set alone costs about 1 us per call). Anything else (fake,
    functional or other subclass tensors, a dispatch mode, other devices) goes below autograd through the
    dispatcher, as a redispatch would.
    """
    overload = getattr(ops, name).default
    impl = _IMPLS[name]
    normalize = _SIGNATURES[name]

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            out = overload(*args)
        setup(ctx, args, out)
        return out

    fn = type(f"TorchTuneOps_{name}", (torch.autograd.Function,),
              {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    grad_enabled, any_requires_grad, modes, plain_types = (torch._C.is_grad_enabled, _any_requires_grad,
                                                           _dispatch_modes, _PLAIN)

    def below(args):
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args)

    if name in ("mm", "bmm"):
        # named parameters, no argument tuple: the dispatcher passes the schema's arguments by position
        # (opts left out where it is the default); about 0.3 us less per call than *args. The hit of
        # ``dispatch.mm``/``bmm`` is inlined (the same key; a miss calls it): one Python frame less.
        memo, precision = dispatch._memo, dispatch._get_precision

        def kernel(a, b, opts=""):
            if grad_enabled() and (a.requires_grad or b.requires_grad):
                return fn.apply(a, b, opts)
            if type(a) in plain_types and type(b) in plain_types and (a.is_cpu or a.is_cuda) and not modes():
                c = memo.get((name, a.dtype, b.dtype, a.device, a.shape, b.shape, a.stride(), b.stride(), opts,
                              precision()))
                if c is None:
                    return impl(a, b, opts)
                c.calls += 1
                return c.fn(a, b)
            return below((a, b, opts))
    else:   # the third argument a tensor (addmm, baddbmm) or an optional bias
        def kernel(*args, **kwargs):
            if kwargs:
                args = normalize(*args, **kwargs)
            if grad_enabled() and any_requires_grad(*args):
                return fn.apply(*normalize(*args))
            a, c = args[0], args[2]
            if (type(a) in plain_types and type(args[1]) in plain_types and (c is None or type(c) in plain_types)
                    and (a.is_cpu or a.is_cuda) and not modes()):
                return impl(*args)
            return below(args)

    return kernel


for _name, _setup, _bwd in (("mm", _setup_ab, _mm_backward), ("bmm", _setup_ab, _bmm_backward),
                            ("addmm", _setup_addmm, _addmm_backward),
                            ("baddbmm", _setup_addmm, _baddbmm_backward),
                            ("mm_act", _setup_mm_act, _mm_act_backward),
                            ("conv2d", _setup_conv, _conv_backward),
                            ("linear_act", _setup_mm_act, _linear_act_backward)):
    _lib.impl(_name, _autograd_kernel(_name, _setup, _bwd), "Autograd")


def _autocast_kernel(name: str, device_type: str) -> Callable:
    """Autocast as PyTorch does for mm/addmm/bmm/baddbmm/conv2d: floating-point tensor arguments are cast
    to the autocast dtype, then the op runs with autocast off."""
    overload = getattr(ops, name).default

    def kernel(*args, **kwargs):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
                and a.device.type == device_type else a for a in args]  # PyTorch never casts float64
        with torch.autocast(device_type, enabled=False):
            return overload(*cast, **kwargs)

    return kernel


for _name in _SCHEMAS:
    _lib.impl(_name, _autocast_kernel(_name, "cpu"), "AutocastCPU")
    _lib.impl(_name, _autocast_kernel(_name, "cuda"), "AutocastCUDA")


def op(name: str):
    """The OpOverload ``torch.ops.torchtune_ops.<name>.default``."""
    return getattr(ops, name).default
