"""The conv2d kernel family against torch.nn.functional.conv2d.

On CPU the kernels run through the Triton interpreter (tiny sizes); with a GPU the same tests run on it,
plus the @pytest.mark.gpu tests at realistic sizes.
"""
import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from torchtune_ops.errors import UnsupportedProblem
from torchtune_ops.kernels import _compat
from torchtune_ops.kernels.base import Config, DeviceLimits, device_limits, relative_error
from torchtune_ops.kernels.conv import (CONV2D, ConvProblem, _use_flat_k, conv1d, conv2d, conv_problem,
                                        resolve_padding)

H100 = DeviceLimits(name="fake-H100", smem_per_block=232448, num_sms=132, capability=(9, 0))
A100 = DeviceLimits(name="fake-A100", smem_per_block=166912, num_sms=108, capability=(8, 0))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1

    def kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


CASES = [
    Case("ones", 1, 1, 1, 1, 1, 1, 1),
    Case("primes_3x3_few_channels", 2, 3, 7, 5, 5, 3, 3, padding=1),
    Case("1x1_even_channels", 1, 16, 6, 6, 16, 1, 1),
    Case("1x1_odd_channels_stride2_pad", 1, 13, 5, 7, 7, 1, 1, stride=2, padding=1),
    Case("stride2", 2, 8, 9, 7, 12, 3, 3, stride=2, padding=1),
    Case("dilation2", 1, 6, 11, 10, 4, 3, 3, padding=2, dilation=2),
    Case("groups2", 1, 16, 7, 5, 6, 3, 3, padding=1, groups=2),
    Case("groups2_even_channels_mixed", 1, 32, 5, 6, 34, 3, 3, stride=(1, 2), padding=(1, 0), groups=2),
    Case("depthwise", 2, 8, 7, 9, 8, 3, 3, padding=1, groups=8),
    Case("depthwise_multiplier_stride2", 1, 4, 6, 6, 8, 3, 3, stride=2, padding=1, groups=4),
    Case("single_input_channel", 1, 1, 6, 5, 3, 2, 2),
    Case("same_even_kernel", 1, 5, 8, 7, 6, 4, 2, padding="same"),
    Case("same_dilated", 1, 4, 7, 7, 5, 3, 3, padding="same", dilation=2),
    Case("valid_5x5", 1, 5, 8, 8, 3, 5, 5, padding="valid"),
    Case("rect_kernel_mixed", 1, 7, 6, 9, 5, 3, 1, stride=(2, 1), padding=(2, 1), dilation=(1, 3)),
    Case("zero_batch", 0, 4, 5, 5, 4, 3, 3, padding=1),
]


def _problem(case: Case, dtype=torch.float32, layout="nchw", bias=False, activation="none"):
    x = torch.empty(case.N, case.C, case.H, case.W, dtype=dtype)
    w = torch.empty(case.K, case.C // case.groups, case.R, case.S, dtype=dtype)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    return conv_problem(x, w, bias=torch.empty(case.K) if bias else None, activation=activation,
                        **case.kwargs())


