"""Fleet tuning (torchtune_ops.tuning.fleet) against a real PostgreSQL server on loopback, and against SQLite.

The PostgreSQL server comes from ``TEST_POSTGRES_URL`` (``.ci/run`` starts one with
scripts/start_postgres.sh and exports it) or, when unset, is started here with the same script. When no
server can be started the PostgreSQL tests fail; they never skip. Each test gets a database of its own.
"""
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import sqlalchemy as sa  # the fleet extra is a test dependency (scripts/setup.sh installs it)

from torchtune_ops.storage import bundles
from torchtune_ops.tuning import fleet  # noqa: E402
from torchtune_ops.storage.device import fingerprint  # noqa: E402
from torchtune_ops.storage.store import Entry, Store  # noqa: E402
from torchtune_ops.tuning.timing import FakeTimer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FP = fingerprint("cpu").key

# nine small GEMM problems with sizes that no block size divides
PROBLEMS = [("gemm", {"op": "mm", "batch": 1, "M": m, "N": n, "K": 19, "dtype": "float32"})
            for m in (1, 5, 13) for n in (3, 7, 17)]


def _keys(problems):
    from torchtune_ops.kernels.registry import FAMILIES
    from torchtune_ops.storage.store import problem_key

    return {(f, problem_key(FAMILIES[f].problem_to_dict(FAMILIES[f].problem_from_dict(p))))
            for f, p in problems}


# --------------------------------------------------------------------------------------------- servers

@pytest.fixture(scope="session")
def postgres_server():
    """The URL of a PostgreSQL server's maintenance database; started here when not given."""
    url = os.environ.get("TEST_POSTGRES_URL")  # test-only variable, set by .ci/run
    started = None
    if not url:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "start_postgres.sh"), "--env"],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.fail("PostgreSQL could not be started for the fleet tests (scripts/start_postgres.sh):\n"
                        + proc.stderr[-3000:], pytrace=False)
        env = dict(line.split("=", 1) for line in proc.stdout.split())
        url, started = env["TEST_POSTGRES_URL"], env["TEST_POSTGRES_DIR"]
    try:
        engine = sa.create_engine(fleet.normalize_url(url))
        with engine.connect() as c:
            c.execute(sa.text("SELECT 1"))
        engine.dispose()
    except sa.exc.SQLAlchemyError as e:
        pytest.fail(f"cannot connect to PostgreSQL at {url}: {e}", pytrace=False)
    yield url
    if started:
        subprocess.run(["bash", str(ROOT / "scripts" / "start_postgres.sh"), "--stop", started],
                       capture_output=True, timeout=60)


@pytest.fixture
def pg_url(postgres_server):
    """A fresh, empty database on the server, dropped afterwards."""
    name = "tto_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(fleet.normalize_url(postgres_server), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    yield postgres_server.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as c:
        c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.sqlite'}"
    return request.getfixturevalue("pg_url")


def sleeping_timer(sleep_s=0.01):
    """A fake timer that sleeps like a measurement and never runs the kernel: aten 1 ms, Triton 0.5 ms."""
    fake = FakeTimer({"aten": 1.0}, default=0.5, run=False)

    def timer(fn, *, key):
        time.sleep(sleep_s)
        return fake(fn, key=key)

    return timer


def _entry(key="{}", ms=1.0, fp="fp"):
    return Entry(fp, "gemm", key, winner="aten", time_ms=ms, aten_ms=ms, trials=0)


# ------------------------------------------------------------------------------ several worker processes

def _worker(url, sleep_s, events_path):
    """One fleet worker (run in a child process): its events and final report go to ``events_path``."""
    with open(events_path, "w", buffering=1) as out:
        def show(event, family, key):
            out.write(f"{event} {key}\n")

        r = fleet.run_worker(storage=url, problems=PROBLEMS, device="cpu", timer=sleeping_timer(sleep_s),
                             max_trials=6, time_budget_s=30, heartbeat_s=1, lease_s=4, poll_s=0.2,
                             on_problem=show, fingerprint=FP)
        out.write("REPORT " + json.dumps({"tuned": len(r.tuned), "reused": len(r.reused),
                                          "failed": r.failed, "worker": r.worker}) + "\n")


def _spawn(url, sleep_s, events_path):
    # spawned, not forked: a fork of a process whose torch/OpenMP threads already ran (as in the full suite)
    # can crash in the child
    p = multiprocessing.get_context("spawn").Process(target=_worker, args=(url, sleep_s, str(events_path)))
    p.start()
    return p


def _lines(path):
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


