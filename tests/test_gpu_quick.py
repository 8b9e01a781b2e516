"""benchmarks/gpu_quick.py (the first command on a lent GPU) in its smoke mode: CPU, interpreter, tiny
sizes, with optuna and platformdirs made unimportable (the GPU machines have neither)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_quick_smoke_runs_without_extra_wheels(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    env["TORCHTUNE_OPS_CACHE_DIR"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, "benchmarks/gpu_quick.py", "--smoke", "--block-extras", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_quick-smoke.json").read_text())
    sec = doc["sections"]
    assert doc["env"]["torch"] and doc["env"]["triton"] and "sm_count" in doc["env"]
    assert set(sec) >= {"env", "kernels", "host", "tests", "tuner", "inductor", "done"}
    assert not any("error" in row for rows in sec.values() for row in rows), sec
    kernels = sec["kernels"]
    assert len(kernels) >= 10
    for k in kernels:
        methods = [row["method"] for row in k["rows"]]
        assert methods[0] in ("aten", "cudnn") and methods.count("triton") >= 1, k
        if k["family"] == "conv2d":
            assert "cudnn.benchmark" in methods
        for row in k["rows"]:
            assert "error" not in row and row["ms"] > 0, row
            if row["method"] == "triton":
                assert row["correct"], row  # within the family's tolerance of the float64 reference
    host = sec["host"][0]
    assert host["gemm() eager us"] > 0 and host["torch.nn.functional.linear eager us"] > 0
    assert [t["problem"] for t in sec["tuner"]] == ["decode bf16 M=16 11008x4096", "resnet 3x3 64ch 56^2 b32"]
    assert all("entry" in t for t in sec["tuner"])
    assert "inductor" in r.stdout.splitlines()[-1] or "problem" in r.stdout  # the table is printed last
