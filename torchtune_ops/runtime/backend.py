"""The torch.compile backend ``"torchtune_ops"``: AOT graphs with our custom ops in place of aten's matmuls
and convolutions, everything else compiled by Inductor (default) or run eagerly.

    torch.compile(model, backend="torchtune_ops")                    # Inductor for the rest
    torch.compile(model, backend="torchtune_ops", options={"compiler": "eager"})

The rewrite runs on the graphs AOT autograd produces (forward, backward and inference graphs, after
functionalization and decomposition), so backward matmuls and convolutions are intercepted too:

    aten.mm / addmm / bmm / baddbmm      -> torchtune_ops.mm / addmm / bmm / baddbmm
    aten.convolution (2-D, not transposed) -> torchtune_ops.conv2d
    aten.convolution (1-D, not transposed) -> torchtune_ops.conv2d on a height of 1 (unsqueeze, squeeze)
    mm or addmm (1-D bias, alpha = beta = 1) whose only user is relu / gelu(tanh) / silu
                                         -> torchtune_ops.mm_act (the activation fused in the epilogue)
    aten.convolution_backward's input gradient (1-D or 2-D, stride 1, no dilation, one group)
                                         -> torchtune_ops.conv2d of the output gradient with the flipped,
                                            transposed weight; 2-D with the weight gradient asked:
                                            torchtune_ops.conv2d_backward (both in one call, one aten
                                            convolution_backward where PyTorch's kernel serves; a bias
                                            gradient is a sum), else conv2d_grad_input (weight and bias
                                            gradients stay with aten)

Layouts: where Inductor's layout optimization would run the graph's convolutions channels-last (its own
decision, asked on the graph before the rewrite: it counts aten's convolution nodes only), our conv2d's input
and weight are constrained to channels-last as Inductor's convolution lowering does, so the graph is laid out
as torch.compile's (see ``_inductor_channels_last``).

Transposed and 3-D convolutions, and the input gradients the rule above does not cover, stay with PyTorch:
``skipped()`` says which and why (``explain()`` prints it). So does a node of static shapes whose problem
is already decided for PyTorch's kernel when the graph is compiled (``resolve.decided_aten``, read-only: a
store or bundle entry final for the settings in force whose winner is aten, or a problem the kernels do
not cover): Inductor compiles it as torch.compile would. A miss, an entry to be tuned again, a Triton winner
or dynamic shapes keep our op; a winner that changes later is followed when the graph is compiled again
(the pass's ``uuid`` covers the store's state, so Inductor's caches do not hand back the old graph).

A matmul whose result is also needed elsewhere (e.g. saved as the pre-activation for a gelu backward) is not
fused: it becomes our addmm/mm followed by aten's activation. With Inductor the rewrite is a
``post_grad_custom_pre_pass`` whose ``uuid`` names this module's source and the settings overrides, so
Inductor's FX graph cache and AOT autograd cache stay correct; with ``compiler="eager"`` it runs in AOT
autograd's forward and backward compilers. ``intercepted()`` counts the rewritten ops (and the matmul-like
ops left alone) so a silently missed op shows, under the op names ``explain()`` shows at run time (a fused
``linear_act`` counts as ``mm_act``, an input gradient as ``conv2d``); counts grow only when a graph is
actually compiled (not when Inductor loads it from its cache). Every op call carries the name of its graph
in ``opts`` (``optimize()`` names it after the model, e.g. ``Net#1.0``: the model's first optimize() in this
process, its first graph), so ``explain()`` tells two models' problems apart.

Backend options (``options={...}`` of torch.compile, or keyword arguments when called directly):
``compiler`` ("inductor" or "eager"), ``settings`` (a dict of settings overrides, see settings.DECLARED;
``optimize()`` fills it), any other key is an Inductor config patch. ``settings.disable`` (env
TORCHTUNE_OPS_DISABLE=1) makes the backend plain Inductor / plain AOT eager: no custom op appears.

Nothing to win, nothing changed: a graph whose example inputs are all on devices where no Triton kernel can
run (a CPU without TRITON_INTERPRET=1, a device without a Triton backend) is compiled exactly as
torch.compile would compile it, without our ops (they could only call PyTorch's kernel, through Python);
one INFO log line says so, ``passthrough()`` counts such graphs, and nothing is recorded.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import operator
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .. import settings

__all__ = ["torchtune_ops_backend", "rewrite_graph", "prefuse_linear_activation", "intercepted", "skipped",
           "passthrough", "reset_counts", "RewritePass"]

_counts: collections.Counter = collections.Counter()
_skipped: collections.Counter = collections.Counter()
_counts_lock = threading.Lock()


def intercepted() -> dict[str, int]:
    """Counts since the last ``reset_counts()``: each of our ops put into a graph, under its run-time name
    ("mm", "addmm", "bmm", "baddbmm", "mm_act", "conv2d"), and ``"skipped:<aten op>"`` for matmul-like ops
    left to PyTorch (``skipped()`` says why)."""
    with _counts_lock:
        return dict(_counts)


def skipped() -> dict[str, int]:
    """Why ops were left to PyTorch at compile time: ``"<aten op>: <reason>"`` -> count (since the last
    ``reset_counts()``), e.g. ``"convolution: transposed ..."``."""
    with _counts_lock:
        return dict(_skipped)


def left_by_cache() -> dict[str, int]:
    """Of ``skipped()``: the nodes left to Inductor because the cache's winner is PyTorch's kernel, by where
    the answer came from (``"store"`` or ``"bundle"``); cache hits that never reach our dispatch."""
    out: dict[str, int] = {}
    for why, n in skipped().items():
        if "the cached winner" in why:
            src = "bundle" if "shipped bundle" in why else "store"
            out[src] = out.get(src, 0) + n
    return out


def reset_counts() -> None:
    """Zero the counts of ``intercepted()``, ``skipped()`` and ``passthrough()``."""
    with _counts_lock:
        _counts.clear()
        _skipped.clear()
        _passthrough.clear()


_ACTIVATIONS = {"relu", "silu", "gelu"}


def _activation(node: torch.fx.Node) -> str | None:
    """Our activation name for an aten activation node, or None."""
    if node.op != "call_function":
        return None
    aten = torch.ops.aten
    if node.target is aten.relu.default:
        return "relu"
    if node.target is aten.silu.default:
        return "silu"
    if node.target is aten.gelu.default:
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return "gelu_tanh" if approx == "tanh" else None
    return None


def _val(node: Any):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def rewrite_graph(graph: torch.fx.Graph, *, opts: str = "", channels_last: bool = False) -> dict[str, int]:
    """Replace aten matmuls and convolutions in ``graph`` (an AOT/post-grad aten graph) by our ops.

    Args:
        graph: the graph, changed in place.
        opts: the settings-overrides string written into every op call (``dispatch.encode_opts``).
        channels_last: run the 2-D convolutions channels-last, as Inductor's layout optimization would have
            run aten's (``_inductor_channels_last``); default False (the layouts the graph was traced with).

    Returns the counts of this graph (also added to ``intercepted()``).
    """
    from . import ops as ours  # registers the ops

    aten = torch.ops.aten
    simple = {aten.mm.default: "mm", aten.bmm.default: "bmm"}
    with_bias = {aten.addmm.default: "addmm", aten.baddbmm.default: "baddbmm"}
    counts: collections.Counter = collections.Counter()
    why: collections.Counter = collections.Counter()
    relaid = False   # a convolution's inputs were made channels-last: strides downstream change
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        t = node.target
        if t in simple or t in with_bias:
            fused = _try_fuse(graph, node, opts)
            if fused is True:
                counts["mm_act"] += 1
                continue
            if fused:   # a fused mm_act decided for PyTorch: the matmul and its activation stay Inductor's
                counts[f"skipped:{t.overloadpacket.__name__}"] += 1
                why[f"{t.overloadpacket.__name__} (with its activation): {fused}"] += 1
                continue
            if t in simple:
                a, b = node.args[:2]
                new_args = (a, b, opts)
                name = simple[t]
            else:
                bias, a, b = node.args[:3]
                beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
                alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
                new_args = (bias, a, b, beta, alpha, opts)
                name = with_bias[t]
            reason = _decided_aten(name, new_args[:-1], opts)
            left = getattr(_left_with_activation, "sigs", None)
            if reason is None and left and t is aten.addmm.default and _mm_signature(
                    _val(a), _val(b), _val(bias)) in left:
                reason = "PyTorch's kernel is the cached winner of its linear + activation"
            if reason is not None:
                counts[f"skipped:{t.overloadpacket.__name__}"] += 1
                why[f"{t.overloadpacket.__name__}: {reason}"] += 1
                continue
            _replace(graph, node, ours.op(name), new_args)
            counts[name] += 1
        elif t is aten.convolution.default:
            x, w, bias, stride, padding, dilation, transposed, _output_padding, groups = node.args[:9]
            xv = _val(x)
            reason = _conv_skip_reason(xv, transposed, stride)
            args = forced = None
            if reason is None and xv.dim() == 4:
                # looked up in the layout it will run in (a constraint left unused is dead code, removed)
                args = (x, w, bias, list(stride), list(padding), list(dilation), groups)
                forced = _channels_last_args(graph, node, args) if channels_last else None
                args = forced or args
                reason = _decided_aten("conv2d", args, opts)
            elif reason is None:
                reason = _decided_conv(node, opts)
            if reason is not None:
                counts["skipped:convolution"] += 1
                why[f"convolution: {reason}"] += 1
                continue
            if xv.dim() == 3:
                _rewrite_conv1d(graph, node, opts)
            else:
                new = _replace(graph, node, ours.op("conv2d"), (*args, opts))
                if forced:
                    new.meta["val"] = _fake_val(new.target, (*args, opts))
                    relaid = True
            counts["conv2d"] += 1
        elif t is aten.convolution_backward.default:
            reason = _rewrite_conv_backward(graph, node, opts)
            if reason is None:
                counts["conv2d"] += 1   # run time: the input gradient is a conv2d
            elif node.args[10][0]:   # an input gradient left to aten
                counts["skipped:convolution_backward"] += 1
                why[f"convolution_backward (input gradient): {reason}"] += 1
    graph.eliminate_dead_code()
    if relaid:
        _save_constrained(graph)
        _repropagate(graph)
    graph.lint()
    with _counts_lock:
        _counts.update(counts)
        _skipped.update(why)
    return dict(counts)


# ---------------------------------------------------------------------------------------------------------
# Layouts: Inductor's layout optimization (GraphLowering.decide_layout_opt) runs a graph's 2-D convolutions
# channels-last (on a CPU with oneDNN: whenever there is one; on a GPU: by its heuristics), converting inputs
# and weights where they are not, and plans every tensor around them in that layout. It counts aten's
# convolution nodes only: once ours replace them it would see none and run the whole graph NCHW (measured on
# the demo ResNet, 2-core CPU: 10-20 us more per convolution at these sizes, forward and backward). So the
# pass asks Inductor's decision on the graph before the rewrite and, where it says channels-last, puts
# Inductor's own stride constraint (prims.inductor_force_stride_order: free where the producer is not yet
# laid out, a copy otherwise, as its convolution lowering does) on our conv2d's input and weight; the output
# then follows aten's rule (channels-last in, channels-last out; the Triton kernel follows it too) and the
# fake values downstream are computed again so that saved tensors keep that layout.

def _inductor_channels_last(graph: torch.fx.Graph, *, training: bool) -> bool:
    """Whether Inductor's layout optimization would run ``graph``'s convolutions channels-last (False where
    this torch has no such decision or it fails: the layouts as traced)."""
    try:
        from torch._inductor.graph import GraphLowering

        decide = getattr(GraphLowering, "decide_layout_opt", None)
        gm = graph.owning_module
        if decide is None or gm is None:
            return False
        return bool(decide(gm, is_inference=not training))
    except Exception:  # noqa: BLE001 - another torch's private API: keep the traced layouts
        return False


def _force_stride_order():
    """Inductor's stride constraint op (``prims.inductor_force_stride_order``), or None on a torch without it."""
    try:
        from torch._inductor import inductor_prims  # noqa: F401  (registers the prim)
    except ImportError:
        return None
    packet = getattr(torch.ops.prims, "inductor_force_stride_order", None)
    return getattr(packet, "default", None)


