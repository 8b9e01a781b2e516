"""Issue 19: no silent failures at the edges a user touches. One validation of every setting, entries that
remember their tuning budget (and are tuned again when asked for more), CLI writes that fail loudly, a
read-only cache that is still used, explain() counts that add up, conv1d through the conv2d kernels."""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

import torchtune_ops
import torchtune_ops.runtime.ops  # noqa: F401  (registers torch.ops.torchtune_ops)
from torchtune_ops import cli, settings
from torchtune_ops.errors import SettingsError
from torchtune_ops.kernels.registry import families
from torchtune_ops.runtime import backend, dispatch
from torchtune_ops.storage import bundles as B
from torchtune_ops.storage import store as store_mod
from torchtune_ops.storage.device import fingerprint
from torchtune_ops.storage.store import Entry, Store, problem_key
from torchtune_ops.tuning import tuner
from torchtune_ops.tuning.timing import FakeTimer

GEMM = families()["gemm"]
CONV = families()["conv2d"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("fresh_runtime")  # conftest.py: no graphs, choices or tune options


@pytest.fixture
def fake_timer():
    """Every Triton configuration beats aten; counts the configurations measured."""
    timer = FakeTimer({"aten": 10.0}, default=1.0)
    dispatch.set_tune_options(timer=timer)
    return timer


def main(*argv, cache=None):
    """Run the CLI in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        args = (["--cache-dir", str(cache)] if cache is not None else []) + [str(a) for a in argv]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = cli.main(args)
    finally:
        sys.stdout, sys.stderr = old
    return rc, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------ 1. settings
BAD = [("max_trials", -3), ("max_trials", 0), ("max_trials", 2.5), ("time_budget", -1), ("time_budget", 0),
       ("autotune", 5), ("autotune", "sometimes"), ("bucket", "pow3")]
ARG = {"time_budget": "time_budget_s"}


@pytest.mark.parametrize("name,value", BAD)
def test_one_validation_whatever_the_source(name, value, monkeypatch):
    with pytest.raises(SettingsError) as from_override:
        with settings.override(**{name: value}):
            pass
    with pytest.raises(SettingsError) as from_optimize:
        torchtune_ops.optimize(nn.Linear(2, 2), **{ARG.get(name, name): value})
    monkeypatch.setenv("TORCHTUNE_OPS_" + name.upper(), str(value))
    with pytest.raises(SettingsError) as from_env:
        settings.reload()
    monkeypatch.delenv("TORCHTUNE_OPS_" + name.upper())
    settings.reload()
    assert str(from_override.value) == str(from_optimize.value) == str(from_env.value)
    assert f"TORCHTUNE_OPS_{name.upper()}" in str(from_env.value) and str(value) in str(from_env.value)


def test_tuner_rejects_a_bad_budget(device):
    p = GEMM.problem_type("mm", 1, 3, 5, 7, "float32")
    with pytest.raises(SettingsError):
        tuner.tune_problem(GEMM, p, device=device, max_trials=-3, timer=FakeTimer({}, default=1.0))


def test_autotune_error_lists_every_spelling(monkeypatch):
    monkeypatch.setenv("TORCHTUNE_OPS_AUTOTUNE", "maybe")
    with pytest.raises(SettingsError) as e:
        settings.reload()
    monkeypatch.delenv("TORCHTUNE_OPS_AUTOTUNE")
    for spelling in ("0", "1", "true", "false", "yes", "no", "on", "off", "background"):
        assert repr(spelling) in str(e.value) or f" {spelling}" in str(e.value), (spelling, str(e.value))


def test_cli_budget_is_validated_like_the_environment(tmp_path, monkeypatch):
    shapes = tmp_path / "shapes.jsonl"
    shapes.write_text(json.dumps({"family": "gemm", "problem": GEMM.problem_to_dict(
        GEMM.problem_type("mm", 1, 3, 5, 7, "float32"))}) + "\n")
    rc, out, err = main("tune", "--shapes", shapes, "--max-trials", "0", cache=tmp_path / "c")
    assert rc == 1 and "TORCHTUNE_OPS_MAX_TRIALS" in err and "at least 1" in err, err
    monkeypatch.setenv("TORCHTUNE_OPS_MAX_TRIALS", "0")
    with pytest.raises(SettingsError) as env:
        settings.reload()
    monkeypatch.delenv("TORCHTUNE_OPS_MAX_TRIALS")
    assert str(env.value) in err


def _mm(m=9, n=10, k=11):
    torch.manual_seed(0)
    return torch.randn(m, k), torch.randn(k, n)


def test_entries_remember_their_budget_and_a_bigger_one_tunes_again(fake_timer):
    a, b = _mm()
    with settings.override(autotune=True, max_trials=2, time_budget=5):
        torch.ops.torchtune_ops.mm(a, b)
        [e] = store_mod.default_store().entries()
    assert (e.max_trials, e.time_budget_s) == (2, 5.0)
    # the same budget, or tuning off: the stored entry serves
    for kw in (dict(autotune=True, max_trials=2, time_budget=5), dict(autotune=False, max_trials=8)):
        dispatch.reset()
        with settings.override(**kw):
            torch.ops.torchtune_ops.mm(a, b)
        assert dispatch.stats()["problems"][0]["source"] == "store", kw
    # a bigger budget with tuning on: tuned again, and the entry now says so
    dispatch.reset()
    with settings.override(autotune=True, max_trials=4, time_budget=5):
        torch.testing.assert_close(torch.ops.torchtune_ops.mm(a, b), a @ b)
        [e] = store_mod.default_store().entries()
    assert dispatch.stats()["problems"][0]["source"] == "tuned"
    assert e.max_trials == 4
    # then it is enough for that budget
    dispatch.reset()
    with settings.override(autotune=True, max_trials=4, time_budget=5):
        torch.ops.torchtune_ops.mm(a, b)
    assert dispatch.stats()["problems"][0]["source"] == "store"


def test_an_entry_without_trials_is_tuned_again(fake_timer):
    a, b = _mm(5, 6, 7)
    p = GEMM.problem_to_dict(GEMM.problem_type("mm", 1, 5, 6, 7, "float32"))
    fp = fingerprint("cpu").key
    store_mod.default_store().put(Entry(fp, "gemm", problem_key(p), "aten", 1.0, 1.0, trials=0))
    with settings.override(autotune=True, max_trials=2):
        torch.ops.torchtune_ops.mm(a, b)
        [e] = store_mod.default_store().entries()
    assert dispatch.stats()["problems"][0]["source"] == "tuned"
    assert e.trials > 0 and e.max_trials == 2


def test_retuning_keeps_the_faster_winner_but_records_the_bigger_budget(device):
    p = GEMM.problem_type("mm", 1, 3, 5, 7, "float32")
    st = Store.open()
    first = tuner.tune_problem(GEMM, p, device=device, store=st, max_trials=2, time_budget_s=5,
                               timer=FakeTimer({"aten": 10.0}, default=0.5))
    # a second, bigger run whose every configuration is slower than the first run's winner
    again = tuner.tune_problem(GEMM, p, device=device, store=st, max_trials=3, time_budget_s=5,
                               timer=FakeTimer({"aten": 10.0}, default=2.0))
    assert again.winner == first.winner and again.time_ms == first.time_ms
    assert again.max_trials == 3
    assert st.entries()[0].max_trials == 3


def test_store_tables_carry_the_schema_version_and_budget_columns(tmp_path):
    assert store_mod.SCHEMA_VERSION == 2
    st = Store.open(tmp_path / "t.sqlite")
    cols = [r[1] for r in st._conn.execute("PRAGMA table_info(entries_v2)")]
    assert {"max_trials", "time_budget_s"} <= set(cols)
    e = st.put(Entry("fp", "gemm", "{}", "aten", 1.0, 1.0, 3, max_trials=7, time_budget_s=2.5))
    assert st.entries()[0] == e
    with pytest.raises(ValueError):
        Entry.from_dict({**e.to_dict(), "max_trials": -1})
    with pytest.raises(ValueError):
        Entry.from_dict({**e.to_dict(), "time_budget_s": math.inf})


def _entries(n=3):
    from torchtune_ops.kernels.base import CPU_INTERPRETER

    fp = fingerprint("cpu").key
    out = []
    for i, (M, N, K) in enumerate([(1, 7, 13), (127, 257, 67), (64, 64, 64)][:n]):
        p = GEMM.problem_type("mm", 1, M, N, K, "float16")
        cfg = GEMM.known_configs(p, CPU_INTERPRETER)[0].to_json()
        out.append(Entry(fp, "gemm", problem_key(GEMM.problem_to_dict(p)), cfg, 0.01 * (i + 1), 0.02 * (i + 1),
                         11 + i, max_trials=40 + i, time_budget_s=30.0))
    return out


def test_bundles_carry_the_budget_and_old_bundles_still_load(tmp_path):
    st = Store.open(tmp_path / "a" / "tuning.sqlite")
    for e in _entries():
        st.put(e)
    b = B.export_store(st)
    B.write(b, tmp_path / "b.json")
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["families"]["gemm"]["columns"][5:7] == ["max_trials", "time_budget_s"]
    got = sorted(B.load(tmp_path / "b.json").entries(), key=lambda e: e.max_trials)
    assert [(e.max_trials, e.time_budget_s) for e in got] == [(40, 30.0), (41, 30.0), (42, 30.0)]
    st2 = Store.open(tmp_path / "b" / "tuning.sqlite")
    B.import_bundle(B.load(tmp_path / "b.json"), st2, local=fingerprint("cpu"))
    assert sorted(e.max_trials for e in st2.entries()) == [40, 41, 42]
    # a bundle written before the budget columns (format version 1) loads, with an unknown budget
    old = json.loads((tmp_path / "b.json").read_text())
    old["version"] = 1
    t = old["families"]["gemm"]
    t["columns"] = t["columns"][:5] + t["columns"][7:]
    t["rows"] = [r[:5] + r[7:] for r in t["rows"]]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert {(e.max_trials, e.time_budget_s) for e in B.load(tmp_path / "old.json").entries()} == {(0, 0.0)}
    # budgets are validated like every other field
    bad = json.loads((tmp_path / "b.json").read_text())
    bad["families"]["gemm"]["rows"][0][5] = -1
    with pytest.raises(B.BundleError, match="max_trials"):
        B.parse(json.dumps(bad))


def _filled_cache(tmp_path):
    d = tmp_path / "cache"
    st = Store.open(d / "tuning.sqlite")
    for e in _entries():
        st.put(e)
    c = CONV.problem_type(N=2, C=3, H=17, W=19, K=5, R=3, S=3, padding=(1, 1, 1, 1))
    st.put(Entry(fingerprint("cpu").key, "conv2d", problem_key(CONV.problem_to_dict(c)), "aten", 0.5, 0.5, 4))
    st.close()
    return d


def test_cli_deletes_chosen_entries(tmp_path):
    d = _filled_cache(tmp_path)
    key = _entries()[1].problem
    rc, out, err = main("cache", "delete", "--family", "gemm", "--problem", key, cache=d)
    assert rc == 0 and "deleted 1" in out, (out, err)
    assert len(Store.open(d / "tuning.sqlite").entries()) == 3
    rc, out, err = main("cache", "delete", "--family", "gemm", cache=d)
    assert rc == 1 and "--all-matching" in err          # more than one entry needs --all-matching
    rc, out, err = main("cache", "delete", "--family", "gemm", "--all-matching", cache=d)
    assert rc == 0 and "deleted 2" in out
    assert [e.family for e in Store.open(d / "tuning.sqlite").entries()] == ["conv2d"]
    rc, out, err = main("cache", "delete", "--family", "gemm", "--all-matching", cache=d)
    assert rc == 1 and "no cache entry" in err


def test_cli_tune_retune_tunes_stored_entries_again(tmp_path, fake_timer, monkeypatch):
    monkeypatch.setattr(tuner, "make_timer", lambda device: fake_timer)
    d = tmp_path / "cache"
    shapes = tmp_path / "shapes.jsonl"
    p = GEMM.problem_to_dict(GEMM.problem_type("mm", 1, 3, 5, 7, "float32"))
    shapes.write_text(json.dumps({"family": "gemm", "problem": p}) + "\n")
    fp = fingerprint("cpu").key
    Store.open(d / "tuning.sqlite").put(Entry(fp, "gemm", problem_key(p), "aten", 1.0, 1.0, 5, max_trials=40,
                                              time_budget_s=30.0))
    rc, out, _ = main("tune", "--shapes", shapes, "--max-trials", "2", cache=d)
    assert rc == 0 and "cached" in out
    rc, out, err = main("tune", "--shapes", shapes, "--max-trials", "2", "--retune", cache=d)
    assert rc == 0 and "tuned" in out, (out, err)
    [e] = Store.open(d / "tuning.sqlite").entries()
    assert e.max_trials == 2 and e.source == "tuned"


# ----------------------------------------------------------------------------- 2. writes that fail
def test_cli_write_into_an_unusable_cache_fails(tmp_path):
    d = _filled_cache(tmp_path)
    B.write(B.export_store(Store.open(d / "tuning.sqlite")), tmp_path / "b.json")
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    rc, out, err = main("cache", "import", tmp_path / "b.json", cache=afile)
    assert rc == 1 and "imported" not in out and str(afile) in err, (out, err)
    shapes = tmp_path / "shapes.jsonl"
    shapes.write_text(json.dumps({"family": "gemm", "problem": GEMM.problem_to_dict(
        GEMM.problem_type("mm", 1, 3, 5, 7, "float32"))}) + "\n")
    rc, out, err = main("tune", "--shapes", shapes, "--max-trials", "2", cache=afile)
    assert rc == 1 and "problems on" not in out and str(afile) in err, (out, err)
    rc, out, err = main("cache", "stats", cache=afile)
    assert "writable      False" in out, out


# ------------------------------------------------------------------------------ 3. read-only caches
_RO_SCRIPT = """
import json, sys, warnings
from torchtune_ops.storage.store import Store
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    st = Store.open(sys.argv[1] + "/tuning.sqlite")
    got = st.entries()
    hit = st.get(got[0].fingerprint, got[0].family, got[0].problem) if got else None
print(json.dumps({"mode": st.mode, "n": len(got), "hit": hit is not None,
                  "warnings": [str(x.message) for x in w]}))
"""


def _read_only_run(d):
    """Run _RO_SCRIPT on ``d`` mounted read-only (a private mount namespace), or as an unprivileged user
    on a chmod-ed copy; None when neither is possible here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHTUNE_OPS_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    py = [sys.executable, "-c", _RO_SCRIPT, str(d)]
    if shutil.which("unshare"):
        cmd = ["unshare", "-rm", "sh", "-c", f'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" '
               f'&& shift && exec "$@"', "sh", str(d), *py]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        if r.returncode == 0:
            return json.loads(r.stdout.strip().splitlines()[-1])
    if os.geteuid() != 0:
        os.chmod(d / "tuning.sqlite", 0o444)
        os.chmod(d, 0o555)
        try:
            r = subprocess.run(py, capture_output=True, text=True, env=env, timeout=120)
        finally:
            os.chmod(d, 0o755)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])
    return None


