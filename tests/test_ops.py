"""The custom ops called directly: fake impls (opcheck), results and gradients against PyTorch, the run-time
dispatch (aten for what the kernels do not cover, tuned kernels, the store, fall-back on failure, bucketing,
background tuning)."""
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import torchtune_ops.runtime.ops  # noqa: F401  (registers the ops)
from torchtune_ops.runtime import dispatch, resolve
from torchtune_ops import settings
from torchtune_ops.tuning.timing import FakeTimer

ops = torch.ops.torchtune_ops


@pytest.fixture(autouse=True)
def _fresh_dispatch():
    dispatch.reset()
    dispatch.set_tune_options(timer=None)
    yield
    dispatch.reset()
    dispatch.set_tune_options(timer=None)


@pytest.fixture
def kernels_win():
    """Tuning on with a fake timer under which every Triton configuration beats aten (fast, deterministic)."""
    dispatch.set_tune_options(timer=FakeTimer({"aten": 10.0}, default=1.0))
    with settings.override(autotune=True, max_trials=2, time_budget=30):
        yield


def _act(x, act):
    return {"relu": torch.relu, "silu": F.silu, "none": lambda y: y,
            "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}[act](x)


def _close(a, b, tol=1e-4):
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------------
# Fake impls and autograd registration (torch.library.opcheck).

def _samples():
    r = torch.randn
    return [
        ("mm", (r(5, 7, requires_grad=True), r(7, 3, requires_grad=True))),
        ("mm", (r(1, 1), r(1, 13))),
        ("addmm", (r(3, requires_grad=True), r(5, 7, requires_grad=True), r(7, 3, requires_grad=True), 0.5, 2.0)),
        ("addmm", (r(5, 1), r(5, 7), r(7, 3).t().contiguous().t())),
        ("bmm", (r(2, 5, 7, requires_grad=True), r(2, 7, 3, requires_grad=True))),
        ("baddbmm", (r(5, 3, requires_grad=True), r(2, 5, 7, requires_grad=True), r(2, 7, 3), 1.0, 0.5)),
        ("mm_act", (r(5, 7, requires_grad=True), r(7, 3, requires_grad=True), r(3, requires_grad=True), "gelu_tanh")),
        ("mm_act", (r(5, 7), r(7, 3), None, "silu")),
        ("conv2d", (r(2, 3, 9, 9, requires_grad=True), r(4, 3, 3, 3, requires_grad=True), r(4, requires_grad=True),
                    [1, 1], [1, 1], [1, 1], 1)),
        ("conv2d", (r(2, 4, 7, 6).to(memory_format=torch.channels_last), r(4, 2, 3, 1), None, [2, 1], [0, 1],
                    [1, 2], 2)),
        ("conv2d_grad_input", (r(2, 4, 7, 9), r(4, 3, 3, 2), [1, 0])),
        ("conv2d_backward", (r(2, 4, 7, 9), r(2, 3, 7, 10), r(4, 3, 3, 2), [1, 0])),
        ("conv2d_backward", (r(1, 5, 6, 5).to(memory_format=torch.channels_last),
                             r(1, 3, 7, 5).to(memory_format=torch.channels_last), r(5, 3, 2, 1), [0, 0])),
        ("linear_act", (r(2, 3, 7, requires_grad=True), r(5, 7, requires_grad=True), r(5, requires_grad=True),
                        "gelu_tanh")),
        ("linear_act", (r(7), r(5, 7), None, "relu")),
        ("linear_act", (r(5, 7, requires_grad=True), r(7, requires_grad=True), None, "silu")),          # 1-D weight
        ("linear_act", (r(2, 5, 7, requires_grad=True), r(7, requires_grad=True), r((), requires_grad=True),
                        "relu")),
        ("linear_act", (r(7, requires_grad=True), r(7, requires_grad=True), None, "gelu_tanh")),      # 0-d output
        ("linear_act", (r(2, 1, 3, 7, requires_grad=True), r(5, 7, requires_grad=True), r(5, requires_grad=True),
                        "none")),
        ("linear_act", (r(5, 0, requires_grad=True), r(3, 0, requires_grad=True), r(3, requires_grad=True),
                        "relu")),                                                                       # K = 0
        ("linear_act", (r(0, 7, requires_grad=True), r(3, 7, requires_grad=True), r((), requires_grad=True),
                        "silu")),                                                                       # no rows
    ]


@pytest.mark.parametrize("name,args", _samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(ops, name).default, args)


def test_fake_impl_raises_pytorchs_error_for_bad_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a, b = torch.empty(3, 4), torch.empty(5, 6)
        with pytest.raises(RuntimeError):
            ops.mm(a, b)
    with pytest.raises(RuntimeError):
        ops.mm(torch.randn(3, 4), torch.randn(5, 6))


# ---------------------------------------------------------------------------------------------------------
# Results and gradients against PyTorch, through aten (tuning off) and through tuned kernels.

SHAPES = [(1, 1, 1), (7, 13, 5), (33, 17, 29), (2, 67, 3)]


@pytest.mark.parametrize("tuned", [False, True], ids=["aten", "tuned"])
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_gemm_ops_match_torch_forward_and_backward(M, K, N, tuned, request):
    if tuned:
        request.getfixturevalue("kernels_win")
    torch.manual_seed(M * 100 + K)
    a = torch.randn(M, K, requires_grad=True)
    b = torch.randn(N, K).t().requires_grad_()   # column-major operand, as a linear's weight.t()
    bias = torch.randn(N, requires_grad=True)
    cases = [
        (lambda: ops.mm(a, b), lambda: torch.mm(a, b)),
        (lambda: ops.addmm(bias, a, b, 0.5, 2.0), lambda: torch.addmm(bias, a, b, beta=0.5, alpha=2.0)),
        (lambda: ops.mm_act(a, b, bias, "gelu_tanh"), lambda: F.gelu(torch.addmm(bias, a, b), approximate="tanh")),
        (lambda: ops.mm_act(a, b, None, "relu"), lambda: torch.relu(torch.mm(a, b))),
        (lambda: ops.mm_act(a, b, bias, "silu"), lambda: F.silu(torch.addmm(bias, a, b))),
        (lambda: ops.linear_act(a, b.t(), bias, "gelu_tanh"),
         lambda: F.gelu(F.linear(a, b.t(), bias), approximate="tanh")),
    ]
    for ours, ref in cases:
        out, expect = ours(), ref()
        _close(out, expect)
        g = torch.randn_like(expect)
        got = torch.autograd.grad(out, (a, b, bias), g, allow_unused=True)
        want = torch.autograd.grad(expect, (a, b, bias), g, allow_unused=True)
        for x, y in zip(got, want):
            if y is None:
                assert x is None or float(x.abs().max()) == 0.0
            else:
                _close(x, y, 1e-3)
    st = dispatch.stats()["ops"]
    if tuned:
        assert sum(c.get("tuned", 0) + c.get("store", 0) for c in st.values()) > 0
    else:
        assert all(c.get("tuned", 0) == 0 for c in st.values())


@pytest.mark.parametrize("tuned", [False, True], ids=["aten", "tuned"])
def test_batched_ops_match_torch(tuned, request):
    if tuned:
        request.getfixturevalue("kernels_win")
    a = torch.randn(3, 5, 11, requires_grad=True)
    b = torch.randn(3, 11, 7, requires_grad=True)
    bias = torch.randn(5, 7, requires_grad=True)
    for ours, ref in ((lambda: ops.bmm(a, b), lambda: torch.bmm(a, b)),
                      (lambda: ops.baddbmm(bias, a, b, 0.25, 3.0),
                       lambda: torch.baddbmm(bias, a, b, beta=0.25, alpha=3.0))):
        out, expect = ours(), ref()
        _close(out, expect)
        g = torch.randn_like(expect)
        for x, y in zip(torch.autograd.grad(out, (a, b), g), torch.autograd.grad(expect, (a, b), g)):
            _close(x, y, 1e-3)


@pytest.mark.parametrize("tuned", [False, True], ids=["aten", "tuned"])
@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 0, 1, 1), (1, 2, 2, 2), (1, 1, 1, 4)])
def test_conv2d_matches_torch_forward_and_backward(stride, padding, dilation, groups, tuned, request):
    if tuned:
        request.getfixturevalue("kernels_win")
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 9, requires_grad=True)
    w = torch.randn(8, 4 // groups, 3, 3, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
    out = ops.conv2d(x, w, bias, *args)
    expect = F.conv2d(x, w, bias, stride, padding, dilation, groups)
    _close(out, expect)
    g = torch.randn_like(expect)
    for p, q in zip(torch.autograd.grad(out, (x, w, bias), g), torch.autograd.grad(expect, (x, w, bias), g)):
        _close(p, q, 1e-3)


LINEAR_SHAPES = [  # input, weight, bias (None: no bias)
    ((7,), (3, 7), (3,)),             # a vector input
    ((13, 17), (11, 17), (11,)),      # primes
    ((2, 5, 7), (3, 7), ()),          # batched, 0-d bias
    ((2, 1, 3, 7), (1, 7), None),     # 4-D input, one output feature
    ((5, 7), (7,), None),             # 1-D weight: output (5,)
    ((2, 5, 7), (7,), ()),            # 1-D weight, batched, 0-d bias
    ((7,), (7,), ()),                 # vector input and weight: a 0-d output
    ((0, 7), (3, 7), (3,)),           # no rows
    ((2, 0, 7), (3, 7), (3,)),        # zero-size batch
    ((5, 0), (3, 0), (3,)),           # K = 0: the bias alone
    ((5, 7), (0, 7), (0,)),           # no output features
    ((7,), (3, 7), (1, 3)),           # a 2-D bias beside a vector: PyTorch's output is (3,)
    ((2, 5, 7), (3, 7), (5, 3)),      # a 2-D bias broadcast over the batch
]


@pytest.mark.parametrize("mode", ["float32", "float64", "float32-tuned"])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("x_shape,w_shape,b_shape", LINEAR_SHAPES, ids=lambda v: "x".join(map(str, v))
                         if isinstance(v, tuple) else str(v))
def test_linear_act_forward_and_gradients_match_f_linear(x_shape, w_shape, b_shape, activation, mode, request):
    """linear_act (what the backend makes of activation(F.linear(x, w, b))) against F.linear and the
    activation, result and every input gradient, for every shape F.linear takes. Tuned: every product
    (forward, recomputed pre-activation, both gradient products) is tuned, and our kernels must run."""
    if mode.endswith("tuned"):
        request.getfixturevalue("kernels_win")
    dtype = torch.float64 if mode == "float64" else torch.float32
    gen = torch.Generator().manual_seed(sum(x_shape) + 7 * sum(w_shape))
    inputs = [torch.randn(s, generator=gen, dtype=dtype) for s in (x_shape, w_shape, b_shape) if s is not None]
    ours_in = [t.clone().requires_grad_() for t in inputs]
    ref_in = [t.clone().requires_grad_() for t in inputs]
    bias = (lambda ts: ts[2] if b_shape is not None else None)
    out = ops.linear_act(ours_in[0], ours_in[1], bias(ours_in), activation)
    expect = _act(F.linear(ref_in[0], ref_in[1], bias(ref_in)), activation)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    _close(out, expect, tol)
    g = torch.randn(expect.shape, generator=gen, dtype=dtype)
    got = torch.autograd.grad(out, ours_in, g)
    want = torch.autograd.grad(expect, ref_in, g)
    for p, q in zip(got, want):
        _close(p, q, tol * 10)
    ran = [p for p in dispatch.stats()["problems"] if p["kernel"] != "aten" and p["calls"] > 0]
    if mode.endswith("tuned") and 0 not in x_shape + w_shape:
        assert ran, "no tuned kernel ran"
    elif not mode.endswith("tuned"):
        assert not ran


@pytest.mark.parametrize("x_shape,w_shape,b_shape", [
    ((), (3, 7), None), ((7,), (), None), ((), (), None),            # 0-d input or weight
    ((5, 7), (2, 3, 7), None),                                        # a weight of 3 dims
    ((5, 7), (7,), ()), ((5, 7), (7,), (5,)),                         # 1-D weight, matrix input and a bias
    ((5, 7), (3, 6), None), ((2, 5, 7), (3, 7), (4,)),               # inner sizes, bias size
], ids=str)
def test_linear_act_raises_pytorchs_error_where_f_linear_does(x_shape, w_shape, b_shape):
    """Shapes F.linear rejects: linear_act raises the same error type, with and without grad."""
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    b = None if b_shape is None else torch.randn(b_shape)
    with pytest.raises(RuntimeError):
        F.linear(x, w, b)
    for grad in (False, True):
        with pytest.raises(RuntimeError):
            ops.linear_act(x.requires_grad_(grad), w, b, "relu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int64, torch.complex64])
def test_unsupported_dtypes_go_to_aten(dtype, kernels_win):
    a = (torch.randn(6, 5) * 4).to(dtype)
    b = (torch.randn(5, 3) * 4).to(dtype)
    assert torch.equal(ops.mm(a, b), torch.mm(a, b))
    if dtype.is_floating_point:
        x, w = torch.randn(1, 2, 5, 5, dtype=dtype), torch.randn(3, 2, 3, 3, dtype=dtype)
        assert torch.equal(ops.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1), F.conv2d(x, w))
    st = dispatch.stats()
    assert {p["source"] for p in st["problems"]} == {"unsupported"}
    assert all(c.get("tuned", 0) == 0 for c in st["ops"].values())


def test_zero_size_and_mixed_dtypes(kernels_win):
    a, b = torch.randn(0, 5), torch.randn(5, 3)
    _close(ops.mm(a, b), torch.mm(a, b))
    bias, a0, b0 = torch.randn(3), torch.randn(4, 0), torch.randn(0, 3)
    _close(ops.addmm(bias, a0, b0, 0.5, 1.0), torch.addmm(bias, a0, b0, beta=0.5))
    with pytest.raises(RuntimeError):
        ops.mm(torch.randn(4, 5), torch.randn(5, 3, dtype=torch.float64))
    assert all(c.get("tuned", 0) == 0 for c in dispatch.stats()["ops"].values())


# ---------------------------------------------------------------------------------------------------------
# Dispatch behaviour.

def test_tuning_off_tunes_nothing_and_writes_nothing():
    from torchtune_ops.storage.store import default_store

    a, b = torch.randn(9, 10), torch.randn(10, 11)
    _close(ops.mm(a, b), torch.mm(a, b))
    st = dispatch.stats()
    assert st["ops"]["mm"] == {"misses": 1, "untuned": 1, "calls": 1, "hits": 0, "by_source": {"untuned": 1},
                               "aten_calls": 1}
    assert default_store().entries() == []


def test_second_call_is_a_memory_hit_and_store_serves_after_reset(kernels_win):
    a, b = torch.randn(9, 10), torch.randn(10, 11)
    for _ in range(3):
        _close(ops.mm(a, b), torch.mm(a, b))
    c = dispatch.stats()["ops"]["mm"]
    assert (c["calls"], c["hits"], c["misses"], c["tuned"]) == (3, 2, 1, 1)
    [p] = dispatch.stats()["problems"]
    assert p["kernel"] != "aten" and p["trials"] >= 1
    dispatch.reset()
    _close(ops.mm(a, b), torch.mm(a, b))
    c = dispatch.stats()["ops"]["mm"]
    assert c.get("store") == 1 and c.get("tuned", 0) == 0


def test_aten_is_kept_when_it_wins():
    dispatch.set_tune_options(timer=FakeTimer({"aten": 1.0}, default=10.0))
    with settings.override(autotune=True, max_trials=2):
        a, b = torch.randn(9, 10), torch.randn(10, 11)
        _close(ops.mm(a, b), torch.mm(a, b))
    [p] = dispatch.stats()["problems"]
    assert p["kernel"] == "aten" and p["source"] == "tuned"


def test_failing_kernel_falls_back_with_one_warning(kernels_win, monkeypatch):
    from torchtune_ops.kernels import gemm as kgemm

    a, b = torch.randn(9, 10), torch.randn(10, 11)
    ops.mm(a, b)                       # tuned and stored
    dispatch.reset()

    def boom(*args, **kwargs):
        raise RuntimeError("injected kernel failure")

    monkeypatch.setattr(kgemm, "gemm", boom)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _close(ops.mm(a, b), torch.mm(a, b))
        # another key (other opts) of the same problem: marked failed, no second warning, no retry
        _close(ops.mm(a, b, dispatch.encode_opts({"max_trials": 2})), torch.mm(a, b))
    ours = [w for w in caught if "torchtune_ops" in str(w.message)]
    assert len(ours) == 1
    st = dispatch.stats()
    assert st["ops"]["mm"]["failures"] == 1 and st["ops"]["mm"]["failed"] == 1
    assert {p["source"] for p in st["problems"]} == {"failed"}
    dispatch.reset()
    with settings.override(strict=True):
        with pytest.raises(RuntimeError, match="injected"):
            ops.mm(a, b)


def test_problem_claimed_elsewhere_is_looked_up_again_later(kernels_win, monkeypatch):
    from torchtune_ops.tuning import tuner
    from torchtune_ops.storage.store import Entry

    real = tuner.tune_problem
    answers = []

    def busy_then_real(family, problem, **kw):
        if not answers:  # first lookup: another process holds the claim; nothing is stored
            answers.append("claimed")
            return Entry("fp", family.name, "{}", winner="aten", time_ms=1.0, aten_ms=1.0, trials=0,
                         source="claimed-elsewhere")
        answers.append("tuned")
        return real(family, problem, **kw)

    monkeypatch.setattr(tuner, "tune_problem", busy_then_real)
    monkeypatch.setattr(resolve, "CLAIM_RETRY_S", 0.5)
    a, b = torch.randn(9, 10), torch.randn(10, 11)
    _close(ops.mm(a, b), torch.mm(a, b))     # served by PyTorch while the other process tunes
    _close(ops.mm(a, b), torch.mm(a, b))     # inside the retry window: no second lookup
    assert [p["source"] for p in dispatch.stats()["problems"]] == ["claimed-elsewhere"]
    time.sleep(0.6)
    _close(ops.mm(a, b), torch.mm(a, b))     # retry window over: this call forgets the choice
    _close(ops.mm(a, b), torch.mm(a, b))     # looked up again: tuned now
    assert answers == ["claimed", "tuned"]
    assert [p["source"] for p in dispatch.stats()["problems"]] == ["tuned"]


def test_pow2_bucketing_tunes_one_problem_for_many_m(kernels_win):
    b = torch.randn(10, 11)
    with settings.override(bucket="pow2"):
        for m in (5, 6, 7, 8):
            a = torch.randn(m, 10)
            _close(ops.mm(a, b), torch.mm(a, b))
    c = dispatch.stats()["ops"]["mm"]
    assert c["tuned"] == 1 and c["store"] == 3


def test_background_tuning_serves_aten_then_swaps_the_winner_in(kernels_win):
    a, b = torch.randn(9, 10), torch.randn(10, 11)
    with settings.override(autotune="background"):
        _close(ops.mm(a, b), torch.mm(a, b))
        assert dispatch.stats()["problems"][0]["source"] == "background"
        dispatch.wait_background()
        _close(ops.mm(a, b), torch.mm(a, b))
    sources = {p["source"] for p in dispatch.stats()["problems"]}
    assert sources == {"store"}


def test_settings_overrides_travel_in_opts():
    """An op called with an opts string uses those settings on a miss, whatever the environment says."""
    dispatch.set_tune_options(timer=FakeTimer({"aten": 10.0}, default=1.0))
    opts = dispatch.encode_opts({"autotune": "on", "max_trials": 2})
    a, b = torch.randn(9, 10), torch.randn(10, 11)
    _close(ops.mm(a, b, opts), torch.mm(a, b))
    _close(ops.mm(a, b), torch.mm(a, b))            # no opts: environment (tuning off) -> store hit
    c = dispatch.stats()["ops"]["mm"]
    assert c["tuned"] == 1 and c["store"] == 1


def _odd_operands():
    nan = torch.randn(4, 6)
    nan[1, 2] = float("nan")
    inf = torch.randn(4, 6).abs()
    inf[0, 0] = float("inf")
    return {
        "expanded_a": (torch.randn(1, 6).expand(4, 6), torch.randn(6, 3)),
        "expanded_b": (torch.randn(4, 6), torch.randn(6, 1).expand(6, 5)),
        "sliced": (torch.randn(9, 20)[::2, 3:9], torch.randn(12, 5)[::2]),
        "nan": (nan, torch.randn(6, 3)),
        "inf": (inf, torch.randn(6, 3).abs()),
        "float16": (torch.randn(4, 6).half(), torch.randn(6, 3).half()),
        "bfloat16": (torch.randn(4, 6).bfloat16(), torch.randn(6, 3).bfloat16()),
    }


@pytest.mark.parametrize("name", list(_odd_operands()))
def test_odd_operands_match_torch_through_tuned_kernels(name, kernels_win):
    a, b = _odd_operands()[name]
    out, ref = ops.mm(a, b), torch.mm(a, b)
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.stride() == ref.stride()
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2, equal_nan=True)


