"""Every setting of torchtune_ops, declared and parsed in one place.

Each setting has an environment variable ``TORCHTUNE_OPS_<NAME>``, a default and a parser. Python arguments
(``optimize(autotune=True)``, ``override(...)``) take precedence over the environment. Nothing else in the
package reads ``os.environ`` for our variables.

Reading the current settings is cheap (``current()`` returns a cached frozen object), so the run-time hot
path may call it on every op.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import threading
from typing import Any, Callable, Iterator

from .errors import SettingsError

PREFIX = "TORCHTUNE_OPS_"


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 0/1, true/false, yes/no or on/off, got {text!r}")


def _autotune(text: str) -> str:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return "on"
    if t in ("0", "false", "no", "off", ""):
        return "off"
    if t == "background":
        return "background"
    raise ValueError(f"expected 0, 1 or 'background', got {text!r}")


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise ValueError(f"must be at least 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise ValueError(f"must be positive, got {v}")
    return v


def _paths(text: str) -> tuple[str, ...]:
    return tuple(p for p in text.split(os.pathsep) if p)


def _optional_str(text: str) -> str | None:
    return text or None


def _log_level(text: str) -> str:
    t = text.strip().upper() or "WARNING"
    if t not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"expected DEBUG, INFO, WARNING or ERROR, got {text!r}")
    return t


def _bucket(text: str) -> str:
    t = text.strip().lower() or "none"
    if t not in ("none", "pow2"):
        raise ValueError(f"expected 'none' or 'pow2', got {text!r}")
    return t


@dataclasses.dataclass(frozen=True)
class Setting:
    """One declared setting: its field name, default, parser and meaning."""

    name: str
    default: Any
    parse: Callable[[str], Any]
    doc: str

    @property
    def env(self) -> str:
        return PREFIX + self.name.upper()


DECLARED: tuple[Setting, ...] = (
    Setting("autotune", "off", _autotune,
            "Tune unseen problems: 0 (default, never tune), 1 (tune on first use, blocking), "
            "'background' (serve PyTorch's kernel at once, tune in a background thread)."),
    Setting("cache_dir", None, _optional_str,
            "Directory of the on-disk cache (default: the platform's user cache dir for torchtune_ops)."),
    Setting("max_trials", 40, _positive_int, "Most Triton configurations measured per problem."),
    Setting("time_budget", 30.0, _positive_float, "Most seconds spent tuning one problem."),
    Setting("background_budget", 600.0, _positive_float,
            "Most seconds a process spends tuning in background mode before it stops tuning."),
    Setting("disable", False, _bool, "1: optimize() behaves like plain torch.compile; no op is intercepted."),
    Setting("log", "WARNING", _log_level, "Log level of the 'torchtune_ops' logger (DEBUG shows every choice)."),
    Setting("readonly", False, _bool, "1: never write to disk and never tune (deployment)."),
    Setting("bundles", (), _paths, "Read-only bundle files loaded at start, separated by the path separator."),
    Setting("record", None, _optional_str, "Append each unseen problem once to this shape file."),
    Setting("bucket", "none", _bucket,
            "Bucket varying M before tuning: 'none' or 'pow2' (round M up to a power of two)."),
    Setting("strict", False, _bool,
            "1: kernel failures raise instead of falling back to PyTorch (for debugging)."),
    Setting("bench_subprocess", True, _bool,
            "On a GPU, benchmark candidates in a worker process so a crashing kernel cannot harm the caller."),
    Setting("use_shipped", True, _bool, "Load the pre-tuned bundles shipped with the package when they match."),
    Setting("perfmodel", True, _bool,
            "Learn from the trial history: warm-start and prune searches, and with tuning off run a confident "
            "prediction (verified against PyTorch at first use) for unseen problems. 0: off."),
    Setting("perfmodel_prior", True, _bool,
            "Start GEMM searches (and zero-shot predictions) from the performance prior shipped with the package "
            "(trained on A100/H100 timings) while the device's own history is short. 0: off."),
)

_BY_NAME = {s.name: s for s in DECLARED}


@dataclasses.dataclass(frozen=True)
class Settings:
    """A resolved, immutable view of every setting (see ``DECLARED`` for meanings)."""

    autotune: str = "off"
    cache_dir: str | None = None
    max_trials: int = 40
    time_budget: float = 30.0
    background_budget: float = 600.0
    disable: bool = False
    log: str = "WARNING"
    readonly: bool = False
    bundles: tuple[str, ...] = ()
    record: str | None = None
    bucket: str = "none"
    strict: bool = False
    bench_subprocess: bool = True
    use_shipped: bool = True
    perfmodel: bool = True
    perfmodel_prior: bool = True

    @property
    def tuning(self) -> bool:
        """True when unseen problems may be tuned (on or background, and not read-only)."""
        return self.autotune != "off" and not self.readonly


def from_environ(environ: dict[str, str] | None = None) -> Settings:
    """Parse every ``TORCHTUNE_OPS_*`` variable; a bad value raises SettingsError naming the variable."""
    env = os.environ if environ is None else environ
    values = {}
    for s in DECLARED:
        raw = env.get(s.env)
        if raw is None:
            values[s.name] = s.default
            continue
        try:
            values[s.name] = s.parse(raw)
        except ValueError as e:
            raise SettingsError(f"{s.env}={raw!r}: {e}. {s.doc}") from None
    return Settings(**values)


# The environment is parsed once per process (``reload()`` re-reads it). Overrides live in a context
# variable: each thread (and asyncio task) has its own stack, so a background tuner's overrides never leak
# into a serving thread and vice versa. The stack's top carries its resolved Settings, so ``current()`` is
# one ContextVar read and a comparison.
_lock = threading.Lock()
_env: Settings | None = None
_generation = 0  # bumped by reload(); resolved overrides from an older generation are recomputed
_stack: contextvars.ContextVar[tuple[tuple[int, dict[str, Any], Settings], ...]] = contextvars.ContextVar(
    "torchtune_ops_settings", default=())


def _validate(kw: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in kw.items():
        if k not in _BY_NAME:
            raise SettingsError(f"unknown setting {k!r}; known: {', '.join(_BY_NAME)}")
        if v is None and _BY_NAME[k].default is not None:
            continue  # None means "not given": keep the environment's value
        try:
            if isinstance(v, str) and k not in ("cache_dir", "record", "log"):
                v = _BY_NAME[k].parse(v)
        except ValueError as e:
            raise SettingsError(f"{k}={v!r}: {e}") from None
        if k == "autotune" and isinstance(v, bool):
            v = "on" if v else "off"
        if k == "bundles" and isinstance(v, (str, os.PathLike)):
            v = (os.fspath(v),)
        if k == "cache_dir" and v is not None:
            v = os.fspath(v)
        out[k] = v
    return out


def _environment() -> Settings:
    global _env
    s = _env
    if s is None:
        with _lock:
            if _env is None:
                _env = from_environ()
            s = _env
    return s


def _resolve(merged: dict[str, Any]) -> Settings:
    return dataclasses.replace(_environment(), **merged) if merged else _environment()


def current() -> Settings:
    """The settings in force now: the environment, then this context's ``override`` blocks (innermost wins)."""
    stack = _stack.get()
    if not stack:
        return _env if _env is not None else _environment()
    gen, merged, resolved = stack[-1]
    if gen == _generation:
        return resolved
    return _resolve(merged)


def reload() -> Settings:
    """Re-read the environment (e.g. after a test changed ``os.environ``)."""
    global _env, _generation
    with _lock:
        _env = None
        _generation += 1
    return current()


@contextlib.contextmanager
def override(**kw: Any) -> Iterator[Settings]:
    """Override settings for a block: ``with override(autotune=True, cache_dir=tmp): ...``.

    Arguments are setting names (see ``DECLARED``); ``None`` leaves a setting as the environment has it.
    Overrides apply to the current thread (context) only; a bad value raises SettingsError at once.
    """
    stack = _stack.get()
    merged = dict(stack[-1][1]) if stack else {}
    merged.update(_validate(kw))
    resolved = _resolve(merged)
    token = _stack.set(stack + ((_generation, merged, resolved),))
    try:
        yield resolved
    finally:
        _stack.reset(token)


def describe() -> str:
    """A table of every variable, its value now and its meaning (used by ``torchtune-ops doctor``)."""
    s = current()
    rows = [f"{d.env:<34} {getattr(s, d.name)!r:<14} {d.doc}" for d in DECLARED]
    return "\n".join(rows)