def test_a_cache_on_a_read_only_file_system_is_used(tmp_path):
    d = _filled_cache(tmp_path)
    got = _read_only_run(d)
    if got is None:
        pytest.skip("neither a private read-only mount nor an unprivileged user is available")
    assert got["mode"] == "readonly" and got["n"] == 4 and got["hit"], got
    assert len(got["warnings"]) == 1 and "read-only" in got["warnings"][0] and "4 entries" in got["warnings"][0]
    assert os.listdir(d) == ["tuning.sqlite"] or set(os.listdir(d)) <= {"tuning.sqlite", "tuning.sqlite-wal",
                                                                           "tuning.sqlite-shm"}


def test_the_store_opens_read_only_when_the_directory_is_not_writable(tmp_path, monkeypatch):
    d = _filled_cache(tmp_path)
    real = os.access
    monkeypatch.setattr(store_mod.os, "access",
                        lambda p, mode, **kw: False if mode & os.W_OK and str(p).startswith(str(d)) else
                        real(p, mode, **kw))
    with pytest.warns(store_mod.CacheWarning, match="read-only"):
        st = Store.open(d / "tuning.sqlite")
    assert st.mode == "readonly" and len(st.entries()) == 4


# ------------------------------------------------------------------------------------ 4. explain()
class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 6)
        self.conv = nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=2)

    def forward(self, x, img):
        return torch.relu(self.l(x)), self.conv(img)


