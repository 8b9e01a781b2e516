"""The on-disk cache: round trips, memory front, conflict policy, claims, many processes, and every fault
(corrupt file, unwritable directory, full disk, read-only mode, killed writer, schema bump)."""
from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

from torchtune_ops import settings
from torchtune_ops.storage import store as store_mod
from torchtune_ops.storage.store import CacheWarning, Entry, Store, canonical_json, default_path, problem_key


def entry(i: int = 0, *, fp: str = "gpu-a", ms: float = 1.0, winner: str = "aten", **kw) -> Entry:
    kw.setdefault("created", "2026-01-02T03:04:05Z")  # fixed, so that entry(i) == entry(i)
    return Entry(fp, "gemm", problem_key({"M": i, "N": 7, "dtype": "float16"}), winner, ms,
                 kw.pop("aten_ms", 2.0), kw.pop("trials", 3), **kw)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "cache" / "tuning.sqlite"


@pytest.fixture
def st(path):
    with Store.open(path) as s:
        yield s


def cache_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, CacheWarning)]


def run_python(code: str, *args: str, wait: bool = True):
    cmd = [sys.executable, "-c", textwrap.dedent(code), *args]
    if not wait:
        return subprocess.Popen(cmd)
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------------------------ basics

def test_default_path_follows_settings(tmp_path):
    with settings.override(cache_dir=str(tmp_path / "x")):
        assert default_path() == tmp_path / "x" / "tuning.sqlite"
    with settings.override(cache_dir=str(tmp_path / "y")):
        s = Store.open()
        assert s.path == tmp_path / "y" / "tuning.sqlite" and s.mode == "disk"
        s.close()


def test_directory_and_file_are_private(path, st):
    st.put(entry())
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_put_get_round_trip_and_persistence(path):
    e = entry(5, winner=canonical_json({"BLOCK_M": 64, "num_warps": 4}), ms=0.5)
    with Store.open(path) as s:
        assert s.get(*e.key) is None
        assert s.put(e) == e
        assert s.get(*e.key) == e
    with Store.open(path) as s2:  # a new process would see the same
        got = s2.get(*e.key)
        assert got == e and got.config() == {"BLOCK_M": 64, "num_warps": 4} and got.speedup == 4.0


def test_problem_key_is_canonical():
    assert problem_key({"b": 1, "a": [2, 3]}) == problem_key({"a": (2, 3), "b": 1}) == '{"a":[2,3],"b":1}'


def test_entry_dict_round_trip():
    e = entry(3, winner='{"BLOCK_M":32}')
    assert Entry.from_dict(json.loads(json.dumps(e.to_dict()))) == e


@pytest.mark.parametrize("field, value", [
    ("time_ms", float("nan")), ("time_ms", -1.0), ("time_ms", "1.0"), ("aten_ms", math.inf),
    ("trials", -1), ("trials", 1.5), ("trials", True), ("family", 3), ("winner", "rm -rf /"),
    ("winner", '{"BLOCK_M": [1]}'), ("winner", "[1, 2]"), ("problem", "not json"), ("created", None),
    ("extra", 1),
])
def test_entry_from_dict_rejects_bad_fields(field, value):
    d = entry().to_dict()
    d[field] = value
    with pytest.raises(ValueError):
        Entry.from_dict(d)


def test_entry_from_dict_rejects_missing_fields():
    d = entry().to_dict()
    del d["winner"]
    with pytest.raises(ValueError):
        Entry.from_dict(d)


def test_put_rejects_non_finite_times(st):
    with pytest.raises(ValueError):
        st.put(entry(ms=math.nan))
    with pytest.raises(ValueError):
        st.put(entry(), policy="newest")
    assert st.entries() == []


def test_different_fingerprint_family_or_problem_misses(st):
    st.put(entry(1))
    e = entry(1)
    assert st.get(*e.key) == e
    assert st.get("gpu-b", e.family, e.problem) is None
    assert st.get(e.fingerprint, "conv2d", e.problem) is None
    assert st.get(e.fingerprint, e.family, entry(2).problem) is None


# ------------------------------------------------------------------------------------------------ memory front

def test_hits_come_from_memory(path, st):
    e = entry()
    st.put(e)
    with Store.open(path) as other:
        other.delete(*e.key)
    before = st.hits
    assert st.get(*e.key) == e  # from memory, though deleted on disk
    assert st.hits == before + 1
    assert st.get(*e.key, refresh=True) is None  # the database is asked


