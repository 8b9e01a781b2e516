"""Triton kernel families (GEMM, 2-D convolution) and their configuration spaces.

Kernels know nothing of the search or the cache: each family exposes its space, a validity check and a
launch function (see ``base.KernelFamily``).
"""
from .base import Config, DeviceLimits, KernelFamily, device_limits, families

__all__ = ["Config", "DeviceLimits", "KernelFamily", "device_limits", "families"]