def test_explain_counts_add_up_and_rows_name_their_graph(fake_timer):
    x, img = torch.randn(3, 8), torch.randn(1, 4, 9, 11)
    m1, m2 = Two().eval(), Two().eval()
    with torch.no_grad():
        o1 = torchtune_ops.optimize(m1, autotune=True, max_trials=2, compiler="eager")
        o2 = torchtune_ops.optimize(m2, compiler="eager")
        for _ in range(3):
            o1(x, img)
        o2(x, img)
        torch.ops.torchtune_ops.mm(torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))
    buf = io.StringIO()
    data = torchtune_ops.explain(file=buf)
    text = buf.getvalue()
    for op, c in data["ops"].items():
        assert sum(c["by_source"].values()) == c["calls"], (op, c)
        assert c["hits"] + c["misses"] == c["calls"], (op, c)
    # the same shape in two models: two rows, told apart by their graph
    rows = [p for p in data["problems"] if p["op"] == "mm_act"]
    assert len(rows) == 2 and len({p["graph"] for p in rows}) == 2
    assert all("Two" in p["graph"] for p in rows)
    assert {p["source"] for p in rows} == {"tuned", "store"}
    # compile-time names are run-time names
    assert set(data["intercepted"]) <= set(data["ops"]) | {k for k in data["intercepted"] if ":" in k}
    # conv rows show every hyper-parameter
    conv = [p for p in data["problems"] if p["op"] == "conv2d"]
    assert conv and all("stride (2,1)" in p["shape"] and "padding (2,1)" in p["shape"]
                        and "dilation (1,2)" in p["shape"] and "groups 2" in p["shape"] for p in conv)
    assert "stride (2,1)" in text and "Two" in text


