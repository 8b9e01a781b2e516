"""Triton device functions shared by the kernel families: tile order, the fused activation and the MMA step."""
from __future__ import annotations

import triton
import triton.language as tl

#: fused activations and their constexpr codes (the same in every family)
ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu_tanh": 2, "silu": 3}


@triton.jit
def tile_order(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M tile rows are walked column by column, so their B tiles stay in L2."""
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    return pid_m, pid_n


@triton.jit
def activate(acc, ACT: tl.constexpr):
    """Apply the activation with code ACT (see ACTIVATION_CODES) to a float32 block."""
    if ACT == 1:  # relu; NaN stays NaN like torch.relu
        acc = tl.where(acc < 0.0, 0.0, acc)
    elif ACT == 2:  # gelu, tanh approximation: 0.5 x (1 + tanh(z)) == x * sigmoid(2 z)
        # x * (1 / (1 + exp(-2z))): where exp overflows the factor is 0, so -inf gives NaN like torch
        z2 = 1.5957691216057308 * (acc + 0.044715 * acc * acc * acc)
        acc = acc * (1.0 / (1.0 + tl.exp(-z2)))
    elif ACT == 3:  # silu: x * sigmoid(x), NaN at -inf like torch
        acc = acc * (1.0 / (1.0 + tl.exp(-acc)))
    return acc


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b``; with UPCAST the operands go to float32 first (the interpreter multiplies bf16
    operands as raw bits)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)
