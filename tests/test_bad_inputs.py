"""Every op on inputs users actually pass, against PyTorch's own results: zero-size and one-element
tensors, non-contiguous, expanded (stride 0) and overlapping views, 16-bit, float64, integer, bool and
complex dtypes, NaN and Inf, mismatched dtypes / shapes / devices (PyTorch's error type), no_grad,
inference_mode, requires_grad and CPU autocast; each with a Triton winner forced into the cache for the
shape (so our kernel really runs) and with none; a few under optimize().

The counts (inputs tried, wrong results) are printed, and merged into the JSON file named by
FAULTS_SUMMARY when set (benchmarks/results/faults_summary.json holds the committed figures)."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

import torchtune_ops
import torchtune_ops.runtime.ops  # noqa: F401  (registers the ops)
from torchtune_ops.runtime import dispatch, resolve
from torchtune_ops import settings
from torchtune_ops.storage.device import fingerprint
from torchtune_ops.errors import UnsupportedProblem
from torchtune_ops.kernels.base import device_limits
from torchtune_ops.storage.store import Entry, default_store
from torchtune_ops.tuning.timing import FakeTimer

ops = torch.ops.torchtune_ops

FIGURES = {"inputs_tried": 0, "wrong_results": 0, "errors_matched": 0, "triton_runs": 0}


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    from test_faults import write_figures

    write_figures("test_bad_inputs", FIGURES)


@pytest.fixture(autouse=True)
def _fresh():
    dispatch.reset()
    dispatch.set_tune_options(timer=None)
    yield
    dispatch.reset()


# ---------------------------------------------------------------------------------------------------------
# The ops: how to build operands of a size, call PyTorch, call ours, and name the dispatch problem.

class Op:
    def __init__(self, name: str, shapes: Callable[[dict], list], ref: Callable, ours: Callable,
                 dispatched: Callable[[list], tuple[str, tuple]]) -> None:
        self.name, self.shapes, self.ref, self.ours, self.dispatched = name, shapes, ref, ours, dispatched


def _gemm_shapes(batched: bool, bias: str | None):
    def shapes(d):
        lead = (d["B"],) if batched else ()
        out = [lead + (d["M"], d["K"]), lead + (d["K"], d["N"])]
        if bias == "row":
            out.append((d["N"],))
        elif bias == "full":
            out.append(lead + (d["M"], d["N"]))
        return out
    return shapes


OPS = {
    "mm": Op("mm", _gemm_shapes(False, None), lambda a, b: torch.mm(a, b), lambda a, b: ops.mm(a, b),
             lambda t: ("mm", (t[0], t[1]))),
    "addmm": Op("addmm", _gemm_shapes(False, "row"),
                lambda a, b, c: torch.addmm(c, a, b, beta=0.5, alpha=2.0),
                lambda a, b, c: ops.addmm(c, a, b, 0.5, 2.0), lambda t: ("addmm", (t[2], t[0], t[1], 0.5, 2.0))),
    "bmm": Op("bmm", _gemm_shapes(True, None), lambda a, b: torch.bmm(a, b), lambda a, b: ops.bmm(a, b),
              lambda t: ("bmm", (t[0], t[1]))),
    "baddbmm": Op("baddbmm", _gemm_shapes(True, "full"), lambda a, b, c: torch.baddbmm(c, a, b),
                  lambda a, b, c: ops.baddbmm(c, a, b), lambda t: ("baddbmm", (t[2], t[0], t[1], 1, 1))),
    # linear(x, w, bias) = x @ w.T + bias: the backend's mm_act with no activation
    "linear": Op("linear", lambda d: [(d["M"], d["K"]), (d["N"], d["K"]), (d["N"],)],
                 lambda x, w, b: F.linear(x, w, b), lambda x, w, b: ops.mm_act(x, w.t(), b, "none"),
                 lambda t: ("mm_act", (t[0], t[1].t(), t[2], "none"))),
    # the op the backend puts in place of activation(F.linear(x, w, b)) (any leading dims of x)
    "linear_act": Op("linear_act", lambda d: [(d["B"], d["M"], d["K"]), (d["N"], d["K"]), (d["N"],)],
                     lambda x, w, b: F.linear(x, w, b), lambda x, w, b: ops.linear_act(x, w, b, "none"),
                     lambda t: ("mm_act", (t[0].reshape(t[0].shape[:-1].numel(), t[0].shape[-1]), t[1].t(), t[2],
                                           "none"))),
    "conv2d": Op("conv2d", lambda d: [(d["B"], d["K"], d["M"], d["N"]),
                                      (d["C"], d["K"], min(3, max(d["M"], 1)), min(2, max(d["N"], 1))), (d["C"],)],
                 lambda x, w, b: F.conv2d(x, w, b, 1, (1, 0), 1, 1),
                 lambda x, w, b: ops.conv2d(x, w, b, [1, 1], [1, 0], [1, 1], 1),
                 lambda t: ("conv2d", (t[0], t[1], t[2], [1, 1], [1, 0], [1, 1], 1))),
}

SIZES = {  # B: batch, M, K, N (conv: input channels K, H=M, W=N, C output channels)
    "odd": dict(B=2, M=5, K=7, N=3, C=4),
    "one": dict(B=1, M=1, K=1, N=1, C=1),
    "zero_m": dict(B=2, M=0, K=7, N=3, C=4),
    "zero_k": dict(B=2, M=5, K=0, N=3, C=4),
    "zero_b": dict(B=0, M=5, K=7, N=3, C=4),
}


def _values(shape, dtype, gen) -> torch.Tensor:
    x = torch.randn(shape, generator=gen) * 2
    if dtype == torch.bool:
        return x > 0
    if not dtype.is_floating_point and not dtype.is_complex:
        return x.round().clamp(-4, 4).to(dtype)
    if dtype.is_complex:
        return torch.complex(x, torch.randn(shape, generator=gen)).to(dtype)
    return x.to(dtype)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values (or, for the stride-0 and overlapping views, values of the same kind) in another
    memory layout."""
    if layout == "contiguous" or t.dim() < 2:
        return t
    if layout == "transposed":  # column-major (channels_last-like for 4-D)
        return t.mT.contiguous().mT
    if layout == "sliced":  # every other element of a larger buffer
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "expanded":  # stride 0 along the first dimension
        return t[:1].expand(t.shape) if t.shape[0] > 0 else t
    if layout == "overlapping":  # every element overlaps its neighbours (strides 1, 1, ...)
        storage = t.flatten()[: sum(max(s - 1, 0) for s in t.shape) + 1].clone()
        if storage.numel() < sum(max(s - 1, 0) for s in t.shape) + 1:
            return t
        return storage.as_strided(t.shape, (1,) * t.dim())
    raise ValueError(layout)


