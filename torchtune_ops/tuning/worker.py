"""Benchmarking candidates in a separate worker process, so a crashing or hanging kernel cannot harm the
caller.

A kernel that hits an illegal memory access leaves its CUDA context unusable for the rest of the process;
one that deadlocks never returns. When tuning on a GPU (``TORCHTUNE_OPS_BENCH_SUBPROCESS=1``, the default),
the tuner therefore runs every candidate in a worker process and only receives numbers back::

    from torchtune_ops.tuning.worker import WorkerTimer
    with WorkerTimer(GEMM, problem, device="cuda", seed=0) as timer:
        t = timer(None, key="aten")                  # timing.Timing, measured in the worker
        t = timer(None, key=config.to_json())        # KernelFailure if it failed, crashed or hung
        err = timer.relative_error(config.to_json(), seed=1)   # correctness against PyTorch, in the worker
        t = timer.eager(None, key=config.to_json())  # back to back, host cost included (bound launch)

- The worker is a fresh interpreter (``sys.executable``; CUDA is not fork-safe), started like
  multiprocessing's ``spawn`` but without re-running the caller's ``__main__`` (a user script without an
  ``if __name__ == "__main__"`` guard would otherwise run again in the worker). It talks over a pair of
  pipes (``multiprocessing.connection.Connection``), in its own session so that Ctrl-C reaches only the
  caller, and exits when the caller's end closes. One idle worker per device is kept for later problems.
- The protocol is data only: JSON messages over a pipe (the family by registry name or ``module:attr``
  reference, the problem's dict, configuration JSON, timings, relative errors). Nothing is pickled.
- A worker that dies (crash, ``os._exit``, a poisoned CUDA context) is replaced and the candidate scored
  as failed. A candidate that does not answer within ``timeout_s`` (compiling or running) has its worker
  killed and replaced, and is scored as failed. The caller gets ``KernelFailure`` in both cases, which the
  tuner scores like any failing configuration.
- An error of the family itself in the worker (not a candidate failure: a bug) raises ``WorkerError``,
  which the tuner lets propagate.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import threading
import time
import traceback
from typing import Any, Callable

from ..errors import KernelFailure, TorchTuneOpsError
from .timing import Timing

__all__ = ["WorkerTimer", "WorkerError", "family_ref", "resolve_family", "shutdown", "DEFAULT_TIMEOUT_S",
           "DEFAULT_START_TIMEOUT_S"]

log = logging.getLogger("torchtune_ops")

#: seconds one candidate may take (compiling included) before its worker is killed
DEFAULT_TIMEOUT_S = 30.0
#: seconds a new worker may take to start (import torch and Triton, make the inputs)
DEFAULT_START_TIMEOUT_S = 180.0


class WorkerError(TorchTuneOpsError):
    """The worker failed for a reason other than a candidate's failure (a bug in the family, or the worker
    could not be started); the tuner stops and the caller uses PyTorch's kernel."""


# ---------------------------------------------------------------------------------------------------------
# Naming a family so that the worker can find it without unpickling anything.

def family_ref(family: Any) -> str | None:
    """A reference the worker can resolve to ``family``: its registry name, or ``module:attr`` where
    ``module.attr`` is the family object (or its class, constructible without arguments). None when there
    is none (a family built at run time, or defined in ``__main__``)."""
    try:
        from ..kernels.registry import families

        if families().get(family.name) is family:
            return family.name
    except ImportError:  # pragma: no cover - kernels unavailable
        pass
    module = type(family).__module__
    if module in (None, "__main__", "__mp_main__"):
        return None
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    for attr, value in vars(mod).items():
        if value is family:
            return f"{module}:{attr}"
    cls = type(family)
    if vars(mod).get(cls.__name__) is cls and _constructible(cls):
        return f"{module}:{cls.__name__}"
    return None


def _constructible(cls: type) -> bool:
    import inspect

    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in sig.parameters.values())


