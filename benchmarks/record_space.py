"""Record a kernel family's whole search space on a GPU, in Kernel Tuner's cache format, for offline replay.

Expected time on an H100 (estimate): about 4 minutes per space (about 2,000 configurations, compiled in
parallel, each timed for about 30 ms).

For each named shape, every valid configuration of the family (``family.valid_configs``) is launched once
(checked against PyTorch's result; a wrong one is recorded as failed), then timed; the space is written as
gzip JSON in the format of /work/shared/datasets/README.md, so ``benchmarks/search_efficiency.py --space
FILE`` replays it (valid iff in ``cache``; failed configurations cost a measurement and return +inf):

    {"device_name", "kernel_name", "problem_size", "tune_params_keys", "tune_params", "objective": "time",
     "cache": {"v1,v2,...": {<params>, "time": ms | "CompilationFailedConfig" | "RuntimeFailedConfig",
                              "p20", "p80", "reps"}},
     "torchtune_ops": {"family", "problem", "shape", "complete", "valid", "measured", "seconds", machine...}}

Usage:

    python benchmarks/record_space.py                               # the default shapes (see DEFAULT_SHAPES)
    python benchmarks/record_space.py --shape "linear M=16" --budget-s 300 --workers 16
    python benchmarks/record_space.py --list                        # names of every shape it knows
    python benchmarks/record_space.py --smoke                       # CPU, interpreter, one tiny shape (CI)

Shapes are the kernel benchmark's suites (bench_kernels.py: LLM projections, odd sizes, ResNet-50 convs);
``--shape`` picks them by a substring of their name. Resumable: a complete file is skipped, a partial one
(written after every batch, ``"complete": false``) is continued; ``--budget-s`` stops starting new
batches after that many seconds. On a GPU, each batch is compiled ahead in bench_kernels' worker pool.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

_SMOKE = "--smoke" in sys.argv
if _SMOKE and not torch.cuda.is_available():
    # The interpreter is chosen when kernels are decorated: set it before they are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels  # noqa: E402  (shares the suites, the compile pool and the machine description)

from torchtune_ops.kernels.base import Config, device_limits, relative_error  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "spaces"
SMOKE_RESULTS = HERE / "out" / "spaces"  # git-ignored

#: what a plain run records: small spaces (about 2,000 valid configurations each on an H100)
DEFAULT_SHAPES = ("linear M=16 x4096 x11008 bf16", "resnet50 3x3 128 @28 N=32", "resnet50 1x1 256->64 @56 N=32")
#: configurations compiled ahead and timed per batch (the partial file is rewritten after each)
BATCH = 256


def all_shapes(*, smoke: bool = False) -> dict[str, tuple]:
    """Every shape this script knows: name -> (family, problem)."""
    suites = bench_kernels.smoke_suites() if smoke else {**bench_kernels.gemm_suites(), **bench_kernels.conv_suites()}
    return {name: (family, problem) for rows in suites.values() for name, family, problem in rows}


def pick(names: list[str], shapes: dict[str, tuple]) -> list[str]:
    """Shape names matching each pattern (an exact name, else every name containing it), in order."""
    out: list[str] = []
    for pat in names:
        hits = [pat] if pat in shapes else [n for n in shapes if pat in n]
        if not hits:
            raise SystemExit(f"record_space: no shape matches {pat!r} (--list shows them)")
        out += [h for h in hits if h not in out]
    return out


def slug(text: str) -> str:
    s = "".join(ch if ch.isalnum() else "-" for ch in text.lower())
    while "--" in s:
        s = s.replace("--", "-")
    return s.strip("-")


def space_path(out_dir: Path, gpu: str, family_name: str, shape: str) -> Path:
    return out_dir / slug(gpu) / f"{family_name}-{slug(shape)}.json.gz"


def load(path: Path) -> dict | None:
    """A previously written space file, or None when absent or unreadable (then it is recorded anew)."""
    try:
        with gzip.open(path, "rt") as f:
            data = json.load(f)
        return data if isinstance(data.get("cache"), dict) else None
    except (OSError, ValueError, EOFError):
        return None


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)  # atomic: a killed run leaves the previous file


def _failure_kind(e: BaseException) -> str:
    try:
        from triton.compiler.errors import CompilationError
    except ImportError:  # pragma: no cover
        CompilationError = ()  # type: ignore[assignment]
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # pragma: no cover
        OutOfResources = ()  # type: ignore[assignment]
    return "CompilationFailedConfig" if isinstance(e, (CompilationError, OutOfResources)) else "RuntimeFailedConfig"


def _context_ok(device: torch.device) -> bool:
    """Whether the CUDA context still works after a failure (an illegal address poisons it for good)."""
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
        return True
    except RuntimeError:
        return False


def record_shape(name: str, family, problem, *, device: torch.device, out_dir: Path, meta: dict,
                 deadline: float, rep_ms: float, max_configs: int | None, compilers=None,
                 log=print) -> dict:
    """Record (or continue recording) one shape; returns a summary (path, complete, valid, measured, ...)."""
    from torchtune_ops.tuning.timing import benchmark
    from torchtune_ops.kernels import candidate_failures

    path = space_path(out_dir, meta["gpu"], family.name, name)
    data = load(path)
    summary = {"shape": name, "family": family.name, "path": str(path)}
    if data is not None and data.get("torchtune_ops", {}).get("complete"):
        log(f"[record] {name}: complete already ({path})")
        return dict(summary, complete=True, skipped=True, valid=data["torchtune_ops"].get("valid"),
                    measured=len(data["cache"]), seconds=0.0)
    limits = device_limits(device)
    sp = family.space(problem)
    keys = list(sp)
    valid = family.valid_configs(problem, limits)
    if max_configs is not None and len(valid) > max_configs:
        step = len(valid) / max_configs  # an even spread over the enumeration order
        valid = [valid[int(i * step)] for i in range(max_configs)]
    pdict = family.problem_to_dict(problem)
    if data is None:
        data = {"device_name": meta["gpu"], "kernel_name": f"torchtune_ops.{family.name}",
                "problem_size": pdict, "tune_params_keys": keys,
                "tune_params": {k: list(v) for k, v in sp.items()}, "objective": "time", "cache": {},
                "torchtune_ops": {}}
    cache = data["cache"]
    info = data["torchtune_ops"]
    spent_before = float(info.get("seconds", 0.0))
    info.update(family=family.name, problem=pdict, shape=name, valid=len(valid), sampled=max_configs is not None,
                machine=meta)
    key_of = lambda c: ",".join(str(c[k]) for k in keys)  # noqa: E731
    todo = [c for c in valid if key_of(c) not in cache]
    log(f"[record] {name}: {len(valid)} valid configurations, {len(cache)} recorded, {len(todo)} to go")

    t0 = time.perf_counter()
    inputs = family.make_inputs(problem, device)
    ref = family.reference(problem, inputs)
    out = torch.empty_like(ref)
    tol = family.tolerance(problem)
    failures = candidate_failures()
    cuda = device.type == "cuda"
    bench_kw = (dict(warmup_ms=rep_ms / 4, rep_ms=rep_ms, min_reps=5) if cuda
                else dict(warmup_ms=0.0, rep_ms=1.0, min_reps=1, max_reps=2))
    for start in range(0, len(todo), BATCH):
        if time.monotonic() > deadline:
            log(f"[record] {name}: time budget reached; {len(todo) - start} configurations left for the next run")
            break
        batch = todo[start:start + BATCH]
        if compilers is not None:
            compilers.compile(family.name, pdict, [c.to_json() for c in batch])
        for cfg in batch:
            rec: dict = cfg.as_dict()
            try:
                out.fill_(float("nan"))
                family.launch(cfg, problem, inputs, out=out)
                err = relative_error(out, ref)
                if not err <= tol:
                    rec.update(time="RuntimeFailedConfig", error=f"wrong result (relative error {err:.3g})")
                else:
                    t = benchmark(lambda: family.launch(cfg, problem, inputs, out=out), device=device, **bench_kw)
                    rec.update(time=t.median_ms, p20=t.p20_ms, p80=t.p80_ms, reps=t.n)
            except Exception as e:  # noqa: BLE001 - every failure is a recorded outcome, never fatal
                rec.update(time=_failure_kind(e), error=f"{type(e).__name__}: {str(e)[:160]}")
                if not isinstance(e, failures):
                    log(f"[record] {name}: {cfg}: unexpected {type(e).__name__}: {str(e)[:200]}")
                if cuda and not _context_ok(device):
                    cache[key_of(cfg)] = rec  # recorded, so the next run goes on after it
                    info.update(complete=False, measured=len(cache), seconds=spent_before + time.perf_counter() - t0)
                    _write(path, data)
                    raise SystemExit(f"record_space: {cfg} broke the CUDA context ({type(e).__name__}); "
                                     f"{len(cache)} recorded in {path}; run again in a new process to continue")
            cache[key_of(cfg)] = rec
        info.update(complete=len(cache) >= len(valid) and all(key_of(c) in cache for c in valid),
                    measured=len(cache), seconds=spent_before + time.perf_counter() - t0)
        _write(path, data)
    info.update(complete=all(key_of(c) in cache for c in valid), measured=len(cache),
                seconds=spent_before + time.perf_counter() - t0)
    _write(path, data)
    times = [r["time"] for r in cache.values() if isinstance(r.get("time"), (int, float))]
    best = min(times) if times else math.nan
    failed = sum(1 for r in cache.values() if not isinstance(r.get("time"), (int, float)))
    log(f"[record] {name}: {len(cache)}/{len(valid)} recorded ({failed} failed), best {best:.4g} ms, "
        f"{'complete' if info['complete'] else 'partial'} -> {path}")
    return dict(summary, complete=info["complete"], skipped=False, valid=len(valid), measured=len(cache),
                failed=failed, best_ms=best, seconds=info["seconds"])


def record(*, shapes: list[str] | None = None, smoke: bool = False, out_dir: Path | None = None,
           budget_s: float = 540.0, rep_ms: float = 10.0, workers: int | None = None,
           max_configs: int | None = None, log=print) -> list[dict]:
    """Record the named shapes (default ``DEFAULT_SHAPES``; the smoke shape with ``smoke``).

    Args:
        shapes: patterns picking shapes by name (see ``pick``); None: the defaults.
        smoke: CPU through the interpreter, the tiny smoke suite, at most 6 configurations (default False).
        out_dir: where spaces go (``<out_dir>/<gpu>/<family>-<shape>.json.gz``); None: benchmarks/results/spaces
            (benchmarks/out/spaces for smoke).
        budget_s: no new batch starts after this many seconds (default 540).
        rep_ms: timing budget per configuration in ms on a GPU (default 10; a quarter more for warm-up).
        workers: compile processes on a GPU (None: min(16, cores); 1: none).
        max_configs: record an even spread of at most this many valid configurations per shape (default all).

    Returns:
        One summary dict per shape (path, complete, valid, measured, failed, best_ms, seconds).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not smoke:
        raise SystemExit("record_space: no CUDA device; only --smoke runs on CPU")
    known = all_shapes(smoke=smoke)
    names = pick(list(shapes) if shapes else (list(known)[:1] if smoke else list(DEFAULT_SHAPES)), known)
    if smoke:
        max_configs = min(max_configs or 6, 6)
    out_dir = Path(out_dir) if out_dir else (SMOKE_RESULTS if smoke else RESULTS)
    meta = bench_kernels.machine(device)
    workers = min(16, os.cpu_count() or 1) if workers is None else workers
    compilers = bench_kernels._Compilers(workers) if device.type == "cuda" and workers > 1 else None
    deadline = time.monotonic() + budget_s
    summaries = []
    try:
        for name in names:
            family, problem = known[name]
            summaries.append(record_shape(name, family, problem, device=device, out_dir=out_dir, meta=meta,
                                          deadline=deadline, rep_ms=rep_ms, max_configs=max_configs,
                                          compilers=compilers, log=log))
    finally:
        if compilers is not None:
            compilers.close()
    return summaries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", help="shape name or substring (repeatable; default: "
                    + "; ".join(DEFAULT_SHAPES) + ")")
    ap.add_argument("--smoke", action="store_true", help="CPU through the interpreter, one tiny shape (CI)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/spaces)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="no new batch after this many seconds (540)")
    ap.add_argument("--rep-ms", type=float, default=10.0, help="timing budget per configuration, ms (10)")
    ap.add_argument("--workers", type=int, default=None, help="compile processes on a GPU (min(16, cores))")
    ap.add_argument("--max-configs", type=int, default=None, help="at most this many configurations per shape")
    ap.add_argument("--list", action="store_true", help="print the known shape names and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(all_shapes(smoke=args.smoke)))
        return 0
    summaries = record(shapes=args.shape, smoke=args.smoke, out_dir=args.out, budget_s=args.budget_s,
                       rep_ms=args.rep_ms, workers=args.workers, max_configs=args.max_configs)
    print(json.dumps({"record_space": summaries}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