def _channels_last_strides(shape) -> list[int]:
    n, c, h, w = shape
    return [h * w * c, 1, w * c, c]


def _channels_last_args(graph: torch.fx.Graph, node: torch.fx.Node, args: tuple) -> tuple | None:
    """``args`` of our conv2d with the input and weight constrained to channels-last (new nodes before
    ``node``), or None where that cannot be done or would not be exact: dynamic shapes, or an input whose
    channels-last strides are also contiguous ones (one channel, one pixel), where the run-time kernel and
    the fake output could disagree on the output's strides. A weight of one channel or a 1x1 kernel is
    left as it is (channels-last already)."""
    force = _force_stride_order()
    x, w = args[0], args[1]
    vals = [_val(x), _val(w)]
    if force is None or not all(isinstance(v, torch.Tensor) and v.dim() == 4 for v in vals):
        return None
    shapes = [tuple(v.shape) for v in vals]
    if not all(isinstance(d, int) for s in shapes for d in s):
        return None
    ambiguous = [s[1] == 1 or s[2] * s[3] == 1 for s in shapes]
    if ambiguous[0]:
        return None
    new = [x, w]
    with graph.inserting_before(node):
        for i in (0, 1):
            if not ambiguous[i]:   # (a 1x1 weight is channels-last as it is)
                new[i] = _call(graph, force, (new[i], _channels_last_strides(shapes[i])))
    return (new[0], new[1], *args[2:])


