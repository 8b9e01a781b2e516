"""Generic search: find a good configuration of a constrained space with few measurements.

    from torchtune_ops.search import Space, tune
    space = Space({"BLOCK_M": [32, 64, 128], "num_warps": [4, 8]}, constraint=lambda cfg: ...)
    result = tune(space, objective, max_trials=50, seed=0)
    result.best_config, result.best_value, result.trials

    study = optuna.create_study(sampler=Sampler(space))   # the same search in any Optuna study

Knows nothing of Triton or torch. numpy only at import; Optuna is imported when ``tune()`` runs (its
trials are an Optuna study's) or ``Sampler`` is first used. See docs/search.md.
"""
from __future__ import annotations

from typing import Any

from ..errors import InvalidConfig
from .engine import Progress, Trial, TuneResult, tune
from .space import Space
from .strategies import RandomStrategy, Strategy, TPEStrategy

__all__ = ["Space", "tune", "TuneResult", "Trial", "Progress", "InvalidConfig", "Strategy", "TPEStrategy",
           "RandomStrategy", "Sampler"]


def __getattr__(name: str) -> Any:
    if name == "Sampler":  # an optuna.samplers.BaseSampler: importing it imports Optuna
        from .sampler import Sampler

        return Sampler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
