"""torchtune_ops: transparent auto-tuning of PyTorch matmuls and convolutions with Triton kernels.

    import torchtune_ops
    model = torchtune_ops.optimize(model)          # or torch.compile(model, backend="torchtune_ops")

Tuning is off unless ``TORCHTUNE_OPS_AUTOTUNE=1`` (or ``optimize(model, autotune=True)``). Importing this
package is cheap: Optuna, the kernels and the compile backend load on first use.
"""
from __future__ import annotations

from . import settings
from .errors import (BundleError, CacheError, InvalidConfig, KernelFailure, SettingsError,
                     TorchTuneOpsError, UnsupportedProblem, WrongResult)

from ._version import __version__

__all__ = ["optimize", "explain", "settings", "__version__", "TorchTuneOpsError", "SettingsError",
           "UnsupportedProblem", "InvalidConfig", "KernelFailure", "WrongResult", "CacheError", "BundleError"]


def __getattr__(name: str):
    # Lazy public API: keeps `import torchtune_ops` light.
    if name == "optimize":
        from .api import optimize
        return optimize
    if name == "explain":
        from .api import explain
        return explain
    raise AttributeError(f"module 'torchtune_ops' has no attribute {name!r}")
