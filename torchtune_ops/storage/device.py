"""Device fingerprints: what must match for a tuned answer to be reused.

A tuned choice is only valid for the GPU it was measured on, with the software that measured it. The
fingerprint records the GPU model, its compute capability and multiprocessor count, the torch and Triton
versions and a hash of our kernel sources; its ``key`` is what the cache is keyed by, so a change in any of
them misses the cache instead of reusing a stale answer.

``compatible(a, b)`` is the looser rule bundles use (issue 5): the same GPU model, capability,
multiprocessor count and kernel sources, and the same torch and Triton major.minor versions; patch
versions (and local tags such as ``+cu124``) may differ.

On CPU the fingerprint describes the Triton interpreter (``gpu="triton-interpreter-<machine>"``,
capability (0, 0), 0 multiprocessors), so interpreter timings never mix with GPU ones.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

__all__ = ["Fingerprint", "fingerprint", "compatible", "incompatibility", "kernel_source_version"]

_KERNELS_DIR = Path(__file__).resolve().parent / "kernels"


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """Everything that decides whether a tuned choice carries over. Immutable; JSON-able via
    ``to_dict``/``from_dict``; ``key`` is the cache key string."""

    gpu: str
    capability: tuple[int, int]
    sm_count: int
    torch: str
    triton: str
    kernels: str

    @property
    def key(self) -> str:
        cc = f"{self.capability[0]}.{self.capability[1]}"
        return (f"{self.gpu}|cc{cc}|sm{self.sm_count}|torch{self.torch}|triton{self.triton}"
                f"|k{self.kernels}")

    @property
    def interpreter(self) -> bool:
        return self.capability == (0, 0)

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "capability": list(self.capability), "sm_count": self.sm_count,
                "torch": self.torch, "triton": self.triton, "kernels": self.kernels}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Fingerprint":
        """Build from ``to_dict``'s output; raises ValueError on missing fields or wrong types."""
        try:
            cap = data["capability"]
            fp = cls(gpu=data["gpu"], capability=(cap[0], cap[1]), sm_count=data["sm_count"],
                     torch=data["torch"], triton=data["triton"], kernels=data["kernels"])
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"malformed fingerprint {dict(data)!r}: {e!r}") from None
        for name in ("gpu", "torch", "triton", "kernels"):
            v = getattr(fp, name)
            if not isinstance(v, str) or not v or len(v) > 200:
                raise ValueError(f"fingerprint field {name!r} must be a short non-empty string, got {v!r}")
        for v in (*fp.capability, fp.sm_count):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 100000:
                raise ValueError(f"fingerprint numbers must be small non-negative ints, got {v!r}")
        return fp


@functools.lru_cache(maxsize=1)
def kernel_source_version() -> str:
    """A short hash (12 hex digits) of every ``torchtune_ops/kernels/*.py`` file, names and bytes."""
    h = hashlib.sha256()
    for p in sorted(_KERNELS_DIR.glob("*.py")):
        h.update(p.name.encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:12]


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def fingerprint(device: Any = None) -> Fingerprint:
    """The fingerprint of ``device`` (a torch.device or string; None: the current CUDA device when there
    is one, else CPU). Computed once per device and process."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return _cuda_fingerprint(index)
    return _cpu_fingerprint()


@functools.lru_cache(maxsize=None)
def _cuda_fingerprint(index: int) -> Fingerprint:
    import torch

    p = torch.cuda.get_device_properties(index)
    return Fingerprint(gpu=p.name, capability=(int(p.major), int(p.minor)),
                       sm_count=int(p.multi_processor_count), torch=torch.__version__,
                       triton=_dist_version("triton"), kernels=kernel_source_version())


@functools.lru_cache(maxsize=1)
def _cpu_fingerprint() -> Fingerprint:
    import torch

    return Fingerprint(gpu=f"triton-interpreter-{platform.machine() or 'cpu'}", capability=(0, 0),
                       sm_count=0, torch=torch.__version__, triton=_dist_version("triton"),
                       kernels=kernel_source_version())


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(re.split(r"[.+]", version)[:2])


def incompatibility(a: Fingerprint, b: Fingerprint) -> str | None:
    """None when choices tuned under ``a`` may be used under ``b`` (see ``compatible``); else the reason,
    in words, for an error message."""
    for name in ("gpu", "capability", "sm_count", "kernels"):
        if getattr(a, name) != getattr(b, name):
            return f"different {name}: {getattr(a, name)!r} vs {getattr(b, name)!r}"
    for name in ("torch", "triton"):
        if _major_minor(getattr(a, name)) != _major_minor(getattr(b, name)):
            return f"different {name} version: {getattr(a, name)} vs {getattr(b, name)}"
    return None


def compatible(a: Fingerprint, b: Fingerprint) -> bool:
    """True when tuned choices carry over from ``a`` to ``b``: same GPU model, compute capability,
    multiprocessor count and kernel source version, and the same major.minor torch and Triton versions
    (patch versions and local tags may differ). Symmetric."""
    return incompatibility(a, b) is None