def _make(op: Op, size: str, dtype=torch.float32, layout: str = "contiguous", seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(op.shapes(SIZES[size])):
        t = _values(shape, dtype, gen)
        out.append(_layout(t, layout) if i < 2 else t)  # operands in the layout; bias as is
    return out


# ---------------------------------------------------------------------------------------------------------
# Forcing a Triton winner for the exact problem, and comparing with PyTorch.

def _force(op: Op, tensors: list, pick: Callable[[list], Any] | None = None) -> bool:
    """Store a Triton winner (``pick(valid configurations)``; default the smallest known one) for the
    problem these operands make, as if tuning had found it; False when the kernels do not cover the
    operands (dtype, zero size, ...)."""
    try:
        name, args = op.dispatched(tensors)
    except (RuntimeError, IndexError):  # e.g. no matrix of this shape: nothing to force
        return False
    s = settings.current()
    try:
        family, problem, _ = resolve._family_and_problem(name, args, s)
    except UnsupportedProblem:
        return False
    problem = resolve._bucketed(family, problem, s)
    device = tensors[0].device
    limits = device_limits(device)
    if pick is not None:
        cfg = pick(family.valid_configs(problem, limits))
    else:
        configs = family.known_configs(problem, limits) or family.valid_configs(problem, limits)
        cfg = min(configs, key=_size)
    default_store().put(Entry(fingerprint(device).key, family.name, resolve._problem_key(family, problem),
                              winner=cfg.to_json(), time_ms=0.5, aten_ms=1.0, trials=1, source="test"))
    return True


def _size(c) -> tuple:
    return (c.get("BLOCK_M", 1) * c.get("BLOCK_N", 1) * c.get("BLOCK_K", 1), c.get("SPLIT_K", 1), c.to_json())


def _ran_triton() -> bool:
    return any(p["kernel"] != "aten" and p["calls"] > 0 for p in dispatch.stats()["problems"])


def _tolerance(dtype: torch.dtype) -> float | None:
    """None: PyTorch's kernel must have run, so the result is exactly PyTorch's."""
    return {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}.get(dtype)


def _compare(what: str, out: Any, ref: Any, tol: float | None, values: bool = True) -> None:
    try:
        assert type(out) is type(ref), what
        assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device, what
        if out.device.type == "meta" or not values:
            return
        if tol is None:
            assert torch.equal(out, ref) or (out.is_floating_point() and torch.allclose(
                out, ref, rtol=0, atol=0, equal_nan=True)), what
            return
        o, r = out.detach().double(), ref.detach().double()
        assert torch.equal(o.isnan(), r.isnan()) and torch.equal(o.isinf(), r.isinf()), f"{what}: NaN/Inf differ"
        assert torch.equal(o[o.isinf()], r[r.isinf()]), f"{what}: Inf signs differ"
        fin = o.isfinite()
        scale = max(1.0, float(r[fin].abs().max())) if bool(fin.any()) else 1.0
        torch.testing.assert_close(o[fin], r[fin], rtol=tol, atol=tol * scale, msg=what)
    except AssertionError:
        FIGURES["wrong_results"] += 1
        raise


def same_as_torch(what: str, ours: Callable[[], Any], ref: Callable[[], Any], tol: float | None, *,
                  values: bool = True) -> Any:
    """Run PyTorch, then ours: the same error type, or the same result (exactly, or within ``tol``; only
    shape, dtype and device with ``values=False``)."""
    FIGURES["inputs_tried"] += 1
    try:
        expect = ref()
    except Exception as e:  # PyTorch rejects the inputs: ours must raise the same type
        try:
            ours()
        except Exception as mine:
            if type(mine) is not type(e):
                FIGURES["wrong_results"] += 1
            assert type(mine) is type(e), f"{what}: {type(mine).__name__} instead of {type(e).__name__}"
            FIGURES["errors_matched"] += 1
            return None
        FIGURES["wrong_results"] += 1
        raise AssertionError(f"{what}: PyTorch raises {type(e).__name__}, ours returned a result") from None
    out = ours()
    _compare(what, out, expect, tol, values)
    return out


def _check(op: Op, tensors: list, *, forced: bool, what: str, mode=contextlib.nullcontext,
           force_as: list | None = None, check_ran: bool = True) -> Any:
    """Compare ours with PyTorch on ``tensors``; with ``forced``, a Triton winner is stored first for the
    problem the op will see (``force_as``: the operands as the op receives them, e.g. after autocast), and
    (``check_ran``) our kernel must have run. Returns our result (None when PyTorch raised)."""
    dispatch.reset()
    covered = forced and _force(op, force_as if force_as is not None else tensors)
    dtype = tensors[0].dtype
    with mode():
        out = same_as_torch(what, lambda: op.ours(*tensors), lambda: op.ref(*tensors),
                            _tolerance(force_as[0].dtype if force_as else dtype))
    if covered and out is not None and check_ran:
        assert _ran_triton(), f"{what}: the forced Triton winner did not run"
        FIGURES["triton_runs"] += 1
    return out


# ---------------------------------------------------------------------------------------------------------
# The cases.

@pytest.mark.parametrize("forced", [True, False], ids=["triton", "aten"])
@pytest.mark.parametrize("name", list(OPS))
def test_sizes_and_layouts(name, forced):
    op = OPS[name]
    for size in SIZES:
        for layout in ("contiguous", "transposed", "sliced", "expanded", "overlapping"):
            _check(op, _make(op, size, layout=layout), forced=forced, what=f"{name} {size} {layout}")


@pytest.mark.parametrize("forced", [True, False], ids=["triton", "aten"])
@pytest.mark.parametrize("name", list(OPS))
def test_dtypes(name, forced):
    op = OPS[name]
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8,
                  torch.bool, torch.complex64):
        _check(op, _make(op, "odd", dtype=dtype), forced=forced, what=f"{name} {dtype}")