def test_skipped_ops_say_why():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.c3 = nn.Conv3d(2, 3, 3)
            self.t = nn.ConvTranspose2d(2, 3, 3)

        def forward(self, v, x):
            return self.c3(v).sum() + self.t(x).sum()

    with torch.no_grad():
        torchtune_ops.optimize(Skips().eval(), compiler="eager")(torch.randn(1, 2, 5, 5, 5),
                                                                 torch.randn(1, 2, 5, 5))
    buf = io.StringIO()
    data = torchtune_ops.explain(file=buf)
    text = buf.getvalue()
    reasons = data["skipped"]
    assert any("3-D" in r for r in reasons) and any("transposed" in r for r in reasons), reasons
    assert "3-D" in text and "transposed" in text


def test_cli_describes_every_conv_hyper_parameter():
    p = CONV.problem_to_dict(CONV.problem_type(N=2, C=6, H=17, W=19, K=9, R=3, S=3, stride=(2, 1),
                                               padding=(2, 2, 1, 1), dilation=(1, 2), groups=3))
    text = cli.describe_problem("conv2d", p)
    assert "s(2,1)" in text and "p(2,2,1,1)" in text and "d(1,2)" in text and "g3" in text, text


# ------------------------------------------------------------------------------------- 5. smaller
def test_record_says_when_a_problem_is_not_recorded(tmp_path):
    rec = tmp_path / "shapes.jsonl"
    with settings.override(record=str(rec)), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for n in (3, 4):
            a = torch.ones(n, 3, dtype=torch.int64)
            torch.ops.torchtune_ops.mm(a, a.t())
    msgs = [str(x.message) for x in w if "TORCHTUNE_OPS_RECORD" in str(x.message)]
    assert len(msgs) == 1 and "int64" in msgs[0], [str(x.message) for x in w]
    assert not rec.exists()


