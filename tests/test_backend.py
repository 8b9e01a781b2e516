"""The compile backend: which aten ops it rewrites in forward, backward and inference graphs, fusion,
DISABLE, Inductor, and the entry point (torch.compile(m, backend="torchtune_ops") with no import)."""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchtune_ops.runtime import backend, dispatch
from torchtune_ops import settings


class Net(nn.Module):
    """Conv2d, linear (+gelu/silu/relu) and bmm layers."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 3, 1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.l1 = nn.Linear(4 * 5 * 5, 16)
        self.l2 = nn.Linear(16, 8)
        self.l3 = nn.Linear(8, 6, bias=False)

    def forward(self, x):
        y = F.relu(self.conv(torch.tanh(self.conv0(x)))).flatten(1)
        h = F.gelu(self.l1(y), approximate="tanh")
        h = F.silu(self.l2(h))
        q = h.view(-1, 2, 4)
        att = torch.bmm(q, q.transpose(1, 2))
        return torch.relu(self.l3(h)).sum(1) + att.flatten(1).sum(1)


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    backend.reset_counts()
    dispatch.reset()
    yield
    torch._dynamo.reset()


def _grads(m):
    return [p.grad.clone() for p in m.parameters()]


def _train_step(m, fn, x):
    m.zero_grad()
    out = fn(x)
    out.sum().backward()
    return out.detach(), _grads(m)


def test_eager_compiler_rewrites_forward_and_backward_and_matches_eager(ops_stay):
    torch.manual_seed(0)
    m, x = Net(), torch.randn(3, 3, 5, 5)
    compiled = torch.compile(m, backend="torchtune_ops", options={"compiler": "eager"})
    out, grads = _train_step(m, compiled, x)
    ref, ref_grads = _train_step(m, m, x)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    counts = backend.intercepted()
    # forward: conv, 2 addmm (gelu/silu keep their pre-activation for backward), l3+relu fused, bmm;
    # backward: 2 mm per linear (input and weight gradients), 2 bmm for the bmm, the second conv's input
    # gradient as our conv2d (weight gradients and the first conv's backward stay with aten). Counts carry
    # the run-time op names: the input gradient is counted as the conv2d it runs.
    assert counts["conv2d"] == 2 + 1 and counts["addmm"] == 2 and counts["mm_act"] == 1
    assert counts["bmm"] == 3 and counts["mm"] == 6
    st = dispatch.stats()["ops"]
    assert {"conv2d", "addmm", "mm_act", "bmm", "mm"} <= set(st)


@pytest.fixture
def no_compile_caches():
    """Counts grow only when our pass runs: make Inductor compile instead of loading from its caches."""
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(
            enable_autograd_cache=False):
        yield


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_inference_graph_fuses_linear_and_activation(compiler, no_compile_caches, ops_stay):
    m = nn.Sequential(nn.Linear(8, 16), nn.GELU(approximate="tanh"), nn.Linear(16, 16), nn.SiLU(),
                      nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 4, bias=False), nn.ReLU())
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        out = torch.compile(m, backend="torchtune_ops", options={"compiler": compiler})(x)
        torch.testing.assert_close(out, m(x), rtol=1e-4, atol=1e-5)
    # fused before AOT (inference): one linear_act per linear + activation, nothing left for the post-grad pass
    assert backend.intercepted() == {"mm_act": 4}  # linear_act ops, counted under the op they run


def test_disable_gives_a_graph_without_custom_ops(monkeypatch):
    monkeypatch.setenv("TORCHTUNE_OPS_DISABLE", "1")
    settings.reload()
    m, x = Net(), torch.randn(2, 3, 5, 5)
    out, grads = _train_step(m, torch.compile(m, backend="torchtune_ops", options={"compiler": "eager"}), x)
    ref, _ = _train_step(m, m, x)
    torch.testing.assert_close(out, ref)
    assert backend.intercepted() == {}
    assert dispatch.stats()["ops"] == {}


def test_rewrite_graph_leaves_transposed_convolution():
    def f(x, w):
        return F.conv_transpose2d(x, w) + 1

    gm = torch.fx.experimental.proxy_tensor.make_fx(f)(torch.randn(1, 2, 4, 4), torch.randn(2, 3, 3, 3))
    counts = backend.rewrite_graph(gm.graph)
    assert counts == {"skipped:convolution": 1}


def test_inductor_training_and_inference_match_eager(no_compile_caches, ops_stay):
    torch.manual_seed(1)
    m, x = Net(), torch.randn(3, 3, 5, 5)
    compiled = torch.compile(m, backend="torchtune_ops")
    out, grads = _train_step(m, compiled, x)
    ref, ref_grads = _train_step(m, m, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    counts = backend.intercepted()
    assert counts.get("conv2d") == 2 + 1 and counts.get("bmm", 0) >= 3  # + the input gradient
    assert counts.get("mm", 0) + counts.get("addmm", 0) + counts.get("mm_act", 0) >= 7
    assert dispatch.stats()["ops"]["conv2d"]["calls"] >= 1


def test_entry_point_backend_without_importing_the_package(tmp_path, ops_stay):
    script = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        x = torch.randn(4, 6)
        assert "torchtune_ops" not in sys.modules
        out = torch.compile(m, backend="torchtune_ops", options={"compiler": "eager"})(x)
        torch.testing.assert_close(out, m(x))
        from torchtune_ops.runtime import backend
        print("COUNTS", sorted(backend.intercepted().items()))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHTUNE_OPS_")}
    env["TORCHTUNE_OPS_RECORD"] = ops_stay
    env["TORCHTUNE_OPS_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "COUNTS [('addmm', 2), ('mm', 3)]" in r.stdout or "('mm_act', 1)" in r.stdout, r.stdout


_CACHED_SCRIPT = """
import torch
m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
x = torch.randn(4, 6)
with torch.no_grad():
    out = torch.compile(m, backend="torchtune_ops")(x)
    torch.testing.assert_close(out, m(x))
