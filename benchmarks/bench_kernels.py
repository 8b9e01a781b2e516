"""Kernel benchmark: PyTorch's kernel vs the best well-known Triton configuration vs a sweep of the space.

Expected time on an H100 (estimate, not yet measured): 20-30 minutes for every suite with the default
128-configuration sweep; one ``--suite`` per 10-minute device call. docs/gpu.md: run gpu_quick.sh first.

For each shape of a named suite it prints and saves the TFLOP/s of

* ``aten``:  PyTorch's own kernel (cuBLAS / cuDNN on a GPU), the family's ``reference``;
* ``known``: the best of the family's ``known_configs`` (Inductor's and Triton's lists, fitted);
* ``sweep``: the best of a deterministic sample of the valid space (at most ``--sweep`` configurations,
  128 by default, drawn without the known ones), within ``--budget`` seconds per shape;

and the best Triton result as a fraction of aten. Every candidate's first output is checked against the
reference (a wrong one is counted, never reported as best). Results go to ``benchmarks/results/`` (or
``--out``) as JSON and CSV named after the GPU and the date, with torch's and Triton's versions.

    python benchmarks/bench_kernels.py                    # every suite on the GPU
    python benchmarks/bench_kernels.py --suite llm --sweep 32
    python benchmarks/bench_kernels.py --smoke            # CPU, Triton interpreter, tiny shapes (CI)

On a GPU, compiling is most of the cost: candidates are compiled ahead in ``--workers`` processes
(Triton's on-disk cache then serves the timing process).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import random
import sys
import time
import zlib
from pathlib import Path

import torch

_SMOKE = "--smoke" in sys.argv
if _SMOKE and not torch.cuda.is_available():
    # The interpreter is chosen when kernels are decorated: set it before they are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from torchtune_ops.kernels.base import Config, device_limits, relative_error  # noqa: E402
from torchtune_ops.kernels.gemm import GEMM, GemmProblem  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SMOKE_RESULTS = Path(__file__).resolve().parent / "out"  # git-ignored: CI's smoke runs leave nothing behind


# --- suites --------------------------------------------------------------------------------------

def _gemm(name, M, N, K, dtype="float16", op="mm", b_layout="row", batch=1):
    bias = "row" if op == "linear" else "none"
    return name, GEMM, GemmProblem(op, batch, M, N, K, dtype, "row", b_layout, bias, "none", "ieee")


def gemm_suites() -> dict[str, list]:
    llm = [_gemm("square-4096 fp16", 4096, 4096, 4096), _gemm("square-4096 bf16", 4096, 4096, 4096, "bfloat16")]
    for m in (1, 16, 128, 2048):  # x[M, 11008] @ W^T, W: [4096, 11008] (an LLM down projection)
        llm.append(_gemm(f"linear M={m} x4096 x11008 bf16", m, 4096, 11008, "bfloat16", "linear", "col"))
    odd = [_gemm("odd 1000^3 fp16", 1000, 1000, 1000), _gemm("odd 4095x4097x511 fp16", 4095, 4097, 511),
           _gemm("bmm 32x512x512x128 bf16", 512, 512, 128, "bfloat16", "bmm", "col", batch=32)]
    return {"llm": llm, "odd": odd}


# ResNet-50 (torchvision v1.5: stride on the 3x3) distinct conv layers: (name, C, H, K, R, stride, pad)
RESNET50 = [
    ("stem 7x7/2 3->64 @224", 3, 224, 64, 7, 2, 3),
    ("3x3 64 @56", 64, 56, 64, 3, 1, 1),
    ("3x3/2 128 @56", 128, 56, 128, 3, 2, 1),
    ("3x3 128 @28", 128, 28, 128, 3, 1, 1),
    ("3x3/2 256 @28", 256, 28, 256, 3, 2, 1),
    ("3x3 256 @14", 256, 14, 256, 3, 1, 1),
    ("3x3/2 512 @14", 512, 14, 512, 3, 2, 1),
    ("3x3 512 @7", 512, 7, 512, 3, 1, 1),
    ("1x1 64->256 @56", 64, 56, 256, 1, 1, 0),
    ("1x1 256->64 @56", 256, 56, 64, 1, 1, 0),
    ("1x1 512->128 @28", 512, 28, 128, 1, 1, 0),
    ("1x1 1024->256 @14", 1024, 14, 256, 1, 1, 0),
    ("1x1 2048->512 @7", 2048, 7, 512, 1, 1, 0),
    ("1x1 512->2048 @7", 512, 7, 2048, 1, 1, 0),
]


def conv_suites(batches=(1, 32), layers=RESNET50, dtype="float16") -> dict[str, list]:
    """ResNet-50's conv layers in channels_last; empty (with a message) when the conv family is missing."""
    try:
        from torchtune_ops.kernels.registry import FAMILIES

        conv = FAMILIES["conv2d"]
        rows = []
        for n in batches:
            for name, c, h, k, r, s, p in layers:
                problem = conv.problem_from_dict(dict(
                    N=n, C=c, H=h, W=h, K=k, R=r, S=r, stride=(s, s), padding=(p, p, p, p), dilation=(1, 1),
                    groups=1, dtype=dtype, layout="nhwc", bias=False, activation="none", precision="ieee"))
                rows.append((f"resnet50 {name} N={n}", conv, problem))
        return {"resnet50": rows}
    except (ImportError, KeyError, ValueError, TypeError) as e:
        print(f"[bench] conv rows skipped: the conv2d family is not usable here ({type(e).__name__}: {e})")
        return {"resnet50": []}