def _save_constrained(graph: torch.fx.Graph) -> None:
    """A graph input that a convolution takes channels-last and that the graph also returns (a training
    forward saves it for the backward): return the channels-last copy instead, as Inductor's layout
    optimization does, so that the backward's weight gradients read it in that layout and the backward
    does not convert it again. (Saved tensors only: outputs aliasing inputs are not graph outputs.)"""
    force = _force_stride_order()
    out = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    if out is None or force is None:
        return
    for n in graph.nodes:
        if n.target is force and n.args[0].op == "placeholder" and out in n.args[0].users:
            out.replace_input_with(n.args[0], n)


def _repropagate(graph: torch.fx.Graph) -> bool:
    """Compute again the fake values of the nodes downstream of a changed layout (inputs made channels-last),
    in graph order, so that Inductor plans saved tensors and outputs in the layout the graph now computes.
    All or nothing: where a node cannot be run again (dynamic or data-dependent shapes, no fake mode) every
    value stays as it was (Inductor then converts where they differ: slower, still correct)."""
    force = _force_stride_order()
    vals: dict = {}
    changed: set = set()
    mode = None
    try:
        from torch.fx.experimental.symbolic_shapes import free_symbols

        for n in graph.nodes:
            v = n.meta.get("val")
            if n.op in ("placeholder", "get_attr", "output"):
                if isinstance(v, torch.Tensor) and mode is None:
                    mode = getattr(v, "fake_mode", None)
                continue
            if n.op != "call_function":
                return False
            if free_symbols(v):
                return False
            if n.target is force:
                changed.add(n)   # a constraint the rewrite put in: its value is the layout asked for
                continue
            if not any(a in changed for a in n.all_input_nodes):
                continue
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs),
                                                 lambda a: vals[a] if a in vals else a.meta.get("val"))
            if mode is None:
                return False
            with mode:
                vals[n] = n.target(*args, **kwargs)
            changed.add(n)
    except Exception:  # noqa: BLE001 - keep the values as they were (see above)
        return False
    for n, v in vals.items():
        n.meta["val"] = v
    return True


def _decided_aten(op: str, args: tuple, opts: str, *, meta: str = "val") -> str | None:
    """Why PyTorch's kernel is the final choice of our op ``op`` on ``args`` (graph nodes or constants),
    known at compile time (``resolve.decided_aten``: a cached aten winner, a problem the kernels do not
    cover), or None where our op must go into the graph. Such a node is left to Inductor as torch.compile
    would compile it: no dispatch, and Inductor plans its buffers and layouts (channels-last convolutions)."""
    from .resolve import decided_aten

    vals = [a.meta.get(meta) if isinstance(a, torch.fx.Node) else a for a in args]
    if any(isinstance(a, torch.fx.Node) and not isinstance(v, torch.Tensor) for a, v in zip(args, vals)):
        return None   # an input without a fake tensor: no lookup (keep our op)
    return decided_aten(op, tuple(vals), opts)


