"""Bound launchers (kernels/_launch.py, gemm.bind, conv.bind): the same results as the unbound launch on
odd shapes through the interpreter, the fall-back where a pointer's alignment differs from the bound one,
and, through a stubbed GPU driver (benchmarks/_fake_driver.py, in a process without the interpreter), the
very arguments Triton's JIT would pass the compiled kernel's launcher."""
import json
import os
import subprocess
import sys

import pytest
import torch

from torchtune_ops.kernels import conv as kconv, gemm as kgemm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GEMM_CONFIGS = {
    "small": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=2, num_stages=1, SPLIT_K=1, TMA=0),
    "split3": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2, SPLIT_K=3, TMA=0),
    "tma": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=2, SPLIT_K=1, TMA=1),
    "persistent": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2, SPLIT_K=1, TMA=1,
                       WARP_SPEC=1, PERSISTENT=1),
}

# (batch or None, M, N, K, a layout, bias shape or None, activation)
GEMM_CASES = [
    (None, 1, 1, 1, "row", None, "none"),
    (None, 7, 13, 5, "col", (13,), "relu"),
    (None, 33, 17, 65, "row", (33, 1), "gelu_tanh"),
    (3, 5, 11, 19, "row", (3, 5, 11), "silu"),
    (None, 16, 32, 48, "row", (), "none"),
]


def _operands(case, seed, device):
    batch, m, n, k, layout, bias_shape, _ = case
    g = torch.Generator().manual_seed(seed)
    lead = (batch,) if batch else ()
    a = torch.randn(*lead, m, k, generator=g)
    if layout == "col":
        a = torch.randn(*lead, k, m, generator=g).transpose(-1, -2)
    b = torch.randn(*lead, k, n, generator=g)
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=g)
    return tuple(None if t is None else t.to(device) for t in (a, b, bias))


@pytest.mark.parametrize("name", sorted(GEMM_CONFIGS))
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: "x".join(map(str, c[1:4])) + f"-{c[4]}-{c[6]}")
def test_bound_gemm_equals_unbound(case, name, device):
    config, activation = GEMM_CONFIGS[name], case[-1]
    a, b, bias = _operands(case, 0, device)
    bound = kgemm.bind(a, b, config=config, bias=bias, beta=0.5, activation=activation)
    for seed in (0, 1, 2):   # the first call binds, later ones run through the binding
        a, b, bias = _operands(case, seed, device)
        got = bound(a, b, bias)
        ref = kgemm.gemm(a, b, config=config, bias=bias, beta=0.5, activation=activation)
        assert torch.equal(got, ref)
    assert bound.main.bound == 0 or device == "cuda"   # the interpreter has no compiled kernel to keep


@pytest.mark.parametrize("name", sorted(GEMM_CONFIGS))
@pytest.mark.parametrize("shape", [(40, 24, 36), (5, 4100, 12)], ids=str)
def test_bound_gemm_keeps_the_planners_grid_and_constexprs(shape, name, device):
    """The bound launches are the unbound plan's: the same grids (a persistent one included), the same
    constexprs (A_DIV/B_DIV/C_DIV, USE_TMA, WARP_SPEC, PERSISTENT) and the same trailing arguments."""
    m, k, n = shape
    config = GEMM_CONFIGS[name]
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)[:, : n - 1]  # ldb = n: odd N
    bound = kgemm.bind(a, b, config=config)
    _, plan = kgemm._plan(a, b, config, None, 1.0, 1.0, "none", None, None, None)
    launchers = [bound.main] + ([bound.epilogue] if bound.epilogue is not None else [])
    assert len(launchers) == len(plan)
    for launcher, (kernel, grid, args, consts, warps, stages) in zip(launchers, plan):
        assert launcher.kernel is kernel and launcher.grid == tuple(grid) and launcher.constexprs == consts
        assert launcher.fixed == tuple(x for x in args if not isinstance(x, torch.Tensor))
        assert launcher.options == {"num_warps": warps, "num_stages": stages}
    if name == "persistent":
        assert plan[0][3]["PERSISTENT"] and len(plan[0][1]) == 1
    torch.testing.assert_close(bound(a, b), a @ b, rtol=1e-4, atol=1e-4)


def test_bound_gemm_misaligned_operand_takes_the_unbound_path(device):
    config = GEMM_CONFIGS["tma"]
    big = torch.randn(40 * 24 + 1, device=device)
    a = big[: 40 * 24].view(40, 24)            # aligned
    shifted = big[1:].view(40, 24)             # same sizes and strides, pointer off by 4 bytes
    b = torch.randn(24, 9, device=device)
    bound = kgemm.bind(a, b, config=config)
    calls = []
    real = kgemm.gemm

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    kgemm.gemm = spy
    try:
        assert torch.equal(bound(a, b), real(a, b, config=config))
        assert not calls
        got = bound(shifted, b)
        assert calls == [1]
    finally:
        kgemm.gemm = real
    torch.testing.assert_close(got, shifted @ b, rtol=1e-4, atol=1e-4)