from torchtune_ops.runtime import dispatch
print("CALLS", sum(c["calls"] for c in dispatch.stats()["ops"].values()))
"""


def test_inductor_cache_hit_in_a_new_process_runs_our_ops(tmp_path, ops_stay):
    """The second process loads the compiled graphs from Inductor's caches (our pass does not run there);
    the ops must still be registered and run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHTUNE_OPS_")}
    env["TORCHTUNE_OPS_RECORD"] = ops_stay
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    env["TORCHTUNE_OPS_CACHE_DIR"] = str(tmp_path / "cache")
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", _CACHED_SCRIPT], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        calls = int(r.stdout.split("CALLS ", 1)[1].split()[0])
        assert calls == 2, r.stdout        # the two linears' addmm


@pytest.mark.parametrize("dynamic", [False, True])
def test_inductor_calls_our_ops_as_extern_kernels_where_shapes_are_static(dynamic, no_compile_caches, ops_stay):
    """Static shapes: Inductor's code calls the run-time dispatch directly (extern_kernels.torchtune_ops_*),
    not through the dispatcher, and asserts the layout of the convolutions' outputs only; dynamic shapes keep
    the op call. Results and calls are the same."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(2)
    m, x = Net().eval(), torch.randn(3, 3, 5, 5)
    compiled = torch.compile(m, backend="torchtune_ops", dynamic=dynamic)
    with torch.no_grad():
        out, code = run_and_get_code(compiled, x)
        ref = m(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    text = "\n".join(code)
    extern, dispatched = text.count("= extern_kernels.torchtune_ops_"), text.count("= torch.ops.torchtune_ops.")
    if dynamic:
        assert dispatched >= 1
    else:
        assert extern >= 5 and dispatched == 0, text
        # each call is its op's site function with a site id of its own (the key kept per call site)
        sites = re.findall(r"= extern_kernels\.torchtune_ops_\w+_site\(.*'([0-9a-f]{16})'\)", text)
        assert len(sites) == extern and len(set(sites)) == extern, text
        # a matmul site's output (new, torch.empty's strides) is not asserted; a convolution's is
        for buf, op in re.findall(r"(buf\d+) = extern_kernels\.torchtune_ops_(\w+)_site\(", text):
            asserted = f"assert_size_stride({buf}," in text
            assert asserted == op.startswith("conv2d"), (buf, op, text)
    assert dispatch.stats()["ops"]["conv2d"]["calls"] == 2


# ---------------------------------------------------------------------------------------------------------
# Compile-time resolution: a static-shape op whose cached winner is PyTorch's kernel is left to Inductor.

class Small(nn.Module):
    """Two convolutions (one with an input gradient), linear + relu, linear, bmm: odd sizes."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 5, 3, padding=1)
        self.l1 = nn.Linear(5 * 3 * 3, 7)
        self.l2 = nn.Linear(7, 6)

    def forward(self, x):
        y = torch.tanh(self.conv(torch.relu(self.conv0(x)))).flatten(1)
        h = F.relu(self.l1(y))
        q = self.l2(h).view(-1, 2, 3)
        return (torch.bmm(q, q.transpose(1, 2)).flatten(1).sum(1, keepdim=True) + h).square()


