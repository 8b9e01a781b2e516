"""Tuning across a fleet: many workers on many machines share one problem list through a relational
database (PostgreSQL for a fleet, SQLite for one machine; the same code path, through SQLAlchemy).

Coordination model (docs/fleet.md has the reasoning): the queue is an Optuna study in Optuna's RDB storage,
and Optuna's own distributed machinery does the scheduling; we add no scheduler of our own.

- A *job* is one study, named after the job and the device fingerprint, so workers on different GPU models
  form separate queues. Each problem is one trial of the study, enqueued (``WAITING``) by the worker that
  created the study; the others wait for the study's ``ready`` mark before they start.
- A worker takes a problem by asking the study for a trial: Optuna moves one ``WAITING`` trial to
  ``RUNNING`` under a row lock, so one problem goes to exactly one worker.
- While it tunes, the worker's heartbeat (Optuna's, every ``heartbeat_s``) is its lease. A worker killed at
  any moment stops beating; after ``lease_s`` any other worker marks its trial failed and Optuna's
  ``RetryHeartbeatStaleTrialCallback`` enqueues the same problem again, for someone else to take.
- The problem is tuned by ``tuner.tune_problem`` into a private temporary store; then the entry and its
  full trial history are written to the shared results tables in one transaction, and only then is the
  Optuna trial completed. A worker killed before that transaction loses only the problem it was tuning;
  one killed after it loses nothing (whoever takes the retried problem finds the result and does not tune).
- Each problem's search runs its measurements as a study of its own in the same database
  (``search_study_name``), sampled by ``search.Sampler``, so optuna-dashboard on the database shows them.
- The results tables (storage/fleet.py: ``torchtune_ops_entries_v<N>``, ``torchtune_ops_trials_v<N>``, the columns of the
  local cache) are what inference hosts read: ``RemoteCache`` opens them read-only, ``pull`` copies them into
  a local cache, and ``export_bundle`` writes them as a bundle (``bundles`` format).

    from torchtune_ops.tuning import fleet
    fleet.run_worker(storage="postgresql://tuner@db:5432/tuning", problems=record.read_shapes("shapes.jsonl"))
    fleet.pull(storage="postgresql://reader@db:5432/tuning")       # on an inference host

Needs the ``fleet`` extra: ``pip install 'torchtune-ops[fleet]'`` (SQLAlchemy and psycopg).
"""
from __future__ import annotations

try:
    import sqlalchemy as sa
except ImportError as _e:  # pragma: no cover - exercised by a subprocess test
    raise ImportError("torchtune_ops.tuning.fleet needs SQLAlchemy and a PostgreSQL driver; install them with: "
                      "pip install 'torchtune-ops[fleet]'") from _e

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping

from ..storage.store import Entry, Store, problem_key

from ..storage.fleet import (DEFAULT_HEARTBEAT_S, DEFAULT_LEASE_S, STUDY_PREFIX, FleetError, RemoteCache, Results,
                             _engine_kwargs, _retry, _serialize_sqlite, export_bundle, normalize_url, pull)

__all__ = ["FleetError", "WorkerReport", "DEFAULT_HEARTBEAT_S", "DEFAULT_LEASE_S", "normalize_url",
           "job_name", "study_name", "run_worker", "job_status", "Results", "RemoteCache", "pull",
           "export_bundle", "search_study_name"]

log = logging.getLogger("torchtune_ops")

# ---------------------------------------------------------------------------------------------- jobs

def job_name(problems: Iterable[tuple[str, str]]) -> str:
    """The default job name of a problem list: a hash of its sorted (family, problem key) pairs, so
    workers started the same way, on the same shape file, join the same job."""
    h = hashlib.sha256()
    for fam, key in sorted(set(problems)):
        h.update(f"{fam}\0{key}\n".encode())
    return h.hexdigest()[:16]


def study_name(job: str, fingerprint: str) -> str:
    """The Optuna study of ``job`` on devices with fingerprint key ``fingerprint``."""
    return f"{STUDY_PREFIX}:{job}:{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}"


@contextlib.contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """On PostgreSQL, hold a server-wide advisory lock while tables are checked and created: workers
    started at once would otherwise collide in CREATE TABLE, and wait and retry. Elsewhere a no-op."""
    url = normalize_url(url)
    if not url.startswith("postgresql"):
        yield
        return
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as c:
            c.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
            c.commit()
            try:
                yield
            finally:
                c.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
                c.commit()
    finally:
        engine.dispose()