def resolve_family(ref: str) -> Any:
    """The family a ``family_ref`` names: a registry name, or ``module:attr`` (an instance, or a class
    instantiated without arguments). Raises ``WorkerError`` unless the result is a ``KernelFamily``."""
    from ..kernels.base import KernelFamily
    from ..kernels.registry import families

    if ":" not in ref:
        fam = families().get(ref)
        if fam is None:
            raise WorkerError(f"no kernel family named {ref!r}")
        return fam
    module, _, attr = ref.partition(":")
    if not module or not attr.isidentifier():
        raise WorkerError(f"bad family reference {ref!r}")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise WorkerError(f"cannot find family {ref!r}: {e}") from None
    if isinstance(obj, type) and issubclass(obj, KernelFamily):
        obj = obj()
    if not isinstance(obj, KernelFamily):
        raise WorkerError(f"{ref!r} is not a kernel family")
    return obj


# ---------------------------------------------------------------------------------------------------------
# The worker process.

def _send(conn: Any, msg: dict) -> None:
    conn.send_bytes(json.dumps(msg).encode())


def _recv(conn: Any) -> dict:
    msg = json.loads(conn.recv_bytes().decode())
    if not isinstance(msg, dict):
        raise WorkerError("malformed message")
    return msg


class _Server:
    """The worker's state: the family, problem and inputs of the problem being tuned."""

    def __init__(self) -> None:
        self.family = self.problem = self.inputs = self.device = self.timer = None
        self.checks: dict[int, tuple] = {}

    def setup(self, msg: dict) -> dict:
        import torch

        from .timing import make_timer

        torch.set_float32_matmul_precision(msg.get("matmul_precision", "highest"))
        torch.use_deterministic_algorithms(bool(msg.get("deterministic", False)))
        self.family = resolve_family(msg["family"])
        self.problem = self.family.problem_from_dict(msg["problem"])
        self.device = msg["device"]
        self.inputs = None
        self.checks = {}
        self.inputs = self.family.make_inputs(self.problem, self.device, seed=int(msg["seed"]))
        t = msg.get("timer") or {}
        self.timer = make_timer(self.device, warmup_ms=t.get("warmup_ms"), rep_ms=t.get("rep_ms"),
                                min_reps=t.get("min_reps"))
        return {"ok": True}

    def _call(self, key: str, inputs: tuple) -> Callable[[], Any]:
        from ..kernels.base import Config

        fam, problem = self.family, self.problem
        if key == "aten":
            return lambda: fam.reference(problem, inputs)
        cfg = Config.from_json(key)
        return lambda: fam.launch(cfg, problem, inputs)

    def time(self, msg: dict) -> dict:
        t = self.timer(self._call(msg["key"], self.inputs), key=msg["key"])
        return {"ok": True, "timing": [t.median_ms, t.p20_ms, t.p80_ms, t.min_ms, t.n]}

    def eager(self, msg: dict) -> dict:
        """The eager measure (``timer.eager``: back-to-back calls, host cost included) of ``key``, the
        kernel launched as the run-time dispatch launches it (``family.bound_launch``); ``timing`` None
        where the timer has no eager measure."""
        from ..kernels.base import Config

        key = msg["key"]
        eager = getattr(self.timer, "eager", None)
        if eager is None:
            return {"ok": True, "timing": None}
        fam, problem, inputs = self.family, self.problem, self.inputs
        if key == "aten":
            fn = lambda: fam.reference(problem, inputs)  # noqa: E731
        else:
            fn = fam.bound_launch(Config.from_json(key), problem, inputs)
        t = eager(fn, key=key)
        return {"ok": True, "timing": None if t is None else [t.median_ms, t.p20_ms, t.p80_ms, t.min_ms, t.n]}

    def clear(self, msg: dict) -> dict:
        """Drop the problem's tensors (and the L2 flush buffer) while the worker waits for the next one."""
        import gc

        import torch

        from . import timing

        self.family = self.problem = self.inputs = self.timer = None
        self.checks = {}
        timing._flush_buffers.clear()
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        return {"ok": True}

    def check(self, msg: dict) -> dict:
        from ..kernels.base import relative_error

        seed = int(msg["seed"])
        if seed not in self.checks:
            inputs = self.family.make_inputs(self.problem, self.device, seed=seed)
            self.checks = {seed: (inputs, self.family.reference(self.problem, inputs))}
        inputs, ref = self.checks[seed]
        ours = self._call(msg["key"], inputs)()
        return {"ok": True, "error": relative_error(ours, ref)}


