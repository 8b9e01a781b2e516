"""The compile gate (issue 18): what the compiler makes of the kernels on an H100, checked without a GPU.

``benchmarks/compile_report.py`` compiles known configurations for sm_90a with the installed Triton's
ptxas, specialised as a launch would be (``kernels.inspect``), in a child process (this one interprets).
CI compiles six problems' covering configurations (``compile_report.cover``: every parameter value and each
variant's heaviest tiles, about 50 builds); every known configuration of the whole representative set is
marked slow. The gate
is strict: a known configuration that spills any bytes fails, even the few bytes ptxas spends to reach
an occupancy step (gemm_space's ``_spill_rule`` keeps those tiles out).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _report(tmp_path, *args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "benchmarks/compile_report.py", "--json", str(out), *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=timeout)
    return r, (json.loads(out.read_text()) if out.exists() else None)


def _assert_gate(r, doc):
    assert doc is not None, r.stderr[-3000:]
    rows = doc["rows"]
    assert rows and all(row["known"] for row in rows)
    bad = [(row["problem"], row["config"], row["findings"]) for row in rows if row["findings"]]
    assert not bad and r.returncode == 0, (bad, r.stdout[-3000:], r.stderr[-3000:])
    assert all(row["registers"] and row["shared_bytes"] for row in rows)
    return rows


def test_known_configurations_compile_for_hopper_without_spills(tmp_path):
    """CI's problems of the representative set: their covering known configurations (every value of every
    parameter, each variant's largest accumulator per warp and largest pipeline) compile for sm_90a without
    spilling a single byte and within the H100's shared memory and registers. Every known configuration:
    test_all_representative_problems (-m slow)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from representative import CI_SUBSET, FAMILIES, REPRESENTATIVE

    from torchtune_ops.kernels import inspect as kinspect

    r, doc = _report(tmp_path, "--arch", "sm_90a", "--subset", "ci", "--cover", "--gate", "--summary")
    rows = _assert_gate(r, doc)
    assert {row["problem"] for row in rows} >= {"decode bf16 M=1 11008x4096", "decode bf16 M=16 11008x4096",
                                                "odd fp16 4095x4097x511", "fp32 highest 2048^3",
                                                "stem 7x7/2 3>64 224^2 b32"}
    hopper = kinspect.TARGETS["sm_90a"][1]
    for label, fam, problem in REPRESENTATIVE:
        if label not in CI_SUBSET:
            continue
        known = FAMILIES[fam].known_configs(problem, hopper)
        built = [row["config"] for row in rows if row["problem"] == label]
        assert set(built) <= {str(c) for c in known}, (label, built)
        values = {kv for cfg in built for kv in cfg.split()}
        assert values == {f"{k}={v}" for c in known for k, v in c.items}, label   # every parameter value
        for c in known:   # the largest accumulator per warp of each variant
            heavier = [o for o in known if o["BLOCK_M"] * o["BLOCK_N"] / o["num_warps"]
                       > c["BLOCK_M"] * c["BLOCK_N"] / c["num_warps"] and _variant(o) == _variant(c)]
            assert heavier or str(c) in built, (label, str(c))
    assert all(row["spill_bytes"] == 0 for row in rows)
    # no 2-warp tiles on Hopper: everything at BLOCK_M >= 64 with tensor-core dtypes uses wgmma
    for row in rows:
        assert "num_warps=2" not in row["config"], row


def _variant(c):
    skip = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "SPLIT_K")
    return tuple(kv for kv in c.items if kv[0] not in skip) + (c.get("SPLIT_K", 1) > 1,)


@pytest.fixture(scope="module")
def large_fp16(tmp_path_factory):
    """One report (one child process) for the large fp16 GEMM's configurations that the two tests below
    check: the first persistent and the first warp-specialised known ones, every known one with host
    descriptors or a TMA store, and a staged persistent 128x256x64. (problem, the three lists, rows by
    configuration)."""
    import torch  # noqa: F401  (the kernels package needs it; cheap here)
    from torchtune_ops.kernels import inspect as kinspect
    from torchtune_ops.kernels.base import Config
    from torchtune_ops.kernels.gemm import GEMM, GemmProblem

    p = GemmProblem("mm", 1, 4096, 4096, 4096, "float16")
    known = GEMM.known_configs(p, kinspect.TARGETS["sm_90a"][1])
    variants = [next(c for c in known if c["PERSISTENT"]), next(c for c in known if c["WARP_SPEC"])]
    descriptors = [c for c in known if c["HOST_DESC"] or c["TMA_STORE"]]
    staged = Config.of(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, SPLIT_K=1,
                       TMA=1, WARP_SPEC=0, PERSISTENT=1, HOST_DESC=1, TMA_STORE=1, EPI_SUBTILE=1)
    args = ["--arch", "sm_90a", "--workers", "1", "--gate", "--problem", "gemm:" + json.dumps(GEMM.problem_to_dict(p))]
    configs = list(dict.fromkeys(variants + descriptors + [staged]))
    for c in configs:
        args += ["--config", c.to_json()]
    r, doc = _report(tmp_path_factory.mktemp("large_fp16"), *args)
    assert doc is not None and r.returncode == 0, r.stderr[-3000:]
    rows = {row["config"]: row for row in doc["rows"]}
    assert len(rows) == len(doc["rows"]) == len(configs), doc["rows"]
    return p, variants, descriptors, staged, rows


