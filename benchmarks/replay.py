"""Replay helpers: load a brute-forced tuning space (Kernel Tuner's gzip JSON cache format) and replay it.

Format (see /work/shared/datasets/README.md): top-level ``tune_params_keys`` (parameter order),
``tune_params`` (parameter -> choices) and ``cache``: "v1,v2,...,vn" -> record with ``time`` in ms, or the
string "CompilationFailedConfig"/"RuntimeFailedConfig" for a failed configuration.
Replay rules: a configuration is valid iff it is a key of ``cache``; measuring a valid one costs one
measurement and returns its ``time`` (+inf when failed); proposing an invalid one costs nothing.
The project's own recorded spaces (record_space.py) use the same format.
"""
from __future__ import annotations

import dataclasses
import datetime
import gzip
import json
import math
import os
import statistics
from typing import Any

import numpy as np


@dataclasses.dataclass
class ReplaySpace:
    """A fully measured space. ``times[key(config)]`` is the recorded time (math.inf when it failed)."""

    name: str
    params: dict[str, list]  # parameter -> choices, in tune_params_keys order
    times: dict[str, float]
    device_name: str = ""
    kernel_name: str = ""

    @staticmethod
    def key(config: dict, names: list[str]) -> str:
        return ",".join(str(config[n]) for n in names)

    @property
    def names(self) -> list[str]:
        return list(self.params)

    def configs(self) -> list[dict]:
        """Every valid configuration (a key of the cache), in file order."""
        return [dict(zip(self.names, self._values(k))) for k in self.times]

    def _values(self, key: str) -> list:
        lookup = [{str(v): v for v in c} for c in self.params.values()]
        return [lk[part] for lk, part in zip(lookup, key.split(","))]

    def time_of(self, config: dict) -> float | None:
        """The recorded time of a configuration, None when it is invalid (not in the cache)."""
        return self.times.get(self.key(config, self.names))

    @property
    def optimum(self) -> float:
        return min(t for t in self.times.values() if math.isfinite(t))

    def n_within(self, tolerance: float = 0.05) -> int:
        """How many valid configurations are within ``tolerance`` of the optimum."""
        bound = self.optimum * (1 + tolerance)
        return sum(1 for t in self.times.values() if t <= bound)

    def random_expected_draws(self, tolerance: float = 0.05) -> float:
        """Expected draws of random search without replacement to hit one within tolerance: (N+1)/(k+1)."""
        return (len(self.times) + 1) / (self.n_within(tolerance) + 1)