def _context_poisoned(device: Any) -> bool:
    """Whether a CUDA error left this process's context unusable (it must then exit)."""
    import torch

    if torch.device(device).type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
    except Exception:  # any CUDA error here means the context is gone
        return True
    return False


def serve(conn: Any) -> None:
    """The worker's loop: answer setup/time/eager/check requests until "exit" or the pipe closes."""
    from ..kernels.base import candidate_failures

    failures = candidate_failures()
    server = _Server()
    handlers = {"setup": server.setup, "time": server.time, "eager": server.eager, "check": server.check,
                "clear": server.clear, "ping": lambda msg: {"ok": True}}
    while True:
        try:
            msg = _recv(conn)
        except (EOFError, OSError):
            return
        cmd = msg.get("cmd")
        if cmd == "exit":
            return
        try:
            reply = handlers[cmd](msg)
        except Exception as e:  # reported to the caller; the worker goes on unless its context is gone
            reply = {"ok": False, "candidate": isinstance(e, failures) and cmd != "setup",
                     "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=8)[-2000:]}
            if server.device is not None and _context_poisoned(server.device):
                reply["restart"] = True
                _send(conn, reply)
                return
        _send(conn, reply)


def _child_main(read_fd: int, write_fd: int) -> None:
    """The worker process's entry point: serve requests arriving on ``read_fd``, answer on ``write_fd``."""
    from multiprocessing.connection import Connection

    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    serve(_Duplex(inbox, outbox))


class _Duplex:
    """Two one-way connections used as one."""

    def __init__(self, inbox: Any, outbox: Any) -> None:
        self.inbox, self.outbox = inbox, outbox

    def recv_bytes(self) -> bytes:
        return self.inbox.recv_bytes()

    def send_bytes(self, data: bytes) -> None:
        self.outbox.send_bytes(data)

    def poll(self, timeout: float) -> bool:
        return self.inbox.poll(timeout)

    def close(self) -> None:
        self.inbox.close()
        self.outbox.close()


_CHILD = "import sys; from torchtune_ops.tuning.worker import _child_main; _child_main(int(sys.argv[1]), int(sys.argv[2]))"


# ---------------------------------------------------------------------------------------------------------
# The caller's side.

class _Worker:
    """One worker process and our end of its pipe."""

    def __init__(self, device: str) -> None:
        import os
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        self.device = device
        self.owner = os.getpid()  # a forked child must never talk to its parent's worker
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        # the caller's import path (e.g. a test directory defining a family), ahead of the child's own
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).strip(
            os.pathsep)
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(to_child_r), str(from_child_w)],
                                         pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        except BaseException:
            for fd in (to_child_w, from_child_r):
                os.close(fd)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.conn = _Duplex(Connection(from_child_r, writable=False), Connection(to_child_w, readable=False))

    def request(self, msg: dict, timeout_s: float) -> dict:
        """Send ``msg`` and wait for the answer. Raises ``_Dead`` when the worker died or timed out."""
        try:
            _send(self.conn, msg)
            deadline = time.monotonic() + timeout_s
            while not self.conn.poll(0.05):
                if not self.alive() and not self.conn.poll(0):
                    raise _Dead(f"the worker process died (exit code {self.proc.returncode})")
                if time.monotonic() >= deadline:
                    raise _Dead(f"no answer within {timeout_s:g} s", timeout=True)
            return _recv(self.conn)
        except (EOFError, OSError, ValueError) as e:  # broken pipe, truncated or malformed message
            raise _Dead(f"the worker process died ({type(e).__name__})") from None
        except BaseException:  # Ctrl-C while it works: its late answer must never be read as another's
            self.kill()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        import subprocess

        if self.alive():
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            self.conn.close()

    def stop(self) -> None:
        import subprocess

        with contextlib.suppress(OSError, ValueError):
            _send(self.conn, {"cmd": "exit"})
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        self.kill()