def _step(m, x, train):
    """One call (training: forward and backward) and what Inductor generated for it."""
    from torch._inductor.utils import run_and_get_code

    def f():
        if not train:
            with torch.no_grad():
                return m(x), []
        for p in m.parameters():
            p.grad = None
        out = m(x)
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in m.parameters()]

    (out, grads), code = run_and_get_code(f)
    return out, grads, "\n".join(code)


# The first, tuning run of _tune_then_recompile by (train, timer, tune_trials): its code and a copy of the
# cache it filled. Tests that differ only in the second run (autotune on/off, a larger budget) start from it.
_TUNED: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _tuned_runs(tmp_path_factory):
    _TUNED.clear()
    _TUNED["dir"] = tmp_path_factory.mktemp("tuned-small")
    yield
    _TUNED.clear()


def _tune_then_recompile(train, timer, *, tune_trials=2, trials=2, autotune="on"):
    """Compile and run Small with tuning on (every problem tuned at its first call, ``timer`` deciding
    aten or Triton), then compile it again in a fresh runtime with ``autotune``/``trials``: (the first
    run's code, the second's code, the second's results, Inductor's results). The first run is made once
    per (train, timer, tune_trials) in this module; later calls start from a copy of the cache it filled."""
    import copy
    import shutil

    from torchtune_ops.tuning.timing import FakeTimer

    torch.manual_seed(3)
    m, x = Small(), torch.randn(2, 3, 3, 3)
    if not train:
        m.eval()
    ref_m = copy.deepcopy(m)
    cache_dir = os.environ["TORCHTUNE_OPS_CACHE_DIR"]
    key = (train, tuple(sorted(timer.items())), tune_trials)
    dispatch.set_tune_options(timer=FakeTimer(timer, default=10.0 if timer["aten"] < 10 else 1.0))
    try:
        if key in _TUNED:
            first, saved = _TUNED[key]
            shutil.copytree(saved, cache_dir, dirs_exist_ok=True)
        else:
            with settings.override(autotune="on", max_trials=tune_trials):
                first = _step(torch.compile(m, backend="torchtune_ops"), x, train)[2]
                tuned = sum(c.get("tuned", 0) for c in dispatch.stats()["ops"].values())
                assert tuned >= 4, dispatch.stats()["ops"]   # a miss with tuning on: our op, tuned at its first call
            dispatch.reset()
            saved = _TUNED["dir"] / str(len(_TUNED))
            shutil.copytree(cache_dir, saved)
            _TUNED[key] = first, saved
        torch._dynamo.reset()
        backend.reset_counts()
        dispatch.reset()
        with settings.override(autotune=autotune, max_trials=trials):
            out, grads, code = _step(torch.compile(m, backend="torchtune_ops"), x, train)
    finally:
        dispatch.set_tune_options(timer=None)
    ref, ref_grads, _ = _step(torch.compile(ref_m, backend="inductor"), x, train)
    return first, code, (out, grads), (ref, ref_grads)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("autotune", ["on", "off"])
