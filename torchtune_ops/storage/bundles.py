"""Bundles: portable, versioned, data-only JSON files of tuned choices (format: docs/deployment.md).

A bundle carries the devices it was tuned on and, per kernel family, a table of entries: one row per
(device, problem) with the winner (aten or one of the bundle's configurations), its time, aten's time and
the number of trials. It is how tuned choices travel: ``torchtune-ops cache export`` writes one,
``cache import`` reads one into the cache, ``cache merge`` combines several, and ``TORCHTUNE_OPS_BUNDLES``
and the shipped bundles in ``cache/`` overlay the cache read-only (``Overlay``).

A bundle may come from an untrusted source, so it is treated as hostile data: plain ``json`` (no pickle,
nothing evaluated), a strict schema (unknown fields are errors), whitelisted string shapes (no string that
could be a path or code passes; no string from a bundle is ever executed or used as a path), finite numbers
in sane ranges, known families and problem fields, problems parsed by the family's own
``problem_from_dict``, and configurations whose every parameter and value belongs to the family's space for
that problem and that pass the family's ``check`` for the device's limits. So a bundle can only choose among
our own kernels and valid configurations. Every error is a ``BundleError`` naming the entry and field.

Validation has two stages so that start-up stays fast (10,000 entries in well under 50 ms):

1. on load, every field of every row is checked column by column (types, ranges, string shapes, indices)
   and the rows are indexed by (device, problem);
2. the per-problem checks (the family's problem parser, its space and ``check``) run when an entry is
   first used, once per entry and process; an entry that fails is dropped with one warning and the op
   runs PyTorch's kernel. ``entries()`` (used by import, merge and ``validate``) runs stage 2 on every
   entry and raises on the first failure, before anything is written.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import json
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import BundleError

log = logging.getLogger("torchtune_ops")

FORMAT = "torchtune_ops.bundle"
VERSION = 2  # 2: rows carry the budget each entry was tuned with (version 1 bundles still load)
#: the largest bundle file accepted (a 10,000-entry bundle is about 1.3 MB)
MAX_BUNDLE_BYTES = 256 << 20
#: sane ranges
MAX_TIME_MS = 1e6
MAX_TRIALS = 10**7
MAX_DIM = 2**31
MAX_SEQUENCE = 8  # longest tuple field of a problem (conv padding has 4)
MAX_CONFIGS = 100_000
MAX_CONFIG_INT = 1 << 20
DTYPES = frozenset({"float16", "bfloat16", "float32"})
#: the fixed leading columns of every family table; the problem's fields follow
ROW_HEAD = ("device", "winner", "time_ms", "aten_ms", "trials")
#: the budget columns that follow ROW_HEAD from format version 2 on (absent: the budget is unknown, 0)
BUDGET_HEAD = ("max_trials", "time_budget_s")
MAX_BUDGET_S = 1e7

# Whitelisted string shapes. Nothing with '/', '\\', '~', quotes, parentheses, ';', '$', '|' or '..' passes,
# so no bundle string can name a path or carry code.
_IDENT = re.compile(r"[A-Za-z0-9_]{1,40}\Z")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+\-]{0,99}\Z")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+\-]{0,63}\Z")
_DATE = re.compile(r"\d{4}-\d\d-\d\d([T ]\d\d:\d\d(:\d\d(\.\d{1,6})?)?)?(Z|[+-]\d\d:?\d\d)?\Z")

_TOP_FIELDS = {"format", "version", "created", "producer", "devices", "families"}
_TOP_REQUIRED = {"format", "version", "devices", "families"}
_DEVICE_FIELDS = {"gpu", "capability", "sm_count", "torch", "triton", "kernels", "smem_per_block"}
_TABLE_FIELDS = {"columns", "configs", "rows"}

# Shared memory per block (opt-in cap, bytes) by compute capability, for checking configurations; a bundle
# device may state its own ``smem_per_block``, which is capped by this table where the table knows the GPU.
_SMEM_BY_CAPABILITY = {(7, 0): 98304, (7, 2): 98304, (7, 5): 65536, (8, 0): 166912, (8, 6): 101376,
                       (8, 7): 166912, (8, 9): 101376, (9, 0): 232448, (10, 0): 232448, (12, 0): 101376}
_SMEM_UNKNOWN = 232448


# --------------------------------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class DeviceRecord:
    """A device as a bundle stores it: its fingerprint (``device.Fingerprint``) and, optionally, its shared
    memory per block (default: known per compute capability)."""

    fingerprint: Any  # device.Fingerprint
    smem_per_block: int | None = None

    @property
    def key(self) -> str:
        return self.fingerprint.key

    def to_dict(self) -> dict[str, Any]:
        d = self.fingerprint.to_dict()
        if self.smem_per_block is not None:
            d["smem_per_block"] = self.smem_per_block
        return d

    def limits(self):
        """The ``DeviceLimits`` that configuration checks use for this device."""
        from ..kernels.base import CPU_INTERPRETER, DeviceLimits

        fp = self.fingerprint
        if fp.interpreter:
            return CPU_INTERPRETER
        known = _SMEM_BY_CAPABILITY.get(fp.capability)
        smem = self.smem_per_block or known or _SMEM_UNKNOWN
        if known:
            smem = min(smem, known)
        return DeviceLimits(name=fp.gpu, smem_per_block=smem, num_sms=max(fp.sm_count, 1),
                            capability=fp.capability)


def parse_fingerprint_key(key: str):
    """The ``device.Fingerprint`` whose ``key`` is ``key`` (the store keys entries by it).

    Raises:
        BundleError: ``key`` is not a fingerprint key.
    """
    from .device import Fingerprint

    parts = key.rsplit("|", 5)
    try:
        gpu, cc, sm, torch_v, triton_v, kern = parts
        if not (cc.startswith("cc") and sm.startswith("sm") and torch_v.startswith("torch")
                and triton_v.startswith("triton") and kern.startswith("k")):
            raise ValueError(key)
        major, minor = cc[2:].split(".")
        fp = Fingerprint(gpu=gpu, capability=(int(major), int(minor)), sm_count=int(sm[2:]),
                         torch=torch_v[5:], triton=triton_v[6:], kernels=kern[1:])
    except ValueError:
        raise BundleError(f"{key[:120]!r} is not a device fingerprint key") from None
    if fp.key != key:
        raise BundleError(f"{key[:120]!r} is not a device fingerprint key")
    return fp


def incompatibility(a: Any, b: Any) -> str | None:
    """None when choices tuned on fingerprint ``a`` may be used on ``b``, else why not: they must share
    the GPU name, compute capability, multiprocessor count and kernel sources, and the torch and Triton
    major.minor versions (``device.compatible``; patch versions and local tags may differ)."""
    from .device import incompatibility as why

    return why(a, b)


def device_record(fp: Any) -> DeviceRecord:
    """The bundle record of fingerprint ``fp``, with this machine's shared memory when ``fp`` is the
    current CUDA device's fingerprint."""
    smem = None
    if not fp.interpreter:
        try:
            import torch

            from .device import fingerprint

            if torch.cuda.is_available() and fingerprint("cuda") == fp:
                from ..kernels.base import device_limits

                smem = device_limits("cuda").smem_per_block
        except Exception:  # describing a device must never fail an export
            smem = None
    return DeviceRecord(fp, smem)


