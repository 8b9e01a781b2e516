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


def _addmm_plain(bias, a, b, beta, alpha):
    return torch.addmm(bias, a, b)


def _baddbmm_plain(bias, a, b, beta, alpha):
    return torch.baddbmm(bias, a, b)


def _gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    return torch._C._nn.gelu_(x, approximate="tanh")


#: each activation applied in place (None: "none"), for outputs the caller has just allocated
ACT_INPLACE: dict[str, Callable | None] = {"none": None, "relu": torch.relu_, "silu": torch._C._nn.silu_,
                                          "gelu_tanh": _gelu_tanh_}


def aten_for(op: str, args: tuple) -> Callable:
    """PyTorch's kernel for ``op`` called as a choice calls it, specialised to what the key fixes (alpha =
    beta = 1 without keywords, the activation picked once and applied in place on the matmul's fresh
    output): the same results as ``ATEN[op]``, less Python per call."""
    if op in ("addmm", "baddbmm") and args[3] == 1 and args[4] == 1:
        return _addmm_plain if op == "addmm" else _baddbmm_plain
    if op == "mm_act":
        act = ACT_INPLACE.get(args[3], False)
        if act is False:
            return ATEN[op]
        if args[2] is None:
            return (lambda a, b, bias, activation: torch.mm(a, b)) if act is None else (
                lambda a, b, bias, activation: act(torch.mm(a, b)))
        return (lambda a, b, bias, activation: torch.addmm(bias, a, b)) if act is None else (
            lambda a, b, bias, activation: act(torch.addmm(bias, a, b)))
    return ATEN[op]