def json_safe(x: Any) -> Any:
    """JSON-safe copy for results files: NaN and infinities (never reached, failed) become None."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def run_logged(fn, jobs: list, n_jobs: int, log_path: str | None = None) -> list:
    """``fn`` over ``jobs`` in ``n_jobs`` processes, in order; with ``log_path``, each result is appended
    to it as a JSON line as soon as it is done (a stopped run's log keeps what finished)."""
    from concurrent.futures import ProcessPoolExecutor

    done = []
    log = open(log_path, "a") if log_path else None
    try:
        with ProcessPoolExecutor(max(1, n_jobs)) as ex:
            for item in ex.map(fn, jobs):
                done.append(item)
                if log:
                    log.write(json.dumps(json_safe(list(item))) + "\n")
                    log.flush()
    finally:
        if log:
            log.close()
    return done


def write_results(record: dict[str, Any], out_dir: str, name: str) -> str:
    """Write ``record`` (made JSON-safe) to ``out_dir/<name>-<UTC stamp>.json``; print and return the path."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(out_dir, f"{name}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(json_safe(record), f, indent=1)
    print(f"wrote {path}")
    return path


def _time(record: dict[str, Any]) -> float:
    t = record.get("time")
    if isinstance(t, (int, float)) and math.isfinite(t):
        return float(t)
    return math.inf  # "CompilationFailedConfig", "RuntimeFailedConfig" or anything unreadable


def load_space(path: str, *, name: str | None = None) -> ReplaySpace:
    """Load a Kernel Tuner cache file (.json or .json.gz) as a ReplaySpace.

    Args:
        path: the file.
        name: how reports name the space. Default: "<folder>/<file name without .json.gz>".
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    keys = list(data["tune_params_keys"])
    params = {k: list(data["tune_params"][k]) for k in keys}
    times = {k: _time(rec) for k, rec in data["cache"].items()}
    if name is None:
        base = os.path.basename(path)
        for suffix in (".gz", ".json"):
            base = base[:-len(suffix)] if base.endswith(suffix) else base
        name = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{base}"
    return ReplaySpace(name=name, params=params, times=times, device_name=data.get("device_name", ""),
                       kernel_name=data.get("kernel_name", ""))


def trace_metrics(best_so_far: list[float], optimum: float, *, checkpoints=(10, 20, 50, 100, 200),
                  tolerance: float = 0.05) -> dict:
    """Fraction of the optimum (optimum / best found; 0 before any success) at each checkpoint, and the
    number of measurements to first reach within ``tolerance`` (None when never)."""
    fractions = {}
    for c in checkpoints:
        b = best_so_far[min(c, len(best_so_far)) - 1] if best_so_far else math.inf
        fractions[c] = optimum / b if math.isfinite(b) else 0.0
    reach = next((i + 1 for i, b in enumerate(best_so_far) if b <= optimum * (1 + tolerance)), None)
    return {"fraction": fractions, "to_within": reach}


def best_so_far(values: list[float]) -> list[float]:
    return list(np.minimum.accumulate(np.asarray(values, dtype=float))) if values else []


def tpe_knobs(text: str) -> dict[str, Any]:
    """``"gamma=0.25,stall=0"`` as TPEStrategy keyword arguments; ValueError names what is wrong."""
    try:
        knobs = {k.strip(): json.loads(v) for k, v in (kv.split("=", 1) for kv in text.split(",") if kv.strip())}
    except ValueError:
        raise ValueError(f"--tpe takes KEY=NUMBER pairs separated by commas, got {text!r}") from None
    from torchtune_ops.search import TPEStrategy

    try:
        TPEStrategy(**knobs)
    except TypeError as e:
        raise ValueError(f"--tpe: {e}") from None
    return knobs


def list_spaces(datasets: str) -> list[tuple[str, str]]:
    """(path, "<folder>/<name>") of every space file (*.json.gz) one folder below ``datasets``."""
    return [(os.path.join(datasets, d, f), f"{d}/{f[:-len('.json.gz')]}")
            for d in sorted(os.listdir(datasets)) if os.path.isdir(os.path.join(datasets, d))
            for f in sorted(os.listdir(os.path.join(datasets, d))) if f.endswith(".json.gz")]


def worst_decile(values) -> float:
    """Mean of the lowest tenth of ``values`` (at least one): how the unlucky seeds fare."""
    values = sorted(values)
    return statistics.mean(values[:max(1, math.ceil(len(values) / 10))])


def summarize(runs: list[dict], budget: int, checkpoints=(10, 20, 50, 100, 200)) -> dict:
    """Per-seed ``trace_metrics`` results (plus "seconds") of one method on one space, summarised: the mean
    fraction of the optimum at each checkpoint, its standard error, the worst decile of seeds, every seed's
    fraction, and the median measurements to within 5%."""
    reach = sorted(r["to_within"] if r["to_within"] is not None else math.inf for r in runs)
    cps = [c for c in checkpoints if c <= budget]
    per_seed = {c: [r["fraction"][c] for r in runs] for c in cps}
    out = {
        "fraction": {c: statistics.mean(v) for c, v in per_seed.items()},
        # standard error of each mean: seeds differ by far more than the gaps between methods
        "fraction_se": {c: statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else None
                        for c, v in per_seed.items()},
        "worst_decile": {c: worst_decile(v) for c, v in per_seed.items()},
        "per_seed": {c: [round(x, 5) for x in v] for c, v in per_seed.items()},
        "median_to_within": statistics.median(reach) if reach else math.inf,
        "reached": sum(math.isfinite(x) for x in reach),
        "seeds": len(runs),
        "seconds_per_run": statistics.mean(r["seconds"] for r in runs),
    }
    for k in ("invalid_proposals", "repeated_proposals"):
        if k in runs[0]:
            out[k] = statistics.mean(r[k] for r in runs)
    return out