#: the advisory lock key of schema creation (any 64-bit number; this one spells "tto-fleet")
_LOCK_KEY = 0x74746F2D666C6565


def _optuna_storage(url: str, *, heartbeat_s: int | None, lease_s: int | None) -> Any:
    """Optuna's RDB storage on ``url``; with heartbeats (the queue's leases) unless ``heartbeat_s`` is None
    (the per-problem search studies, run by ask/tell)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = normalize_url(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        beat = {} if heartbeat_s is None else dict(
            heartbeat_interval=heartbeat_s, grace_period=lease_s,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=None))
        storage = _retry("opening the Optuna storage", lambda: RDBStorage(
            url, engine_kwargs=_engine_kwargs(url), **beat))
    if storage.engine.dialect.name == "sqlite":
        _serialize_sqlite(storage.engine)
    return storage


def _resolve(problems: Iterable[tuple[str, Mapping[str, Any]]], families: Mapping[str, Any]
             ) -> list[tuple[str, str]]:
    """(family name, problem dict) pairs -> distinct (family name, canonical problem key) pairs, each
    validated by its family (an unknown family or field raises FleetError)."""
    out, seen = [], set()
    for fam_name, pdict in problems:
        fam = families.get(fam_name)
        if fam is None:
            raise FleetError(f"unknown kernel family {fam_name!r} (known: {sorted(families)})")
        try:
            key = problem_key(fam.problem_to_dict(fam.problem_from_dict(pdict)))
        except (TypeError, ValueError) as e:
            raise FleetError(f"invalid {fam_name} problem {pdict!r}: {e}") from e
        if (fam_name, key) not in seen:
            seen.add((fam_name, key))
            out.append((fam_name, key))
    return out


def _open_job(storage: Any, results: Results, *, name: str, fingerprint: str,
              problems: list[tuple[str, str]] | None, force: bool, wait_ready_s: float) -> Any:
    """Create the job's study and queue its problems, or join it once its creator has queued them."""
    import optuna

    sampler = optuna.samplers.RandomSampler(seed=0)  # never consulted: every trial is a queued problem
    if problems is not None:
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction="minimize",
                                        sampler=sampler)
        except optuna.exceptions.DuplicatedStudyError:
            study = None
        if study is not None:  # we created it: queue what is not done yet, then mark it ready
            study.set_user_attr("fingerprint", fingerprint)
            done = set() if force else results.done(fingerprint)
            todo = [p for p in problems if p not in done]
            for fam, key in todo:
                study.enqueue_trial({}, user_attrs={"family": fam, "problem": key})
            study.set_user_attr("problems", len(problems))
            study.set_user_attr("queued", len(todo))
            study.set_user_attr("ready", True)
            log.info("torchtune_ops fleet: job %s created with %d problems (%d already tuned)", name,
                     len(problems), len(problems) - len(todo))
            return study
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError as e:  # Optuna's way of saying "no such study"
        raise FleetError(f"no fleet job {name!r} in this database; give the problem list to create it") \
            from e
    deadline = time.monotonic() + wait_ready_s
    while not study.user_attrs.get("ready"):
        if time.monotonic() > deadline:
            raise FleetError(f"fleet job {name!r} was never set up completely (its creator stopped while "
                             "queueing problems); start the workers again under another job name")
        time.sleep(0.2)
    if problems is not None:  # a job named explicitly may hold another list than the one given
        queued = {(t.user_attrs.get("family"), t.user_attrs.get("problem"))
                  for t in study.get_trials(deepcopy=False)}
        done = results.done(fingerprint)
        extra = [p for p in problems if p not in queued and p not in done]
        if extra:
            log.warning("torchtune_ops fleet: %d of the given problems are not in the existing job %s and "
                        "will not be tuned by it; start the workers under another job name", len(extra), name)
    return study


@dataclasses.dataclass
class WorkerReport:
    """What one ``run_worker`` call did: problems tuned, problems found already tuned (a retried problem
    whose first worker stored its result before dying, or a result from an earlier job), problems that
    failed (their errors, by problem key), and the wall-clock seconds."""

    job: str
    study: str
    worker: str
    tuned: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    reused: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    elapsed_s: float = 0.0


