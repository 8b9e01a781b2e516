"""A stand-in for Triton's GPU driver, so the host side of a kernel launch runs on a machine without a GPU.

    with fake_driver() as launches:        # Triton's JIT believes an sm_90 GPU is active
        gemm(a_cpu, b_cpu, config=...)     # binding, specialisation, cache key: Triton's real code
    launches.count                         # the driver-level calls (CompiledKernel.run) that were stubbed

Triton's ``JITFunction.run`` asks the active driver for the device, stream and target, binds and specialises
the arguments, computes the cache key and, on a miss, compiles. Here the driver answers with a fake CUDA
target and compilation is replaced by a ``FakeCompiled`` whose ``run`` (the C launcher's entry point) only
counts and records its arguments. Everything up to that call is Triton's and our own code, so its time is
the host cost of a launch. Used by benchmarks/bench_hotpath.py and the bound-launcher tests; needs kernels
decorated without TRITON_INTERPRET (real ``JITFunction`` objects).
"""
from __future__ import annotations

import contextlib
from typing import Iterator


class FakeCompiled:
    """What ``JITFunction.run`` returns after compiling: ``run`` is the driver-level launch, stubbed."""

    function = None
    packed_metadata = None

    def __init__(self, launches: "Launches", signature=None, constexprs=None, attrs=None) -> None:
        self._launches = launches
        self.signature, self.constexprs, self.attrs = signature, constexprs, attrs

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args) -> None:
        self._launches.count += 1
        self._launches.last = args


class Launches:
    """Counts the stubbed driver calls; ``last`` holds the arguments of the latest one."""

    def __init__(self) -> None:
        self.count = 0
        self.last: tuple | None = None
        self.compiled: list[FakeCompiled] = []


class FakeDriver:
    """The few driver methods the JIT calls on the host."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


@contextlib.contextmanager
def fake_driver(*kernels) -> Iterator[Launches]:
    """Make ``kernels`` (JITFunctions) launch through a fake sm_90 driver whose launches are stubbed."""
    from triton.runtime.driver import driver

    launches = Launches()
    saved = driver._active
    driver.set_active(FakeDriver())

    def compiler_for(kernel):
        def do_compile(key, signature, device, constexprs, options, attrs, warmup):
            compiled = FakeCompiled(launches, signature, constexprs, attrs)
            launches.compiled.append(compiled)
            kernel.device_caches[device][0][key] = compiled
            return compiled
        return do_compile

    for k in kernels:
        if not hasattr(k, "device_caches"):
            raise TypeError(f"{k!r} is not a JITFunction (is TRITON_INTERPRET set?)")
        k._do_compile = compiler_for(k)
    try:
        yield launches
    finally:
        for k in kernels:
            k.__dict__.pop("_do_compile", None)
            k.device_caches.clear()
        driver._active = saved