def _configs(problem: ConvProblem) -> dict[str, Config]:
    """The smallest blocks, a middle one, and the largest blocks the space allows for the problem."""
    sp = CONV2D.space(problem)
    largest = max((c for c in CONV2D.valid_configs(problem, device_limits("cpu")) if c["num_stages"] == 1
                   and c["GROUP_M"] == 8),
                  key=lambda c: (c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"], c["num_warps"]))
    return {
        "smallest": Config.of(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=2, num_stages=1),
        "middle": Config.of(BLOCK_M=min(32, sp["BLOCK_M"][-1]), BLOCK_N=16, BLOCK_K=min(32, sp["BLOCK_K"][-1]),
                            GROUP_M=8, num_warps=4, num_stages=2),
        "largest": largest,
    }


def _tolerance(dtype, precision="ieee"):
    if dtype == torch.float32:
        return 1e-5 if (precision == "ieee" or _compat.INTERPRET) else 5e-3
    return {torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]


def _inputs(case: Case, dtype, layout, device, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.N, case.C, case.H, case.W, generator=g)
    w = torch.randn(case.K, case.C // case.groups, case.R, case.S, generator=g) / math.sqrt(
        max(1, case.C // case.groups * case.R * case.S))
    b = torch.randn(case.K, generator=g) if bias else None
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    w = w.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    return x, w, None if b is None else b.to(device=device, dtype=dtype)


def _reference64(x, w, b, case: Case, activation="none"):
    """float64 result of the same (rounded) inputs: the exact answer our kernel approximates."""
    kw, x64 = case.kwargs(), x.double().cpu()
    if isinstance(case.padding, tuple) and len(case.padding) == 4:  # (top, bottom, left, right)
        top, bottom, left, right = case.padding
        kw["padding"], x64 = 0, F.pad(x64, (left, right, top, bottom))
    y = F.conv2d(x64, w.double().cpu(), None if b is None else b.double().cpu(), **kw)
    return {"none": y, "relu": torch.relu(y), "silu": F.silu(y),
            "gelu_tanh": F.gelu(y, approximate="tanh")}[activation]


def _poisoned(shape, dtype, device, layout):
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=fmt)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("which", ["smallest", "middle", "largest"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_torch_float32(case, layout, which, device):
    bias = CASES.index(case) % 2 == 0
    x, w, b = _inputs(case, torch.float32, layout, device, bias)
    ref = _reference64(x, w, b, case)
    cfg = _configs(_problem(case, layout=layout, bias=bias))[which]
    out = _poisoned(tuple(ref.shape), torch.float32, device, layout)
    y = conv2d(x, w, config=cfg, bias=b, out=out, precision="ieee", **case.kwargs())
    assert y is out
    assert relative_error(y.cpu(), ref) <= _tolerance(torch.float32), cfg
    # a fresh output follows the input's memory format, like PyTorch
    y2 = conv2d(x, w, config=cfg, bias=b, precision="ieee", **case.kwargs())
    assert y2.shape == ref.shape
    if layout == "nhwc" and case.N > 0 and case.C > 1:
        assert y2.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y2, y) or case.N == 0


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in (
    "primes_3x3_few_channels", "1x1_odd_channels_stride2_pad", "groups2_even_channels_mixed", "depthwise",
    "same_even_kernel")], ids=lambda c: c.name)
def test_dtypes(case, layout, dtype, device):
    x, w, b = _inputs(case, dtype, layout, device, bias=True, seed=1)
    ref = _reference64(x, w, b, case)
    for which, cfg in _configs(_problem(case, dtype, layout, bias=True)).items():
        out = _poisoned(tuple(ref.shape), dtype, device, layout)
        y = conv2d(x, w, config=cfg, bias=b, out=out, **case.kwargs())
        assert y.dtype == dtype
        assert relative_error(y.cpu(), ref) <= _tolerance(dtype, _compat.conv_fp32_precision()), (which, cfg)


@pytest.mark.parametrize("activation", ["none", "relu", "silu", "gelu_tanh"])
@pytest.mark.parametrize("case", [CASES[4], CASES[8]], ids=lambda c: c.name)
def test_fused_activation(case, activation, device):
    x, w, b = _inputs(case, torch.float16, "nhwc", device, bias=True, seed=2)
    ref = _reference64(x, w, b, case, activation)
    cfg = Config.of(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)
    y = conv2d(x, w, config=cfg, bias=b, activation=activation, **case.kwargs())
    assert relative_error(y.cpu(), ref) <= _tolerance(torch.float16)


def test_cases_cover_every_kernel_path():
    """The case list reaches every specialisation: flat and channel-block reduction, with and without
    the channel mask, with and without padding masks, and the depthwise kernel."""
    seen = set()
    for case in CASES:
        p = _problem(case)
        for cfg in _configs(p).values():
            if p.depthwise:
                seen.add(("depthwise", any(p.padding)))
                continue
            cg = p.C // p.groups
            flat = _use_flat_k(cg, p.R, p.S, cfg["BLOCK_K"])
            seen.add(("flat" if flat else "blocked", any(p.padding), flat or cg % cfg["BLOCK_K"] == 0))
    assert {("flat", True, True), ("flat", False, True), ("blocked", True, True), ("blocked", False, True),
            ("blocked", True, False), ("depthwise", True), ("depthwise", False)} <= seen, seen


def test_strided_views_in_and_out(device):
    """Sliced input and weight are read through their strides; a strided out is written in place."""
    case = Case("views", 2, 6, 7, 6, 5, 3, 3, padding=1)
    big_x = torch.randn(3, 9, 8, 13, device=device)
    x = big_x[1:, 2:8, :7, ::2]  # [2, 6, 7, 7] -> W = 7 with stride 2
    case = dataclasses.replace(case, W=x.shape[3])
    w = torch.randn(5, 8, 3, 3, device=device)[:, 1:7].permute(0, 1, 3, 2)  # non-contiguous [5, 6, 3, 3]
    b = torch.randn(5, device=device)
    ref = _reference64(x, w, b, case)
    holder = torch.full((2, 7, 7, 7 * 2), float("nan"), device=device)
    out = holder[:, 1:6, :, ::2]
    y = conv2d(x, w, config=Config.of(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, num_warps=4,
                                      num_stages=1), bias=b, out=out, precision="ieee", **case.kwargs())
    assert y is out
    assert relative_error(out.cpu(), ref) <= 1e-5
    assert torch.isnan(holder[:, 0]).all() and torch.isnan(holder[:, 6]).all() and torch.isnan(holder[..., 1::2]).all()


@pytest.mark.parametrize("case", [CASES[4], CASES[8]], ids=lambda c: c.name)
def test_64bit_offsets_path(case, device, monkeypatch):
    """Tensors over 2**31 elements switch image offsets to 64 bits (forced here on small tensors)."""
    from torchtune_ops.kernels import conv as kconv

    monkeypatch.setattr(kconv, "_needs_int64", lambda t: True)
    x, w, b = _inputs(case, torch.float32, "nhwc", device, bias=True)
    cfg = Config.of(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)
    y = conv2d(x, w, config=cfg, bias=b, precision="ieee", **case.kwargs())
    assert relative_error(y.cpu(), _reference64(x, w, b, case)) <= 1e-5


SPLIT_CASES = [
    Case("split_blocked", 1, 32, 5, 5, 24, 3, 3, padding=1),  # 288-long reduction over 25 pixels
    Case("split_flat_same_even", 1, 5, 6, 5, 7, 8, 8, padding="same"),  # 320 = 5 channels x 8x8 taps
    Case("split_groups_stride", 2, 64, 6, 7, 20, 3, 3, stride=2, padding=(1, 0), groups=2),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "nchw"), (torch.float32, "nhwc"),
                                          (torch.float16, "nhwc"), (torch.bfloat16, "nchw")], ids=str)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: c.name)