def test_cached_aten_winners_are_left_to_inductor(train, autotune, no_compile_caches):
    """Every problem tuned with PyTorch's kernel the winner: recompiled, the graphs (forward, backward)
    hold none of our ops, as torch.compile's, with the same results; skipped() says why."""
    first, code, (out, grads), (ref, ref_grads) = _tune_then_recompile(train, {"aten": 1.0}, autotune=autotune)
    assert "torchtune_ops" in first
    assert "torchtune_ops" not in code, code
    assert not {k: v for k, v in backend.intercepted().items() if not k.startswith("skipped:")}
    why = backend.skipped()
    assert why and all("PyTorch's kernel is the cached winner" in k for k in why), why
    assert backend.left_by_cache() == {"store": sum(why.values())}
    kinds = {k.split(":")[0].split(" ")[0] for k in why}
    assert {"convolution", "addmm", "bmm"} <= kinds, why
    if train:
        assert "convolution_backward" in kinds, why   # the input gradient stays in aten's one call
    assert dispatch.stats()["ops"] == {}    # nothing dispatched
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_cached_triton_winners_keep_our_ops(train, no_compile_caches):
    first, code, (out, grads), (ref, ref_grads) = _tune_then_recompile(train, {"aten": 10.0})
    assert "extern_kernels.torchtune_ops_" in code
    assert not any("cached winner" in k for k in backend.skipped())
    kernels = {p["kernel"] for p in dispatch.stats()["problems"]}
    assert kernels - {"aten"}, dispatch.stats()["problems"]   # Triton kernels ran
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4)


def test_aten_winner_tuned_with_a_smaller_budget_keeps_our_op_and_is_tuned_again(no_compile_caches):
    """Issue 19's rule: with tuning on, an entry tuned with fewer trials than asked now is tuned again,
    so its aten winner is not final at compile time."""
    _first, code, _ours, _ref = _tune_then_recompile(False, {"aten": 1.0}, tune_trials=2, trials=3)
    assert "extern_kernels.torchtune_ops_" in code
    assert not any("cached winner" in k for k in backend.skipped())
    assert sum(c.get("tuned", 0) for c in dispatch.stats()["ops"].values()) >= 4


def test_problems_the_kernels_do_not_cover_are_left_to_inductor(no_compile_caches):
    """float64 (no kernel of ours takes it) is PyTorch's at compile time, tuning on or off: no custom op."""
    torch.manual_seed(4)
    m, x = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)).double().eval(), torch.randn(4, 5).double()
    with torch.no_grad(), settings.override(autotune="on"):
        out, _grads, code = _step(torch.compile(m, backend="torchtune_ops"), x, False)
        torch.testing.assert_close(out, m(x))
    assert "torchtune_ops" not in code, code
    assert any("the kernels do not cover it" in k for k in backend.skipped()), backend.skipped()


def test_pass_uuid_changes_with_the_store():
    """Inductor's caches key on the pass's uuid: a store that changed since a graph was cached (a node left
    to Inductor may now have a Triton winner) must give a new key; an unchanged one the same key."""
    from torchtune_ops.storage.device import fingerprint
    from torchtune_ops.storage.store import Entry, default_store

    p = backend._make_pass("", None)
    first = p.uuid()
    assert p.uuid() == first
    default_store().put(Entry(fingerprint(torch.device("cpu")).key, "gemm", '{"M":3}', "aten", 1.0, 1.0, 1))
    assert p.uuid() != first