class _Dead(Exception):
    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


_idle: dict[str, _Worker] = {}
_idle_lock = threading.Lock()
#: why workers cannot be started in this process (e.g. ``sys.executable`` is not Python); set by the first
#: failed start so that later problems fail at once instead of waiting ``start_timeout_s`` each
_broken: str | None = None


def _take(device: str) -> _Worker | None:
    import os

    with _idle_lock:
        w = _idle.get(device)
        if w is None or w.owner != os.getpid():  # none, or our parent's (we were forked): leave it alone
            return None
        del _idle[device]
    return w if w.alive() else None


def _give_back(w: _Worker) -> None:
    try:  # an idle worker keeps its CUDA context, not the last problem's tensors
        if not w.request({"cmd": "clear"}, 30.0).get("ok"):
            raise _Dead("could not clear")
    except _Dead:
        w.kill()
        return
    with _idle_lock:
        old = _idle.get(w.device)
        if old is None:
            _idle[w.device] = w
            return
    w.stop()


def shutdown() -> None:
    """Stop every idle worker of this process (also done at exit; a forked child leaves its parent's)."""
    import os

    with _idle_lock:
        workers = [w for w in _idle.values() if w.owner == os.getpid()]
        _idle.clear()
    for w in workers:
        w.stop()


import atexit  # noqa: E402

atexit.register(shutdown)


