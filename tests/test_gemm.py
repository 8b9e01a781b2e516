"""The GEMM family against torch: odd sizes, layouts, batches, dtypes, epilogues, configs, and its space.

On CPU the kernels run through the Triton interpreter (small sizes); on a CUDA machine the same tests
run on the GPU, and the @pytest.mark.gpu ones add realistic sizes.
"""
import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from torchtune_ops.errors import InvalidConfig, UnsupportedProblem
from torchtune_ops.kernels import gemm as gemm_mod
from torchtune_ops.kernels import gemm_space
from torchtune_ops.kernels.base import CPU_INTERPRETER, Config, DeviceLimits, device_limits, relative_error
from torchtune_ops.kernels.gemm import GEMM, GemmProblem, gemm, gemm_problem

H100 = DeviceLimits(name="fake-H100", smem_per_block=232448, num_sms=132, capability=(9, 0))
A100 = DeviceLimits(name="fake-A100", smem_per_block=166912, num_sms=108, capability=(8, 0))

# Relative error norm against a float64 reference: output rounding of the dtype, with margin.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cfg(bm, bn, bk, *, gm=8, warps=4, stages=2, sk=1, tma=0):
    return Config.of(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages,
                     SPLIT_K=sk, TMA=tma)


SMALLEST = cfg(16, 16, 16, gm=1, warps=2)
MIXED = cfg(32, 16, 32, gm=4)
SPLIT = cfg(16, 32, 16, sk=4)
TMA = cfg(16, 32, 32, tma=1)
LARGEST = cfg(256, 256, 256, warps=8)
CONFIGS = {"smallest": SMALLEST, "mixed": MIXED, "split4": SPLIT, "tma": TMA, "largest": LARGEST}


def act_ref(x, activation):
    return {"none": lambda t: t, "relu": F.relu, "silu": F.silu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation](x)


def ref64(a, b, bias=None, alpha=1.0, beta=1.0, activation="none"):
    r = alpha * torch.matmul(a.double().cpu(), b.double().cpu())
    if bias is not None and beta != 0:
        r = r + beta * (bias.double().cpu() if isinstance(bias, torch.Tensor) else bias)
    return act_ref(r, activation)


def poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_close(ours, ref, dtype):
    assert ours.shape == ref.shape
    err = relative_error(ours.cpu(), ref.to(ours.dtype).cpu() if ref.dtype != torch.float64 else ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:.3g}"


def make(shape, layout, dtype, device, gen=None):
    """A tensor of ``shape`` in ``layout``: row, col (transposed storage), strided (every other
    column) or sliced (a window of a bigger tensor)."""
    *lead, r, c = shape
    kw = dict(dtype=dtype, device=device)
    if layout == "row":
        return torch.randn(*lead, r, c, **kw)
    if layout == "col":
        return torch.randn(*lead, c, r, **kw).transpose(-1, -2)
    if layout == "strided":
        return torch.randn(*lead, r, 2 * c, **kw)[..., ::2]
    if layout == "sliced":
        return torch.randn(*lead, r + 3, c + 5, **kw)[..., 2:r + 2, 3:c + 3]
    raise AssertionError(layout)


# --- correctness against torch -------------------------------------------------------------------

SIZES = [(1, 1, 1), (5, 17, 67), (17, 5, 3), (67, 67, 17), (33, 65, 48), (2, 70, 97)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mnk", SIZES, ids=str)
@pytest.mark.parametrize("name", ["smallest", "mixed", "split4", "tma"])
def test_mm_odd_sizes(device, dtype, mnk, name):
    M, N, K = mnk
    torch.manual_seed(0)
    a, b = make((M, K), "row", dtype, device), make((K, N), "row", dtype, device)
    out = poisoned((M, N), dtype, device)
    r = gemm(a, b, config=CONFIGS[name], out=out)
    assert r is out
    assert_close(out, ref64(a, b), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_largest_blocks(device, dtype):
    a, b = make((67, 97), "row", dtype, device), make((97, 70), "col", dtype, device)
    bias = torch.randn(70, dtype=dtype, device=device)
    out = poisoned((67, 70), dtype, device)
    gemm(a, b, config=LARGEST, bias=bias, activation="relu", out=out)
    assert_close(out, ref64(a, b, bias, activation="relu"), dtype)


LAYOUTS = ("row", "col", "strided", "sliced")


@pytest.mark.parametrize("a_layout", LAYOUTS)
@pytest.mark.parametrize("b_layout", LAYOUTS)
@pytest.mark.parametrize("name", ["smallest", "split4", "tma"])
def test_layouts_used_as_they_are(device, a_layout, b_layout, name):
    dtype = torch.float16
    M, N, K = 19, 24, 40
    a, b = make((M, K), a_layout, dtype, device), make((K, N), b_layout, dtype, device)
    out = poisoned((M, N), dtype, device)
    gemm(a, b, config=CONFIGS[name], out=out)
    assert_close(out, ref64(a, b), dtype)


def test_no_copies_of_operands(device, monkeypatch):
    """The kernel receives the caller's views (same data pointers and strides)."""
    seen = {}
    real = gemm_mod._gemm_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kw):
                seen["a"], seen["b"] = args[0], args[1]
                return real[grid](*args, **kw)
            return run

    monkeypatch.setattr(gemm_mod, "_gemm_kernel", Spy())
    a = make((9, 20), "col", torch.float32, device)
    b = make((20, 11), "strided", torch.float32, device)
    gemm(a, b, config=SMALLEST)
    assert seen["a"].data_ptr() == a.data_ptr() and seen["a"].stride() == a.stride()
    assert seen["b"].data_ptr() == b.data_ptr() and seen["b"].stride() == b.stride()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["batch1", "batch3", "broadcast_a", "broadcast_b", "expand_b",
                                  "permuted", "col_batched"])
@pytest.mark.parametrize("name", ["smallest", "split4", "tma"])
def test_batched(device, dtype, case, name):
    B, M, N, K = 3, 13, 18, 32
    if case == "batch1":
        a, b = make((1, M, K), "row", dtype, device), make((1, K, N), "row", dtype, device)
    elif case == "batch3":
        a, b = make((B, M, K), "row", dtype, device), make((B, K, N), "row", dtype, device)
    elif case == "broadcast_a":  # 2-D a: batch stride 0
        a, b = make((M, K), "row", dtype, device), make((B, K, N), "row", dtype, device)
    elif case == "broadcast_b":
        a, b = make((B, M, K), "row", dtype, device), make((K, N), "col", dtype, device)
    elif case == "expand_b":  # an explicit stride-0 batch
        a, b = make((B, M, K), "row", dtype, device), make((1, K, N), "row", dtype, device).expand(B, K, N)
    elif case == "permuted":  # batch is not the outermost storage dim
        a = torch.randn(M, B, K, dtype=dtype, device=device).permute(1, 0, 2)
        b = torch.randn(K, B, N, dtype=dtype, device=device).permute(1, 0, 2)
    else:
        a, b = make((B, M, K), "col", dtype, device), make((B, K, N), "col", dtype, device)
    batch = max(a.shape[0] if a.dim() == 3 else 1, b.shape[0] if b.dim() == 3 else 1)
    out = poisoned((batch, M, N), dtype, device)
    gemm(a, b, config=CONFIGS[name], out=out)
    assert_close(out, ref64(a, b), dtype)


BIASES = ["number", "0d", "one_elem", "row", "row_2d", "col", "full", "full_transposed", "fp32_bias"]


