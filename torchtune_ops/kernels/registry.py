"""The kernel families by name. Imported lazily: importing it compiles nothing."""
from __future__ import annotations

from .base import KernelFamily
from .conv import CONV2D
from .gemm import GEMM

FAMILIES: dict[str, KernelFamily] = {f.name: f for f in (GEMM, CONV2D)}


def families() -> dict[str, KernelFamily]:
    """Every registered kernel family by name."""
    return FAMILIES
