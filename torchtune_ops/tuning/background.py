"""Background tuning for serving (``TORCHTUNE_OPS_AUTOTUNE=background``).

An unseen problem is served by PyTorch's kernel at once; the dispatcher submits it here and a daemon
thread tunes the submitted problems one at a time, oldest first. When a problem's winner is stored, the
dispatcher's ``on_done`` callback swaps it into its in-memory choices, so later calls run it. No request
ever waits for tuning.

The process has a tuning budget (``TORCHTUNE_OPS_BACKGROUND_BUDGET`` seconds, default 600): each problem
gets at most the time left (and at most ``TORCHTUNE_OPS_TIME_BUDGET``); once less than ``MIN_JOB_S`` is left
(a search cut that short would store a poor answer for good) the worker stops, drops what is still queued
(logged once) and accepts nothing more, so a long-running server's tuning cost is bounded. Problems not tuned stay on PyTorch's kernel; a later process (or
``torchtune-ops tune`` offline) can tune them.

On a GPU the tuning runs on a side CUDA stream of its own, so its kernels do not queue behind (or in
front of) the serving stream's work; it still shares the GPU, so measured times can be noisier than in
offline tuning (the tuner re-times its finalists and requires a margin over aten). Do not capture CUDA
graphs while the worker is tuning (warm up first, or use ``torchtune_ops.tuning.background.join()``).

The worker knows nothing of the dispatcher's internals: it receives a ``tune`` callable and an
``on_done`` callback (see ``worker``). Fork-safe: a child process gets a fresh worker on first use.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable, Hashable

from .. import settings

log = logging.getLogger("torchtune_ops")

#: the least time left in the budget for which a problem is still started (seconds; or its time budget
#: if smaller): a search cut shorter than that would store a poor answer that later processes would reuse
MIN_JOB_S = 1.0

#: tune(family, problem, device, settings_with_per_problem_budget) -> entry or None
TuneFn = Callable[[Any, Any, Any, "settings.Settings"], Any]
#: on_done(family, problem_key, entry): swap the winner into the dispatcher's memory
DoneFn = Callable[[Any, Hashable, Any], None]


@dataclasses.dataclass
class _Job:
    family: Any
    problem: Any
    key: Hashable
    device: Any
    settings: Any


class BackgroundTuner:
    """One daemon thread tuning submitted problems one at a time within a per-process budget.

    Args:
        tune: ``tune(family, problem, device, s)`` tunes one problem and returns its entry (or None when
            it failed); ``s`` is the settings of the submission with ``time_budget`` lowered to the time
            left in the budget.
        on_done: ``on_done(family, key, entry)`` is called with every entry ``tune`` returns.
        budget_s: seconds of tuning this worker may spend in all; None (default): the submitting
            settings' ``background_budget`` (``TORCHTUNE_OPS_BACKGROUND_BUDGET``) at the first submission.
        clock: the clock the budget is measured with (default ``time.monotonic``; tests pass a fake).
    """

    def __init__(self, *, tune: TuneFn, on_done: DoneFn, budget_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._tune = tune
        self._on_done = on_done
        self.budget_s = budget_s
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()
        self._seen: set[Hashable] = set()
        self._busy = False
        self._stopped = False
        self.spent_s = 0.0
        self.counts = {"submitted": 0, "tuned": 0, "failed": 0, "dropped": 0}
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public
    @property
    def exhausted(self) -> bool:
        """True once the budget is spent: nothing more is tuned."""
        return self.budget_s is not None and self.spent_s >= self.budget_s

    @property
    def remaining_s(self) -> float:
        return float("inf") if self.budget_s is None else max(0.0, self.budget_s - self.spent_s)

    def submit(self, family: Any, problem: Any, key: Hashable, device: Any, s: Any = None) -> bool:
        """Queue a problem for tuning; returns at once.

        Args:
            family: the kernel family.
            problem: the family's problem object.
            key: a hashable identity of the problem (the dispatcher's problem key); a key already
                submitted is ignored.
            device: where to tune.
            s: the settings in force for this problem; None (default): ``settings.current()``.

        Returns:
            True when queued; False when already submitted, the budget is spent or the worker stopped.
        """
        s = s if s is not None else settings.current()
        full_key = (getattr(family, "name", family), key, str(device))
        with self._cond:
            if self.budget_s is None:
                self.budget_s = float(s.background_budget)
            if self._stopped or self.exhausted or full_key in self._seen:
                return False
            self._seen.add(full_key)
            self._queue.append(_Job(family, problem, key, device, s))
            self.counts["submitted"] += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="torchtune_ops-background-tuner",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return True

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the queue is empty and nothing is being tuned; False if ``timeout`` ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self) -> None:
        """Stop tuning: drop what is queued (the problem being tuned finishes)."""
        with self._cond:
            self._stopped = True
            self.counts["dropped"] += len(self._queue)
            self._queue.clear()
            self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        """Counts (submitted, tuned, failed, dropped), queued, seconds spent and the budget."""
        with self._cond:
            return {**self.counts, "queued": len(self._queue), "busy": self._busy,
                    "spent_s": round(self.spent_s, 3), "budget_s": self.budget_s,
                    "exhausted": self.exhausted}

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped and not self._queue:
                    return
                # a problem tuned in a sliver of time would store a poor answer for good: stop instead
                if self.remaining_s < min(float(self._queue[0].settings.time_budget), MIN_JOB_S):
                    self._give_up()
                    continue
                job = self._queue.popleft()
                self._busy = True
                left = self.remaining_s
            try:
                self._one(job, left)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _give_up(self) -> None:
        # called with the lock held
        n = len(self._queue)
        self.counts["dropped"] += n
        self._queue.clear()
        self._stopped = True
        log.warning("torchtune_ops: background tuning budget of %.0f s spent; %d queued problem(s) stay on "
                    "PyTorch's kernel (raise TORCHTUNE_OPS_BACKGROUND_BUDGET or tune offline)",
                    self.budget_s, n)
        self._cond.notify_all()

    def _one(self, job: _Job, left: float) -> None:
        s = job.settings
        per_problem = min(float(s.time_budget), left)
        s = dataclasses.replace(s, time_budget=per_problem) if dataclasses.is_dataclass(s) else s
        t0 = self._clock()
        entry = None
        try:
            with _side_stream(job.device):
                entry = self._tune(job.family, job.problem, job.device, s)
        except Exception as e:  # a failed tuning must never take the server down
            log.warning("torchtune_ops: background tuning of %s failed: %s: %s",
                        getattr(job.family, "name", job.family), type(e).__name__, e)
        finally:
            with self._cond:
                self.spent_s += max(0.0, self._clock() - t0)
                self.counts["tuned" if entry is not None else "failed"] += 1
        if entry is not None:
            try:
                self._on_done(job.family, job.key, entry)
            except Exception as e:
                log.warning("torchtune_ops: could not swap in a background result: %s: %s", type(e).__name__, e)


class _side_stream:
    """On a CUDA device, run the block on a stream of its own (the serving stream is left alone)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.ctx = None

    def __enter__(self):
        try:
            import torch

            dev = torch.device(self.device)
            if dev.type == "cuda":
                self.ctx = torch.cuda.stream(torch.cuda.Stream(dev))
                self.ctx.__enter__()
        except (ImportError, RuntimeError, TypeError, ValueError):
            self.ctx = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


_worker: list[BackgroundTuner] = []
_pid = [os.getpid()]
_lock = threading.Lock()


def worker(*, tune: TuneFn, on_done: DoneFn) -> BackgroundTuner:
    """The process's background tuner, created on first use (and afresh in a forked child, whose parent's
    thread did not survive the fork). ``tune`` and ``on_done`` are used when it is created (see
    ``BackgroundTuner``)."""
    with _lock:
        if _worker and _pid[0] == os.getpid():
            return _worker[0]
        _worker.clear()
        _pid[0] = os.getpid()
        w = BackgroundTuner(tune=tune, on_done=on_done)
        _worker.append(w)
        return w


def current() -> BackgroundTuner | None:
    """The process's background tuner if one was created (in this process), else None."""
    with _lock:
        return _worker[0] if _worker and _pid[0] == os.getpid() else None


def join(timeout: float | None = None) -> bool:
    """Wait until the background tuner (if any) has nothing queued or running; False on timeout."""
    w = current()
    return True if w is None else w.join(timeout)


def reset() -> None:
    """Stop and forget the process's background tuner (tests; the next submission starts a new one)."""
    with _lock:
        w = _worker[0] if _worker else None
        _worker.clear()
    if w is not None:
        w.stop()