def make_bias(kind, M, N, dtype, device):
    if kind == "number":
        return 0.75
    if kind == "0d":
        return torch.tensor(1.5, dtype=dtype, device=device)
    if kind == "one_elem":
        return torch.tensor([[-0.5]], dtype=dtype, device=device)
    if kind == "row":
        return torch.randn(N, dtype=dtype, device=device)
    if kind == "row_2d":
        return torch.randn(1, N, dtype=dtype, device=device)
    if kind == "col":
        return torch.randn(M, 1, dtype=dtype, device=device)
    if kind == "full":
        return torch.randn(M, N, dtype=dtype, device=device)
    if kind == "full_transposed":
        return torch.randn(N, M, dtype=dtype, device=device).t()
    if kind == "fp32_bias":
        return torch.randn(N, dtype=torch.float32, device=device)
    raise AssertionError(kind)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", BIASES)
@pytest.mark.parametrize("name", ["smallest", "split4"])
def test_bias_kinds(device, dtype, kind, name):
    M, N, K = 21, 19, 35
    a, b = make((M, K), "row", dtype, device), make((K, N), "col", dtype, device)
    bias = make_bias(kind, M, N, dtype, device)
    out = poisoned((M, N), dtype, device)
    gemm(a, b, config=CONFIGS[name], bias=bias, alpha=0.5, beta=-1.25, out=out)
    assert_close(out, ref64(a, b, bias, 0.5, -1.25), dtype)


@pytest.mark.parametrize("kind", ["row", "per_batch_row", "col", "full", "full_broadcast"])
@pytest.mark.parametrize("name", ["smallest", "split4"])
def test_batched_bias(device, kind, name):
    dtype, B, M, N, K = torch.float32, 2, 9, 20, 33
    a, b = make((B, M, K), "row", dtype, device), make((B, K, N), "row", dtype, device)
    bias = {"row": lambda: torch.randn(N), "per_batch_row": lambda: torch.randn(B, 1, N),
            "col": lambda: torch.randn(M, 1), "full": lambda: torch.randn(B, M, N),
            "full_broadcast": lambda: torch.randn(M, N)}[kind]().to(device)
    out = poisoned((B, M, N), dtype, device)
    gemm(a, b, config=CONFIGS[name], bias=bias, beta=2.0, out=out)
    assert_close(out, ref64(a, b, bias, 1.0, 2.0), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("name", ["smallest", "split4", "tma"])
def test_activations(device, dtype, activation, name):
    M, N, K = 23, 32, 48
    a = make((M, K), "row", dtype, device) * 3  # reach the saturated ends of the activations
    b = make((K, N), "row", dtype, device)
    bias = torch.randn(N, dtype=dtype, device=device) * 10
    out = poisoned((M, N), dtype, device)
    gemm(a, b, config=CONFIGS[name], bias=bias, activation=activation, out=out)
    assert_close(out, ref64(a, b, bias, activation=activation), dtype)


def test_relu_keeps_nan_like_torch(device):
    a = torch.tensor([[float("nan"), 1.0], [-1.0, 2.0]], device=device)
    b = torch.eye(2, device=device)
    r = gemm(a, b, config=SMALLEST, activation="relu")
    ref = F.relu(a @ b)
    assert torch.equal(torch.isnan(r), torch.isnan(ref))
    assert torch.equal(r[1], ref[1])


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (2.5, 0.0), (-1.0, 0.5), (0.0, 1.0)])
def test_alpha_beta(device, alpha, beta):
    dtype, M, N, K = torch.float32, 11, 7, 29
    a, b = make((M, K), "sliced", dtype, device), make((K, N), "row", dtype, device)
    bias = torch.randn(M, N, device=device)
    out = poisoned((M, N), dtype, device)
    gemm(a, b, config=SMALLEST, bias=bias, alpha=alpha, beta=beta, out=out)
    assert_close(out, ref64(a, b, bias, alpha, beta), dtype)


def test_beta_zero_ignores_nan_bias(device):
    """As torch.addmm: with beta == 0 the bias is not read, so its NaNs do not propagate."""
    a, b = make((5, 6), "row", torch.float32, device), make((6, 7), "row", torch.float32, device)
    bias = torch.full((5, 7), float("nan"), device=device)
    r = gemm(a, b, config=SMALLEST, bias=bias, beta=0.0)
    ref = torch.addmm(bias.cpu(), a.cpu(), b.cpu(), beta=0.0)
    assert torch.isfinite(r).all()
    assert_close(r, ref.double(), torch.float32)


def test_strided_out_buffer(device):
    M, N, K = 13, 22, 17
    a, b = make((M, K), "row", torch.float16, device), make((K, N), "row", torch.float16, device)
    for name in ("smallest", "split4"):
        out = poisoned((N, M), torch.float16, device).t()  # a transposed result buffer
        gemm(a, b, config=CONFIGS[name], out=out, bias=torch.randn(N, dtype=torch.float16, device=device))
        assert torch.isfinite(out).all()


# --- zero sizes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 5, 7), (5, 0, 7), (0, 0, 0), (3, 4, 0)])
@pytest.mark.parametrize("name", ["smallest", "split4"])
def test_zero_sizes(device, shape, name):
    M, N, K = shape
    a, b = torch.randn(M, K, device=device), torch.randn(K, N, device=device)
    r = gemm(a, b, config=CONFIGS[name])
    assert r.shape == (M, N)
    assert torch.equal(r.cpu(), torch.mm(a.cpu(), b.cpu()))


@pytest.mark.parametrize("bias", ["none", "number", "row", "full"])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu_tanh", "silu"])
def test_k_zero_is_activated_bias(device, bias, activation):
    M, N = 4, 6
    a, b = torch.randn(M, 0, device=device), torch.randn(0, N, device=device)
    x = {"none": None, "number": -0.75, "row": torch.randn(N, device=device),
         "full": torch.randn(M, N, device=device)}[bias]
    out = poisoned((M, N), torch.float32, device)
    gemm(a, b, config=SMALLEST, bias=x, beta=2.0, activation=activation, out=out)
    ref = act_ref(torch.zeros(M, N, dtype=torch.float64) + (0.0 if x is None else 2.0 * (
        x.double().cpu() if isinstance(x, torch.Tensor) else x)), activation)
    assert torch.allclose(out.double().cpu(), ref, atol=1e-6)


def test_zero_batch(device):
    a, b = torch.randn(0, 3, 4, device=device), torch.randn(0, 4, 5, device=device)
    assert gemm(a, b, config=SMALLEST).shape == (0, 3, 5)


# --- the family interface ------------------------------------------------------------------------