def test_split_k_matches_torch_and_is_deterministic(case, layout, dtype, device):
    p = _problem(case, dtype, layout, bias=True, activation="silu")
    assert CONV2D.space(p)["SPLIT_K"] == (1, 2, 4, 8, 16)
    x, w, b = _inputs(case, dtype, layout, device, bias=True, seed=5)
    ref = _reference64(x, w, b, case, "silu")
    chosen = [Config.of(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=2, num_stages=1, SPLIT_K=8),
              Config.of(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=2, SPLIT_K=2)]
    for cfg in chosen:
        assert CONV2D.check(cfg.as_dict(), p, H100) is None
        out = _poisoned(tuple(ref.shape), dtype, device, layout)
        y = conv2d(x, w, config=cfg, bias=b, activation="silu", out=out, precision="ieee", **case.kwargs())
        assert relative_error(y.cpu(), ref) <= _tolerance(dtype), cfg
    again = conv2d(x, w, config=chosen[-1], bias=b, activation="silu", precision="ieee", **case.kwargs())
    assert torch.equal(again, y)  # fixed-order reduction of the partial sums


@pytest.mark.filterwarnings("ignore:Using padding=.same.")
def test_random_problems(device):
    """Seeded random problems (every hyper-parameter, layout, dtype, activation) with a random valid config."""
    import random

    rng = random.Random(7)
    for _ in range(20):
        groups, cg, kg = rng.choice([1, 1, 2, 3]), rng.choice([1, 2, 3, 8, 17]), rng.choice([1, 3, 16, 19])
        r, s, dil = rng.choice([1, 2, 3, 5]), rng.choice([1, 3, 4]), (rng.choice([1, 2]), rng.choice([1, 3]))
        padding = rng.choice([0, 1, (2, 0), (0, 1, 2, 1), "valid", "same"])
        stride = (1, 1) if padding == "same" else (rng.choice([1, 2, 3]), rng.choice([1, 2]))
        case = Case("random", rng.choice([1, 2, 3]), cg * groups, rng.randint(dil[0] * (r - 1) + 1, 11),
                    rng.randint(dil[1] * (s - 1) + 1, 11), kg * groups, r, s, stride, padding, dil, groups)
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        layout, bias = rng.choice(["nchw", "nhwc"]), rng.random() < 0.5
        activation = rng.choice(["none", "relu", "silu", "gelu_tanh"])
        p = _problem(case, dtype, layout, bias=bias, activation=activation)
        cfg = rng.choice(CONV2D.valid_configs(p, device_limits("cpu")))
        x, w, b = _inputs(case, dtype, layout, device, bias, seed=rng.randint(0, 99))
        y = conv2d(x, w, config=cfg, bias=b, activation=activation, precision="ieee", **case.kwargs())
        assert relative_error(y.cpu(), _reference64(x, w, b, case, activation)) <= _tolerance(dtype), (case, cfg)


def test_split_k_check_and_space():
    small = _problem(SPLIT_CASES[0], torch.float16)
    ok = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
    assert CONV2D.check({**ok, "SPLIT_K": 8}, small, H100) is None  # 9 taps x 1 channel block = 9 steps
    assert CONV2D.check({**ok, "SPLIT_K": 16}, small, H100) is not None
    assert CONV2D.check({**ok, "SPLIT_K": 0}, small, H100) is not None
    assert any(c["SPLIT_K"] > 1 for c in CONV2D.known_configs(small, H100))
    big = _problem(Case("resnet", 32, 64, 56, 56, 64, 3, 3, padding=1), torch.float16, "nhwc")
    assert CONV2D.space(big)["SPLIT_K"] == (1,)
    assert CONV2D.check({**ok, "SPLIT_K": 2}, big, H100) is not None
    assert all(c["SPLIT_K"] == 1 for c in CONV2D.known_configs(big, H100))
    dw = _problem(Case("dw", 1, 16, 5, 5, 16, 17, 17, padding=8, groups=16))
    assert CONV2D.space(dw)["SPLIT_K"] == (1,)
    assert CONV2D.check({**ok, "BLOCK_K": 16, "SPLIT_K": 2}, dw, H100) is not None


