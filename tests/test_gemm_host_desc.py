"""GEMM's descriptor-store axes (issue 18): HOST_DESC (descriptors made on the host once per launch),
TMA_STORE (the output written through a descriptor) and EPI_SUBTILE (epilogue and store on two halves
of the tile). Correct through the interpreter (which emulates descriptors, host-made ones included) on odd
shapes, dtypes, layouts, fused epilogues, persistent on and off; the same as the unbound launch bit for
bit when bound; the rules of the space; what the launcher falls back to where a tensor does not allow it.
The compiled code (TMA store in the PTX, no spills) is checked in test_compile_gate.py."""
import pytest
import torch

from torchtune_ops.kernels import _compat, gemm as gemm_mod, gemm_space
from torchtune_ops.kernels.base import Config
from torchtune_ops.kernels.gemm import GEMM, GemmProblem, gemm

from test_gemm import A100, BIG, H100, assert_close, poisoned, ref64
from test_launch import _driver_script

BASE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=2, SPLIT_K=1, TMA=1)
VARIANTS = {
    "host": dict(HOST_DESC=1),
    "store": dict(TMA_STORE=1),
    "store_subtile": dict(TMA_STORE=1, EPI_SUBTILE=1),
    "all": dict(HOST_DESC=1, TMA_STORE=1, EPI_SUBTILE=1),
    "all_persistent": dict(HOST_DESC=1, TMA_STORE=1, EPI_SUBTILE=1, PERSISTENT=1),
}
# (M, N, K, dtype, a layout, b layout, bias, activation): M odd or 1; N and K not multiples of the blocks
# but 16-byte rows (descriptors allowed), except the last case, whose rows are not (pointer fallback)
CASES = [
    (1, 8, 16, torch.float16, "row", "row", None, "none"),
    (37, 40, 72, torch.bfloat16, "row", "col", "row", "silu"),
    (68, 20, 44, torch.float32, "col", "row", "full", "gelu_tanh"),
    (129, 48, 24, torch.float16, "row", "col", "col", "relu"),
    (40, 56, 24, torch.bfloat16, "col", "col", "row", "none"),
    (5, 17, 13, torch.float16, "row", "row", "row", "none"),
]


def _config(variant: str, **over) -> Config:
    return Config.from_dict(dict(BASE, **VARIANTS[variant], **over))


def _operand(rows, cols, layout, dtype, gen):
    if layout == "col":
        return torch.randn(cols, rows, dtype=dtype, generator=gen).t()
    return torch.randn(rows, cols, dtype=dtype, generator=gen)


def _inputs(case, seed=0, device="cpu"):
    M, N, K, dtype, la, lb, bias, _ = case
    gen = torch.Generator().manual_seed(seed + M)
    a, b = _operand(M, K, la, dtype, gen), _operand(K, N, lb, dtype, gen)
    shapes = {None: None, "row": (N,), "col": (M, 1), "full": (M, N)}
    x = None if bias is None else torch.randn(shapes[bias], dtype=dtype, generator=gen)
    return tuple(None if t is None else t.to(device) for t in (a, b, x))