PROBLEMS = [
    GemmProblem("mm", 1, 17, 5, 67, "float32"),
    GemmProblem("addmm", 1, 5, 17, 40, "float16", "col", "row", "full", "none"),
    GemmProblem("addmm", 1, 33, 16, 24, "bfloat16", "row", "strided", "scalar", "relu"),
    GemmProblem("linear", 1, 9, 31, 48, "float16", "row", "col", "row", "gelu_tanh"),
    GemmProblem("linear", 1, 1, 24, 16, "float32", "row", "col", "row", "silu"),
    GemmProblem("bmm", 1, 7, 9, 11, "float32", "col", "col"),
    GemmProblem("bmm", 3, 12, 5, 19, "bfloat16"),
    GemmProblem("baddbmm", 2, 16, 8, 32, "float16", "row", "row", "full", "silu"),
    GemmProblem("baddbmm", 2, 6, 21, 8, "float32", "strided", "col", "col", "none"),
]


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: f"{p.op}-{p.dtype}-{p.bias}-{p.activation}")
def test_family_known_configs_match_reference(device, problem):
    """Every op through the family: its own reference (torch's op) and known configurations."""
    inputs = GEMM.make_inputs(problem, device, seed=1)
    a, b, bias = inputs
    assert gemm_problem(a, b, bias=bias, activation=problem.activation, op=problem.op) == problem
    ref = GEMM.reference(problem, inputs)
    limits = device_limits(device)
    known = GEMM.known_configs(problem, limits)
    assert known
    for config in known[:2] + known[-1:]:  # the first and the last (a SPLIT_K variant if any)
        out = poisoned(ref.shape, ref.dtype, device)
        GEMM.launch(config, problem, inputs, out=out)
        err = relative_error(out, ref)
        assert err <= GEMM.tolerance(problem), f"{config}: {err}"


def test_family_random_valid_configs(device):
    """A deterministic sample of the valid space of a small problem, each verified."""
    problem = GemmProblem("addmm", 1, 37, 45, 70, "float16", "row", "col", "row", "relu")
    valid = GEMM.valid_configs(problem, device_limits(device))
    assert any(c["SPLIT_K"] > 1 for c in valid)
    sample = random.Random(7).sample(valid, 6)
    inputs = GEMM.make_inputs(problem, device)
    ref = GEMM.reference(problem, inputs)
    for config in sample:
        out = poisoned(ref.shape, ref.dtype, device)
        GEMM.launch(config, problem, inputs, out=out)
        assert relative_error(out, ref) <= GEMM.tolerance(problem), str(config)


def test_reference_uses_alpha_beta(device):
    problem = GemmProblem("addmm", 1, 6, 7, 8, "float32", bias="full")
    a, b, bias = GEMM.make_inputs(problem, device)
    ref = GEMM.reference(problem, (a, b, bias, 0.5, 3.0))
    assert torch.allclose(ref.cpu(), torch.addmm(bias, a, b, alpha=0.5, beta=3.0).cpu())
    out = GEMM.launch(SMALLEST, problem, (a, b, bias, 0.5, 3.0))
    assert relative_error(out, ref) <= 1e-5


def test_make_inputs_layouts(device):
    p = GemmProblem("baddbmm", 2, 5, 6, 7, "bfloat16", "col", "strided", "full")
    a, b, bias = GEMM.make_inputs(p, device)
    assert a.shape == (2, 5, 7) and b.shape == (2, 7, 6) and bias.shape == (2, 5, 6)
    assert a.stride(-2) == 1 and b.stride(-1) == 2 and a.dtype == torch.bfloat16
    a2, _, _ = GEMM.make_inputs(p, device)
    assert torch.equal(a, a2)  # seeded


def test_gemm_problem_fields():
    a = torch.randn(4, 10, 6)
    b = torch.randn(4, 8, 6).transpose(1, 2)
    p = gemm_problem(a, b, bias=torch.randn(10, 1), activation="silu", op="baddbmm")
    assert p == GemmProblem("baddbmm", 4, 10, 8, 6, "float32", "row", "col", "col", "silu", p.precision)
    assert gemm_problem(a[0, :, ::2], b[0, ::2], op="mm").a_layout == "strided"
    assert gemm_problem(a[0], b[0], bias=2.0).bias == "scalar"
    assert gemm_problem(a[0], b[0], bias=torch.randn(8)).bias == "row"
    assert gemm_problem(a[0], b[0], bias=torch.randn(10, 8)).bias == "full"
    assert gemm_problem(a[0].half(), b[0].half()).precision == "ieee"
    with pytest.raises(UnsupportedProblem):
        gemm_problem(a.double(), b.double())
    with pytest.raises(ValueError):
        GemmProblem("conv", 1, 1, 1, 1, "float32")
    assert GEMM.problem_from_dict(GEMM.problem_to_dict(p)) == p
    assert GEMM.flops(p) == 2 * 4 * 10 * 8 * 6


def test_precision_follows_torch_setting(device, monkeypatch):
    """float32 dots get input_precision "ieee" under "highest" and "tf32" otherwise (the interpreter
    ignores the setting, so the argument passed to the kernel is what is checked)."""
    seen = []
    real = gemm_mod._gemm_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kw):
                seen.append((kw["PRECISION"], kw["UPCAST"]))
                return real[grid](*args, **kw)
            return run

    monkeypatch.setattr(gemm_mod, "_gemm_kernel", Spy())
    a, b = torch.randn(5, 8, device=device), torch.randn(8, 3, device=device)
    before = torch.get_float32_matmul_precision()
    try:
        for setting, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            gemm(a, b, config=SMALLEST)
            assert seen[-1][0] == want
            assert gemm_problem(a, b).precision == want
        torch.set_float32_matmul_precision("highest")
        gemm(a, b, config=SMALLEST, precision="tf32")
        assert seen[-1][0] == "tf32"
        problem = GemmProblem("mm", 1, 5, 3, 8, "float32", precision="tf32")
        GEMM.launch(SMALLEST, problem, (a, b, None))
        assert seen[-1][0] == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    gemm(a.bfloat16(), b.bfloat16(), config=SMALLEST)
    assert seen[-1][1] == (gemm_mod._compat.UPCAST_BF16_DOT)
    gemm(a.half(), b.half(), config=SMALLEST)
    assert seen[-1][1] is False


def test_int64_indexing_path(device, monkeypatch):
    """Offsets switch to int64 past 2**31 elements; forced here by lowering the threshold."""
    monkeypatch.setattr(gemm_mod, "_INT32_MAX", 0)
    a, b = make((19, 33), "col", torch.float32, device), make((33, 21), "row", torch.float32, device)
    bias = torch.randn(21, device=device)
    for config in (SMALLEST, SPLIT):
        out = poisoned((19, 21), torch.float32, device)
        gemm(a, b, config=config, bias=bias, out=out)
        assert_close(out, ref64(a, b, bias), torch.float32)


def test_errors(device):
    a = torch.randn(4, 5, device=device)
    with pytest.raises(UnsupportedProblem):
        gemm(a, torch.randn(5, 3, device=device).half(), config=SMALLEST)
    with pytest.raises(UnsupportedProblem):
        gemm(a.double(), torch.randn(5, 3, device=device).double(), config=SMALLEST)
    with pytest.raises(UnsupportedProblem):
        gemm(a[None, None], torch.randn(5, 3, device=device), config=SMALLEST)
    with pytest.raises(ValueError):
        gemm(a, torch.randn(6, 3, device=device), config=SMALLEST)
    with pytest.raises(ValueError):
        gemm(a, torch.randn(5, 3, device=device), config=SMALLEST, out=torch.empty(3, 4, device=device))
    with pytest.raises(ValueError):
        gemm(a, torch.randn(5, 3, device=device), config=SMALLEST, activation="tanh")
    with pytest.raises(ValueError):
        gemm(a, torch.randn(5, 3, device=device), config=SMALLEST, bias=torch.randn(2, device=device))
    with pytest.raises(ValueError):
        gemm(torch.randn(2, 4, 5, device=device), torch.randn(3, 5, 3, device=device), config=SMALLEST)


# --- the space -----------------------------------------------------------------------------------

BIG = GemmProblem("mm", 1, 4096, 4096, 4096, "float16")


