"""Faults injected into tuning and the cache, through the tuner, the ops and optimize(): crashing and
hanging candidates (worker process), Ctrl-C, a full / read-only / vanished / unusable / corrupt cache,
timing noise, problems too large for the memory left, hostile cache rows. Every fault must cost no wrong
result, no lost entry and no crash of the caller.

Kept elsewhere (not repeated here): two processes tuning the same problem
(test_tuner.py::test_two_processes_tuning_the_same_problem_store_one_result), Ctrl-C inside the tuner
(test_tuner.py::test_ctrl_c_leaves_no_entry_and_no_claim) and inside a write
(test_store.py::test_ctrl_c_during_a_write_rolls_back), SIGKILL mid-write, 4 processes meeting a corrupt
file (test_store.py)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import sqlite3
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import torchtune_ops
import torchtune_ops.runtime.ops  # noqa: F401  (registers the ops)
from torchtune_ops.runtime import dispatch
from torchtune_ops import settings
from torchtune_ops.storage import store as store_mod
from torchtune_ops.tuning import tuner, worker
from torchtune_ops.errors import KernelFailure
from torchtune_ops.kernels.base import Config, KernelFamily
from torchtune_ops.storage.store import CacheWarning, Entry, Store, default_store, problem_key
from torchtune_ops.tuning.timing import FakeTimer, Timing
from torchtune_ops.tuning.tuner import TuningSkipped, tune_problem

ops = torch.ops.torchtune_ops
FP = "fake-gpu|faults"
ROOT = Path(__file__).resolve().parents[1]

# figures for the closing note (written to benchmarks/results/faults_summary.json by _summary)
FIGURES = {"faults_injected": 0, "wrong_results": 0, "entries_lost": 0, "worker_restarts": 0}


def _fault(n: int = 1) -> None:
    FIGURES["faults_injected"] += n


def _check_close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    try:
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol, equal_nan=True)
    except AssertionError:
        FIGURES["wrong_results"] += 1
        raise


def _check_kept(st: Store, entries: list[Entry]) -> None:
    """Every entry stored before the fault is still served."""
    lost = [e for e in entries if st.get(*e.key, refresh=True) != e]
    FIGURES["entries_lost"] += len(lost)
    assert not lost


def write_figures(part: str, figures: dict) -> None:
    """Print one test file's figures; with FAULTS_SUMMARY=<path> set, also merge them into that JSON file
    (with the machine, the versions and the date), e.g. benchmarks/results/faults_summary.json. A plain
    test run leaves the checkout untouched."""
    import datetime
    import platform

    import triton

    print(f"\n[{part}] " + ", ".join(f"{k}: {v}" for k, v in figures.items()))
    if not os.environ.get("FAULTS_SUMMARY"):
        return
    path = Path(os.environ["FAULTS_SUMMARY"])
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    data[part] = dict(figures, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    data["machine"] = f"{platform.node()} ({platform.machine()}, {'cuda' if torch.cuda.is_available() else 'cpu'})"
    data["versions"] = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    parts = [v for k, v in data.items() if k.startswith("test_") and isinstance(v, dict)]
    data["total"] = {k: sum(int(p.get(k, 0)) for p in parts)
                     for k in ("inputs_tried", "faults_injected", "wrong_results", "entries_lost")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    write_figures("test_faults", FIGURES)


@pytest.fixture(autouse=True)
def _budget_independent_of_the_machine():
    """A benchmark worker's start (a fresh Python importing torch) and its restart after a crash take seconds,
    many more on a loaded machine: under the default 30 s budget an isolated search could stop before its
    first working candidate and leave PyTorch's kernel the winner. The budget is not what these tests check."""
    with settings.override(time_budget=600):
        yield


@pytest.fixture(autouse=True)
def _fresh_dispatch():
    dispatch.reset()
    dispatch.set_tune_options(timer=None)
    tuner._skipped.clear()
    yield
    dispatch.reset()
    dispatch.set_tune_options(timer=None)