def test_misses_are_remembered_for_a_while(path, st):
    e = entry()
    assert st.get(*e.key) is None
    with Store.open(path) as other:
        other.put(e)
    assert st.get(*e.key) is None  # remembered miss: no query
    st.miss_ttl_s = 0.0
    assert st.get(*e.key) == e


def test_preload_fills_memory(path):
    with Store.open(path) as s:
        for i in range(5):
            s.put(entry(i))
        s.put(entry(0, fp="gpu-b"))
    with Store.open(path) as s:
        assert s.preload("gpu-a") == 5
        with Store.open(path) as other:
            other.clear()
        assert all(s.get(*entry(i).key) == entry(i) for i in range(5))


# ------------------------------------------------------------------------------------------------ conflicts

@pytest.mark.parametrize("policy, first_ms, second_ms, kept", [
    ("faster", 1.0, 0.5, "second"), ("faster", 0.5, 1.0, "first"), ("faster", 0.5, 0.5, "first"),
    ("keep", 1.0, 0.5, "first"), ("replace", 0.5, 1.0, "second"),
])
def test_one_entry_per_key_with_policy(st, policy, first_ms, second_ms, kept):
    a, b = entry(ms=first_ms, source="a"), entry(ms=second_ms, source="b")
    st.put(a)
    want = a if kept == "first" else b
    assert st.put(b, policy=policy) == want
    assert st.get(*a.key) == want and st.get(*a.key, refresh=True) == want
    assert len(st.entries()) == 1


def test_trials_are_stored_in_order_with_failures(st):
    e = entry()
    st.put(e, [({"B": 1}, 0.5), ('{"B":2}', math.inf), ({"B": 3}, None), ({"B": 4}, math.nan)])
    st.put(e, [({"B": 5}, 0.25)])
    tr = st.trials("gpu-a", "gemm")
    assert len(tr) == 5 and len({t.run for t in tr}) == 2
    first = [t for t in tr if t.run != [u for u in tr if u.config == '{"B":5}'][0].run]
    assert [t.ordinal for t in first] == [0, 1, 2, 3]
    assert [t.config_dict() for t in first] == [{"B": 1}, {"B": 2}, {"B": 3}, {"B": 4}]
    assert [t.value_ms for t in first] == [0.5, math.inf, math.inf, math.inf]
    assert st.trials("gpu-b") == [] and len(st.trials(problem=e.problem)) == 5


def test_entries_filter_delete_clear_and_stats(st):
    for i in range(3):
        st.put(entry(i), [({"B": i}, 1.0)])
    st.put(entry(0, fp="gpu-b"))
    assert [e.problem for e in st.entries("gpu-a")] == sorted(entry(i).problem for i in range(3))
    assert len(st.entries()) == 4 and len(st.entries(family="conv2d")) == 0
    s = st.stats()
    assert (s["entries"], s["fingerprints"], s["trials"], s["mode"], s["schema"]) == (4, 2, 3, "disk", store_mod.SCHEMA_VERSION)
    assert s["bytes"] > 0
    assert st.delete(*entry(1).key) and not st.delete(*entry(1).key)
    assert st.get(*entry(1).key) is None and len(st.trials("gpu-a")) == 2
    assert st.clear("gpu-a") == 2 and len(st.entries()) == 1
    assert st.clear() == 1 and st.entries() == [] and st.trials() == []


# ------------------------------------------------------------------------------------------------ claims

def test_second_claimer_is_refused_until_release(path, st):
    k = entry().key
    with Store.open(path) as other:
        assert st.claim(*k, lease_s=60)
        assert st.claim(*k, lease_s=60)  # renewing one's own claim
        assert not other.claim(*k, lease_s=60)
        assert other.claimed(*k) and st.claimed(*k)
        assert not other.release(*k)  # not theirs to release
        assert st.release(*k)
        assert not st.claimed(*k)
        assert other.claim(*k, lease_s=60)
        assert not st.claim(*k, lease_s=60)


def test_expired_lease_is_taken_over(path, st):
    k = entry().key
    with Store.open(path) as other:
        assert other.claim(*k, lease_s=0.05)
        assert not st.claim(*k, lease_s=60)
        time.sleep(0.1)
        assert not other.claimed(*k)
        assert st.claim(*k, lease_s=60)
        assert not other.claim(*k, lease_s=60)


