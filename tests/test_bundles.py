"""Bundles: round trip, export -> import in another process, merge, device compatibility, hostile files,
read-only overlays. Entries are made directly (no tuning), so these tests are fast."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from torchtune_ops.storage import bundles as B
from torchtune_ops.storage.device import Fingerprint, fingerprint
from torchtune_ops.errors import BundleError
from torchtune_ops.kernels.base import CPU_INTERPRETER
from torchtune_ops.kernels.registry import families
from torchtune_ops.storage.store import Store, problem_key

#: the first problem column of a table row (after the device, winner, times, trials and budget)
P = len(B.ROW_HEAD) + len(B.BUDGET_HEAD)
GEMM = families()["gemm"]
CONV = families()["conv2d"]
H100 = Fingerprint(gpu="NVIDIA H100 80GB HBM3", capability=(9, 0), sm_count=132, torch="2.11.0+cu128",
                   triton="3.6.0", kernels="0123456789ab")

# odd and degenerate sizes: 1, primes, non-multiples of every block size, zero-size
GEMM_SHAPES = [(1, 1, 1), (7, 13, 31), (127, 257, 67), (4096, 11008, 4096), (0, 5, 3), (3, 0, 9)]


def gemm_problem(M, N, K, dtype="float16", **kw):
    from torchtune_ops.kernels.gemm_space import GemmProblem

    return GemmProblem("mm", 1, M, N, K, dtype, **kw)


def conv_problem(N=2, C=3, H=17, W=19, K=5, R=3, S=3, **kw):
    return CONV.problem_type(N=N, C=C, H=H, W=W, K=K, R=R, S=S, **kw)


def entry(fp_key, family, problem, *, winner=None, time_ms=0.05, aten_ms=0.1, trials=7, limits=CPU_INTERPRETER):
    """A fake BundleEntry: winner None picks the family's first known configuration (aten when none)."""
    d = family.problem_to_dict(problem)
    if winner is None:
        cfgs = family.known_configs(problem, limits)
        winner = cfgs[0].to_json() if cfgs else "aten"
    if winner == "aten":
        time_ms = aten_ms
    return B.BundleEntry(device=fp_key, family=family.name, problem_key=problem_key(d), problem=d,
                         winner=winner, time_ms=time_ms, aten_ms=aten_ms, trials=trials)


def local_entries():
    fp = fingerprint("cpu").key
    out = [entry(fp, GEMM, gemm_problem(M, N, K)) for M, N, K in GEMM_SHAPES]
    out += [entry(fp, GEMM, gemm_problem(33, 65, 17, dtype=dt, b_layout="col")) for dt in ("bfloat16", "float32")]
    out += [entry(fp, CONV, conv_problem()), entry(fp, CONV, conv_problem(N=1, C=8, H=7, W=7, K=8, R=1, S=1,
                                                                          groups=8))]
    out.append(entry(fp, GEMM, gemm_problem(5, 5, 5, activation="relu"), winner="aten"))
    return out


@pytest.fixture
def bundle_path(tmp_path):
    p = tmp_path / "local.json"
    B.write(B.Bundle.from_entries(local_entries()), p)
    return p


def as_key_map(entries):
    return {e.key: (e.winner, e.time_ms, e.aten_ms, e.trials) for e in entries}


def test_round_trip_keeps_every_entry(bundle_path):
    want = local_entries()
    got = B.validate(bundle_path).entries()
    assert as_key_map(got) == as_key_map(want)
    assert len(B.load(bundle_path)) == len(want)
    doc = json.loads(bundle_path.read_text())
    assert doc["format"] == B.FORMAT and doc["version"] == B.VERSION
    assert set(doc["families"]) == {"gemm", "conv2d"}


