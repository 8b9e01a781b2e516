"""Recording the problems a deployment meets, for offline tuning later (``TORCHTUNE_OPS_RECORD=path``).

The shape file holds one JSON object per line, ``{"family": "gemm", "problem": {...}}``, written in a
canonical form (sorted keys, no spaces) so that the line itself is the deduplication key. Each unseen
problem is appended exactly once, even with many processes appending to the same file at once:

* every append happens under an exclusive ``flock`` on the file, after reading what other processes
  appended since this process last looked, so a problem another process wrote is never written again;
* each line is written with a single ``os.write`` on an ``O_APPEND`` descriptor, so lines never interleave;
* the file is opened afresh for every append (appends are rare: once per unseen problem), which keeps the
  lock correct after ``fork``.

Recording is the one write ``TORCHTUNE_OPS_READONLY=1`` allows (it is an explicit request for that file);
it never touches the cache. A failure to write (read-only file system, disk full) gives one warning and
turns recording off for the process; the model keeps running.

``torchtune-ops tune --shapes FILE`` reads the file back (``read_shapes``), validating every line as
untrusted data, like a bundle.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any, Hashable, Mapping

try:  # POSIX; elsewhere appends are still single writes, only the cross-process dedup lock is missing
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

from .. import settings
from ..errors import BundleError

log = logging.getLogger("torchtune_ops")

#: the largest shape file ``read_shapes`` accepts
MAX_SHAPE_FILE_BYTES = 64 << 20


def canonical_line(family: str, problem: Mapping[str, Any]) -> str:
    """The shape-file line of ``(family, problem)``: canonical JSON plus a newline."""
    return json.dumps({"family": family, "problem": dict(problem)}, sort_keys=True,
                      separators=(",", ":"), allow_nan=False) + "\n"


def _canonicalize(raw: str) -> str | None:
    """The canonical form of one line read back, or None when it is not a valid record."""
    raw = raw.strip()
    if not raw:
        return None
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("family"), str) \
            or not isinstance(obj.get("problem"), dict):
        return None
    try:
        return canonical_line(obj["family"], obj["problem"])
    except (TypeError, ValueError):
        return None


class ShapeRecorder:
    """Appends each unseen problem once to one shape file; safe across threads and processes.

    Args:
        path: the shape file; created (mode 0644) on the first append, with its parent directory.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._fast: set[Hashable] = set()  # caller keys already handled (skips the JSON encoding)
        self._lines: set[str] = set()  # canonical lines known to be in the file
        self._offset = 0  # how far this process has read the file
        self.disabled = False

    def record(self, family: str, problem: Mapping[str, Any], *, key: Hashable | None = None) -> bool:
        """Append ``(family, problem)`` unless the file already holds it.

        Args:
            family: the kernel family name, e.g. ``"gemm"``.
            problem: the problem as a JSON-able dict (the family's ``problem_to_dict``).
            key: optional cheap hashable key of the problem (e.g. the dispatcher's problem key); a key seen
                before returns at once without encoding anything. Default None: always encode.

        Returns:
            True when this call wrote the line, False when it was already recorded (by any process).

        Raises:
            OSError: the file cannot be opened, locked or written (``note`` turns this into one warning).
        """
        if key is not None and (family, key) in self._fast:
            return False
        line = canonical_line(family, problem)
        with self._lock:
            if line in self._lines:
                written = False
            else:
                written = self._append(line)
            if key is not None:
                self._fast.add((family, key))
        return written

    def _append(self, line: str) -> bool:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size < self._offset:  # the file was truncated or replaced: read it all again
                self._offset, self._lines = 0, set()
            last = os.pread(fd, 1, size - 1) if size else b"\n"
            if size > self._offset:
                data = os.pread(fd, size - self._offset, self._offset)
                # only complete lines count; a torn last line (a writer killed mid-line) is not a record
                complete = data[: data.rfind(b"\n") + 1]
                for raw in complete.decode("utf-8", "replace").splitlines():
                    canon = _canonicalize(raw)
                    if canon is not None:
                        self._lines.add(canon)
                self._offset = size
            if line in self._lines:
                return False
            payload = (line if last == b"\n" else "\n" + line).encode()
            n = os.write(fd, payload)
            if n != len(payload):
                raise OSError(f"short write to {self.path} ({n} of {len(payload)} bytes)")
            self._offset = size + n
            self._lines.add(line)
            return True
        finally:
            os.close(fd)  # closing releases the flock

    def known(self) -> set[str]:
        """The canonical lines this process knows to be in the file."""
        with self._lock:
            return set(self._lines)


_recorders: dict[str, ShapeRecorder] = {}
_recorders_lock = threading.Lock()


def recorder(path: str | os.PathLike) -> ShapeRecorder:
    """The process-wide recorder of ``path`` (one per path, so deduplication is shared)."""
    p = os.path.abspath(os.fspath(path))
    with _recorders_lock:
        r = _recorders.get(p)
        if r is None:
            r = _recorders[p] = ShapeRecorder(p)
        return r


def note(family: str, problem: Mapping[str, Any], *, key: Hashable | None = None) -> None:
    """Record ``(family, problem)`` when ``TORCHTUNE_OPS_RECORD`` is set; otherwise do nothing.

    Meant for the dispatcher's miss path. Never raises for I/O: a failure warns once and turns recording
    off for this process.

    Args:
        family: the kernel family name.
        problem: the problem as a JSON-able dict.
        key: optional cheap hashable problem key (see ``ShapeRecorder.record``). Default None.
    """
    path = settings.current().record
    if not path:
        return
    r = recorder(path)
    if r.disabled:
        return
    try:
        r.record(family, problem, key=key)
    except (OSError, TypeError, ValueError) as e:
        r.disabled = True
        log.warning("torchtune_ops: cannot record shapes to %s (%s); recording is off for this process",
                    path, e)


def read_shapes(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """Read a shape file back: the distinct ``(family, problem dict)`` pairs in file order.

    Every record is validated like a bundle's problem (known family, known fields, sane values); blank
    lines and lines that are not JSON (torn by a writer killed mid-line) are skipped with one warning.

    Args:
        path: the shape file.

    Raises:
        BundleError: a JSON line is not a valid record (the message names the line number and field).
        OSError: the file cannot be read.
    """
    from . import bundles

    p = os.fspath(path)
    if os.path.getsize(p) > MAX_SHAPE_FILE_BYTES:
        raise BundleError(f"{p}: shape file larger than {MAX_SHAPE_FILE_BYTES >> 20} MiB")
    with open(p, "rb") as f:
        data = f.read()
    text = data.decode("utf-8", "replace")
    lines = text.split("\n")
    out, seen, skipped = [], set(), 0
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{p}:{i}"
        try:
            obj = json.loads(raw, parse_constant=bundles.reject_constant)
        except (ValueError, RecursionError):
            skipped += 1  # a line torn by a writer killed mid-line (or junk): not a record
            continue
        if not isinstance(obj, dict) or set(obj) != {"family", "problem"}:
            raise BundleError(f"{where}: a record must be an object with exactly 'family' and 'problem'")
        family = bundles.check_family(obj["family"], where)
        problem, _ = bundles.check_problem(family, obj["problem"], where)
        canon = canonical_line(family, problem)
        if canon not in seen:
            seen.add(canon)
            out.append((family, problem))
    if skipped:
        log.warning("torchtune_ops: %s: skipped %d line(s) that are not JSON (torn writes?)", p, skipped)
    return out