def entries(configs):
    return {(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_stages"], c["num_warps"]) for c in configs}


def test_space_contains_well_known_lists():
    sp = GEMM.space(BIG)
    for bm, bn, bk, s, w in gemm_space.INDUCTOR_MM + gemm_space.TRITON_TUTORIAL:
        assert bm in sp["BLOCK_M"] and bn in sp["BLOCK_N"] and bk in sp["BLOCK_K"]
        assert s in sp["num_stages"] and w in sp["num_warps"] and 8 in sp["GROUP_M"]


def test_known_configs_contain_inductor_list():
    for limits in (CPU_INTERPRETER, H100, A100):
        known = GEMM.known_configs(BIG, limits)
        have = entries(known)
        for e in gemm_space.INDUCTOR_MM:
            config = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_stages", "num_warps"), e),
                          GROUP_M=8, SPLIT_K=1, TMA=0)
            if GEMM.check(config, BIG, limits) is None:
                assert e in have, (limits.name, e)
        assert len(set(known)) == len(known)
        assert all(GEMM.check(c, BIG, limits) is None for c in known)
    assert (128, 128, 128, 4, 8) in entries(GEMM.known_configs(BIG, CPU_INTERPRETER))  # no smem limit
    assert (128, 128, 128, 4, 8) not in entries(GEMM.known_configs(BIG, H100))  # 262144 B
    assert (64, 128, 128, 4, 4) in entries(GEMM.known_configs(BIG, H100))  # 196608 B
    assert (64, 128, 128, 4, 4) not in entries(GEMM.known_configs(BIG, A100))


def test_known_configs_fitted_to_small_problems():
    p = GemmProblem("mm", 1, 5, 17, 67, "float32")
    known = GEMM.known_configs(p, CPU_INTERPRETER)
    assert known and all(c["BLOCK_M"] == 16 and c["BLOCK_N"] <= 32 and c["BLOCK_K"] <= 128 for c in known)
    assert all(GEMM.check(c, p, CPU_INTERPRETER) is None for c in known)


def test_known_configs_tma_and_split_k():
    skinny = GemmProblem("linear", 1, 16, 4096, 11008, "bfloat16", "row", "col", "row")
    hopper = GEMM.known_configs(skinny, H100)
    assert hopper[0]["TMA"] == 1 and any(c["TMA"] == 0 for c in hopper)
    assert any(c["SPLIT_K"] > 1 for c in hopper)
    assert all(c["TMA"] == 0 for c in GEMM.known_configs(skinny, A100))
    assert all(c["SPLIT_K"] == 1 for c in GEMM.known_configs(BIG, H100))  # plenty of tiles


def test_check_shared_memory_against_fake_gpus():
    c = cfg(128, 128, 128, warps=8, stages=4)  # 262144 B in fp16
    assert GEMM.check(c, BIG, H100) is not None and GEMM.check(c, BIG, A100) is not None
    assert GEMM.check(c, BIG, CPU_INTERPRETER) is None
    c = cfg(64, 128, 128, warps=4, stages=4)  # 196608 B
    assert GEMM.check(c, BIG, H100) is None and GEMM.check(c, BIG, A100) is not None
    c = cfg(128, 128, 64, warps=8, stages=5)  # 163840 B: fits both
    assert GEMM.check(c, BIG, H100) is None and GEMM.check(c, BIG, A100) is None
    big32 = GemmProblem("mm", 1, 4096, 4096, 4096, "float32")
    assert GEMM.check(c, big32, A100) is not None  # twice the bytes in float32
    for config in GEMM.valid_configs(BIG, A100):
        smem = config["num_stages"] * (config["BLOCK_M"] + config["BLOCK_N"]) * config["BLOCK_K"] * 2
        assert smem <= A100.smem_per_block


def test_check_rules():
    p = GemmProblem("mm", 1, 20, 300, 40, "float16")
    assert GEMM.check(cfg(32, 64, 32), p, H100) is None
    assert "larger" in GEMM.check(cfg(64, 64, 32), p, H100)  # BLOCK_M 64 > 32 >= M
    assert GEMM.check(cfg(32, 64, 64), p, H100) is None  # 64 == next_pow2(40)
    assert GEMM.check(cfg(32, 64, 128), p, H100) is not None
    assert GEMM.check(cfg(16, 16, 16, warps=8), p, H100) is not None  # more warps than MMA tiles
    assert GEMM.check(cfg(256, 256, 16, warps=4), BIG, H100) is not None  # 512 accumulator registers
    assert GEMM.check(cfg(32, 64, 16, stages=5), p, H100) is not None  # 3 K iterations, 5 stages
    assert GEMM.check(cfg(32, 64, 16, sk=4), p, H100) is not None  # K / 4 = 10 < 16
    assert GEMM.check(cfg(32, 64, 16, gm=1), GemmProblem("mm", 1, 20, 300, 40, "float16"), H100) is not None
    aligned = GemmProblem("mm", 1, 20, 320, 40, "float16")
    assert GEMM.check(cfg(32, 64, 16, tma=1), aligned, A100) is not None  # no TMA before Hopper
    assert GEMM.check(cfg(32, 64, 16, tma=1), aligned, H100) is None
    assert GEMM.check(cfg(32, 64, 16, tma=1), p, H100) is not None  # B rows of 600 bytes
    odd = GemmProblem("mm", 1, 20, 320, 41, "float16")
    assert GEMM.check(cfg(32, 64, 16, tma=1), odd, H100) is not None  # A rows of 82 bytes
    assert GEMM.check({"BLOCK_M": 16}, p, H100) is not None
    skinny = GemmProblem("mm", 1, 16, 4096, 11008, "float16")
    assert GEMM.check(cfg(16, 128, 64, sk=2), skinny, H100) is None
    assert GEMM.check(cfg(16, 128, 64, sk=2), BIG, H100) is not None  # enough tiles already


def test_valid_configs_are_in_space_and_pass_check():
    p = GemmProblem("mm", 1, 100, 70, 300, "bfloat16", "col", "row")
    sp = GEMM.space(p)
    valid = GEMM.valid_configs(p, H100)
    assert valid
    for c in valid:
        assert all(c[k] in v for k, v in sp.items())
    assert len(set(valid)) == len(valid)


def test_determinism_excludes_split_k(device):
    skinny = GemmProblem("mm", 1, 16, 4096, 11008, "float16")
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert GEMM.space(skinny)["SPLIT_K"] == (1,)
        assert GEMM.check(cfg(16, 128, 64, sk=2), skinny, H100) is not None
        assert all(c["SPLIT_K"] == 1 for c in GEMM.known_configs(skinny, H100))
        assert all(c["SPLIT_K"] == 1 for c in GEMM.valid_configs(skinny, CPU_INTERPRETER))
        a, b = torch.randn(4, 64, device=device), torch.randn(64, 5, device=device)
        with pytest.raises(InvalidConfig):  # a SPLIT_K winner tuned earlier must not run now
            gemm(a, b, config=SPLIT)
        assert_close(gemm(a, b, config=SMALLEST), ref64(a, b), torch.float32)
    finally:
        torch.use_deterministic_algorithms(before)
    assert max(GEMM.space(skinny)["SPLIT_K"]) == 16


@pytest.mark.parametrize("shape", [(None, 1, 1, 1), (None, 17, 5, 67), (3, 5, 17, 33)], ids=str)
def test_split_k_partials_fill_their_own_workspace_slice(device, shape):
    """SPLIT_K > 1: split s stores its fp32 partial (K blocks s, s + SPLIT_K, ...) into slice s of a
    (batch, SPLIT_K, M, N) workspace and the epilogue adds the slices up: a workspace full of NaN (what an
    ``empty`` may hold) is overwritten everywhere, splits with no K left included."""
    batch, M, N, K = shape
    lead = (batch,) if batch else ()
    a, b = torch.randn(*lead, M, K, device=device), torch.randn(*lead, K, N, device=device)
    bias = torch.randn(N, device=device)
    out, launches = gemm_mod._plan(a, b, SPLIT, bias, 1.0, 1.0, "relu", None, None, None)
    ws = launches[0][2][2]
    assert tuple(ws.shape) == (batch or 1, SPLIT["SPLIT_K"], M, N) and ws.dtype == torch.float32
    ws.fill_(float("nan"))
    for kernel, grid, args, consts, warps, stages in launches:
        kernel[grid](*args, **consts, num_warps=warps, num_stages=stages)
    assert_close(out, ref64(a, b, bias, activation="relu"), torch.float32)
    blocks = torch.arange(K, device=device) // SPLIT["BLOCK_K"] % SPLIT["SPLIT_K"]
    for s in range(SPLIT["SPLIT_K"]):
        sel = blocks == s
        if sel.any():
            assert_close(ws[:, s], ref64(a[..., sel], b[..., sel, :]).reshape(batch or 1, M, N), torch.float32)
        else:   # nothing of K left for this split: zeros
            assert torch.equal(ws[:, s].cpu(), torch.zeros(batch or 1, M, N))


def test_config_json_round_trip(device):
    p = GemmProblem("mm", 1, 16, 4096, 11008, "float16", "row", "col")
    for c in GEMM.known_configs(p, H100):
        assert Config.from_json(c.to_json()) == c
    c = Config.from_json(SPLIT.to_json())
    a, b = make((7, 40), "row", torch.float32, device), make((40, 9), "row", torch.float32, device)
    assert torch.equal(gemm(a, b, config=c), gemm(a, b, config=SPLIT.as_dict()))


def test_tolerances():
    p = GemmProblem("mm", 1, 8, 8, 8, "float32")
    assert GEMM.tolerance(p) < GEMM.tolerance(GemmProblem("mm", 1, 8, 8, 8, "float32", precision="tf32"))
    assert GEMM.tolerance(GemmProblem("mm", 1, 8, 8, 8, "float16")) <= GEMM.tolerance(
        GemmProblem("mm", 1, 8, 8, 8, "bfloat16"))


# --- realistic sizes on a GPU --------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("problem", [
    GemmProblem("mm", 1, 4096, 4096, 4096, "float16"),
    GemmProblem("linear", 1, 16, 4096, 11008, "bfloat16", "row", "col", "row", "gelu_tanh"),
    GemmProblem("linear", 1, 2048, 4096, 11008, "float16", "row", "col", "row", "silu"),
    GemmProblem("addmm", 1, 1000, 1000, 1000, "float32", "col", "row", "full", "relu"),
    GemmProblem("mm", 1, 4095, 4097, 511, "bfloat16", "row", "row"),
    GemmProblem("baddbmm", 8, 512, 384, 1024, "float16", "row", "col", "full", "none"),
    GemmProblem("bmm", 16, 128, 128, 4096, "bfloat16", "col", "row"),
], ids=lambda p: f"{p.op}-{p.M}x{p.N}x{p.K}-{p.dtype}")
def test_gpu_known_configs_realistic(problem):
    """Known configurations compile within the device's limits and match cuBLAS (all of them for 16-bit
    dtypes; the first 12 for float32, whose "ieee" dots compile slowly)."""
    inputs = GEMM.make_inputs(problem, "cuda")
    ref = GEMM.reference(problem, inputs)
    known = GEMM.known_configs(problem, device_limits("cuda"))
    for config in known if problem.dtype != "float32" else known[:12]:
        out = poisoned(ref.shape, ref.dtype, "cuda")
        GEMM.launch(config, problem, inputs, out=out)
        err = relative_error(out, ref)
        assert err <= GEMM.tolerance(problem), f"{config}: {err}"