class _ProblemFailed(Exception):
    """Internal: tuning one problem raised; recorded on the trial, the worker goes on."""


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_worker(*, storage: str, problems: Iterable[tuple[str, Mapping[str, Any]]] | None = None,
               job: str | None = None, device: Any = None, timer: Any = None,
               max_trials: int | None = None, time_budget_s: float | None = None, seed: int = 0,
               progress: bool | Callable[[Any], None] | None = None, force: bool = False,
               heartbeat_s: float = DEFAULT_HEARTBEAT_S, lease_s: float = DEFAULT_LEASE_S,
               poll_s: float = 1.0, wait_ready_s: float = 300.0, fingerprint: Any = None,
               families: Mapping[str, Any] | None = None, max_problems: int | None = None,
               on_problem: Callable[[str, str, str], None] | None = None,
               search_studies: bool = True) -> WorkerReport:
    """Tune a shared problem list together with every other worker on the same database, until nothing
    is left: no problem waiting and none being tuned by a live worker.

    Start any number of workers the same way, on any number of machines: the first one creates the job
    and queues the problems; the others join it. Each problem is tuned by exactly one worker; a worker
    killed at any moment loses nothing already stored, and its current problem goes to another worker
    ``lease_s`` seconds after its last heartbeat.

    Args:
        storage: the database URL: ``postgresql://user@host:port/db`` (several machines) or
            ``sqlite:///path/to/file`` (one machine).
        problems: (family name, problem dict) pairs, e.g. ``record.read_shapes(path)``. Needed by the
            worker that creates the job; a worker given only ``job`` joins an existing one. Problems the
            database already has a result for (on this device) are not queued, unless ``force``.
        job: the job name; None (default): derived from the problem list (``job_name``), so workers
            given the same list join the same job.
        device: where to tune; None (default): the current CUDA device, else CPU (Triton interpreter).
        timer: the tuner's timer (``timing.Timer``); None (default): the real one for ``device``.
        max_trials, time_budget_s, seed, progress: passed to ``tuner.tune_problem`` (None: the settings'
            defaults; seed 0; no progress line).
        force: queue and tune problems even when a result exists (the faster one is kept). Default False.
        heartbeat_s: seconds between heartbeats while tuning (default 10; rounded up to whole seconds).
        lease_s: seconds without a heartbeat after which a problem is given to another worker (default
            60; whole seconds, more than ``heartbeat_s``). Must be the same for every worker of a job.
        poll_s: while other workers are still tuning, how often to look for work (default 1 s).
        wait_ready_s: how long a joining worker waits for the job's creator to finish queueing (300 s).
        fingerprint: the device fingerprint key to tune and store under; None (default): the device's.
        families: kernel families by name; None (default): the registered ones.
        max_problems: stop after this many problems (tuned, reused or failed); None (default): no limit.
        on_problem: called as ``on_problem(event, family, problem_key)`` with event "start", "tuned",
            "reused" or "failed" (default none); for progress displays.
        search_studies: run each problem's search as a study of its own in the database
            (``search_study_name``; optuna-dashboard shows it live). Each measurement then costs a few
            database transactions (docs/fleet.md has the figures). Default True; False searches in memory.

    Returns:
        A ``WorkerReport``.

    Raises:
        FleetError: a bad URL, an unknown job, an invalid problem, or a job never set up completely.
        KeyboardInterrupt: re-raised after the current problem is put back in the queue.
    """
    import optuna

    from ..storage.device import fingerprint as device_fingerprint
    from ..kernels.registry import families as registered_families

    start = time.monotonic()
    heartbeat_i = max(1, math.ceil(heartbeat_s))
    lease_i = max(heartbeat_i + 1, math.ceil(lease_s))
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if fingerprint is None:
        fingerprint = device_fingerprint(device)
    fp = fingerprint if isinstance(fingerprint, str) else fingerprint.key
    fams = dict(families) if families is not None else dict(registered_families())
    keys = _resolve(problems, fams) if problems is not None else None
    if job is None:
        if keys is None:
            raise FleetError("give the problem list, or the name of an existing job")
        job = job_name(keys)
    name = study_name(job, fp)
    worker = _worker_id()
    report = WorkerReport(job=job, study=name, worker=worker)

    notify = on_problem or (lambda *a: None)

    with _schema_lock(storage):
        results = Results(storage)
    with tempfile.TemporaryDirectory(prefix="torchtune-ops-worker-") as tmp, \
            _quiet_optuna(), contextlib.closing(results):
        with _schema_lock(storage):
            ostorage = _optuna_storage(storage, heartbeat_s=heartbeat_i, lease_s=lease_i)
            # each problem's search runs as its own study on the same database, sampled by search.Sampler
            search_storage = _optuna_storage(storage, heartbeat_s=None, lease_s=None) if search_studies else None
        study = _open_job(ostorage, results, name=name, fingerprint=fp, problems=keys, force=force,
                          wait_ready_s=wait_ready_s)
        local = Store.open(os.path.join(tmp, "tuning.sqlite"), readonly=False)

        def objective(trial: Any) -> float:
            attrs = trial.user_attrs
            if "problem" not in attrs:  # a fresh trial, not a queued problem: the queue was empty
                raise optuna.TrialPruned()
            fam_name, key = attrs["family"], attrs["problem"]
            trial.set_user_attr("worker", worker)
            notify("start", fam_name, key)
            done = None if force else results.get(fp, fam_name, key)
            if done is not None:  # stored by a worker that died before completing the trial
                trial.set_user_attr("outcome", "reused")
                report.reused.append((fam_name, key))
                notify("reused", fam_name, key)
                return done.time_ms
            try:
                search = None
                if search_storage is not None:
                    search = (search_storage, search_study_name(fp, fam_name, key))
                    trial.set_user_attr("search_study", search[1])
                entry = _tune_one(fams[fam_name], key, local=local, device=device, timer=timer,
                                  max_trials=max_trials, time_budget_s=time_budget_s, seed=seed,
                                  progress=progress, fp=fp, search_study=search)
                history = [(t.config, t.value_ms) for t in local.trials(fp, fam_name, problem=key)]
                stored = results.put(entry, history, worker=worker)
                local.delete(fp, fam_name, key)
            except KeyboardInterrupt:
                # give the problem back at once rather than after the lease (Optuna marks this trial
                # failed; any other exit leaves it running, to be given back when its lease runs out)
                study.enqueue_trial({}, user_attrs={"family": fam_name, "problem": key})
                raise
            except Exception as e:  # one problem's failure must not stop the fleet: record it, go on
                msg = f"{type(e).__name__}: {e}"[:2000]
                log.warning("torchtune_ops fleet: tuning %s %s failed: %s", fam_name, key, msg)
                trial.set_user_attr("error", msg)
                report.failed[key] = msg
                notify("failed", fam_name, key)
                raise _ProblemFailed(msg) from e
            trial.set_user_attr("outcome", "tuned")
            report.tuned.append((fam_name, key))
            notify("tuned", fam_name, key)
            return stored.time_ms

        def handled() -> int:
            return len(report.tuned) + len(report.reused) + len(report.failed)

        waiting_states = (optuna.trial.TrialState.WAITING,)
        running_states = (optuna.trial.TrialState.RUNNING,)
        queue_empty = False
        try:
            while max_problems is None or handled() < max_problems:
                if not queue_empty:
                    before = len(report.tuned), len(report.reused), len(report.failed)
                    try:
                        study.optimize(objective, n_trials=1, catch=(_ProblemFailed,))
                    except ValueError as e:
                        # Optuna refuses to finish a trial already finished elsewhere: our heartbeats
                        # stopped for longer than the lease (a stalled connection) and the problem was
                        # given to another worker. Our result is stored all the same; carry on.
                        log.warning("torchtune_ops fleet: %s (this worker's lease had run out)", e)
                    queue_empty = (len(report.tuned), len(report.reused), len(report.failed)) == before
                    continue
                # the queue looked empty: give back a dead worker's problem if its lease ran out,
                # then wait while live workers may still fail and give theirs back
                optuna.storages.fail_stale_trials(study)
                if study.get_trials(deepcopy=False, states=waiting_states):
                    queue_empty = False
                    continue
                if not study.get_trials(deepcopy=False, states=running_states):
                    break
                time.sleep(poll_s)
        finally:
            local.close()
    report.elapsed_s = time.monotonic() - start
    return report