def test_claim_of_a_dead_process_is_taken_over(path, st):
    k = entry().key
    run_python("""
        import os, sys
        from torchtune_ops.storage.store import Store
        s = Store.open(sys.argv[1])
        assert s.claim(*sys.argv[2:5], lease_s=3600)
        os._exit(0)  # dies holding the claim
    """, str(path), *k)
    assert st.claimed(*k)
    assert st.claim(*k, lease_s=60)


# ------------------------------------------------------------------------------------------------ processes

WRITER = """
    import sys, time
    from torchtune_ops.storage.store import Entry, Store, problem_key
    path, me, n, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    s = Store.open(path)
    while time.time() < start:
        time.sleep(0.005)
    for i in range(n):
        shared = Entry("gpu-a", "gemm", problem_key({"M": i}), "aten", 1.0 + me, 2.0, 2)
        own = Entry("gpu-a", "gemm", problem_key({"M": i, "writer": me}), "aten", 1.0, 2.0, 2)
        s.put(shared, [({"B": me}, 1.0), ({"B": i}, None)])
        s.put(own, [({"B": me}, 1.0), ({"B": i}, None)])
        if s.claim("gpu-a", "gemm", problem_key({"claim": i}), lease_s=3600):
            print("claimed", i, flush=True)
    print("done", s.mode, flush=True)
    sys.stdin.read()  # stay alive (holding the claims) until every writer is done
"""


def test_four_processes_writing_at_once(path):
    Store.open(path).close()
    n = 25
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(path), str(me), str(n),
                               str(start)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for me in range(4)]
    outs = []
    for p in procs:  # a writer that exited would leave its claims to be taken over: keep all alive
        lines = []
        while not lines or not lines[-1].startswith("done"):
            line = p.stdout.readline()
            assert line, f"writer died: {lines}"
            lines.append(line.strip())
        outs.append(lines)
    for p in procs:
        p.stdin.close()
        assert p.wait(timeout=60) == 0
        p.stdout.close()
    assert all(o[-1] == "done disk" for o in outs)  # nobody degraded to memory
    with Store.open(path) as s:
        entries = s.entries()
        keys = [e.key for e in entries]
        assert len(keys) == len(set(keys)) == n + 4 * n  # every entry present, none duplicated
        shared = [e for e in entries if "writer" not in e.problem]
        assert all(e.time_ms == 1.0 for e in shared)  # the fastest writer's answer is kept
        assert len(s.trials()) == 4 * 2 * n * 2
        assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    claimed = [line for o in outs for line in o if line.startswith("claimed")]
    assert sorted(claimed) == sorted(f"claimed {i}" for i in range(n))  # each claim granted once


KILLED_WRITER = """
    import sys
    from torchtune_ops.storage.store import Entry, Store, problem_key
    s = Store.open(sys.argv[1])
    i = 0
    while True:
        s.put(Entry("gpu-a", "gemm", problem_key({"M": i}), "aten", 1.0, 2.0, 300),
              [({"B": j, "pad": "x" * 200}, 0.5) for j in range(300)])
        i += 1
        if i == 3:
            print("go", flush=True)
"""


def test_a_writer_killed_mid_write_leaves_a_consistent_cache(path):
    Store.open(path).close()
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(path)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "go"
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        with Store.open(path) as s:
            n = len(s.entries())
            assert n >= 3
            assert len(s.trials()) == 300 * n  # every entry with all its trials, no partial put
            assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_store_keeps_working_in_a_forked_child(path, st):
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")  # pragma: no cover
    st.put(entry(0))
    pid = os.fork()
    if pid == 0:  # child: a fresh connection and owner are made on first use
        code = 0
        try:
            st.put(entry(1))
            assert st.get(*entry(0).key) == entry(0)
            assert st.claim(*entry(9).key, lease_s=60)
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert st.get(*entry(1).key, refresh=True) == entry(1)
    assert st.claim(*entry(9).key, lease_s=60)  # the child (dead now) held it


# ------------------------------------------------------------------------------------------------ faults

