"""The on-disk cache of tuned choices: one SQLite file, safe with many processes, never fatal.

Layout (one file, ``<cache dir>/tuning.sqlite``, directory created readable by its owner only):

- ``entries_v<N>``: one row per (device fingerprint key, family, problem key): the winner ("aten" or the
  winning configuration's canonical JSON), its time, aten's time, the number of trials, the date, the
  source ("tuned", "import", ...) and the budget it was tuned with (``max_trials``, ``time_budget_s``;
  0 when unknown).
- ``trials_v<N>``: every measurement made while tuning (configuration JSON, ms or NULL for a failure),
  grouped by tuning run and ordered, for later learning.
- ``claims_v<N>``: who is tuning which problem now, with a lease that expires.

``N`` is ``SCHEMA_VERSION``: bumping it makes new tables and ignores the old ones, so there are no
migrations. The file is in WAL mode; every write is one ``BEGIN IMMEDIATE`` transaction, so a process
killed mid-write leaves the previous state and concurrent writers wait for each other (busy timeout).

Faults never stop the caller: a corrupt file is renamed aside (``tuning.sqlite.corrupt-<timestamp>``) and
rebuilt, with one warning; a directory that cannot be created or written (read-only, vanished, disk full)
gives one warning and the store carries on in memory, starting from a copy of what was readable. In
read-only mode (``TORCHTUNE_OPS_READONLY=1`` or ``readonly=True``) nothing is ever written or created: the
file, if any, is copied into memory at open and later ``put``s stay in this process. A file this process
cannot write (a read-only file system, no write permission: ``unwritable``) is opened the same way, with
one warning, and its entries are used; ``Store.reason`` says why a store does not write to its file.

Hits are served from an in-memory dict in front of SQLite; a miss is remembered for ``miss_ttl_s``
seconds so that a run-time miss costs a database query at most that often.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from .. import settings
from ..errors import CacheError

__all__ = ["SCHEMA_VERSION", "DB_NAME", "Entry", "Trial", "Store", "CacheWarning", "default_path",
           "default_store", "problem_key", "canonical_json", "unwritable"]

#: version of the table layout; bump it to start from empty tables (old ones are ignored)
SCHEMA_VERSION = 2
#: file name of the database inside the cache directory
DB_NAME = "tuning.sqlite"

Key = tuple[str, str, str]


class CacheWarning(UserWarning):
    """The cache degraded (moved a corrupt file aside, or fell back to memory); the process goes on."""


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys: equal dicts give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def problem_key(problem: Mapping[str, Any]) -> str:
    """The cache key of a problem: the canonical JSON of its dict (``family.problem_to_dict(p)``)."""
    return canonical_json(dict(problem))


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _config_json(config: Any) -> str:
    if isinstance(config, str):
        return config
    if hasattr(config, "to_json"):
        return config.to_json()
    return canonical_json(dict(config))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tuned choice. ``winner`` is "aten" or a configuration's canonical JSON; times in ms.

    ``max_trials`` and ``time_budget_s`` are the budget the entry was tuned with (0: unknown, e.g. an entry
    of a bundle written before budgets were recorded); ``covers`` says whether that budget is at least the
    one asked now. ``from_dict`` validates types and ranges (bundles are untrusted data); ``to_dict`` is
    its inverse.
    """

    fingerprint: str
    family: str
    problem: str
    winner: str
    time_ms: float
    aten_ms: float
    trials: int = 0
    created: str = ""
    source: str = "tuned"
    max_trials: int = 0
    time_budget_s: float = 0.0
    # per call with the host's cost included (back-to-back calls, no flush, as a model run eagerly): the
    # best Triton configuration's and aten's; 0 when not measured. ``decided``: "device" when the GPU time
    # (time_ms against aten_ms) decided, "host" when the host-inclusive times overruled it, "" unmeasured.
    host_ms: float = 0.0
    aten_host_ms: float = 0.0
    decided: str = ""

    def __post_init__(self) -> None:
        if not self.created:
            object.__setattr__(self, "created", _now_iso())

    @property
    def key(self) -> Key:
        return (self.fingerprint, self.family, self.problem)

    @property
    def is_aten(self) -> bool:
        return self.winner == "aten"

    def config(self) -> dict[str, Any] | None:
        """The winning configuration as a dict, or None when aten won."""
        return None if self.is_aten else json.loads(self.winner)

    def covers(self, max_trials: int, time_budget_s: float) -> bool:
        """Whether this entry was tuned with at least the budget (``max_trials``, ``time_budget_s``) asked
        now, so that tuning again could not find more. False for an entry without a single measurement
        (untuned) or one tuned with fewer trials; a smaller time budget counts only where the search ended
        before its trial limit (it may have been cut short by the clock). An entry whose budget is unknown
        covers any budget when it made at least one measurement."""
        if self.trials <= 0 and self.max_trials <= 0:
            return False
        if self.max_trials <= 0:
            return True
        if self.max_trials < max_trials:
            return False
        return not (self.time_budget_s < time_budget_s and self.trials < self.max_trials)

    @property
    def speedup(self) -> float:
        """aten's time over the winner's (1.0 when aten won)."""
        return self.aten_ms / self.time_ms if self.time_ms > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Entry":
        """Build and validate; raises ValueError naming the bad field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an entry must be an object, got {type(data).__name__}")
        keys = data.keys()
        if not keys <= _FIELDS:
            raise ValueError(f"unknown entry fields: {sorted(set(keys) - _FIELDS)}")
        if not keys >= _REQUIRED:
            raise ValueError(f"missing entry fields: {sorted(_REQUIRED - set(keys))}")
        kw = dict(data)
        for name in _STRINGS:
            v = kw.get(name, "")
            if not isinstance(v, str) or len(v) > 10000:
                raise ValueError(f"entry field {name!r} must be a string, got {v!r:.80}")
        for name in ("time_ms", "aten_ms", "host_ms", "aten_host_ms"):
            if name not in kw:
                continue
            v = kw[name]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"entry field {name!r} must be a finite non-negative number, got {v!r}")
            kw[name] = float(v)
        for name in ("trials", "max_trials"):
            t = kw.get(name, 0)
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= 10**7:
                raise ValueError(f"entry field {name!r} must be a non-negative int, got {t!r}")
            kw[name] = int(t)
        b = kw.get("time_budget_s", 0.0)
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not math.isfinite(b) or not 0 <= b <= 1e7:
            raise ValueError(f"entry field 'time_budget_s' must be a finite non-negative number, got {b!r}")
        kw["time_budget_s"] = float(b)
        if not _json_object(kw["problem"], _PROBLEM_VALUES):
            raise ValueError(f"entry field 'problem' must be a JSON object of simple values: {kw['problem']!r:.80}")
        if kw["winner"] != "aten" and not _json_object(kw["winner"], _CONFIG_VALUES):
            raise ValueError(f"entry field 'winner' must be 'aten' or a JSON object of ints, strings and "
                             f"booleans: {kw['winner']!r:.80}")
        return cls(**kw)


_FIELDS = frozenset(f.name for f in dataclasses.fields(Entry))
_REQUIRED = frozenset(("fingerprint", "family", "problem", "winner", "time_ms", "aten_ms"))
_STRINGS = ("fingerprint", "family", "problem", "winner", "created", "source", "decided")
_PROBLEM_VALUES = (int, float, str, bool, list, type(None))
_CONFIG_VALUES = (int, str, bool)


@functools.lru_cache(maxsize=4096)
def _json_object(text: str, values: tuple[type, ...]) -> bool:
    """Whether ``text`` is a JSON object whose values are of the given types (cached: winners repeat)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return type(obj) is dict and all(isinstance(v, values) for v in obj.values())


