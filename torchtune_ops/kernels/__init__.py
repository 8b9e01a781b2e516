"""Triton kernel families (GEMM, 2-D convolution) and their configuration spaces.

Kernels know nothing of the search or the cache: each family exposes its space, a validity check and a
launch function (see ``base.KernelFamily``).
"""
from .base import Config, DeviceLimits, KernelFamily, candidate_failures, device_limits


def families() -> dict[str, KernelFamily]:
    """Every registered kernel family by name (the registry, and so the Triton kernels, load on first call)."""
    from .registry import families as registered

    return registered()


__all__ = ["Config", "DeviceLimits", "KernelFamily", "device_limits", "families", "candidate_failures"]
