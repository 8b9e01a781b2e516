"""The first command on a lent GPU: the big questions in at most 8 minutes (gpu_quick.sh runs it).

    bash benchmarks/gpu_quick.sh                       # on the GPU machine; results under $OUT
    python benchmarks/gpu_quick.py --smoke --out DIR   # CPU, interpreter, tiny sizes, seconds (CI runs it)

Sections, in order, each started only while the deadline (``--deadline-s``, 450 s) allows:

1. ``env``: GPU, SM count, capability, shared memory per block, driver, torch / Triton / CUDA versions.
2. ``kernels``: per representative problem (``representative.py``, the compile gate's set): PyTorch's
   kernel (convs with ``cudnn.benchmark`` off and on) and a few fixed configurations (the first known
   ones, and on Hopper the first with host-made descriptors or a TMA store), each checked against a float64 reference and timed (CUDA events, warm-up, L2 flush, median),
   with the compiled kernel's registers, spills and shared memory as the driver reports them.
3. ``host``: microseconds of host time per call of a small decode GEMM: PyTorch and ``gemm()`` eager,
   and both replayed from a CUDA graph.
4. ``tests``: the kernel tests on CUDA in parallel (``pytest -n 8 -m "not slow"``), time-boxed.
5. ``tuner``: ``tune_problem`` end to end on a decode GEMM and a 3x3 conv (fresh store, 20 s budget).
6. ``inductor``: if a minute is left, one ``max-autotune-no-cudagraphs`` compile of a 4096^3 bf16 matmul.

Results: ``$OUT/gpu_quick.json`` (``--out``), rewritten after every row, so a cut run keeps what it
measured; a short table is printed last. Needs nothing beyond torch, Triton, numpy and pytest (no Optuna,
no platformdirs: the smoke test runs with both blocked).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_SMOKE = "--smoke" in sys.argv
if _SMOKE and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
if "--block-extras" in sys.argv:  # prove that no extra wheel is needed: these imports now fail
    for _m in ("optuna", "platformdirs"):
        sys.modules[_m] = None  # type: ignore[assignment]
# the tuner's store must not ask platformdirs for a cache directory
os.environ.setdefault("TORCHTUNE_OPS_CACHE_DIR", tempfile.mkdtemp(prefix="gpu_quick_cache_"))

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from representative import FAMILIES, REPRESENTATIVE, tiny  # noqa: E402

from torchtune_ops.kernels.base import device_limits, relative_error  # noqa: E402
from torchtune_ops.tuning.timing import benchmark  # noqa: E402


class Report:
    """The JSON document, rewritten after every row."""

    def __init__(self, path: Path, deadline: float):
        self.path, self.deadline = path, deadline
        self.doc: dict = {"started": _now(), "sections": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, section: str, row: dict) -> None:
        self.doc["sections"].setdefault(section, []).append(row)
        self.doc["updated"] = _now()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        tmp.replace(self.path)
        print(f"[{section}] " + json.dumps(row, default=str)[:300], flush=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def environment(dev: torch.device) -> dict:
    import triton

    env = dict(date=_now(), host=platform.node(), python=platform.python_version(), torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda, device=str(dev))
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(gpu=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   smem_per_block_optin=getattr(p, "shared_memory_per_block_optin", None),
                   memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        env.update(gpu="none (CPU, Triton interpreter)", sm_count=None)
    return env


def _float64(inputs: tuple) -> tuple:
    return tuple(t.double() if isinstance(t, torch.Tensor) else t for t in inputs)


def _reference64(family, problem, inputs) -> torch.Tensor:
    """The family's reference in float64 (float32 precision flags do not apply to float64)."""
    import dataclasses

    p64 = dataclasses.replace(problem, precision="ieee")
    if family.name == "gemm":
        return family.reference(p64, _float64(inputs))
    x, w, b = _float64(inputs)
    return family.reference(p64, (x, w, b))


def _launch_compiled(family, cfg, problem, inputs, dev) -> tuple[torch.Tensor | None, dict]:
    """Launch the configuration's kernels directly (as ``launch`` does) to read the driver's figures for
    the compiled main kernel; returns (output, facts)."""
    facts: dict = {}
    cap = torch.cuda.get_device_capability(dev)[0] * 10 if dev.type == "cuda" else 0
    launches = family.plan_launches(cfg, problem, inputs, cap)
    if dev.type == "cuda" and family.name == "gemm" and launches and launches[0][3].get("USE_TMA"):
        from torchtune_ops.kernels import _compat

        _compat.ensure_tma_allocator()
    for i, (kernel, grid, args, consts, warps, stages) in enumerate(launches):
        k = kernel[grid](*args, **consts, num_warps=warps, num_stages=stages)
        if i == 0 and k is not None and hasattr(k, "n_regs"):
            facts = dict(registers=k.n_regs, spills=k.n_spills, shared=k.metadata.shared)
    return facts