def test_three_workers_one_killed(db_url, tmp_path):
    # the victim measures slowly, so it is surely in the middle of a problem when it is killed
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    victim = _spawn(db_url, 0.3, logs[0])
    others = [_spawn(db_url, 0.01, log) for log in logs[1:]]
    started = None
    deadline = time.monotonic() + 60
    while started is None and time.monotonic() < deadline and victim.is_alive():
        started = next((ln.split(" ", 1)[1] for ln in _lines(logs[0]) if ln.startswith("start ")), None)
        time.sleep(0.05)
    assert started is not None, _lines(logs[0])
    time.sleep(0.3)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(timeout=30)
    assert victim.exitcode == -signal.SIGKILL

    reports = []
    for p, log in zip(others, logs[1:]):
        p.join(timeout=90)
        assert p.exitcode == 0, _lines(log)
        reports.append(json.loads(_lines(log)[-1].split("REPORT ", 1)[1]))
    assert all(not r["failed"] for r in reports)

    # a fresh reader sees every result
    want = _keys(PROBLEMS)
    with fleet.RemoteCache(db_url) as reader:
        assert reader.preload(FP) == len(want)
        assert {(e.family, e.problem) for e in reader.entries(FP)} == want
        for fam, key in want:
            e = reader.get(FP, fam, key)
            assert e is not None and e.source == "tuned" and e.trials > 0
            assert e.winner != "aten" and e.time_ms == 0.5 and e.aten_ms == 1.0

    # every problem was tuned exactly once: one stored run each, none by the killed worker's problem twice
    with fleet.Results(db_url, readonly=True) as res:
        runs = res.runs(FP)
    assert {(f, k) for _, f, k in runs} == want
    assert all(len(w) == 1 for w in runs.values()), runs
    survivors = {r["worker"] for r in reports}
    assert sum(r["tuned"] for r in reports) + sum(w[0] not in survivors for w in runs.values()) == len(want)

    # the killed worker's problem went back to the queue after its lease and another worker took it
    status = fleet.job_status(storage=db_url, job=fleet.job_name(want), fingerprint=FP)
    tries = status["outcomes"][started]
    assert any(state == "FAIL" and worker.endswith(f":{victim.pid}") for state, _, worker in tries), tries
    assert any(state == "COMPLETE" and worker in survivors for state, _, worker in tries), tries
    assert status["states"].get("RUNNING", 0) == 0 and status["states"].get("WAITING", 0) == 0
    assert status["problems"] == len(want)


# ----------------------------------------------------------------------------------- one worker in process

def test_single_worker_then_nothing_left(db_url, tmp_path, caplog):
    probs = PROBLEMS[:3]
    r = fleet.run_worker(storage=db_url, problems=probs, device="cpu", timer=sleeping_timer(),
                         max_trials=4, heartbeat_s=1, lease_s=2)
    assert len(r.tuned) == 3 and not r.reused and not r.failed
    assert r.job == fleet.job_name(_keys(probs))

    # each problem's search ran as an Optuna study of its own on the same database (search.Sampler's
    # trials, one per measurement): what optuna-dashboard shows when pointed at the database
    import optuna

    searches = [s for s in optuna.get_all_study_summaries(
        fleet._optuna_storage(db_url, heartbeat_s=None, lease_s=None), include_best_trial=False)
        if s.study_name.startswith(fleet.STUDY_PREFIX + ":search: gemm: mm ")]
    with fleet.Results(db_url, readonly=True) as res:
        stored = [len(res.trials(FP, "gemm", problem=key)) for _, key in _keys(probs)]
    assert sorted(s.n_trials for s in searches) == sorted(stored) and min(stored) > 0

    # the same list again: the job is finished, nothing is tuned
    again = fleet.run_worker(storage=db_url, problems=probs, device="cpu", timer=sleeping_timer(),
                             max_trials=4, heartbeat_s=1, lease_s=2)
    assert not again.tuned and not again.failed

    # a new list overlapping the old one queues only what has no result yet
    more = fleet.run_worker(storage=db_url, problems=PROBLEMS[:5], device="cpu", timer=sleeping_timer(),
                            max_trials=4, heartbeat_s=1, lease_s=2)
    assert len(more.tuned) == 2

    # joining an existing job with a list it does not hold warns that the rest is not tuned
    with caplog.at_level(logging.WARNING, logger="torchtune_ops"):
        fleet.run_worker(storage=db_url, problems=PROBLEMS[:6], job=r.job, device="cpu",
                         timer=sleeping_timer())
    assert "1 of the given problems are not in the existing job" in caplog.text

    # joining a job by name alone works once it exists; an unknown job is an error
    joined = fleet.run_worker(storage=db_url, job=r.job, device="cpu", timer=sleeping_timer())
    assert not joined.tuned
    with pytest.raises(fleet.FleetError):
        fleet.run_worker(storage=db_url, job="no-such-job", device="cpu", timer=sleeping_timer())

    # results reach readers: pull into a local cache, export a bundle
    store = Store.open(tmp_path / "local" / "tuning.sqlite")
    assert fleet.pull(storage=db_url, store=store) == 5
    assert len(store.entries(FP)) == 5
    path = tmp_path / "fleet.bundle.json"
    assert fleet.export_bundle(storage=db_url, path=path) == 5
    loaded = {(e.device, e.family, e.problem_key): e.winner for e in bundles.load(path).entries()}
    assert loaded == {e.key: e.winner for e in store.entries(FP)}

    # search_studies=False: the search runs in memory, no study is added beside the job's
    before = len(optuna.get_all_study_summaries(fleet._optuna_storage(db_url, heartbeat_s=None, lease_s=None)))
    quiet = fleet.run_worker(storage=db_url, problems=PROBLEMS[8:9], device="cpu", timer=sleeping_timer(),
                             max_trials=4, heartbeat_s=1, lease_s=2, search_studies=False)
    after = len(optuna.get_all_study_summaries(fleet._optuna_storage(db_url, heartbeat_s=None, lease_s=None)))
    assert len(quiet.tuned) == 1 and after == before + 1  # the new job's queue study only


