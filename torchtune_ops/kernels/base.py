"""What every kernel family shares: immutable configurations, device limits and the family interface.

A *family* is one Triton kernel plus its configuration space. Every configuration in the space computes
the same function as PyTorch; which one is fastest depends on the problem and the GPU. Families know
nothing of the search strategy (no Optuna here) and nothing of the cache.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import json
from typing import Any, Iterable, Mapping

import torch

from ..errors import InvalidConfig, KernelFailure, UnsupportedProblem

Value = int | str | bool


@dataclasses.dataclass(frozen=True, order=True)
class Config:
    """An immutable, hashable kernel configuration that round-trips through JSON.

    ``Config.of(BLOCK_M=64, num_warps=4)`` or ``Config.from_dict({...})``; ``cfg["BLOCK_M"]``,
    ``cfg.get("SPLIT_K", 1)``, ``cfg.as_dict()``, ``cfg.to_json()``.
    """

    items: tuple[tuple[str, Value], ...]

    @classmethod
    def of(cls, **params: Value) -> "Config":
        return cls.from_dict(params)

    @classmethod
    def from_dict(cls, params: Mapping[str, Value]) -> "Config":
        for k, v in params.items():
            if not isinstance(k, str) or not isinstance(v, (int, str, bool)):
                raise TypeError(f"config entries must be str -> int/str/bool, got {k!r}: {v!r}")
        return cls(tuple(sorted(params.items())))

    @classmethod
    def from_json(cls, text: str) -> "Config":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("a config's JSON must be an object")
        return cls.from_dict(data)

    def as_dict(self) -> dict[str, Value]:
        return dict(self.items)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))

    def __getitem__(self, key: str) -> Value:
        for k, v in self.items:
            if k == key:
                return v
        raise KeyError(key)

    def get(self, key: str, default: Value | None = None) -> Value | None:
        for k, v in self.items:
            if k == key:
                return v
        return default

    def replace(self, **params: Value) -> "Config":
        d = self.as_dict()
        d.update(params)
        return Config.from_dict(d)

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.items)


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    """What validity checks need to know about a device, read once per device.

    ``interpreter`` is True when kernels run through the Triton interpreter on CPU tensors: there shared
    memory and warps are not modelled, so the GPU-only limits are not applied.
    """

    name: str
    smem_per_block: int  # bytes a block may use (opt-in cap)
    num_sms: int
    capability: tuple[int, int]
    interpreter: bool = False

    @property
    def is_hopper(self) -> bool:
        return self.capability[0] >= 9 and not self.interpreter


@functools.lru_cache(maxsize=None)
def _cuda_limits(index: int) -> DeviceLimits:
    p = torch.cuda.get_device_properties(index)
    smem = getattr(p, "shared_memory_per_block_optin", 0) or 49152
    return DeviceLimits(name=p.name, smem_per_block=int(smem), num_sms=int(p.multi_processor_count),
                        capability=(p.major, p.minor))


CPU_INTERPRETER = DeviceLimits(name="triton-interpreter", smem_per_block=1 << 30, num_sms=1,
                               capability=(0, 0), interpreter=True)


def device_limits(device: torch.device | str) -> DeviceLimits:
    """Limits of ``device``: a CUDA device's properties, or the interpreter's (no limits) for CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())
    return CPU_INTERPRETER