def test_problem_keys_match_the_store_and_lookup_by_problem(bundle_path):
    b = B.load(bundle_path)
    fp = fingerprint("cpu").key
    for M, N, K in GEMM_SHAPES:
        p = gemm_problem(M, N, K)
        e = b.find(fp, "gemm", p)
        assert e is not None and e.problem_key == problem_key(GEMM.problem_to_dict(p))
    assert b.find(fp, "gemm", gemm_problem(2, 2, 2)) is None
    assert b.find(H100.key, "gemm", gemm_problem(1, 1, 1)) is None


_CHILD = textwrap.dedent("""
    import json, sys
    from torchtune_ops.storage import bundles
    from torchtune_ops import settings
    from torchtune_ops.storage.device import fingerprint
    from torchtune_ops.storage.store import Store
    store = Store.open(sys.argv[2])
    res = bundles.import_bundle(bundles.load(sys.argv[1]), store, local=fingerprint("cpu"))
    out = {"written": res.written, "trials": len(store.trials()),
           "entries": [[e.fingerprint, e.family, e.problem, e.winner, e.time_ms, e.aten_ms, e.trials]
                       for e in store.entries()]}
    print(json.dumps(out))
""")


def test_export_then_import_in_another_process_gives_identical_choices(tmp_path):
    src = Store.open(tmp_path / "a" / "tuning.sqlite")
    for e in local_entries():
        src.put(e.to_store_entry(source="tuned"), trials=[("aten", 0.1)])
    out = tmp_path / "export.json"
    B.write(B.export_store(src), out)
    dst = tmp_path / "b" / "tuning.sqlite"
    r = subprocess.run([sys.executable, "-c", _CHILD, str(out), str(dst)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = [[e.fingerprint, e.family, e.problem, e.winner, e.time_ms, e.aten_ms, e.trials] for e in src.entries()]
    assert got["entries"] == want
    assert got["written"] == len(want)
    assert got["trials"] == 0  # nothing was tuned or measured there


def test_merge_keeps_the_faster_choice_and_devices_apart():
    fp = fingerprint("cpu").key
    p, q = gemm_problem(7, 13, 31), gemm_problem(127, 257, 67)
    slow = entry(fp, GEMM, p, time_ms=0.09, aten_ms=0.1)
    fast = entry(fp, GEMM, p, winner="aten", aten_ms=0.08)
    tie = entry(fp, GEMM, q, time_ms=0.05)
    tie2 = dataclasses.replace(tie, trials=99)
    other = entry(H100.key, GEMM, p, time_ms=0.001, aten_ms=0.002,
                  limits=B.DeviceRecord(H100).limits())
    m = B.merge([B.Bundle.from_entries([slow, tie]), B.Bundle.from_entries([fast, tie2, other])])
    got = {e.key: e for e in m.entries()}
    assert got[fast.key].winner == "aten" and got[fast.key].time_ms == 0.08  # faster wins
    assert got[tie.key].trials == 7  # tie: the earlier one stays
    assert got[other.key].device == H100.key and got[other.key].time_ms == 0.001  # not mixed with cpu
    assert len(got) == 3
    assert sorted(m.device_keys) == sorted([fp, H100.key])


def test_import_keeps_the_faster_of_cache_and_bundle(tmp_path):
    fp = fingerprint("cpu")
    p = gemm_problem(7, 13, 31)
    store = Store.open(tmp_path / "c" / "tuning.sqlite")
    store.put(entry(fp.key, GEMM, p, winner="aten", aten_ms=0.01).to_store_entry())
    res = B.import_bundle(B.Bundle.from_entries([entry(fp.key, GEMM, p, time_ms=0.05, aten_ms=0.1)]), store,
                          local=fp)
    assert (res.written, res.kept) == (0, 1)
    assert store.entries()[0].winner == "aten"


def test_foreign_device_refused_then_forced(tmp_path):
    store = Store.open(tmp_path / "c" / "tuning.sqlite")
    foreign = entry(H100.key, GEMM, gemm_problem(127, 257, 67), limits=B.DeviceRecord(H100).limits())
    b = B.Bundle.from_entries([foreign])
    with pytest.raises(BundleError, match="another device") as ei:
        B.import_bundle(b, store, local=fingerprint("cpu"))
    assert "H100" in str(ei.value) and "--force" in str(ei.value)
    assert store.entries() == []
    res = B.import_bundle(b, store, local=fingerprint("cpu"), allow_incompatible=True)
    assert res.forced_devices == [H100.key] and [e.fingerprint for e in store.entries()] == [H100.key]


def test_compatible_device_is_rekeyed_to_this_one(tmp_path):
    local = fingerprint("cpu")
    patch = dataclasses.replace(local, torch=local.torch.split("+")[0] + ".post9",
                                triton=local.triton + "1")
    # same major.minor versions: compatible; other patch versions
    assert B.incompatibility(patch, local) is None
    store = Store.open(tmp_path / "c" / "tuning.sqlite")
    e = entry(patch.key, GEMM, gemm_problem(7, 13, 31))
    res = B.import_bundle(B.Bundle.from_entries([e]), store, local=local)
    assert res.rekeyed == 1
    assert [x.fingerprint for x in store.entries()] == [local.key]
    other_minor = dataclasses.replace(local, torch="1.0.0")
    assert B.incompatibility(other_minor, local) is not None


def test_overlay_serves_compatible_devices_only(bundle_path, tmp_path):
    local = fingerprint("cpu")
    ov = B.Overlay([bundle_path])
    p = gemm_problem(127, 257, 67)
    e = ov.get(local.key, "gemm", p)
    assert e is not None and e.fingerprint == local.key and e.source == "bundle"
    assert e.problem == problem_key(GEMM.problem_to_dict(p))
    patch = dataclasses.replace(local, torch=local.torch + "1")
    assert ov.get(patch.key, "gemm", p) is not None  # re-keyed for a compatible device
    assert ov.get(H100.key, "gemm", p) is None
    assert ov.get(local.key, "gemm", gemm_problem(2, 3, 4)) is None
    missing = B.Overlay([tmp_path / "nope.json", bundle_path])
    assert missing.errors and missing.get(local.key, "gemm", p) is not None


def test_overlay_drops_an_invalid_entry_and_keeps_the_rest(tmp_path):
    fp = fingerprint("cpu").key
    good, bad = gemm_problem(127, 257, 67), gemm_problem(1, 1, 1)
    doc = B.Bundle.from_entries([entry(fp, GEMM, good), entry(fp, GEMM, bad)]).to_dict()
    rows = doc["families"]["gemm"]["rows"]
    i = next(i for i, r in enumerate(rows) if r[P + 2] == 1)
    doc["families"]["gemm"]["configs"].append(dict(doc["families"]["gemm"]["configs"][0], BLOCK_M=256))
    rows[i][1] = len(doc["families"]["gemm"]["configs"]) - 1  # BLOCK_M 256 for M = 1: not a choice
    p = tmp_path / "b.json"
    p.write_text(json.dumps(doc))
    ov = B.Overlay([p])
    assert ov.get(fp, "gemm", bad) is None
    assert ov.get(fp, "gemm", good) is not None
    with pytest.raises(BundleError, match=r"rows\[\d+\].*BLOCK_M"):
        B.validate(p)


# ------------------------------------------------------------------------------------ hostile bundles
def _base_doc():
    return B.Bundle.from_entries(local_entries()).to_dict()


def _gemm(doc):
    return doc["families"]["gemm"]


def _mut(fn):
    def apply(doc):
        fn(doc)
        return json.dumps(doc)
    return apply


HOSTILE = {
    "not json": lambda d: "{not json",
    "truncated": lambda d: json.dumps(d)[:-40],
    "array at top": lambda d: "[1, 2, 3]",
    "nan": lambda d: json.dumps(d).replace('"time_ms", ', '"time_ms", ').replace("0.05,", "NaN,", 1),
    "infinite float": lambda d: json.dumps(d).replace("0.05,", "1e999,", 1),
    "deep nesting": lambda d: "[" * 100000 + "]" * 100000,
    "wrong format": _mut(lambda d: d.update(format="pickle")),
    "newer version": _mut(lambda d: d.update(version=B.VERSION + 1)),
    "version as string": _mut(lambda d: d.update(version="1")),
    "unknown top field": _mut(lambda d: d.update(exec="import os")),
    "unknown family": _mut(lambda d: d["families"].update(evil=_gemm(d))),
    "unknown problem column": _mut(lambda d: _gemm(d)["columns"].__setitem__(6, "__class__")),
    "missing problem column": _mut(lambda d: (_gemm(d)["columns"].remove("M"),
                                              [r.pop(7) for r in _gemm(d)["rows"]])),
    "unknown config parameter": _mut(lambda d: _gemm(d)["configs"][0].update(EVIL=1)),
    "config value not a choice": _mut(lambda d: _gemm(d)["configs"][0].update(BLOCK_M=48)),
    "config bool for int": _mut(lambda d: _gemm(d)["configs"][0].update(GROUP_M=True)),
    "config value as code": _mut(lambda d: _gemm(d)["configs"][0].update(num_warps="__import__('os')")),
    "config nested junk": _mut(lambda d: _gemm(d)["configs"][0].update(num_warps={"a": [1, {"b": 2}]})),
    "config huge int": _mut(lambda d: _gemm(d)["configs"][0].update(BLOCK_K=10**400)),
    "config fails check": _mut(lambda d: _gemm(d)["configs"][0].update(num_warps=8, BLOCK_M=16, BLOCK_N=16)),
    "negative time": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(2, -1.0)),
    "zero time": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(3, 0)),
    "absurd time": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(3, 1e300)),
    "kernel slower than aten": _mut(lambda d: [r.__setitem__(2, r[3] * 2) for r in _gemm(d)["rows"]
                                               if r[1] >= 0]),
    "time as string": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(2, "0.1")),
    "winner out of range": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(1, 10**6)),
    "winner name": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(1, "os.system")),
    "device out of range": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(0, 5)),
    "trials negative": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(4, -3)),
    "huge dimension": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(P + 2, 2**31)),
    "huge integer": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(P + 2, 10**400)),
    "negative dimension": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(P + 3, -1)),
    "float dimension": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(P + 3, 1.5)),
    "path in problem": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(P + 0, "../../etc/passwd")),
    "unknown dtype": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(P + 5, "float64")),
    "unknown op": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(P + 0, "system")),
    "nested junk in row": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(P + 4, [[1, [2, [3]]]])),
    "dict in row": _mut(lambda d: _gemm(d)["rows"][0].__setitem__(P + 4, {"a": 1})),
    "short row": _mut(lambda d: _gemm(d)["rows"][0].pop()),
    "row not a list": _mut(lambda d: _gemm(d)["rows"].__setitem__(0, "row")),
    "path as gpu name": _mut(lambda d: d["devices"][0].update(gpu="/dev/nvidia0")),
    "code as torch version": _mut(lambda d: d["devices"][0].update(torch="__import__('os').system('x')")),
    "dotdot version": _mut(lambda d: d["devices"][0].update(triton="..")),
    "unknown device field": _mut(lambda d: d["devices"][0].update(path="/tmp/x")),
    "capability junk": _mut(lambda d: d["devices"][0].update(capability=[9, 0, 1])),
    "duplicate device": _mut(lambda d: d["devices"].append(dict(d["devices"][0]))),
    "conv long sequence": _mut(lambda d: d["families"]["conv2d"]["rows"][0].__setitem__(12, list(range(50)))),
    "conv wrong padding arity": _mut(lambda d: d["families"]["conv2d"]["rows"][0].__setitem__(13, [1])),
    "created as path": _mut(lambda d: d.update(created="/etc/passwd")),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_bundle_rejected_and_cache_untouched(name, tmp_path):
    fp = fingerprint("cpu")
    store_path = tmp_path / "c" / "tuning.sqlite"
    store = Store.open(store_path)
    keep = entry(fp.key, GEMM, gemm_problem(2, 2, 2), winner="aten", aten_ms=0.3).to_store_entry()
    store.put(keep)
    before = [dataclasses.astuple(e) for e in store.entries()]
    p = tmp_path / "hostile.json"
    p.write_text(HOSTILE[name](_base_doc()))
    with pytest.raises(BundleError) as ei:
        b = B.load(p)
        B.import_bundle(b, store, local=fp)
    msg = str(ei.value)
    assert str(p) in msg and len(msg) < 2000
    assert [dataclasses.astuple(e) for e in Store.open(store_path).entries()] == before


