"""Every ``torchtune-ops`` command through a subprocess (``python -m torchtune_ops ...``), plus read-only
deployment: READONLY=1 on a read-only cache directory never writes anything."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from torchtune_ops.storage import bundles as B
from torchtune_ops.storage.device import Fingerprint, fingerprint
from torchtune_ops.kernels.base import CPU_INTERPRETER
from torchtune_ops.kernels.registry import families
from torchtune_ops.storage.store import Entry, Store, problem_key

GEMM = families()["gemm"]
CONV = families()["conv2d"]
H100 = Fingerprint(gpu="NVIDIA H100 80GB HBM3", capability=(9, 0), sm_count=132, torch="2.11.0",
                   triton="3.6.0", kernels="0123456789ab")


def run(*args, cache, env=None, timeout=300):
    e = {k: v for k, v in os.environ.items() if not k.startswith("TORCHTUNE_OPS_")}
    e.update(TORCHTUNE_OPS_CACHE_DIR=str(cache), TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    e.update(env or {})
    r = subprocess.run([sys.executable, "-m", "torchtune_ops", *map(str, args)], capture_output=True, text=True,
                       env=e, timeout=timeout)
    return r


def fake_entries(fp_key=None, limits=CPU_INTERPRETER):
    """A few cache entries made directly (no tuning): odd GEMM sizes, a conv, one aten winner."""
    from torchtune_ops.kernels.gemm_space import GemmProblem

    fp_key = fp_key or fingerprint("cpu").key
    out = []
    for i, (M, N, K) in enumerate([(1, 7, 13), (127, 257, 67), (64, 64, 64)]):
        p = GemmProblem("mm", 1, M, N, K, "float16")
        cfg = GEMM.known_configs(p, limits)[0].to_json()
        out.append(Entry(fp_key, "gemm", problem_key(GEMM.problem_to_dict(p)), cfg, 0.01 * (i + 1),
                         0.02 * (i + 1), 11 + i))
    c = CONV.problem_type(N=2, C=3, H=17, W=19, K=5, R=3, S=3, padding=(1, 1, 1, 1))
    out.append(Entry(fp_key, "conv2d", problem_key(CONV.problem_to_dict(c)), "aten", 0.5, 0.5, 4))
    return out


@pytest.fixture
def cache(tmp_path):
    d = tmp_path / "cache"
    store = Store.open(d / "tuning.sqlite")
    for e in fake_entries():
        store.put(e, trials=[("aten", e.aten_ms), (e.winner, e.time_ms)])
    store.close()
    return d


def snapshot(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.join(root, f)] = (st.st_size, st.st_mtime_ns)
    return out


def one_line_error(r):
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchtune-ops: error:"), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_doctor(tmp_path):
    r = run("doctor", cache=tmp_path / "c")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert fingerprint("cpu").key.split("|k")[0] in out
    for word in ("torch", "triton", "fingerprint", "kernel families", "interpreter", "TORCHTUNE_OPS_READONLY",
                 str(tmp_path / "c")):
        assert word in out
    assert not (tmp_path / "c").exists()  # doctor creates nothing
    assert "GEMM prior" in out and "gemm_inductor_v1" in out and "not used on this device (no GPU)" in out


def test_list_show_stats_report(cache):
    # --all-devices: the kernel-source hash in this machine's fingerprint may change while kernels are edited
    r = run("cache", "list", "--all-devices", cache=cache)
    assert r.returncode == 0, r.stderr
    assert "4 entries" in r.stdout and "mm 127x257x67 float16" in r.stdout
    ids = [line.split()[0] for line in r.stdout.splitlines()[3:]]
    assert len(ids) == 4
    r = run("cache", "show", ids[0][:7], cache=cache)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["id"] == ids[0] and len(shown["measurements"]) == 2
    assert one_line_error(run("cache", "show", "zzzz", cache=cache)).endswith("cache list --all-devices')")
    r = run("cache", "stats", cache=cache)
    assert r.returncode == 0 and "entries       4" in r.stdout and "gemm          3 entries" in r.stdout
    r = run("report", "--all-devices", cache=cache)
    assert r.returncode == 0, r.stderr
    assert "2.00x" in r.stdout and "geometric mean speedup" in r.stdout
    assert "a Triton kernel won 3 of 4" in r.stdout


def test_report_plot(cache, tmp_path):
    png = tmp_path / "s.png"
    r = run("report", "--plot", png, cache=cache)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install 'torchtune-ops[plot]'" in one_line_error(r)
        assert not png.exists()
    else:
        assert r.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG"
    # and the message when matplotlib is missing, whatever this machine has
    e = {k: v for k, v in os.environ.items() if not k.startswith("TORCHTUNE_OPS_")}
    e["TORCHTUNE_OPS_CACHE_DIR"] = str(cache)
    code = ("import sys; sys.modules['matplotlib'] = None; from torchtune_ops.cli import main; "
            f"sys.exit(main(['report', '--plot', {str(png)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)
    assert "torchtune-ops[plot]" in one_line_error(r)


def test_export_clear_import_round_trip(cache, tmp_path):
    before = [tuple(vars(e).values())[:8] for e in Store.open(cache / "tuning.sqlite", readonly=True).entries()]
    out = tmp_path / "b.json"
    r = run("cache", "export", out, "--all-devices", cache=cache)
    assert r.returncode == 0 and "wrote 4 entries" in r.stdout, r.stderr
    assert "--yes" in one_line_error(run("cache", "clear", cache=cache))
    assert len(Store.open(cache / "tuning.sqlite", readonly=True).entries()) == 4
    r = run("cache", "clear", "--yes", cache=cache)
    assert r.returncode == 0 and "deleted 4" in r.stdout
    fresh = tmp_path / "fresh"
    r = run("cache", "import", out, cache=fresh)
    assert r.returncode == 0 and "imported 4 entries" in r.stdout, r.stderr
    after = Store.open(fresh / "tuning.sqlite", readonly=True)
    assert [tuple(vars(e).values())[:7] for e in after.entries()] == [b[:7] for b in before]
    assert after.trials() == []  # nothing tuned: choices only


def test_import_refuses_hostile_and_foreign_bundles(cache, tmp_path):
    good = B.Bundle.from_entries([B.from_store_entry(e) for e in fake_entries()]).to_dict()
    snap = snapshot(cache)
    hostile = json.loads(json.dumps(good))
    hostile["families"]["gemm"]["configs"][0]["BLOCK_M"] = "../../etc/passwd"
    cases = {"bad.json": "{oops", "hostile.json": json.dumps(hostile),
             "types.json": json.dumps(dict(good, devices="all"))}
    for name, text in cases.items():
        p = tmp_path / name
        p.write_text(text)
        assert name in one_line_error(run("cache", "import", p, cache=cache))
    assert "No such file" in one_line_error(run("cache", "import", tmp_path / "missing.json", cache=cache))
    foreign = tmp_path / "h100.json"
    lim = B.DeviceRecord(H100).limits()
    B.write(B.Bundle.from_entries([B.from_store_entry(e) for e in fake_entries(H100.key, lim)]), foreign)
    msg = one_line_error(run("cache", "import", foreign, cache=cache))
    assert "another device" in msg and "--force" in msg
    assert snapshot(cache) == snap  # nothing changed
    r = run("cache", "import", foreign, "--force", cache=cache)
    assert r.returncode == 0, r.stderr
    keys = {e.fingerprint for e in Store.open(cache / "tuning.sqlite", readonly=True).entries()}
    assert keys == {fingerprint("cpu").key, H100.key}


def test_merge(tmp_path):
    fp = fingerprint("cpu").key
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.json"
    ea = fake_entries()
    eb = [Entry(e.fingerprint, e.family, e.problem, "aten", e.aten_ms / 4, e.aten_ms / 4, 1) for e in ea[:2]]
    B.write(B.Bundle.from_entries(map(B.from_store_entry, ea)), a)
    lim = B.DeviceRecord(H100).limits()
    B.write(B.Bundle.from_entries(map(B.from_store_entry, eb + fake_entries(H100.key, lim))), b)
    r = run("cache", "merge", a, b, "-o", out, cache=tmp_path / "c")
    assert r.returncode == 0, r.stderr
    got = {(e.device, e.problem_key): e for e in B.validate(out).entries()}
    assert len(got) == 8
    for e in eb:  # faster aten choices from b replace a's kernels
        assert got[(fp, e.problem)].winner == "aten"
    assert got[(fp, ea[2].problem)].winner == ea[2].winner


def test_usage_errors_exit_2(tmp_path):
    for args in (["cache"], ["tune"], ["nope"], ["cache", "merge", "x.json"], ["tune", "--shapes", "a",
                                                                                "--model", "m:f"]):
        r = run(*args, cache=tmp_path / "c")
        assert r.returncode == 2, (args, r.stderr)
        assert "usage:" in r.stderr


def test_tune_from_a_shape_file(tmp_path):
    from torchtune_ops.storage import record

    shapes = tmp_path / "shapes.jsonl"
    rec = record.ShapeRecorder(shapes)
    prob = {"op": "mm", "batch": 1, "M": 5, "N": 7, "K": 9, "dtype": "float32", "a_layout": "row",
            "b_layout": "row", "bias": "none", "activation": "none", "precision": "ieee"}
    rec.record("gemm", prob)
    cache = tmp_path / "c"
    r = run("tune", "--shapes", shapes, "--max-trials", 2, "--time-budget", 20, cache=cache)
    assert r.returncode == 0, r.stderr
    assert "1 problems" in r.stdout and "mm 5x7x9 float32" in r.stdout
    assert "not GPU timings" in r.stderr
    entries = Store.open(cache / "tuning.sqlite", readonly=True).entries()
    assert [e.problem for e in entries] == [problem_key(prob)]
    # tuning again with the same budget finds the answer in the cache
    r = run("tune", "--shapes", shapes, "--max-trials", 2, "--time-budget", 20, cache=cache)
    assert r.returncode == 0 and "cached" in r.stdout


def test_tune_a_model_entry_point(tmp_path):
    (tmp_path / "tinymodel.py").write_text(textwrap.dedent("""
        import torch
        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU()), torch.randn(3, 8)
    """))
    cache = tmp_path / "c"
    e = {"PYTHONPATH": str(tmp_path)}
    r = run("tune", "--model", "tinymodel:build", "--max-trials", 2, "--time-budget", 20, cache=cache, env=e)
    assert r.returncode == 0, r.stderr
    assert "1 problems" in r.stdout and "3x12x8 float32" in r.stdout and "trial 1/" in r.stderr
    assert len(Store.open(cache / "tuning.sqlite", readonly=True).entries()) == 1


def test_tune_rejects_a_bad_entry_point(tmp_path):
    assert "MODULE:FUNCTION" in one_line_error(run("tune", "--model", "nocolon", cache=tmp_path / "c"))
    assert "cannot load" in one_line_error(run("tune", "--model", "no_such_mod:f", cache=tmp_path / "c"))


def test_readonly_on_a_read_only_directory_writes_nothing(cache, tmp_path):
    os.chmod(cache, stat.S_IRUSR | stat.S_IXUSR)  # 0500
    try:
        snap = snapshot(cache)
        ro = {"TORCHTUNE_OPS_READONLY": "1"}
        for args in (["cache", "list"], ["cache", "stats"], ["report"], ["doctor"],
                     ["cache", "export", tmp_path / "out.json"]):
            r = run(*args, cache=cache, env=ro)
            assert r.returncode == 0, (args, r.stderr)
        assert "4 entries" in run("cache", "list", "--all-devices", cache=cache, env=ro).stdout
        for args in (["cache", "import", tmp_path / "out.json"], ["cache", "clear", "--yes"],
                     ["tune", "--shapes", tmp_path / "none.jsonl"]):
            assert "read-only mode" in one_line_error(run(*args, cache=cache, env=ro))
        assert snapshot(cache) == snap
        assert sorted(os.listdir(cache)) == sorted(os.path.basename(p) for p in snap)
    finally:
        os.chmod(cache, 0o700)


def test_standard_shape_suite_builds():
    """cache/suite.py, the recipe of the shipped bundles: every layer meets its own input (meta tensors)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cache import suite

    for fn, layers, inputs in ((suite.gpt2, 20, 100), (suite.llama, 20, 100), (suite.resnet50, 46, 92)):
        model, xs = fn(device="meta")
        assert len(model.layers) == layers and len(xs) == inputs
        outs = model(*xs)
        assert len(outs) == inputs and all(o.device.type == "meta" for o in outs)
    model, xs = suite.tiny()
    assert len(model(*xs)) == len(xs)
