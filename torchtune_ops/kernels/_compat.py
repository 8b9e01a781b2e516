"""Differences between Triton versions and between the GPU and the interpreter, kept in one place.

The code runs on Triton 3.6 (GPU machines) and 3.9 (CPU machines, through the interpreter).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])

# The interpreter is chosen when a kernel is decorated: TRITON_INTERPRET must be set before import.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Tensor descriptors (TMA on Hopper) exist as tl.make_tensor_descriptor from Triton 3.4 on.
HAS_TENSOR_DESCRIPTOR: bool = hasattr(tl, "make_tensor_descriptor")

# The interpreter multiplies bf16 tl.dot operands as raw bits; kernels upcast operands when this is set.
UPCAST_BF16_DOT: bool = INTERPRET