@pytest.mark.parametrize("forced", [True, False], ids=["triton", "aten"])
@pytest.mark.parametrize("name", list(OPS))
def test_nan_and_inf_propagate_as_in_pytorch(name, forced):
    op = OPS[name]
    for dtype in (torch.float32, torch.float16):
        for poison in ("nan", "inf", "-inf", "inf_times_zero"):
            t = _make(op, "odd", dtype=dtype, seed=3)
            a, b = t[0].clone(), t[1].clone()
            value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
                     "inf_times_zero": float("inf")}[poison]
            a.view(-1)[0] = value
            if poison == "inf_times_zero":
                b.zero_()  # inf * 0 = NaN in every output that reads it
            elif name == "conv2d":  # weights: see test_conv_nan_weight_next_to_padding
                a.view(-1)[-1] = -value if poison != "nan" else value
            else:
                b.view(-1)[-1] = -value if poison != "nan" else value
            _check(op, [a, b] + t[2:], forced=forced, what=f"{name} {dtype} {poison}")


@pytest.mark.parametrize("forced", [True, False], ids=["triton", "aten"])
def test_conv_nan_weight_next_to_padding(forced):
    """A NaN/Inf weight tap that falls on zero padding: PyTorch's CPU convolution skips padded taps (its
    output stays finite there) while an implicit-GEMM kernel multiplies the padding's zeros by the weight
    (0 * NaN = NaN, as IEEE arithmetic and cuDNN's implicit GEMM algorithms do). Without padding the two
    agree exactly; with padding ours may only add NaN where a padded tap meets the poisoned weight, and
    never lose one of PyTorch's."""
    op = OPS["conv2d"]
    for value in (float("nan"), float("inf")):
        x, w, bias = _make(op, "odd", seed=5)
        w = w.clone()
        w.view(-1)[-1] = value
        nopad = (lambda x, w, b: F.conv2d(x, w, b), lambda x, w, b: ops.conv2d(x, w, b, [1, 1], [0, 0], [1, 1], 1))
        dispatch.reset()
        if forced:
            assert _force(Op("conv2d", op.shapes, *nopad, lambda t: ("conv2d", (t[0], t[1], t[2], [1, 1], [0, 0],
                                                                                 [1, 1], 1))), [x, w, bias])
        same_as_torch(f"conv2d unpadded {value} weight", lambda: nopad[1](x, w, bias), lambda: nopad[0](x, w, bias),
                      1e-4)
        dispatch.reset()
        if forced:
            _force(op, [x, w, bias])
        FIGURES["inputs_tried"] += 1
        ours, ref = op.ours(x, w, bias), op.ref(x, w, bias)
        bad_ours, bad_ref = ~ours.isfinite(), ~ref.isfinite()
        try:
            assert torch.equal(bad_ours & bad_ref, bad_ref)  # every non-finite output of PyTorch's is ours too
            fin = ~bad_ours
            torch.testing.assert_close(ours[fin], ref[fin], rtol=1e-4, atol=1e-4)
        except AssertionError:
            FIGURES["wrong_results"] += 1
            raise


