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
import math
import os
import threading
from typing import Any, Callable, Iterator

from .errors import SettingsError

PREFIX = "TORCHTUNE_OPS_"


# Each parser takes what a user may give, from the environment (a string) or from Python (optimize()'s
# arguments, override(), the CLI), and returns the typed value or raises ValueError with the reason. The
# same parser serves every source, so a value is accepted or refused, with the same words, wherever it
# comes from (``check``).

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if type(v) is int and v in (0, 1):
        return bool(v)
    t = v.strip().lower() if isinstance(v, str) else None
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError("expected one of 1, true, yes, on (on) or 0, false, no, off (off)")


def _autotune(v: Any) -> str:
    if v == "background" or (isinstance(v, str) and v.strip().lower() == "background"):
        return "background"
    try:
        return "on" if _bool(v) else "off"
    except ValueError:
        raise ValueError("expected one of 1, true, yes, on (tune on first use), 0, false, no, off "
                         "(never tune) or background") from None


def _positive_int(v: Any) -> int:
    n = None
    if isinstance(v, str):
        try:
            n = int(v.strip())
        except ValueError:
            pass
    elif type(v) is int:
        n = v
    if n is None or n < 1:
        raise ValueError("must be a whole number of at least 1")
    return n


def _positive_float(v: Any) -> float:
    x = None
    if isinstance(v, str):
        try:
            x = float(v.strip())
        except ValueError:
            pass
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        x = float(v)
    if x is None or not (math.isfinite(x) and x > 0):
        raise ValueError("must be a positive, finite number of seconds")
    return x


def _paths(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return tuple(p for p in v.split(os.pathsep) if p)
    if isinstance(v, os.PathLike):
        return (os.fspath(v),)
    if isinstance(v, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in v):
        return tuple(os.fspath(p) for p in v if os.fspath(p))
    raise ValueError(f"expected paths separated by {os.pathsep!r}, or a list of paths")


def _optional_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, (str, os.PathLike)):
        return os.fspath(v) or None
    raise ValueError("expected a path")


def _log_level(v: Any) -> str:
    t = v.strip().upper() or "WARNING" if isinstance(v, str) else None
    if t not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return t


def _bucket(v: Any) -> str:
    t = v.strip().lower() or "none" if isinstance(v, str) else None
    if t not in ("none", "pow2"):
        raise ValueError("expected none or pow2")
    return t


@dataclasses.dataclass(frozen=True)
class Setting:
    """One declared setting: its field name, default, parser and meaning."""

    name: str
    default: Any
    parse: Callable[[Any], Any]
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
        values[s.name] = check(s.name, raw)
    return Settings(**values)


def check(name: str, value: Any) -> Any:
    """``value`` for setting ``name`` as the settings hold it (e.g. ``"4"`` -> 4, True -> "on"), whether it
    comes from the environment (a string) or from Python; raises SettingsError, with the same words for
    every source, naming the argument and its variable and saying what is accepted."""
    s = _BY_NAME.get(name)
    if s is None:
        raise SettingsError(f"unknown setting {name!r}; known: {', '.join(_BY_NAME)}")
    try:
        return s.parse(value)
    except (ValueError, TypeError) as e:
        raise SettingsError(f"{name}={value} ({s.env}): {e}. {s.doc}") from None


def validated(**kw: Any) -> dict[str, Any]:
    """The given settings checked and normalised (see ``check``); a None value means "not given" and is
    dropped. What ``optimize()`` and the CLI call before anything else happens."""
    return {k: check(k, v) for k, v in kw.items() if v is not None}


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
        out[k] = check(k, v)
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