@pytest.mark.parametrize("op_name", ["mm", "addmm", "conv2d"])
def test_autocast_casts_like_pytorch(op_name):
    x, w = torch.randn(2, 3, 6, 6, requires_grad=True), torch.randn(4, 3, 3, 3)
    a, b, bias = torch.randn(5, 7, requires_grad=True), torch.randn(7, 3), torch.randn(3)
    calls = {"mm": (lambda: ops.mm(a, b), lambda: torch.mm(a, b)),
             "addmm": (lambda: ops.addmm(bias, a, b), lambda: torch.addmm(bias, a, b)),
             "conv2d": (lambda: ops.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1),
                        lambda: F.conv2d(x, w, None, 1, 1))}[op_name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = calls[0](), calls[1]()
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    out.float().sum().backward()


def test_log_level_info_reports_each_choice(caplog):
    import logging

    with settings.override(log="INFO"):
        dispatch.reset()
        with caplog.at_level(logging.INFO, logger="torchtune_ops"):
            ops.mm(torch.randn(3, 4), torch.randn(4, 5))
            ops.mm(torch.randn(3, 4), torch.randn(4, 5))     # a hit: not logged again
    lines = [r.getMessage() for r in caplog.records if r.name == "torchtune_ops"]
    assert lines == ["torchtune_ops: mm [3,4] x [4,5] -> aten (untuned)"]
    logging.getLogger("torchtune_ops").setLevel(logging.NOTSET)


# ---------------------------------------------------------------------------------------------------------
# The hot path's shortcuts: the conv input gradient, call sites, the autograd kernel.

def _conv_grad_input_ref(g, w, padding):
    """PyTorch's input gradient of a stride-1 conv2d (autograd of F.conv2d)."""
    n, _, ho, wo = g.shape
    h, wi = ho + w.shape[2] - 1 - 2 * padding[0], wo + w.shape[3] - 1 - 2 * padding[1]
    x = torch.zeros(n, w.shape[1], h, wi, requires_grad=True)
    F.conv2d(x, w, None, 1, padding).backward(g)
    return x.grad


@pytest.mark.parametrize("shape", [(2, 4, 7, 9, 3, 3, 2, [1, 0]), (1, 5, 6, 5, 2, 1, 3, [0, 1])])
@pytest.mark.parametrize("served", ["aten", "tuned"])
def test_conv_grad_input_flips_the_weight_only_for_a_triton_kernel(shape, served, monkeypatch, request):
    """Where PyTorch's kernel serves the flipped problem, the input gradient is PyTorch's own (a transposed
    convolution of the weight as it is): no flip, no copy after the first call; where our kernel serves it,
    each call flips the weight. Results match autograd's either way."""
    n, cout, ho, wo, cin, kh, kw, padding = shape
    if served == "tuned":
        request.getfixturevalue("kernels_win")
    flips = []
    real = dispatch._flipped
    monkeypatch.setattr(dispatch, "_flipped", lambda w: flips.append(w) or real(w))
    g, w = torch.randn(n, cout, ho, wo), torch.randn(cout, cin, kh, kw)
    ref = _conv_grad_input_ref(g, w, padding)
    for _ in range(3):
        _close(ops.conv2d_grad_input(g, w, padding), ref)
    [p] = [p for p in dispatch.stats()["problems"] if p["op"] == "conv2d"]
    assert p["calls"] == 3
    assert (p["kernel"] == "aten") == (served == "aten")
    assert len(flips) == (1 if served == "aten" else 3)


CL = torch.channels_last


@pytest.mark.parametrize("shape", [(2, 4, 7, 9, 3, 3, 2, [1, 0]), (1, 5, 6, 5, 2, 1, 3, [0, 1]),
                                   (3, 1, 5, 4, 2, 2, 2, [1, 1])])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
@pytest.mark.parametrize("served", ["aten", "tuned"])
def test_conv2d_backward_matches_autograd_in_aten_memory_format(shape, layout, served, request):
    """conv2d_backward's input and weight gradients are autograd's, in the strides aten's
    convolution_backward gives (what a compiled graph's fake values assume), whichever kernel serves the
    input gradient, and through its call site too."""
    n, cout, ho, wo, cin, kh, kw, padding = shape
    if served == "tuned":
        request.getfixturevalue("kernels_win")
    torch.manual_seed(n * 10 + cout)
    h, wi = ho + kh - 1 - 2 * padding[0], wo + kw - 1 - 2 * padding[1]
    x, w, g = torch.randn(n, cin, h, wi), torch.randn(cout, cin, kh, kw), torch.randn(n, cout, ho, wo)
    if layout == "channels_last":
        x, g = x.to(memory_format=CL), g.to(memory_format=CL)
    elif layout == "mixed":   # output gradient channels-last, input contiguous
        g = g.to(memory_format=CL)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.conv2d(xr, wr, None, 1, padding).backward(g)
    ref = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], padding, [1, 1], False, [0, 0], 1,
                                              [True, True, False])
    for call in range(3):
        gx, gw = (ops.conv2d_backward(g, x, w, padding) if call < 2
                  else dispatch.conv2d_backward_site(g, x, w, padding, "", "bwd-site"))
        _close(gx, xr.grad)
        _close(gw, wr.grad)
        assert (gx.stride(), gw.stride()) == (ref[0].stride(), ref[1].stride())
    [p] = [p for p in dispatch.stats()["problems"] if p["op"] == "conv2d"]
    assert (p["kernel"] == "aten") == (served == "aten") and p["calls"] == 3


