"""The GPU suite and the space recorder in smoke mode on CPU (what CI exercises), plus their pure parts:
Kernel Tuner format and resuming, the triton.autotune baseline against torch, categories and summaries."""
import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_suite  # noqa: E402
import record_space  # noqa: E402
from replay import load_space  # noqa: E402
from torchtune_ops.kernels.gemm import GEMM, GemmProblem  # noqa: E402


def _run(args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("suite")
    results = tmp / "suite.json"
    # one trial a problem for optimize()'s cold run (smoke's default is 2): tuned, stored, found by the warm run
    out = _run([str(BENCH / "gpu_suite.py"), "--smoke", "--results", str(results), "--spaces-dir", str(tmp / "spaces"),
                "--mirror", str(tmp / "mirror"), "--e2e-tune-trials", "1"])
    return out, json.loads(results.read_text()), results, tmp


def test_smoke_runs_every_section_and_says_what_is_a_stand_in(smoke_run):
    out, data, results, tmp = smoke_run
    if not torch.cuda.is_available():
        assert "stand-in" in out and "Inductor" in out
    assert data["meta"]["smoke"] is True and data["meta"]["torch"] == torch.__version__
    for sec in ("kernels", "search", "e2e"):
        assert f"section {sec}: complete" in out
    # the markdown summary and the mirror copies exist
    md = results.with_suffix(".md").read_text()
    assert "## Kernels" in md and "## Search" in md and "## End to end" in md
    assert (tmp / "mirror" / "suite.json").exists() and (tmp / "mirror" / "suite.md").exists()


def test_smoke_kernels_rows(smoke_run):
    _, data, _, _ = smoke_run
    rows = data["sections"]["kernels"]
    names = {r["name"] for r in rows.values()}
    assert len(names) == 3
    for name in names:
        for m in gpu_suite.KERNEL_METHODS:
            assert f"{name}|{m}" in rows
    for r in rows.values():
        assert "error" not in r, r
        if r["method"] == "triton_autotune" and r["family"] == "conv2d":
            assert r["skipped"] == "GEMM only"
            continue
        assert r["ms"] > 0 and r["reps"] >= 1
        if r["method"] != "aten":
            assert r["rel_err"] <= 2e-2 and r["wall_s"] >= 0
        if r["method"] == "inductor" and not torch.cuda.is_available():
            assert "stand-in" in r["note"]
        if r["method"] == "tuned":
            assert r["winner"] == "aten" or json.loads(r["winner"])["BLOCK_M"] >= 16


def test_smoke_search_and_e2e(smoke_run):
    _, data, _, tmp = smoke_run
    s = data["sections"]["search"]
    rec = [r for k, r in s.items() if k.startswith("record|")]
    assert len(rec) == 1 and rec[0]["complete"] and rec[0]["measured"] == rec[0]["valid"] == 6
    (by_method,) = s["replay"]["summary"].values()
    assert set(by_method) == {"tune", "random"} and "| tune | random |" in s["replay"]["table"]
    e = data["sections"]["e2e"]
    assert len(e) == 8
    for r in e.values():
        assert r["cold"]["latency_ms"] > 0 and r["cold"]["rel_err_vs_eager"] < 1e-3, r
        assert ("warm" in r) == (r["variant"] != "eager")
    opt = e["gpt2|float32|b1|optimize"]
    assert opt["cold"]["sources"] == ["tuned"] and opt["cold"]["problems"] > 0
    # the warm start ran in a new process and found every problem in the cache the first one filled
    # (PyTorch's winners left to Inductor at compile time count as found: one per graph node)
    assert opt["warm"]["sources"] == ["store"] and opt["warm"]["problems"] >= opt["cold"]["problems"]
    assert opt["warm"]["process_to_first_output_s"] > opt["warm"]["first_call_s"]


def test_suite_resumes_without_measuring_again(smoke_run):
    _, data, results, tmp = smoke_run
    before = json.loads(results.read_text())
    out = _run([str(BENCH / "gpu_suite.py"), "--smoke", "--section", "kernels", "--results", str(results)])
    after = json.loads(results.read_text())
    assert "[gpu_suite] kernels " not in out  # nothing measured
    assert after["sections"] == before["sections"]
    assert len(after["meta"]["runs"]) == len(before["meta"]["runs"]) + 1
    # --retry-errors measures again exactly what failed before
    key = next(k for k, r in after["sections"]["kernels"].items() if r["method"] == "aten")
    after["sections"]["kernels"][key] = {"name": key.split("|")[0], "method": "aten", "error": "RuntimeError: boom"}
    results.write_text(json.dumps(after))
    out = _run([str(BENCH / "gpu_suite.py"), "--smoke", "--section", "kernels", "--results", str(results),
                "--retry-errors"])
    again = json.loads(results.read_text())["sections"]["kernels"]
    assert out.count("[gpu_suite] kernels ") == 1 and "error" not in again[key] and again[key]["ms"] > 0
    assert {k: r for k, r in again.items() if k != key} == {k: r for k, r in after["sections"]["kernels"].items()
                                                             if k != key}
    # a report on a CPU without --smoke keeps the file's machine description and rewrites the markdown
    md = results.with_suffix(".md")
    md.unlink()
    _run([str(BENCH / "gpu_suite.py"), "--section", "report", "--results", str(results)])
    assert md.exists() and json.loads(results.read_text())["meta"]["gpu"] == after["meta"]["gpu"]
    status = _run([str(BENCH / "gpu_suite.py"), "--smoke", "--status", "--results", str(results)])
    assert "kernels: 12/12 measurements, 0 failed" in status and "search: 1/1 spaces recorded, replay done" in status
    assert "e2e: 8/8 measured, 0 failed; next: none" in status


def test_record_space_smoke_writes_kernel_tuner_format(tmp_path):
    out = _run([str(BENCH / "record_space.py"), "--smoke", "--out", str(tmp_path)])
    summary = json.loads(out.strip().splitlines()[-1])["record_space"][0]
    path = Path(summary["path"])
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    for k in ("device_name", "kernel_name", "problem_size", "tune_params_keys", "tune_params", "objective", "cache"):
        assert k in data
    keys = data["tune_params_keys"]
    assert set(keys) == set(data["tune_params"]) and len(data["cache"]) == 6
    for key, rec in data["cache"].items():
        values = key.split(",")
        assert values == [str(rec[k]) for k in keys]
        assert all(rec[k] in data["tune_params"][k] for k in keys)
        assert isinstance(rec["time"], float) or rec["time"] in ("CompilationFailedConfig", "RuntimeFailedConfig")
    space = load_space(str(path))
    assert len(space.configs()) == 6 and math.isfinite(space.optimum)
    # every recorded configuration is valid for the problem and really computes the product
    problem = GEMM.problem_from_dict(data["problem_size"])
    from torchtune_ops.kernels.base import CPU_INTERPRETER
    assert all(GEMM.check(c, problem, CPU_INTERPRETER) is None for c in space.configs())


def test_record_space_resumes_a_partial_file(tmp_path):
    logs = []
    first = record_space.record(smoke=True, out_dir=tmp_path, log=logs.append)[0]
    path = Path(first["path"])
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    dropped = sorted(data["cache"])[:2]
    for k in dropped:
        del data["cache"][k]
    data["torchtune_ops"]["complete"] = False
    with gzip.open(path, "wt") as f:
        json.dump(data, f)
    logs.clear()
    again = record_space.record(smoke=True, out_dir=tmp_path, log=logs.append)[0]
    assert again["complete"] and again["measured"] == 6
    assert any("4 recorded, 2 to go" in line for line in logs), logs
    logs.clear()
    third = record_space.record(smoke=True, out_dir=tmp_path, log=logs.append)[0]
    assert third["skipped"] and "complete already" in logs[0]


def test_record_space_budget_stops_and_leaves_a_partial_file(tmp_path):
    s = record_space.record(smoke=True, out_dir=tmp_path, budget_s=0.0, log=lambda *_: None)[0]
    assert not s["complete"] and s["measured"] == 0
    with gzip.open(s["path"], "rt") as f:
        assert json.load(f)["torchtune_ops"]["complete"] is False


@pytest.mark.parametrize("op,batch,M,N,K,dtype,b_layout", [
    ("mm", 1, 1, 17, 5, "float16", "row"),
    ("mm", 1, 67, 5, 33, "float32", "col"),
    ("linear", 1, 17, 40, 67, "bfloat16", "col"),
    ("bmm", 3, 5, 17, 20, "float16", "row"),
])
def test_triton_autotune_baseline_matches_torch(op, batch, M, N, K, dtype, b_layout, device):
    bias = "row" if op == "linear" else "none"
    p = GemmProblem(op, batch, M, N, K, dtype, "row", b_layout, bias, "none", "ieee")
    inputs = GEMM.make_inputs(p, device, seed=3)
    run, why = gpu_suite.triton_autotune_fn(p, inputs, smoke=True)
    assert run is not None, why
    ref = GEMM.reference(p, inputs)
    from torchtune_ops.kernels.base import relative_error
    assert relative_error(run(), ref) <= GEMM.tolerance(p)


def test_triton_autotune_baseline_declines_epilogues(device):
    p = GemmProblem("addmm", 1, 8, 8, 8, "float16", "row", "row", "full", "none", "ieee")
    run, why = gpu_suite.triton_autotune_fn(p, GEMM.make_inputs(p, device), smoke=True)
    assert run is None and why


def test_categories():
    g = lambda M, N, K, b=1: GemmProblem("mm", b, M, N, K, "float16")  # noqa: E731
    assert gpu_suite.category("llm", "gemm", g(4096, 4096, 4096)) == "large square"
    assert gpu_suite.category("llm", "gemm", g(16, 4096, 11008)) == "skinny"
    assert gpu_suite.category("llm", "gemm", g(128, 4096, 11008)) == "split-K"
    assert gpu_suite.category("odd", "gemm", g(1000, 1000, 1000)) == "odd"
    assert gpu_suite.category("llm", "gemm", g(4095, 4097, 511)) == "odd"
    assert gpu_suite.category("resnet50", "conv2d", None) == "conv"
    rows = gpu_suite.kernel_problems(smoke=False)
    assert {c for _, c, _, _ in rows} == set(gpu_suite.CATEGORIES) and len(rows) == 9 + 28
    cats = [c for _, c, _, _ in rows]
    assert "conv" not in cats[:9] and rows[9][3].N == 32 and rows[-1][3].N == 1  # GEMMs, then batch 32


def test_kernel_summary_geomean_and_markdown():
    rows = {}
    for name, cat, aten, ours in (("a", "odd", 2.0, 1.0), ("b", "odd", 1.0, 2.0), ("c", "conv", 3.0, 1.0)):
        rows[f"{name}|aten"] = {"name": name, "category": cat, "method": "aten", "ms": aten}
        rows[f"{name}|tuned"] = {"name": name, "category": cat, "method": "tuned", "ms": ours, "wall_s": 1.5}
        rows[f"{name}|inductor"] = {"name": name, "category": cat, "method": "inductor", "error": "boom"}
    s = gpu_suite.kernel_summary(rows)
    assert s["odd"]["tuned"]["geomean_speedup"] == pytest.approx(1.0)
    assert s["conv"]["tuned"]["geomean_speedup"] == pytest.approx(3.0)
    assert s["all"]["tuned"]["geomean_speedup"] == pytest.approx(3.0 ** (1 / 3))
    assert s["all"]["tuned"]["wall_s_total"] == pytest.approx(4.5)
    assert s["all"]["inductor"]["n"] == 0 and math.isnan(s["all"]["inductor"]["geomean_speedup"])
    md = gpu_suite.markdown({"meta": {"gpu": "X"}, "sections": {"kernels": rows}})
    assert "| odd | 2 | 1.00x (2)" in md and "boom" in md


def test_e2e_summary_targets_within_noise():
    def row(v, ms, first):
        return {"model": "m", "dtype": "bfloat16", "batch": 1, "variant": v,
                "cold": {"latency_ms": ms, "noise": 0.02, "first_call_s": first}}
    rows = {v: row(v, ms, f) for v, ms, f in (("eager", 10.0, 1), ("compile", 9.0, 20), ("max-autotune", 8.0, 100),
                                               ("optimize", 8.1, 15))}
    (g,) = gpu_suite.e2e_summary(rows)
    assert g["optimize_le_eager"] and g["optimize_le_compile"]
    assert g["optimize_le_max-autotune"]  # 8.1 <= 8.0 * 1.02: within the noise
    assert g["optimize_cold_over_max_autotune_cold"] == pytest.approx(0.15)
    # tuning alone: (15 - 20 -> 0) / (100 - 20)
    assert g["optimize_tuning_over_max_autotune_tuning"] == 0.0
    rows["optimize"]["cold"]["first_call_s"] = 36
    (g,) = gpu_suite.e2e_summary(rows)
    assert g["optimize_tuning_over_max_autotune_tuning"] == pytest.approx(0.2)
    rows["optimize"]["cold"]["latency_ms"] = 8.5
    (g,) = gpu_suite.e2e_summary(rows)
    assert not g["optimize_le_max-autotune"]


def test_cpu_replays_the_spaces_a_gpu_run_recorded(smoke_run, tmp_path):
    _, data, _, _ = smoke_run
    d = json.loads(json.dumps(data))
    d["meta"].update(gpu="NVIDIA Fake GPU", smoke=False)
    del d["sections"]["search"]["replay"]
    f = tmp_path / "gpu_suite-nvidia-fake-gpu.json"
    f.write_text(json.dumps(d))
    out = _run([str(BENCH / "gpu_suite.py"), "--section", "search", "--results", str(f), "--replay-methods",
                "tune,random", "--replay-seeds", "2", "--replay-jobs", "1"])
    after = json.loads(f.read_text())
    assert "section search: complete" in out and "[record]" not in out  # nothing recorded on a CPU
    assert after["meta"]["gpu"] == "NVIDIA Fake GPU"
    replay = after["sections"]["search"]["replay"]
    assert replay["seeds"] == 2 and replay["budget"] == 200
    (by_method,) = replay["summary"].values()
    assert by_method["tune"]["reached"] == 2


def test_e2e_plan():
    items = gpu_suite.e2e_items(smoke=False)
    assert len(items) == 2 * 2 * 2 * 4 and items[0].dtype == "bfloat16" and items[-1].dtype == "float16"
    assert {i.model for i in items[:16]} == {"gpt2", "resnet50"}  # both models in bf16 before any fp16
    warm = [i for i in items if gpu_suite.wants_warm(i, smoke=False, warm_all=False)]
    assert len(warm) == 2 * 2 * 3 and all(i.batch > 1 and i.variant != "eager" for i in warm)
    assert sum(gpu_suite.wants_warm(i, smoke=False, warm_all=True) for i in items) == 24