def test_cli_unknown_family_is_an_error(tmp_path):
    for cmd in (("cache", "list"), ("report",), ("cache", "export", tmp_path / "x.json")):
        rc, out, err = main(*cmd, "--family", "nope", cache=tmp_path / "c")
        assert rc == 1 and "nope" in err and "gemm" in err and "conv2d" in err, (cmd, out, err)


def test_cli_export_error_names_the_path_asked_for(tmp_path):
    d = _filled_cache(tmp_path)
    target = tmp_path / "nonexistent" / "x.json"
    rc, out, err = main("cache", "export", target, cache=d)
    assert rc == 1 and str(target) in err and ".bundle-" not in err and ".tmp" not in err, err


def test_report_plot_has_title_device_legend_and_a_bounded_size(tmp_path):
    import matplotlib  # noqa: F401  (the plot extra; scripts/setup.sh installs it)
    fp = fingerprint("cpu").key
    entries = [Entry(fp, "gemm", problem_key(GEMM.problem_to_dict(GEMM.problem_type("mm", 1, i + 1, 7, 13,
                                                                                      "float16"))),
                     "aten", 1.0, 1.0 + (i % 7) / 10, 3) for i in range(300)]
    fig = cli._speedup_figure(entries, device=fp)
    ax = fig.axes[0]
    assert "speedup" in ax.get_title().lower() and fp[:20] in fig.texts[0].get_text() + ax.get_title()
    assert ax.get_legend() is not None
    path = tmp_path / "p.png"
    cli._plot(entries, str(path), device=fp)
    with open(path, "rb") as f:
        head = f.read(24)
    w, h = struct.unpack(">II", head[16:24])
    assert w <= 1600 and h <= 1600, (w, h)


