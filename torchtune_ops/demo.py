"""The main job: optimize a GPT-2-style transformer and a ResNet-style CNN (random weights, no downloads) with
tuning on, show the tuned problems, then run again in a new process from the cache.

    python -m torchtune_ops.demo                       # what scripts/demo.sh runs
    python -m torchtune_ops.demo --size small --max-trials 8 --cache-dir ./.demo-cache

First run: a fresh cache directory (a new temporary one unless ``--cache-dir``, removed at the end unless
``--keep-cache``), ``optimize(model,
autotune=True)`` on both models, a progress line per measured configuration while tuning, the outputs
checked against eager PyTorch, then a table per problem (op, shape, aten time, tuned time, speedup, trials,
kernel). Second run (``--second-run``, started by the first as a new process on the same cache): the same
models and inputs, which must tune nothing, hit the cache for every problem and give the same outputs;
the exit status says whether they did.

Without a CUDA GPU the kernels run through the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 is set
at start, before any kernel module is imported), on tiny shapes with few trials: the flow is the same, but
interpreter timings say nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:  # must precede any kernel import: Triton reads it when a kernel is decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torchtune_ops  # noqa: E402
from torchtune_ops.runtime import backend, dispatch
from torchtune_ops import models  # noqa: E402

OUTPUTS = "demo-outputs.pt"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m torchtune_ops.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(models.SIZES), default=None,
                   help="model size (default: base on a GPU, tiny on CPU)")
    p.add_argument("--cache-dir", default=None, help="cache directory (default: a fresh temporary one)")
    p.add_argument("--max-trials", type=int, default=None,
                   help="configurations measured per problem (default: 24 on a GPU, 3 on CPU)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of search per problem (default: 10)")
    p.add_argument("--compiler", choices=("inductor", "eager"), default=None,
                   help="what compiles the rest of the graph (default: inductor on a GPU, eager on CPU, where "
                        "Inductor's C++ compiles take minutes)")
    p.add_argument("--models", default="gpt2,resnet", help="comma-separated: gpt2, resnet (default both)")
    p.add_argument("--second-run", action="store_true", help="the cache-only run (started by the first run)")
    p.add_argument("--no-second-run", action="store_true", help="skip the second process")
    p.add_argument("--keep-cache", action="store_true", help="keep the temporary cache directory (without "
                   "--cache-dir it is removed at the end)")
    args = p.parse_args(argv)
    args.size = args.size or ("base" if HAS_GPU else "tiny")
    args.max_trials = args.max_trials or (24 if HAS_GPU else 3)
    args.time_budget = args.time_budget or 10.0
    args.compiler = args.compiler or ("inductor" if HAS_GPU else "eager")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    return args


def _device() -> torch.device:
    return torch.device("cuda" if HAS_GPU else "cpu")


def _build(name: str, size: str, device: torch.device):
    model, example = getattr(models, name)(size, seed=0)
    model = model.to(device)
    example = example.to(device)
    if HAS_GPU and name == "resnet":
        model, example = model.half(), example.half()
    return model, example


def _progress(p) -> None:
    best = f"{p.best_ms:.4g} ms" if p.best_ms == p.best_ms and p.best_ms != float("inf") else "-"
    print(f"    tuning {p.family:<6} {_short(p.problem):<44} trial {p.trial:>2}/{p.max_trials:<2} "
          f"best {best:<12} aten {p.aten_ms:.4g} ms", flush=True)


def _short(problem) -> str:
    d = problem if isinstance(problem, dict) else getattr(problem, "__dict__", None)
    if hasattr(problem, "M"):
        b = f"{problem.batch}x" if getattr(problem, "batch", 1) != 1 else ""
        extra = "" if problem.activation == "none" else f" +{problem.activation}"
        return f"{problem.op} {b}{problem.M}x{problem.N}x{problem.K} {problem.dtype}{extra}"
    if hasattr(problem, "R"):
        return (f"conv {problem.N}x{problem.C}x{problem.H}x{problem.W} k{problem.K} {problem.R}x{problem.S} "
                f"s{problem.stride[0]} g{problem.groups} {problem.dtype}")
    return str(d or problem)[:44]


def _time_ms(fn, example, reps: int) -> float:
    with torch.no_grad():
        fn(example)
        if HAS_GPU:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn(example)
        if HAS_GPU:
            torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def _table(problems: list[dict]) -> str:
    head = f"  {'op':<8} {'shape':<46} {'aten ms':>9} {'tuned ms':>9} {'speedup':>8} {'trials':>6}  kernel"
    rows = [head, "  " + "-" * (len(head) + 20)]
    for p in problems:
        aten = p.get("aten_ms")
        if p["kernel"] == "aten":
            tuned, speed, kernel = aten, "1.00x", "aten (PyTorch won)"
        else:
            tuned, kernel = p.get("time_ms"), p["kernel"]
            speed = f"{aten / tuned:.2f}x" if aten and tuned else "-"
        rows.append(f"  {p['op']:<8} {p['shape']:<46} {_num(aten):>9} {_num(tuned):>9} {speed:>8} "
                    f"{p.get('trials') or 0:>6}  {kernel}")
    return "\n".join(rows)


def _num(v) -> str:
    return "-" if v is None or v != v else f"{v:.4g}"


def run(args: argparse.Namespace) -> int:
    device = _device()
    label = "second run (cache only)" if args.second_run else "first run (tuning on)"
    print(f"== torchtune_ops demo, {label}: device {torch.cuda.get_device_name() if HAS_GPU else 'CPU'}, "
          f"models {', '.join(args.models)} ({args.size}), compiler {args.compiler}")
    if not HAS_GPU:
        print("   No CUDA GPU here: Triton kernels run through the Triton interpreter on CPU tensors, on tiny\n"
              "   shapes with few trials. The flow is the real one; the timings are interpreter timings, NOT\n"
              "   GPU timings (the interpreter is far slower than PyTorch's CPU kernels, so aten mostly wins).")
    print(f"   cache: {args.cache_dir}")
    dispatch.set_tune_options(progress=_progress)
    outputs, ok = {}, True
    reference = None
    if args.second_run:
        reference = torch.load(os.path.join(args.cache_dir, OUTPUTS), weights_only=True)
    for name in args.models:
        dispatch.reset()
        backend.reset_counts()
        model, example = _build(name, args.size, device)
        print(f"\n-- {name}: input {tuple(example.shape)} {example.dtype}")
        opt = torchtune_ops.optimize(model, autotune=True, cache_dir=args.cache_dir, max_trials=args.max_trials,
                                     time_budget_s=args.time_budget, compiler=args.compiler)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = opt(example)
            expect = model(example)
        print(f"   first call (compile{'' if args.second_run else ' + tuning'}): {time.perf_counter() - t0:.1f} s")
        err = float((out.float() - expect.float()).abs().max())
        scale = float(expect.float().abs().max()) or 1.0
        tol = 2e-2 if out.dtype in (torch.float16, torch.bfloat16) else 1e-3
        good = err <= tol * scale
        ok &= good
        print(f"   matches eager PyTorch: {'yes' if good else 'NO'} (max abs diff {err:.3g})")
        outputs[name] = out.detach().cpu()
        st = dispatch.stats()
        tuned = sum(c.get("tuned", 0) for c in st["ops"].values())
        hits = sum(c.get("store", 0) + c.get("bundle", 0) for c in st["ops"].values())
        left = sum(backend.left_by_cache().values())   # cache hits left to Inductor at compile time
        problems = [p for p in st["problems"] if p["source"] in ("tuned", "store", "bundle")]
        print(f"   problems: {len(st['problems'])}, tuned now: {tuned}, from the cache: {hits}"
              + (f", left to Inductor by the cache (PyTorch's kernel won): {left}" if left else ""))
        print(_table(problems))
        other = [p for p in st["problems"] if p["source"] not in ("tuned", "store", "bundle")]
        for p in other:
            print(f"   {p['op']} {p['shape']}: PyTorch's kernel ({p['source']})")
        reps = 20 if HAS_GPU else 2
        e_ms, o_ms = _time_ms(model, example, reps), _time_ms(opt, example, reps)
        print(f"   whole model: eager {e_ms:.3g} ms, optimized {o_ms:.3g} ms per call"
              + ("" if HAS_GPU else " (interpreter: not a GPU figure)"))
        if args.second_run:
            same = torch.equal(outputs[name], reference[name])
            print(f"   cache hits {hits + left}, tuned {tuned}; same outputs as the first run: "
                  f"{'yes' if same else 'NO'}")
            ok &= same and tuned == 0 and hits + left > 0
            if tuned:
                from torchtune_ops.storage.device import fingerprint

                print(f"   NOTE: {tuned} problem(s) missed the cache. The cache key includes the device "
                      f"fingerprint ({fingerprint(device).key}), which changes when torch, Triton or our "
                      "kernel sources change between the runs.")
    if not args.second_run:
        torch.save(outputs, os.path.join(args.cache_dir, OUTPUTS))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    temporary = args.cache_dir is None
    if temporary:
        if args.second_run:
            raise SystemExit("--second-run needs --cache-dir (the first run's cache)")
        args.cache_dir = tempfile.mkdtemp(prefix="torchtune_ops-demo-")
    try:
        return _main(args)
    finally:
        if temporary and not args.keep_cache:
            shutil.rmtree(args.cache_dir, ignore_errors=True)
        elif temporary:
            print(f"kept the cache in {args.cache_dir}")


def _main(args: argparse.Namespace) -> int:
    os.makedirs(args.cache_dir, exist_ok=True)
    t0 = time.perf_counter()
    status = run(args)
    if args.second_run or args.no_second_run:
        return status
    print(f"\n== first run done in {time.perf_counter() - t0:.0f} s; starting a second, new process on the same "
          "cache (no tuning expected)\n", flush=True)
    cmd = [sys.executable, "-m", "torchtune_ops.demo", "--second-run", "--cache-dir", args.cache_dir,
           "--size", args.size, "--max-trials", str(args.max_trials), "--time-budget", str(args.time_budget),
           "--compiler", args.compiler, "--models", ",".join(args.models)]
    second = subprocess.run(cmd).returncode
    first_txt = "ok" if status == 0 else "failed"
    second_txt = "ok (cache hits, no tuning)" if second == 0 else "failed"
    print(f"\n== demo {'passed' if status == 0 and second == 0 else 'FAILED'}: first run {first_txt}, "
          f"second run {second_txt}")
    return 0 if status == 0 and second == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
