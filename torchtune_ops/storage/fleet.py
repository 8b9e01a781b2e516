"""The fleet's shared results tables in a relational database (PostgreSQL for a fleet, SQLite for one
machine; the same code path, through SQLAlchemy): ``Results`` (write and read), ``RemoteCache`` (read-only,
for inference hosts), ``pull`` (copy into a local cache) and ``export_bundle``.

The tables (``torchtune_ops_entries_v<N>``, ``torchtune_ops_trials_v<N>``) have the columns of the local
cache. The workers that fill them are in ``tuning/fleet.py``; docs/fleet.md has the coordination model.

Needs the ``fleet`` extra: ``pip install 'torchtune-ops[fleet]'`` (SQLAlchemy and a PostgreSQL driver).
"""
from __future__ import annotations

try:
    import sqlalchemy as sa
except ImportError as _e:  # pragma: no cover - exercised by a subprocess test
    raise ImportError("torchtune_ops.storage.fleet needs SQLAlchemy and a PostgreSQL driver; install them with: "
                      "pip install 'torchtune-ops[fleet]'") from _e

import dataclasses
import logging
import math
import os
import random
import time
import uuid
from typing import Any, Callable, Iterable

from ..errors import TorchTuneOpsError
from .store import SCHEMA_VERSION, Entry, Store, Trial

__all__ = ["FleetError", "DEFAULT_HEARTBEAT_S", "DEFAULT_LEASE_S", "STUDY_PREFIX", "normalize_url", "Results",
           "RemoteCache", "pull", "export_bundle"]

log = logging.getLogger("torchtune_ops")

#: seconds between a worker's heartbeats while it tunes a problem
DEFAULT_HEARTBEAT_S = 10
#: seconds without a heartbeat after which a worker's problem is given to another worker
DEFAULT_LEASE_S = 60
#: prefix of every study this module creates in the Optuna storage
STUDY_PREFIX = "torchtune_ops"


class FleetError(TorchTuneOpsError):
    """The fleet cannot proceed: a bad storage URL, an unknown job, or a job whose set-up never finished."""


def normalize_url(url: str) -> str:
    """The SQLAlchemy URL for ``url``: a plain ``postgresql://`` or ``postgres://`` URL gets the psycopg
    (version 3) driver that the ``fleet`` extra installs; anything else is returned as is."""
    if not isinstance(url, str) or "://" not in url:
        raise FleetError(f"not a database URL: {url!r} (expected postgresql://... or sqlite:///PATH)")
    scheme, rest = url.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        return "postgresql+psycopg://" + rest
    return url


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # many processes on one file: wait for each other's transactions instead of failing at once
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2}


def _retry(what: str, fn: Callable[[], Any], *, attempts: int = 6) -> Any:
    """Run ``fn``, retrying on database errors: workers started at once race to create the same tables
    (PostgreSQL reports the loser as a duplicate), and a second try then finds them made."""
    for i in range(attempts):
        try:
            return fn()
        except sa.exc.SQLAlchemyError as e:
            if i == attempts - 1:
                raise
            log.debug("torchtune_ops fleet: %s failed (%s); retrying", what, e)
            time.sleep(0.2 + random.random() * 0.5 * (i + 1))


# ------------------------------------------------------------------------------------------- results