@pytest.mark.parametrize("act", [nn.GELU(approximate="tanh"), nn.SiLU()])
def test_a_cached_aten_linear_activation_leaves_its_matmul_to_inductor_untuned(act, no_compile_caches):
    """Inference fuses linear + activation before AOT autograd; when the fused problem's cached winner is
    PyTorch's kernel the pair is left alone, and the addmm Inductor's decomposition leaves behind (the
    activation turned into pointwise code) is not looked up, nor tuned, under a key of its own."""
    from torchtune_ops.tuning.timing import FakeTimer

    torch.manual_seed(5)
    m, x = nn.Sequential(nn.Linear(11, 13), act, nn.Linear(13, 3)).eval(), torch.randn(2, 7, 11)
    dispatch.set_tune_options(timer=FakeTimer({"aten": 1.0}, default=10.0))
    try:
        with settings.override(autotune="on", max_trials=2):
            with torch.no_grad():
                torch.compile(m, backend="torchtune_ops")(x)
            assert sum(c.get("tuned", 0) for c in dispatch.stats()["ops"].values()) == 2   # mm_act, addmm
            torch._dynamo.reset()
            backend.reset_counts()
            dispatch.reset()
            out, _, code = _step(torch.compile(m, backend="torchtune_ops"), x, False)
    finally:
        dispatch.set_tune_options(timer=None)
    assert dispatch.stats()["ops"] == {}, dispatch.stats()["ops"]   # nothing dispatched, nothing tuned
    assert "torchtune_ops" not in code, code
    assert any("cached winner" in k for k in backend.skipped()), backend.skipped()
    with torch.no_grad():
        torch.testing.assert_close(out, m(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_a_failing_graph_pass_compiles_the_model_as_torch_compile_would(train, monkeypatch, no_compile_caches):
    """Our pass hitting an unexpected error is a warning, not a compile error: the graph runs unchanged."""
    def broken(*args, **kwargs):
        raise TypeError("unhashable type: non-nested SymInt")

    monkeypatch.setattr(backend, "_decided_aten", broken)
    monkeypatch.setattr(backend, "_rewrite_warned", set())
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(7, 9), nn.GELU(approximate="tanh"), nn.Linear(9, 3))
    x = torch.randn(4, 7)
    with pytest.warns(RuntimeWarning, match="failed .*TypeError"):
        out, grads, _ = _step(torch.compile(m, backend="torchtune_ops"), x, train)
    ref, ref_grads, _ = _step(m, x, train)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Convolution layouts: our conv ops run in the layout Inductor's layout optimization gives aten's.

class Res(nn.Module):
    """A residual block at odd sizes: conv-bn-relu, a conv with bias, a 1x1 shortcut, a strided conv."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 5, 3, padding=1)
        self.short = nn.Conv2d(3, 5, 1, bias=False)
        self.conv3 = nn.Conv2d(5, 6, 3, stride=2, padding=1, bias=False)

    def forward(self, x):
        y = self.conv2(F.relu(self.bn1(self.conv1(x))))
        return self.conv3(F.relu(y + self.short(x))).mean((2, 3))


def _conv_outputs(code: str, op: str) -> list:
    """The (sizes, strides) asserted after each call of ``op`` in Inductor's code, sorted."""
    return sorted(re.findall(r"assert_size_stride\(\w+, (\([\d, ]*\)), (\([\d, ]*\)), '" + re.escape(op), code))


def _saved_layouts(code: str) -> list:
    """The (sizes, strides) asserted of the graphs' 4-D inputs whose layout is not ambiguous (more than one
    channel and one pixel), sorted."""
    found = re.findall(r"assert_size_stride\(\w+, \((\d+), (\d+), (\d+), (\d+)\), (\([\d, ]*\)), 'input'\)", code)
    return sorted(f for f in found if int(f[1]) > 1 and int(f[2]) * int(f[3]) > 1)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_conv_layouts_follow_inductors(train, fmt, no_compile_caches, ops_stay):
    """Our conv2d's outputs have the strides Inductor gives aten's convolutions in the same model
    (channels-last on this CPU's oneDNN), the results and gradients are Inductor's, and a training step's
    backward makes each stride-1 convolution's input and weight gradients in one call, as Inductor's does."""
    import copy

    torch.manual_seed(4)
    m, x = Res(), torch.randn(2, 3, 7, 9).to(memory_format=fmt)
    if not train:
        m.eval()
    ref_m = copy.deepcopy(m)
    out, grads, code = _step(torch.compile(m, backend="torchtune_ops"), x, train)
    ref, ref_grads, ref_code = _step(torch.compile(ref_m, backend="inductor"), x, train)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    ours, theirs = (_conv_outputs(code, "torch.ops.torchtune_ops.conv2d.default"),
                    _conv_outputs(ref_code, "torch.ops.aten.convolution.default"))
    assert len(ours) == 4 and ours == theirs, (ours, theirs)
    if train:   # the backward reads the saved inputs and weights in Inductor's layouts
        assert _saved_layouts(code) == _saved_layouts(ref_code)
        assert "conv2d_grad_input_site" not in code
        # conv2 (conv1 and the shortcut need no input gradient, the strided conv3's is aten's)
        assert code.count("torchtune_ops_conv2d_backward_site(") == 1
        calls = code.count("torch.ops.aten.convolution_backward.default(")
        assert calls + 1 == ref_code.count("torch.ops.aten.convolution_backward.default(")
        assert backend.intercepted().get("conv2d") == 4 + 1


def test_conv_layout_falls_back_to_traced_layouts_without_inductors_decision(monkeypatch, no_compile_caches,
                                                                              ops_stay):
    """A torch whose Inductor has no layout decision, or one that fails: no channels-last constraint, our
    convolutions keep the traced (contiguous) layouts, with the same results."""
    from torch._inductor.graph import GraphLowering

    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda x, w: F.conv2d(x, w))(torch.randn(1, 2, 4, 4),
                                                                                torch.randn(3, 2, 3, 3))
    assert backend._inductor_channels_last(gm.graph, training=False) is True   # oneDNN CPU: Inductor's rule

    def broken(*args, **kwargs):
        raise TypeError("another torch")

    with monkeypatch.context() as mp:
        mp.setattr(GraphLowering, "decide_layout_opt", staticmethod(broken))
        assert backend._inductor_channels_last(gm.graph, training=False) is False
        mp.delattr(GraphLowering, "decide_layout_opt")
        assert backend._inductor_channels_last(gm.graph, training=True) is False
    monkeypatch.setattr(backend, "_inductor_channels_last", lambda graph, training: False)
    torch.manual_seed(5)
    m, x = Res().eval(), torch.randn(2, 3, 7, 9)
    out, _, code = _step(torch.compile(m, backend="torchtune_ops"), x, False)
    torch.testing.assert_close(out, m(x), rtol=1e-4, atol=1e-5)
    ours = _conv_outputs(code, "torch.ops.torchtune_ops.conv2d.default")
    assert len(ours) == 4 and all(s == str(tuple(torch.empty(eval(z)).stride())) for z, s in ours), ours


def test_conv_backward_with_dynamic_shapes_goes_through_the_dispatcher(no_compile_caches, ops_stay):
    """Dynamic shapes: conv2d_backward (two outputs) is called as the op, through the dispatcher; the
    gradients are eager PyTorch's."""
    import copy

    torch.manual_seed(6)
    m, x = Res(), torch.randn(2, 3, 7, 9)
    ref_m = copy.deepcopy(m)
    out, grads, code = _step(torch.compile(m, backend="torchtune_ops", dynamic=True), x, True)
    ref, ref_grads = _train_step(ref_m, ref_m, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    assert "torch.ops.torchtune_ops.conv2d_backward.default(" in code