def test_hostile_messages_name_entry_and_field(tmp_path):
    doc = _base_doc()
    _gemm(doc)["rows"][3][P + 2] = -5
    p = tmp_path / "x.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"families\.gemm\.rows\[3\]: M = '-5'"):
        B.load(p)


def test_bundle_strings_are_never_used_as_paths():
    # every string shape a bundle accepts is checked against a whitelist without '/', '\\' or '..'
    for pattern in (B._IDENT, B._NAME, B._VERSION):
        for s in ("../x", "a/b", "a\\b", "~root", "$(id)", "a;b", "`id`", "x|y"):
            assert not pattern.match(s) or ".." in s


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    p = tmp_path / "b.json"
    B.write(B.Bundle.from_entries(local_entries()), p)
    B.write(B.Bundle.from_entries(local_entries()[:2]), p)
    assert os.listdir(tmp_path) == ["b.json"]
    assert len(B.load(p)) == 2


def test_empty_bundle_round_trips(tmp_path):
    p = tmp_path / "e.json"
    B.write(B.Bundle.from_entries([]), p)
    assert len(B.validate(p)) == 0


def test_shipped_bundle_paths_are_json_files():
    for p in B.shipped_bundle_paths():
        assert p.suffix == ".json" and p.is_file()


# ------------------------------------------------------------------- deployment through the dispatcher
def test_deployment_bundle_readonly_and_record_through_the_ops(tmp_path):
    import torch

    import torchtune_ops.runtime.ops  # noqa: F401  (registers the ops)
    from torchtune_ops.runtime import dispatch
    from torchtune_ops import settings
    from torchtune_ops.kernels.gemm import gemm_problem as problem_of

    a, b = torch.randn(9, 10), torch.randn(10, 11)
    shipped = problem_of(a, b, op="mm")
    bundle = tmp_path / "deploy.json"
    B.write(B.Bundle.from_entries([entry(fingerprint("cpu").key, GEMM, shipped)]), bundle)
    cache = tmp_path / "ro-cache"
    stored = problem_of(torch.randn(4, 6), torch.randn(6, 3), op="mm")  # in the (read-only) cache
    st = Store.open(cache / "tuning.sqlite")
    st.put(entry(fingerprint("cpu").key, GEMM, stored, winner="aten", aten_ms=0.01).to_store_entry())
    st.close()
    before = {f: (os.stat(cache / f).st_size, os.stat(cache / f).st_mtime_ns) for f in os.listdir(cache)}
    os.chmod(cache, 0o500)
    shapes = tmp_path / "shapes.jsonl"
    dispatch.reset()
    try:
        with settings.override(readonly=True, autotune=True, bundles=str(bundle), cache_dir=str(cache),
                               record=str(shapes)):
            torch.testing.assert_close(torch.ops.torchtune_ops.mm(a, b), torch.mm(a, b), rtol=1e-4, atol=1e-4)
            x, y = torch.randn(4, 6), torch.randn(6, 3)
            torch.testing.assert_close(torch.ops.torchtune_ops.mm(x, y), torch.mm(x, y))
            c, d = torch.randn(7, 13), torch.randn(13, 5)  # unseen: PyTorch's kernel, recorded, not tuned
            for _ in range(3):
                torch.testing.assert_close(torch.ops.torchtune_ops.mm(c, d), torch.mm(c, d))
            probs = {p["shape"]: p for p in dispatch.stats()["problems"]}
        assert probs["[9,10] x [10,11]"]["source"] == "bundle"
        assert probs["[9,10] x [10,11]"]["kernel"] != "aten"
        assert probs["[7,13] x [13,5]"]["source"] == "untuned"
        assert probs["[4,6] x [6,3]"]["source"] == "store"
        after = {f: (os.stat(cache / f).st_size, os.stat(cache / f).st_mtime_ns) for f in os.listdir(cache)}
        assert after == before  # read-only: nothing written, nothing tuned
        from torchtune_ops.storage import record

        recorded = record.read_shapes(shapes)
        assert [(f, p["M"], p["N"], p["K"]) for f, p in recorded] == [("gemm", 7, 5, 13)]
    finally:
        os.chmod(cache, 0o700)
        dispatch.reset()