def test_zero_input_channels_give_bias(device):
    x = torch.randn(2, 0, 5, 5, device=device)
    w = torch.randn(3, 0, 3, 3, device=device)
    b = torch.randn(3, device=device)
    cfg = Config.of(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=2, num_stages=1)
    y = conv2d(x, w, config=cfg, bias=b, padding=1, activation="relu")
    assert y.shape == (2, 3, 5, 5)
    assert torch.equal(y, torch.relu(b).view(1, 3, 1, 1).expand(2, 3, 5, 5))
    y = conv2d(x, w, config=cfg, padding=1)
    assert torch.equal(y, torch.zeros(2, 3, 5, 5, device=device))
    with pytest.raises(ValueError):
        conv2d(torch.randn(1, 4, 5, 5, device=device), torch.randn(0, 4, 3, 3, device=device), config=cfg)


@pytest.mark.parametrize("padding,stride,dilation,groups", [
    (0, 1, 1, 1), (2, 3, 1, 1), ("same", 1, 2, 1), ("valid", 2, 1, 2), ((1, 3), 1, 1, 4)])
def test_conv1d_through_view(padding, stride, dilation, groups, device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 11, generator=g).to(device)
    w = torch.randn(6 if groups != 4 else 8, 8 // groups, 4, generator=g).to(device)
    b = torch.randn(w.shape[0], generator=g).to(device)
    pt = (0, padding[0], padding[1]) if isinstance(padding, tuple) else padding
    xr = F.pad(x.double().cpu(), padding) if isinstance(padding, tuple) else x.double().cpu()
    ref = F.conv1d(xr, w.double().cpu(), b.double().cpu(), stride=stride,
                   padding=0 if isinstance(padding, tuple) else padding, dilation=dilation, groups=groups)
    cfg = Config.of(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=8, num_warps=2, num_stages=2)
    y = conv1d(x, w, config=cfg, bias=b, stride=stride, padding=padding, dilation=dilation, groups=groups,
               precision="ieee")
    assert y.shape == ref.shape, pt
    assert relative_error(y.cpu(), ref) <= 1e-5
    out = torch.full(tuple(ref.shape), float("nan"), device=device)
    assert conv1d(x, w, config=cfg, bias=b, stride=stride, padding=padding, dilation=dilation,
                  groups=groups, out=out, precision="ieee") is out
    assert relative_error(out.cpu(), ref) <= 1e-5


def test_resolve_padding_matches_torch():
    assert resolve_padding("same", kernel=(4, 2), stride=(1, 1), dilation=(1, 1)) == (1, 2, 0, 1)
    assert resolve_padding("same", kernel=(3, 3), stride=(1, 1), dilation=(2, 3)) == (2, 2, 3, 3)
    assert resolve_padding("valid", kernel=(3, 3), stride=(2, 2), dilation=(1, 1)) == (0, 0, 0, 0)
    assert resolve_padding((1, 2), kernel=(3, 3), stride=(1, 1), dilation=(1, 1)) == (1, 1, 2, 2)
    assert resolve_padding(3, kernel=(3, 3), stride=(1, 1), dilation=(1, 1)) == (3, 3, 3, 3)
    with pytest.raises(ValueError):
        resolve_padding("same", kernel=(3, 3), stride=(2, 1), dilation=(1, 1))
    with pytest.raises(ValueError):
        resolve_padding("full", kernel=(3, 3), stride=(1, 1), dilation=(1, 1))
    with pytest.raises(ValueError):
        resolve_padding(-1, kernel=(3, 3), stride=(1, 1), dilation=(1, 1))


def test_conv_problem_fields_and_round_trip():
    x = torch.empty(2, 6, 9, 7).to(memory_format=torch.channels_last)
    w = torch.empty(4, 3, 4, 2)
    p = conv_problem(x, w, bias=torch.empty(4), stride=1, padding="same", dilation=1, groups=2,
                     activation="silu")
    assert (p.N, p.C, p.H, p.W, p.K, p.R, p.S) == (2, 6, 9, 7, 4, 4, 2)
    assert p.padding == (1, 2, 0, 1) and p.stride == (1, 1) and p.groups == 2
    assert (p.dtype, p.layout, p.bias, p.activation) == ("float32", "nhwc", True, "silu")
    assert p.precision == _compat.conv_fp32_precision()
    assert (p.P, p.Q) == (9, 7) and p.gemm_mnk == (2 * 9 * 7, 2, 3 * 8)
    assert CONV2D.flops(p) == 2.0 * 2 * 9 * 7 * 4 * 3 * 8
    d = CONV2D.problem_to_dict(p)
    assert CONV2D.problem_from_dict(__import__("json").loads(__import__("json").dumps(d))) == p
    assert conv_problem(x.contiguous(), w, groups=2).layout == "nchw"
    assert conv_problem(x.half(), w.half(), groups=2).precision == "ieee"


def test_precision_follows_pytorch_conv_setting():
    x, w = torch.empty(1, 4, 5, 5), torch.empty(2, 4, 3, 3)
    with _compat.conv_fp32_precision_set("ieee"):
        assert conv_problem(x, w).precision == "ieee"
    with _compat.conv_fp32_precision_set("tf32"):
        assert conv_problem(x, w).precision == "tf32"
    for allow in (False, True):  # the legacy flag
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=allow):
            assert conv_problem(x, w).precision == ("tf32" if allow else "ieee")
    with _compat.conv_fp32_precision_set("none"):  # inherits: cuDNN-wide, then global, else IEEE
        old = torch.backends.fp32_precision
        try:
            torch.backends.fp32_precision = "tf32"
            assert conv_problem(x, w).precision == "tf32"
            torch.backends.fp32_precision = "ieee"
            assert conv_problem(x, w).precision == "ieee"
        finally:
            torch.backends.fp32_precision = old