def test_a_call_site_keeps_its_key_and_follows_resets_and_precision():
    """``dispatch.<op>_site`` (what Inductor's code calls) builds its key once; a reset or another float32
    matmul precision makes it resolve again, and its results are the op's."""
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    for _ in range(2):
        _close(dispatch.mm_site(a, b, "", "test-site"), a @ b)
    [p] = dispatch.stats()["problems"]
    assert p["calls"] == 2 and len(dispatch._memo) == 1
    dispatch.reset()
    _close(dispatch.mm_site(a, b, "", "test-site"), a @ b)
    assert dispatch.stats()["problems"][0]["calls"] == 1
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        dispatch.mm_site(a, b, "", "test-site")
    finally:
        torch.set_float32_matmul_precision(before)
    assert sorted(k[-1] for k in dispatch._memo) == sorted(["high", before])
    x, wt, bias = torch.randn(4, 7), torch.randn(6, 7), torch.randn(6)
    for _ in range(2):   # a linear site served by aten: F.linear and the activation in place
        _close(dispatch.linear_act_site(x, wt, bias, "gelu_tanh", "", "lin-site"),
               F.gelu(F.linear(x, wt, bias), approximate="tanh"))


def _site_calls():
    """(site function, its arguments before opts and site id, PyTorch's result) for every matmul site, odd
    shapes: 1-row, prime sizes, a transposed operand, broadcast and full biases, alpha/beta, linear inputs of
    1 to 4 dims, each activation."""
    r = torch.randn
    a, bt, q = r(5, 7), r(3, 7).t(), r(3, 5, 7)
    x1, x3, x4, w = r(7), r(2, 3, 7), r(2, 1, 3, 7), r(11, 7)
    bias, full = r(11), r(5, 3)
    return [
        (dispatch.mm_site, (a, bt), a @ bt),
        (dispatch.mm_site, (r(1, 1), r(1, 13)), None),
        (dispatch.bmm_site, (q, r(3, 7, 2)), None),
        (dispatch.addmm_site, (full, a, bt, 0.5, 2.0), torch.addmm(full, a, bt, beta=0.5, alpha=2.0)),
        (dispatch.addmm_site, (r(3), a, bt, 1, 1), None),
        (dispatch.baddbmm_site, (r(5, 2), q, r(3, 7, 2), 1, 1), None),
        (dispatch.mm_act_site, (a, bt, None, "relu"), torch.relu(a @ bt)),
        (dispatch.linear_act_site, (a, w, bias, "gelu_tanh"), F.gelu(F.linear(a, w, bias), approximate="tanh")),
        (dispatch.linear_act_site, (x3, w, bias, "silu"), F.silu(F.linear(x3, w, bias))),
        (dispatch.linear_act_site, (x4, w, None, "none"), F.linear(x4, w)),
        (dispatch.linear_act_site, (x1, w, bias, "relu"), torch.relu(F.linear(x1, w, bias))),
    ]