def section_kernels(rep: Report, dev: torch.device, smoke: bool, n_configs: int) -> None:
    limits = device_limits(dev)
    for label, fam_name, problem in REPRESENTATIVE:
        if rep.left() < 30:
            rep.add("kernels", dict(problem=label, skipped="deadline"))
            continue
        family = FAMILIES[fam_name]
        if smoke:
            problem = tiny(problem)
        try:
            inputs = family.make_inputs(problem, dev, seed=1)
            ref = _reference64(family, problem, inputs)
        except torch.cuda.OutOfMemoryError as e:
            rep.add("kernels", dict(problem=label, error=f"OOM: {e}"[:200]))
            continue
        tol = family.tolerance(problem)
        flops = family.flops(problem)
        rows = []
        aten_modes = [("aten", None)] if fam_name == "gemm" else [("cudnn", False), ("cudnn.benchmark", True)]
        for name, bench in aten_modes:
            old = torch.backends.cudnn.benchmark
            try:
                if bench is not None:
                    torch.backends.cudnn.benchmark = bench
                y = family.reference(problem, inputs)
                err = relative_error(y.double().cpu(), ref.cpu())
                t = benchmark(lambda: family.reference(problem, inputs), device=dev, **_reps(smoke))
                rows.append(dict(method=name, ms=t.median_ms, p20=t.p20_ms, p80=t.p80_ms, rel_err=err))
            finally:
                torch.backends.cudnn.benchmark = old
        known = family.known_configs(problem, limits)
        chosen = known[:n_configs]
        # issue 18: also the first known config with host-made descriptors or a TMA store (on Hopper, where
        # descriptors fit), so that a run times those axes against the device-descriptor ones beside it
        store = next((c for c in known if c.get("HOST_DESC") or c.get("TMA_STORE")), None)
        if store is not None and store not in chosen:
            chosen.append(store)
        for cfg in chosen:
            row = dict(method="triton", config=cfg.as_dict())
            try:
                facts = _launch_compiled(family, cfg, problem, inputs, dev)
                y = family.launch(cfg, problem, inputs)
                err = relative_error(y.double().cpu(), ref.cpu())
                row.update(facts, rel_err=err, correct=err <= tol)
                t = benchmark(lambda: family.launch(cfg, problem, inputs), device=dev, **_reps(smoke))
                row.update(ms=t.median_ms, p20=t.p20_ms, p80=t.p80_ms)
            except Exception as e:  # noqa: BLE001 - a failing configuration is a finding
                row.update(error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
        for r in rows:
            if r.get("ms"):
                r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
        rep.add("kernels", dict(problem=label, family=fam_name, spec=family.problem_to_dict(problem),
                                tolerance=tol, rows=rows))
        del inputs, ref


def _reps(smoke: bool) -> dict:
    return dict(warmup_ms=0.0, rep_ms=0.0, min_reps=1) if smoke else dict(warmup_ms=10.0, rep_ms=60.0)


def _host_us(fn, n: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()  # host time only: launches are asynchronous
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def section_host(rep: Report, dev: torch.device, smoke: bool) -> None:
    from torchtune_ops.kernels.gemm import GEMM, gemm, gemm_problem

    M, N, K = (1, 40, 48) if smoke else (1, 4096, 4096)
    dtype = torch.float16 if smoke else torch.bfloat16
    a = torch.randn(M, K, device=dev, dtype=dtype)
    w = torch.randn(N, K, device=dev, dtype=dtype)
    cfg = GEMM.known_configs(gemm_problem(a, w.t(), op="linear"), device_limits(dev))[0]
    n = 20 if smoke else 2000
    fns = {"torch.nn.functional.linear": lambda: torch.nn.functional.linear(a, w),
           "gemm()": lambda: gemm(a, w.t(), config=cfg)}
    row = dict(shape=[M, N, K], dtype=str(dtype), config=cfg.as_dict(), calls=n)
    for name, fn in fns.items():
        row[f"{name} eager us"] = _host_us(fn, n)
        if dev.type == "cuda":
            try:
                g = torch.cuda.CUDAGraph()
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    fn()
                torch.cuda.current_stream().wait_stream(s)
                with torch.cuda.graph(g):
                    fn()
                row[f"{name} graph replay us"] = _host_us(g.replay, n)
            except Exception as e:  # noqa: BLE001
                row[f"{name} graph replay"] = f"{type(e).__name__}: {e}"[:200]
    rep.add("host", row)


def section_tests(rep: Report, dev: torch.device) -> None:
    if dev.type != "cuda":
        rep.add("tests", dict(skipped="no CUDA device (the CPU suite runs in CI)"))
        return
    budget = int(rep.left() - 150)  # leave time for the tuner and the table
    if budget < 45:
        rep.add("tests", dict(skipped="deadline"))
        return
    try:
        import xdist  # noqa: F401
        par = ["-n", "8"]
    except ImportError:
        par = []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *par, "-m", "not slow",
           "tests/test_gemm.py", "tests/test_conv.py"]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=budget)
        tail = (r.stdout + r.stderr).strip().splitlines()
        rep.add("tests", dict(cmd=" ".join(cmd[2:]), rc=r.returncode, wall_s=time.perf_counter() - t0,
                              summary=tail[-1] if tail else "", failures=[ln for ln in tail if "FAILED" in ln][:30]))
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")
        out = out.decode() if isinstance(out, bytes) else out
        rep.add("tests", dict(cmd=" ".join(cmd[2:]), rc=None, timed_out_s=budget,
                              failures=[ln for ln in out.splitlines() if "FAILED" in ln][:30]))