@pytest.mark.gpu
def test_gpu_valid_space_sample_compiles():
    """check() keeps out what cannot run: a sample of the valid space compiles and is correct."""
    problem = GemmProblem("addmm", 1, 1536, 1024, 2048, "float16", "row", "col", "row", "relu")
    limits = device_limits("cuda")
    valid = GEMM.valid_configs(problem, limits)
    inputs = GEMM.make_inputs(problem, "cuda")
    ref = GEMM.reference(problem, inputs)
    for config in random.Random(0).sample(valid, min(48, len(valid))):
        out = poisoned(ref.shape, ref.dtype, "cuda")
        GEMM.launch(config, problem, inputs, out=out)
        assert relative_error(out, ref) <= GEMM.tolerance(problem), str(config)


@pytest.mark.gpu
def test_gpu_float32_precision_is_real():
    a, b = torch.randn(512, 1024, device="cuda"), torch.randn(1024, 512, device="cuda")
    ref = a.double() @ b.double()
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        ieee = relative_error(gemm(a, b, config=cfg(64, 64, 32)), ref)
        torch.set_float32_matmul_precision("high")
        tf32 = relative_error(gemm(a, b, config=cfg(64, 64, 32)), ref)
    finally:
        torch.set_float32_matmul_precision(before)
    assert ieee < 1e-5 < tf32 < 1e-2


@pytest.mark.gpu
def test_gpu_other_device_and_stream():
    """Launches on the tensors' device and on PyTorch's current stream."""
    a, b = torch.randn(256, 384, device="cuda", dtype=torch.float16), torch.randn(384, 320, device="cuda",
                                                                                   dtype=torch.float16)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        r = gemm(a, b, config=cfg(64, 64, 32))
    s.synchronize()
    assert relative_error(r, a.double() @ b.double()) < TOL[torch.float16]
    if torch.cuda.device_count() > 1:
        a1, b1 = a.to("cuda:1"), b.to("cuda:1")
        r1 = gemm(a1, b1, config=cfg(64, 64, 32))
        assert r1.device == a1.device
        assert relative_error(r1.cpu(), (a.double() @ b.double()).cpu()) < TOL[torch.float16]


@pytest.mark.gpu
def test_gpu_tma_path_on_hopper():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need Hopper")
    for a_l, b_l in (("row", "row"), ("row", "col"), ("col", "row"), ("col", "col")):
        a, b = make((1000, 2048), a_l, torch.bfloat16, "cuda"), make((2048, 1032), b_l, torch.bfloat16, "cuda")
        for config in (cfg(128, 128, 64, warps=8, stages=3, tma=1), cfg(64, 64, 64, tma=1, sk=2)):
            assert_close(gemm(a, b, config=config), ref64(a, b), torch.bfloat16)



def test_tma_path_taken_when_aligned(device, monkeypatch):
    """TMA=1 reads through tensor descriptors when strides allow (the interpreter emulates them) and
    falls back to pointers otherwise, with the same results."""
    seen = []
    real = gemm_mod._gemm_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kw):
                seen.append(kw["USE_TMA"])
                return real[grid](*args, **kw)
            return run

    monkeypatch.setattr(gemm_mod, "_gemm_kernel", Spy())
    usable = gemm_mod._tma_usable(torch.device(device))
    for (M, N, K), layout, want in (((20, 24, 40), "col", usable), ((1, 24, 32), "row", usable),
                                    ((20, 24, 41), "col", False), ((20, 24, 40), "strided", False)):
        a, b = make((M, K), "row", torch.float16, device), make((K, N), layout, torch.float16, device)
        assert_close(gemm(a, b, config=TMA), ref64(a, b), torch.float16)
        assert seen[-1] == want