@pytest.mark.parametrize("fp", [H100, fingerprint("cpu"), dataclasses.replace(H100, gpu="A|B weird name")])
def test_fingerprint_keys_parse_back(fp):
    assert B.parse_fingerprint_key(fp.key) == fp


@pytest.mark.parametrize("key", ["", "H100", "a|cc9|sm1|torch2|triton3|k1", "x|ccA.B|sm1|torch2|triton3|k1"])
def test_bad_fingerprint_keys_are_refused(key):
    with pytest.raises(BundleError, match="not a device fingerprint key"):
        B.parse_fingerprint_key(key)


@pytest.mark.parametrize("name", ["not json", "path as gpu name", "unknown family", "huge dimension"])
def test_overlay_skips_a_hostile_bundle_with_a_warning(name, tmp_path, bundle_path, caplog):
    p = tmp_path / "hostile.json"
    p.write_text(HOSTILE[name](_base_doc()))
    ov = B.Overlay([p, bundle_path])
    assert len(ov.errors) == 1 and str(p) in ov.errors[0]
    assert sum(str(p) in r.message for r in caplog.records) == 1
    e = ov.get(fingerprint("cpu").key, "gemm", gemm_problem(127, 257, 67))
    assert e is not None  # the good bundle still serves


def test_times_are_stored_with_six_significant_digits(tmp_path):
    fp = fingerprint("cpu").key
    e = entry(fp, GEMM, gemm_problem(7, 13, 31), time_ms=0.012345678912, aten_ms=0.012345699999)
    p = tmp_path / "t.json"
    B.write(B.Bundle.from_entries([e]), p)
    (got,) = B.validate(p).entries()
    assert (got.time_ms, got.aten_ms) == (0.0123457, 0.0123457)  # still not slower than aten
    assert got.winner == e.winner