_meta = sa.MetaData()
_entries = sa.Table(
    f"torchtune_ops_entries_v{SCHEMA_VERSION}", _meta,
    sa.Column("fingerprint", sa.String(1000), primary_key=True),
    sa.Column("family", sa.String(100), primary_key=True),
    sa.Column("problem", sa.String(4000), primary_key=True),
    sa.Column("winner", sa.Text, nullable=False),
    sa.Column("time_ms", sa.Float, nullable=False),
    sa.Column("aten_ms", sa.Float, nullable=False),
    sa.Column("trials", sa.Integer, nullable=False),
    sa.Column("created", sa.String(40), nullable=False),
    sa.Column("source", sa.String(100), nullable=False),
    sa.Column("max_trials", sa.Integer, nullable=False, server_default="0"),
    sa.Column("time_budget_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("host_ms", sa.Float, nullable=False, server_default="0"),
    sa.Column("aten_host_ms", sa.Float, nullable=False, server_default="0"),
    sa.Column("decided", sa.String(16), nullable=False, server_default=""),
)
_trials = sa.Table(
    f"torchtune_ops_trials_v{SCHEMA_VERSION}", _meta,
    sa.Column("fingerprint", sa.String(1000), primary_key=True),
    sa.Column("family", sa.String(100), primary_key=True),
    sa.Column("problem", sa.String(4000), primary_key=True),
    sa.Column("run", sa.String(64), primary_key=True),
    sa.Column("ordinal", sa.Integer, primary_key=True),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("value_ms", sa.Float, nullable=True),  # NULL: the configuration failed
    sa.Column("worker", sa.String(300), nullable=False),
)
_ENTRY_COLS = tuple(f.name for f in dataclasses.fields(Entry))  # the local store's columns, in order


def _make_engine(url: str, *, readonly: bool) -> sa.Engine:
    url = normalize_url(url)
    try:
        engine = sa.create_engine(url, **_engine_kwargs(url))
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as e:
        raise FleetError(f"cannot use the database URL {url!r}: {e}") from e
    sqlite = engine.dialect.name == "sqlite"

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            if sqlite:
                cur.execute("PRAGMA query_only = ON" if readonly else "PRAGMA journal_mode = WAL")
            elif readonly and engine.dialect.name == "postgresql":
                # the server itself refuses writes on this connection
                cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        finally:
            cur.close()
        if not sqlite:
            dbapi_conn.commit()

    if sqlite:
        _serialize_sqlite(engine, immediate=not readonly)
    return engine


def _serialize_sqlite(engine: sa.Engine, *, immediate: bool = True) -> None:
    """Make every transaction on an SQLite engine a real one, taken with ``BEGIN IMMEDIATE``.

    Python's sqlite3 driver starts a transaction only at the first write, so a read-then-write (Optuna
    moving a trial from WAITING to RUNNING) is two steps another process can slip between, and two
    workers would take the same problem. With the driver's own transactions off and ``BEGIN IMMEDIATE``
    at the start of each of SQLAlchemy's, writers take turns (waiting up to the busy timeout), which makes
    Optuna's queue as atomic on SQLite as it is on PostgreSQL (where it locks the trial's row).
    """

    @sa.event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    engine.dispose()  # connections made before this point lack the settings


def _entry(row: Any) -> Entry:
    return Entry(*(row._mapping[c] for c in _ENTRY_COLS))


class Results:
    """The shared results tables of one database, for writing (workers) and reading.

    Args:
        url: the database URL (``postgresql://user@host:port/db`` or ``sqlite:///path``).
        readonly: open read-only (default False); the database refuses writes, and the tables are not
            created (a missing table reads as empty).
    """

    def __init__(self, url: str, *, readonly: bool = False) -> None:
        self.url = normalize_url(url)
        self.readonly = readonly
        self.engine = _make_engine(url, readonly=readonly)
        if not readonly:
            _retry("creating the results tables", lambda: _meta.create_all(self.engine))

    def _read(self, stmt: Any) -> list[Any]:
        try:
            with self.engine.connect() as c:
                return list(c.execute(stmt))
        except sa.exc.ProgrammingError:
            if self.readonly and not sa.inspect(self.engine).has_table(_entries.name):
                return []  # nothing was ever written
            raise
        except sa.exc.OperationalError:
            if self.readonly and self.engine.dialect.name == "sqlite" \
                    and not sa.inspect(self.engine).has_table(_entries.name):
                return []
            raise

    def get(self, fingerprint: str, family: str, problem: str) -> Entry | None:
        """The entry for (fingerprint key, family name, problem key), or None."""
        rows = self._read(sa.select(_entries).where(_entries.c.fingerprint == fingerprint,
                                                    _entries.c.family == family,
                                                    _entries.c.problem == problem))
        return _entry(rows[0]) if rows else None

    def entries(self, fingerprint: str | None = None, *, family: str | None = None) -> list[Entry]:
        """Every entry, optionally of one fingerprint key and/or family, in key order (the same
        signature as ``Store.entries``, so ``bundles.export_store`` takes a ``Results``)."""
        q = sa.select(_entries)
        if fingerprint is not None:
            q = q.where(_entries.c.fingerprint == fingerprint)
        if family is not None:
            q = q.where(_entries.c.family == family)
        q = q.order_by(_entries.c.fingerprint, _entries.c.family, _entries.c.problem)
        return [_entry(r) for r in self._read(q)]

    def trials(self, fingerprint: str | None = None, family: str | None = None, *,
               problem: str | None = None) -> list[Trial]:
        """The recorded measurements, optionally filtered, ordered by key, run and ordinal."""
        t = _trials.c
        q = sa.select(t.fingerprint, t.family, t.problem, t.run, t.ordinal, t.config, t.value_ms)
        for col, v in ((t.fingerprint, fingerprint), (t.family, family), (t.problem, problem)):
            if v is not None:
                q = q.where(col == v)
        q = q.order_by(t.fingerprint, t.family, t.problem, t.run, t.ordinal)
        return [Trial(*r[:6], math.inf if r[6] is None else r[6]) for r in self._read(q)]

    def runs(self, fingerprint: str | None = None) -> dict[tuple[str, str, str], list[str]]:
        """(fingerprint, family, problem) -> the workers that stored a tuning run of it (one per run)."""
        t = _trials.c
        q = sa.select(t.fingerprint, t.family, t.problem, t.run, t.worker).distinct()
        if fingerprint is not None:
            q = q.where(t.fingerprint == fingerprint)
        out: dict[tuple[str, str, str], list[str]] = {}
        for fp, fam, prob, _run, worker in self._read(q):
            out.setdefault((fp, fam, prob), []).append(worker)
        return out

    def done(self, fingerprint: str) -> set[tuple[str, str]]:
        """The (family, problem key) pairs that have an entry for ``fingerprint``."""
        q = sa.select(_entries.c.family, _entries.c.problem).where(_entries.c.fingerprint == fingerprint)
        return {(r[0], r[1]) for r in self._read(q)}

    def put(self, entry: Entry, trials: Iterable[tuple[str, float | None]] = (), *,
            worker: str = "") -> Entry:
        """Store ``entry`` and its trial history in one transaction; returns the entry now stored.

        When the key already has an entry, the faster one (smaller ``time_ms``) stays (the existing one
        on a tie); the trials are always appended as a new run.
        """
        if self.readonly:
            raise FleetError("this results database was opened read-only")
        run = uuid.uuid4().hex
        rows = [{"fingerprint": entry.fingerprint, "family": entry.family, "problem": entry.problem,
                 "run": run, "ordinal": i, "config": cfg,
                 "value_ms": None if ms is None or not math.isfinite(ms) else float(ms), "worker": worker}
                for i, (cfg, ms) in enumerate(trials)]
        values = dict(zip(_ENTRY_COLS, dataclasses.astuple(entry)))
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif self.engine.dialect.name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:  # pragma: no cover - we document PostgreSQL and SQLite only
            raise FleetError(f"unsupported database {self.engine.dialect.name!r}: use PostgreSQL or SQLite")
        stmt = insert(_entries).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["fingerprint", "family", "problem"],
            set_={c: stmt.excluded[c] for c in _ENTRY_COLS[3:]},
            where=_entries.c.time_ms > stmt.excluded.time_ms)

        def write() -> Entry:
            with self.engine.begin() as c:
                c.execute(stmt)
                if rows:
                    c.execute(sa.insert(_trials), rows)
                got = c.execute(sa.select(_entries).where(_entries.c.fingerprint == entry.fingerprint,
                                                          _entries.c.family == entry.family,
                                                          _entries.c.problem == entry.problem)).one()
            return _entry(got)

        return _retry("storing a result", write, attempts=3)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Results":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RemoteCache:
    """The fleet's results as a read-only cache for inference hosts: hits are served from memory after
    the first query; ``preload`` fetches every entry of a device at once.

    Args:
        storage: the database URL (a PostgreSQL role with SELECT rights is enough).
        miss_ttl_s: how long a miss is remembered before the database is asked again (default 60 s).
    """

    def __init__(self, storage: str, *, miss_ttl_s: float = 60.0) -> None:
        self.results = Results(storage, readonly=True)
        self.miss_ttl_s = miss_ttl_s
        self._mem: dict[tuple[str, str, str], Entry] = {}
        self._missed: dict[tuple[str, str, str], float] = {}

    def get(self, fingerprint: str, family: str, problem: str, *, refresh: bool = False) -> Entry | None:
        """The entry for (fingerprint key, family name, problem key), or None (``refresh``: ask the
        database even when memory has an answer)."""
        key = (fingerprint, family, problem)
        if not refresh:
            if key in self._mem:
                return self._mem[key]
            t = self._missed.get(key)
            if t is not None and time.monotonic() - t < self.miss_ttl_s:
                return None
        e = self.results.get(*key)
        if e is None:
            self._missed[key] = time.monotonic()
        else:
            self._mem[key] = e
            self._missed.pop(key, None)
        return e

    def preload(self, fingerprint: str | None = None) -> int:
        """Fetch every entry (of one fingerprint key, or all) into memory; returns how many."""
        got = self.results.entries(fingerprint)
        for e in got:
            self._mem[e.key] = e
            self._missed.pop(e.key, None)
        return len(got)

    def entries(self, fingerprint: str | None = None, *, family: str | None = None) -> list[Entry]:
        """Every entry in the database (see ``Results.entries``)."""
        return self.results.entries(fingerprint, family=family)

    def close(self) -> None:
        self.results.close()

    def __enter__(self) -> "RemoteCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def pull(*, storage: str, store: Store | None = None, fingerprint: str | None = None) -> int:
    """Copy the fleet's results into a local cache, keeping the faster entry where both have one.

    Args:
        storage: the database URL (read-only access is enough).
        store: the local cache; None (default) is ``store.default_store()``.
        fingerprint: copy only this fingerprint key's entries; None (default) copies every device's.

    Returns:
        How many entries were copied.
    """
    from ..storage.store import default_store

    store = store if store is not None else default_store()
    with Results(storage, readonly=True) as res:
        got = res.entries(fingerprint)
    for e in got:
        store.put(e, policy="faster")
    return len(got)


def export_bundle(*, storage: str, path: str | os.PathLike, fingerprint: str | None = None,
                  family: str | None = None) -> int:
    """Write the fleet's results (of one fingerprint key and/or family, or all) as a bundle file.

    Args:
        storage: the database URL (read-only access is enough).
        path: the bundle file to write.
        fingerprint: only this fingerprint key's entries; None (default): all.
        family: only this family's entries; None (default): all.

    Returns:
        How many entries the bundle holds.
    """
    from ..storage import bundles

    with Results(storage, readonly=True) as res:
        bundle = bundles.export_store(res, fingerprint=fingerprint, family=family)
    bundles.write(bundle, path)
    return len(bundle.entries())