def test_precision_and_bf16_workaround_reach_the_kernel():
    """The interpreter ignores TF32, so only check what the launch passes to the kernel."""
    from torchtune_ops.kernels import conv as kconv

    cfg = Config.of(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=2, num_stages=1)

    def consts(dtype, precision):
        x, w = torch.randn(1, 4, 5, 5, dtype=dtype), torch.randn(2, 4, 3, 3, dtype=dtype)
        return kconv._plan(x, w, cfg, None, 1, 1, 1, 1, "none", None, precision)[1][0][3]

    for setting in ("tf32", "ieee"):
        with _compat.conv_fp32_precision_set(setting):
            assert consts(torch.float32, None)["PRECISION"] == setting
            assert consts(torch.float32, "ieee")["PRECISION"] == "ieee"  # explicit argument wins
    assert consts(torch.bfloat16, None)["UPCAST"] is _compat.UPCAST_BF16_DOT
    assert consts(torch.float16, None)["UPCAST"] is False


def test_unsupported_inputs_raise_typed_errors(device):
    cfg = Config.of(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=2, num_stages=1)
    with pytest.raises(UnsupportedProblem):
        conv2d(torch.randn(1, 2, 4, 4, dtype=torch.float64, device=device),
               torch.randn(2, 2, 3, 3, dtype=torch.float64, device=device), config=cfg)
    with pytest.raises(UnsupportedProblem):
        conv2d(torch.randn(1, 2, 4, 4, device=device), torch.randn(2, 2, 3, 3, device=device).half(), config=cfg)
    with pytest.raises(UnsupportedProblem):
        conv_problem(torch.randn(1, 2, 4), torch.randn(2, 2, 3))
    with pytest.raises(ValueError):
        conv2d(torch.randn(1, 4, 4, 4, device=device), torch.randn(2, 3, 3, 3, device=device), config=cfg)
    with pytest.raises(ValueError):  # kernel larger than the input
        conv2d(torch.randn(1, 2, 2, 2, device=device), torch.randn(2, 2, 3, 3, device=device), config=cfg)


def test_check_rejects_over_shared_memory():
    p = _problem(Case("big", 8, 256, 28, 28, 256, 3, 3, padding=1), torch.float16, "nhwc")
    base = dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8)
    # 4 * (128*128 + 128*128) * 2 = 262144 B: over both caps
    assert CONV2D.check({**base, "BLOCK_K": 128, "num_stages": 4}, p, H100) is not None
    assert CONV2D.check({**base, "BLOCK_K": 128, "num_stages": 4}, p, A100) is not None
    # 3 * 65536 = 196608 B: fits the H100 (232448 B), not the A100 (166912 B)
    assert CONV2D.check({**base, "BLOCK_K": 128, "num_stages": 3}, p, H100) is None
    assert CONV2D.check({**base, "BLOCK_K": 128, "num_stages": 3}, p, A100) is not None
    # the interpreter models no shared memory
    assert CONV2D.check({**base, "BLOCK_K": 128, "num_stages": 4}, p, device_limits("cpu")) is None
    # float32 operands take 4 bytes: 2 * (128*64 + 64*128) * 4 = 131072 fits, 3 stages (196608) not on A100
    p32 = dataclasses.replace(p, dtype="float32")
    assert CONV2D.check({**base, "BLOCK_K": 64, "num_stages": 2}, p32, A100) is None
    assert CONV2D.check({**base, "BLOCK_K": 64, "num_stages": 3}, p32, A100) is not None
    for limits in (H100, A100):
        valid = CONV2D.valid_configs(p, limits)
        assert valid and all(c["num_stages"] * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * 2
                             <= limits.smem_per_block for c in valid)
    # (Hopper also drops 2-warp tiles: compare the rest)
    assert len([c for c in CONV2D.valid_configs(p, A100) if c["num_warps"] >= 4]) < \
        len([c for c in CONV2D.valid_configs(p, H100) if c["num_warps"] >= 4])