_ATEN_OF_SITE = {"mm_site": torch.mm, "bmm_site": torch.bmm,
                 "addmm_site": lambda c, a, b, beta, alpha: torch.addmm(c, a, b, beta=beta, alpha=alpha),
                 "baddbmm_site": lambda c, a, b, beta, alpha: torch.baddbmm(c, a, b, beta=beta, alpha=alpha)}


@pytest.mark.parametrize("served", ["aten", "tuned"])
def test_matmul_sites_keep_their_choice_and_return_fresh_contiguous_results(served, request):
    """Each matmul site returns the op's result as a new tensor of torch.empty's strides (what the compile
    backend's lowering relies on to leave out Inductor's size/stride assert), from PyTorch's kernel and from
    ours; its later calls run the choice it kept (counted), and a reset makes it resolve again."""
    from torch._prims_common import make_contiguous_strides_for

    if served == "tuned":
        request.getfixturevalue("kernels_win")
    for i, (site, args, ref) in enumerate(_site_calls()):
        if ref is None:
            ref = _ATEN_OF_SITE[site.__name__](*args)
        sid = f"t-{site.__name__}-{i}"
        outs = [site(*args, "", sid) for _ in range(3)]
        for out in outs:
            _close(out, ref, tol=1e-3)
            assert out.stride() == make_contiguous_strides_for(out.shape), (site.__name__, out.stride())
            assert all(out.data_ptr() != t.data_ptr() for t in args if isinstance(t, torch.Tensor))
        kept = dispatch._sites[sid][0]
        assert kept.live and kept is next(c for c in dispatch._memo.values() if c is kept)
        assert kept.calls == 3, (site.__name__, kept.calls)
        if served == "tuned":   # each site met a problem the GEMM covers: our kernel ran
            assert kept.kernel != "aten", (site.__name__, kept.source)
    dispatch.reset()
    assert not kept.live
    site, args, ref = _site_calls()[0]
    _close(site(*args, "", "t-after-reset"), args[0] @ args[1])
    assert dispatch._sites["t-after-reset"][0].live