def test_failing_problem_is_recorded_and_the_worker_goes_on(db_url):
    from torchtune_ops.kernels.gemm import GEMM

    class Broken:
        """GEMM, except that problems with M == 5 cannot make their inputs."""

        def __getattr__(self, name):
            return getattr(GEMM, name)

        def make_inputs(self, problem, device, *, seed=0):
            if problem.M == 5:
                raise RuntimeError("no inputs for M=5")
            return GEMM.make_inputs(problem, device, seed=seed)

    probs = PROBLEMS[:6]
    r = fleet.run_worker(storage=db_url, problems=probs, device="cpu", timer=sleeping_timer(0),
                         max_trials=3, families={"gemm": Broken()}, heartbeat_s=1, lease_s=2)
    assert len(r.failed) == 3 and len(r.tuned) == 3
    assert all("no inputs for M=5" in msg for msg in r.failed.values())
    status = fleet.job_status(storage=db_url, job=r.job, fingerprint=FP)
    assert status["states"] == {"COMPLETE": 3, "FAIL": 3, "PRUNED": 1}
    with fleet.RemoteCache(db_url) as reader:
        assert len(reader.entries()) == 3


def test_job_whose_creator_died_while_queueing(db_url):
    import optuna

    from torchtune_ops.tuning.fleet import _optuna_storage

    job = fleet.job_name(_keys(PROBLEMS[:1]))
    # a creator that stopped after creating the study, before marking it ready
    optuna.create_study(storage=_optuna_storage(db_url, heartbeat_s=1, lease_s=2),
                        study_name=fleet.study_name(job, FP))
    with pytest.raises(fleet.FleetError, match="never set up completely"):
        fleet.run_worker(storage=db_url, problems=PROBLEMS[:1], device="cpu", timer=sleeping_timer(0),
                         wait_ready_s=0.5)
    r = fleet.run_worker(storage=db_url, problems=PROBLEMS[:1], job="another", device="cpu",
                         timer=sleeping_timer(0), max_trials=2)
    assert len(r.tuned) == 1


