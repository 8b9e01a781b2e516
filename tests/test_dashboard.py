"""``torchtune-ops dashboard``: the store's trial history as Optuna studies, served by optuna-dashboard."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest

from torchtune_ops.storage import dashboard
from torchtune_ops.storage.store import Entry, Store, problem_key

H100 = "NVIDIA H100 80GB HBM3|cc9.0|sm132|torch2.11.0|triton3.6.0|k0123456789ab"
A100 = "NVIDIA A100-SXM4-40GB|cc8.0|sm108|torch2.11.0|triton3.6.0|k0123456789ab"


def _problem(M, N, K):
    return problem_key({"op": "mm", "batch": 1, "M": M, "N": N, "K": K, "dtype": "float16"})


def _config(i):
    return {"BLOCK_M": [16, 32, 64][i % 3], "BLOCK_N": [32, 64][i % 2], "num_warps": [4, 8][(i // 2) % 2],
            "order": ["row", "swizzle"][(i // 3) % 2]}


# (fingerprint, problem, trials per run, failures per run, runs)
PROBLEMS = [(H100, _problem(127, 257, 67), 9, 2, 1), (H100, _problem(1, 7, 13), 5, 0, 2),
            (A100, _problem(127, 257, 67), 4, 1, 1)]


@pytest.fixture
def cache(tmp_path):
    d = tmp_path / "cache"
    store = Store.open(d / "tuning.sqlite")
    for fp, problem, n, failed, runs in PROBLEMS:
        for run in range(runs):
            trials = [(_config(i), math.inf if i < failed else 0.1 + 0.01 * ((i * 7) % 5) + run)
                      for i in range(n)]
            entry = Entry(fp, "gemm", problem, json.dumps(_config(failed), sort_keys=True), 0.1, 0.2, n)
            store.put(entry, trials=trials, policy="replace")
    store.close()
    return d


def cli(*args, cache, env=None, **kw):
    e = {k: v for k, v in os.environ.items() if not k.startswith("TORCHTUNE_OPS_")}
    e.update(TORCHTUNE_OPS_CACHE_DIR=str(cache), PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "torchtune_ops", *map(str, args)], env=e, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def expected():
    return {dashboard.study_name(fp, "gemm", p): (n * runs, failed * runs) for fp, p, n, failed, runs in PROBLEMS}


def test_export_writes_one_study_per_problem_named_after_problem_and_device(cache, tmp_path):
    target = str(tmp_path / "history.db")  # SQLite
    p = cli("dashboard", "--no-serve", "--storage", target, cache=cache)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    total = sum(n for n, _ in expected().values())
    assert f"wrote 3 studies ({total} trials)" in out and f"optuna-dashboard {target}" in out
    storage = dashboard.open_storage(target)
    studies = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    assert set(studies) == set(expected())
    names = sorted(studies)
    assert any("mm 127x257x67 float16 on NVIDIA H100 80GB HBM3" in n for n in names)
    assert any("mm 127x257x67 float16 on NVIDIA A100-SXM4-40GB" in n for n in names)
    for name, (n, failed) in expected().items():
        study = optuna.load_study(study_name=name, storage=storage)
        states = [t.state for t in study.trials]
        assert len(states) == n and states.count(optuna.trial.TrialState.FAIL) == failed
        assert study.user_attrs["family"] == "gemm" and study.user_attrs["aten_ms"] == 0.2
        assert set(study.trials[-1].params) == {"BLOCK_M", "BLOCK_N", "num_warps", "order"}
        assert study.best_value == min(t.value for t in study.trials if t.value is not None)
    # exporting again replaces the studies instead of adding to them
    again = dashboard.export(Store.open(cache / "tuning.sqlite", readonly=True), target)
    assert sorted((s.name, s.trials, s.failed) for s in again) == sorted((k, *v) for k, v in expected().items())
    assert len(optuna.get_all_study_summaries(dashboard.open_storage(target))) == 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_dashboard_serves_the_studies_on_loopback(cache, tmp_path):
    import optuna_dashboard  # noqa: F401  (the dashboard extra; scripts/setup.sh installs it)
    port = _free_port()
    p = cli("dashboard", "--port", port, cache=cache)  # the default storage: a journal file in the cache
    try:
        deadline, studies = time.monotonic() + 90, None
        while time.monotonic() < deadline and p.poll() is None:
            try:
                studies = _get(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
                break
            except OSError:
                time.sleep(0.3)
        assert studies is not None, p.stderr.read() if p.poll() is not None else "no answer in 90 s"
        assert {s["study_name"] for s in studies} == set(expected())
        for s in studies:
            detail = _get(f"http://127.0.0.1:{port}/api/studies/{s['study_id']}")
            n, failed = expected()[s["study_name"]]
            assert len(detail["trials"]) == n
            assert sum(t["state"] == "Fail" for t in detail["trials"]) == failed
    finally:
        p.terminate()
        out, _ = p.communicate(timeout=30)
    assert f"serving optuna-dashboard on http://127.0.0.1:{port}/" in out
    assert (cache / "dashboard.log").exists()


def test_a_clear_error_names_the_extra_when_optuna_dashboard_is_missing(cache, tmp_path):
    block = tmp_path / "block" / "optuna_dashboard"
    block.mkdir(parents=True)
    (block / "__init__.py").write_text("raise ImportError('not installed')\n")
    path = os.pathsep.join([str(block.parent), os.environ.get("PYTHONPATH", "")])
    p = cli("dashboard", "--storage", tmp_path / "h.log", cache=cache, env={"PYTHONPATH": path})
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1
    assert "pip install 'torchtune-ops[dashboard]'" in err and "--no-serve" in err