def _fake_apply(fn: Callable, vals: list) -> Any:
    """``fn(*vals)`` under the fake mode of the fake tensors in ``vals`` (their own: a backend may run
    under another one; None without one)."""
    mode = next((v.fake_mode for v in vals if getattr(v, "fake_mode", None) is not None), None)
    if mode is None:
        return None
    with mode:
        return fn(*vals)


def _decided_conv(node: torch.fx.Node, opts: str) -> str | None:
    """``_decided_aten`` for an aten convolution (1-D as our conv2d on a height of 1)."""
    x, w, bias, stride, padding, dilation, _transposed, _output_padding, groups = node.args[:9]
    if len(stride) == 2:
        return _decided_aten("conv2d", (x, w, bias, list(stride), list(padding), list(dilation), groups), opts)
    vals = [_val(x), _val(w)]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    got = _fake_apply(lambda a, b: (a.unsqueeze(2), b.unsqueeze(2)), vals)
    if got is None:
        return None
    x4, w4 = got
    from .resolve import decided_aten

    return decided_aten("conv2d", (x4, w4, _val(bias), [1, stride[0]], [0, padding[0]], [1, dilation[0]], groups),
                        opts)


def _conv_skip_reason(xv: Any, transposed: bool, stride: Sequence[int]) -> str | None:
    """Why a convolution stays with PyTorch, or None when our conv2d kernels take it."""
    if transposed:
        return "transposed (the kernels cover forward convolutions only)"
    if xv is None:
        return "input of unknown shape"
    if xv.dim() != len(stride) + 2 or len(stride) not in (1, 2):
        return f"{xv.dim() - 2}-D (the kernels cover 2-D convolutions, and 1-D ones as a height of 1)"
    return None


def _call(graph: torch.fx.Graph, target, args: tuple) -> torch.fx.Node:
    """A new call node (at the graph's insertion point) with its fake value."""
    n = graph.call_function(target, args)
    n.meta["val"] = _fake_val(target, args)
    return n


def _rewrite_conv1d(graph: torch.fx.Graph, node: torch.fx.Node, opts: str) -> None:
    """A 1-D convolution as our conv2d on a height of 1: unsqueeze input and weight, squeeze the output."""
    from . import ops as ours

    aten = torch.ops.aten
    x, w, bias, stride, padding, dilation, _transposed, _output_padding, groups = node.args[:9]
    with graph.inserting_before(node):
        x4 = _call(graph, aten.unsqueeze.default, (x, 2))
        w4 = _call(graph, aten.unsqueeze.default, (w, 2))
        y4 = _call(graph, ours.op("conv2d"), (x4, w4, bias, [1, stride[0]], [0, padding[0]], [1, dilation[0]],
                                              groups, opts))
        y = _call(graph, aten.squeeze.dim, (y4, 2))
    y.meta.update({k: v for k, v in node.meta.items() if k != "val"})
    node.replace_all_uses_with(y)
    graph.erase_node(node)


def _fake_val(target, args: tuple):
    """The fake result of ``target(*args)`` where args are nodes (their meta vals) or constants."""
    vals = [_val(a) if isinstance(a, torch.fx.Node) else a for a in args]
    mode = torch._guards.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:
        return None
    with mode:
        return target(*vals)


def _rewrite_conv_backward(graph: torch.fx.Graph, node: torch.fx.Node, opts: str) -> str | None:
    """Input gradient of a stride-1, undilated, ungrouped 2-D (or 1-D: a height of 1) convolution as our
    conv2d_grad_input (a tuned conv2d of the output gradient with the flipped, transposed weight); weight
    and bias gradients stay with aten, except for a 2-D convolution whose weight gradient is asked too:
    one conv2d_backward (``_fold_conv_backward``). Returns None when rewritten, else why not."""
    aten = torch.ops.aten
    grad, x, w, _bias_sizes, stride, padding, dilation, transposed, _op, groups, mask = node.args[:11]
    wv = _val(w)
    if not mask[0]:
        return "no input gradient asked"
    if transposed:
        return "transposed convolution"
    if wv is None or wv.dim() not in (3, 4):
        return "of unknown shape" if wv is None else f"{wv.dim() - 2}-D"
    if any(v != 1 for v in stride) or any(v != 1 for v in dilation) or groups != 1:
        return "stride, dilation or groups other than 1"
    one_d = wv.dim() == 3
    kernel = (1, wv.shape[2]) if one_d else (wv.shape[2], wv.shape[3])
    pad = [0, padding[0]] if one_d else [padding[0], padding[1]]
    if not (all(isinstance(k, int) for k in kernel) and pad[0] < kernel[0] and pad[1] < kernel[1]):
        return "padding as large as the kernel"
    getters = [u for u in node.users if u.target is operator.getitem]
    if len(getters) != len(node.users):
        return "its results are used as a tuple"
    decided = _decided_grad_input(grad, w, one_d, [kernel[0] - 1 - pad[0], kernel[1] - 1 - pad[1]], opts)
    if decided is not None:   # aten's convolution_backward makes all the gradients in one call
        return decided
    from . import ops as ours

    if mask[1] and not one_d:
        return _fold_conv_backward(graph, node, getters, pad, opts)
    with graph.inserting_before(node):
        g4, w4 = grad, w
        if one_d:
            g4 = _call(graph, aten.unsqueeze.default, (grad, 2))
            w4 = _call(graph, aten.unsqueeze.default, (w, 2))
        args = (g4, w4, pad, opts)
        val = _fake_val(ours.op("conv2d_grad_input"), args)
        if val is None:
            for n in (g4, w4):
                if n is not grad and n is not w:
                    graph.erase_node(n)
            return "no fake tensors to trace it"
        gx = graph.call_function(ours.op("conv2d_grad_input"), args)
        gx.meta["val"] = val
        if one_d:
            gx = _call(graph, aten.squeeze.dim, (gx, 2))
    for u in getters:
        if u.args[1] == 0:
            gx.meta.update({k: v for k, v in u.meta.items() if k != "val"})
            u.replace_all_uses_with(gx)
            graph.erase_node(u)
    new_mask = [False, mask[1], mask[2]]
    node.args = node.args[:10] + (new_mask,) + node.args[11:]
    if not any(new_mask):
        for u in list(node.users):
            graph.erase_node(u)
        graph.erase_node(node)
    else:
        nv = _fake_val(aten.convolution_backward.default, node.args)
        if nv is not None:
            node.meta["val"] = nv
    return None