def _mismatched(op: Op, kind: str) -> list:
    t = _make(op, "odd")
    if kind == "dtype":
        return [t[0], t[1].double()] + t[2:]
    if kind == "shape":  # inner dimensions that do not agree
        b = t[1]
        return [t[0], torch.randn(*b.shape[:-2], b.shape[-2] + 1, b.shape[-1])] + t[2:]
    if kind == "rank":
        return [t[0][0], t[1]] + t[2:]
    if kind == "bias_shape" and len(t) > 2:
        return t[:2] + [torch.randn(*t[2].shape[:-1], t[2].shape[-1] + 2)]
    if kind == "bias_dtype" and len(t) > 2:
        return t[:2] + [t[2].double()]
    if kind == "device":  # a meta tensor beside CPU ones: whatever PyTorch does (see below)
        return [t[0], t[1].to("meta")] + t[2:]
    return t


@pytest.mark.parametrize("forced", [True, False], ids=["triton", "aten"])
@pytest.mark.parametrize("name", list(OPS))
def test_mismatches_raise_pytorchs_own_error(name, forced):
    op = OPS[name]
    good = _make(op, "odd")
    for kind in ("dtype", "shape", "rank", "bias_shape", "bias_dtype", "device"):
        if name == "linear" and kind == "rank":
            continue  # F.linear takes 1-D inputs; the op it becomes (mm_act) is only ever given matrices
        dispatch.reset()
        if forced:
            _force(op, good)  # a winner for the well-formed problem next to the bad one
        bad = _mismatched(op, kind)
        # torch.addmm(cpu, cpu, meta) returns a CPU tensor of undefined values: only its metadata is compared
        same_as_torch(f"{name} {kind}", lambda: op.ours(*bad), lambda: op.ref(*bad), _tolerance(good[0].dtype),
                      values=kind != "device")