@dataclasses.dataclass(frozen=True)
class BundleEntry:
    """One fully validated tuned choice. ``winner`` is ``"aten"`` or a configuration's canonical JSON;
    ``problem_key`` is the store's key of ``problem`` (``store.problem_key``)."""

    device: str  # fingerprint key
    family: str
    problem_key: str
    problem: Mapping[str, Any]
    winner: str
    time_ms: float
    aten_ms: float
    trials: int = 0
    max_trials: int = 0
    time_budget_s: float = 0.0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.device, self.family, self.problem_key)

    def to_store_entry(self, *, fingerprint: str | None = None, created: str = "", source: str = "bundle"):
        """This entry as a ``store.Entry`` (under ``fingerprint`` when given: re-keyed to a compatible
        device)."""
        from .store import Entry

        return Entry(fingerprint=fingerprint or self.device, family=self.family, problem=self.problem_key,
                     winner=self.winner, time_ms=self.time_ms, aten_ms=self.aten_ms, trials=self.trials,
                     created=created, source=source, max_trials=self.max_trials,
                     time_budget_s=self.time_budget_s)


def from_store_entry(entry: Any) -> BundleEntry:
    """A ``store.Entry`` as a BundleEntry (not validated: use ``Bundle.from_entries(...).entries()``)."""
    problem = json.loads(entry.problem)
    return BundleEntry(device=entry.fingerprint, family=entry.family, problem_key=entry.problem,
                       problem=problem, winner=entry.winner, time_ms=float(entry.time_ms),
                       aten_ms=float(entry.aten_ms), trials=int(entry.trials),
                       max_trials=int(getattr(entry, "max_trials", 0)),
                       time_budget_s=float(getattr(entry, "time_budget_s", 0.0)))


def round_ms(ms: float) -> float:
    """A time as bundles store it: 6 significant digits (far below timing noise; 17-digit floats would
    make a bundle larger and slower to parse). Monotonic, so a kernel faster than aten stays so."""
    return float(f"{ms:.6g}")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _producer() -> str:
    from .._version import __version__

    return f"torchtune_ops-{__version__}"


def _problem_key(problem: Mapping[str, Any]) -> str:
    from .store import problem_key

    return problem_key(problem)


# ------------------------------------------------------------------------------------ field validation
def reject_constant(name: str) -> Any:
    """``json.loads`` hook: NaN and Infinity are not valid bundle data."""
    raise ValueError(f"non-finite number {name} is not allowed")


def _str(value: Any, pattern: re.Pattern, where: str, what: str) -> str:
    if type(value) is not str:
        raise BundleError(f"{where}: {what} must be a string, got {type(value).__name__}")
    if not pattern.match(value) or ".." in value:
        raise BundleError(f"{where}: {what} {value[:60]!r} is not an allowed value (letters, digits and "
                          f"a few punctuation marks only; no paths or code)")
    return value


def _int(value: Any, lo: int, hi: int, where: str, what: str) -> int:
    if type(value) is not int:
        raise BundleError(f"{where}: {what} must be an integer, got {type(value).__name__}")
    if not lo <= value < hi:
        raise BundleError(f"{where}: {what} = {str(value)[:40]} is out of range [{lo}, {hi})")
    return value


def _fields(obj: Any, allowed: set[str], required: set[str], where: str) -> dict:
    if type(obj) is not dict:
        raise BundleError(f"{where}: must be an object, got {type(obj).__name__}")
    keys = obj.keys()
    if not keys <= allowed:
        bad = sorted(str(k)[:40] for k in keys - allowed)
        raise BundleError(f"{where}: unknown field(s) {bad}; allowed: {sorted(allowed)}")
    if not required <= keys:
        raise BundleError(f"{where}: missing field(s) {sorted(required - keys)}")
    return obj


def check_family(value: Any, where: str) -> str:
    """``value`` as a known kernel family name, else BundleError."""
    from ..kernels.registry import families

    fams = families()
    if type(value) is not str or value not in fams:
        shown = value[:40] if isinstance(value, str) else type(value).__name__
        raise BundleError(f"{where}: family {shown!r} is not a known kernel family ({sorted(fams)})")
    return value