def test_bind_has_nothing_to_launch_for_empty_products(device):
    a, b = torch.randn(3, 0, device=device), torch.randn(0, 4, device=device)
    assert kgemm.bind(a, b, config=GEMM_CONFIGS["small"]) is None


CONV_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2, SPLIT_K=1)


@pytest.mark.parametrize("case", [
    # (N, C, H, W, K, R, S, stride, padding, groups, bias, split_k, channels_last)
    (1, 3, 5, 7, 4, 3, 3, 1, 1, 1, True, 1, False),
    (2, 6, 9, 4, 6, 3, 1, 2, 0, 3, False, 1, True),
    (1, 5, 5, 5, 5, 3, 3, 1, 1, 5, True, 1, False),   # depthwise kernel
    (1, 32, 3, 3, 7, 3, 3, 1, 1, 1, True, 2, False),  # split-K: two kernels
], ids=["rgb-like", "grouped-strided-cl", "depthwise", "split2"])
def test_bound_conv_equals_unbound(case, device):
    n, c, h, w_, k, r, s, stride, padding, groups, has_bias, split_k, cl = case
    config = dict(CONV_CONFIG, SPLIT_K=split_k)

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, c, h, w_, generator=g)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        weight = torch.randn(k, c // groups, r, s, generator=g)
        bias = torch.randn(k, generator=g) if has_bias else None
        return x.to(device), weight.to(device), None if bias is None else bias.to(device)

    kw = dict(stride=stride, padding=padding, groups=groups, activation="relu")
    x, weight, bias = inputs(0)
    bound = kconv.bind(x, weight, config=config, bias=bias, **kw)
    for seed in (0, 1, 2):
        x, weight, bias = inputs(seed)
        got = bound(x, weight, bias)
        ref = kconv.conv2d(x, weight, config=config, bias=bias, **kw)
        assert got.stride() == ref.stride() and torch.equal(got, ref)


def test_tuned_choice_runs_through_the_binding(monkeypatch, device):
    """A cache hit of the run-time dispatch launches through the binding made at the key's first call."""
    from torchtune_ops.runtime import dispatch

    binds = []
    real = kgemm.bind

    def counting(*args, **kwargs):
        binds.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kgemm, "bind", counting)
    from torchtune_ops.runtime import launch
    from torchtune_ops.runtime.choices import Choice

    c = Choice(torch.mm, op="mm", kernel="test", source="store", aten=torch.mm)
    fn = launch._kernel_fn("mm", kgemm.gemm, GEMM_CONFIGS["small"], c, torch.device(device))
    for seed in range(3):
        a, b = torch.randn(7, 5, device=device), torch.randn(5, 3, device=device)
        torch.testing.assert_close(fn(a, b), a @ b, rtol=1e-4, atol=1e-4)
    assert binds == [1]
    dispatch.reset()


# what every stubbed-driver script starts with (here and in test_gemm_host_desc.py; run by _driver_script in a
# process without the interpreter)
_DRIVER_PRELUDE = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from _fake_driver import fake_driver
from torchtune_ops.kernels import gemm as kgemm