def test_bench_kernels_smoke(tmp_path, monkeypatch):
    """The benchmark's CPU smoke mode runs (so CI runs it) and writes its JSON and CSV with the machine."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(__import__("sys").modules, "bench_kernels", bench)
    spec.loader.exec_module(bench)
    argv = ["--smoke", "--workers", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    (jpath,) = tmp_path.glob("*.json")
    data = json.loads(jpath.read_text())
    assert {"gpu", "torch", "triton", "date"} <= set(data["meta"])
    gemm_rows = [r for r in data["rows"] if r["family"] == "gemm"]
    assert gemm_rows and all(r["n_wrong"] == 0 and r["known_config"] for r in gemm_rows)
    assert list(tmp_path.glob("*.csv"))


@pytest.mark.parametrize("name", ["smallest", "split4"])
def test_out_may_be_the_bias(device, name):
    """In-place addmm (out is the full bias): each element's bias is read before it is overwritten."""
    a, b = make((21, 30), "row", torch.float32, device), make((30, 19), "col", torch.float32, device)
    c = torch.randn(21, 19, device=device)
    ref = ref64(a, b, c, 0.5, 2.0)
    gemm(a, b, config=CONFIGS[name], bias=c, alpha=0.5, beta=2.0, out=c)
    assert_close(c, ref, torch.float32)


# Compiles the kernel for real GPUs (sm_90 and sm_80) without one: Triton ships ptxas. Runs in a child
# process because this one interprets kernels. Prints one JSON list of (name, shared bytes, formula bytes).
_AOT_SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from torchtune_ops.kernels import gemm as G