def _problem_value(v: Any, where: str, name: str) -> Any:
    t = type(v)
    if t is bool or v is None:
        return v
    if t is int:
        return _int(v, 0, MAX_DIM, where, f"problem.{name}")
    if t is str:
        return _str(v, _IDENT, where, f"problem.{name}")
    if t is list or t is tuple:
        if len(v) > MAX_SEQUENCE:
            raise BundleError(f"{where}: problem.{name} has {len(v)} items (at most {MAX_SEQUENCE})")
        for x in v:
            _int(x, 0, MAX_DIM, where, f"problem.{name}[]")
        return v
    raise BundleError(f"{where}: problem.{name} has type {t.__name__}; expected an integer, string, boolean "
                      f"or a short list of integers")


def check_problem(family: str, value: Any, where: str) -> tuple[dict[str, Any], Any]:
    """Validate a problem dict of ``family``: sane values, parsed by the family's ``problem_from_dict``.

    Returns:
        ``(problem_dict, problem)``: the canonical dict (the family's ``problem_to_dict`` of the parsed
        problem) and the family's problem object.

    Raises:
        BundleError: naming ``where`` and the field.
    """
    from ..kernels.registry import families

    if type(value) is not dict:
        raise BundleError(f"{where}: problem must be an object, got {type(value).__name__}")
    if len(value) > 64:
        raise BundleError(f"{where}: problem has {len(value)} fields")
    for name, v in value.items():
        if type(name) is not str or not _IDENT.match(name):
            raise BundleError(f"{where}: problem field name {str(name)[:40]!r} is not allowed")
        _problem_value(v, where, name)
    fam = families()[family]
    try:
        problem = fam.problem_from_dict(value)
    except (TypeError, ValueError, KeyError) as e:
        raise BundleError(f"{where}: problem is not a valid {family} problem ({str(e)[:200]})") from None
    dtype = getattr(problem, "dtype", None)
    if dtype is not None and dtype not in DTYPES:
        raise BundleError(f"{where}: problem.dtype {str(dtype)[:40]!r} is not one of {sorted(DTYPES)}")
    return _to_dict(fam, problem), problem


_field_names: dict[type, tuple[str, ...]] = {}


def _to_dict(fam: Any, problem: Any) -> dict[str, Any]:
    """``fam.problem_to_dict(problem)``, without ``dataclasses.asdict``'s deep copy when the family keeps
    the default (problem fields are immutable scalars and tuples, so a shallow dict is the same dict)."""
    from ..kernels.base import KernelFamily

    if type(fam).problem_to_dict is not KernelFamily.problem_to_dict or not dataclasses.is_dataclass(problem):
        return fam.problem_to_dict(problem)
    names = _field_names.get(type(problem))
    if names is None:
        names = _field_names[type(problem)] = tuple(f.name for f in dataclasses.fields(problem))
    return {n: getattr(problem, n) for n in names}


# Per family and space: the parameter names and the allowed (parameter, type, value) triples, so that a
# configuration is checked with set lookups. Keyed by the space's contents (spaces depend on the problem).
_allowed_cache: dict[tuple, tuple[frozenset, frozenset]] = {}


def _allowed(family: str, space: Mapping[str, Iterable]) -> tuple[frozenset, frozenset]:
    sig = (family, tuple((k, tuple(v)) for k, v in space.items()))
    hit = _allowed_cache.get(sig)
    if hit is None:
        triples = frozenset((k, type(c), c) for k, vs in space.items() for c in vs)
        hit = (frozenset(space), triples)
        if len(_allowed_cache) < 4096:
            _allowed_cache[sig] = hit
    return hit


def check_config(family: str, value: Any, problem: Any, limits: Any, where: str) -> str:
    """Validate a configuration of ``family`` for ``problem`` on a device with ``limits``.

    Every parameter must belong to the family's space for the problem, every value must be one of its
    choices (same type) and the family's ``check`` must accept it.

    Returns:
        The configuration's canonical JSON.

    Raises:
        BundleError: naming ``where`` and the parameter.
    """
    from ..kernels.base import Config
    from ..kernels.registry import families

    if type(value) is not dict:
        raise BundleError(f"{where}: a configuration must be an object, got {type(value).__name__}")
    fam = families()[family]
    names, triples = _allowed(family, fam.space(problem))
    if fam.optional_params:  # parameters added after bundles were written: their absence means the default
        value = {**{k: d for k, d in fam.optional_params.items() if k in names}, **value}
    for k, v in value.items():
        if k not in names:
            raise BundleError(f"{where}: parameter {str(k)[:40]!r} is not a parameter of {family} "
                              f"({sorted(names)})")
        if type(v) not in (int, str, bool) or (k, type(v), v) not in triples:
            raise BundleError(f"{where}: {k} = {str(v)[:40]!r} is not one of its choices for this problem")
    if value.keys() != names:
        raise BundleError(f"{where}: configuration lacks parameter(s) {sorted(names - value.keys())}")
    why = fam.check(value, problem, limits)
    if why is not None:
        raise BundleError(f"{where}: not a valid {family} configuration for this problem and device ({why})")
    return Config.from_dict(value).to_json()