def smoke_suites() -> dict[str, list]:
    rows = [_gemm("smoke mm 33x17x40 fp16", 33, 17, 40), _gemm("smoke linear 5x24x48 bf16", 5, 24, 48, "bfloat16",
                                                               "linear", "col")]
    conv = conv_suites(batches=(1,), layers=[("smoke 3x3 8 @6", 8, 6, 8, 3, 1, 1)], dtype="float32")
    return {"smoke": rows + conv["resnet50"]}


# --- measuring -----------------------------------------------------------------------------------

def _timer(device: torch.device, smoke: bool, rep_ms: float):
    """A function ``fn -> median ms``: torchtune_ops.tuning.timing when present, else triton's do_bench."""
    kw = dict(warmup_ms=1.0, rep_ms=2.0, min_reps=1, max_reps=3) if smoke else \
        dict(warmup_ms=rep_ms / 4, rep_ms=rep_ms)
    try:
        from torchtune_ops.tuning.timing import benchmark

        return lambda fn: benchmark(fn, device=device, **kw).median_ms
    except ImportError:
        if device.type != "cuda":
            def cpu(fn):
                fn()
                t = time.perf_counter()
                fn()
                return (time.perf_counter() - t) * 1e3
            return cpu
        return lambda fn: float(triton.testing.do_bench(fn, warmup=kw["warmup_ms"], rep=kw["rep_ms"]))


def _sample(valid: list[Config], known: set[Config], n: int, key: str) -> list[Config]:
    pool = [c for c in valid if c not in known]
    rng = random.Random(zlib.crc32(key.encode()))
    return pool if len(pool) <= n else rng.sample(pool, n)