def test_corrupt_file_is_moved_aside_with_one_warning(path):
    with Store.open(path) as s:
        s.put(entry())
    garbage = os.urandom(3000) + b"not a database" * 100
    path.write_bytes(garbage)
    with pytest.warns(CacheWarning) as rec:
        s = Store.open(path)
        s.put(entry(1))
        assert s.get(*entry(1).key, refresh=True) == entry(1)
        s.put(entry(2))
    assert len(cache_warnings(rec)) == 1 and "corrupt" in str(rec[0].message)
    assert s.mode == "disk" and len(s.entries()) == 2
    aside = [p for p in path.parent.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    s.close()


def test_corruption_found_later_is_recovered(path):
    with Store.open(path) as s:
        for i in range(100):
            s.put(entry(i), [({"B": j, "pad": "y" * 100}, 1.0) for j in range(20)])
    data = bytearray(path.read_bytes())
    data[4096:] = os.urandom(len(data) - 4096)  # the header survives, the pages do not
    path.write_bytes(bytes(data))
    with pytest.warns(CacheWarning) as rec:
        s = Store.open(path)
        assert s.get(*entry(1).key) is None  # lost, but no exception
        s.put(entry(1))
        assert s.get(*entry(1).key, refresh=True) == entry(1)
    assert len(cache_warnings(rec)) == 1 and s.mode == "disk"
    assert len([p for p in path.parent.iterdir() if ".corrupt-" in p.name]) >= 1
    s.close()


def test_unusable_directory_falls_back_to_memory_with_one_warning(tmp_path):
    (tmp_path / "file").write_text("a file, not a directory")
    with pytest.warns(CacheWarning) as rec:
        s = Store.open(tmp_path / "file" / "sub" / "tuning.sqlite")
        for i in range(3):
            s.put(entry(i), [({"B": 1}, 1.0)])
    assert len(cache_warnings(rec)) == 1 and s.mode == "memory"
    assert [e for e in s.entries()] == [entry(i) for i in range(3)]
    assert s.claim(*entry().key) and s.stats()["trials"] == 3
    assert not (tmp_path / "file" / "sub").exists()


def test_a_database_that_stops_accepting_writes_degrades_to_memory(path, st):
    st.put(entry(0), [({"B": 0}, 1.0)])
    st._conn.execute("PRAGMA query_only=1")  # the file turns read-only under us
    with pytest.warns(CacheWarning) as rec:
        assert st.put(entry(1)) == entry(1)
        st.put(entry(2))
    assert len(cache_warnings(rec)) == 1 and st.mode == "memory"
    assert st.get(*entry(0).key, refresh=True) == entry(0)  # what was on disk was kept
    assert len(st.entries()) == 3 and len(st.trials()) == 1
    with Store.open(path) as fresh:
        assert [e.problem for e in fresh.entries()] == [entry(0).problem]


def test_disk_full_degrades_to_memory(path, st):
    st.put(entry(0))
    pages = st._conn.execute("PRAGMA page_count").fetchone()[0]
    st._conn.execute(f"PRAGMA max_page_count={pages + 1}")  # the disk is (nearly) full
    with pytest.warns(CacheWarning) as rec:
        st.put(entry(1), [({"B": j, "pad": "z" * 500}, 1.0) for j in range(200)])
    assert len(cache_warnings(rec)) == 1 and st.mode == "memory"
    assert st.get(*entry(1).key) == entry(1) and len(st.trials()) == 200
    assert st.get(*entry(0).key, refresh=True) == entry(0)


def test_readonly_mode_creates_nothing(tmp_path):
    d = tmp_path / "nowhere"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = Store.open(d / "tuning.sqlite", readonly=True)
        assert s.mode == "readonly" and s.get(*entry().key) is None
        s.put(entry())  # stays in this process
        assert s.get(*entry().key) == entry()
        s.close()
    assert not d.exists()


def test_readonly_setting_reads_an_existing_cache_without_writing(tmp_path):
    with settings.override(cache_dir=str(tmp_path / "c")):
        with Store.open() as s:
            s.put(entry(0), [({"B": 1}, 1.0)])
        before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
        with settings.override(readonly=True):
            with Store.open() as s:
                assert s.readonly and s.get(*entry(0).key) == entry(0) and len(s.trials()) == 1
                s.put(entry(1))
                assert s.claim(*entry(1).key)
                assert len(s.entries()) == 2
        after = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    assert after == before


def test_readonly_mode_with_a_corrupt_file_warns_and_moves_nothing(path):
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\0garbage" * 600)
    with pytest.warns(CacheWarning) as rec:
        s = Store.open(path, readonly=True)
    assert len(cache_warnings(rec)) == 1 and s.entries() == []
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_schema_version_bump_ignores_old_tables(path, monkeypatch):
    v = store_mod.SCHEMA_VERSION
    with Store.open(path) as s:
        s.put(entry(0), [({"B": 1}, 1.0)])
    OLD = store_mod.SCHEMA_VERSION
    NEW = OLD + 1
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", NEW)
    with Store.open(path) as s:
        assert s.get(*entry(0).key) is None and s.entries() == [] and s.trials() == []
        s.put(entry(1))
        assert s.stats()["schema"] == NEW and s.stats()["entries"] == 1
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", OLD)
    with Store.open(path) as s:  # the old tables were left alone (no migration, no loss)
        assert [e.problem for e in s.entries()] == [entry(0).problem]
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", NEW)
    with Store.open(path) as s:
        s.clear()  # clearing everything drops the old version's tables
        names = {r[0] for r in s._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert names == {f"entries_v{NEW}", f"trials_v{NEW}", f"claims_v{NEW}"}


def test_ctrl_c_during_a_write_rolls_back(st):
    st.put(entry(0))
    real = st._conn

    class InterruptedConn:  # Ctrl-C arrives after the entry row is written, while the trials are
        def execute(self, *args):
            return real.execute(*args)

        def executemany(self, *args):
            raise KeyboardInterrupt

    st._conn = InterruptedConn()
    with pytest.raises(KeyboardInterrupt):
        st.put(entry(1), [({"B": 1}, 1.0)])
    st._conn = real
    assert not real.in_transaction
    assert st.get(*entry(1).key, refresh=True) is None and st.trials() == []
    assert [e.problem for e in st.entries()] == [entry(0).problem]
    st.put(entry(2))  # the store is still usable
    assert len(st.entries()) == 2


def test_a_file_replaced_by_another_process_is_followed(path, st):
    st.put(entry(0))
    os.replace(path, path.with_name("moved-aside"))  # as another process does with a corrupt file
    with Store.open(path) as other:
        other.put(entry(1))
        with warnings.catch_warnings():
            warnings.simplefilter("error", CacheWarning)
            st.put(entry(2))  # written to the new file, not the moved one
        assert other.get(*entry(2).key) == entry(2)
    assert st.mode == "disk" and st.get(*entry(1).key) == entry(1)


def test_a_vanished_directory_is_recreated_with_one_warning(path, st):
    import shutil

    st.put(entry(0))
    shutil.rmtree(path.parent)
    with pytest.warns(CacheWarning) as rec:
        st.put(entry(1))
        st.put(entry(2))
    assert len(cache_warnings(rec)) == 1 and "vanished" in str(rec[0].message)
    assert st.mode == "disk" and path.exists()
    with Store.open(path) as other:
        assert [e.problem for e in other.entries()] == sorted([entry(1).problem, entry(2).problem])


def test_a_vanished_directory_that_cannot_be_recreated_gives_memory(path, st):
    import shutil

    st.put(entry(0))
    shutil.rmtree(path.parent)
    path.parent.write_text("now a file")
    with pytest.warns(CacheWarning) as rec:
        st.put(entry(1))
    assert len(cache_warnings(rec)) == 1 and st.mode == "memory"
    assert st.get(*entry(0).key, refresh=True) == entry(0)  # copied from the old connection
    assert st.get(*entry(1).key, refresh=True) == entry(1)


@pytest.mark.parametrize("hold_s, degrades", [(0.1, False), (3.0, True)])
def test_a_busy_database_is_retried_then_given_up(path, hold_s, degrades):
    import threading

    Store.open(path).close()
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # another process in a long write transaction
    threading.Timer(hold_s, lambda: blocker.execute("COMMIT")).start()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with Store.open(path, busy_timeout_s=0.2) as s:
            assert s.put(entry()) == entry() and s.get(*entry().key, refresh=True) == entry()
            assert s.mode == ("memory" if degrades else "disk")
    assert len(cache_warnings(rec)) == (1 if degrades else 0)
    time.sleep(max(0.0, hold_s - 0.2))
    blocker.close()


def test_entry_created_defaults_to_now_in_utc():
    import re

    e = Entry("fp", "gemm", "{}", "aten", 1.0, 1.0)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", e.created) and e.source == "tuned"


OPEN_CORRUPT = """
    import sys, time, warnings
    from torchtune_ops.storage.store import Entry, Store, problem_key
    path, me, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    while time.time() < start:
        pass
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        s = Store.open(path)
        for i in range(5):
            s.put(Entry("gpu-a", "gemm", problem_key({"M": i, "writer": me}), "aten", 1.0, 2.0, 0))
    print(s.mode, len(rec), flush=True)
    for w in rec:
        print("warning:", w.message, flush=True)
"""


def test_processes_opening_a_corrupt_file_at_once_move_it_aside_once(path):
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x01corrupt" * 1000)
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(OPEN_CORRUPT), str(path), str(me),
                               str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert all(o[0].split()[0] == "disk" for o in outs), [o[0] for o in outs]
    # one warning among them all (the messages say which cause it was when not)
    assert sum(int(o[0].split()[1]) for o in outs) == 1, [o[0] for o in outs]
    aside = [p for p in path.parent.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].read_bytes() == b"\x01corrupt" * 1000
    with Store.open(path) as s:
        assert len(s.entries()) == 20


def test_remembered_entries_are_served_but_never_written(path, st):
    shipped = [entry(i, ms=0.5, source="bundle") for i in range(3)]
    st.put(entry(0, ms=0.9))  # tuned here: takes precedence over the shipped one
    assert st.remember(shipped) == 3
    assert st.get(*entry(0).key) == entry(0, ms=0.9)
    assert st.get(*entry(1).key) == shipped[1] and st.get(*entry(2).key, refresh=True) == shipped[2]
    assert st.stats()["remembered"] == 3 and len(st.entries()) == 1
    with Store.open(path) as other:
        assert other.get(*entry(1).key) is None



def test_malformed_rows_are_ignored_with_one_warning(st):
    st.put(entry(0))
    st.put(entry(1))
    st._conn.execute(f"UPDATE entries_v{store_mod.SCHEMA_VERSION} SET winner='__import__(\"os\")' "
                     "WHERE problem=?", (entry(1).problem,))
    st._conn.execute(f"INSERT INTO entries_v{store_mod.SCHEMA_VERSION} VALUES "
                     "('gpu-a','gemm','{\"M\":99}','aten',-5.0,1.0,1,'x','tuned',0,0,0,0,'')")
    with pytest.warns(CacheWarning) as rec:
        assert st.get(*entry(1).key, refresh=True) is None
        assert [e.problem for e in st.entries()] == [entry(0).problem]
    assert len(cache_warnings(rec)) == 1 and "malformed" in str(rec[0].message)


def test_a_file_replaced_while_being_opened_is_not_taken_for_the_one_opened(path, monkeypatch):
    """Another process moves the corrupt file aside and puts a fresh one at the path right after we opened
    the corrupt one: we must open the fresh one, and never move it aside as if it were ours."""
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x01corrupt" * 1000)
    real_connect = Store._connect
    calls = []

    def connect_then_replaced(self, target, **kw):
        conn = real_connect(self, target, **kw)
        calls.append(target)
        if len(calls) == 1:  # the process beside us, between our open and our stat
            os.replace(path, path.with_name(path.name + ".corrupt-by-other"))
            real_connect(self, str(path)).execute("PRAGMA user_version=7").connection.close()
        return conn

    monkeypatch.setattr(Store, "_connect", connect_then_replaced)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # no warning: nothing of ours was corrupt
        s = Store.open(path)
        s.put(Entry("gpu-a", "gemm", problem_key({"M": 1}), "aten", 1.0, 2.0, 0))
    assert s.mode == "disk" and len(calls) >= 2
    assert [p.name for p in path.parent.iterdir() if ".corrupt-" in p.name] == [path.name + ".corrupt-by-other"]
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == 7  # the fresh file is still the one in use
    assert len(s.entries()) == 1
    s.close()


def test_an_immediate_busy_answer_while_opening_is_retried_not_a_memory_fallback(path, monkeypatch):
    real = Store._connect_disk
    fails = []

    def busy_twice(self):
        if len(fails) < 2:
            e = sqlite3.OperationalError("database is locked")
            e.sqlite_errorcode = 5  # SQLITE_BUSY, answered at once (as in races on a fresh file)
            fails.append(e)
            raise e
        return real(self)

    monkeypatch.setattr(Store, "_connect_disk", busy_twice)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        s = Store.open(path)
    assert s.mode == "disk" and len(fails) == 2
    s.close()
