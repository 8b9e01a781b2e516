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

# Host-made tensor descriptors (kernel arguments; Triton's launcher encodes the TMA descriptor at each
# launch): triton.tools.tensor_descriptor, with the interpreter taking them too (3.6 and 3.9 do).
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: GEMM's HOST_DESC falls back to device-made descriptors
    TensorDescriptor = None
HAS_HOST_TENSOR_DESCRIPTOR: bool = TensorDescriptor is not None and HAS_TENSOR_DESCRIPTOR

# The interpreter multiplies bf16 tl.dot operands as raw bits; kernels upcast operands when this is set.
UPCAST_BF16_DOT: bool = INTERPRET


def _numpy_refuses_sized_scalars() -> bool:
    """NumPy >= 2.4 raises TypeError on int() of an array with ndim > 0 (deprecated since 1.25)."""
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def _fix_interpreter_index() -> None:
    """Triton's interpreter up to 3.6 gives its scalar tensors ``__index__ = int(handle.data)``, and the
    data is a one-element 1-d array, so every runtime loop bound (``range(0, n)``) fails under NumPy
    >= 2.4 (triton-lang/triton#9171; 3.9 squeezes first). Wrap the function that installs the patch
    so that it installs the squeezing one; the same as what 3.9 does, so harmless where already fixed."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_torchtune_ops_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._torchtune_ops_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET and _numpy_refuses_sized_scalars():
    _fix_interpreter_index()


# --- convolution: PyTorch float32 precision for conv (tf32 vs ieee) ---
import contextlib  # noqa: E402
from typing import Iterator  # noqa: E402

import torch as _torch  # noqa: E402


def conv_fp32_precision() -> str:
    """PyTorch's float32 precision for convolutions now: "tf32" or "ieee".

    torch >= 2.9 has ``torch.backends.cudnn.conv.fp32_precision`` ("none" inherits from
    ``torch.backends.cudnn.fp32_precision``, then ``torch.backends.fp32_precision``; all "none" means
    IEEE). Reading the legacy ``torch.backends.cudnn.allow_tf32`` raises there once the new API was used,
    so it is only the fallback for older torch. Called on every conv launch, so the C getters are read
    directly where they exist (about 0.5 us instead of 4 us).
    """
    if _FP32_GETTER is not None:
        for backend, op in (("cuda", "conv"), ("cuda", "all"), ("generic", "all")):
            p = _FP32_GETTER(backend, op)
            if p != "none":
                return "tf32" if p == "tf32" else "ieee"
        return "ieee"
    conv = getattr(_torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        for p in (conv.fp32_precision, getattr(_torch.backends.cudnn, "fp32_precision", "none"),
                  getattr(_torch.backends, "fp32_precision", "none")):
            if p != "none":
                return "tf32" if p == "tf32" else "ieee"
        return "ieee"
    return "tf32" if _torch.backends.cudnn.allow_tf32 else "ieee"


def _fp32_getter():
    g = getattr(_torch._C, "_get_fp32_precision_getter", None)
    try:
        if g is not None and g("cuda", "conv") in ("none", "tf32", "ieee", "bf16") and \
                g("generic", "all") in ("none", "tf32", "ieee", "bf16"):
            return g
    except (TypeError, RuntimeError, ValueError):
        pass
    return None


_FP32_GETTER = _fp32_getter()


@contextlib.contextmanager
def conv_fp32_precision_set(precision: str) -> Iterator[None]:
    """Run a block with PyTorch's convolution float32 precision set to ``precision`` ("tf32"/"ieee")."""
    import torch

    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        old = conv.fp32_precision
        conv.fp32_precision = precision
        try:
            yield
        finally:
            conv.fp32_precision = old
    else:
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = old


def _torch_scratch(size: int, alignment: int, stream) -> "object":
    import torch

    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_tma_allocator() -> None:
    """Device-side tensor descriptors (tl.make_tensor_descriptor) need global scratch memory from the
    allocator set with triton.set_allocator. The allocator lives in a ContextVar (per thread) from
    Triton 3.4 on, in a module global before; set a PyTorch one where none is set. Cheap enough to
    call before every launch that uses descriptors."""
    from triton.runtime import _allocation

    holder = getattr(_allocation, "_allocator", None)
    current = holder.get() if hasattr(holder, "get") else holder
    null = getattr(_allocation, "NullAllocator", None)
    if current is None or (null is not None and isinstance(current, null)):
        triton.set_allocator(_torch_scratch)