def test_interrupted_worker_gives_its_problem_back(db_url):
    calls = []

    def interrupting(fn, *, key):
        calls.append(key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return FakeTimer({"aten": 1.0}, default=0.5, run=False)(fn, key=key)

    probs = PROBLEMS[:2]
    with pytest.raises(KeyboardInterrupt):
        fleet.run_worker(storage=db_url, problems=probs, device="cpu", timer=interrupting, max_trials=3,
                         heartbeat_s=1, lease_s=60)
    job = fleet.job_name(_keys(probs))
    status = fleet.job_status(storage=db_url, job=job, fingerprint=FP)
    assert status["states"].get("WAITING") == 2 and status["states"].get("FAIL") == 1
    # with a lease of a minute, only the re-queued copy lets the next worker finish at once
    r = fleet.run_worker(storage=db_url, problems=probs, device="cpu", timer=sleeping_timer(0),
                         max_trials=3, heartbeat_s=1, lease_s=60)
    assert len(r.tuned) == 2
    assert fleet.job_status(storage=db_url, job=job, fingerprint=FP)["states"]["COMPLETE"] == 2


# ------------------------------------------------------------------------------------------ results tables

def test_results_keep_the_faster_entry_and_every_run(db_url):
    with fleet.Results(db_url) as res:
        assert res.put(_entry(ms=2.0), [("{}", 2.0)], worker="a").time_ms == 2.0
        assert res.put(_entry(ms=3.0), [("{}", None)], worker="b").time_ms == 2.0  # slower: kept old
        assert res.put(_entry(ms=1.0), [], worker="c").time_ms == 1.0
        assert res.get("fp", "gemm", "{}").time_ms == 1.0
        assert res.get("fp", "gemm", "other") is None
        assert sorted(res.runs()[("fp", "gemm", "{}")]) == ["a", "b"]  # a run without trials stores none
        values = [t.value_ms for t in res.trials("fp")]
        assert sorted(values) == [2.0, float("inf")]


def test_reader_cannot_write(db_url):
    with fleet.Results(db_url) as res:
        res.put(_entry())
    with fleet.RemoteCache(db_url) as reader:
        assert reader.get("fp", "gemm", "{}").time_ms == 1.0
        with pytest.raises(fleet.FleetError):
            reader.results.put(_entry(ms=0.1))
        # the database itself refuses writes on the reader's connections
        with pytest.raises(sa.exc.DBAPIError):
            with reader.results.engine.begin() as c:
                c.execute(sa.text("DELETE FROM torchtune_ops_entries_v1"))
        assert reader.get("fp", "gemm", "{}", refresh=True).time_ms == 1.0


def test_reader_of_an_empty_database(db_url):
    with fleet.RemoteCache(db_url) as reader:
        assert reader.entries() == [] and reader.get("fp", "gemm", "{}") is None


def test_bad_urls_and_problems():
    assert fleet.normalize_url("postgresql://u@h:1/d") == "postgresql+psycopg://u@h:1/d"
    assert fleet.normalize_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    assert fleet.normalize_url("sqlite:///x.db") == "sqlite:///x.db"
    for bad in ("not a url", "", None):
        with pytest.raises(fleet.FleetError):
            fleet.normalize_url(bad)
    with pytest.raises(fleet.FleetError):
        fleet.Results("nosuchdb://x/y")
    with pytest.raises(fleet.FleetError, match="unknown kernel family"):
        fleet.run_worker(storage="sqlite://", problems=[("fft", {})], device="cpu")
    with pytest.raises(fleet.FleetError, match="invalid gemm problem"):
        fleet.run_worker(storage="sqlite://", problems=[("gemm", {"Q": 1})], device="cpu")


def test_job_names_depend_on_the_set_of_problems_only():
    a = [("gemm", "k1"), ("gemm", "k2")]
    assert fleet.job_name(a) == fleet.job_name(a[::-1] + a)
    assert fleet.job_name(a) != fleet.job_name(a[:1])
    assert fleet.study_name("j", "fp1") != fleet.study_name("j", "fp2")


def test_import_without_sqlalchemy_names_the_extra():
    code = "import sys; sys.modules['sqlalchemy'] = None; import torchtune_ops.tuning.fleet"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode != 0
    assert "ImportError" in p.stderr and "pip install 'torchtune-ops[fleet]'" in p.stderr


def test_cli_worker_and_export(pg_url, tmp_path):
    shapes = tmp_path / "shapes.jsonl"
    shapes.write_text("".join(json.dumps({"family": f, "problem": p}) + "\n" for f, p in PROBLEMS[:2]))
    env = dict(os.environ, TORCHTUNE_OPS_CACHE_DIR=str(tmp_path / "cache"))
    run = [sys.executable, "-m", "torchtune_ops"]
    p = subprocess.run(run + ["tune", "--shapes", str(shapes), "--storage", pg_url, "--max-trials", "2",
                              "--lease", "8"], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tuned 2, already tuned 0, failed 0" in p.stdout
    bundle = tmp_path / "out.json"
    p = subprocess.run(run + ["cache", "export", str(bundle), "--all-devices", "--storage", pg_url],
                       capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(bundles.load(bundle).entries()) == 2
    # nothing was written to the local cache by either command
    assert not (tmp_path / "cache" / "tuning.sqlite").exists() or \
        Store.open(tmp_path / "cache" / "tuning.sqlite").entries() == []