def _device(i: int, obj: Any) -> DeviceRecord:
    from .device import Fingerprint

    where = f"devices[{i}]"
    d = _fields(obj, _DEVICE_FIELDS, _DEVICE_FIELDS - {"smem_per_block"}, where)
    cap = d["capability"]
    if type(cap) is not list or len(cap) != 2:
        raise BundleError(f"{where}: capability must be [major, minor]")
    fp = Fingerprint(
        gpu=_str(d["gpu"], _NAME, where, "gpu"),
        capability=(_int(cap[0], 0, 100, where, "capability[0]"), _int(cap[1], 0, 100, where, "capability[1]")),
        sm_count=_int(d["sm_count"], 0, 100_000, where, "sm_count"),
        torch=_str(d["torch"], _VERSION, where, "torch"),
        triton=_str(d["triton"], _VERSION, where, "triton"),
        kernels=_str(d["kernels"], _VERSION, where, "kernels"),
    )
    smem = d.get("smem_per_block")
    if smem is not None:
        _int(smem, 1024, 1 << 22, where, "smem_per_block")
    return DeviceRecord(fp, smem)


def _config_shape(c: Any, where: str) -> None:
    """Stage 1 of a configuration: an object of short identifiers to small ints, bools or identifiers."""
    if type(c) is not dict:
        raise BundleError(f"{where}: a configuration must be an object, got {type(c).__name__}")
    if len(c) > 64:
        raise BundleError(f"{where}: a configuration has {len(c)} parameters")
    for k, v in c.items():
        if not _IDENT.match(k):
            raise BundleError(f"{where}: parameter name {k[:40]!r} is not allowed")
        t = type(v)
        if t is int:
            _int(v, -MAX_CONFIG_INT, MAX_CONFIG_INT, where, k)
        elif t is str:
            _str(v, _IDENT, where, k)
        elif t is not bool:
            raise BundleError(f"{where}: {k} has type {t.__name__}; expected an integer, boolean or name")


# ------------------------------------------------------------------------------------------ the tables
_COLUMN_TYPES = {int, bool, str, list, type(None)}


def _column_types(col: tuple, where: str, name: str) -> set[type]:
    if type(col[0]) is str:
        # a column of names: the distinct values' types are the column's, except that True/1 and False/0
        # hash alike, so a number among them means a full scan
        types = set(map(type, set(col)))
        if types & {int, bool, float}:
            types = set(map(type, col))
    else:
        types = set(map(type, col))
    if not types <= _COLUMN_TYPES:
        bad = sorted(t.__name__ for t in types - _COLUMN_TYPES)
        raise BundleError(f"{where}: column {name!r} holds values of type {bad}")
    return types


def _has_budget(columns: list) -> bool:
    """Whether a table's columns carry the budget columns after ROW_HEAD (format version 2)."""
    return tuple(columns[len(ROW_HEAD):len(ROW_HEAD) + len(BUDGET_HEAD)]) == BUDGET_HEAD


def _bad_list(v: Any) -> bool:
    return type(v) is not tuple or len(v) > MAX_SEQUENCE or any(type(x) is not int or not 0 <= x < MAX_DIM
                                                                 for x in v)


