"""The tuning history as Optuna studies, for optuna-dashboard (``torchtune-ops dashboard``).

Each tuned problem of the local store (every run's measurements, ``store.Store.trials``) becomes one study,
named after the problem and the device, in an Optuna storage: a journal file (default) or SQLite. A
measurement is a COMPLETE trial whose value is its time in ms, a failed one a FAIL trial; the parameters
are the configuration's, as categorical distributions of the values measured. optuna-dashboard then
serves the storage on 127.0.0.1.

    from torchtune_ops.storage import dashboard
    studies = dashboard.export(store, "tuning-history.log")     # [(study name, trials), ...]
    dashboard.serve("tuning-history.log", port=8080)              # blocks; needs optuna-dashboard

Needs the ``dashboard`` extra to serve: ``pip install 'torchtune-ops[dashboard]'``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from typing import Any, Iterable, NamedTuple

from ..errors import TorchTuneOpsError
from .store import Store, Trial

INSTALL = "pip install 'torchtune-ops[dashboard]'"


class DashboardError(TorchTuneOpsError):
    """optuna-dashboard is missing, or the storage cannot be written."""


class ExportedStudy(NamedTuple):
    """One problem's study: its name, how many trials it holds and how many of them failed."""

    name: str
    trials: int
    failed: int


def study_name(fingerprint: str, family: str, problem: str) -> str:
    """``"<family> <problem> on <GPU> [<id>]"``: the problem described as ``cache list`` does, the device's
    name from its fingerprint, and a short id of the whole key (two fingerprints of one GPU model differ in
    their software versions)."""
    from ..kernels.describe import describe_problem

    try:
        desc = describe_problem(family, json.loads(problem))
    except (ValueError, TypeError):
        desc = problem
    gpu = fingerprint.split("|", 1)[0] or fingerprint
    ident = hashlib.sha1(f"{fingerprint}\0{family}\0{problem}".encode()).hexdigest()[:6]
    name = f"{family}: {desc} on {gpu} [{ident}]"
    return name if len(name) <= 500 else name[:480] + f"... [{ident}]"  # RDB storages keep 512 characters


def open_storage(target: str) -> Any:
    """An Optuna storage for ``target``: a database URL (``sqlite:///...``, ``postgresql://...``) as is, a
    path ending in .db/.sqlite/.sqlite3 as SQLite, any other path as a journal file."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if "://" in target:
        return optuna.storages.RDBStorage(target)
    if target.endswith((".db", ".sqlite", ".sqlite3")):
        return optuna.storages.RDBStorage(f"sqlite:///{os.path.abspath(target)}")
    return JournalStorage(JournalFileBackend(target))


def _distributions(configs: list[dict]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution

    values: dict[str, set] = {}
    for cfg in configs:
        for k, v in cfg.items():
            values.setdefault(k, set()).add(v)

    def order(v: Any) -> tuple:  # numbers first, ascending; then the rest by their text
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        return (0, v, "") if number else (1, 0, repr(v))

    return {k: CategoricalDistribution(sorted(vs, key=order)) for k, vs in values.items()}


def export(store: Store, target: str | Any, *, fingerprint: str | None = None,
           family: str | None = None) -> list[ExportedStudy]:
    """Write each tuned problem's measurements from ``store`` into an Optuna storage, one study per problem.

    A study of the same name already in the storage is replaced, so exporting again refreshes it.

    Args:
        store: the local store (``store.Store``) holding the trial history.
        target: the storage: an Optuna storage object, a database URL, or a path (``open_storage``).
        fingerprint: only this device fingerprint key; None (default): every device.
        family: only this kernel family; None (default): every family.

    Returns:
        One ``ExportedStudy`` per problem, in the store's key order.
    """
    import optuna
    from optuna.trial import TrialState, create_trial

    storage = open_storage(target) if isinstance(target, (str, os.PathLike)) else target
    by_problem: dict[tuple[str, str, str], list[Trial]] = {}
    for t in store.trials(fingerprint, family):
        by_problem.setdefault((t.fingerprint, t.family, t.problem), []).append(t)
    entries = {e.key: e for e in store.entries(fingerprint, family=family)}
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    out = []
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        for key, trials in by_problem.items():
            name = study_name(*key)
            if name in existing:
                optuna.delete_study(study_name=name, storage=storage)
            study = optuna.create_study(storage=storage, study_name=name, direction="minimize")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(["time_ms"])
            study.set_user_attr("fingerprint", key[0])
            study.set_user_attr("family", key[1])
            study.set_user_attr("problem", key[2])
            entry = entries.get(key)
            if entry is not None:
                study.set_user_attr("winner", entry.winner)
                study.set_user_attr("time_ms", entry.time_ms)
                study.set_user_attr("aten_ms", entry.aten_ms)
            configs = [c if isinstance(c, dict) else {"config": str(c)}  # e.g. "aten"
                       for c in (t.config_dict() for t in trials)]
            dists = _distributions(configs)
            runs = {r: i for i, r in enumerate(dict.fromkeys(t.run for t in trials))}
            study.add_trials([
                create_trial(params=cfg, distributions={k: dists[k] for k in cfg},
                             user_attrs={"run": runs[t.run], "ordinal": t.ordinal},
                             **({"value": t.value_ms} if math.isfinite(t.value_ms) else {"state": TrialState.FAIL}))
                for t, cfg in zip(trials, configs)])
            out.append(ExportedStudy(name, len(trials), sum(not math.isfinite(t.value_ms) for t in trials)))
    finally:
        optuna.logging.set_verbosity(before)
    return out


def serve(target: str | Any, *, port: int = 8080, host: str = "127.0.0.1") -> None:
    """Serve optuna-dashboard for the storage ``target`` (as ``export`` takes it) until interrupted.

    Args:
        target: the storage.
        port: the TCP port. Default 8080.
        host: the address to listen on. Default 127.0.0.1 (this machine only).

    Raises:
        DashboardError: optuna-dashboard is not installed (the message says how to install it).
    """
    try:
        import optuna_dashboard
    except ImportError:
        raise DashboardError(f"serving the dashboard needs optuna-dashboard: {INSTALL} "
                             "(or export only, with --no-serve)") from None
    storage = open_storage(target) if isinstance(target, (str, os.PathLike)) else target
    optuna_dashboard.run_server(storage, host=host, port=port)


def summary(studies: Iterable[ExportedStudy]) -> str:
    """One line per study: trials, failures, name."""
    return "\n".join(f"{s.trials:6d} trials ({s.failed} failed)  {s.name}" for s in studies)
