"""The representative problems that the compile gate (compile_report.py) and the first GPU check
(gpu_quick.py) share: square bf16/fp16, decode M in {1, 16}, odd and 8-byte-aligned sizes, float32
"highest" and tf32, transposed operands, fused epilogues, ResNet-50 conv layers in channels_last, the stem.
"""
from __future__ import annotations

from torchtune_ops.kernels.conv import CONV2D, ConvProblem
from torchtune_ops.kernels.gemm import GEMM, GemmProblem

FAMILIES = {"gemm": GEMM, "conv2d": CONV2D}


def _gemm(op, M, N, K, dtype, a="row", b="row", batch=1, **kw) -> GemmProblem:
    return GemmProblem(op, batch, M, N, K, dtype, a, b, **kw)


def _conv(N, C, H, W, K, R, S, stride=1, pad=0, dtype="float16") -> ConvProblem:
    return ConvProblem(N=N, C=C, H=H, W=W, K=K, R=R, S=S, stride=(stride, stride), padding=(pad,) * 4,
                       dtype=dtype, layout="nhwc", bias=True, activation="relu")


#: (label, family, problem): square bf16/fp16, decode M in {1, 16}, odd sizes, float32 highest and tf32,
#: transposed operands, fused epilogues, ResNet-50 conv layers in channels_last, the stem.
REPRESENTATIVE = [
    ("square fp16 4096^3", "gemm", _gemm("mm", 4096, 4096, 4096, "float16")),
    ("linear bf16 4096^3 +bias gelu", "gemm", _gemm("linear", 4096, 4096, 4096, "bfloat16", b="col", bias="row",
                                                    activation="gelu_tanh")),
    ("decode bf16 M=1 11008x4096", "gemm", _gemm("linear", 1, 11008, 4096, "bfloat16", b="col")),
    ("decode bf16 M=16 11008x4096", "gemm", _gemm("linear", 16, 11008, 4096, "bfloat16", b="col")),
    ("odd fp16 4095x4097x511", "gemm", _gemm("mm", 4095, 4097, 511, "float16")),
    ("align8 fp16 2048x4100x4100", "gemm", _gemm("mm", 2048, 4100, 4100, "float16")),
    ("fp32 highest 2048^3", "gemm", _gemm("mm", 2048, 2048, 2048, "float32", precision="ieee")),
    ("tf32 colA 2048^3", "gemm", _gemm("mm", 2048, 2048, 2048, "float32", a="col", precision="tf32")),
    ("bmm bf16 32x1024x1024x128 tn", "gemm", _gemm("bmm", 1024, 1024, 128, "bfloat16", a="col", batch=32)),
    ("resnet 3x3 64ch 56^2 b32", "conv2d", _conv(32, 64, 56, 56, 64, 3, 3, pad=1)),
    ("resnet 3x3 256ch 14^2 b32", "conv2d", _conv(32, 256, 14, 14, 256, 3, 3, pad=1)),
    ("resnet 1x1 256>64 56^2 b32", "conv2d", _conv(32, 256, 56, 56, 64, 1, 1)),
    ("resnet 3x3 512ch 7^2 b1", "conv2d", _conv(1, 512, 7, 7, 512, 3, 3, pad=1)),
    ("stem 7x7/2 3>64 224^2 b32", "conv2d", _conv(32, 3, 224, 224, 64, 7, 7, stride=2, pad=3)),
]
#: what CI compiles on every run (1-3 minutes on 2 cores, see tests/test_compile_gate.py): the
#: problems whose known configurations spilled last (odd rows, float32 FMA, decode's mma.sync tiles); the
#: rest runs with the full report
CI_SUBSET = ("decode bf16 M=1 11008x4096", "decode bf16 M=16 11008x4096", "odd fp16 4095x4097x511",
             "fp32 highest 2048^3", "resnet 3x3 64ch 56^2 b32", "stem 7x7/2 3>64 224^2 b32")
SMOKE = [
    ("smoke gemm fp16 33x65x40", "gemm", _gemm("mm", 33, 65, 40, "float16", bias="row", activation="relu")),
    ("smoke conv 3x3 16ch", "conv2d", _conv(2, 16, 9, 9, 16, 3, 3, pad=1)),
]


def tiny(problem):
    """A CPU-sized stand-in of ``problem`` (for smoke runs through the interpreter): dims cut to a few
    dozen, keeping odd sizes odd and the dtype, layouts and epilogue."""
    import dataclasses

    def cut(v: int, cap: int) -> int:
        return v if v <= cap else cap + (v % 2)

    if isinstance(problem, GemmProblem):
        return dataclasses.replace(problem, batch=min(problem.batch, 2), M=cut(problem.M, 24),
                                   N=cut(problem.N, 40), K=cut(problem.K, 48))
    return dataclasses.replace(problem, N=1, C=cut(problem.C, 8), H=cut(problem.H, 9), W=cut(problem.W, 9),
                               K=cut(problem.K, 16))
