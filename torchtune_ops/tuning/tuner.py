"""Tune one problem: PyTorch's kernel against a search over a kernel family, gated by correctness.

    from torchtune_ops.tuning.tuner import tune_problem
    entry = tune_problem(GEMM, problem, device="cuda")     # -> store.Entry; "aten" or a config's JSON

Steps (docs/cache.md has the reasoning):

1. A stored answer for (device fingerprint, family, problem) is returned as is (unless ``force``) when it
   was tuned with at least this budget (``Entry.covers``); one made with fewer trials, or none, is tuned
   again (the faster winner is kept, under the bigger budget).
2. The problem is claimed in the store, so two processes never tune it at once; when another process
   holds the claim, wait up to ``wait_s`` for its result, else return an unstored "aten" entry.
3. PyTorch's kernel ("aten") is timed as a candidate of its own.
4. ``search.tune`` measures Triton configurations: the family's well-known ones first, then the most
   promising valid ones. A configuration that fails to compile, runs out of resources or raises a kernel
   error is scored as failed; the search goes on.
5. The best configurations are checked against PyTorch on fresh random inputs (a wrong result excludes
   the configuration, or raises ``WrongResult`` in strict mode), the top three correct ones and aten are
   timed again, and the fastest Triton configuration wins only when it beats aten by more than the
   measured noise (at least ``MIN_MARGIN``).
6. The entry and every measurement are stored in one transaction; the claim is released, also on
   Ctrl-C, which re-raises and leaves nothing partial behind.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
import threading
import time
import warnings
from typing import Any, Callable, Sequence

from .. import settings
from ..storage.device import Fingerprint, fingerprint as device_fingerprint
from ..errors import InvalidConfig, KernelFailure, UnsupportedProblem, WrongResult
from ..storage.store import Entry, Store, default_store, problem_key
from ..kernels.base import candidate_failures
from .timing import Timer, Timing, make_timer

__all__ = ["tune_problem", "TuneProgress", "MIN_MARGIN", "RETIME_TOP", "free_memory",
           "memory_estimate", "MEMORY_FRACTION", "TuningSkipped"]

log = logging.getLogger("torchtune_ops")

#: a Triton winner must beat aten by at least this fraction (more when the measured noise is larger)
MIN_MARGIN = 0.03
#: how many of the best configurations are timed again before the final choice
RETIME_TOP = 3
#: most configurations checked for correctness before giving up on the family for this problem
MAX_VERIFY = 8
#: a problem is tuned only when its estimated memory is at most this fraction of the free memory
MEMORY_FRACTION = 0.5


class TuningSkipped(RuntimeWarning):
    """A problem was not tuned (too large for the memory left); PyTorch's kernel serves it."""