def test_demo_removes_its_temporary_cache(monkeypatch, tmp_path):
    from torchtune_ops import demo

    made = []
    real = demo.tempfile.mkdtemp

    def mkdtemp(**kw):
        made.append(real(dir=tmp_path, **kw))
        return made[-1]

    monkeypatch.setattr(demo.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(demo, "run", lambda args: 0)
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd: subprocess.CompletedProcess(cmd, 0))
    assert demo.main(["--models", "gpt2"]) == 0
    assert made and not os.path.exists(made[0])


def test_search_efficiency_without_datasets_says_what_to_do(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "search_efficiency.py"), "--smoke",
                        "--datasets", str(tmp_path / "none"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert str(tmp_path / "none") in r.stderr and "--space" in r.stderr


# ------------------------------------------------------------------------------------------ conv1d
@pytest.mark.parametrize("n,c,length,k,ks,stride,padding,dilation,groups", [
    (1, 3, 17, 5, 3, 1, 1, 1, 1),
    (2, 4, 13, 6, 5, 2, 2, 1, 2),
    (3, 1, 7, 1, 1, 1, 0, 1, 1),
    (2, 6, 31, 3, 3, 3, 0, 2, 3),
])
def test_conv1d_runs_the_conv2d_kernels_forward_and_backward(fake_timer, n, c, length, k, ks, stride, padding,
                                                             dilation, groups):
    torch.manual_seed(0)
    conv = nn.Conv1d(c, k, ks, stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = torch.randn(n, c, length, requires_grad=True)
    ref = conv(x)
    gref = torch.autograd.grad(ref.sum() * 1.0 + (ref ** 2).sum(), (x, conv.weight, conv.bias))
    oc = torchtune_ops.optimize(conv, autotune=True, max_trials=2, compiler="eager")
    out = oc(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(out.sum() * 1.0 + (out ** 2).sum(), (x, conv.weight, conv.bias))
    for g, r in zip(got, gref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    counts = backend.intercepted()
    assert counts.get("conv2d", 0) >= 1 and "skipped:convolution" not in counts, counts
    if stride == dilation == groups == 1:  # the input gradient is a conv2d too
        assert counts["conv2d"] == 2 and "skipped:convolution_backward" not in counts, counts
    rows = [p for p in dispatch.stats()["problems"] if p["op"] == "conv2d"]
    assert rows and any(p["kernel"] != "aten" for p in rows)


def test_exit_statuses_are_the_documented_ones(tmp_path, monkeypatch):
    """docs/deployment.md: 0 success, 2 usage error, 1 any other error (one line), 130 on Ctrl-C."""
    assert main("cache", "list", cache=tmp_path / "c")[0] == 0
    with pytest.raises(SystemExit) as e:
        main("cache", "no-such-action", cache=tmp_path / "c")
    assert e.value.code == 2
    rc, _, err = main("cache", "list", "--family", "nope", cache=tmp_path / "c")
    assert rc == 1 and err.count("\n") == 1 and err.startswith("torchtune-ops: error:")

    def interrupted(args, out):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli._CACHE, "stats", interrupted)
    rc, _, err = main("cache", "stats", cache=tmp_path / "c")
    assert rc == 130 and "interrupted" in err


def test_a_stale_entry_still_serves_when_tuning_it_again_fails(monkeypatch):
    a, b = _mm(4, 6, 5)
    p = GEMM.problem_to_dict(GEMM.problem_type("mm", 1, 4, 6, 5, "float32"))
    fp = fingerprint("cpu").key
    store_mod.default_store().put(Entry(fp, "gemm", problem_key(p), "aten", 1.0, 1.0, trials=3, max_trials=3,
                                        time_budget_s=30.0))

    def broken(*args, **kw):
        raise RuntimeError("no tuning today")

    monkeypatch.setattr(tuner, "tune_problem", broken)
    with settings.override(autotune=True, max_trials=8), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(torch.ops.torchtune_ops.mm(a, b), a @ b)
    assert dispatch.stats()["problems"][0]["source"] == "store"


def test_a_table_of_this_version_without_the_budget_columns_gets_them(tmp_path):
    """A build that made entries_v2 without our budget columns (another branch's v2) leaves a file this one
    can open: the missing columns, which have defaults, are added."""
    import sqlite3

    path = tmp_path / "tuning.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(f"""CREATE TABLE entries_v{store_mod.SCHEMA_VERSION} (fingerprint TEXT NOT NULL,
        family TEXT NOT NULL, problem TEXT NOT NULL, winner TEXT NOT NULL, time_ms REAL NOT NULL,
        aten_ms REAL NOT NULL, trials INTEGER NOT NULL, created TEXT NOT NULL, source TEXT NOT NULL,
        host_ms REAL NOT NULL DEFAULT 0, PRIMARY KEY (fingerprint, family, problem)) WITHOUT ROWID""")
    conn.execute(f"INSERT INTO entries_v{store_mod.SCHEMA_VERSION} VALUES ('fp','gemm','{{}}','aten',1,1,3,'x',"
                 "'tuned',0.5)")
    conn.commit()
    conn.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", store_mod.CacheWarning)
        st = Store.open(path)
    assert st.mode == "disk"
    [old] = st.entries()
    assert (old.trials, old.max_trials, old.time_budget_s) == (3, 0, 0.0)
    st.put(Entry("fp", "gemm", '{"M":1}', "aten", 1.0, 1.0, 2, max_trials=5, time_budget_s=1.5))
    assert Store.open(path, readonly=True).get("fp", "gemm", '{"M":1}').max_trials == 5


def test_cli_tune_cached_retunes_chosen_cache_entries(tmp_path, fake_timer, monkeypatch):
    monkeypatch.setattr(tuner, "make_timer", lambda device: fake_timer)
    d = tmp_path / "cache"
    fp = fingerprint("cpu").key
    keys = []
    for m in (3, 4):
        p = GEMM.problem_to_dict(GEMM.problem_type("mm", 1, m, 5, 7, "float32"))
        keys.append(problem_key(p))
        Store.open(d / "tuning.sqlite").put(Entry(fp, "gemm", keys[-1], "aten", 1.0, 1.0, 5, max_trials=40,
                                                  time_budget_s=30.0))
    assert main("tune", "--cached", cache=d)[0] == 1                # which entries? an error, not all of them
    rc, out, err = main("tune", "--cached", "--problem", keys[0], "--retune", "--max-trials", "2", cache=d)
    assert rc == 0 and "1 problems" in out and "tuned" in out, (out, err)
    got = {e.problem: e for e in Store.open(d / "tuning.sqlite").entries()}
    assert got[keys[1]].trials == 5 and got[keys[1]].max_trials == 40      # not chosen: untouched
    assert got[keys[0]].max_trials == 2 and got[keys[0]].winner != "aten"   # chosen: tuned again (replaced)


def test_demo_second_run_is_served_by_the_cache(tmp_path):
    """The main job end to end (tiny models, one trial a problem): the second process tunes nothing and is
    served by the cache, ops whose winner is PyTorch's kernel left to Inductor at compile time included."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHTUNE_OPS_")}
    r = subprocess.run([sys.executable, "-m", "torchtune_ops.demo", "--max-trials", "1", "--cache-dir",
                        str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    second = r.stdout.split("second run (cache only)", 1)[1]
    assert "tuned 0" in second and "demo passed" in second, second