class _Compilers:
    """Worker processes that compile candidates ahead: each launches every config it is given once on
    the real shapes, so the timing process finds them in Triton's on-disk cache. A failing config is
    left for the timing process to meet and count; a broken pool is replaced."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = None

    def compile(self, family_name: str, problem_dict: dict, configs: list[str]) -> None:
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool
        import multiprocessing as mp

        if self.workers <= 1 or len(configs) < 2:
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        chunks = [configs[i::self.workers] for i in range(self.workers)]
        futures = [self._pool.submit(_compile_worker, family_name, problem_dict, c) for c in chunks if c]
        try:
            for f in futures:
                f.result()
        except BrokenProcessPool:
            print("[bench] a compile worker died; restarting the pool")
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _compile_worker(family_name: str, problem_dict: dict, configs: list[str]) -> None:
    from torchtune_ops.kernels.registry import FAMILIES  # noqa: F811 (fresh process)

    family = FAMILIES[family_name]
    problem = family.problem_from_dict(problem_dict)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = family.make_inputs(problem, device)
    for text in configs:
        try:
            family.launch(Config.from_json(text), problem, inputs)
        except Exception:  # noqa: BLE001 - any failure is met again (and counted) by the timing process
            pass
    if device == "cuda":
        torch.cuda.synchronize()


@dataclasses.dataclass
class Row:
    suite: str
    name: str
    family: str
    problem: dict
    gflop: float
    aten_tflops: float = float("nan")
    known_tflops: float = float("nan")
    known_config: str = ""
    sweep_tflops: float = float("nan")
    sweep_config: str = ""
    best_vs_aten: float = float("nan")
    n_known: int = 0
    n_sweep: int = 0
    n_failed: int = 0
    n_wrong: int = 0
    seconds: float = 0.0


def bench_problem(suite, name, family, problem, *, device, limits, timer, sweep, budget, max_known,
                  compilers=None, verbose=False):
    t0 = time.perf_counter()
    flops = family.flops(problem)
    row = Row(suite, name, family.name, family.problem_to_dict(problem), flops / 1e9)
    inputs = family.make_inputs(problem, device)
    ref = family.reference(problem, inputs)
    tflops = lambda ms: flops / (ms * 1e-3) / 1e12 if 0 < ms < float("inf") else float("nan")  # noqa: E731
    row.aten_tflops = tflops(timer(lambda: family.reference(problem, inputs)))

    known = family.known_configs(problem, limits)[:max_known]
    valid = family.valid_configs(problem, limits) if sweep > 0 else []
    swept = _sample(valid, set(known), sweep, f"{family.name}:{json.dumps(row.problem, sort_keys=True)}")
    row.n_known, row.n_sweep = len(known), len(swept)
    if compilers is not None:
        compilers.compile(family.name, row.problem, [c.to_json() for c in known + swept])

    out = torch.empty_like(ref)
    tol = family.tolerance(problem)
    best = {"known": (float("inf"), ""), "sweep": (float("inf"), "")}
    for group, configs in (("known", known), ("sweep", swept)):
        for config in configs:
            if group == "sweep" and time.perf_counter() - t0 > budget:
                break
            try:
                out.fill_(float("nan"))
                family.launch(config, problem, inputs, out=out)
                if relative_error(out, ref) > tol:
                    row.n_wrong += 1
                    continue
                ms = timer(lambda: family.launch(config, problem, inputs, out=out))
            except Exception as e:  # noqa: BLE001 - compile/resource failures are scored, not fatal
                row.n_failed += 1
                if verbose:
                    print(f"    {config}: {type(e).__name__}: {str(e)[:200]}")
                continue
            if ms < best[group][0]:
                best[group] = (ms, config.to_json())
    row.known_tflops, row.known_config = tflops(best["known"][0]), best["known"][1]
    row.sweep_tflops, row.sweep_config = tflops(best["sweep"][0]), best["sweep"][1]
    triton_best = max((x for x in (row.known_tflops, row.sweep_tflops) if math.isfinite(x)), default=float("nan"))
    row.best_vs_aten = triton_best / row.aten_tflops if row.aten_tflops > 0 else float("nan")
    row.seconds = time.perf_counter() - t0
    return row


# --- output --------------------------------------------------------------------------------------

def machine(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)"
    return {"gpu": gpu, "host": platform.node(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _fmt(x: float) -> str:
    return f"{x:8.2f}" if math.isfinite(x) else "     n/a"


def print_row(r: Row) -> None:
    ratio = f"{r.best_vs_aten * 100:6.1f}%" if math.isfinite(r.best_vs_aten) else "    n/a"
    print(f"{r.name:<42} {_fmt(r.aten_tflops)} {_fmt(r.known_tflops)} {_fmt(r.sweep_tflops)} {ratio}"
          f"  k={r.n_known} s={r.n_sweep} fail={r.n_failed} wrong={r.n_wrong} {r.seconds:5.1f}s", flush=True)


def save(rows: list[Row], meta: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in meta["gpu"]).strip("-").lower()
    stem = out_dir / f"bench_kernels-{slug}-{meta['date'][:19].replace(':', '')}"
    data = {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}
    jpath, cpath = stem.with_suffix(".json"), stem.with_suffix(".csv")
    jpath.write_text(json.dumps(data, indent=1, default=str))
    fields = [f.name for f in dataclasses.fields(Row) if f.name != "problem"]
    with cpath.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(meta) + fields)
        for r in rows:
            d = dataclasses.asdict(r)
            w.writerow(list(meta.values()) + [d[f] for f in fields])
    return jpath, cpath


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", action="append", choices=["llm", "odd", "resnet50", "all"],
                    help="suites to run (repeatable; default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the interpreter (CI)")
    ap.add_argument("--sweep", type=int, default=128, help="most sampled space configs per shape (default 128)")
    ap.add_argument("--budget", type=float, default=120.0,
                    help="seconds per shape after which the sweep stops (default 120)")
    ap.add_argument("--rep-ms", type=float, default=100.0,
                    help="timing budget per candidate in ms (warm-up a quarter of it; default 100)")
    ap.add_argument("--max-known", type=int, default=64, help="most known configs measured per shape")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes compiling candidates ahead on a GPU (default min(8, cores); 1: none)")
    ap.add_argument("--filter", default="", help="only shapes whose name contains this text")
    ap.add_argument("--verbose", action="store_true", help="print each failing candidate's error")
    ap.add_argument("--out", default=None,
                    help="results directory (default benchmarks/results; benchmarks/out for --smoke)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("[bench] no CUDA device: only --smoke runs on CPU (the interpreter is far too slow otherwise)")
        return 2
    if args.smoke:
        suites = smoke_suites()
        args.sweep, args.max_known = min(args.sweep, 2), min(args.max_known, 2)
    else:
        names = set(args.suite or ["all"])
        suites = {}
        if names & {"all", "llm", "odd"}:
            suites.update({k: v for k, v in gemm_suites().items() if names & {"all", k}})
        if names & {"all", "resnet50"}:
            suites.update(conv_suites())
    limits = device_limits(device)
    timer = _timer(device, args.smoke, args.rep_ms)
    meta = machine(device)
    meta.update(smoke=args.smoke, sweep=args.sweep, budget_s=args.budget)
    print(f"[bench] {meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']}")
    print(f"{'shape':<42} {'aten':>8} {'known':>8} {'sweep':>8} {'best/aten':>7}   (TFLOP/s)")
    rows = []
    compilers = _Compilers(args.workers) if device.type == "cuda" else None
    try:
        for suite, problems in suites.items():
            for name, family, problem in problems:
                if args.filter and args.filter not in name:
                    continue
                row = bench_problem(suite, name, family, problem, device=device, limits=limits, timer=timer,
                                    sweep=args.sweep, budget=args.budget, max_known=args.max_known,
                                    compilers=compilers, verbose=args.verbose)
                print_row(row)
                rows.append(row)
    finally:
        if compilers is not None:
            compilers.close()
    out_dir = Path(args.out) if args.out else (SMOKE_RESULTS if args.smoke else RESULTS)
    jpath, cpath = save(rows, meta, out_dir)
    print(f"[bench] wrote {jpath} and {cpath}")
    wrong = sum(r.n_wrong for r in rows)
    if wrong:
        print(f"[bench] {wrong} candidate results were WRONG (beyond tolerance)")
    if args.smoke and (wrong or any(not math.isfinite(r.known_tflops) for r in rows)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