def test_a_site_follows_a_choice_swapped_in_memory():
    """A choice replaced in memory (background tuning's swap, a retried claim) is no longer run by the site
    that kept it: the next call resolves again."""
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    dispatch.mm_site(a, b, "", "swap-site")
    old = dispatch._sites["swap-site"][0]
    [key] = [k for k, c in dispatch._memo.items() if c is old]
    with dispatch._lock:
        resolve._retire(dispatch._memo.pop(key))
    _close(dispatch.mm_site(a, b, "", "swap-site"), a @ b)
    new = dispatch._sites["swap-site"][0]
    assert new is not old and new.live and not old.live and new.calls == 1 and old.calls == 1
    assert dispatch.stats()["ops"]["mm"]["calls"] == 2


def test_the_autograd_kernel_leaves_dispatch_modes_and_subclasses_to_the_dispatcher():
    """Without grad, plain tensors go straight to the implementation; under a dispatch mode (tracing,
    FlopCounter, ...) the mode sees our op itself, as a redispatch below autograd would give it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    a, b = torch.randn(5, 7), torch.randn(7, 3)
    with torch.no_grad():
        with Seen() as mode:
            out = ops.mm(a, b)
        _close(out, a @ b)
        assert mode.ops[0] == "torchtune_ops.mm.default"
        with Seen() as mode:
            ops.mm_act(a, b, None, "relu")
        assert mode.ops[0] == "torchtune_ops.mm_act.default"
        p = torch.nn.Parameter(b)
        _close(ops.mm(a, p), a @ b)
    assert dispatch.stats()["ops"]["mm"]["calls"] >= 2
