"""Typed exceptions of torchtune_ops. Callers catch these by type, never by message text."""
from __future__ import annotations


class TorchTuneOpsError(Exception):
    """Base class of every error raised by torchtune_ops."""


class SettingsError(TorchTuneOpsError, ValueError):
    """A setting (environment variable or argument) has a bad value."""


class UnsupportedProblem(TorchTuneOpsError):
    """The kernels do not cover these inputs (dtype, device, layout); PyTorch's kernel is used instead."""


class InvalidConfig(TorchTuneOpsError):
    """A configuration is invalid for a problem or failed to compile/run; it is scored as failed."""


class KernelFailure(TorchTuneOpsError):
    """A kernel raised while running; the caller falls back to PyTorch's kernel."""


class WrongResult(TorchTuneOpsError):
    """A kernel's output differs from PyTorch's beyond tolerance. Never silently accepted."""


class CacheError(TorchTuneOpsError):
    """The on-disk cache cannot be used (corrupt, unwritable); the caller degrades to memory."""


class BundleError(TorchTuneOpsError, ValueError):
    """A bundle file is malformed, hostile, or for an incompatible device."""
