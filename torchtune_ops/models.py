"""Small models with random weights (no downloads) for the demo, the tests and the benchmarks.

- ``GPT2``: a GPT-2-style decoder (token + position embeddings, pre-LayerNorm blocks of causal
  self-attention written with explicit matmuls, so its bmm's are visible to the backend, and a GELU(tanh)
  MLP, then the LM head).
- ``ResNet``: a ResNet-style CNN (a convolution stem, stages of basic residual blocks with batch norm and
  ReLU, global average pooling, a linear classifier).

``gpt2(size)`` and ``resnet(size)`` build them at a named size: "tiny" (interpreter-friendly, for CPU),
"small", or "base" (GPT-2 small / ResNet-18 widths, for a GPU).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPT2Config", "GPT2", "ResNet", "gpt2", "resnet", "SIZES"]


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab: int = 512
    seq: int = 64
    dim: int = 128
    heads: int = 4
    layers: int = 2


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.register_buffer("mask", torch.tril(torch.ones(cfg.seq, cfg.seq, dtype=torch.bool)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2).reshape(b * h, t, d // h) for z in (q, k, v))
        att = torch.bmm(q, k.transpose(1, 2)) * (1.0 / math.sqrt(d // h))
        att = att.view(b, h, t, t).masked_fill(~self.mask[:t, :t], float("-inf")).softmax(-1).view(b * h, t, t)
        y = torch.bmm(att, v).view(b, h, t, d // h).transpose(1, 2).reshape(b, t, d)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.fc = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.out = nn.Linear(4 * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """GPT-2-style decoder: ``forward(tokens [B, T] int64) -> logits [B, T, vocab]``."""

    def __init__(self, cfg: GPT2Config = GPT2Config()):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.seq, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """ResNet-style CNN: ``forward(images [B, 3, H, W]) -> logits [B, classes]``."""

    def __init__(self, widths: tuple[int, ...] = (16, 32), blocks: int = 1, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


SIZES = {
    "tiny": {"gpt2": GPT2Config(vocab=64, seq=16, dim=32, heads=2, layers=1),
             "resnet": dict(widths=(8, 16), blocks=1, classes=10), "image": 8, "batch": 2},
    "small": {"gpt2": GPT2Config(vocab=512, seq=64, dim=128, heads=4, layers=2),
              "resnet": dict(widths=(16, 32, 64), blocks=1, classes=10), "image": 32, "batch": 4},
    "base": {"gpt2": GPT2Config(vocab=50257, seq=256, dim=768, heads=12, layers=4),
             "resnet": dict(widths=(64, 128, 256, 512), blocks=2, classes=1000), "image": 112, "batch": 16},
}


def gpt2(size: str = "small", *, seed: int = 0) -> tuple[GPT2, torch.Tensor]:
    """A GPT-2-style model at ``size`` ("tiny", "small", "base") with random weights (``seed``, default 0),
    and example tokens [batch, seq]."""
    spec = SIZES[size]
    torch.manual_seed(seed)
    model = GPT2(spec["gpt2"]).eval()
    tokens = torch.randint(0, spec["gpt2"].vocab, (spec["batch"], spec["gpt2"].seq))
    return model, tokens


def resnet(size: str = "small", *, seed: int = 0) -> tuple[ResNet, torch.Tensor]:
    """A ResNet-style model at ``size`` ("tiny", "small", "base") with random weights (``seed``, default 0),
    and example images [batch, 3, H, W]."""
    spec = SIZES[size]
    torch.manual_seed(seed)
    model = ResNet(**spec["resnet"]).eval()
    images = torch.randn(spec["batch"], 3, spec["image"], spec["image"])
    return model, images
