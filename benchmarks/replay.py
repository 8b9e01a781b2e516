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
import gzip
import json
import math
import os
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