def section_tuner(rep: Report, dev: torch.device, smoke: bool) -> None:
    from torchtune_ops.kernels.conv import CONV2D
    from torchtune_ops.kernels.gemm import GEMM
    from torchtune_ops.storage.store import Store
    from torchtune_ops.tuning.tuner import tune_problem
    import representative as R

    store_dir = Path(tempfile.mkdtemp(prefix="gpu_quick_store_"))
    problems = [("decode bf16 M=16 11008x4096", GEMM), ("resnet 3x3 64ch 56^2 b32", CONV2D)]
    by_label = {label: p for label, _, p in R.REPRESENTATIVE}
    for label, family in problems:
        if rep.left() < 40:
            rep.add("tuner", dict(problem=label, skipped="deadline"))
            continue
        problem = tiny(by_label[label]) if smoke else by_label[label]
        t0 = time.perf_counter()
        try:
            store = Store.open(store_dir / "tuning.sqlite")
            entry = tune_problem(family, problem, device=dev, store=store, force=True,
                                 max_trials=3 if smoke else 40, time_budget_s=2 if smoke else 20)
            rep.add("tuner", dict(problem=label, wall_s=time.perf_counter() - t0,
                                  entry=_plain(entry)))
        except Exception as e:  # noqa: BLE001
            rep.add("tuner", dict(problem=label, wall_s=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"[:400]))


def _plain(obj):
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else str(obj)


def section_inductor(rep: Report, dev: torch.device) -> None:
    if dev.type != "cuda":
        rep.add("inductor", dict(skipped="needs CUDA"))
        return
    if rep.left() < 60:
        rep.add("inductor", dict(skipped="less than a minute left"))
        return
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    try:
        f = torch.compile(lambda x, y: x @ y, mode="max-autotune-no-cudagraphs", dynamic=False)
        f(a, b)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        t = benchmark(lambda: f(a, b), device=dev, warmup_ms=10, rep_ms=60)
        ta = benchmark(lambda: a @ b, device=dev, warmup_ms=10, rep_ms=60)
        rep.add("inductor", dict(compile_s=wall, ms=t.median_ms, aten_ms=ta.median_ms,
                                 tflops=2 * 4096**3 / (t.median_ms * 1e-3) / 1e12))
    except Exception as e:  # noqa: BLE001
        rep.add("inductor", dict(error=f"{type(e).__name__}: {e}"[:400], wall_s=time.perf_counter() - t0))


def table(doc: dict) -> str:
    lines = [f"{'problem':32} {'method':16} {'ms':>9} {'TFLOP/s':>8} {'rel err':>9} {'regs':>4} {'spill':>5}"]
    for k in doc["sections"].get("kernels", []):
        for r in k.get("rows", []):
            name = r["method"] if r["method"] != "triton" else "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}w{num_warps}k{SPLIT_K}".format(**{"SPLIT_K": 1, **r["config"]})
            ms = r.get("ms")
            lines.append(f"{k['problem'][:32]:32} {name[:16]:16} {ms if ms is None else round(ms, 4)!s:>9} "
                         f"{round(r.get('tflops') or 0, 1):>8} {r.get('rel_err', float('nan')):>9.2e} "
                         f"{r.get('registers', '-')!s:>4} {r.get('spills', '-')!s:>5}"
                         + (f"  {r['error'][:60]}" if "error" in r else ""))
    for sec in ("host", "tests", "tuner", "inductor"):
        for r in doc["sections"].get(sec, []):
            lines.append(f"{sec}: " + json.dumps(r, default=str)[:200])
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or HERE / "results"))
    ap.add_argument("--deadline-s", type=float, default=450.0, help="start nothing new after this (default 450)")
    ap.add_argument("--configs", type=int, default=3, help="known configurations timed per problem (3)")
    ap.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny sizes (seconds)")
    ap.add_argument("--block-extras", action="store_true", help="make optuna/platformdirs imports fail")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    rep = Report(args.out / ("gpu_quick-smoke.json" if args.smoke else "gpu_quick.json"),
                 time.monotonic() + args.deadline_s)
    rep.doc["env"] = environment(dev)
    rep.doc["smoke"] = args.smoke
    rep.add("env", rep.doc["env"])
    skip = set(filter(None, args.skip.split(",")))
    n_configs = 2 if args.smoke else args.configs
    for name, fn in (("kernels", lambda: section_kernels(rep, dev, args.smoke, n_configs)),
                     ("host", lambda: section_host(rep, dev, args.smoke)),
                     ("tests", lambda: section_tests(rep, dev)),
                     ("tuner", lambda: section_tuner(rep, dev, args.smoke)),
                     ("inductor", lambda: section_inductor(rep, dev))):
        if name in skip:
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
            rep.add(name, dict(error=f"{type(e).__name__}: {e}"[:400]))
    rep.doc["finished"] = _now()
    rep.add("done", dict(left_s=rep.left()))
    print(table(rep.doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