class _Table:
    """One family's rows: stage-1 validated, indexed by (device, problem values); stage 2 on demand."""

    def __init__(self, family: str, columns: list[str], configs: list[dict], rows: list[list],
                 devices: list[DeviceRecord], where: str) -> None:
        self.family = family
        self.head = len(ROW_HEAD) + (len(BUDGET_HEAD) if _has_budget(columns) else 0)
        self.fields = columns[self.head:]
        self.configs = configs
        self.rows = rows
        self.devices = devices
        self.where = where
        self._done: dict[int, BundleEntry | BundleError] = {}
        self.index = self._build_index()

    def _build_index(self) -> dict[tuple, int]:
        rows, n = self.rows, self.head + len(self.fields)
        where = self.where
        if not rows:
            return {}
        if set(map(type, rows)) != {list}:
            raise BundleError(f"{where}.rows: every row must be a list")
        if set(map(len, rows)) != {n}:
            bad = next(i for i, r in enumerate(rows) if len(r) != n)
            raise BundleError(f"{where}.rows[{bad}]: has {len(rows[bad])} values, the columns say {n}")
        cols = list(zip(*rows))
        dev, win, t, a, tr = cols[:len(ROW_HEAD)]
        self._ints(dev, 0, len(self.devices), "device")
        self._ints(win, -1, len(self.configs), "winner")
        self._times(t, "time_ms")
        self._times(a, "aten_ms")
        self._ints(tr, 0, MAX_TRIALS, "trials")
        if self.head > len(ROW_HEAD):
            mt, tb = cols[len(ROW_HEAD):self.head]
            self._ints(mt, 0, MAX_TRIALS, "max_trials")
            if not set(map(type, tb)) <= {int, float} or min(tb) < 0 or max(tb) > MAX_BUDGET_S:
                self._bad_value(tb, "time_budget_s", lambda v: type(v) not in (int, float)
                                or not 0 <= v <= MAX_BUDGET_S, f"must be a number of seconds in [0, {MAX_BUDGET_S:g}]")
        keycols: list[tuple] = [dev]
        for name, col in zip(self.fields, cols[self.head:]):
            types = _column_types(col, where, name)
            if list in types:
                # few distinct sequences (strides, paddings): check each distinct one
                col = tuple(map(tuple, col)) if len(types) == 1 else \
                    tuple(tuple(v) if type(v) is list else v for v in col)
                try:
                    distinct = set(col)
                except TypeError:  # a nested list: unhashable, and not allowed
                    distinct = set()
                    self._bad_value(col, name, lambda v: type(v) is tuple and any(type(x) is not int for x in v),
                                    "must be a list of integers")
                for v in distinct:
                    if type(v) is tuple and _bad_list(v):
                        self._bad_value(col, name, lambda x, v=v: x == v,
                                        f"must be a list of at most {MAX_SEQUENCE} integers in [0, {MAX_DIM})")
            if int in types:
                ints = col if len(types) == 1 else [v for v in col if type(v) is int]
                if min(ints) < 0 or max(ints) >= MAX_DIM:
                    self._bad_value(col, name, lambda v: type(v) is int and not 0 <= v < MAX_DIM)
            if str in types:
                for v in {v for v in set(col) if type(v) is str}:
                    if not _IDENT.match(v):
                        self._bad_value(col, name, lambda x, v=v: x == v)
            keycols.append(col)
        index: dict[tuple, int] = {}
        keys = list(zip(*keycols))
        index = dict(zip(keys, range(len(keys))))
        if len(index) != len(keys):  # duplicates: the faster row wins (the earlier one on a tie)
            index = {}
            for i, k in enumerate(keys):
                j = index.get(k)
                if j is None or rows[i][2] < rows[j][2]:
                    index[k] = i
        return index

    def _ints(self, col: tuple, lo: int, hi: int, name: str) -> None:
        if set(map(type, col)) != {int} or min(col) < lo or max(col) >= hi:
            self._bad_value(col, name, lambda v: type(v) is not int or not lo <= v < hi,
                            f"must be an integer in [{lo}, {hi})")

    def _times(self, col: tuple, name: str) -> None:
        if not set(map(type, col)) <= {int, float} or min(col) <= 0 or max(col) > MAX_TIME_MS:
            self._bad_value(col, name, lambda v: type(v) not in (int, float) or not 0 < v <= MAX_TIME_MS,
                            f"must be a number in (0, {MAX_TIME_MS:g}] ms")

    def _bad_value(self, col: tuple, name: str, bad, why: str = "is not an allowed value") -> None:
        i = next(i for i, v in enumerate(col) if bad(v))
        raise BundleError(f"{self.where}.rows[{i}]: {name} = {str(col[i])[:60]!r} {why}")

    def entry(self, i: int, limits: Any = None) -> BundleEntry:
        """Row ``i`` after stage 2 (cached); raises BundleError naming the row and field."""
        got = self._done.get(i)
        if got is None:
            try:
                got = self._full(i, limits)
            except BundleError as e:
                got = e
            except Exception as e:  # family code choking on hostile values: still just a bad entry
                got = BundleError(f"{self.where}.rows[{i}]: not a valid {self.family} entry "
                                  f"({type(e).__name__}: {str(e)[:200]})")
            self._done[i] = got
        if isinstance(got, BundleError):
            raise got
        return got

    def _full(self, i: int, limits: Any) -> BundleEntry:
        row = self.rows[i]
        where = f"{self.where}.rows[{i}]"
        dev_i, win, time_ms, aten_ms, trials = row[:len(ROW_HEAD)]
        max_trials, budget_s = row[len(ROW_HEAD):self.head] if self.head > len(ROW_HEAD) else (0, 0.0)
        device = self.devices[dev_i]
        raw = dict(zip(self.fields, row[self.head:]))
        canon, problem = check_problem(self.family, raw, where)
        if win == -1:
            winner = "aten"
        else:
            winner = check_config(self.family, self.configs[win], problem,
                                  limits if limits is not None else device.limits(), where + " winner")
            if time_ms > aten_ms:
                raise BundleError(f"{where}: a kernel winner must be faster than aten "
                                  f"(time_ms {time_ms:g} > aten_ms {aten_ms:g})")
        return BundleEntry(device=device.key, family=self.family, problem_key=_problem_key(canon),
                           problem=canon, winner=winner, time_ms=float(time_ms), aten_ms=float(aten_ms),
                           trials=trials, max_trials=max_trials, time_budget_s=float(budget_s))

    def find(self, dev_i: int, problem: Any) -> int | None:
        """The row of device index ``dev_i`` and family problem object ``problem``, or None."""
        try:
            key = (dev_i, *(getattr(problem, f) for f in self.fields))
        except AttributeError:
            return None
        return self.index.get(key)