@pytest.fixture
def tuning_on():
    """Tuning on, with a fake timer under which every Triton configuration beats aten (fast, so that the
    Triton kernel really runs afterwards)."""
    dispatch.set_tune_options(timer=FakeTimer({"aten": 10.0}, default=1.0))
    with settings.override(autotune=True, max_trials=1, time_budget=30):
        yield


def _ours(caught) -> list:
    return [w for w in caught if issubclass(w.category, (CacheWarning, RuntimeWarning))
            and "torchtune_ops" in str(w.message)]


# ---------------------------------------------------------------------------------------------------------
# A fake family whose candidates crash, hang or fail, measured in a worker process.

@dataclasses.dataclass(frozen=True)
class ToyProblem:
    n: int
    dtype: str = "float32"
    faults: str = "crash,hang,error,wrong"  # the faulty configurations in this problem's space


class ToyFamily(KernelFamily):
    """y = 2x + 1 after sleeping ``BLOCK`` ms; MODE "crash" kills the process (os._exit), "hang" never
    returns, "error" raises, "wrong" is off by 0.5. Aten sleeps 30 ms, so any working candidate wins."""

    name = "toy"
    problem_type = ToyProblem

    def space(self, problem):
        return {"BLOCK": (1, 2), "MODE": ("ok", "crash", "hang", "error", "wrong")}

    def check(self, config, problem, limits):
        if config["MODE"] == "ok" or (config["BLOCK"] == 1 and config["MODE"] in problem.faults.split(",")):
            return None
        return "not in this problem"

    def known_configs(self, problem, limits):
        order = ("crash", "hang", "error", "wrong", "ok")
        return [Config.of(BLOCK=1, MODE=m) for m in order if self.check({"BLOCK": 1, "MODE": m}, problem, limits)
                is None]

    def make_inputs(self, problem, device, *, seed=0):
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(problem.n, generator=gen).to(device),)

    def reference(self, problem, inputs):
        time.sleep(0.03)
        return inputs[0] * 2 + 1

    def launch(self, config, problem, inputs, out=None):
        cfg = config.as_dict() if isinstance(config, Config) else dict(config)
        mode = cfg["MODE"]
        if mode == "crash":
            os._exit(1)  # what an illegal memory access does to a process, seen from outside
        if mode == "hang":
            while True:
                time.sleep(1)
        if mode == "error":
            raise RuntimeError("injected launch error")
        time.sleep(cfg["BLOCK"] / 1000)
        y = inputs[0] * 2 + 1
        return y + 0.5 if mode == "wrong" else y


TOY = ToyFamily()
TOY_PROBLEM = ToyProblem(n=29)


def _toy_cfg(**kw) -> str:
    return Config.of(**kw).to_json()


def test_family_references_resolve_to_our_families_only():
    from torchtune_ops.kernels.gemm import GEMM

    assert worker.family_ref(GEMM) == "gemm" and worker.resolve_family("gemm") is GEMM
    ref = worker.family_ref(TOY)
    assert ref.endswith(":TOY") and isinstance(worker.resolve_family(ref), ToyFamily)
    for hostile in ("os:system", "builtins:eval", "no_such_module:X", "os:path.join", "nonexistent"):
        with pytest.raises(worker.WorkerError):
            worker.resolve_family(hostile)

    class Local(ToyFamily):  # not importable by a worker
        pass

    assert worker.family_ref(Local()) is None
    with pytest.raises(ValueError):
        worker.WorkerTimer(Local(), TOY_PROBLEM, device="cpu")


