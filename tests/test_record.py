"""Recording shapes (TORCHTUNE_OPS_RECORD): each unseen problem once, across threads and processes."""
from __future__ import annotations

import json
import multiprocessing as mp
import threading

import pytest

from torchtune_ops.storage import record
from torchtune_ops import settings
from torchtune_ops.errors import BundleError


def gemm(M, N, K, dtype="float16"):
    return {"op": "mm", "batch": 1, "M": M, "N": N, "K": K, "dtype": dtype, "a_layout": "row",
            "b_layout": "row", "bias": "none", "activation": "none", "precision": "ieee"}


# 1, primes, non-multiples of every block size, zero-size
PROBLEMS = [("gemm", gemm(M, N, K)) for M in (1, 7, 127, 0) for N in (1, 13, 257) for K in (3, 4096)]


def _worker(path: str, start: mp.Event, seed: int) -> None:
    import random

    rng = random.Random(seed)
    order = PROBLEMS * 3
    rng.shuffle(order)
    start.wait()
    r = record.ShapeRecorder(path)  # a fresh recorder per process, as after exec
    for fam, prob in order:
        r.record(fam, prob)


def test_four_processes_write_each_problem_exactly_once(tmp_path):
    path = str(tmp_path / "shapes.jsonl")
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_worker, args=(path, start, seed)) for seed in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    lines = open(path).read().splitlines()
    assert len(lines) == len(PROBLEMS) == len(set(lines))
    assert sorted(lines) == sorted(record.canonical_line(f, p).rstrip("\n") for f, p in PROBLEMS)
    assert record.read_shapes(path) == [(f, p) for f, p in (json.loads(l).values() for l in lines)]


def test_threads_share_one_recorder(tmp_path):
    path = tmp_path / "s.jsonl"
    r = record.ShapeRecorder(path)
    wrote = []

    def go():
        for f, p in PROBLEMS:
            wrote.append(r.record(f, p))

    ts = [threading.Thread(target=go) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sum(wrote) == len(PROBLEMS)
    assert len(path.read_text().splitlines()) == len(PROBLEMS)


def test_note_follows_the_setting_and_dedups_by_key(tmp_path):
    path = tmp_path / "sub" / "shapes.jsonl"
    record.note("gemm", gemm(1, 2, 3))  # RECORD unset: nothing happens
    assert not path.exists()
    with settings.override(record=str(path)):
        for _ in range(3):
            record.note("gemm", gemm(1, 2, 3), key=("k", 1))
        record.note("gemm", gemm(5, 2, 3))
    assert len(path.read_text().splitlines()) == 2


def test_existing_lines_and_a_torn_line_are_respected(tmp_path):
    path = tmp_path / "s.jsonl"
    # a hand-written (non-canonical) record and a line torn by a killed writer
    path.write_text(json.dumps({"problem": gemm(1, 1, 1), "family": "gemm"}, indent=None) + "\n"
                    + '{"family":"gemm","prob')
    r = record.ShapeRecorder(path)
    assert r.record("gemm", gemm(1, 1, 1)) is False
    assert r.record("gemm", gemm(2, 2, 2)) is True
    assert [p["M"] for _, p in record.read_shapes(path)] == [1, 2]


def test_unwritable_file_warns_once_and_keeps_running(tmp_path, caplog):
    target = tmp_path / "is_a_dir"
    target.mkdir()  # cannot be opened for writing, even by root
    with settings.override(record=str(target)):
        record.note("gemm", gemm(1, 2, 3))
        record.note("gemm", gemm(4, 5, 6))
    assert sum("cannot record" in r.message for r in caplog.records) == 1
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("junk", ['{bad json', '[' * 50000, '{"family":"gemm","prob'])
def test_read_shapes_skips_lines_that_are_not_json(tmp_path, junk):
    path = tmp_path / "s.jsonl"
    path.write_text(record.canonical_line("gemm", gemm(1, 1, 1)) + junk + "\n"
                    + record.canonical_line("gemm", gemm(2, 2, 2)))
    assert [p["M"] for _, p in record.read_shapes(path)] == [1, 2]


@pytest.mark.parametrize("line", [
    '{"family":"evil","problem":{}}',
    '{"family":"gemm","problem":{"M":"/etc/passwd"}}',
    '{"family":"gemm","problem":' + json.dumps(gemm(-1, 2, 3)) + '}',
    '{"family":"gemm","problem":' + json.dumps(gemm(2**40, 2, 3)) + '}',
    '{"family":"gemm","problem":' + json.dumps(gemm(1, 2, 3, dtype="float64")) + '}',
    '{"family":"gemm","problem":' + json.dumps(dict(gemm(1, 2, 3), code="__import__")) + '}',
    '{"family":"gemm","problem":' + json.dumps(gemm(1, 2, 3)) + ',"x":1}',
    '[1,2]',
])
def test_read_shapes_rejects_bad_lines(tmp_path, line):
    path = tmp_path / "s.jsonl"
    path.write_text(record.canonical_line("gemm", gemm(1, 1, 1)) + line + "\n"
                    + record.canonical_line("gemm", gemm(2, 2, 2)))
    with pytest.raises(BundleError, match=r"s\.jsonl:2"):
        record.read_shapes(path)