def _fold_conv_backward(graph: torch.fx.Graph, node: torch.fx.Node, getters: list, pad: list,
                        opts: str) -> str | None:
    """Input and weight gradients of a 2-D convolution as one conv2d_backward (one aten
    convolution_backward where PyTorch's kernel serves, as Inductor's graph runs it); a bias gradient is the
    output gradient's sum over batch and pixels (a reduction Inductor fuses with what makes the gradient),
    as aten computes it."""
    from . import ops as ours

    aten = torch.ops.aten
    grad, x, w = node.args[:3]
    args = (grad, x, w, pad, opts)
    val = _fake_val(ours.op("conv2d_backward"), args)
    if val is None:
        return "no fake tensors to trace it"
    parts: dict[int, torch.fx.Node] = {}
    with graph.inserting_before(node):
        both = graph.call_function(ours.op("conv2d_backward"), args)
        both.meta["val"] = val
        for i in (0, 1):
            parts[i] = graph.call_function(operator.getitem, (both, i))
            parts[i].meta["val"] = val[i]
        if node.args[10][2]:
            parts[2] = _call(graph, aten.sum.dim_IntList, (grad, [0, 2, 3]))
    for u in getters:
        new = parts.get(u.args[1])
        if new is not None:
            new.meta.update({k: v for k, v in u.meta.items() if k != "val"})
            u.replace_all_uses_with(new)
        graph.erase_node(u)
    graph.erase_node(node)
    return None


def _decided_grad_input(grad: Any, w: Any, one_d: bool, pad: list, opts: str) -> str | None:
    """``_decided_aten`` for an input gradient: the conv2d problem it runs (dispatch.conv2d_grad_input: the
    output gradient with the flipped, transposed weight, padding ``pad``)."""
    vals = [_val(grad), _val(w)]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    from .dispatch import _flipped
    from .resolve import decided_aten

    def flipped(g, wt):
        if one_d:
            g, wt = g.unsqueeze(2), wt.unsqueeze(2)
        return g, _flipped(wt)

    got = _fake_apply(flipped, vals)
    if got is None:
        return None
    g4, wf = got
    return decided_aten("conv2d", (g4, wf, None, (1, 1), pad, (1, 1), 1), opts)


def _try_fuse(graph: torch.fx.Graph, node: torch.fx.Node, opts: str) -> bool | str:
    """mm/addmm whose only user is a supported activation -> one mm_act node (True); why the mm_act is
    PyTorch's at compile time (a string: both nodes left as they are); False where no mm_act applies."""
    aten = torch.ops.aten
    if node.target not in (aten.mm.default, aten.addmm.default) or len(node.users) != 1:
        return False
    user = next(iter(node.users))
    act = _activation(user)
    if act is None or user.args[0] is not node:
        return False
    from . import ops as ours

    if node.target is aten.mm.default:
        a, b = node.args[:2]
        bias = None
    else:
        bias, a, b = node.args[:3]
        beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
        alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
        bv, bval = _val(b), _val(bias)
        if beta != 1 or alpha != 1 or bval is None or bv is None or bval.dim() != 1:
            return False
    decided = _decided_aten("mm_act", (a, b, bias, act), opts)
    if decided is not None:
        return decided
    with graph.inserting_before(user):
        new = graph.call_function(ours.op("mm_act"), (a, b, bias, act, opts))
    new.meta.update(user.meta)
    user.replace_all_uses_with(new)
    graph.erase_node(user)
    graph.erase_node(node)
    return True