def test_hopper_variants_compile(large_fp16):
    """The first persistent and the first warp-specialised known configurations of a large fp16 GEMM
    compile for sm_90a without findings (the rest is in the slow test)."""
    _p, variants, _d, _s, by_config = large_fp16
    rows = [by_config[str(c)] for c in variants]
    assert all(row["known"] and not row["findings"] for row in rows), rows
    assert all(row["registers"] and row["shared_bytes"] for row in rows)
    assert len(rows) == 2 and all(row["tma"] and row["mma"] == "wgmma" for row in rows)


def test_descriptor_store_axes_compile(large_fp16, tmp_path):
    """Every known configuration of a large fp16 GEMM with host-made descriptors or a TMA store (Triton's
    persistent tutorial's form among them), and a tf32 addmm with a fused bias and GELU through a subtiled
    TMA store, compile for sm_90a without findings; their PTX writes the output with a TMA store
    (cp.async.bulk.tensor global <- shared) and host descriptors are kernel arguments. A persistent
    program's staging buffer sits beside the pipeline's (what check() assumes): 4 stages of 128x256x64
    with a subtiled store take 192 KB + 32 KB."""
    from torchtune_ops.kernels import inspect as kinspect
    from torchtune_ops.kernels.gemm import GEMM, GemmProblem

    hopper = kinspect.TARGETS["sm_90a"][1]
    p, _v, chosen, staged, by_config = large_fp16
    assert GEMM.check(staged, p, hopper) is None and staged not in chosen
    assert {(c["HOST_DESC"], c["EPI_SUBTILE"], c["PERSISTENT"]) for c in chosen} >= {(1, 1, 1), (0, 0, 0)}
    rows = [by_config[str(c)] for c in chosen + [staged]]
    assert not any(row["findings"] for row in rows), rows
    for row in rows:
        assert row["tma"] and row["tma_store"] and row["mma"] == "wgmma" and row["spill_bytes"] == 0, row
        assert row["host_desc"] == ("HOST_DESC=1" in row["config"]), row
    assert 229376 <= rows[-1]["shared_bytes"] <= 229376 + 256, rows[-1]

    tf32 = GemmProblem("addmm", 1, 2048, 2048, 2048, "float32", bias="row", activation="gelu_tanh",
                       precision="tf32")
    sub = staged.replace(BLOCK_N=128, num_stages=3, PERSISTENT=0)
    assert GEMM.check(sub, tf32, hopper) is None
    r, doc = _report(tmp_path, "--arch", "sm_90a", "--workers", "1", "--gate", "--config", sub.to_json(),
                     "--problem", "gemm:" + json.dumps(GEMM.problem_to_dict(tf32)))
    assert doc is not None and r.returncode == 0, r.stderr[-3000:]
    (row,) = doc["rows"]
    assert row["tma_store"] and row["host_desc"] and row["mma"] == "wgmma" and not row["findings"], row


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_all_representative_problems(tmp_path, arch):
    """The whole representative set (10-20 minutes cold on 2 cores): no known configuration spills."""
    r, doc = _report(tmp_path, "--arch", arch, "--gate", "--summary", timeout=3000)
    _assert_gate(r, doc)


def test_loads_vectorise_where_the_leading_dimension_allows(tmp_path):
    """fp16 rows with a leading dimension of 68 (8-byte aligned, not 16) load 8 bytes at a time (the
    kernel is told the divisibility), 64 (16-byte) 16 bytes, 67 (odd) one element."""
    cfg = '{"BLOCK_M":64,"BLOCK_N":64,"BLOCK_K":32,"GROUP_M":8,"num_warps":4,"num_stages":3,"SPLIT_K":1,"TMA":0}'
    args = ["--arch", "sm_90a", "--config", cfg, "--workers", "1"]
    for lead in (64, 68, 67):
        args += ["--problem", 'gemm:{"op":"mm","batch":1,"M":64,"N":%d,"K":%d,"dtype":"float16"}' % (lead, lead)]
    r, doc = _report(tmp_path, *args)
    assert doc is not None and r.returncode == 0, r.stderr[-3000:]
    bits = {json.loads(row["problem"])["K"]: (row["vector_loads"], row["cp_async"]) for row in doc["rows"]}
    assert bits == {64: (128, True), 68: (64, True), 67: (16, False)}, bits