class Bundle:
    """A bundle in memory: its devices and one table per family (see the module docstring).

    Build one with ``load``/``parse`` (from a file) or ``Bundle.from_entries`` (from the cache).
    """

    def __init__(self, devices: list[DeviceRecord], tables: dict[str, _Table], *, created: str = "",
                 producer: str = "", source: str = "bundle") -> None:
        self.devices = devices
        self.tables = tables
        self.created = created
        self.producer = producer
        self.source = source

    def __len__(self) -> int:
        return sum(len(t.index) for t in self.tables.values())

    @property
    def device_keys(self) -> list[str]:
        return [d.key for d in self.devices]

    def entries(self) -> list[BundleEntry]:
        """Every entry, fully validated (stage 2), in table order.

        Raises:
            BundleError: the first invalid entry, naming it and its field.
        """
        out = []
        try:
            for t in self.tables.values():
                for i in sorted(t.index.values()):
                    out.append(t.entry(i))
        except BundleError as e:
            raise BundleError(f"{self.source}: {e}") from None
        return out

    def find(self, device_key: str, family: str, problem: Any) -> BundleEntry | None:
        """The validated entry of (device, family, problem object), or None when absent or invalid
        (an invalid entry is dropped with one warning)."""
        t = self.tables.get(family)
        if t is None:
            return None
        for dev_i, d in enumerate(self.devices):
            if d.key == device_key:
                row = t.find(dev_i, problem)
                if row is None:
                    return None
                try:
                    return t.entry(row)
                except BundleError as e:
                    _warn_once(("entry", self.source, family, row), f"torchtune_ops: ignoring an entry of "
                                                                   f"{self.source}: {e}")
                    return None
        return None

    @classmethod
    def from_entries(cls, entries: Iterable[BundleEntry], *, devices: Iterable[DeviceRecord] = (),
                     created: str = "", producer: str = "") -> "Bundle":
        """A bundle of ``entries`` (the faster per key wins); devices not given are described from their
        fingerprint keys. Not validated: call ``entries()`` to validate."""
        from ..kernels.registry import families

        best: dict[tuple, BundleEntry] = {}
        for e in entries:
            old = best.get(e.key)
            if old is None or e.time_ms < old.time_ms:
                best[e.key] = e
        devs: dict[str, DeviceRecord] = {d.key: d for d in devices}
        for e in best.values():
            if e.device not in devs:
                devs[e.device] = device_record(parse_fingerprint_key(e.device))
        used = sorted({e.device for e in best.values()})
        dev_list = [devs[k] for k in used]
        dev_index = {k: i for i, k in enumerate(used)}
        fams = families()
        tables: dict[str, _Table] = {}
        for fname in sorted({e.family for e in best.values()}):
            fam = fams.get(fname)
            if fam is None:
                raise BundleError(f"family {fname!r} is not a known kernel family")
            fields = [f.name for f in dataclasses.fields(fam.problem_type)]
            configs: list[dict] = []
            cfg_index: dict[str, int] = {}
            rows = []
            for e in sorted((e for e in best.values() if e.family == fname), key=lambda e: e.key):
                if e.winner == "aten":
                    w = -1
                else:
                    w = cfg_index.get(e.winner)
                    if w is None:
                        w = cfg_index[e.winner] = len(configs)
                        configs.append(json.loads(e.winner))
                values = [list(v) if isinstance(v, tuple) else v
                          for v in (e.problem.get(f) for f in fields)]
                rows.append([dev_index[e.device], w, round_ms(e.time_ms), round_ms(e.aten_ms), int(e.trials),
                             int(e.max_trials), float(e.time_budget_s), *values])
            tables[fname] = _Table(fname, [*ROW_HEAD, *BUDGET_HEAD, *fields], configs, rows, dev_list,
                                   f"families.{fname}")
        return cls(dev_list, tables, created=created or _now(), producer=producer or _producer())

    def to_dict(self) -> dict[str, Any]:
        """The bundle's JSON document."""
        fams = {}
        for name, t in self.tables.items():
            if t.index:
                keep = sorted(t.index.values())
                head = [*ROW_HEAD, *BUDGET_HEAD] if t.head > len(ROW_HEAD) else list(ROW_HEAD)
                fams[name] = {"columns": [*head, *t.fields], "configs": t.configs,
                              "rows": [t.rows[i] for i in keep]}
        return {"format": FORMAT, "version": VERSION, "created": self.created or _now(),
                "producer": self.producer or _producer(), "devices": [d.to_dict() for d in self.devices],
                "families": fams}


_warned: set = set()
_warned_lock = threading.Lock()


def _warn_once(key: Any, message: str) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message)


# ---------------------------------------------------------------------------------------- load, write
def parse(data: bytes | str, *, source: str = "bundle") -> Bundle:
    """Parse a bundle's bytes with stage-1 validation (see the module docstring).

    Args:
        data: the file's contents.
        source: a name for messages (e.g. the file name). Default "bundle".

    Raises:
        BundleError: the first problem found, naming the file, entry and field.
    """
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"{source}: larger than {MAX_BUNDLE_BYTES >> 20} MiB")
    # Parsing creates ~10 objects per entry, none of them cyclic: the cyclic garbage collector would only
    # rescan everything else in the process (all of torch) several times meanwhile, so it waits.
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        try:
            # NaN/Infinity literals are refused here; 1e999 parses to inf and fails the range checks below
            obj = json.loads(data, parse_constant=reject_constant)
        except (ValueError, RecursionError) as e:
            raise BundleError(f"{source}: not valid JSON ({str(e)[:200]})") from None
        try:
            return _parse_obj(obj, source)
        except BundleError as e:
            raise BundleError(f"{source}: {e}") from None
        except RecursionError:
            raise BundleError(f"{source}: nested too deeply") from None
    finally:
        if gc_was_on:
            gc.enable()