class KernelFamily(abc.ABC):
    """One Triton kernel and its configuration space.

    Subclasses describe problems with a frozen dataclass of their own (``problem_type``) whose fields are
    plain ints/strs/bools/tuples, so the problem round-trips through JSON via ``problem_to_dict`` and
    ``problem_from_dict``.
    """

    #: short unique name, e.g. "gemm" or "conv2d"; stored in the cache next to each winner
    name: str = ""
    #: the problem dataclass of this family
    problem_type: type = object
    #: parameters a stored configuration may lack (added later), with the value their absence means
    optional_params: Mapping[str, Value] = {}

    @abc.abstractmethod
    def space(self, problem: Any) -> dict[str, tuple[Value, ...]]:
        """Parameter -> choices. The Cartesian product, filtered by ``check``, is the search space."""

    @abc.abstractmethod
    def check(self, config: Mapping[str, Value], problem: Any, limits: DeviceLimits) -> str | None:
        """None when ``config`` is valid for ``problem`` on a device with ``limits``; else why not.

        Runs before any compilation, so it must be cheap (shared memory, block sizes against the problem,
        SPLIT_K against K, determinism, ...).
        """

    @abc.abstractmethod
    def known_configs(self, problem: Any, limits: DeviceLimits) -> list[Config]:
        """The well-known good configurations (PyTorch Inductor's and Triton's lists), adapted to the
        problem and filtered by ``check``: what a search measures first."""

    @abc.abstractmethod
    def make_inputs(self, problem: Any, device: torch.device | str, *, seed: int = 0) -> tuple:
        """Fresh random inputs with the problem's shapes, dtypes and layout (strides), for timing and
        for the correctness gate."""

    @abc.abstractmethod
    def reference(self, problem: Any, inputs: tuple) -> torch.Tensor:
        """PyTorch's own result (cuBLAS/cuDNN on a GPU) for ``inputs``."""

    @abc.abstractmethod
    def launch(self, config: Config | Mapping[str, Value], problem: Any, inputs: tuple,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Run the Triton kernel with ``config`` on ``inputs`` (writing into ``out`` when given)."""

    def bound_launch(self, config: Config | Mapping[str, Value], problem: Any, inputs: tuple) -> Any:
        """A no-argument callable running the kernel on ``inputs`` as the run-time dispatch does at a cache
        hit (bound once where the family can bind its launch); by default ``launch`` each time."""
        return lambda: self.launch(config, problem, inputs)

    def plan_launches(self, config: Config | Mapping[str, Value], problem: Any, inputs: tuple,
                      capability: int) -> tuple:
        """The kernel launches ``launch`` would make on a GPU of compute ``capability`` (e.g. 90):
        (kernel, grid, args, constexprs, num_warps, num_stages) each, for ``kernels.inspect``."""
        raise NotImplementedError

    def tolerance(self, problem: Any) -> float:
        """Largest accepted relative error norm ||ours - ref|| / ||ref|| against ``reference``."""
        dtype = getattr(problem, "dtype", "float32")
        return {"float16": 2e-2, "bfloat16": 4e-2}.get(dtype, 1e-2)

    def flops(self, problem: Any) -> float:
        """Floating-point operations of one call (for TFLOP/s figures)."""
        return 0.0

    def valid_configs(self, problem: Any, limits: DeviceLimits) -> list[Config]:
        """Every valid configuration of the space, enumerated (spaces are at most a few thousand)."""
        import itertools

        sp = self.space(problem)
        names = list(sp)
        out = []
        for values in itertools.product(*(sp[n] for n in names)):
            cfg = dict(zip(names, values))
            if self.check(cfg, problem, limits) is None:
                out.append(Config.from_dict(cfg))
        return out

    def problem_to_dict(self, problem: Any) -> dict[str, Any]:
        return dataclasses.asdict(problem)

    def problem_from_dict(self, data: Mapping[str, Any]) -> Any:
        fields = {f.name: f for f in dataclasses.fields(self.problem_type)}
        unknown = set(data) - set(fields)
        if unknown:
            raise ValueError(f"unknown {self.name} problem fields: {sorted(unknown)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return self.problem_type(**kw)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| in float64; NaN/Inf must sit at the same places in both."""
    if ours.shape != ref.shape:
        return float("inf")
    if ours.numel() == 0:
        return 0.0
    o, r = ours.double(), ref.double()
    fin = torch.isfinite(r)
    if not torch.equal(torch.isfinite(o), fin):
        return float("inf")
    if not bool(fin.all()):
        if not torch.equal(o[~fin].nan_to_num(0.0, 1.0, -1.0), r[~fin].nan_to_num(0.0, 1.0, -1.0)):
            return float("inf")
        o, r = o[fin], r[fin]
    den = float(r.norm())
    num = float((o - r).norm())
    return num / den if den > 0 else num


def iter_known(configs: Iterable[Mapping[str, Value]]) -> list[Config]:
    """Deduplicate a list of dict configs into Configs, keeping the first occurrence order."""
    seen, out = set(), []
    for c in configs:
        cfg = Config.from_dict(c)
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def candidate_failures() -> tuple[type[BaseException], ...]:
    """Exception types that score a configuration as failed instead of stopping the tuning: our
    InvalidConfig/KernelFailure/UnsupportedProblem, Triton's errors (compilation, out of resources,
    interpreter) and RuntimeError (kernel launch errors, CUDA out of memory)."""
    types: list[type[BaseException]] = [InvalidConfig, KernelFailure, UnsupportedProblem, RuntimeError]
    try:
        from triton.errors import TritonError  # Triton >= 3.2: base of every Triton error
        types.append(TritonError)
    except ImportError:  # pragma: no cover - older Triton
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources
        types += [CompilationError, OutOfResources]
    return tuple(types)