@dataclasses.dataclass(frozen=True)
class Trial:
    """One measurement from a tuning run: ``value_ms`` is ``math.inf`` for a failed configuration."""

    fingerprint: str
    family: str
    problem: str
    run: str
    ordinal: int
    config: str
    value_ms: float

    def config_dict(self) -> dict[str, Any]:
        return json.loads(self.config)


def default_path() -> Path:
    """``<TORCHTUNE_OPS_CACHE_DIR or the platform's user cache dir>/tuning.sqlite``."""
    d = settings.current().cache_dir
    if not d:
        import platformdirs

        d = platformdirs.user_cache_dir("torchtune_ops")
    return Path(d) / DB_NAME


# SQLite primary result codes we act on (https://sqlite.org/rescode.html)
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 6, 11, 26


def _classify(e: sqlite3.Error) -> str:
    """'bug' (raise), 'corrupt' (move aside), 'busy' (retry, then as unusable) or 'unusable' (fall back
    to memory)."""
    if isinstance(e, (sqlite3.ProgrammingError, sqlite3.InterfaceError, sqlite3.IntegrityError)):
        return "bug"
    code = getattr(e, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        primary = code & 0xFF
        if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            return "corrupt"
        return "busy" if primary in (_SQLITE_BUSY, _SQLITE_LOCKED) else "unusable"
    # Python 3.10: corrupt/not-a-database errors are plain DatabaseError, I/O problems OperationalError
    return "corrupt" if type(e) is sqlite3.DatabaseError else "unusable"


def _describe(e: sqlite3.Error) -> str:
    """The error with SQLite's extended code name where Python gives it (e.g. SQLITE_IOERR_SHORT_READ)."""
    name = getattr(e, "sqlite_errorname", None)
    return f"{e} ({name})" if name else str(e)


def _host_id() -> str:
    """This host, and on Linux its PID namespace, so PIDs are only compared where they mean the same."""
    host = socket.gethostname()
    with contextlib.suppress(OSError):
        host += f"#{os.stat('/proc/self/ns/pid').st_ino}"
    return host


def _ident_of(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, None when there is none (or it cannot be looked up)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # cannot tell safely; rely on the lease
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@contextlib.contextmanager
def _dir_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on ``<path>.lock`` (POSIX flock), for the rare operations that
    rename the database; where it cannot be had, nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries_v{v} (
    fingerprint TEXT NOT NULL, family TEXT NOT NULL, problem TEXT NOT NULL,
    winner TEXT NOT NULL, time_ms REAL NOT NULL, aten_ms REAL NOT NULL, trials INTEGER NOT NULL,
    created TEXT NOT NULL, source TEXT NOT NULL,{extra}
    PRIMARY KEY (fingerprint, family, problem)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS trials_v{v} (
    fingerprint TEXT NOT NULL, family TEXT NOT NULL, problem TEXT NOT NULL, run TEXT NOT NULL,
    ordinal INTEGER NOT NULL, config TEXT NOT NULL, value_ms REAL,
    PRIMARY KEY (fingerprint, family, problem, run, ordinal)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS claims_v{v} (
    fingerprint TEXT NOT NULL, family TEXT NOT NULL, problem TEXT NOT NULL,
    owner TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (fingerprint, family, problem)) WITHOUT ROWID;
"""

#: entry columns after ``source``, each with a default: a table of this schema version made without one of
#: them (by a build that added its columns in another order of development) gets it added at open
_ENTRY_DEFAULTED = {"max_trials": "INTEGER NOT NULL DEFAULT 0", "time_budget_s": "REAL NOT NULL DEFAULT 0",
                   "host_ms": "REAL NOT NULL DEFAULT 0", "aten_host_ms": "REAL NOT NULL DEFAULT 0",
                   "decided": "TEXT NOT NULL DEFAULT ''"}
_ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(Entry))
_ENTRY_COLS = ", ".join(_ENTRY_FIELDS)
_ENTRY_VALUES = "VALUES (" + ",".join("?" * len(_ENTRY_FIELDS)) + ")"


@contextlib.contextmanager
def _tx(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction; rolled back on any exception, Ctrl-C included."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Store:
    """The cache of tuned choices. Open with ``Store.open()``; thread-safe; usable after ``fork``.

    ``mode`` is "disk" (the SQLite file), "memory" (degraded after a fault: nothing persists) or
    "readonly" (copied from disk at open; never writes).
    """

    #: seconds a miss is remembered before ``get`` asks the database again
    miss_ttl_s: float = 10.0

    def __init__(self, path: Path, *, readonly: bool, busy_timeout_s: float) -> None:
        # use Store.open(); this only sets fields
        self.path = path
        self.readonly = readonly
        self.busy_timeout_s = busy_timeout_s
        self.mode = "memory"
        self.reason: str | None = None  # why the store is not writing to its file (None in "disk" mode)
        self.hits = 0
        self.misses = 0
        self._conn: sqlite3.Connection | None = None
        self._ident: tuple[int, int] | None = None
        self._lock = threading.RLock()
        self._mem: dict[Key, Entry] = {}
        self._missed: dict[Key, float] = {}
        self._remembered: dict[Key, Entry] = {}
        self._warned: set[str] = set()
        self._salvaged: tuple[list[tuple], list[tuple]] | None = None  # rows read from a corrupt file
        self._set_owner()

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: str | os.PathLike | None = None, *, readonly: bool | None = None,
             busy_timeout_s: float = 30.0) -> "Store":
        """Open (creating if needed) the cache database.

        Args:
            path: the database file; None (default) is ``default_path()``, under
                ``TORCHTUNE_OPS_CACHE_DIR`` or the platform's user cache directory.
            readonly: never write or create anything; None (default) follows ``TORCHTUNE_OPS_READONLY``.
            busy_timeout_s: how long a write waits for other processes' transactions (default 30 s)
                before the store gives up on the file and degrades to memory.

        Never raises for file-system or database faults: see the module docstring.
        """
        ro = settings.current().readonly if readonly is None else bool(readonly)
        store = cls(Path(path) if path is not None else default_path(), readonly=ro,
                    busy_timeout_s=busy_timeout_s)
        with store._lock:
            why = None if ro else unwritable(store.path)
            if ro:
                store._open_readonly()
            elif why is not None and store.path.is_file():
                # a read-only file system or no write permission: use what the file holds, write nothing
                store._open_readonly()
                store.reason = why
                n = store._conn.execute(f"SELECT count(*) FROM entries_v{SCHEMA_VERSION}").fetchone()[0]
                store._warn("readonly", f"torchtune_ops cache {store.path} is read-only ({why}): its {n} "
                                        "entries are used; new choices will not persist")
            elif why is not None:
                store._to_memory(f"cannot create {store.path} ({why})")
            else:
                store._open_disk()
        return store

    def _set_owner(self) -> None:
        self._pid = os.getpid()
        self._host = _host_id()
        self.owner = f"{self._host}:{self._pid}:{uuid.uuid4().hex[:12]}"

    def _connect(self, target: str, *, uri: bool = False) -> sqlite3.Connection:
        return sqlite3.connect(target, timeout=self.busy_timeout_s, isolation_level=None,
                               check_same_thread=False, uri=uri)

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        wanted = {f"{t}_v{SCHEMA_VERSION}" for t in ("entries", "trials", "claims")}
        extra = "".join(f"\n    {k} {v}," for k, v in _ENTRY_DEFAULTED.items())
        if not wanted <= names:
            with _tx(conn):
                for stmt in _SCHEMA.format(v=SCHEMA_VERSION, extra=extra).split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
        table = f"entries_v{SCHEMA_VERSION}"
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        missing = [k for k in _ENTRY_DEFAULTED if k not in have]
        if missing:
            with _tx(conn):
                for k in missing:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {k} {_ENTRY_DEFAULTED[k]}")

    def _connect_disk(self) -> sqlite3.Connection:
        """Open the file read-write in WAL mode with our tables; raises OSError or sqlite3.Error."""
        d = self.path.parent
        if not d.is_dir():
            d.mkdir(parents=True, mode=0o700)
        # The identity (device, inode) of the file this connection opened: the only file ever moved aside as
        # corrupt. A process beside us may replace the file between the open and the stat; then the stats
        # before and after differ and we open again, rather than take the new file for the one we opened
        # (and later move a good file aside).
        for _ in range(8):
            before = _ident_of(self.path)
            conn = self._connect(str(self.path))
            after = _ident_of(self.path)
            if after is not None and before in (None, after):
                break
            conn.close()
        else:
            raise OSError(f"{self.path} keeps being replaced or removed while it is opened")
        try:
            self._ident = after
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._ensure_schema(conn)
            if before is None:  # we created it
                with contextlib.suppress(OSError):
                    os.chmod(self.path, 0o600)
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_disk(self) -> None:
        """(Re)open the file; the connection in use, if any, stays the source of a memory fallback until
        the new one works."""
        moved, busy = False, 0
        while True:
            t0 = time.monotonic()
            try:
                conn = self._connect_disk()
            except OSError as e:
                self._to_memory(f"cannot create or open {self.path}: {e}")
                return
            except sqlite3.Error as e:
                kind = _classify(e)
                if kind == "bug":
                    raise
                if kind == "corrupt" and not moved:
                    moved = True
                    self._move_aside(e)
                    continue
                # SQLite answers "busy" at once, without waiting out the busy timeout, in some races (e.g.
                # processes beside us setting up a fresh file at once): try again shortly. A busy answer
                # after a long wait means a stuck lock: fall back to memory.
                if kind == "busy" and busy < 5 and time.monotonic() - t0 < 1.0:
                    time.sleep(0.05 * 2 ** busy)
                    busy += 1
                    continue
                self._to_memory(f"cannot use {self.path}: {_describe(e)}")
                return
            old, self._conn, self.mode, self.reason = self._conn, conn, "disk", None
            if old is not None:
                with contextlib.suppress(sqlite3.Error):
                    old.close()
            self._restore_salvaged()
            return

    def _check_file(self) -> None:
        """Reconnect when the file we use is no longer the one at ``path``: another process moved a
        corrupt file aside (silently), or the file or directory vanished (one warning, then recreated)."""
        ident = _ident_of(self.path)
        if ident is None:
            with _dir_lock(self.path):  # a process moving a corrupt file aside replaces it under this lock
                replaced = os.path.exists(self.path)
            self._open_disk()  # recreates it, or falls back to memory with its own warning
            if self.mode == "disk" and not replaced:
                self._warn("vanished", f"torchtune_ops cache {self.path} vanished; started a new one")
            return
        if ident != self._ident:
            self._open_disk()

    def _open_readonly(self) -> None:
        self.mode = "readonly"
        self.reason = "read-only mode"
        self._conn = self._copy_to_memory()

    def _copy_to_memory(self) -> sqlite3.Connection:
        """An in-memory database with a copy of the file's tables (our tables, empty, where there is no
        file or it cannot be read: one warning)."""
        mem = self._memory_db()
        if self.path.is_file():
            base = self.path.absolute().as_uri()
            # Without a WAL file the database is at rest: open it immutable, which creates no -wal/-shm
            # files. With one (a writer is active, or died), read through it; immutable is the fallback.
            queries = ("?mode=ro", "?mode=ro&immutable=1")
            if not os.path.exists(f"{self.path}-wal"):
                queries = queries[::-1]
            for query in queries:
                src = None
                try:
                    src = self._connect(base + query, uri=True)
                    src.execute("SELECT count(*) FROM sqlite_master").fetchone()
                    src.backup(mem)
                    break
                except sqlite3.Error as e:
                    last = e
                finally:
                    if src is not None:
                        src.close()
            else:
                self._warn("unreadable", f"torchtune_ops cache {self.path} cannot be read ({last}); "
                                         "going on with an empty in-memory cache")
                mem = self._memory_db()
        self._ensure_schema(mem)
        return mem

    def _memory_db(self) -> sqlite3.Connection:
        return self._connect(":memory:")

    def _to_memory(self, reason: str) -> None:
        """Degrade to an in-memory database holding a copy of whatever the file still gives."""
        mem = None
        src = self._conn
        if src is not None:
            mem = self._memory_db()
            try:
                src.backup(mem)
            except sqlite3.Error:
                mem.close()
                mem = None
            with contextlib.suppress(sqlite3.Error):
                src.close()
        if mem is None:  # read the file itself, also where only an immutable open can (no -shm file)
            mem = self._copy_to_memory()
        self._ensure_schema(mem)
        self._conn = mem
        self.reason = reason
        self._ident = None
        self.mode = "readonly" if self.readonly else "memory"
        self._warn("memory", f"torchtune_ops cache: {reason}; using an in-memory cache for this "
                             "process (tuned choices will not persist)")

    def _salvage(self) -> tuple[list[tuple], list[tuple]]:
        """Whatever entry and trial rows the corrupt file still gives, read in key order until the first
        error (corruption often hits one table's pages only: the others stay readable)."""
        v = SCHEMA_VERSION
        tables = ((f"SELECT {_ENTRY_COLS} FROM entries_v{v}", "1, 2, 3", 3),
                  (f"SELECT * FROM trials_v{v}", "1, 2, 3, 4, 5", 5))
        got: list[dict[tuple, tuple]] = [{}, {}]
        try:
            conn = self._connect(self.path.absolute().as_uri() + "?mode=ro", uri=True)
        except sqlite3.Error:
            return [], []
        try:
            for (sql, order, pk), rows in zip(tables, got):
                # in key order up to the damage, then backwards from the end down to it
                for direction in ("ASC", "DESC"):
                    keys = ", ".join(f"{c} {direction}" for c in order.split(", "))
                    try:
                        cur = conn.execute(f"{sql} ORDER BY {keys}")
                        while True:
                            batch = cur.fetchmany(32)
                            if not batch:
                                break
                            rows.update((r[:pk], r) for r in batch)
                    except sqlite3.Error:
                        continue  # keep what was read before the damage
        finally:
            conn.close()
        entries = [r for r in got[0].values() if self._valid(r) is not None]
        trials = [r for r in got[1].values() if len(r) == 7 and all(isinstance(x, str) for x in r[:4])
                  and isinstance(r[4], int) and isinstance(r[5], str) and (r[6] is None or isinstance(r[6], float))]
        return entries, trials

    def _restore_salvaged(self) -> None:
        """Write the rows salvaged from a corrupt file into the new one (existing rows win)."""
        salvaged, self._salvaged = self._salvaged, None
        if not salvaged or self._conn is None:
            return
        entries, trials = salvaged
        v = SCHEMA_VERSION
        try:
            with _tx(self._conn):
                self._conn.executemany(f"INSERT OR IGNORE INTO entries_v{v} ({_ENTRY_COLS}) "
                                       + _ENTRY_VALUES, entries)
                self._conn.executemany(f"INSERT OR IGNORE INTO trials_v{v} VALUES (?,?,?,?,?,?,?)", trials)
        except sqlite3.Error as e:  # the new file fails too: the caller's next operation handles it
            self._warn("salvage", f"torchtune_ops cache: could not write the rows recovered from the "
                                  f"corrupt file into {self.path} ({e})")

    def _move_aside(self, error: BaseException) -> None:
        """Rename the corrupt database we opened (and its WAL files) aside, after reading whatever rows it
        still gives (written into the new file when it is opened). When the file at the path is another one
        already (a process beside us moved ours aside), leave it alone."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        with _dir_lock(self.path):  # stat-and-rename must not interleave with another process's
            ident = _ident_of(self.path)  # None when already gone: another process moved it
            same = ident is not None and ident == self._ident
            aside = None
            if same:
                self._salvaged = self._salvage()
                stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
                aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
                n = 1
                while aside.exists():
                    n += 1
                    aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
                # WAL files first: while the corrupt file is still at the path they are its own; once it
                # is gone, a process beside us may create a new database with new WAL files there.
                for suffix in ("-wal", "-shm"):
                    with contextlib.suppress(OSError):
                        os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
                try:
                    os.replace(self.path, aside)
                except OSError:
                    aside = None
                else:
                    # an empty file (a valid empty database) takes its place before the lock is released,
                    # so a process beside us never sees the path missing and takes it for a vanished cache
                    with contextlib.suppress(OSError):
                        os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        if aside is not None:
            n_e, n_t = (len(x) for x in self._salvaged) if self._salvaged else (0, 0)
            self._warn("corrupt", f"torchtune_ops cache {self.path} was corrupt ({error}); "
                                  f"moved it aside to {aside} and started a new one with the {n_e} entries "
                                  f"and {n_t} measurements it still gave")
        else:
            self._salvaged = None

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, CacheWarning, stacklevel=4)

    # ---------------------------------------------------------------- running statements

    def _do(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn(conn)`` under the lock; on a fault, recover (see module docstring) and retry."""
        with self._lock:
            if os.getpid() != self._pid:
                self._after_fork()
            elif self.mode == "disk":
                self._check_file()
            for attempt in range(4):
                try:
                    return fn(self._conn)
                except sqlite3.Error as e:
                    kind = _classify(e)
                    if kind == "bug":
                        raise
                    if self.mode != "disk":
                        raise CacheError(f"the in-memory cache failed: {e}") from e
                    if kind == "busy" and attempt < 2:  # e.g. another process recovering the WAL
                        time.sleep(0.05 * (attempt + 1))
                        continue
                    if kind == "corrupt":
                        self._move_aside(e)
                        self._open_disk()
                    else:
                        self._to_memory(f"cannot write {self.path}: {_describe(e)}")
            raise CacheError(f"the cache at {self.path} keeps failing")

    _orphans: list = []  # connections inherited through fork: never used, never closed

    def _after_fork(self) -> None:
        self._set_owner()
        if self.mode == "disk":  # a file connection must not be used across fork: open a new one
            Store._orphans.append(self._conn)
            self._conn = None
            self._open_disk()
        # a memory database is a private copy in the child already: keep using it

    # ---------------------------------------------------------------- entries

    def get(self, fingerprint: str, family: str, problem: str, *, refresh: bool = False) -> Entry | None:
        """The entry for (fingerprint key, family name, problem key), or None.

        Served from memory when seen before (a remembered miss is re-checked after ``miss_ttl_s``);
        ``refresh=True`` always asks the database (to see other processes' results).
        """
        key = (fingerprint, family, problem)
        if not refresh:
            e = self._mem.get(key)
            if e is not None:
                self.hits += 1
                return e
            t = self._missed.get(key)
            if t is not None and time.monotonic() - t < self.miss_ttl_s:
                self.misses += 1
                return None
        row = self._do(lambda c: c.execute(
            f"SELECT {_ENTRY_COLS} FROM entries_v{SCHEMA_VERSION} "
            "WHERE fingerprint=? AND family=? AND problem=?", key).fetchone())
        if row is None:
            e = self._remembered.get(key)
            if e is None:
                self.misses += 1
                self._missed[key] = time.monotonic()
                self._mem.pop(key, None)
                return None
        else:
            e = self._valid(row)
            if e is None:
                return None
        self._mem[key] = e
        self._missed.pop(key, None)
        self.hits += 1
        return e

    def _valid(self, row: tuple) -> Entry | None:
        """An Entry from a database row, validated like untrusted data; None (one warning) if malformed."""
        try:
            return Entry.from_dict(dict(zip(_ENTRY_FIELDS, row)))
        except ValueError as e:
            self._warn("invalid", f"torchtune_ops cache {self.path} holds malformed entries ({e}); "
                                  "they are ignored")
            return None

    def remember(self, entries: Iterable[Entry]) -> int:
        """Serve ``entries`` in this process without writing them anywhere (e.g. read-only bundles loaded
        at start). An entry stored in the database for the same key takes precedence. Returns how many."""
        n = 0
        for e in entries:
            self._remembered[e.key] = e
            self._missed.pop(e.key, None)
            n += 1
        return n

    def preload(self, fingerprint: str | None = None) -> int:
        """Load every entry (of one fingerprint key, or all) into memory; returns how many."""
        got = self.entries(fingerprint)
        for e in got:
            self._mem[e.key] = e
            self._missed.pop(e.key, None)
        return len(got)

    def put(self, entry: Entry, trials: Iterable[tuple[Any, float | None]] = (), *,
            policy: str = "faster") -> Entry:
        """Store ``entry`` and its trial history atomically; returns the entry now in the cache.

        Args:
            entry: the tuned choice (times must be finite).
            trials: (configuration, ms) pairs in the order measured; the configuration is a Config, a
                dict or its JSON; ms is ``inf``/NaN/None for a failure. Always appended, as a new run.
            policy: what to do when the key already has an entry (another process tuned it too):
                "faster" (default) keeps the one with the smaller ``time_ms`` (the existing one on a
                tie; a kept entry takes the larger of the two budgets, and an entry without trials
                always gives way to one with trials), "replace" overwrites, "keep" keeps the existing one.
        """
        if policy not in ("faster", "replace", "keep"):
            raise ValueError(f"policy must be 'faster', 'replace' or 'keep', got {policy!r}")
        for v in (entry.time_ms, entry.aten_ms):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"entry times must be finite and non-negative: {entry}")
        run = uuid.uuid4().hex
        rows = []
        for i, (cfg, ms) in enumerate(trials):
            value = None if ms is None or not math.isfinite(ms) else float(ms)
            rows.append((*entry.key, run, i, _config_json(cfg), value))
        v = SCHEMA_VERSION

        def write(c: sqlite3.Connection) -> Entry:
            with _tx(c):
                row = c.execute(f"SELECT {_ENTRY_COLS} FROM entries_v{v} "
                                "WHERE fingerprint=? AND family=? AND problem=?", entry.key).fetchone()
                old = Entry(*row) if row else None
                untuned = old is not None and old.trials == 0 and entry.trials > 0
                keep = old is not None and not untuned and (policy == "keep" or (
                    policy == "faster" and old.time_ms <= entry.time_ms))
                if keep and policy == "faster" and (entry.max_trials > old.max_trials
                                                    or entry.time_budget_s > old.time_budget_s):
                    # a run with a bigger budget found nothing faster: the kept winner stands for it too
                    old = dataclasses.replace(old, max_trials=max(old.max_trials, entry.max_trials),
                                              time_budget_s=max(old.time_budget_s, entry.time_budget_s))
                    c.execute(f"INSERT OR REPLACE INTO entries_v{v} ({_ENTRY_COLS}) " + _ENTRY_VALUES,
                              dataclasses.astuple(old))
                if not keep:
                    c.execute(f"INSERT OR REPLACE INTO entries_v{v} ({_ENTRY_COLS}) " + _ENTRY_VALUES,
                              dataclasses.astuple(entry))
                if rows:
                    c.executemany(f"INSERT INTO trials_v{v} VALUES (?,?,?,?,?,?,?)", rows)
            return old if keep else entry

        stored = self._do(write)
        self._mem[entry.key] = stored
        self._missed.pop(entry.key, None)
        return stored

    def entries(self, fingerprint: str | None = None, *, family: str | None = None) -> list[Entry]:
        """Every stored entry, optionally of one fingerprint key and/or one family, in key order."""
        sql = f"SELECT {_ENTRY_COLS} FROM entries_v{SCHEMA_VERSION}"
        where, args = _where(fingerprint=fingerprint, family=family)
        rows = self._do(lambda c: c.execute(sql + where + " ORDER BY 1, 2, 3", args).fetchall())
        return [e for e in map(self._valid, rows) if e is not None]

    def trials(self, fingerprint: str | None = None, family: str | None = None, *,
               problem: str | None = None) -> list[Trial]:
        """The recorded measurements, optionally filtered, ordered by key, run and ordinal."""
        sql = (f"SELECT fingerprint, family, problem, run, ordinal, config, value_ms "
               f"FROM trials_v{SCHEMA_VERSION}")
        where, args = _where(fingerprint=fingerprint, family=family, problem=problem)
        rows = self._do(lambda c: c.execute(sql + where + " ORDER BY 1, 2, 3, 4, 5", args).fetchall())
        return [Trial(*r[:6], math.inf if r[6] is None else r[6]) for r in rows]

    def delete(self, fingerprint: str, family: str, problem: str) -> bool:
        """Remove one entry and its trials; True when there was an entry."""
        key = (fingerprint, family, problem)

        def run(c: sqlite3.Connection) -> bool:
            with _tx(c):
                n = c.execute(f"DELETE FROM entries_v{SCHEMA_VERSION} WHERE fingerprint=? AND family=? "
                              "AND problem=?", key).rowcount
                c.execute(f"DELETE FROM trials_v{SCHEMA_VERSION} WHERE fingerprint=? AND family=? "
                          "AND problem=?", key)
            return n > 0

        gone = self._do(run)
        self._mem.pop(key, None)
        self._missed.pop(key, None)
        return gone

    def clear(self, fingerprint: str | None = None) -> int:
        """Remove every entry, trial and claim (of one fingerprint key, or all); returns entries removed.
        Clearing everything also drops tables left by older schema versions."""
        where, args = _where(fingerprint=fingerprint)

        def run(c: sqlite3.Connection) -> int:
            with _tx(c):
                n = c.execute(f"DELETE FROM entries_v{SCHEMA_VERSION}" + where, args).rowcount
                for t in ("trials", "claims"):
                    c.execute(f"DELETE FROM {t}_v{SCHEMA_VERSION}" + where, args)
                if fingerprint is None:
                    for (name,) in c.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
                        base, _, ver = name.rpartition("_v")
                        if base in ("entries", "trials", "claims") and ver != str(SCHEMA_VERSION):
                            c.execute(f'DROP TABLE "{name}"')
            return n

        n = self._do(run)
        self._mem.clear()
        self._missed.clear()
        return n

    # ---------------------------------------------------------------- claims

    def claim(self, fingerprint: str, family: str, problem: str, *, lease_s: float = 300.0) -> bool:
        """Claim the right to tune a problem for ``lease_s`` seconds; True when granted.

        Granted when nobody holds it, when this store already holds it (the lease is renewed), when the
        holder's lease expired, or when the holder is a dead process on this host. Claims in a degraded
        (memory) store only exclude this process's own threads.
        """
        key = (fingerprint, family, problem)
        v = SCHEMA_VERSION

        def run(c: sqlite3.Connection) -> bool:
            now = time.time()
            with _tx(c):
                row = c.execute(f"SELECT owner, host, pid, expires FROM claims_v{v} "
                                "WHERE fingerprint=? AND family=? AND problem=?", key).fetchone()
                if row is not None:
                    owner, host, pid, expires = row
                    stale = expires < now or (host == self._host and pid != self._pid
                                              and not _pid_alive(pid))
                    if owner != self.owner and not stale:
                        return False
                c.execute(f"INSERT OR REPLACE INTO claims_v{v} VALUES (?,?,?,?,?,?,?)",
                          (*key, self.owner, self._host, self._pid, now + lease_s))
            return True

        return self._do(run)

    def release(self, fingerprint: str, family: str, problem: str) -> bool:
        """Give up this store's claim on a problem; True when it held one."""
        key = (fingerprint, family, problem)

        def run(c: sqlite3.Connection) -> bool:
            with _tx(c):
                return c.execute(f"DELETE FROM claims_v{SCHEMA_VERSION} WHERE fingerprint=? AND "
                                 "family=? AND problem=? AND owner=?", (*key, self.owner)).rowcount > 0

        return self._do(run)

    def claimed(self, fingerprint: str, family: str, problem: str) -> bool:
        """True when some live lease (anyone's) covers the problem now."""
        key = (fingerprint, family, problem)
        row = self._do(lambda c: c.execute(
            f"SELECT expires FROM claims_v{SCHEMA_VERSION} WHERE fingerprint=? AND family=? AND problem=?",
            key).fetchone())
        return row is not None and row[0] >= time.time()

    # ---------------------------------------------------------------- housekeeping

    def stats(self) -> dict[str, Any]:
        """Where the cache is, its mode, row counts, file size and this process's hit/miss counts."""
        v = SCHEMA_VERSION

        def run(c: sqlite3.Connection) -> tuple:
            return (c.execute(f"SELECT count(*), count(DISTINCT fingerprint) FROM entries_v{v}").fetchone()
                    + c.execute(f"SELECT count(*) FROM trials_v{v}").fetchone()
                    + c.execute(f"SELECT count(*) FROM claims_v{v}").fetchone())

        n_entries, n_fps, n_trials, n_claims = self._do(run)
        size = 0
        if self.mode == "disk":
            for suffix in ("", "-wal"):
                with contextlib.suppress(OSError):
                    size += os.stat(f"{self.path}{suffix}").st_size
        return {"path": str(self.path), "mode": self.mode, "schema": v, "entries": n_entries,
                "fingerprints": n_fps, "trials": n_trials, "claims": n_claims, "bytes": size,
                "remembered": len(self._remembered),
                "hits": self.hits, "misses": self.misses}

    def close(self) -> None:
        """Close the database (memory stores lose their content)."""
        with self._lock:
            if self._conn is not None and os.getpid() == self._pid:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
            self._conn = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, mode={self.mode!r})"


def unwritable(path: str | os.PathLike) -> str | None:
    """Why this process cannot write the cache database at ``path``, or None when it can as far as the file
    system says (``os.access``: permissions and read-only mounts). Where the file or its directory does not
    exist yet, the nearest existing parent decides."""
    path = Path(path)
    d = path.parent
    if path.exists():
        if not path.is_file():
            return f"{path} is not a file"
        if not os.access(path, os.W_OK):
            return f"{path} is not writable"
        if not os.access(d, os.W_OK | os.X_OK):  # SQLite creates -wal/-shm files beside it
            if not all(os.access(f"{path}{sfx}", os.W_OK) for sfx in ("-wal", "-shm")):
                return f"its directory {d} is not writable"
        return None
    probe = d
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def _where(**filters: str | None) -> tuple[str, tuple]:
    parts = [(k, v) for k, v in filters.items() if v is not None]
    if not parts:
        return "", ()
    return " WHERE " + " AND ".join(f"{k}=?" for k, _ in parts), tuple(v for _, v in parts)


_defaults: dict[tuple[str, bool], Store] = {}
_defaults_lock = threading.Lock()


def default_store() -> Store:
    """The process's store for the current settings (cache dir, read-only), opened on first use."""
    s = settings.current()
    key = (str(default_path()), s.readonly)
    store = _defaults.get(key)
    if store is None:
        with _defaults_lock:
            store = _defaults.get(key)
            if store is None:
                store = _defaults[key] = Store.open(readonly=s.readonly)
    return store