def _parse_obj(obj: Any, source: str) -> Bundle:
    from ..kernels.registry import families

    top = _fields(obj, _TOP_FIELDS, _TOP_REQUIRED, "bundle")
    if top["format"] != FORMAT:
        raise BundleError(f"bundle: format must be {FORMAT!r}")
    version = top["version"]
    if type(version) is not int:
        raise BundleError("bundle: version must be an integer")
    if version > VERSION:
        raise BundleError(f"bundle: format version {version} is newer than this torchtune_ops reads "
                          f"({VERSION}); upgrade torchtune_ops")
    if version < 1:
        raise BundleError(f"bundle: format version {version} is not valid")
    created = top.get("created", "")
    if created:
        _str(created, _DATE, "bundle", "created")
    producer = top.get("producer", "")
    if producer:
        _str(producer, _VERSION, "bundle", "producer")
    devs = top["devices"]
    if type(devs) is not list or len(devs) > 10_000:
        raise BundleError("bundle: devices must be a list of devices")
    devices = [_device(i, d) for i, d in enumerate(devs)]
    if len({d.key for d in devices}) != len(devices):
        raise BundleError("bundle: a device is listed twice")
    fams_obj = top["families"]
    if type(fams_obj) is not dict:
        raise BundleError("bundle: families must be an object of family name -> table")
    fams = families()
    tables = {}
    for name, tobj in fams_obj.items():
        where = f"families.{str(name)[:40]}"
        check_family(name, where)
        t = _fields(tobj, _TABLE_FIELDS, _TABLE_FIELDS, where)
        columns, configs, rows = t["columns"], t["configs"], t["rows"]
        if type(columns) is not list or tuple(columns[:len(ROW_HEAD)]) != ROW_HEAD:
            raise BundleError(f"{where}.columns: must start with {list(ROW_HEAD)}")
        fields = columns[len(ROW_HEAD) + (len(BUDGET_HEAD) if _has_budget(columns) else 0):]
        known = {f.name: f for f in dataclasses.fields(fams[name].problem_type)}
        for f in fields:
            if type(f) is not str or f not in known:
                raise BundleError(f"{where}.columns: {str(f)[:40]!r} is not a field of a {name} problem "
                                  f"({sorted(known)})")
        if len(set(fields)) != len(fields):
            raise BundleError(f"{where}.columns: a field is listed twice")
        required = {n for n, f in known.items() if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        if not required <= set(fields):
            raise BundleError(f"{where}.columns: missing problem field(s) {sorted(required - set(fields))}")
        if type(configs) is not list or len(configs) > MAX_CONFIGS:
            raise BundleError(f"{where}.configs: must be a list of at most {MAX_CONFIGS} configurations")
        for i, c in enumerate(configs):
            _config_shape(c, f"{where}.configs[{i}]")
        if type(rows) is not list:
            raise BundleError(f"{where}.rows: must be a list")
        tables[name] = _Table(name, columns, configs, rows, devices, where)
    return Bundle(devices, tables, created=created, producer=producer, source=source)


def load(path: str | os.PathLike) -> Bundle:
    """Read the bundle at ``path`` with stage-1 validation (``entries()`` runs stage 2).

    Raises:
        BundleError: malformed or hostile content, naming the file, entry and field.
        OSError: the file cannot be read.
    """
    p = os.fspath(path)
    size = os.path.getsize(p)
    if size > MAX_BUNDLE_BYTES:
        raise BundleError(f"{p}: larger than {MAX_BUNDLE_BYTES >> 20} MiB")
    with open(p, "rb") as f:
        return parse(f.read(), source=p)


def validate(path: str | os.PathLike) -> Bundle:
    """Read the bundle at ``path`` and validate every entry fully (both stages); returns it."""
    b = load(path)
    b.entries()
    return b


def write(bundle: Bundle, path: str | os.PathLike) -> None:
    """Write ``bundle`` to ``path`` atomically (a temporary file in the same directory, renamed).

    The document is compact JSON with one table row per line, so diffs of bundles stay readable.
    """
    p = os.fspath(path)
    doc = bundle.to_dict()
    lines = ["{", f' "format": {json.dumps(doc["format"])},', f' "version": {doc["version"]},',
             f' "created": {json.dumps(doc["created"])},', f' "producer": {json.dumps(doc["producer"])},',
             ' "devices": [']
    lines.append(",\n".join("  " + json.dumps(d, sort_keys=True) for d in doc["devices"]))
    lines.append(" ],")
    lines.append(' "families": {')
    fam_parts = []
    for name, t in doc["families"].items():
        part = [f'  {json.dumps(name)}: {{', f'   "columns": {json.dumps(t["columns"])},', '   "configs": [']
        part.append(",\n".join("    " + json.dumps(c, sort_keys=True, separators=(",", ":"))
                               for c in t["configs"]))
        part.append("   ],")
        part.append('   "rows": [')
        part.append(",\n".join("    " + json.dumps(r, separators=(",", ":"), allow_nan=False)
                               for r in t["rows"]))
        part.append("   ]")
        part.append("  }")
        fam_parts.append("\n".join(part))
    lines.append(",\n".join(fam_parts))
    lines.append(" }")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    d = os.path.dirname(os.path.abspath(p))
    fd, tmp = tempfile.mkstemp(prefix=".bundle-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def merge(bundles: Iterable[Bundle]) -> Bundle:
    """Merge bundles (each fully validated first): per (device, family, problem) the faster choice wins
    (the earlier one on a tie); entries of different devices never mix.

    Raises:
        BundleError: an entry of one of the bundles is invalid.
    """
    devices: dict[str, DeviceRecord] = {}
    entries: list[BundleEntry] = []
    for b in bundles:
        for d in b.devices:
            devices.setdefault(d.key, d)
        entries.extend(b.entries())
    return Bundle.from_entries(entries, devices=devices.values())


# ------------------------------------------------------------------------------------- cache <-> bundle
def export_store(store: Any, *, fingerprint: str | None = None, family: str | None = None) -> Bundle:
    """A bundle of the cache's entries (of one fingerprint key and/or family, or all).

    Entries the bundle format cannot hold (unknown family, an unparsable fingerprint key) are skipped
    with a warning.
    """
    from ..kernels.registry import families

    fams = families()
    out = []
    for e in store.entries(fingerprint, family=family):
        if e.family not in fams:
            log.warning("torchtune_ops: not exporting an entry of unknown family %r", e.family)
            continue
        try:
            parse_fingerprint_key(e.fingerprint)
        except BundleError as err:
            log.warning("torchtune_ops: not exporting an entry: %s", err)
            continue
        out.append(from_store_entry(e))
    return Bundle.from_entries(out)


@dataclasses.dataclass
class ImportResult:
    """What ``import_bundle`` did: entries written, entries where the cache's own was kept (as fast or
    faster), entries re-keyed from a compatible device to this one, and forced foreign devices."""

    written: int = 0
    kept: int = 0
    rekeyed: int = 0
    forced_devices: list[str] = dataclasses.field(default_factory=list)


def import_bundle(bundle: Bundle, store: Any, *, local: Any, allow_incompatible: bool = False) -> ImportResult:
    """Import ``bundle`` into ``store``; the faster choice per key is kept.

    Entries of this device (same fingerprint) are imported as they are; entries of a compatible device
    (``device.compatible``: same GPU model, capability, multiprocessor count, kernel sources, torch and
    Triton major.minor) are re-keyed to this device. Entries of other devices are refused, unless
    ``allow_incompatible``, which stores them under their own fingerprint (they then serve only that
    device). Everything is validated before the first write: a bad bundle changes nothing.

    Args:
        bundle: a loaded bundle.
        store: the ``store.Store`` to write into.
        local: this machine's ``device.Fingerprint``.
        allow_incompatible: import entries of incompatible devices too. Default False.

    Raises:
        BundleError: an invalid entry, or entries of an incompatible device (without the override).
    """
    from .device import incompatibility

    target: dict[str, str] = {}
    res = ImportResult()
    foreign = []
    for d in bundle.devices:
        why = incompatibility(d.fingerprint, local)
        if why is None:
            target[d.key] = local.key
        elif allow_incompatible:
            target[d.key] = d.key
            res.forced_devices.append(d.key)
        else:
            foreign.append((d.key, why))
    entries = bundle.entries()
    used = {e.device for e in entries}
    refused = [f"{k} ({why})" for k, why in foreign if k in used]
    if refused:
        raise BundleError(f"{bundle.source}: refusing entries tuned on another device than this one "
                          f"({local.key}): {'; '.join(refused)}. Pass --force (allow_incompatible=True) to "
                          f"store them under their own device anyway")
    created = bundle.created or _now()
    for e in entries:
        fp = target[e.device]
        if fp != e.device:
            res.rekeyed += 1
        new = e.to_store_entry(fingerprint=fp, created=created, source="import")
        if store.put(new) is new:
            res.written += 1
        else:
            res.kept += 1
    return res


# ------------------------------------------------------------------------- read-only overlays (dispatch)
def shipped_bundle_paths() -> list[Path]:
    """The bundles shipped with torchtune_ops: ``*.json`` in ``cache/`` at the repository root (a source
    checkout or editable install) and in the package's ``shipped/`` folder (wheels), in name order."""
    here = Path(__file__).resolve().parent
    dirs = [here / "shipped"]
    repo = here.parent
    # only our own checkout's cache/ (an installed package's parent is site-packages, whose "cache" folder,
    # if any, is somebody else's)
    if (repo / "pyproject.toml").is_file() and (repo / "cache" / "suite.py").is_file():
        dirs.insert(0, repo / "cache")
    out: list[Path] = []
    for d in dirs:
        if d.is_dir():
            out += sorted(p for p in d.glob("*.json") if p.is_file())
    return out


class Overlay:
    """Read-only bundles in front of the cache, for one process (``TORCHTUNE_OPS_BUNDLES`` and, with
    ``TORCHTUNE_OPS_USE_SHIPPED``, the shipped bundles).

    ``get(fp_key, family, problem)`` returns a ``store.Entry`` from the first bundle (in path order) with
    an entry for a device compatible with ``fp_key``, re-keyed to ``fp_key``. A bundle that cannot be
    read or is malformed is skipped with one warning; one invalid entry is dropped with one warning.

    Args:
        paths: bundle files, in priority order.
    """

    def __init__(self, paths: Iterable[str | os.PathLike]) -> None:
        self.paths = [os.fspath(p) for p in paths]
        self.bundles: list[Bundle] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._devices: dict[str, list[tuple[Bundle, str, Any]]] = {}
        self._memo: dict[tuple, Any] = {}
        for p in self.paths:
            try:
                self.bundles.append(load(p))
            except (BundleError, OSError) as e:
                self.errors.append(str(e))
                _warn_once(("bundle", p), f"torchtune_ops: ignoring bundle {p}: {e}")

    def __len__(self) -> int:
        return sum(len(b) for b in self.bundles)

    def _candidates(self, fp_key: str) -> list[tuple[Bundle, str, Any]]:
        got = self._devices.get(fp_key)
        if got is None:
            from .device import incompatibility

            try:
                local = parse_fingerprint_key(fp_key)
            except BundleError:
                local = None
            got = []
            if local is not None:
                for b in self.bundles:
                    for d in b.devices:
                        if incompatibility(d.fingerprint, local) is None:
                            got.append((b, d.key, d))
            self._devices[fp_key] = got
        return got

    def get(self, fp_key: str, family: str, problem: Any):
        """The ``store.Entry`` for (this device's fingerprint key, family name, problem object), or None."""
        cands = self._candidates(fp_key)
        if not cands:
            return None
        k = (fp_key, family, problem)
        with self._lock:
            if k in self._memo:
                return self._memo[k]
            found = None
            for b, dev_key, _ in cands:
                e = b.find(dev_key, family, problem)
                if e is not None:
                    found = e.to_store_entry(fingerprint=fp_key, created=b.created, source="bundle")
                    break
            self._memo[k] = found
            return found


_overlays: dict[tuple, Overlay] = {}
_overlays_lock = threading.Lock()


def overlay(settings_now: Any = None) -> Overlay:
    """The process's overlay for the current settings (``bundles``, ``use_shipped``), loaded once."""
    from .. import settings

    s = settings_now or settings.current()
    key = (tuple(s.bundles), s.use_shipped)
    ov = _overlays.get(key)
    if ov is None:
        with _overlays_lock:
            ov = _overlays.get(key)
            if ov is None:
                paths = list(s.bundles) + ([str(p) for p in shipped_bundle_paths()] if s.use_shipped else [])
                ov = _overlays[key] = Overlay(paths)
    return ov


def lookup(fp_key: str, family: str, problem: Any):
    """Dispatcher hook: the overlay's ``store.Entry`` for a problem, or None (see ``Overlay.get``)."""
    return overlay().get(fp_key, family, problem)