def search_study_name(fingerprint: str, family: str, key: str) -> str:
    """The Optuna study that one attempt at tuning a problem runs its search in: the prefix, the problem and
    device as ``torchtune-ops dashboard`` names them, and a fresh id (a retried problem gets a new study)."""
    from ..storage.dashboard import study_name as problem_study_name

    name = f"{STUDY_PREFIX}:search: {problem_study_name(fingerprint, family, key)}"
    return f"{name[:490]} #{uuid.uuid4().hex[:8]}"  # Optuna's RDB storage keeps 512 characters


def _tune_one(family: Any, key: str, *, local: Store, device: Any, timer: Any, max_trials: int | None,
              time_budget_s: float | None, seed: int, progress: Any, fp: str,
              search_study: tuple[Any, str] | None = None) -> Entry:
    from .tuner import tune_problem

    problem = family.problem_from_dict(json.loads(key))
    return tune_problem(family, problem, device=device, store=local, max_trials=max_trials,
                        time_budget_s=time_budget_s, timer=timer, seed=seed, progress=progress,
                        force=True, wait_s=0.0, fingerprint=fp, search_study=search_study)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs every finished trial at INFO; a worker reports per problem itself."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(before)


def job_status(*, storage: str, job: str, fingerprint: str) -> dict[str, Any]:
    """Where a job stands: trials by state, problems queued at creation, and per problem key its
    outcomes. ``fingerprint`` is the device fingerprint key the workers tune under.

    Returns:
        ``{"study": name, "ready": bool, "problems": n, "states": {"COMPLETE": n, ...},
        "outcomes": {problem key: [(state, outcome or error, worker), ...]}}``
    """
    import optuna

    name = study_name(job, fingerprint)
    ostorage = _optuna_storage(storage, heartbeat_s=DEFAULT_HEARTBEAT_S, lease_s=DEFAULT_LEASE_S)
    try:
        study = optuna.load_study(study_name=name, storage=ostorage)
    except KeyError as e:
        raise FleetError(f"no fleet job {name!r} in this database") from e
    states: dict[str, int] = {}
    outcomes: dict[str, list[tuple[str, str, str]]] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
        key = t.user_attrs.get("problem")
        if key is None:
            continue  # a fresh trial handed out while the queue was empty
        what = t.user_attrs.get("outcome") or t.user_attrs.get("error") or ""
        outcomes.setdefault(key, []).append((t.state.name, what, t.user_attrs.get("worker", "")))
    attrs = study.user_attrs
    return {"study": name, "ready": bool(attrs.get("ready")), "problems": attrs.get("problems", 0),
            "states": states, "outcomes": outcomes}


