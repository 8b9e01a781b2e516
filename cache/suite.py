"""The standard shape suite the shipped bundles are tuned on (see README.md in this folder).

Each function returns ``(model, inputs)`` for ``torchtune-ops tune --model cache.suite:<function>`` (run
from the repository root): a module whose forward applies every layer of the suite to an input of its own
shape, so one run meets every problem once. Weights are random (no downloads); the layers are built
directly on the GPU when there is one.

- ``gpt2``: the projections of GPT-2 small and medium (QKV, attention output, MLP up and down, LM head);
- ``llama``: the projections of a Llama-2-7B / Llama-3-8B-style decoder (fused QKV with grouped KV heads,
  output, fused gate+up, down, LM head);
- ``resnet50``: every distinct convolution of ResNet-50 (stem, bottleneck 1x1/3x3/1x1, downsample 1x1),
  channels_last;

at token counts (M) 1, 16, 128, 512 and 2048 (batch sizes 1 and 32 for ResNet-50), in float16 and
bfloat16. ``size="tiny"`` shrinks every dimension for a quick CPU run through the Triton interpreter.
"""
from __future__ import annotations

import torch
import torch.nn as nn

TOKENS = (1, 16, 128, 512, 2048)
DTYPES = (torch.float16, torch.bfloat16)

# (in_features, out_features) per model
GPT2 = {"small": [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257)],
        "medium": [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024), (1024, 50257)]}
LLAMA = {"llama2-7b": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (4096, 32000)],
         "llama3-8b": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256)]}
# ResNet-50 convolutions at 224x224: (in_channels, out_channels, kernel, stride, input H=W)
RESNET50 = [(3, 64, 7, 2, 224),
            (64, 64, 1, 1, 56), (64, 64, 3, 1, 56), (64, 256, 1, 1, 56), (256, 64, 1, 1, 56),
            (256, 128, 1, 1, 56), (128, 128, 3, 2, 56), (128, 512, 1, 1, 28), (256, 512, 1, 2, 56),
            (512, 128, 1, 1, 28), (128, 128, 3, 1, 28),
            (512, 256, 1, 1, 28), (256, 256, 3, 2, 28), (256, 1024, 1, 1, 14), (512, 1024, 1, 2, 28),
            (1024, 256, 1, 1, 14), (256, 256, 3, 1, 14),
            (1024, 512, 1, 1, 14), (512, 512, 3, 2, 14), (512, 2048, 1, 1, 7), (1024, 2048, 1, 2, 14),
            (2048, 512, 1, 1, 7), (512, 512, 3, 1, 7)]


class Suite(nn.Module):
    """Applies each layer to its own input; returns the outputs (a tuple)."""

    def __init__(self, layers: list[nn.Module], inputs_per_layer: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.which = inputs_per_layer

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.layers[i](x) for i, x in zip(self.which, inputs))


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _shrink(n: int, size: str) -> int:
    return n if size == "full" else max(3, n // 64)


def _linears(shapes: list[tuple[int, int]], *, size: str, device: str | None, tokens=TOKENS):
    dev = _device(device)
    layers, which, inputs = [], [], []
    for dtype in DTYPES:
        for fin, fout in shapes:
            fin, fout = _shrink(fin, size), _shrink(fout, size)
            layers.append(nn.Linear(fin, fout, device=dev, dtype=dtype))
            for m in (tokens if size == "full" else tokens[:2]):
                which.append(len(layers) - 1)
                inputs.append(torch.randn(m, fin, device=dev, dtype=dtype))
    return Suite(layers, which).eval(), tuple(inputs)


def gpt2(size: str = "full", device: str | None = None):
    """GPT-2 small and medium projections (see the module docstring)."""
    return _linears(GPT2["small"] + GPT2["medium"], size=size, device=device)


def llama(size: str = "full", device: str | None = None):
    """Llama-2-7B and Llama-3-8B-style projections (see the module docstring)."""
    return _linears(LLAMA["llama2-7b"] + LLAMA["llama3-8b"], size=size, device=device)


def resnet50(size: str = "full", device: str | None = None, batches=(1, 32)):
    """Every distinct ResNet-50 convolution, channels_last (see the module docstring)."""
    dev = _device(device)
    layers, which, inputs = [], [], []
    for dtype in DTYPES:
        for cin, cout, k, stride, hw in RESNET50:
            if size != "full":
                cin, cout, hw = max(3, cin // 64), max(3, cout // 64), max(k, hw // 16)
            conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False, device=dev, dtype=dtype)
            layers.append(conv.to(memory_format=torch.channels_last))
            for n in (batches if size == "full" else batches[:1]):
                which.append(len(layers) - 1)
                x = torch.randn(n, cin, hw, hw, device=dev, dtype=dtype)
                inputs.append(x.to(memory_format=torch.channels_last))
    return Suite(layers, which).eval(), tuple(inputs)


def tiny():
    """All three suites shrunk (every dimension / 64): a CPU smoke run of the recipe."""
    parts = [gpt2("tiny"), llama("tiny"), resnet50("tiny")]
    layers, which, inputs = [], [], []
    for model, xs in parts:
        base = len(layers)
        layers += list(model.layers)
        which += [base + i for i in model.which]
        inputs += list(xs)
    return Suite(layers, which).eval(), tuple(inputs)