class WorkerTimer:
    """A tuner timer that measures each candidate in a worker process (see the module docstring).

    Args:
        family: the kernel family; the worker finds it through ``family_ref`` (registry name or an
            importable ``module:attr``); ValueError when it has none.
        problem: the family's problem (sent as ``family.problem_to_dict(problem)``).
        device: where the kernels run (the worker uses the same device).
        seed: seed of the timing inputs made in the worker (default 0).
        timeout_s: seconds one measurement or check of a configuration may take, compiling included,
            before the worker is killed and the candidate scored as failed (default ``DEFAULT_TIMEOUT_S``,
            30 s).
        start_timeout_s: seconds a new worker may take to start and make the inputs, and one measurement
            of PyTorch's kernel may take (default 180 s).
        warmup_ms, rep_ms, min_reps: the worker's ``timing.make_timer`` budgets (None: its defaults).

    ``restarts`` counts workers replaced after a crash or a timeout; ``failures`` maps configuration
    JSON to why it failed. Use as a context manager, or call ``close()`` (the worker then serves the next
    problem of this process).
    """

    def __init__(self, family: Any, problem: Any, *, device: Any, seed: int = 0,
                 timeout_s: float = DEFAULT_TIMEOUT_S, start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                 warmup_ms: float | None = None, rep_ms: float | None = None,
                 min_reps: int | None = None) -> None:
        import torch

        ref = family_ref(family)
        if ref is None:
            raise ValueError(f"kernel family {family.name!r} cannot be found by a worker process (define it "
                             "at module level in an importable module)")
        self.family = family
        self.device = str(torch.device(device))
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self._setup = {"cmd": "setup", "family": ref, "problem": family.problem_to_dict(problem),
                       "device": self.device, "seed": seed,
                       "timer": {"warmup_ms": warmup_ms, "rep_ms": rep_ms, "min_reps": min_reps},
                       "matmul_precision": torch.get_float32_matmul_precision(),
                       "deterministic": torch.are_deterministic_algorithms_enabled()}
        self._worker: _Worker | None = None
        self.restarts = 0
        self.failures: dict[str, str] = {}

    # -- the worker

    def _ready(self) -> _Worker:
        import os

        global _broken
        w = self._worker
        if w is not None and w.alive() and w.owner == os.getpid():
            return w
        w = _take(self.device)
        fresh = w is None
        if fresh:
            if _broken is not None:
                raise WorkerError(f"benchmark workers cannot be started in this process: {_broken}")
            try:
                w = _Worker(self.device)
            except OSError as e:
                _broken = f"{type(e).__name__}: {e}"
                raise WorkerError(f"the benchmark worker could not start: {e}") from None
        try:
            reply = w.request(self._setup, self.start_timeout_s)
        except _Dead as e:
            w.kill()
            if fresh and not e.timeout:  # a new worker died before answering: it cannot run here
                _broken = str(e)
            raise WorkerError(f"the benchmark worker could not start: {e}") from None
        if not reply.get("ok"):
            w.stop()
            raise WorkerError(f"the benchmark worker could not set up the problem: {reply.get('error')}\n"
                              f"{reply.get('trace', '')}")
        self._worker = w
        return w

    def _ask(self, msg: dict, key: str) -> dict:
        w = self._ready()
        try:  # PyTorch's own kernel gets the long timeout: only candidates are suspected of hanging
            reply = w.request(msg, self.start_timeout_s if key == "aten" else self.timeout_s)
        except _Dead as e:
            w.kill()
            self._worker = None
            self.restarts += 1
            what = "hung" if e.timeout else "crashed"
            self.failures[key] = f"{what}: {e}"
            log.warning("torchtune_ops: %s %s %s in the benchmark worker (%s); scored as failed, worker "
                        "replaced", self.family.name, "aten" if key == "aten" else f"configuration {key}",
                        what, e)
            raise KernelFailure(f"{key} {what} in the benchmark worker: {e}") from None
        if reply.get("restart"):
            w.kill()
            self._worker = None
            self.restarts += 1
        if reply.get("ok"):
            return reply
        self.failures[key] = str(reply.get("error"))
        if reply.get("candidate"):
            raise KernelFailure(f"{key} failed in the benchmark worker: {reply.get('error')}")
        raise WorkerError(f"{key}: {reply.get('error')}\n{reply.get('trace', '')}")

    # -- the timer interface

    def __call__(self, fn: Any, *, key: str) -> Timing:
        """Time ``key`` ("aten" or a configuration's JSON) in the worker; ``fn`` is ignored (the worker
        rebuilds the launch from the key). Raises KernelFailure when the candidate failed, crashed its
        worker or hung."""
        med, p20, p80, mn, n = self._ask({"cmd": "time", "key": key}, key)["timing"]
        return Timing(median_ms=float(med), p20_ms=float(p20), p80_ms=float(p80), min_ms=float(mn), n=int(n))

    def eager(self, fn: Any, *, key: str) -> Timing | None:
        """The time of a call of ``key`` as a model run eagerly pays it (back-to-back calls, host cost
        included: ``timing.benchmark_eager`` in the worker, the kernel bound as the run-time dispatch binds
        it); ``fn`` is ignored. None where the worker's timer has no eager measure. Raises KernelFailure as
        ``__call__`` does."""
        got = self._ask({"cmd": "eager", "key": key}, key)["timing"]
        if got is None:
            return None
        med, p20, p80, mn, n = got
        return Timing(median_ms=float(med), p20_ms=float(p20), p80_ms=float(p80), min_ms=float(mn), n=int(n))

    def relative_error(self, key: str, *, seed: int) -> float:
        """||ours - PyTorch|| / ||PyTorch|| of configuration ``key`` on fresh inputs made with ``seed``,
        computed in the worker. Raises KernelFailure as ``__call__`` does."""
        err = self._ask({"cmd": "check", "key": key, "seed": seed}, key)["error"]
        return float(err) if err is not None else math.inf

    def close(self) -> None:
        """Hand the worker back for the next problem of this process (or stop it if one is idle)."""
        w, self._worker = self._worker, None
        if w is not None and w.alive():
            _give_back(w)

    def __enter__(self) -> "WorkerTimer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