def test_configs_written_before_the_descriptor_variants_still_validate():
    """A GEMM winner stored before WARP_SPEC/PERSISTENT existed (issue 18) is the same config with 0s."""
    from torchtune_ops.storage.bundles import check_config
    from torchtune_ops.kernels.base import DeviceLimits
    from torchtune_ops.kernels.gemm import GemmProblem

    h100 = DeviceLimits(name="fake-H100", smem_per_block=232448, num_sms=132, capability=(9, 0))
    p = GemmProblem("mm", 1, 4096, 4096, 4096, "float16")
    old = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, SPLIT_K=1, TMA=1)
    text = check_config("gemm", old, p, h100, "test")
    new_axes = dict(HOST_DESC=0, TMA_STORE=0, EPI_SUBTILE=0)
    assert json.loads(text) == dict(old, WARP_SPEC=0, PERSISTENT=0, **new_axes)
    # ... and one stored with WARP_SPEC/PERSISTENT but before HOST_DESC/TMA_STORE/EPI_SUBTILE
    mid = dict(old, num_warps=4, WARP_SPEC=1, PERSISTENT=0)
    assert json.loads(check_config("gemm", mid, p, h100, "test")) == dict(mid, **new_axes)
    with pytest.raises(BundleError):
        check_config("gemm", dict(old, WARP_SPEC=1, num_warps=8), p, h100, "test")  # WS needs 4 warps
