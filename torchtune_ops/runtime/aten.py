"""PyTorch's own kernels for each op, with the same call signature as a choice's function."""
from __future__ import annotations

from typing import Callable

import torch


def activation_ref(x: torch.Tensor, activation: str) -> torch.Tensor:
    """PyTorch's own activation ("none", "relu", "gelu_tanh" or "silu") applied to ``x``."""
    if activation == "relu":
        return torch.relu(x)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if activation == "silu":
        return torch.nn.functional.silu(x)
    if activation == "none":
        return x
    raise ValueError(f"unknown activation {activation!r}; expected none, relu, gelu_tanh or silu")


def _aten_mm_act(a, b, bias, activation):
    return activation_ref(torch.mm(a, b) if bias is None else torch.addmm(bias, a, b), activation)


def _aten_addmm(bias, a, b, beta, alpha):
    return torch.addmm(bias, a, b, beta=beta, alpha=alpha)


def _aten_baddbmm(bias, a, b, beta, alpha):
    return torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)


ATEN: dict[str, Callable] = {
    "mm": torch.mm,
    "bmm": torch.bmm,
    "addmm": _aten_addmm,
    "baddbmm": _aten_baddbmm,
    "mm_act": _aten_mm_act,
    "conv2d": torch.conv2d,
}