def build(kernel, pointers, const, ones=()):
    sig, attrs = {}, {}
    const = dict({p.name: p._param.default for p in kernel.params   # constexprs left at their defaults
                  if p.is_constexpr and p._param.default is not p._param.empty}, **const)
    for i, n in enumerate(kernel.arg_names):
        if n in const or n in ones:
            sig[n] = "constexpr"
        elif n in pointers:
            sig[n] = pointers[n]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in ("alpha", "beta", "bias_value"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(kernel, sig, dict(const, **{n: 1 for n in ones}), attrs)

CASES = [  # name, capability, dtype, BM, BN, BK, warps, stages, SPLIT_K, TMA, A_ROW, B_ROW, EVEN_K, BIAS, ACT, INDEX_64
    ("tma-col-col-bf16-split2-full-gelu", 90, "bf16", 128, 128, 64, 8, 3, 2, True, False, False, True, 5, 2, False),
    ("tma-row-col-fp16-row-silu", 90, "fp16", 128, 256, 64, 8, 3, 1, True, True, False, True, 3, 3, False),
    ("ptr-col-row-fp16-oddk-int64", 90, "fp16", 64, 128, 32, 4, 4, 1, False, False, True, False, 4, 1, True),
    ("ptr-row-col-fp32-tf32-split4", 80, "fp32", 64, 64, 32, 4, 3, 4, False, True, False, False, 2, 0, False),
]
out = []
for name, cap, dt, bm, bn, bk, warps, stages, sk, tma, a_row, b_row, even_k, bias, act, i64 in CASES:
    const = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SPLIT_K=sk, EVEN_K=even_k, A_ROW=a_row,
                 A_COL=not a_row, B_ROW=b_row, B_COL=not b_row, BIAS=bias, ACT=act,
                 PRECISION="tf32", UPCAST=False, USE_TMA=tma, INDEX_64=i64)
    ones = ("stride_ak" if a_row else "stride_am", "stride_bn" if b_row else "stride_bk")
    ptrs = {"a_ptr": "*" + dt, "b_ptr": "*" + dt, "bias_ptr": "*" + dt, "c_ptr": "*" + ("fp32" if sk > 1 else dt)}
    k = triton.compile(build(G._gemm_kernel, ptrs, const, ones), target=GPUTarget("cuda", cap, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    es = 4 if dt == "fp32" else 2
    out.append((name, k.metadata.shared, stages * (bm * bk + bk * bn) * es))
const = dict(BLOCK_M=64, BLOCK_N=64, BIAS=5, ACT=2, INDEX_64=False, SPLIT_K=2)
triton.compile(build(G._splitk_epilogue_kernel, {"ws_ptr": "*fp32", "c_ptr": "*bf16", "bias_ptr": "*bf16"}, const),
               target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
print(json.dumps(out))
"""


def test_kernel_compiles_for_hopper_and_ampere(tmp_path):
    """The kernel compiles for sm_90 (TMA and pointer paths) and sm_80 with the Triton at hand, and the
    shared memory it really takes is within what check() assumes (plus barriers)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == 4
    for name, shared, formula in results:
        assert 0 < shared <= formula + 256, (name, shared, formula)


@pytest.mark.parametrize("name", ["smallest", "split4", "tma"])
def test_expanded_operands(device, name):
    """Stride-0 rows or columns (expand()ed operands) are read as they are."""
    a = torch.randn(1, 32, dtype=torch.float16, device=device).expand(9, 32)
    b = torch.randn(32, 1, dtype=torch.float16, device=device).expand(32, 24)
    out = poisoned((9, 24), torch.float16, device)
    gemm(a, b, config=CONFIGS[name], out=out)
    assert_close(out, ref64(a, b), torch.float16)


# --- space rules for Hopper (issue 18); each rule's reason is in gemm_space.check ---------------------

def test_no_two_warp_tiles_on_hopper():
    """wgmma needs a warpgroup: on Hopper 2 warps are kept only for tiles too small for 4."""
    assert GEMM.check(cfg(64, 64, 32, warps=2), BIG, H100) is not None
    assert GEMM.check(cfg(64, 64, 32, warps=2), BIG, A100) is None
    assert GEMM.check(cfg(64, 64, 32, warps=4), BIG, H100) is None
    tiny = GemmProblem("mm", 1, 3, 5, 7, "float16")
    assert GEMM.check(cfg(16, 16, 16, warps=2), tiny, H100) is None  # 16x16: too small for 4 warps
    for p in (BIG, GemmProblem("linear", 1, 16, 11008, 4096, "bfloat16", "row", "col"),
              GemmProblem("mm", 1, 1000, 1000, 1000, "float32")):
        assert all(c["num_warps"] >= 4 for c in GEMM.valid_configs(p, H100) if c["BLOCK_M"] * c["BLOCK_N"] >= 512)
        assert all(c["num_warps"] >= 4 for c in GEMM.known_configs(p, H100))
        assert any(c["num_warps"] == 2 for c in GEMM.valid_configs(p, A100))
    assert GEMM.known_configs(tiny, H100)  # never an empty list


@pytest.mark.parametrize("M", [1, 7, 16])
def test_decode_shapes_try_split_k_early(M):
    """For M <= 16 the first split-K configuration is among the first few known ones (a short tuning
    budget reaches it); larger M keeps split-K at the end."""
    for limits in (H100, A100, CPU_INTERPRETER):
        known = GEMM.known_configs(GemmProblem("linear", 1, M, 11008, 4096, "bfloat16", "row", "col"), limits)
        first = next(i for i, c in enumerate(known) if c["SPLIT_K"] > 1)
        assert first <= 3, (limits.name, first)
    mid = GEMM.known_configs(GemmProblem("mm", 1, 64, 2048, 8192, "float16"), H100)
    splits = [i for i, c in enumerate(mid) if c["SPLIT_K"] > 1]
    assert splits and min(splits) > 12


def test_float32_highest_keeps_tiles_that_fit_registers():
    """IEEE float32 runs on FMA units: no descriptors (they spill at every tile) and at most 64
    accumulator registers a thread; tf32 (tensor cores) keeps both."""
    ieee = GemmProblem("mm", 1, 2048, 2048, 2048, "float32", precision="ieee")
    tf32 = GemmProblem("mm", 1, 2048, 2048, 2048, "float32", precision="tf32")
    assert GEMM.check(cfg(128, 128, 32, warps=4, stages=3), ieee, A100) is not None  # 128 registers
    assert GEMM.check(cfg(128, 128, 32, warps=8, stages=3), ieee, A100) is None  # 64
    assert GEMM.check(cfg(128, 128, 32, warps=4, stages=3), tf32, A100) is None
    assert GEMM.check(cfg(64, 64, 32, tma=1), ieee, H100) is not None
    assert GEMM.check(cfg(64, 64, 32, tma=1), tf32, H100) is None
    known = GEMM.known_configs(ieee, H100)
    assert len(known) >= 12 and all(c["TMA"] == 0 for c in known)
    assert all(c["BLOCK_M"] * c["BLOCK_N"] <= 64 * 32 * c["num_warps"] for c in known)


def test_rows_not_16_byte_aligned_keep_small_tiles():
    """Odd leading dimensions in 16-bit load element by element: only small tiles (accumulator +
    operand elements a thread <= 64); 8-byte aligned rows allow up to 128, aligned rows anything."""
    odd = GemmProblem("mm", 1, 4095, 4097, 511, "float16")
    align8 = GemmProblem("mm", 1, 2048, 4100, 4100, "float16")
    assert gemm_space.vector_bytes(odd) == 2 and gemm_space.vector_bytes(align8) == 8
    assert gemm_space.vector_bytes(BIG) == 16
    big_tile = cfg(128, 128, 64, warps=4, stages=3)  # 128 + 128
    mid_tile = cfg(128, 128, 64, warps=8, stages=3)  # 64 + 64
    assert GEMM.check(cfg(128, 128, 32, warps=4, stages=3), align8, H100) is not None  # 128 + 64
    small = cfg(64, 64, 32, warps=4, stages=2)  # 32 + 32
    assert GEMM.check(big_tile, odd, H100) and GEMM.check(mid_tile, odd, H100) and not GEMM.check(small, odd, H100)
    assert GEMM.check(big_tile, align8, H100) and not GEMM.check(mid_tile, align8, H100)
    assert not GEMM.check(big_tile, BIG, H100)
    assert len(GEMM.known_configs(odd, H100)) >= 6


@pytest.mark.parametrize("lead_pad", [0, 1, 2, 4, 6])
def test_misaligned_leading_dimensions(device, lead_pad):
    """Operands viewed out of wider buffers (leading dimensions 2, 4 or 8 bytes aligned): the kernel
    is told the divisibility that holds, and the result stays right (odd sizes, batched, split-K)."""
    gen = torch.Generator(device=device).manual_seed(lead_pad)
    M, N, K = 19, 36, 44
    a = torch.randn(2, M, K + lead_pad, dtype=torch.float16, device=device, generator=gen)[..., :K]
    b = torch.randn(2, K, N + lead_pad, dtype=torch.float16, device=device, generator=gen)[..., :N]
    consts = gemm_mod._plan(a, b, cfg(16, 32, 16), None, 1.0, 1.0, "none", None, None, None)[1][0][3]
    expect = {0: (4, 4), 1: (1, 1), 2: (2, 2), 4: (1, 8), 6: (2, 2)}[lead_pad]  # A leads 44..50, B 36..42
    assert (consts["A_DIV"], consts["B_DIV"]) == expect
    for c in (cfg(16, 32, 16), cfg(32, 16, 32, sk=2)):
        out = torch.empty(2, M, N + lead_pad, dtype=torch.float16, device=device)[..., :N]
        gemm(a, b, config=c, out=out)
        assert_close(out, ref64(a, b), torch.float16)


def test_lead_div():
    assert gemm_mod._lead_div(2, 4096, 0) == 1  # Triton already specialises on 16
    assert gemm_mod._lead_div(2, 4100, 0) == 4  # 8 bytes
    assert gemm_mod._lead_div(2, 4100, 4100 * 7) == 4
    assert gemm_mod._lead_div(2, 4100, 6) == 2
    assert gemm_mod._lead_div(2, 511, 0) == 1
    assert gemm_mod._lead_div(4, 1000, 0) == 4  # 16 bytes of float32
    assert gemm_mod._lead_div(2, 1000, 1000 * 3) == 8


# --- Hopper variants of the descriptor path: persistent programs and warp specialisation --------------

@pytest.mark.parametrize("variant", [dict(PERSISTENT=1), dict(WARP_SPEC=1), dict(PERSISTENT=1, WARP_SPEC=1)],
                         ids=["persistent", "warp_spec", "both"])
@pytest.mark.parametrize("mnk", [(1, 8, 16), (37, 40, 72), (65, 33, 24), (129, 17, 40)], ids=str)
def test_descriptor_variants_odd_shapes(device, variant, mnk):
    """Correct through the interpreter (which emulates descriptors) on odd shapes: a persistent program
    walks several tiles (3 programs under the interpreter), with bias, activation and alpha/beta."""
    M, N, K = mnk
    gen = torch.Generator(device=device).manual_seed(M)
    a = torch.randn(M, K, dtype=torch.bfloat16, device=device, generator=gen)
    w = torch.randn(N, K, dtype=torch.bfloat16, device=device, generator=gen)
    bias = torch.randn(N, dtype=torch.bfloat16, device=device, generator=gen)
    c = Config.of(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=2, SPLIT_K=1, TMA=1,
                  **variant)
    launches = gemm_mod._plan(a, w.t(), c, bias, 0.5, 2.0, "silu", None, None, True)[1]
    consts = launches[0][3]
    assert consts["USE_TMA"] and consts["PERSISTENT"] == bool(variant.get("PERSISTENT"))
    if consts["PERSISTENT"]:
        assert launches[0][1][0] == min(3, -(-M // 16) * -(-N // 16))
    out = poisoned((M, N), torch.bfloat16, device)
    gemm(a, w.t(), config=c, bias=bias, alpha=0.5, beta=2.0, activation="silu", out=out)
    assert_close(out, ref64(a, w.t(), bias, 0.5, 2.0, "silu"), torch.bfloat16)


def test_persistent_falls_back_for_batches_and_split_k(device):
    """Batched or split-K launches of a persistent config run one program per tile, still correct."""
    a = torch.randn(3, 21, 32, device=device)
    b = torch.randn(3, 32, 24, device=device)
    c = Config.of(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2, SPLIT_K=1, TMA=1,
                  PERSISTENT=1)
    assert not gemm_mod._plan(a, b, c, None, 1.0, 1.0, "none", None, None, True)[1][0][3]["PERSISTENT"]
    assert_close(gemm(a, b, config=c), ref64(a, b), torch.float32)
    c2 = c.replace(SPLIT_K=2)
    assert not gemm_mod._plan(a[0], b[0], c2, None, 1.0, 1.0, "none", None, None, True)[1][0][3]["PERSISTENT"]
    assert_close(gemm(a[0], b[0], config=c2), ref64(a[0], b[0]), torch.float32)


def test_descriptor_variant_rules():
    big_ws = cfg(128, 128, 64, warps=4, stages=3, tma=1).replace(WARP_SPEC=1, PERSISTENT=0)
    assert GEMM.check(big_ws, BIG, H100) is None
    assert GEMM.check(big_ws.replace(num_warps=8), BIG, H100) is not None  # ignored with 8 warps
    assert GEMM.check(big_ws.replace(TMA=0), BIG, H100) is not None
    assert GEMM.check(big_ws.replace(BLOCK_N=256, BLOCK_M=64), BIG, H100) is not None  # does not compile
    tf32 = GemmProblem("mm", 1, 2048, 2048, 2048, "float32", precision="tf32")
    assert GEMM.check(big_ws, tf32, H100) is not None and GEMM.check(big_ws.replace(WARP_SPEC=0), tf32, H100) is None
    pers = big_ws.replace(WARP_SPEC=0, PERSISTENT=1)
    assert GEMM.check(pers, BIG, H100) is None
    assert GEMM.check(pers, GemmProblem("mm", 1, 512, 512, 4096, "float16"), H100) is not None  # 16 tiles
    assert GEMM.check(pers, GemmProblem("bmm", 4, 4096, 4096, 64, "float16"), H100) is not None
    assert GEMM.check(pers, BIG, A100) is not None  # no descriptors before Hopper
    known = GEMM.known_configs(BIG, H100)
    assert any(c["PERSISTENT"] for c in known[:16]) and any(c["WARP_SPEC"] for c in known[:16])
    assert all(c["num_warps"] == 4 for c in known if c["WARP_SPEC"])
    assert "WARP_SPEC" in GEMM.space(BIG) and "WARP_SPEC" not in GEMM.space(GemmProblem("mm", 1, 5, 7, 9, "float16"))
    assert all(set(c.as_dict()) == set(GEMM.space(BIG)) for c in known + GEMM.known_configs(BIG, A100))


def test_ampere_and_fma_fragment_caps():
    """Register rules from compiling for sm_80: mma.sync holds operand fragments in registers, so large
    tiles spill before Hopper (not on it); float32 'ieee' FMA tiles with many operand elements too."""
    bf16 = GemmProblem("bmm", 32, 1024, 1024, 128, "bfloat16", "col", "row")
    huge = cfg(128, 128, 128, warps=4, stages=2)  # 128 + 256
    assert GEMM.check(huge, bf16, A100) is not None and GEMM.check(huge, bf16, H100) is None
    assert GEMM.check(cfg(128, 128, 64, warps=4, stages=3), bf16, A100) is None  # 128 + 128
    ieee = GemmProblem("mm", 1, 2048, 2048, 2048, "float32", precision="ieee")
    assert GEMM.check(cfg(128, 32, 64, warps=4, stages=4), ieee, H100) is not None  # 80 operand elements
    assert GEMM.check(cfg(128, 64, 32, warps=8, stages=4), ieee, H100) is None  # 24
    assert len(GEMM.known_configs(ieee, A100)) >= 10 and len(GEMM.known_configs(bf16, A100)) >= 20


# --- the last few bytes of spills (issue 18): gemm_space._spill_rule ----------------------------------

IEEE = GemmProblem("mm", 1, 2048, 2048, 2048, "float32", precision="ieee")


@pytest.mark.parametrize("limits", [H100, A100, CPU_INTERPRETER])
def test_fma_tiles_of_64x64_and_more_use_8_warps(limits):
    """float32 'ieee' (FMA): 64x64 and larger tiles spilled a few bytes with 4 warps (ptxas squeezing to an
    occupancy step), not with 8; the known list keeps those tiles, over 8 warps."""
    for bm, bn, bk in ((64, 64, 32), (128, 64, 32), (64, 128, 32), (128, 32, 32)):
        assert GEMM.check(cfg(bm, bn, bk, warps=4, stages=3), IEEE, limits) is not None
        assert GEMM.check(cfg(bm, bn, bk, warps=8, stages=3), IEEE, limits) is None
    assert GEMM.check(cfg(64, 32, 32, warps=4, stages=3), IEEE, limits) is None  # 16 accumulators a thread
    # 8 warps do not spread the FMA dot's operand reads: 128x32x64 spilled on sm_80 with 4 warps and with 8
    assert GEMM.check(cfg(128, 32, 64, warps=8, stages=4), IEEE, limits) is not None
    known = GEMM.known_configs(IEEE, limits)
    tiles = {(c["BLOCK_M"], c["BLOCK_N"]) for c in known}
    assert {(128, 128), (128, 64), (64, 128), (64, 64)} <= tiles
    for c in known:
        acc = c["BLOCK_M"] * c["BLOCK_N"] // (32 * c["num_warps"])
        assert c["num_warps"] == 8 or acc <= 16, c
        assert (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] <= 64 * 128, c
    # tf32 and 16-bit types run on tensor cores: no such rule
    tf32 = dataclasses.replace(IEEE, precision="tf32")
    assert GEMM.check(cfg(128, 64, 32, warps=4, stages=3), tf32, limits) is None


@pytest.mark.parametrize("M, N, K", [(33, 65, 40), (4095, 4097, 511), (7, 129, 67)])
def test_two_byte_pieces_cap_operand_elements_a_thread(M, N, K):
    """Rows loaded in 2-byte pieces (odd leading dimensions in 16-bit): at most 32 operand elements a
    thread; the smoke problem's skinny 16x128x64/8-warp tile (36) reached 255 registers and spilled."""
    p = GemmProblem("mm", 1, M, N, K, "float16", bias="row", activation="relu")
    skinny = cfg(16, 128, 64, warps=8, stages=2)
    assert GEMM.check(skinny, p, H100) is not None and GEMM.check(skinny, p, A100) is not None
    even = dataclasses.replace(p, N=64 * (N // 64 + 1), K=64 * (K // 64 + 1))  # 16-byte rows: no cap
    assert GEMM.check(skinny, even, H100) is None and GEMM.check(skinny, even, A100) is None
    for limits in (H100, A100):
        for c in GEMM.known_configs(p, limits):
            if not c["TMA"]:
                assert (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] <= 32 * 32 * c["num_warps"], c


@pytest.mark.parametrize("M", [1, 16])
def test_hopper_pointer_path_keeps_mma_sync_tiles_narrow(M):
    """Under 64 rows Hopper uses mma.sync; on the pointer path 16x256 tiles spilled 4-8 B (decode): the
    known list keeps them through descriptors only, and the rule does not apply before Hopper."""
    p = GemmProblem("linear", 1, M, 11008, 4096, "bfloat16", "row", "col")
    wide = cfg(16, 256, 32, warps=4, stages=4)
    assert GEMM.check(wide, p, H100) is not None
    assert GEMM.check(wide.replace(TMA=1, WARP_SPEC=0, PERSISTENT=0), p, H100) is None
    assert GEMM.check(wide, p, A100) is None
    assert GEMM.check(cfg(16, 128, 32, warps=4, stages=4), p, H100) is None
    known = GEMM.known_configs(p, H100)
    assert any(c["BLOCK_N"] == 256 and c["TMA"] for c in known)
    assert not any(c["BLOCK_N"] > 128 and c["BLOCK_M"] < 64 and not c["TMA"] for c in known)