def _replace(graph: torch.fx.Graph, node: torch.fx.Node, target, args: tuple) -> torch.fx.Node:
    with graph.inserting_before(node):
        new = graph.call_function(target, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _dynamo_activation(node: torch.fx.Node) -> str | None:
    """Our activation name for a Dynamo-graph (torch-level) activation call, or None."""
    if node.op != "call_function" or node.kwargs.get("inplace", False):
        return None
    t = node.target
    if t in (torch.relu, F.relu):
        return "relu"
    if t in (F.silu, getattr(torch._C._nn, "silu", None)):
        return "silu"
    if t is F.gelu or t is getattr(torch._C._nn, "gelu", None):
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return "gelu_tanh" if approx == "tanh" else None
    return None


# Matmuls (a, b, bias signatures) of linear + activation pairs that prefuse_linear_activation left to
# PyTorch for this compile: after AOT autograd the activation may be decomposed into pointwise code, and
# the bare addmm must not be looked up (and tuned) under a key of its own.
_left_with_activation = threading.local()


def _mm_signature(a: Any, b: Any, bias: Any) -> tuple | None:
    """Shapes, strides and dtypes of a matmul's operands; None where any is symbolic (dynamic shapes are
    never decided at compile time)."""
    sig = tuple((tuple(t.shape), tuple(t.stride()), t.dtype) if isinstance(t, torch.Tensor) else None
                for t in (a, b, bias))
    try:
        hash(sig)
    except TypeError:   # SymInts
        return None
    return sig


def _linear_decided(x: Any, w: Any, bias: Any, act: str, opts: str) -> bool:
    """Whether the mm_act that ``linear_act(x, w, bias, act)`` runs (a Dynamo graph's nodes, fake tensors
    in ``example_value``) is decided for PyTorch's kernel at compile time."""
    vals = [a.meta.get("example_value") if isinstance(a, torch.fx.Node) else a for a in (x, w, bias)]
    if not all(isinstance(v, torch.Tensor) for v in vals[:2]) or vals[1].dim() != 2 or vals[0].dim() < 1:
        return False

    def operands(xv, wv, bv):
        return xv.reshape(-1, xv.shape[-1]), wv.t(), bv

    try:
        a, b, bv = _fake_apply(operands, vals)
    except Exception:   # no fake mode, a reshape the fake tensors refuse: keep the fusion
        return False
    from .resolve import decided_aten

    if decided_aten("mm_act", (a, b, bv, act), opts) is None:
        return False
    sig = _mm_signature(a, b, bv)
    if sig is not None:
        _left_with_activation.__dict__.setdefault("sigs", set()).add(sig)
    return True


def prefuse_linear_activation(gm: torch.fx.GraphModule, *, opts: str = "") -> dict[str, int]:
    """Inference only: ``activation(F.linear(x, w, b))`` in a Dynamo graph -> ``torchtune_ops.linear_act``.

    Run before AOT autograd, so the activation is fused in our GEMM's epilogue even where Inductor would
    decompose gelu/silu into pointwise code before our post-grad pass sees it. Only used when the graph is
    compiled without grad (Dynamo guards on grad mode, so a later call with grad recompiles).
    """
    from . import ops as ours

    counts: collections.Counter = collections.Counter()
    linear = torch._C._nn.linear
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not linear or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        act = _dynamo_activation(user)
        if act is None or user.args[0] is not node:
            continue
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if _linear_decided(x, w, bias, act, opts):
            continue   # AOT autograd's addmm and activation are looked up again after it (rewrite_graph)
        with gm.graph.inserting_before(user):
            new = gm.graph.call_function(ours.op("linear_act"), (x, w, bias, act, opts))
        new.meta.update(user.meta)
        user.replace_all_uses_with(new)
        gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        counts["mm_act"] += 1  # run time: linear_act runs mm_act
    if counts:
        gm.graph.lint()
        gm.recompile()
        with _counts_lock:
            _counts.update(counts)
    return dict(counts)


def _wants_grad(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in ("backend.py", "ops.py", "dispatch.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def _decision_sources(opts: str) -> str:
    """A digest of what compile-time resolution reads (``resolve.decided_aten``): the settings in force
    and the store's files as they are now (path, size, modification time; a write changes them), so that
    Inductor's caches do not hand back a graph compiled against another state of the cache."""
    from ..storage.store import default_path, default_store
    from .resolve import _decode_opts

    overrides, _graph = _decode_opts(opts)
    with settings.override(**overrides):
        s = settings.current()
        path = default_path()
        default_store()   # created now, as the pass's lookups would: the same key before and after them
    files = []
    for f in (path, path.with_name(path.name + "-wal")):
        try:
            st = f.stat()
            files.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            files.append((str(f), None))
    return hashlib.sha256(repr((s, files)).encode()).hexdigest()[:16]


_rewrite_warned: set[str] = set()


def _guarded(fn: Callable, graph_or_module: Any, opts: str, **kwargs: Any) -> None:
    """Run one of our graph passes; a failure leaves the graph as it is (each rewrite of a node is whole, so
    a pass stopped half-way leaves a valid graph) and warns once per kind of failure: never a compile error
    in the user's model."""
    try:
        fn(graph_or_module, opts=opts, **kwargs)
    except Exception as e:  # noqa: BLE001 - the model must compile whatever our pass hits
        kind = f"{fn.__name__}: {type(e).__name__}"
        if kind not in _rewrite_warned:
            _rewrite_warned.add(kind)
            warnings.warn(f"torchtune_ops: {fn.__name__} failed ({type(e).__name__}: {e}); the rest of this "
                          "graph is compiled as torch.compile would", RuntimeWarning, stacklevel=2)


def _custom_graph_pass_base():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


class RewritePass:
    """Inductor ``post_grad_custom_pre_pass``: ``rewrite_graph`` with a stable ``uuid`` (our sources, the
    opts string, the pass it chains to, and the settings and store state compile-time resolution reads),
    so Inductor's caches key on it. ``training``: whether the graphs are a training step's (forward and
    backward; Inductor's layout decision for convolutions differs from inference's)."""

    def __init__(self, opts: str = "", chained: Any = None, training: bool = False):
        self.opts = opts
        self.chained = chained
        self.training = training

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.chained is not None:
            self.chained(graph)
        _guarded(rewrite_graph, graph, self.opts,
                 channels_last=_inductor_channels_last(graph, training=self.training))

    def uuid(self) -> Any:
        chained = None
        if self.chained is not None:
            chained = self.chained.uuid() if hasattr(self.chained, "uuid") else None
            if chained is None:
                return None  # an uncacheable user pass: let Inductor bypass its cache
        return ("torchtune_ops", _source_hash(), self.opts, chained, self.training,
                _decision_sources(self.opts))


def _make_pass(opts: str, chained: Any, training: bool = False):
    base = _custom_graph_pass_base()
    cls = type("TorchTuneOpsRewritePass", (RewritePass, base), {})
    return cls(opts, chained, training)


_OWN_KEYS = ("compiler", "settings", "graph")
_graph_numbers: collections.Counter = collections.Counter()


def _graph_label(name: str | None) -> str:
    """The name of the next graph compiled for ``name`` (optimize()'s model name, e.g. ``Net#1``):
    ``Net#1.0``, ``Net#1.1``, ...; ``compiled.<n>`` for the backend used without optimize()."""
    base = name or "compiled"
    with _counts_lock:
        n = _graph_numbers[base]
        _graph_numbers[base] += 1
    return f"{base}.{n}"


def torchtune_ops_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
                          options: dict[str, Any] | None = None, **kwargs: Any) -> Callable:
    """Compile ``gm`` (a Dynamo graph) with our ops in place of aten matmuls and convolutions.

    Args:
        gm, example_inputs: what torch.compile hands every backend.
        mode: torch.compile's mode ("default", "reduce-overhead", "max-autotune", ...): Inductor's config
            patches of that mode (reduce-overhead: CUDA graphs). Default None.
        options: torch.compile's ``options`` dict; merged with ``kwargs``. ``compiler``: "inductor"
            (default) or "eager" (AOT autograd, graphs run as Python); ``settings``: settings overrides
            (dict, see ``settings.DECLARED``) written into the op calls and applied while compiling; any
            other key is an Inductor config patch; ``graph``: the name of the model, written (with the
            graph's number) into every op call so that ``explain()`` tells models apart.

    Returns the compiled callable.
    """
    opts_in = dict(options or {})
    opts_in.update(kwargs)
    compiler = opts_in.pop("compiler", "inductor")
    overrides = dict(opts_in.pop("settings", None) or {})
    graph = _graph_label(opts_in.pop("graph", None))
    if compiler not in ("inductor", "eager"):
        raise settings.SettingsError(f"compiler must be 'inductor' or 'eager', got {compiler!r}")
    # Register the ops now: a graph Inductor loads from its caches calls them without running our pass.
    from . import dispatch, ops  # noqa: F401

    with settings.override(**overrides):
        s = settings.current()
    op_opts = dispatch.encode_opts(overrides, graph=graph)
    rewrite = not s.disable and _kernels_can_run(example_inputs)
    _left_with_activation.sigs = set()
    if rewrite and not _wants_grad(example_inputs):
        _guarded(prefuse_linear_activation, gm, op_opts)
    if compiler == "eager":
        return _eager(gm, example_inputs, op_opts if rewrite else None)
    return _inductor(gm, example_inputs, op_opts if rewrite else None, mode, opts_in,
                     training=_wants_grad(example_inputs))


# Graphs left to Inductor (or AOT eager) untouched because no Triton kernel could run on their devices.
_passthrough: dict[str, int] = {}


def passthrough() -> dict[str, int]:
    """Graphs compiled without our ops because no Triton kernel can run on their devices, by reason
    (e.g. ``{"Triton cannot run on cpu here": 2}``); what ``explain()`` and ``doctor`` report."""
    with _counts_lock:
        return dict(_passthrough)


def _kernels_can_run(example_inputs: Sequence[Any]) -> bool:
    """Whether a Triton kernel could run on the devices of a graph's example inputs (a graph without
    tensor inputs: on the default device). Where none could, the graph is left to Inductor exactly as
    torch.compile would compile it: our ops could only run PyTorch's kernel, at the cost of a Python call.
    Says so once per reason (INFO log) and counts it (``passthrough()``)."""
    from .resolve import _triton_usable

    devices = {t.device for t in example_inputs if isinstance(t, torch.Tensor)}
    if not devices:
        devices = {torch.device("cuda" if torch.cuda.is_available() else "cpu")}
    if any(_triton_usable(d) for d in devices):
        return True
    names = ", ".join(sorted(str(d.type) for d in devices))
    reason = f"Triton cannot run on {names} here"
    with _counts_lock:
        first = reason not in _passthrough
        _passthrough[reason] = _passthrough.get(reason, 0) + 1
    if first:
        from .resolve import log, _configure_logging

        _configure_logging()
        log.info("torchtune_ops: %s (%s); the graph is compiled by Inductor as torch.compile would, without "
                 "our ops", reason, _no_triton_hint(devices))
    return False


def _no_triton_hint(devices) -> str:
    if any(d.type == "cpu" for d in devices):
        return "no CUDA device; TRITON_INTERPRET=1 runs the kernels on CPU through the interpreter, slowly"
    return "no Triton backend for this device"


def _eager(gm, example_inputs, opts: str | None) -> Callable:
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(g: torch.fx.GraphModule, _inputs) -> Callable:
        if opts is not None:
            _guarded(rewrite_graph, g.graph, opts)
            g.recompile()
        return make_boxed_func(g.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler, inference_compiler=compiler)(
        gm, example_inputs)


_LOWERED: set[str] = set()
#: the ops whose site function always returns a new tensor of torch.empty's strides (PyTorch's matmuls and
#: our GEMM's output alike)
_FRESH_CONTIGUOUS = frozenset({"mm", "bmm", "addmm", "baddbmm", "mm_act", "linear_act"})


@functools.lru_cache(maxsize=1)
def _site_call_type() -> type:
    """Inductor's ``ExternKernelAlloc`` whose size/stride assert after the call can be left out
    (``asserts = False``), made once (Inductor is imported lazily)."""
    from torch._inductor import ir

    class SiteCall(ir.ExternKernelAlloc):
        asserts = True

        def codegen_size_asserts(self, wrapper) -> None:
            if self.asserts:
                super().codegen_size_asserts(wrapper)

    return SiteCall


def _register_lowerings() -> None:
    """Inductor lowerings of our ops to extern kernels: where a node's output shape is static, Inductor's
    generated code calls the op's call-site function of the run-time dispatch (``dispatch.SITES``) as a plain
    Python function, ``extern_kernels.torchtune_ops_<op>_site(..., "<site id>")``, as it calls its own extern
    kernels (``extern_kernels.mm``), instead of ``torch.ops.torchtune_ops.<op>.default(...)`` through the
    dispatcher and the autograd kernel (a few microseconds per op; compiled graphs need neither, AOT autograd
    already differentiated them). The site id, new for every lowered node, lets the call keep its key from
    its first call (see ``dispatch``). Dynamic shapes keep the dispatcher call. Registered once per process,
    before any graph is lowered or a cached one loaded (its code names these functions)."""
    from torch._inductor import ir
    from torch._inductor.lowering import fallback_handler, lowerings, register_lowering
    from torch._prims_common import make_contiguous_strides_for
    from torch._inductor.select_algorithm import extern_kernels
    from torch._inductor.virtualized import V

    from . import dispatch, ops as ours

    multi_ok = _multi_output_ir(ir)
    for name in ours._IMPLS:
        if name in _LOWERED:
            continue
        overload = ours.op(name)
        if overload in lowerings:   # someone else's lowering: leave it
            continue
        call_name = f"torchtune_ops_{name}_site"
        setattr(extern_kernels, call_name, dispatch.SITES[name])

        def lower(*args, _overload=overload, _call=call_name, _name=name, **kwargs):
            node = V.graph.current_node
            val = node.meta.get("val") if node is not None else None
            vals = list(val) if isinstance(val, (tuple, list)) else [val]
            n = 0
            while n < len(args) and isinstance(args[n], ir.IRNode):
                n += 1
            static = (all(isinstance(v, torch.Tensor) for v in vals)
                      and not any(isinstance(a, ir.IRNode) for a in args[n:])
                      and all(isinstance(d, int) for v in vals for d in (*v.shape, *v.stride())))
            if not static or kwargs or (len(vals) > 1 and not multi_ok):   # (the rewrite passes every
                return fallback_handler(_overload, add_to_fallback_set=False)(*args, **kwargs)  # argument by position)
            inputs = [ir.ExternKernel.realize_input(a) for a in args[:n]]
            if _name.startswith("conv2d"):
                # a convolution's output layout follows its inputs': hold them to the fake values' strides
                inputs = [_fx_strides(ir, a, arg) for a, arg in zip(inputs, node.args)]
            device = inputs[0].get_device()
            # every argument of the op (defaults filled in), then the site id
            constants = [*args[n:], *(a.default_value for a in _overload._schema.arguments[len(args):]),
                         uuid.uuid4().hex[:16]]

            def layout(v):
                return ir.FixedLayout(device, v.dtype, list(v.shape), list(v.stride()))

            kernel = f"extern_kernels.{_call}"
            if isinstance(val, torch.Tensor):
                call = _site_call_type()(layout=layout(val), inputs=inputs, constant_args=constants,
                                         python_kernel_name=kernel)
                # A matmul site returns a new tensor of the standard contiguous strides (torch.empty's), from
                # PyTorch's kernel or ours (tests/test_backend.py checks): where the graph expects those, the
                # size/stride assert after the call (about 0.5 us) has nothing to catch.
                call.asserts = not (_name in _FRESH_CONTIGUOUS and
                                    tuple(val.stride()) == make_contiguous_strides_for(val.shape))
                return ir.TensorBox.create(call)
            # several outputs (conv2d_backward): one call, then each output indexed from its result
            packed = ir.ExternKernelAlloc(layout=ir.MultiOutputLayout(device=device), inputs=inputs,
                                          constant_args=constants, python_kernel_name=kernel)
            outs = [ir.MultiOutput(layout(v), packed, [(tuple, i)]) for i, v in enumerate(vals)]
            packed.outputs = outs
            return tuple(ir.TensorBox.create(o) for o in outs)

        register_lowering(overload, type_promotion_kind=None)(lower)
        _LOWERED.add(name)


def _multi_output_ir(ir) -> bool:
    """Whether this Inductor's IR builds an extern call with several outputs as the lowering does
    (``MultiOutputLayout(device=...)``, ``MultiOutput(layout, input, indices)``); elsewhere such an op is
    called through the dispatcher."""
    import inspect

    try:
        ir.MultiOutputLayout(device=torch.device("cpu"))
        params = list(inspect.signature(ir.MultiOutput.__init__).parameters)[1:4]
    except Exception:  # noqa: BLE001 - another torch's private IR
        return False
    return params == ["layout", "input", "indices"]


def _fx_strides(ir, node, arg: Any):
    """``node`` (a realized input of our lowering) held to the stride order of its graph argument's fake
    value where that is a contiguous or channels-last 4-D tensor (a copy only where Inductor laid it out
    otherwise)."""
    v = _val(arg)
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or not all(isinstance(d, int) for d in v.stride()):
        return node
    if not (v.is_contiguous() or v.is_contiguous(memory_format=torch.channels_last)):
        return node
    return ir.ExternKernel.require_stride_order(node, ir.get_stride_order(v.stride()))


def _inductor(gm, example_inputs, opts: str | None, mode: str | None, patches: dict[str, Any], *,
              training: bool = False) -> Callable:
    from torch._inductor import config as iconfig
    from torch._inductor.compile_fx import compile_fx

    _register_lowerings()

    config_patches: dict[str, Any] = {}
    if mode not in (None, "default"):
        config_patches.update(torch._inductor.list_mode_options(mode))
    config_patches.update(patches)
    if opts is not None:
        chained = config_patches.get("post_grad_custom_pre_pass", iconfig.post_grad_custom_pre_pass)
        config_patches["post_grad_custom_pre_pass"] = _make_pass(opts, chained, training)
    return compile_fx(gm, example_inputs, config_patches=config_patches or None)