def test_crashing_hanging_and_failing_candidates_are_scored_failed_in_the_worker(tmp_path):
    """Each fault once: a crash and a hang replace the worker, an error and a wrong result are scored; the
    search goes on, the working configuration wins, this process is unharmed."""
    timer = worker.WorkerTimer(TOY, TOY_PROBLEM, device="cpu", timeout_s=3.0)
    _fault(4)
    try:
        with Store.open(tmp_path / "c.sqlite") as st, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.monotonic()
            e = tune_problem(TOY, TOY_PROBLEM, device="cpu", store=st, timer=timer, fingerprint=FP,
                             max_trials=6, patience=0)
            elapsed = time.monotonic() - t0
            trials = {t.config: t.value_ms for t in st.trials(FP, "toy")}
    finally:
        timer.close()
    FIGURES["worker_restarts"] += timer.restarts
    assert e.winner in (_toy_cfg(BLOCK=1, MODE="ok"), _toy_cfg(BLOCK=2, MODE="ok"))
    assert e.time_ms < e.aten_ms
    for mode in ("crash", "hang", "error", "wrong"):
        assert trials[_toy_cfg(BLOCK=1, MODE=mode)] == math.inf, mode
    assert timer.restarts == 2  # the crash and the hang
    assert "crashed" in timer.failures[_toy_cfg(BLOCK=1, MODE="crash")]
    assert "hung" in timer.failures[_toy_cfg(BLOCK=1, MODE="hang")]
    # the hang was cut off after its 3 s timeout: a hang never returns, and the bound stays below the 180 s a
    # worker's start may take, with room for two worker starts on a loaded machine
    assert elapsed < 150