def cli_tune(*, storage: str, shapes: str | None, job: str | None = None, device: str | None = None,
             max_trials: int | None = None, time_budget_s: float | None = None,
             lease_s: float = DEFAULT_LEASE_S, out: Any, err: Any) -> int:
    """``torchtune-ops tune --shapes FILE --storage URL``: run one fleet worker until the job is done,
    printing one line per problem to ``err`` and a summary to ``out``; returns the exit status (0, or 1
    when some problem failed). Arguments are those of ``run_worker``; ``shapes`` is a shape file."""
    from ..storage import record

    if shapes is None and job is None:
        raise FleetError("--storage tunes the problems of a shape file: give --shapes FILE (or --job NAME)")
    problems = record.read_shapes(shapes) if shapes is not None else None

    def show(event: str, family: str, key: str) -> None:
        if event != "start":
            err.write(f"[{_worker_id()}] {event}: {family} {key}\n")
            err.flush()

    # SIGTERM (a stopped container or job) acts like Ctrl-C: the current problem goes back at once
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    try:
        r = run_worker(storage=storage, problems=problems, job=job, device=device, max_trials=max_trials,
                       time_budget_s=time_budget_s, lease_s=lease_s,
                       heartbeat_s=max(1, min(DEFAULT_HEARTBEAT_S, int(lease_s) // 4)), on_problem=show)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    out.write(f"worker {r.worker}, job {r.job}: tuned {len(r.tuned)}, already tuned {len(r.reused)}, "
              f"failed {len(r.failed)} problems in {r.elapsed_s:.1f} s\n")
    for key, msg in r.failed.items():
        out.write(f"  failed: {key}: {msg}\n")
    return 1 if r.failed else 0