def _main_launch(a, b, config, bias=None, out=None):
    return gemm_mod._plan(a, b, config, bias, 0.5, 2.0, "none", out, "ieee", True)[1][0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{str(c[3])[6:]}-{c[4]}{c[5]}")
def test_descriptor_store_variants_match_torch(device, variant, case):
    """Each variant against a float64 reference (alpha, beta, bias, activation fused), the output poisoned
    beforehand; the plan shows which path ran (TMA store and host descriptors where rows allow)."""
    a, b, bias = _inputs(case, device=device)
    M, N, K, dtype, *_, activation = case
    config = _config(variant)
    leads = (K if case[4] == "row" else M, N if case[5] == "row" else K)
    aligned = all(lead * a.element_size() % 16 == 0 for lead in leads)
    _, _, args, consts, _, _ = gemm_mod._plan(a, b, config, bias, 0.5, 2.0, activation, None, "ieee", True)[1][0]
    v = VARIANTS[variant]
    assert consts["USE_TMA"] == aligned
    assert consts["TMA_STORE"] == bool(v.get("TMA_STORE") and consts["USE_TMA"])
    assert consts["EPI_SPLIT"] == (2 if v.get("EPI_SUBTILE") and consts["TMA_STORE"] else 1)
    assert consts["HOST_DESC"] == bool(v.get("HOST_DESC") and consts["USE_TMA"])
    n_desc = sum(isinstance(x, _compat.TensorDescriptor) for x in args[:3])
    assert n_desc == (2 + consts["TMA_STORE"] if consts["HOST_DESC"] else 0)
    out = poisoned((M, N), dtype, device)
    gemm(a, b, config=config, bias=bias, alpha=0.5, beta=2.0, activation=activation, out=out,
         precision="ieee")
    assert_close(out, ref64(a, b, bias, 0.5, 2.0, activation), dtype)


@pytest.mark.parametrize("variant", ["store", "all"])
def test_tma_store_clips_at_the_output_edge(device, variant):
    """A TMA store into a window of a wider buffer (leading dimension 64, N = 40) writes the window only."""
    a, b, _ = _inputs((37, 40, 72, torch.float16, "row", "row", None, "none"), device=device)
    buf = poisoned((40, 64), torch.float16, device)
    out = buf[:37, :40]
    assert _main_launch(a, b, _config(variant), out=out)[3]["TMA_STORE"]
    gemm(a, b, config=_config(variant), out=out)
    assert_close(out, ref64(a, b), torch.float16)
    assert buf[:37, 40:].isnan().all() and buf[37:].isnan().all()


def test_batches_split_k_and_unaligned_outputs_fall_back(device):
    """Host descriptors describe one 2-D operand: a batch makes them on the device (the TMA store too);
    split-K keeps host descriptors for A and B but stores partial sums through pointers; an output whose
    rows are not 16-byte aligned is stored through pointers. All still correct."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(3, 21, 32, generator=gen).to(device)
    b = torch.randn(3, 32, 24, generator=gen).to(device)
    bias = torch.randn(3, 21, 24, generator=gen).to(device)
    c = _config("all")
    consts = gemm_mod._plan(a, b, c, bias, 1.0, 1.0, "none", None, "ieee", True)[1][0][3]
    assert not consts["HOST_DESC"] and consts["TMA_STORE"] and consts["EPI_SPLIT"] == 2
    assert_close(gemm(a, b, config=c, bias=bias, precision="ieee"), ref64(a, b, bias), torch.float32)

    split = c.replace(SPLIT_K=2)
    (main, epilogue) = gemm_mod._plan(a[0], b[0], split, None, 1.0, 1.0, "none", None, "ieee", True)[1]
    assert main[3]["HOST_DESC"] and not main[3]["TMA_STORE"] and isinstance(main[2][2], torch.Tensor)
    assert_close(gemm(a[0], b[0], config=split, precision="ieee"), ref64(a[0], b[0]), torch.float32)

    out = poisoned((21, 24 + 1), torch.float32, device)[:, 1:]  # rows start 4 bytes off 16
    assert not _main_launch(a[0], b[0], c, out=out)[3]["TMA_STORE"]
    gemm(a[0], b[0], config=c, out=out, precision="ieee")
    assert_close(out, ref64(a[0], b[0]), torch.float32)


def test_empty_problems(device):
    """Zero-size results and K = 0 launch nothing, whatever the axes say."""
    c = _config("all_persistent")
    a, b = torch.randn(0, 16, device=device), torch.randn(16, 8, device=device)
    assert gemm(a, b, config=c).shape == (0, 8)
    a, b, bias = torch.randn(5, 0, device=device), torch.randn(0, 8, device=device), torch.randn(8, device=device)
    torch.testing.assert_close(gemm(a, b, config=c, bias=bias), bias.expand(5, 8))


def test_without_host_descriptors_the_axis_is_excluded_and_the_launch_falls_back(monkeypatch, device):
    """On a Triton without ``triton.tools.tensor_descriptor`` the rule excludes HOST_DESC=1, and a stored
    HOST_DESC=1 config makes its descriptors on the device."""
    ok = Config.from_dict(dict(BASE, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_stages=3, num_warps=8,
                               WARP_SPEC=0, PERSISTENT=0, HOST_DESC=1, TMA_STORE=1, EPI_SUBTILE=1))
    assert GEMM.check(ok, BIG, H100) is None
    monkeypatch.setattr(gemm_space, "host_descriptors_available", lambda: False)
    assert "host-made" in GEMM.check(ok, BIG, H100)
    assert GEMM.check(ok.replace(HOST_DESC=0), BIG, H100) is None
    monkeypatch.setattr(gemm_mod._compat, "HAS_HOST_TENSOR_DESCRIPTOR", False)
    a, b, _ = _inputs(CASES[1], device=device)
    consts = _main_launch(a, b, _config("all"))[3]
    assert not consts["HOST_DESC"] and consts["TMA_STORE"]
    assert_close(gemm(a, b, config=_config("all"), precision="ieee"), ref64(a, b), torch.bfloat16)


def test_descriptor_store_rules():
    """Each rule of ``gemm_space._check_descriptor_store`` (and the staging buffer in the shared-memory
    estimate), with a config the rule accepts beside it."""
    ok = Config.from_dict(dict(BASE, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_stages=3, num_warps=8,
                               WARP_SPEC=0, PERSISTENT=0, HOST_DESC=1, TMA_STORE=1, EPI_SUBTILE=1))
    assert GEMM.check(ok, BIG, H100) is None
    assert GEMM.check(ok, BIG, A100) is not None                                  # no descriptors
    assert GEMM.check(ok.replace(TMA=0), BIG, H100) is not None                   # variants of TMA
    bmm = GemmProblem("bmm", 4, 1024, 1024, 1024, "float16")
    assert GEMM.check(ok, bmm, H100) is not None and GEMM.check(ok.replace(HOST_DESC=0), bmm, H100) is None
    decode = GemmProblem("mm", 1, 16, 1024, 8192, "bfloat16")
    split = ok.replace(BLOCK_M=16, num_warps=4, SPLIT_K=4)
    assert GEMM.check(split, decode, H100) is not None                            # TMA store + split-K
    assert GEMM.check(split.replace(TMA_STORE=0, EPI_SUBTILE=0), decode, H100) is None
    odd_n = GemmProblem("mm", 1, 4096, 4100, 4096, "float16", b_layout="col")     # rows of 8200 bytes
    assert GEMM.check(ok, odd_n, H100) is not None
    assert GEMM.check(ok.replace(TMA_STORE=0, EPI_SUBTILE=0), odd_n, H100) is None
    assert GEMM.check(ok.replace(TMA_STORE=0), BIG, H100) is not None            # subtile needs the store
    assert GEMM.check(ok.replace(BLOCK_N=16, num_warps=4), BIG, H100) is not None  # halves of 8
    ws = ok.replace(num_warps=4, WARP_SPEC=1)
    assert GEMM.check(ws, BIG, H100) is not None                                  # fails to compile
    assert GEMM.check(ws.replace(HOST_DESC=0), BIG, H100) is not None
    assert GEMM.check(ws.replace(HOST_DESC=0, EPI_SUBTILE=0), BIG, H100) is None
    # staging: 128x256x64 fp16, 4 stages = 192 KB of pipeline; a persistent program adds the staging
    # buffer (64 KB, over the H100's 227 KB; 32 KB subtiled, within), a plain one reuses the pipeline's
    big = ok.replace(BLOCK_N=256, num_stages=4, PERSISTENT=1)
    assert GEMM.check(big, BIG, H100) is None
    assert GEMM.check(big.replace(EPI_SUBTILE=0), BIG, H100) is not None
    assert GEMM.check(big.replace(EPI_SUBTILE=0, PERSISTENT=0), BIG, H100) is None


def test_space_known_configs_and_old_configs():
    """The axes are in the space where descriptors fit; Hopper's known list offers them early (Triton's
    persistent tutorial's form first); a config without them is the same config with them at 0."""
    sp = GEMM.space(BIG)
    assert all(sp[k] == (0, 1) for k in ("HOST_DESC", "TMA_STORE", "EPI_SUBTILE"))
    assert "HOST_DESC" not in GEMM.space(GemmProblem("mm", 1, 5, 7, 9, "float16"))
    known = GEMM.known_configs(BIG, H100)
    first = [i for i, c in enumerate(known) if c["TMA_STORE"]]
    assert first and first[0] < 20
    assert any(c["HOST_DESC"] and c["PERSISTENT"] and c["EPI_SUBTILE"] for c in known)
    assert not any(c["TMA_STORE"] or c["HOST_DESC"] for c in GEMM.known_configs(BIG, A100))
    assert all(set(c.as_dict()) == set(sp) for c in known)
    assert all(GEMM.check(c, BIG, H100) is None for c in known)
    valid = GEMM.valid_configs(GemmProblem("mm", 1, 256, 256, 64, "float16"), H100)
    assert any(c["HOST_DESC"] for c in valid) and any(c["EPI_SUBTILE"] for c in valid)
    assert all(not (c["TMA_STORE"] or c["HOST_DESC"]) for c in valid if not c["TMA"])
    old = dict(BASE, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_stages=3, WARP_SPEC=0, PERSISTENT=0)
    a, b = torch.randn(8, 16), torch.randn(16, 8)
    assert _main_launch(a, b, old)[3] == _main_launch(a, b, dict(old, HOST_DESC=0, TMA_STORE=0, EPI_SUBTILE=0))[3]


# --- bound launches -------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3]], ids=["linear-silu", "colrow-gelu", "rowcol-relu"])
def test_bound_equals_unbound(device, variant, case):
    """``bind()`` keeps prototypes of the host-made descriptors and re-bases them on each call's tensors:
    the same result as ``gemm()`` bit for bit, call after call with new data."""
    activation = case[-1]
    config = _config(variant)
    a, b, bias = _inputs(case, device=device)
    bound = gemm_mod.bind(a, b, config=config, bias=bias, beta=0.5, activation=activation, precision="ieee")
    assert (bound.descs is not None) == bool(VARIANTS[variant].get("HOST_DESC"))
    for seed in (0, 1, 2):
        a, b, bias = _inputs(case, seed, device)
        got = bound(a, b, bias)
        ref = gemm(a, b, config=config, bias=bias, beta=0.5, activation=activation, precision="ieee")
        assert torch.equal(got, ref)


def test_bound_split_k_with_host_descriptors(device):
    a, b, _ = _inputs(CASES[1], device=device)
    config = _config("host", SPLIT_K=2)
    bound = gemm_mod.bind(a, b, config=config, precision="ieee")
    assert bound.descs is not None and bound.descs[2] is None and bound.epilogue is not None
    for seed in (1, 2):
        a, b, _ = _inputs(CASES[1], seed, device)
        assert torch.equal(bound(a, b), gemm(a, b, config=config, precision="ieee"))


_DRIVER_SCRIPT = r"""
from torchtune_ops.kernels._compat import TensorDescriptor

kgemm._tma_usable = lambda device: True   # the fake driver's GPU is an sm_90

def plain(args):   # descriptors and tensors by what the launcher encodes from them
    out = []
    for x in args:
        if isinstance(x, TensorDescriptor):
            out.append(["desc", x.base.data_ptr(), list(x.shape), list(x.strides), list(x.block_shape), x.padding])
        elif isinstance(x, torch.Tensor):
            out.append(["ptr", x.data_ptr()])
        else:
            out.append(x)
    return out

cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2, SPLIT_K=1, TMA=1,
           HOST_DESC=1, TMA_STORE=1, EPI_SUBTILE=1)
res = {}
with fake_driver(kgemm._gemm_kernel, kgemm._splitk_epilogue_kernel) as launches:
    a, b, bias = torch.randn(33, 48), torch.randn(48, 24), torch.randn(24)
    bound = kgemm.bind(a, b, config=cfg, bias=bias, activation="silu")
    bound(a, b, bias)
    res["first"] = [launches.count, len(launches.compiled), bound.main.bound]
    seen = record_runs(launches)
    a2, b2, bias2 = torch.randn(33, 48), torch.randn(48, 24), torch.randn(24)
    out = torch.empty(33, 24)
    kgemm.gemm(a2, b2, config=cfg, bias=bias2, activation="silu", out=out)
    ours = bound(a2, b2, bias2)
    jit, mine = seen
    res["descs"] = [x[0] == "desc" for x in mine[:3]]
    # the same descriptors (the output's pointer differs: each call has its own result)
    res["same"] = [jit[0], jit[1], jit[2][2:], jit[3:]] == [mine[0], mine[1], mine[2][2:], mine[3:]]
    res["out_ptr"] = mine[2][1] == ours.data_ptr()
    res["bound"] = [bound.main.bound, len(launches.compiled)]
print("RESULT", json.dumps(res))
"""


def test_bound_host_descriptors_reach_the_launcher_as_the_jit_passes_them(tmp_path):
    """Without the interpreter, against Triton's JIT on a stubbed sm_90 driver: the bound call hands the
    compiled kernel's launcher descriptors of the same bases, shapes, strides and blocks as the JIT's call
    (Triton's launcher encodes the TMA descriptors from them), and compiles nothing more."""
    res = _driver_script(_DRIVER_SCRIPT, tmp_path)
    assert res["first"] == [1, 1, 0]
    assert res["descs"] == [True, True, True] and res["same"] and res["out_ptr"]
    assert res["bound"] == [1, 1]