def free_memory(device: Any) -> int | None:
    """Bytes free for tuning on ``device``: ``torch.cuda.mem_get_info`` on CUDA; on CPU the kernel's
    MemAvailable (Linux ``/proc/meminfo``), else available physical pages; None when unknown (no check).
    Tests monkeypatch this function."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import os

    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def memory_estimate(family: Any, problem: Any) -> int:
    """Bytes tuning ``problem`` needs at most: two sets of inputs (timing and correctness check) and
    three outputs (PyTorch's reference, ours, one in flight) plus a split-K workspace the size of an
    output in float32. A family may define ``memory_bytes(problem)``, used instead; a problem the rule
    does not know gives 0 (no check)."""
    own = getattr(family, "memory_bytes", None)
    if callable(own):
        return int(own(problem))
    p = family.problem_to_dict(problem)
    size = _ITEMSIZE.get(str(p.get("dtype", "float32")), 4)
    try:
        if {"M", "N", "K"} <= p.keys():
            b = int(p.get("batch", 1) or 1)
            m, n, k = int(p["M"]), int(p["N"]), int(p["K"])
            ins, out = b * (m * k + k * n + m * n), b * m * n  # bias counted as large as the output
        elif {"N", "C", "H", "W", "K", "R", "S"} <= p.keys():
            n, c, h, w, kk, r, s_ = (int(p[x]) for x in ("N", "C", "H", "W", "K", "R", "S"))
            g = int(p.get("groups", 1) or 1)
            sh, sw = (tuple(p.get("stride", (1, 1))) + (1, 1))[:2]
            pad = tuple(p.get("padding", (0, 0, 0, 0)))
            ph = int(pad[0]) + int(pad[1]) if len(pad) == 4 else 2 * int(pad[0])
            pw = int(pad[2]) + int(pad[3]) if len(pad) == 4 else 2 * int(pad[-1])
            oh, ow = max(1, (h + ph - r) // int(sh) + 1), max(1, (w + pw - s_) // int(sw) + 1)
            out = n * kk * oh * ow
            ins = n * c * h * w + kk * (c // max(g, 1)) * r * s_ + kk + out
        else:
            return 0
    except (TypeError, ValueError):
        return 0
    return 2 * ins * size + 3 * out * size + out * 4


_skipped: set[tuple[str, str, str]] = set()  # problems already warned about (one warning each)


@dataclasses.dataclass(frozen=True)
class TuneProgress:
    """What a ``progress`` callable receives after each measurement (times in ms; inf: failed)."""

    family: str
    problem: str  # a short description of the problem
    trial: int  # 1-based
    max_trials: int
    config: dict
    value_ms: float
    best_config: dict | None
    best_ms: float
    aten_ms: float

    def line(self) -> str:
        best = f"{self.best_ms:.4g} ms" if math.isfinite(self.best_ms) else "-"
        return (f"[torchtune_ops] {self.family} {self.problem}: trial {self.trial}/{self.max_trials}, "
                f"best {best}, aten {self.aten_ms:.4g} ms")


def _describe(problem_dict: dict[str, Any], width: int = 60) -> str:
    text = ",".join(f"{k}={v}" for k, v in problem_dict.items() if v not in (None, False, "none"))
    text = text.replace(" ", "")
    return text if len(text) <= width else text[: width - 3] + "..."


def _print_line(p: TuneProgress) -> None:
    clear = "\x1b[K" if sys.stderr.isatty() else ""  # erase the rest of a longer previous line
    sys.stderr.write("\r" + p.line() + clear)
    sys.stderr.flush()


def tune_problem(family: Any, problem: Any, *, device: Any, store: Store | None = None,
                 max_trials: int | None = None, time_budget_s: float | None = None,
                 timer: Timer | None = None, seed: int = 0,
                 progress: bool | Callable[[TuneProgress], None] | None = None,
                 prior: Sequence[tuple[dict, float]] | None = None, strict: bool | None = None,
                 patience: int | None = None, force: bool = False, wait_s: float = 5.0,
                 lease_s: float | None = None, fingerprint: Fingerprint | str | None = None,
                 isolate: bool | None = None, model: bool | None = None,
                 search_study: tuple[Any, str] | None = None) -> Entry:
    """Find and store the fastest correct way to run ``problem`` on ``device``.

    Args:
        family: a ``kernels.base.KernelFamily`` (e.g. ``kernels.gemm.GEMM``).
        problem: the family's problem object (e.g. a ``GemmProblem``).
        device: where to tune (a CUDA device; CPU runs the kernels through the Triton interpreter).
        store: where answers live; None (default) is ``store.default_store()``.
        max_trials: most Triton configurations measured; None: ``TORCHTUNE_OPS_MAX_TRIALS`` (40).
        time_budget_s: the search starts no measurement after this many seconds (the final checks add
            a few measurements); None: ``TORCHTUNE_OPS_TIME_BUDGET`` (30 s).
        timer: ``timer(fn, key=...) -> timing.Timing``; None (default): ``timing.make_timer(device)``.
            Tests and replays pass a ``timing.FakeTimer``.
        seed: seed of the search and of the timing inputs; the correctness check uses ``seed + 1``.
        progress: True prints a progress line per trial to stderr; a callable receives a
            ``TuneProgress`` per trial; None/False (default) only logs at DEBUG level.
        prior: (config, ms) pairs from a related problem to warm-start the search (default none).
        strict: raise ``KernelFailure`` for a failing configuration and ``WrongResult`` for a wrong one
            instead of skipping them; None (default): ``TORCHTUNE_OPS_STRICT``.
        patience: stop the search after this many trials without improvement; None (default):
            half of ``max_trials``, at least 10; 0: no early stop.
        force: tune even when the store already has an answer, and replace it (default False). Without
            it, a stored answer tuned with a smaller budget than this one (or without trials) is tuned
            again and the faster of the two kept.
        wait_s: when another process is tuning this problem, how long to wait for its answer before
            returning an unstored aten entry (default 5 s).
        lease_s: how long the claim on the problem lasts without renewal; None (default): twice the
            time budget plus a minute. The claim is renewed while tuning. Threads of this process tuning
            the same problem queue on a lock (for up to ``wait_s``) as other processes do on the claim.
        fingerprint: the device fingerprint to store under; None (default): ``device.fingerprint(device)``.
            A string is used as the fingerprint key as is.
        isolate: measure and check candidates in a worker process (``worker.WorkerTimer``), so a crashing
            or hanging kernel is scored as failed instead of harming this process; only when ``timer``
            is None. None (default): ``TORCHTUNE_OPS_BENCH_SUBPROCESS`` on a CUDA device, off elsewhere.
            A family the worker cannot import is measured in this process (one INFO log line).
        model: use the performance model learned from this device's trial history (perfmodel.py): its
            best predictions and the nearest stored problems' winners are measured first, its predictions
            seed the search (unless ``prior`` is given) and the worst-predicted candidates are pruned when
            it ranks well on held-out problems. None (default): ``TORCHTUNE_OPS_PERFMODEL``.
        search_study: (Optuna storage or URL, study name): run the search's trials in a new study of that
            name there (``search.tune(storage=, study_name=)``; the fleet does, on its database). None
            (default): in memory.

    Returns:
        The ``store.Entry`` now in the store (another process's answer when it stored a faster one first),
        or, when another process holds the claim and has not answered within ``wait_s``, an unstored
        entry with winner "aten", NaN times and ``source="claimed-elsewhere"``; when the problem needs
        more than ``MEMORY_FRACTION`` of ``free_memory(device)`` (``memory_estimate``), an unstored
        "aten" entry with ``source="too-large"`` and one ``TuningSkipped`` warning per problem.

    Raises:
        WrongResult, KernelFailure: in strict mode only.
        KeyboardInterrupt, SystemExit: re-raised after releasing the claim; nothing partial is stored.
        Any other exception from the family (``make_inputs``, ``reference``) propagates, claim released.
    """
    from ..kernels.base import device_limits

    s = settings.current()
    store = store if store is not None else default_store()
    # the same validation as the settings: a bad budget is an error, never a "tuned" entry of 0 trials
    max_trials = s.max_trials if max_trials is None else settings.check("max_trials", max_trials)
    time_budget_s = s.time_budget if time_budget_s is None else settings.check("time_budget", time_budget_s)
    strict = s.strict if strict is None else strict
    patience = max(10, max_trials // 2) if patience is None else patience
    lease_s = 2 * time_budget_s + 60 if lease_s is None else lease_s
    if fingerprint is None:
        fingerprint = device_fingerprint(device)
    fp = fingerprint if isinstance(fingerprint, str) else fingerprint.key
    pdict = family.problem_to_dict(problem)
    key = (fp, family.name, problem_key(pdict))

    if not force:
        done = store.get(*key, refresh=True)
        if done is not None and done.covers(max_trials, time_budget_s):
            return done
    too_large = _too_large(family, problem, device)
    if too_large:
        if key not in _skipped:
            _skipped.add(key)
            warnings.warn(f"torchtune_ops: {family.name} {_describe(pdict)} is not tuned: {too_large}; "
                          "using PyTorch's kernel", TuningSkipped, stacklevel=2)
        return Entry(*key, winner="aten", time_ms=math.nan, aten_ms=math.nan, trials=0, source="too-large")
    local = _local_lock(key)  # the store's claim is per process: threads of this one queue here first
    if not local.acquire(timeout=wait_s):
        return _claimed_elsewhere(store, key, family, pdict)
    try:
        if not _acquire(store, key, lease_s=lease_s, wait_s=wait_s,
                        enough=lambda e: e.covers(max_trials, time_budget_s)):
            return _claimed_elsewhere(store, key, family, pdict)
        return _tune_claimed(store, key, family, problem, pdict, device=device, timer=timer, seed=seed,
                             max_trials=max_trials, time_budget_s=time_budget_s, prior=prior, patience=patience,
                             progress=progress, strict=strict, force=force, lease_s=lease_s, isolate=isolate,
                             model=s.perfmodel if model is None else model, search_study=search_study)
    finally:
        local.release()


_local_locks: dict[tuple[str, str, str], threading.Lock] = {}
_local_locks_guard = threading.Lock()


def _local_lock(key: tuple[str, str, str]) -> threading.Lock:
    with _local_locks_guard:
        lock = _local_locks.get(key)
        if lock is None:
            lock = _local_locks[key] = threading.Lock()
        return lock


def _claimed_elsewhere(store: Store, key: tuple[str, str, str], family: Any, pdict: dict) -> Entry:
    """The answer stored meanwhile, else an unstored aten entry (the caller runs PyTorch's kernel)."""
    done = store.get(*key, refresh=True)
    if done is not None:
        return done
    log.info("%s %s is being tuned by another process; using PyTorch's kernel meanwhile",
             family.name, _describe(pdict))
    return Entry(*key, winner="aten", time_ms=math.nan, aten_ms=math.nan, trials=0,
                 source="claimed-elsewhere")


def _tune_claimed(store: Store, key: tuple[str, str, str], family: Any, problem: Any, pdict: dict, *,
                  device: Any, timer: Timer | None, seed: int, max_trials: int, time_budget_s: float,
                  prior: Any, patience: int, progress: Any, strict: bool, force: bool, lease_s: float,
                  isolate: bool | None, model: bool = False, search_study: tuple[Any, str] | None = None
                  ) -> Entry:
    """Tune a problem whose claim this process holds (released at the end, whatever happens)."""
    from ..kernels.base import device_limits

    try:
        if not force:  # answered while we waited for the claim
            done = store.get(*key, refresh=True)
            if done is not None and done.covers(max_trials, time_budget_s):
                return done
        own_timer = _worker_timer(family, problem, device, seed) if timer is None and _isolated(
            isolate, device) else None
        try:
            run = _Run(family, problem, pdict, device=device, timer=timer or own_timer or make_timer(device),
                       limits=device_limits(device), strict=strict, seed=seed)
            hints = _model_hints(store, key, pdict, run.limits) if model else None
            entry, history = run.tune(key, max_trials=max_trials, time_budget_s=time_budget_s, prior=prior,
                                      patience=patience, progress=progress, hints=hints,
                                      renew=lambda: store.claim(*key, lease_s=lease_s),
                                      renew_every_s=lease_s / 3, search_study=search_study)
        finally:
            if own_timer is not None:
                own_timer.close()
        return store.put(entry, history, policy="replace" if force else "faster")
    finally:
        store.release(*key)


def _model_hints(store: Store, key: tuple[str, str, str], pdict: dict, limits: Any = None) -> Callable | None:
    """``hints(candidates, known) -> perfmodel.Hints`` from the device's trial history and, for GEMM on a GPU,
    the shipped prior (``perfmodel.model_with_prior``; None on failure: a model problem never stops tuning)."""
    from . import perfmodel

    fp, fam, _ = key
    try:
        model = perfmodel.model_with_prior(store, fp, fam, limits=limits)
        neighbours = perfmodel.nearest_winners(store, fp, fam, pdict)
    except Exception as e:  # noqa: BLE001 - a broken history or model must not stop tuning
        log.info("performance model unavailable for %s (%s: %s)", fam, type(e).__name__, e)
        return None
    if model is None and not neighbours:
        return None

    def hints(cands: list[dict], known: list[dict]) -> Any:
        try:
            return perfmodel.search_hints(model, pdict, cands, neighbours=neighbours, known=known)
        except Exception as e:  # noqa: BLE001 - e.g. a model whose features do not fit this problem
            log.info("performance model not used for %s (%s: %s)", fam, type(e).__name__, e)
            return perfmodel.Hints(initial=known, prior=[], candidates=cands, pruned=0)

    return hints


def _isolated(isolate: bool | None, device: Any) -> bool:
    if isolate is not None:
        return bool(isolate)
    import torch

    return settings.current().bench_subprocess and torch.device(device).type == "cuda"


def _worker_timer(family: Any, problem: Any, device: Any, seed: int) -> Any:
    """A ``worker.WorkerTimer`` for the problem, or None when the family cannot be found by a worker."""
    from .worker import WorkerTimer

    try:
        return WorkerTimer(family, problem, device=device, seed=seed)
    except ValueError as e:
        log.info("%s; measuring in this process", e)
        return None


def _too_large(family: Any, problem: Any, device: Any) -> str | None:
    """Why the problem is too large to tune in the memory left, or None."""
    need = memory_estimate(family, problem)
    if need <= 0:
        return None
    free = free_memory(device)
    if free is None or need <= free * MEMORY_FRACTION:
        return None
    return f"it needs about {need / 2**20:.0f} MiB to tune and {free / 2**20:.0f} MiB are free"


def _acquire(store: Store, key: tuple[str, str, str], *, lease_s: float, wait_s: float,
             enough: Callable[[Entry], bool] = lambda e: True) -> bool:
    """Claim the problem; while another process holds it, poll for up to ``wait_s`` seconds for its
    claim to go away (answered, failed or expired). True when this process now holds the claim."""
    deadline = time.monotonic() + wait_s
    while True:
        if store.claim(*key, lease_s=lease_s):
            return True
        done = store.get(*key, refresh=True) if time.monotonic() < deadline else None
        if time.monotonic() >= deadline or (done is not None and enough(done)):
            return False
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


class _Run:
    """The state of one tuning run: inputs, timings and failures by configuration."""

    def __init__(self, family: Any, problem: Any, pdict: dict, *, device: Any, timer: Timer, limits: Any,
                 strict: bool, seed: int) -> None:
        self.family, self.problem, self.device = family, problem, device
        self.desc = _describe(pdict)
        self.name = f"{family.name} {self.desc}"
        self.timer, self.limits, self.strict, self.seed = timer, limits, strict, seed
        self.failures_types = candidate_failures()
        # a worker-process timer measures and checks candidates itself; no candidate runs here
        self.remote = getattr(timer, "relative_error", None)
        self.inputs = None if self.remote else family.make_inputs(problem, device, seed=seed)
        self.timings: dict[str, Timing] = {}
        self.failed: dict[str, str] = {}
        self.wrong: dict[str, float] = {}
        self._check = None  # (inputs, reference) for the correctness gate, made on first use

    # -- measuring

    def time_aten(self) -> Timing:
        return self.timer(lambda: self.family.reference(self.problem, self.inputs), key="aten")

    def time_config(self, cfg_json: str) -> Timing | None:
        """Time one configuration; None when it failed (recorded in ``failed``)."""
        from ..kernels.base import Config

        cfg = Config.from_json(cfg_json)
        try:
            return self.timer(lambda: self.family.launch(cfg, self.problem, self.inputs), key=cfg_json)
        except self.failures_types as e:
            if self.strict:
                raise KernelFailure(f"{self.name}: configuration {cfg} failed: {e!r}") from e
            if not self.failed:
                log.info("%s: configuration %s failed (%s: %s); scored as failed", self.name, cfg,
                         type(e).__name__, e)
            self.failed[cfg_json] = f"{type(e).__name__}: {e}"
            return None

    def objective(self, params: dict) -> float:
        from ..kernels.base import Config

        k = Config.from_dict(params).to_json()
        t = self.time_config(k)
        if t is None:
            return math.inf
        self.timings[k] = t
        return t.median_ms

    # -- correctness

    def correct(self, cfg_json: str) -> bool:
        """Whether the configuration matches PyTorch on fresh inputs (seed + 1) within tolerance."""
        from ..kernels.base import Config, relative_error

        cfg = Config.from_json(cfg_json)
        try:
            if self.remote:
                err = self.remote(cfg_json, seed=self.seed + 1)
            else:
                if self._check is None:
                    inputs = self.family.make_inputs(self.problem, self.device, seed=self.seed + 1)
                    self._check = (inputs, self.family.reference(self.problem, inputs))
                inputs, ref = self._check
                err = relative_error(self.family.launch(cfg, self.problem, inputs), ref)
        except self.failures_types as e:
            if self.strict:
                raise KernelFailure(f"{self.name}: configuration {cfg} failed: {e!r}") from e
            self.failed[cfg_json] = f"{type(e).__name__}: {e}"
            return False
        tol = self.family.tolerance(self.problem)
        if err <= tol:
            return True
        msg = (f"{self.name}: configuration {cfg} gives a wrong result (relative error {err:.3g} > "
               f"tolerance {tol:.3g}); it is excluded")
        if self.strict:
            raise WrongResult(msg)
        log.warning(msg)
        self.wrong[cfg_json] = err
        return False

    # -- the whole run

    def tune(self, key: tuple[str, str, str], *, max_trials: int, time_budget_s: float,
             prior: Sequence[tuple[dict, float]] | None, patience: int,
             progress: bool | Callable[[TuneProgress], None] | None,
             renew: Callable[[], bool], renew_every_s: float,
             hints: Callable | None = None, search_study: tuple[Any, str] | None = None
             ) -> tuple[Entry, list[tuple[str, float]]]:
        from ..kernels.base import Config
        from ..search import Space, tune

        start = time.monotonic()
        family, problem, limits = self.family, self.problem, self.limits
        aten1 = self.time_aten()
        valid = family.valid_configs(problem, limits)
        history: list[tuple[str, float]] = []
        if valid and max_trials > 0:
            show = _print_line if progress is True else (progress or None)
            last_renew = [time.monotonic()]

            def on_trial(p: Any) -> None:
                if time.monotonic() - last_renew[0] > renew_every_s:
                    renew()
                    last_renew[0] = time.monotonic()
                info = TuneProgress(family=family.name, problem=self.desc,
                                    trial=p.number, max_trials=min(max_trials, len(valid)),
                                    config=p.config, value_ms=p.value, best_config=p.best_config,
                                    best_ms=p.best_value, aten_ms=aten1.median_ms)
                log.debug("%s", info.line())
                if show is not None:
                    show(info)

            space = Space({k: list(v) for k, v in family.space(problem).items()},
                          constraint=lambda c: family.check(c, problem, limits) is None)
            known = [c.as_dict() for c in family.known_configs(problem, limits)]
            cands, initial, prior = [c.as_dict() for c in valid], known, list(prior or ())
            if hints is not None:  # the performance model: warm start and pruning (perfmodel.search_hints)
                h = hints(cands, known)
                cands, initial, prior = h.candidates, h.initial, prior or h.prior
                if h.pruned:
                    log.debug("%s: the performance model pruned %d of %d candidates", self.name, h.pruned,
                              len(valid))
            storage, study_name = search_study or (None, None)
            result = tune(space, self.objective, max_trials=max_trials,
                          time_budget_s=max(0.0, time_budget_s - (time.monotonic() - start)),
                          seed=self.seed, initial=initial, prior=prior, patience=patience or None,
                          candidates=cands, callback=on_trial, storage=storage, study_name=study_name)
            if progress is True and result.trials:
                sys.stderr.write("\n")
            history = [(Config.from_dict(c).to_json(), v) for c, v in result.trials]

        winner, win_t, aten_t, host = self._decide([(c, v) for c, v in history if math.isfinite(v)], aten1)
        # wrong configurations are stored as failures: nothing may learn that they are fast
        history = [(c, math.inf if c in self.wrong else v) for c, v in history]
        entry = Entry(*key, winner=winner, time_ms=win_t.median_ms, aten_ms=aten_t.median_ms,
                      trials=len(history), source="tuned", max_trials=max_trials, time_budget_s=time_budget_s,
                      **host)
        log.info("%s: %s (%.4g ms, aten %.4g ms, %d trials, %d failed, %d wrong%s)", self.name,
                 "aten" if winner == "aten" else winner, entry.time_ms, entry.aten_ms, len(history),
                 len(self.failed), len(self.wrong),
                 f"; eagerly {entry.host_ms:.4g} ms vs aten {entry.aten_host_ms:.4g} ms, decided by the "
                 f"{entry.decided}" if entry.decided else "")
        return entry, history

    def _decide(self, measured: list[tuple[str, float]], aten1: Timing) -> tuple[str, Timing, Timing, dict]:
        """Verify the best, re-time the top ones and aten, and pick a winner beyond the noise: on the
        device's time (flushed, as under CUDA graphs), then, where the timer measures it, on the time of a
        call as a model run eagerly pays it (host cost included): a kernel faster on the device but slower
        eagerly loses to aten (decided by the host). The last item holds the host-inclusive times."""
        ranked = [c for c, _ in sorted(measured, key=lambda cv: cv[1])]
        top: list[str] = []
        for c in ranked[:MAX_VERIFY]:
            if self.correct(c):
                top.append(c)
                if len(top) == RETIME_TOP:
                    break
        aten2 = self.time_aten()
        retimed = []
        for c in top:
            t = self.time_config(c)
            if t is not None:
                retimed.append((t.median_ms, c, t))
        if not retimed:
            return "aten", aten2, aten2, {}
        _, best, best_t = min(retimed)
        drift = abs(aten1.median_ms - aten2.median_ms) / aten2.median_ms if aten2.median_ms > 0 else 0.0
        noise = max(MIN_MARGIN, aten2.spread, best_t.spread, drift)
        if not best_t.median_ms < aten2.median_ms * (1 - noise):
            log.debug("%s: best configuration %s (%.4g ms) does not beat aten (%.4g ms) beyond the noise "
                      "(%.1f%%)", self.name, best, best_t.median_ms, aten2.median_ms, noise * 100)
            return "aten", aten2, aten2, {}
        host = self._time_eagerly(best)
        if host is None:
            return best, best_t, aten2, {}
        k, a = host
        noise_eager = max(MIN_MARGIN, k.spread, a.spread)
        info = {"host_ms": k.median_ms, "aten_host_ms": a.median_ms}
        if k.median_ms > a.median_ms * (1 + noise_eager):
            log.info("%s: %s beats aten on the device (%.4g ms vs %.4g ms) but not when called eagerly "
                     "(%.4g ms vs %.4g ms per call): aten", self.name, best, best_t.median_ms, aten2.median_ms,
                     k.median_ms, a.median_ms)
            return "aten", aten2, aten2, dict(info, decided="host")
        return best, best_t, aten2, dict(info, decided="device")

    def _time_eagerly(self, cfg_json: str) -> tuple[Timing, Timing] | None:
        """(kernel, aten) per-call times back to back, host cost included, with the kernel launched as the
        run-time dispatch launches it (bound once, ``family.bound_launch``); None where the timer does not
        measure that or the kernel failed. A worker-process timer measures both in its worker (it rebuilds
        the calls from the keys)."""
        from ..kernels.base import Config

        eager = getattr(self.timer, "eager", None)
        if eager is None:
            return None
        cfg = Config.from_json(cfg_json)
        try:
            if self.remote:
                k, a = eager(None, key=cfg_json), eager(None, key="aten")
            else:
                run = self.family.bound_launch(cfg, self.problem, self.inputs)
                k = eager(run, key=cfg_json)
                a = eager(lambda: self.family.reference(self.problem, self.inputs), key="aten")
        except self.failures_types as e:
            log.info("%s: %s not timed eagerly (%s: %s)", self.name, cfg, type(e).__name__, e)
            return None
        return None if k is None or a is None else (k, a)