@pytest.mark.parametrize("forced", [True, False], ids=["triton", "aten"])
@pytest.mark.parametrize("name", list(OPS))
def test_grad_modes_and_autocast(name, forced):
    op = OPS[name]
    for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        _check(op, _make(op, "odd"), forced=forced, what=f"{name} {mode.__name__}", mode=mode)
    # autocast: PyTorch casts to bfloat16 before the op; the forced winner is for the bfloat16 problem
    t = _make(op, "odd")
    _check(op, t, forced=forced, what=f"{name} autocast", mode=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
           force_as=[x.to(torch.bfloat16) for x in t])
    # requires_grad: the result and every gradient as PyTorch's
    dispatch.reset()
    if forced:
        _force(op, t)
    ours_in = [x.detach().clone().requires_grad_(True) for x in t]
    ref_in = [x.detach().clone().requires_grad_(True) for x in t]
    out = same_as_torch(f"{name} requires_grad", lambda: op.ours(*ours_in), lambda: op.ref(*ref_in), 1e-4)
    ref = op.ref(*ref_in)
    assert out.requires_grad and out.grad_fn is not None
    g = torch.randn_like(ref)
    for i, (p, q) in enumerate(zip(torch.autograd.grad(out, ours_in, g), torch.autograd.grad(ref, ref_in, g))):
        FIGURES["inputs_tried"] += 1
        _compare(f"{name} grad {i}", p, q, 1e-4)


# ---------------------------------------------------------------------------------------------------------
# Under optimize(): tuning on (every Triton configuration "wins" under a fake timer, so the kernels run).

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.lin = torch.nn.Linear(4 * 5 * 6, 7)

    def forward(self, x):
        y = self.lin(self.conv(x).flatten(1))
        return torch.bmm(y.unsqueeze(2), y.unsqueeze(1))


def test_bad_inputs_under_optimize():
    torch._dynamo.reset()
    dispatch.set_tune_options(timer=FakeTimer({"aten": 10.0}, default=1.0))
    m = Block()
    om = torchtune_ops.optimize(m, autotune=True, max_trials=1, compiler="eager")
    x = torch.randn(2, 3, 5, 6)
    nan = x.clone()
    nan[0, 1, 2, 3] = float("nan")
    cases = {
        "plain": x,
        "sliced": torch.randn(2, 3, 5, 12)[..., ::2],
        "channels_last": x.to(memory_format=torch.channels_last),
        "expanded": x[:1].expand(2, 3, 5, 6),
        "nan": nan,
        "one_sample": x[:1],
    }
    try:
        for what, inp in cases.items():
            for mode in (torch.no_grad, torch.inference_mode):
                with mode():
                    same_as_torch(f"optimize {what} {mode.__name__}", lambda: om(inp), lambda: m(inp), 1e-4)
        # training: the result and the parameters' gradients
        out = same_as_torch("optimize requires_grad", lambda: om(x), lambda: m(x), 1e-4)
        ref = m(x)
        g = torch.randn_like(ref)
        params = list(m.parameters())
        for p, q in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
            FIGURES["inputs_tried"] += 1
            _compare("optimize grad", p, q, 1e-3)
        # float64: PyTorch's kernel, exactly
        m64 = Block().double()
        om64 = torchtune_ops.optimize(m64, autotune=True, max_trials=1, compiler="eager")
        with torch.no_grad():
            same_as_torch("optimize float64", lambda: om64(x.double()), lambda: m64(x.double()), None)
        # autocast
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            same_as_torch("optimize autocast", lambda: om(x), lambda: m(x), 3e-2)
        # a wrong input shape: PyTorch's error type
        same_as_torch("optimize bad shape", lambda: om(torch.randn(2, 5, 5, 6)), lambda: m(torch.randn(2, 5, 5, 6)),
                      1e-4)
        assert any(p["kernel"] != "aten" for p in dispatch.stats()["problems"])  # our kernels ran
    finally:
        torch._dynamo.reset()
        dispatch.set_tune_options(timer=None)


# ---------------------------------------------------------------------------------------------------------
# Lazy views, scalars, bias layouts and convolution hyper-parameters.