def plain(args):   # tensors by pointer, everything else as it is (a script may define its own)
    return [("ptr", a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args]

def record_runs(launches):   # from now on, every stubbed launch's kernel arguments (after grid, stream
    seen = []                 # and metadata) as plain(...), in the list returned
    cls = type(launches.compiled[0])
    orig = cls.run
    def run(self, *args):
        seen.append(plain(args[9:]))
        orig(self, *args)
    cls.run = run
    return seen
"""


def _driver_script(body: str, tmp_path) -> dict:
    """Run ``_DRIVER_PRELUDE + body`` without the interpreter (Triton's real JIT, stubbed driver); its RESULT."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               TORCHTUNE_OPS_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", _DRIVER_PRELUDE + body, os.path.join(ROOT, "benchmarks")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT ", 1)[1])


_DRIVER_SCRIPT = r"""
cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2, SPLIT_K=3, TMA=0)
res = {}
with fake_driver(kgemm._gemm_kernel, kgemm._splitk_epilogue_kernel) as launches:
    a, b, bias = torch.randn(33, 50), torch.randn(50, 17), torch.randn(17)
    bound = kgemm.bind(a, b, config=cfg, bias=bias, activation="silu")
    bound(a, b, bias)                    # first call: Triton's JIT, compiled kernels kept
    res["first"] = [launches.count, len(launches.compiled), bound.main.bound]
    seen = record_runs(launches)
    kgemm.gemm(a, b, config=cfg, bias=bias, activation="silu")      # the JIT's arguments
    n_jit = len(seen)
    bound(a, b, bias)                                              # ours
    res["same_args"] = [len(x) for x in seen] and [
        [x for x in p if not isinstance(x, tuple)] == [x for x in q if not isinstance(x, tuple)]
        for p, q in zip(seen[:n_jit], seen[n_jit:])]
    res["ptrs_in_place"] = [[i for i, x in enumerate(p) if isinstance(x, tuple)] ==
                            [i for i, x in enumerate(q) if isinstance(x, tuple)]
                            for p, q in zip(seen[:n_jit], seen[n_jit:])]
    res["bound"] = [bound.main.bound, bound.epilogue.bound, len(launches.compiled)]
    big = torch.randn(33 * 50 + 1)
    bound(big[1:].view(33, 50), b, bias)       # misaligned: through the JIT, a new specialisation
    res["misaligned"] = [bound.main.bound, len(launches.compiled)]
print("RESULT", json.dumps(res))
"""


def test_bound_launch_passes_what_the_jit_passes(tmp_path):
    """Without the interpreter, against Triton's real JIT on a stubbed driver: the first call compiles
    (once per kernel), later calls go straight to the compiled kernel's launcher with the same arguments
    as ``kernel[grid](...)`` gives it; a misaligned operand goes through the JIT (a new specialisation)."""
    res = _driver_script(_DRIVER_SCRIPT, tmp_path)
    assert res["first"] == [2, 2, 0]                  # GEMM + split-K epilogue, both through the JIT
    assert res["same_args"] == [True, True] and res["ptrs_in_place"] == [True, True]
    assert res["bound"] == [1, 1, 2]                  # straight to the kept kernels, nothing compiled
    assert res["misaligned"] == [1, 3]                # not bound: the JIT compiled another specialisation


_SPECIALISED_SCRIPT = r"""
import triton
from torchtune_ops.runtime import launch
from torchtune_ops.runtime.choices import Choice
from torchtune_ops.runtime.aten import aten_for

cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=2, num_stages=1, SPLIT_K=1, TMA=0)
res = {}
with fake_driver(kgemm._gemm_kernel, kgemm._splitk_epilogue_kernel) as launches:
    bias, a, b = torch.randn(17), torch.randn(33, 50), torch.randn(50, 17)
    args = (bias, a, b, 1, 1)
    c = Choice(aten_for("addmm", args), op="addmm", kernel="test", source="store", aten=aten_for("addmm", args))
    c.fn = launch._kernel_fn("addmm", kgemm.gemm, cfg, c, torch.device("cpu"))
    c.fn(*args)                          # binds, compiles (the JIT), then keeps the specialised call
    res["first"] = [launches.count, len(launches.compiled)]
    seen = []
    def record(call):
        n = launches.count
        out = call()
        seen.extend([plain(launches.last[9:])] * (launches.count - n))
        return out
    record(lambda: kgemm.gemm(a, b, config=cfg, bias=bias))    # the JIT's arguments
    out = record(lambda: c.fn(*args))                          # the specialised call's
    res["hook_passed"] = launches.last[7] is not None
    res["same_args"] = [x for x in seen[0] if not isinstance(x, tuple)] == [x for x in seen[1] if not isinstance(x, tuple)]
    res["ptrs"] = [x for x in seen[1] if isinstance(x, tuple)] == [("ptr", t.data_ptr()) for t in (a, b, out, bias)]
    res["out"] = [list(out.shape), list(out.stride())]
    res["compiled"] = len(launches.compiled)
    big = torch.randn(33 * 50 + 1)
    record(lambda: c.fn(bias, big[1:].view(33, 50), b, 1, 1))   # misaligned: through the JIT, a new specialisation
    res["misaligned"] = [len(seen), len(launches.compiled)]
    triton.knobs.runtime.launch_enter_hook.add(lambda *a_, **k_: None)
    try:
        record(lambda: c.fn(*args))                  # a hook installed: through the JIT, which passes it on
    finally:
        triton.knobs.runtime.launch_enter_hook.calls.clear()
    res["hooked"] = [launches.last[7] is not None, len(seen)]
print("RESULT", json.dumps(res))
"""


def test_a_tuned_choice_launches_through_the_specialised_call(tmp_path):
    """Without the interpreter, against Triton's real JIT on a stubbed driver: after its first call compiled
    the kernel, a tuned addmm choice launches through the binding's single closure
    (``BoundGemm.specialised``) with the very arguments ``kernel[grid](...)`` gives the compiled kernel's
    launcher; a misaligned operand and an installed launch hook go through the JIT."""
    if not hasattr(__import__("triton"), "knobs"):
        pytest.skip("this Triton has no knobs.runtime launch hooks: every call goes through the JIT")
    res = _driver_script(_SPECIALISED_SCRIPT, tmp_path)
    assert res["first"] == [1, 1]
    assert res["same_args"] and res["ptrs"] and res["out"] == [[33, 17], [17, 1]]
    assert res["compiled"] == 1                        # nothing compiled again
    assert res["misaligned"] == [3, 2]                 # launched, through the JIT's new specialisation
    assert res["hook_passed"] is False and res["hooked"] == [True, 4]   # the launcher got the hook to call