def test_isolation_is_the_default_on_a_gpu_and_can_be_asked_for_on_cpu(tmp_path, monkeypatch):
    made = []
    real = worker.WorkerTimer

    class Spy(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(worker, "WorkerTimer", Spy)
    st = Store.open(tmp_path / "c.sqlite")
    tune_problem(TOY, ToyProblem(n=3), device="cpu", store=st, fingerprint=FP, time_budget_s=1e-9)
    assert made == []  # CPU: in this process by default
    assert not tuner._isolated(None, "cpu") and tuner._isolated(True, "cpu")
    with settings.override(bench_subprocess=False):
        assert not tuner._isolated(None, "cuda")
    assert tuner._isolated(None, "cuda")
    _fault()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = tune_problem(TOY, ToyProblem(n=5, faults="crash"), device="cpu", store=st, fingerprint=FP,
                         max_trials=3, isolate=True, patience=0)  # a crash is isolated by default too
    assert len(made) == 1 and made[0].restarts == 1 and e.winner != "aten"
    FIGURES["worker_restarts"] += made[0].restarts
    st.close()


def test_a_real_gemm_through_the_worker(tmp_path):
    from torchtune_ops.kernels.gemm import GEMM, GemmProblem

    problem = GemmProblem(op="mm", batch=1, M=9, N=7, K=11, dtype="float32")
    with Store.open(tmp_path / "c.sqlite") as st:
        e = tune_problem(GEMM, problem, device="cpu", store=st, max_trials=2, isolate=True)
        assert e.trials == 2 and all(math.isfinite(t.value_ms) for t in st.trials(e.fingerprint, "gemm"))
        assert e.aten_ms > 0


def test_the_idle_worker_is_reused_and_stopped_at_shutdown(tmp_path):
    with Store.open(tmp_path / "c.sqlite") as st:
        tune_problem(TOY, ToyProblem(n=11, faults="error"), device="cpu", store=st, fingerprint=FP, isolate=True)
        first = worker._idle["cpu"]
        tune_problem(TOY, ToyProblem(n=12, faults="error"), device="cpu", store=st, fingerprint=FP, isolate=True)
        assert worker._idle["cpu"] is first and first.alive()  # one worker served both problems
        assert len(st.entries()) == 2
    worker.shutdown()
    assert not first.alive() and worker._idle == {}


def test_ctrl_c_while_a_worker_measures_leaves_nothing_behind(tmp_path):
    problem = ToyProblem(n=7, faults="error")
    key = (FP, "toy", problem_key(TOY.problem_to_dict(problem)))

    def interrupt(p):
        if p.trial == 1:
            raise KeyboardInterrupt

    _fault()
    with Store.open(tmp_path / "c.sqlite") as st:
        with pytest.raises(KeyboardInterrupt):
            tune_problem(TOY, problem, device="cpu", store=st, fingerprint=FP, isolate=True,
                         progress=interrupt)
        assert st.entries() == [] and st.trials() == [] and not st.claimed(*key)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e = tune_problem(TOY, problem, device="cpu", store=st, fingerprint=FP, isolate=True,
                             max_trials=3)
        assert e.source == "tuned" and st.get(*key) == e


def test_ctrl_c_during_tuning_in_an_op_leaves_the_cache_consistent():
    """Ctrl-C reaches the model's caller through the op; nothing partial is stored, no claim is held, and
    the next call tunes normally."""
    calls = []

    class Interrupting(FakeTimer):
        def __call__(self, fn, *, key):
            calls.append(key)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return super().__call__(fn, key=key)

    a, b = torch.randn(6, 5), torch.randn(5, 4)
    dispatch.set_tune_options(timer=Interrupting({"aten": 10.0}, default=1.0))
    _fault()
    with settings.override(autotune=True, max_trials=2):
        with pytest.raises(KeyboardInterrupt):
            ops.mm(a, b)
        st = default_store()
        assert st.entries() == [] and st.trials() == []
        assert dispatch.stats()["problems"] == []  # nothing remembered in memory either
        _check_close(ops.mm(a, b), torch.mm(a, b))
        [e] = st.entries()
        assert not st.claimed(*e.key) and e.trials == 2


# ---------------------------------------------------------------------------------------------------------
# The cache under faults, through the ops (dispatch -> tuner -> store).

FIRST = ((6, 5, 4), (7, 3, 2))
LATER = ((9, 4, 3), (2, 8, 5), (3, 3, 3))


def _run_mm(shapes=FIRST) -> list[Entry]:
    """One mm per shape through the op (tuned on first sight), checked against torch; the entries now
    in the store."""
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        _check_close(ops.mm(a, b), torch.mm(a, b))
    return default_store().entries()


class _FullDisk:
    """The store's connection on a full disk: every write fails with SQLITE_FULL, reads work."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def _write(self, sql: str) -> None:
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE")):
            e = sqlite3.OperationalError("database or disk is full")
            e.sqlite_errorcode = 13  # SQLITE_FULL
            raise e

    def execute(self, sql, *args):
        self._write(sql)
        return self._conn.execute(sql, *args)

    def executemany(self, sql, *args):
        self._write(sql)
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def _disk_full(st: Store) -> None:
    st._conn = _FullDisk(st._conn)


def _read_only(st: Store) -> None:
    st._conn.execute("PRAGMA query_only=1")  # SQLITE_READONLY on the next write, as on a read-only mount


def _vanish(st: Store) -> None:
    shutil.rmtree(st.path.parent)


def _blocked(st: Store) -> None:
    shutil.rmtree(st.path.parent)
    st.path.parent.write_text("a file where the cache directory was: cannot be recreated")


@pytest.mark.parametrize("fault, mode", [(_disk_full, "memory"), (_read_only, "memory"), (_vanish, "disk"),
                                         (_blocked, "memory")], ids=["disk_full", "read_only", "vanished", "blocked"])
def test_cache_faults_mid_run_warn_once_and_the_model_goes_on(tuning_on, fault, mode):
    before = _run_mm()
    assert len(before) == 2
    st = default_store()
    fault(st)
    _fault()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = _run_mm(LATER)
        for _ in range(2):  # hits, old and new: no further warning, no tuning
            _run_mm(FIRST + LATER[:1])
    ours = _ours(caught)
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert st.mode == mode and {e.problem for e in before + after} >= {e.problem for e in after}
    assert len(after) == (3 if fault is _vanish else 5)  # rmtree took the file (and its 2 entries) away
    if fault in (_disk_full, _read_only):
        _check_kept(st, before)  # what was tuned before the fault is still served by the store
    counts = dispatch.stats()["ops"]["mm"]
    assert counts["tuned"] == 5 and counts.get("failed", 0) == 0 and counts["hits"] == 6


def test_an_unwritable_cache_directory_gives_memory_with_one_warning(tuning_on, tmp_path):
    d = tmp_path / "locked"
    d.mkdir()
    os.chmod(d, 0o500)
    _fault()
    try:
        with settings.override(cache_dir=str(d / "sub")), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if os.geteuid() == 0:  # root ignores permissions: make the directory impossible instead
                os.chmod(d, 0o700)
                (d / "sub").write_text("not a directory")
            entries = _run_mm()
            _run_mm()
            assert default_store().mode == "memory" and len(entries) == 2
            assert not (d / "sub").is_dir()
        assert len(_ours(caught)) == 1
    finally:
        os.chmod(d, 0o700)


def test_a_corrupt_cache_file_is_moved_aside_and_the_ops_keep_running(tuning_on):
    path = store_mod.default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a database" * 100)
    _fault()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries = _run_mm()
    assert len(_ours(caught)) == 1 and "corrupt" in str(_ours(caught)[0].message)
    assert len(entries) == 2 and default_store().mode == "disk"
    assert list(path.parent.glob("tuning.sqlite.corrupt-*"))
    with Store.open(path) as fresh:  # rebuilt and persistent
        assert len(fresh.entries()) == 2


def test_a_corrupt_cache_file_under_optimize(tmp_path):
    cache = tmp_path / "opt-cache"
    cache.mkdir()
    (cache / store_mod.DB_NAME).write_bytes(b"\x00garbage" * 512)
    dispatch.set_tune_options(timer=FakeTimer({"aten": 10.0}, default=1.0))
    torch._dynamo.reset()
    lin = torch.nn.Linear(6, 5)
    fn = torchtune_ops.optimize(lin, autotune=True, max_trials=1, cache_dir=cache, compiler="eager")
    x = torch.randn(3, 6)
    _fault()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = fn(x)
    _check_close(out, lin(x).detach())
    assert any("corrupt" in str(w.message) for w in _ours(caught))
    with Store.open(cache / store_mod.DB_NAME) as st:
        assert len(st.entries()) >= 1
    torch._dynamo.reset()


def test_hostile_cache_rows_select_only_valid_kernels_or_aten(tuning_on):
    """Rows written by someone else: code in the winner, an unknown parameter, absurd block sizes, a
    negative time. None is executed or trusted; results stay PyTorch's."""
    a, b = torch.randn(6, 5), torch.randn(5, 4)
    _check_close(ops.mm(a, b), torch.mm(a, b))
    [e] = default_store().entries()
    table = f"entries_v{store_mod.SCHEMA_VERSION}"
    marker = Path(store_mod.default_path()).parent / "pwned"
    hostile = [
        f"__import__('os').system('touch {marker}')",
        json.dumps({"BLOCK_M": 16, "EVIL": f"__import__('os').system('touch {marker}')"}),
        json.dumps({"BLOCK_M": 1 << 30, "BLOCK_N": -4, "BLOCK_K": 0}),
        json.dumps({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": "; rm -rf /"}),
    ]
    for winner in hostile:
        dispatch.reset()
        conn = sqlite3.connect(str(store_mod.default_path()))
        conn.execute(f"UPDATE {table} SET winner=?, time_ms=0.1 WHERE problem=?", (winner, e.problem))
        conn.commit()
        conn.close()
        store_mod._defaults.clear()  # a new process would read the hostile row fresh
        _fault()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(2):
                _check_close(ops.mm(a, b), torch.mm(a, b))
    assert not marker.exists()
    conn = sqlite3.connect(str(store_mod.default_path()))
    conn.execute(f"UPDATE {table} SET time_ms=-5 WHERE problem=?", (e.problem,))
    conn.commit()
    conn.close()
    store_mod._defaults.clear()
    dispatch.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check_close(ops.mm(a, b), torch.mm(a, b))
    assert any("malformed" in str(w.message) for w in caught)


def test_the_cache_directory_is_private_when_made_by_the_ops(tuning_on):
    _run_mm()
    path = store_mod.default_path()
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600


def test_no_pickle_eval_or_exec_in_the_package_source():
    """A complement to the behavioural tests above: the cache, bundles and worker protocol are data
    only, so nothing in the package may unpickle, eval or exec."""
    unpickler = r"(pickle|cPickle|_pickle|marshal|shelve|dill|joblib)"
    pattern = re.compile(rf"^\s*(import|from)\s+{unpickler}\b|\b{unpickler}\.\w+\(|(?<![.\w])(eval|exec)\s*\("
                         r"|\bshell\s*=\s*True|\bos\.system\(")
    hits = []
    for path in (ROOT / "torchtune_ops").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            loads_pickle = "torch.load(" in code and "weights_only=True" not in code
            if pattern.search(code) or loads_pickle:
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert hits == []
    # and the pattern finds what it is meant to find
    assert pattern.search("import pickle") and pattern.search("x = eval(text)")
    assert pattern.search("marshal.loads(b)") and not pattern.search("model.eval()")


# ---------------------------------------------------------------------------------------------------------
# Timing noise.

class NoisyTimer:
    """Every candidate and aten take the same true time; each measurement is 25 samples with 5% noise."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def __call__(self, fn, *, key):
        fn()
        return Timing.from_samples([self.rng.gauss(1.0, 0.05) for _ in range(25)])


def test_noise_alone_never_makes_a_winner(tmp_path):
    """With 18 equal candidates the best first measurement is always lucky; re-timing and the noise
    margin must keep aten in every one of 25 seeded runs."""
    from test_tuner import PROBLEM, ScaleFamily

    winners = []
    with Store.open(tmp_path / "c.sqlite") as st:
        for seed in range(25):
            e = tune_problem(ScaleFamily(), PROBLEM, device="cpu", store=st, timer=NoisyTimer(seed),
                             fingerprint=f"{FP}-{seed}", max_trials=18, patience=0, seed=seed)
            winners.append(e.winner)
    _fault(25)
    assert winners == ["aten"] * 25


def test_a_real_margin_wins_through_the_same_noise(tmp_path):
    from test_tuner import PROBLEM, ScaleFamily

    best = Config.of(BLOCK=2, MODE="col", UNROLL=1).to_json()

    class Faster(NoisyTimer):
        def __call__(self, fn, *, key):
            t = super().__call__(fn, key=key)
            if key != best:
                return t
            return Timing(t.median_ms * 0.7, t.p20_ms * 0.7, t.p80_ms * 0.7, t.min_ms * 0.7, t.n)

    with Store.open(tmp_path / "c.sqlite") as st:
        wins = sum(tune_problem(ScaleFamily(), PROBLEM, device="cpu", store=st, timer=Faster(seed),
                                fingerprint=f"{FP}-{seed}", max_trials=18, patience=0).winner == best
                   for seed in range(10))
    assert wins == 10


# ---------------------------------------------------------------------------------------------------------
# Problems too large to tune in the memory left.

def test_memory_estimate_covers_the_inputs_the_tuner_makes():
    from torchtune_ops.kernels.conv import CONV2D, ConvProblem
    from torchtune_ops.kernels.gemm import GEMM, GemmProblem

    for fam, prob in ((GEMM, GemmProblem(op="baddbmm", batch=3, M=17, N=13, K=19, dtype="float16", bias="full")),
                      (CONV2D, ConvProblem(N=2, C=3, H=9, W=7, K=5, R=3, S=3, padding=(1, 1, 1, 1),
                                           dtype="float32"))):
        inputs = fam.make_inputs(prob, "cpu")
        made = sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))
        out = fam.reference(prob, inputs)
        need = tuner.memory_estimate(fam, prob)
        assert need >= 2 * made + 2 * out.numel() * out.element_size()
        assert need < 20 * (made + out.numel() * out.element_size())  # not absurdly pessimistic
    assert tuner.memory_estimate(TOY, TOY_PROBLEM) == 0  # unknown problems are not checked
    assert tuner.free_memory("cpu") is None or tuner.free_memory("cpu") > 0


def test_a_problem_too_large_for_the_memory_left_is_not_tuned(tuning_on, monkeypatch):
    monkeypatch.setattr(tuner, "free_memory", lambda device: 1000)  # 1 kB free
    measured = []

    class Spy(FakeTimer):
        def __call__(self, fn, *, key):
            measured.append(key)
            return super().__call__(fn, key=key)

    dispatch.set_tune_options(timer=Spy({"aten": 10.0}, default=1.0))
    a, b = torch.randn(20, 30), torch.randn(30, 10)
    _fault()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in (a, a.t().contiguous().t()):  # two keys (strides) of the same problem... 
            for _ in range(2):
                _check_close(ops.mm(x, b), torch.mm(x, b))
    skipped = [w for w in caught if issubclass(w.category, TuningSkipped)]
    assert len(skipped) == 2 and "MiB" in str(skipped[0].message)  # ...one per problem (layouts differ)
    assert measured == [] and default_store().entries() == []
    assert {(p["kernel"], p["source"]) for p in dispatch.stats()["problems"]} == {("aten", "too-large")}
    # small problems still tune
    monkeypatch.setattr(tuner, "free_memory", lambda device: 10**9)
    c = torch.randn(3, 30)
    _check_close(ops.mm(c, b), torch.mm(c, b))
    assert len(default_store().entries()) == 1


def test_too_large_problem_through_the_tuner_returns_unstored_aten(tmp_path, monkeypatch):
    from torchtune_ops.kernels.gemm import GEMM, GemmProblem

    monkeypatch.setattr(tuner, "free_memory", lambda device: 4096)
    problem = GemmProblem(op="mm", batch=1, M=64, N=64, K=64, dtype="float32")
    with Store.open(tmp_path / "c.sqlite") as st, pytest.warns(TuningSkipped):
        e = tune_problem(GEMM, problem, device="cpu", store=st, timer=FakeTimer({}, default=1.0))
        assert e.winner == "aten" and e.source == "too-large" and st.entries() == []
        assert not st.claimed(*e.key)


def test_two_threads_tuning_the_same_problem_tune_it_once(tmp_path):
    """The store's claim belongs to the process, so threads of one process queue on a lock: one tunes,
    the other gets its answer; one entry and one trial history."""
    import threading

    from test_tuner import PROBLEM, ScaleFamily

    class Slow(FakeTimer):
        def __call__(self, fn, *, key):
            time.sleep(0.01)
            return super().__call__(fn, key=key)

    timers = [Slow({"aten": 1.0}, default=0.5) for _ in range(2)]
    results = [None, None]
    with Store.open(tmp_path / "c.sqlite") as st:
        def tune(i):
            results[i] = tune_problem(ScaleFamily(), PROBLEM, device="cpu", store=st, timer=timers[i],
                                      fingerprint=FP, max_trials=18, patience=0, wait_s=60)

        threads = [threading.Thread(target=tune, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _fault()
        assert results[0] == results[1] and results[0].source == "tuned"
        assert sorted(len(t.calls) > 0 for t in timers) == [False, True]  # one of them measured nothing
        assert len(st.entries()) == 1 and len({t.run for t in st.trials()}) == 1
        assert not st.claimed(*results[0].key)


def test_a_cached_configuration_outside_the_family_space_is_never_launched(tuning_on, monkeypatch):
    """A well-formed row (valid JSON, known parameters, plain values) whose configuration is not one of
    the family's valid ones for the problem: validated like a bundle's, refused with one warning, and
    PyTorch's kernel runs. Nothing outside the space ever reaches a kernel launch."""
    from torchtune_ops.kernels import gemm as kgemm

    a, b = torch.randn(6, 5), torch.randn(5, 4)
    _check_close(ops.mm(a, b), torch.mm(a, b))
    [e] = default_store().entries()
    table = f"entries_v{store_mod.SCHEMA_VERSION}"
    launched = []
    real = kgemm.gemm

    def spy(*args, config, **kw):
        launched.append(dict(config.as_dict() if hasattr(config, "as_dict") else config))
        return real(*args, config=config, **kw)

    monkeypatch.setattr(kgemm, "gemm", spy)
    for change in ({"BLOCK_M": 2048}, {"num_warps": 3}, {"SPLIT_K": 64}, {"GROUP_M": 0}):
        hostile = dict(e.config(), **change)
        conn = sqlite3.connect(str(store_mod.default_path()))
        conn.execute(f"UPDATE {table} SET winner=? WHERE problem=?", (json.dumps(hostile), e.problem))
        conn.commit()
        conn.close()
        store_mod._defaults.clear()  # as a new process would read it
        dispatch.reset()
        _fault()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                _check_close(ops.mm(a, b), torch.mm(a, b))
        assert hostile not in launched, change
        assert len(_ours(caught)) == 1, (change, [str(w.message) for w in caught])
        assert {p["kernel"] for p in dispatch.stats()["problems"]} == {"aten"}


def test_a_worker_that_cannot_start_fails_the_tuning_fast_and_cleanly(tmp_path, monkeypatch):
    """E.g. ``sys.executable`` is not a Python that can run the worker: the tuning fails with
    WorkerError (nothing stored, claim released; dispatch then uses PyTorch's kernel with one warning),
    and later problems fail at once instead of waiting for a start timeout each."""
    worker.shutdown()
    monkeypatch.setattr(worker, "_broken", None)
    monkeypatch.setattr(worker, "_CHILD", "import sys; sys.exit(3)")
    _fault()
    with Store.open(tmp_path / "c.sqlite") as st:
        for n in (13, 14):
            t0 = time.monotonic()
            with pytest.raises(worker.WorkerError):
                tune_problem(TOY, ToyProblem(n=n, faults="error"), device="cpu", store=st, fingerprint=FP,
                             isolate=True)
            assert time.monotonic() - t0 < 20
            key = (FP, "toy", problem_key(TOY.problem_to_dict(ToyProblem(n=n, faults="error"))))
            assert st.entries() == [] and not st.claimed(*key)
        assert worker._broken is not None


def test_a_partly_corrupt_cache_keeps_every_readable_entry(tmp_path):
    """Damage in some pages (here the trial history's) used to cost the whole file: it is moved aside, but
    the rows it still gives (read forwards up to the damage and backwards down to it) are written into
    the new file first."""
    path = tmp_path / "c.sqlite"
    with Store.open(path) as st:
        entries = [Entry(FP, "gemm", json.dumps({"M": i}), winner="aten", time_ms=1.0, aten_ms=1.0, trials=40)
                   for i in range(50)]
        for e in entries:
            st.put(e)
        for e in entries:
            st.put(e, [({"B": j, "pad": "x" * 200}, 1.0) for j in range(40)], policy="keep")
    conn = sqlite3.connect(str(path))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:  # three pages of the trial history, three quarters into the file
        f.seek((size * 3 // 4) // 4096 * 4096)
        f.write(os.urandom(3 * 4096))
    _fault()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st = Store.open(path)
        trials = st.trials()  # reading the damaged pages finds the corruption
        trials = st.trials()
    assert any("corrupt" in str(w.message) for w in caught)
    assert list(tmp_path.glob("c.sqlite.corrupt-*"))
    _check_kept(st, entries)
    assert len(trials) >= 0.9 * 50 * 40
    with Store.open(path) as fresh:  # and it is on disk
        assert len(fresh.entries()) == 50
    st.close()


def test_the_worker_takes_the_eager_host_measure(tmp_path):
    """Tuning in a worker process records the host-inclusive measure too (back-to-back calls, taken in the
    worker): aten's sleeps 30 ms per call there, the kernel about 1 ms."""
    problem = ToyProblem(n=29, faults="")
    with Store.open(tmp_path / "c.sqlite") as st:
        e = tune_problem(TOY, problem, device="cpu", store=st, max_trials=2, isolate=True)
    assert e.winner != "aten" and e.decided == "device"
    assert e.aten_host_ms >= 30 and 0 < e.host_ms < e.aten_host_ms