def _neg_view(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` in a real tensor whose negative bit is set (what ``z.conj().imag`` gives): its
    memory holds -t, and PyTorch's kernels negate on read."""
    v = torch.complex(torch.zeros_like(t), -t).conj().imag
    assert v.is_neg() and torch.equal(v, t)
    return v


@pytest.mark.parametrize("forced", [True, False], ids=["triton", "aten"])
@pytest.mark.parametrize("name", list(OPS))
def test_negative_bit_views(name, forced):
    op = OPS[name]
    t = _make(op, "odd")
    for which in ((0,), (1,), (0, 1)):
        neg = [_neg_view(x) if i in which else x for i, x in enumerate(t)]
        _check(op, neg, forced=forced, what=f"{name} negative-bit operand(s) {which}", check_ran=False)


@pytest.mark.parametrize("name", list(OPS))
def test_autocast_leaves_float64_alone(name):
    """PyTorch's autocast casts float32/float16 operands to the autocast dtype but never float64 ones."""
    op = OPS[name]
    for dtype in (torch.float64, torch.float16):
        t = _make(op, "odd", dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            same_as_torch(f"{name} {dtype} under autocast", lambda: op.ours(*t), lambda: op.ref(*t),
                          None if dtype == torch.float64 else 3e-2)


@pytest.mark.parametrize("forced", [True, False], ids=["triton", "aten"])
@pytest.mark.parametrize("name", ["addmm", "baddbmm"])
def test_alpha_and_beta_zero_ignore_their_operand_like_pytorch(name, forced):
    """beta=0 ignores the bias and alpha=0 the product, NaN and Inf included (BLAS semantics)."""
    op = OPS[name]
    call = {"addmm": (lambda a, b, c, beta, alpha: ops.addmm(c, a, b, beta, alpha),
                      lambda a, b, c, beta, alpha: torch.addmm(c, a, b, beta=beta, alpha=alpha)),
            "baddbmm": (lambda a, b, c, beta, alpha: ops.baddbmm(c, a, b, beta, alpha),
                        lambda a, b, c, beta, alpha: torch.baddbmm(c, a, b, beta=beta, alpha=alpha))}[name]
    for beta, alpha in ((0.0, 1.0), (1.0, 0.0), (0.0, 0.0), (0, 2), (0.5, 0)):
        a, b, c = _make(op, "odd")
        a, c = a.clone(), c.clone()
        a.view(-1)[0] = float("nan")
        c.view(-1)[0] = float("inf")
        dispatch.reset()
        if forced:
            scaled = Op(name, op.shapes, op.ref, op.ours,
                        lambda t: (name, (t[2], t[0], t[1], beta, alpha)))
            _force(scaled, [a, b, c])
        same_as_torch(f"{name} beta={beta} alpha={alpha}", lambda: call[0](a, b, c, beta, alpha),
                      lambda: call[1](a, b, c, beta, alpha), 1e-4)


@pytest.mark.parametrize("forced", [True, False], ids=["triton", "aten"])
def test_bias_layouts(forced):
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    biases = {"scalar": torch.randn(()), "one": torch.randn(1), "row": torch.randn(3), "1xN": torch.randn(1, 3),
              "Mx1": torch.randn(5, 1), "full": torch.randn(5, 3), "expanded": torch.randn(3).expand(5, 3),
              "transposed": torch.randn(3, 5).t(), "sliced": torch.randn(5, 6)[:, ::2]}
    for what, c in biases.items():
        _check(OPS["addmm"], [a, b, c], forced=forced, what=f"addmm bias {what}")
    A, B = torch.randn(2, 5, 7), torch.randn(2, 7, 3)
    for what, c in {"row": torch.randn(3), "matrix": torch.randn(5, 3), "batched": torch.randn(2, 5, 3),
                    "expanded": torch.randn(5, 3).expand(2, 5, 3), "Mx1": torch.randn(2, 5, 1)}.items():
        _check(OPS["baddbmm"], [A, B, c], forced=forced, what=f"baddbmm bias {what}")


@pytest.mark.parametrize("forced", [True, False], ids=["triton", "aten"])
def test_conv_hyper_parameters(forced):
    cases = [  # stride, padding, dilation, groups, kernel, channels_last input, channels_last weight
        ((1, 1), (0, 0), (1, 1), 1, (1, 1), False, False), ((2, 3), (4, 1), (1, 1), 1, (3, 2), False, False),
        ((1, 1), (2, 2), (2, 1), 1, (3, 3), True, False), ((1, 1), (1, 1), (1, 1), 2, (3, 3), False, True),
        ((3, 3), (0, 0), (1, 1), 4, (1, 1), True, True), ((1, 1), (5, 5), (1, 1), 1, (3, 3), False, False),
        ((7, 7), (0, 0), (1, 1), 1, (2, 2), False, False), ((1, 2), (0, 3), (3, 1), 1, (2, 2), True, False),
        ((1, 1), (0, 0), (1, 1), 1, (9, 8), False, False),  # the kernel covers the whole input
    ]
    for stride, padding, dilation, groups, k, cl, wcl in cases:
        x, w, bias = torch.randn(2, 4, 9, 8), torch.randn(4, 4 // groups, *k), torch.randn(4)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        if wcl:
            w = w.to(memory_format=torch.channels_last)
        args = (list(stride), list(padding), list(dilation), groups)
        op = Op("conv2d", None, lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups),
                lambda x, w, b: ops.conv2d(x, w, b, *args), lambda t: ("conv2d", (t[0], t[1], t[2], *args)))
        out = _check(op, [x, w, bias], forced=forced, what=f"conv2d {stride} {padding} {dilation} {groups} {k}")
        assert out is None or out.stride() == F.conv2d(x, w, bias, stride, padding, dilation, groups).stride()


@pytest.mark.parametrize("forced", [True, False], ids=["triton", "aten"])
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "silu"])
def test_fused_activations_on_nan_and_inf(activation, forced):
    """The backend's mm_act (a linear followed by an activation): NaN, +Inf and -Inf before the activation
    come out as PyTorch's activation makes them (relu(-inf) = 0, silu(-inf) = gelu(-inf) = NaN)."""
    act = {"relu": F.relu, "silu": F.silu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}[activation]
    x, w, bias = torch.randn(5, 7), torch.randn(3, 7), torch.randn(3)
    bias = bias.clone()
    bias[0], bias[1], bias[2] = float("nan"), float("inf"), float("-inf")
    for dtype in (torch.float32, torch.float16):
        t = [x.to(dtype), w.to(dtype), bias.to(dtype)]
        op = Op("mm_act", None, lambda x, w, b: act(F.linear(x, w, b)),
                lambda x, w, b: ops.mm_act(x, w.t(), b, activation),
                lambda t: ("mm_act", (t[0], t[1].t(), t[2], activation)))
        _check(op, t, forced=forced, what=f"mm_act {activation} {dtype}")


def test_every_split_k_and_tile_shape_on_awkward_inputs():
    """Configurations of every kind forced in turn (each SPLIT_K, the smallest and largest tiles) on a
    long-K product with NaN, Inf, transposed and expanded operands and a bias."""
    M, K, N = 5, 300, 3
    base = [torch.randn(M, K), torch.randn(K, N), torch.randn(N)]
    nan, inf = [x.clone() for x in base], [x.clone() for x in base]
    nan[0][1, 7] = float("nan")
    inf[1][9, 2] = float("inf")
    cases = {"plain": base, "nan": nan, "inf": inf, "transposed": [base[0].t().contiguous().t()] + base[1:],
             "expanded": [base[0][:1].expand(M, K)] + base[1:]}
    picks = {f"split_k={k}": (lambda k: lambda cs: min((c for c in cs if c["SPLIT_K"] == k), key=_size))(k)
             for k in (1, 2, 4, 8, 16)}
    picks["largest"] = lambda cs: max((c for c in cs if c["SPLIT_K"] == 1), key=_size)
    for pname, pick in picks.items():
        for cname, t in cases.items():
            for op, args in ((OPS["mm"], t[:2]), (OPS["addmm"], t)):
                dispatch.reset()
                assert _force(op, args, pick)
                out = same_as_torch(f"{op.name} {pname} {cname}", lambda: op.ours(*args), lambda: op.ref(*args),
                                    1e-4)
                assert out is not None and _ran_triton()
                FIGURES["triton_runs"] += 1


def test_conv_tile_shapes_on_awkward_inputs():
    op = OPS["conv2d"]
    x, w, bias = _make(op, "odd", seed=9)
    nan = x.clone()
    nan[1, 2, 3, 1] = float("nan")
    cases = {"plain": [x, w, bias], "nan": [nan, w, bias], "channels_last": [x.to(memory_format=torch.channels_last), w, bias]}
    picks = {"smallest": lambda cs: min(cs, key=_size), "largest": lambda cs: max(cs, key=_size),
             "group_m": lambda cs: min((c for c in cs if c.get("GROUP_M", 1) == 1), key=_size)}
    for pname, pick in picks.items():
        for cname, t in cases.items():
            dispatch.reset()
            assert _force(op, t, pick)
            out = same_as_torch(f"conv2d {pname} {cname}", lambda: op.ours(*t), lambda: op.ref(*t), 1e-4)
            assert out is not None and _ran_triton()
            FIGURES["triton_runs"] += 1


@pytest.mark.parametrize("forced", [True, False], ids=["triton", "aten"])
def test_linear_act_takes_what_f_linear_takes(forced):
    """F.linear accepts a 1-D input, a 1-D weight, K = 0 and any leading dims; linear_act (what the
    backend makes of it) must give the same results, or PyTorch's error type where F.linear raises."""
    op = OPS["linear_act"]
    w, b = torch.randn(3, 7), torch.randn(3)
    cases = {"x 1-D": (torch.randn(7), w, b), "x 3-D": (torch.randn(2, 5, 7), w, b), "x 4-D": (torch.randn(2, 1, 5, 7), w, b),
             "x 0-D": (torch.tensor(1.0), w, b), "w 1-D": (torch.randn(5, 7), torch.randn(7), None),
             "w 1-D, x 1-D": (torch.randn(7), torch.randn(7), None), "w 1-D, 0-D bias": (torch.randn(5, 7), torch.randn(7), torch.tensor(0.5)),
             "K = 0": (torch.randn(5, 0), torch.randn(3, 0), b), "no rows": (torch.randn(0, 7), w, b),
             "w 3-D": (torch.randn(5, 7), torch.randn(2, 3, 7), None), "x sliced 3-D": (torch.randn(2, 5, 14)[..., ::2], w, b)}
    for what, t in cases.items():
        dispatch.reset()
        if forced:
            _force(op, list(t))
        same_as_torch(f"linear_act {what}", lambda: op.ours(*t), lambda: op.ref(*t), 1e-4)


def _bad_variants(op: Op, good: list) -> dict[str, list]:
    """Calls with the same dispatch key as ``good`` that our kernel must not run on: a meta tensor in each
    position (PyTorch accepts some of these beside CPU tensors) and a negative-bit view."""
    out = {f"meta at {i}": [t.to("meta") if j == i else t for j, t in enumerate(good)] for i in range(len(good))}
    out["negative-bit operand"] = [_neg_view(good[0])] + good[1:]
    return out


@pytest.mark.parametrize("order", ["bad_first", "good_first"])
@pytest.mark.parametrize("name", list(OPS))
def test_a_bad_call_keeps_the_kernel_of_the_good_calls(name, order, monkeypatch):
    """A call PyTorch answers without raising but our kernel cannot take (a meta tensor beside CPU ones, a
    lazy view) shares the problem's key. It gets PyTorch's result (metadata only for meta tensors, whose
    values are undefined), and neither poisons the problem (marked failed) nor leaves its own choice
    behind: the good calls before and after it run our kernel, once each."""
    from torchtune_ops.kernels import conv as kconv
    from torchtune_ops.kernels import gemm as kgemm

    launches = []
    for module, attr in ((kgemm, "gemm"), (kconv, "conv2d")):
        real = getattr(module, attr)
        monkeypatch.setattr(module, attr, lambda *a, _real=real, **k: launches.append(1) or _real(*a, **k))
    op = OPS[name]
    good = _make(op, "odd")
    for what, bad in _bad_variants(op, good).items():
        dispatch.reset()
        launches.clear()
        assert _force(op, good)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a kernel failure would warn
            if order == "good_first":
                same_as_torch(f"{name} good", lambda: op.ours(*good), lambda: op.ref(*good), 1e-4)
            same_as_torch(f"{name} {what}", lambda: op.ours(*bad), lambda: op.ref(*bad), 1e-4,
                          values="meta" not in what)
            same_as_torch(f"{name} good after {what}", lambda: op.ours(*good), lambda: op.ref(*good), 1e-4)
        st = dispatch.stats()
        assert [(p["source"], p["kernel"] != "aten") for p in st["problems"]] == [("store", True)], what
        assert not any(c.get("failures") for c in st["ops"].values()), what
        assert _ran_triton() and len(launches) == (2 if order == "good_first" else 1), what
        FIGURES["triton_runs"] += 1