def test_check_blocks_registers_and_malformed():
    p = _problem(CASES[1])  # M = 70, K/groups = 5, (C/groups)*R*S = 27
    ok = dict(BLOCK_M=128, BLOCK_N=16, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
    assert CONV2D.check(ok, p, H100) is None
    assert CONV2D.check({**ok, "BLOCK_M": 256}, p, H100) is not None  # beyond next_pow2(M)
    assert CONV2D.check({**ok, "BLOCK_N": 32}, p, H100) is not None
    assert CONV2D.check({**ok, "BLOCK_K": 64}, p, H100) is not None
    assert CONV2D.check({**ok, "BLOCK_M": 48}, p, H100) is not None  # not a power of two
    assert CONV2D.check({k: v for k, v in ok.items() if k != "GROUP_M"}, p, H100) is not None
    big = _problem(Case("big", 8, 64, 56, 56, 256, 3, 3, padding=1), torch.float16)
    assert CONV2D.check(dict(BLOCK_M=1024, BLOCK_N=256, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=1),
                        big, H100) is not None  # 1024 accumulator registers per thread
    dw = _problem(CASES[8])
    assert dw.depthwise and CONV2D.space(dw)["BLOCK_K"] == (16,)
    assert CONV2D.check({**ok, "BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 32}, dw, H100) is not None


def test_known_configs_are_inductors_clamped_and_valid():
    big = _problem(Case("resnet", 32, 64, 56, 56, 64, 3, 3, padding=1), torch.float16, "nhwc")
    known = CONV2D.known_configs(big, H100)
    triples = [(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_stages"], c["num_warps"]) for c in known]
    # Inductor's conv list with BLOCK_N clamped to the 64 output channels, deduplicated, in order
    assert triples[:4] == [(64, 64, 16, 2, 4), (256, 64, 16, 2, 4), (1024, 16, 16, 1, 8), (128, 64, 32, 2, 8)]
    assert len(set(known)) == len(known)
    space = CONV2D.space(big)
    for c in known:
        assert CONV2D.check(c.as_dict(), big, H100) is None
        assert all(c[k] in space[k] for k in space)
    small = _problem(CASES[1])
    for c in CONV2D.known_configs(small, H100):
        assert c["BLOCK_M"] <= 128 and c["BLOCK_N"] == 16 and c["BLOCK_K"] <= 32
    dw = _problem(Case("dw", 32, 144, 56, 56, 144, 3, 3, padding=1, groups=144), torch.float16, "nhwc")
    known_dw, space_dw = CONV2D.known_configs(dw, A100), CONV2D.space(dw)
    assert known_dw and all(c[k] in space_dw[k] for c in known_dw for k in space_dw)
    assert all(c in CONV2D.valid_configs(dw, A100) for c in known_dw)


def test_config_round_trip():
    for c in CONV2D.known_configs(_problem(CASES[4], torch.float16), H100):
        assert Config.from_json(c.to_json()) == c
        assert hash(Config.from_json(c.to_json())) == hash(c)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", [CASES[1], CASES[7], CASES[9], CASES[11]], ids=lambda c: c.name)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_family_launch_matches_reference(case, layout, device):
    p = _problem(case, torch.float16, layout, bias=True, activation="relu")
    inputs = CONV2D.make_inputs(p, device, seed=4)
    x, w, b = inputs
    assert x.shape == (p.N, p.C, p.H, p.W) and w.shape == (p.K, p.C // p.groups, p.R, p.S) and b.shape == (p.K,)
    if layout == "nhwc":
        assert x.is_contiguous(memory_format=torch.channels_last)
    ref = CONV2D.reference(p, inputs)
    for cfg in CONV2D.known_configs(p, device_limits(device))[:2]:
        out = torch.full_like(ref, float("nan"))
        y = CONV2D.launch(cfg, p, inputs, out=out)
        assert y is out and relative_error(y, ref) <= CONV2D.tolerance(p)


# ------------------------------------------------------- ahead-of-time compilation for real GPUs, no GPU needed

_AOT_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torchtune_ops.kernels import conv

results = []
for item in json.loads(sys.stdin.read()):
    fn = getattr(conv, item["kernel"])
    sig, consts, attrs = {}, dict(item["consts"]), {}
    for i, name in enumerate(fn.arg_names):
        v = item["args"].get(name)
        if name in consts:
            sig[name] = "constexpr"
        elif isinstance(v, str):  # a tensor: its dtype; torch allocations are 16-byte aligned
            sig[name] = "*" + v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif v == 1:  # Triton specialises integer arguments equal to 1 as constants
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", item["cap"], 32),
                       options=dict(num_warps=item["num_warps"], num_stages=item["num_stages"]))
    results.append(k.metadata.shared)
print(json.dumps(results))
"""

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _aot_items(case: Case, dtype, layout, cfg: Config, cap: int, bias=True, activation="relu") -> list[dict]:
    from torchtune_ops.kernels import conv as kconv

    # planned like a launch: on the GPU when there is one, else on CPU tensors through the interpreter
    x, w, b = _inputs(case, dtype, layout, "cuda" if torch.cuda.is_available() else "cpu", bias)
    _, launches = kconv._plan(x, w, cfg, b, case.stride, case.padding, case.dilation, case.groups, activation,
                              None, None)
    items = []
    for kernel, _, args, consts, num_warps, num_stages in launches:
        if "UPCAST" in consts:  # planned in this (interpreting) process: compile what a GPU would run
            consts = {**consts, "UPCAST": False}
        names = kernel.arg_names if hasattr(kernel, "arg_names") else list(kernel.fn.__code__.co_varnames)
        values = {n: (_TRITON_DTYPE[a.dtype] if isinstance(a, torch.Tensor) else int(a)) for n, a in zip(names, args)}
        items.append(dict(kernel=kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__,
                          args=values, consts=consts, num_warps=num_warps, num_stages=num_stages, cap=cap))
    return items


def test_configs_compile_for_hopper_and_ampere_within_checked_shared_memory():
    """Compile for sm_90 and sm_80 (CPU only, through Triton's CUDA backend and ptxas): the kernels
    lower on real codegen (not only in the interpreter), and the shared memory the compiler allocates for
    configurations that ``check`` accepts stays under the device cap -- the riskiest being the accepted
    configuration with the largest estimate."""
    import json
    import os
    import subprocess
    import sys

    resnet = Case("resnet3x3", 32, 64, 56, 56, 64, 3, 3, padding=1)
    stem = Case("stem", 8, 3, 224, 224, 64, 7, 7, stride=2, padding=3)
    pointwise = Case("1x1", 8, 64, 28, 28, 96, 1, 1)
    depthwise = Case("dw", 8, 96, 28, 28, 96, 3, 3, padding=1, groups=96)
    late = Case("late_batch1", 1, 512, 7, 7, 512, 3, 3, padding=1)
    items, expect = [], []
    for cap, limits in ((90, H100), (80, A100)):
        p = _problem(resnet, torch.float16, "nhwc", bias=True, activation="relu")
        valid = CONV2D.valid_configs(p, limits)
        riskiest = max(valid, key=lambda c: c["num_stages"] * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"])
        chosen = [(resnet, torch.float16, "nhwc", CONV2D.known_configs(p, limits)[0]),
                  (resnet, torch.float16, "nhwc", riskiest)]
        if cap == 90:
            chosen += [
                (stem, torch.bfloat16, "nhwc", CONV2D.known_configs(_problem(stem, torch.bfloat16, "nhwc"), limits)[-1]),
                (pointwise, torch.float32, "nchw", CONV2D.known_configs(_problem(pointwise), limits)[-1]),
                (depthwise, torch.float16, "nhwc", CONV2D.known_configs(_problem(depthwise, torch.float16), limits)[0]),
                (late, torch.float16, "nhwc", CONV2D.known_configs(_problem(late, torch.float16, "nhwc"), limits)[-1]),
            ]
        for case, dtype, layout, cfg in chosen:
            for item in _aot_items(case, dtype, layout, cfg, cap):
                items.append(item)
                expect.append((limits, cfg))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], input=json.dumps(items), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(shared) == len(expect) >= 8  # every launch compiled (zip below would hide a short list)
    for used, (limits, cfg) in zip(shared, expect):
        assert used <= limits.smem_per_block, (limits.name, cfg, used)


# ------------------------------------------------------------------------------------ realistic, on a GPU

RESNET50_3X3 = [  # (N, C, H, W, K, stride)
    (32, 64, 56, 56, 64, 1), (32, 128, 28, 28, 128, 1), (32, 256, 14, 14, 256, 1), (32, 512, 7, 7, 512, 1),
    (1, 64, 56, 56, 64, 1), (32, 128, 56, 56, 128, 2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", RESNET50_3X3, ids=str)
def test_gpu_resnet50_layers(shape, dtype):
    n, c, h, w, k, stride = shape
    case = Case("resnet", n, c, h, w, k, 3, 3, stride=stride, padding=1)
    p = _problem(case, dtype, "nhwc", bias=True)
    inputs = CONV2D.make_inputs(p, "cuda")
    ref64 = _reference64(*inputs, case)
    limits = device_limits("cuda")
    for cfg in CONV2D.known_configs(p, limits)[:3] + CONV2D.known_configs(p, limits)[-2:]:
        out = torch.full_like(CONV2D.reference(p, inputs), float("nan"))
        y = CONV2D.launch(cfg, p, inputs, out=out)
        torch.cuda.synchronize()
        assert relative_error(y.cpu(), ref64) <= _tolerance(dtype, p.precision), cfg


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    Case("stem", 8, 3, 224, 224, 64, 7, 7, stride=2, padding=3),
    Case("1x1", 16, 256, 56, 56, 64, 1, 1),
    Case("mobilenet_dw", 16, 144, 56, 56, 144, 3, 3, padding=1, groups=144),
    Case("grouped", 8, 256, 28, 28, 256, 3, 3, padding=1, groups=32),
    Case("same_even", 4, 40, 33, 17, 24, 4, 2, padding="same"),
], ids=lambda c: c.name)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gpu_realistic_shapes(case, layout):
    p = _problem(case, torch.float16, layout, bias=True, activation="gelu_tanh")
    inputs = CONV2D.make_inputs(p, "cuda")
    ref64 = _reference64(*inputs, case, "gelu_tanh")
    for cfg in CONV2D.known_configs(p, device_limits("cuda"))[:4]:
        y = CONV2D.launch(cfg, p, inputs)
        assert relative_error(y.cpu(), ref64) <= _tolerance(torch.float16), cfg


@pytest.mark.gpu
def test_gpu_float32_precision_is_passed_through():
    """ieee keeps full float32 products; tf32 rounds the operands (visible at a large reduction)."""
    case = Case("prec", 4, 256, 14, 14, 128, 3, 3, padding=1)
    x, w, b = _inputs(case, torch.float32, "nhwc", "cuda", bias=False)
    ref = _reference64(x, w, b, case)
    cfg = Config.of(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    e_ieee = relative_error(conv2d(x, w, config=cfg, padding=1, precision="ieee").cpu(), ref)
    e_tf32 = relative_error(conv2d(x, w, config=cfg, padding=1, precision="tf32").cpu(), ref)
    assert e_ieee < 1e-5 < e_tf32 < 5e-3


@pytest.mark.gpu
def test_gpu_valid_space_sample_runs():
    """A spread of the valid space on the real device compiles and is correct (no OutOfResources)."""
    case = Case("sample", 4, 64, 28, 28, 96, 3, 3, padding=1)
    p = _problem(case, torch.float16, "nhwc")
    inputs = CONV2D.make_inputs(p, "cuda")
    ref = CONV2D.reference(p, inputs)
    valid = CONV2D.valid_configs(p, device_limits("cuda"))
    for cfg in itertools.islice(valid, 0, None, max(1, len(valid) // 24)):
        assert relative_error(CONV2D.launch(cfg, p, inputs), ref) <= CONV2D.tolerance(p), cfg


# ------------------------------------------------------------------ space rules for Hopper (issue 18)

def test_flat_loop_capped_at_four_warps():
    """The flat reduction loop (few channels: the stem) with 8 warps is what Inductor found miscompiled
    on H100 (pytorch issue 173068): check rejects it, known configs never hold it."""
    stem = _problem(Case("stem", 8, 3, 224, 224, 64, 7, 7, stride=2, padding=3), torch.float16, "nhwc")
    c8 = Config.of(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    assert _use_flat_k(3, 7, 7, 32)
    assert CONV2D.check(c8.as_dict(), stem, H100) is not None
    assert CONV2D.check(c8.replace(BLOCK_M=64, num_warps=4).as_dict(), stem, H100) is None
    for limits in (H100, A100, device_limits("cpu")):
        known = CONV2D.known_configs(stem, limits)
        assert known and all(c["num_warps"] <= 4 for c in known if _use_flat_k(3, 7, 7, c["BLOCK_K"]))
        assert all(CONV2D.check(c.as_dict(), stem, limits) is None for c in CONV2D.known_configs(stem, limits))
    # the channel-block loop (64 channels) keeps 8 warps
    resnet = _problem(Case("r", 8, 64, 28, 28, 64, 3, 3, padding=1), torch.float16, "nhwc")
    assert CONV2D.check(c8.as_dict(), resnet, H100) is None


def test_no_two_warp_tiles_on_hopper_except_depthwise():
    resnet = _problem(Case("r", 8, 64, 28, 28, 64, 3, 3, padding=1), torch.float16, "nhwc")
    c2 = Config.of(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=2, num_stages=2).as_dict()
    assert CONV2D.check(c2, resnet, H100) is not None and CONV2D.check(c2, resnet, A100) is None
    assert all(c["num_warps"] >= 4 for c in CONV2D.known_configs(resnet, H100))
    dw = _problem(Case("dw", 8, 96, 28, 28, 96, 3, 3, padding=1, groups=96), torch.float16, "nhwc")
    assert CONV2D.check(dict(c2, BLOCK_N=16, BLOCK_K=16), dw, H100) is None  # no dot: 2 warps stay
