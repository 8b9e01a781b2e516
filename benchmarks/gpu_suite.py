"""The GPU evidence suite: us against cuBLAS/cuDNN, Inductor max-autotune and Triton's autotune (issue 9).

Expected time on an H100: each call at most --budget-s (540 s; scripts/gpu_run.sh uses 480 s + 60 s);
the whole suite about 55 minutes (estimate), one call per 15-minute GPU session. Run gpu_quick.sh first.

    python benchmarks/gpu_suite.py --section kernels     # one section, resumable, at most --budget-s (540 s)
    python benchmarks/gpu_suite.py --section search      # record spaces on the GPU, then replay tune() on them
    python benchmarks/gpu_suite.py --section e2e         # GPT-2 small and ResNet-50, end to end
    python benchmarks/gpu_suite.py --section report      # only rewrite the markdown summary from the JSON
    python benchmarks/gpu_suite.py --smoke               # every section on CPU in seconds (CI)

Sections (docs/gpu.md has the details and the order to run them on a lent GPU):

* ``kernels``: for the kernel benchmark's shape suite (bench_kernels.py: LLM projections, odd sizes,
  ResNet-50 convs in channels_last), per problem: PyTorch's kernel (``aten``); our tuned result
  (``tuner.tune_problem`` into a fresh store: kernel time and tuning wall time); Inductor max-autotune's
  choice (the one op compiled with ``torch.compile(mode="max-autotune")``: kernel time and compile wall
  time); ``triton.autotune`` over Inductor's mm configurations (a plain Triton matmul, GEMM problems
  only). Geomean speedups over PyTorch by category (large square, skinny, odd, split-K, conv).
* ``search``: ``record_space.py`` on a few GEMM and conv problems (bounded, resumable), then the replay of
  ``tune()`` (and random search, plain Optuna TPE) on them through ``search_efficiency.py``.
* ``e2e``: GPT-2 small (transformers' GPT2LMHeadModel from a config, random weights; else models.py) and
  ResNet-50 (torchvision, random weights; else models.py), bf16 and fp16, batch 1 and a large batch:
  eager, torch.compile default, max-autotune and ``torchtune_ops.optimize``: latency per batch (median,
  run-to-run noise), compile/tuning wall time from cold caches (a new process with empty caches) and
  time to first inference with warm caches (another new process on the same caches).

Results: ``benchmarks/results/gpu_suite-<gpu>.json`` (machine, versions, dates; rewritten after every
measurement, so a killed run keeps what it measured; ``--mirror DIR`` copies it there too, e.g. $OUT)
and ``gpu_suite-<gpu>.md``, generated from the JSON. A run skips what the JSON already holds.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_SMOKE = "--smoke" in sys.argv
_CHILD = "--e2e-child" in sys.argv
if (_SMOKE or _CHILD) and not torch.cuda.is_available():  # a child on CPU is a smoke child
    # The interpreter is chosen when kernels are decorated: set it before they are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)  # tiny CPU models: threads only contend (CI machines are small and shared)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from replay import json_safe  # noqa: E402

RESULTS = HERE / "results"
SMOKE_RESULTS = HERE / "out"  # git-ignored

SECTIONS = ("kernels", "search", "e2e")
KERNEL_METHODS = ("aten", "tuned", "inductor", "triton_autotune")
CATEGORIES = ("large square", "skinny", "odd", "split-K", "conv")
E2E_VARIANTS = ("eager", "compile", "max-autotune", "optimize")
SMOKE_NOTE = ("smoke (CPU): kernels through the Triton interpreter; Inductor max-autotune and "
              "torch.compile's Inductor need a CUDA GPU here, so they are replaced by eager stand-ins "
              "(marked 'stand-in'); timings mean nothing")


# --------------------------------------------------------------------------------------------- results

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    out = {}
    for mod in ("transformers", "torchvision", "optuna", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as missing
            out[mod] = None
    return out


class Results:
    """The suite's JSON file: ``{"meta": {...}, "sections": {name: {key: row}}}``, saved after every put
    (atomically), with the markdown summary beside it and copies in ``mirror``."""

    def __init__(self, path: Path, *, meta: dict, mirror: Path | None = None, keep_meta: bool = False) -> None:
        self.path, self.mirror = path, mirror
        self.data = {"meta": dict(meta, created=_now()), "sections": {s: {} for s in SECTIONS}}
        if path.exists():
            try:
                old = json.loads(path.read_text())
                if isinstance(old.get("sections"), dict):
                    self.data["sections"].update(old["sections"])
                    if keep_meta and isinstance(old.get("meta"), dict):  # a CPU replay/report of GPU results
                        self.data["meta"] = dict(old["meta"])
                    self.data["meta"]["created"] = old.get("meta", {}).get("created", self.data["meta"]["created"])
                    self.data["meta"]["runs"] = old.get("meta", {}).get("runs", [])
            except (OSError, ValueError) as e:
                print(f"[gpu_suite] {path} unreadable ({type(e).__name__}); starting afresh")
        self.data["meta"].setdefault("runs", []).append({"date": _now(), "on": meta.get("gpu"),
                                                         "torch": meta.get("torch"),
                                                         "triton": meta.get("triton")})

    def has(self, section: str, key: str) -> bool:
        return key in self.data["sections"].setdefault(section, {})

    def get(self, section: str, key: str) -> dict | None:
        return self.data["sections"].setdefault(section, {}).get(key)

    def put(self, section: str, key: str, row: dict) -> None:
        self.data["sections"].setdefault(section, {})[key] = dict(row, date=_now())
        self.save()

    @property
    def md_path(self) -> Path:
        return self.path.with_suffix(".md")

    def save(self) -> None:
        self.data["meta"]["updated"] = _now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for path, text in ((self.path, json.dumps(json_safe(self.data), indent=1)), (self.md_path, markdown(self.data))):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
            if self.mirror is not None:
                self.mirror.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, self.mirror / path.name)


# --------------------------------------------------------------------------------------------- kernels

def category(suite: str, family_name: str, problem) -> str:
    """The issue's reporting category of a kernel problem."""
    if family_name == "conv2d":
        return "conv"
    if problem.M <= 16:
        return "skinny"
    if problem.batch * problem.M * problem.N <= 128 * 4096 and problem.K >= 8192:
        return "split-K"  # few output tiles, a long reduction
    if suite == "odd" or any(d % 128 for d in (problem.M, problem.N, problem.K)):
        return "odd"
    return "large square"


def kernel_problems(smoke: bool) -> list[tuple[str, str, object, object]]:
    """(name, category, family, problem) of the issue-2 shape suite (the smoke suite with ``smoke``)."""
    import bench_kernels

    suites = bench_kernels.smoke_suites() if smoke else {**bench_kernels.gemm_suites(), **bench_kernels.conv_suites()}
    rows = [(name, category(suite, family.name, problem), family, problem)
            for suite, rows in suites.items() for name, family, problem in rows]
    # GEMMs first, then convs at the larger batch: a budget-limited first run measures those
    return sorted(rows, key=lambda r: (r[1] == "conv", -getattr(r[3], "N", 0) if r[1] == "conv" else 0))


def _timing_kw(device: torch.device, rep_ms: float) -> dict:
    if device.type == "cuda":
        return dict(warmup_ms=rep_ms / 4, rep_ms=rep_ms, min_reps=10)
    return dict(warmup_ms=0.0, rep_ms=1.0, min_reps=1, max_reps=2)


def _timed(fn, device, **kw) -> dict:
    from torchtune_ops.tuning.timing import benchmark

    t = benchmark(fn, device=device, **kw)
    return {"ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "reps": t.n}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_TRITON_MM = None


def _triton_mm_kernel():
    """A plain batched Triton matmul (``C = A @ B [+ row bias]``, any strides), defined on first use."""
    global _TRITON_MM
    if _TRITON_MM is None:
        import triton
        import triton.language as tl

        @triton.jit
        def mm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K,
                      s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn,
                      HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
            pid = tl.program_id(0)
            pid_b = tl.program_id(1).to(tl.int64)
            num_m = tl.cdiv(M, BLOCK_M)
            num_n = tl.cdiv(N, BLOCK_N)
            width = GROUP_M * num_n
            first_m = (pid // width) * GROUP_M
            size_m = tl.minimum(num_m - first_m, GROUP_M)
            pid_m = first_m + (pid % width) % size_m
            pid_n = (pid % width) // size_m
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            rk = tl.arange(0, BLOCK_K)
            a_ptrs = a_ptr + pid_b * s_ab + rm[:, None] * s_am + rk[None, :] * s_ak
            b_ptrs = b_ptr + pid_b * s_bb + rk[:, None] * s_bk + rn[None, :] * s_bn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, tl.cdiv(K, BLOCK_K)):
                k_left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
                b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
                if UPCAST:  # the interpreter multiplies bf16 dot operands as raw bits
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_ptrs += BLOCK_K * s_ak
                b_ptrs += BLOCK_K * s_bk
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            c_ptrs = c_ptr + pid_b * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

        _TRITON_MM = mm_kernel
    return _TRITON_MM


def inductor_mm_configs(problem, *, smoke: bool) -> list:
    """Inductor's mm configurations fitted to the problem the way Inductor fits them, as triton.Configs."""
    import triton
    from torchtune_ops.kernels import gemm_space

    seen, out = set(), []
    for entry in gemm_space.INDUCTOR_MM:
        c = gemm_space._fit(entry, problem)
        key = (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"])
        if key not in seen:
            seen.add(key)
            out.append(triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"],
                                      "GROUP_M": 8}, num_warps=c["num_warps"], num_stages=c["num_stages"]))
    return out[:1] if smoke else out


def triton_autotune_fn(problem, inputs, *, smoke: bool):
    """A callable running ``triton.autotune`` (a fresh autotuner: its first call benchmarks every config)
    over Inductor's mm configurations on ``inputs``; None with a reason when the problem is out of reach."""
    import triton
    from torchtune_ops.kernels import _compat

    if problem.activation != "none" or problem.bias not in ("none", "row") or problem.op in ("addmm", "baddbmm"):
        return None, "plain matmul only (no activation, alpha/beta or 2-D bias)"
    a, b, bias = inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None
    tuned = triton.autotune(configs=inductor_mm_configs(problem, smoke=smoke), key=["M", "N", "K"])(_triton_mm_kernel())
    batched = a.dim() == 3
    batch = a.shape[0] if batched else 1
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    c = torch.empty((batch, M, N) if batched else (M, N), dtype=a.dtype, device=a.device)
    sa = a.stride() if batched else (0,) + a.stride()
    sb = b.stride() if batched else (0,) + b.stride()
    sc = c.stride() if batched else (0,) + c.stride()
    upcast = _compat.UPCAST_BF16_DOT and a.dtype == torch.bfloat16
    precision = "ieee" if a.dtype == torch.float32 and problem.precision == "ieee" else "tf32"

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), batch)

    def run():
        tuned[grid](a, b, c, bias if bias is not None else a, M, N, K, *sa, *sb, *sc,
                    HAS_BIAS=bias is not None, UPCAST=upcast, PRECISION=precision)
        return c

    return run, ""


def torch_op(family, problem):
    """The problem as plain PyTorch ops, what torch.compile gets to see: the family's reference, except
    conv2d without its precision context manager (a graph break that would leave the conv in eager)."""
    pad = getattr(problem, "padding", (0, 0, 0, 0))
    if family.name != "conv2d" or problem.activation != "none" or pad[0] != pad[1] or pad[2] != pad[3]:
        return lambda *xs: family.reference(problem, xs)
    import torch.nn.functional as F

    def conv(x, w, b):
        return F.conv2d(x, w, b, problem.stride, (pad[0], pad[2]), problem.dilation, problem.groups)

    return conv


def _kernel_row(method: str, name: str, cat: str, family, problem, inputs, ref, *, device, smoke, args,
                store_path: Path) -> dict:
    from torchtune_ops.kernels.base import Config, relative_error

    row = {"name": name, "category": cat, "family": family.name, "method": method,
           "problem": family.problem_to_dict(problem), "gflop": family.flops(problem) / 1e9}
    kw = _timing_kw(device, args.rep_ms)
    tol = family.tolerance(problem)

    def check(out) -> None:
        err = relative_error(out, ref)
        row["rel_err"] = err
        if not err <= tol:
            row["error"] = f"wrong result (relative error {err:.3g} > {tol:.3g})"

    if method == "aten":
        row.update(_timed(lambda: family.reference(problem, inputs), device, **kw))
    elif method == "tuned":
        from torchtune_ops.storage.store import Store
        from torchtune_ops.tuning.tuner import tune_problem

        store = Store.open(store_path, readonly=False)
        t0 = time.perf_counter()
        entry = tune_problem(family, problem, device=device, store=store, max_trials=args.tune_trials,
                             time_budget_s=args.tune_budget_s, force=True, seed=0)
        _sync(device)
        row["wall_s"] = time.perf_counter() - t0
        row.update(winner=entry.winner, trials=entry.trials, tuner_ms=entry.time_ms, tuner_aten_ms=entry.aten_ms)
        if entry.winner == "aten":
            fn = lambda: family.reference(problem, inputs)  # noqa: E731
        else:
            cfg, out = Config.from_json(entry.winner), torch.empty_like(ref)
            fn = lambda: family.launch(cfg, problem, inputs, out=out)  # noqa: E731
        check(fn())
        row.update(_timed(fn, device, **kw))
    elif method == "inductor":
        fn = torch_op(family, problem)
        if device.type != "cuda":
            row["note"] = "stand-in: eager (Inductor max-autotune needs a CUDA GPU)"
            compiled = fn
        else:
            torch._dynamo.reset()
            compiled = torch.compile(fn, mode="max-autotune", dynamic=False)
        t0 = time.perf_counter()
        out = compiled(*inputs)
        _sync(device)
        row["wall_s"] = time.perf_counter() - t0
        check(out)
        row.update(_timed(lambda: compiled(*inputs), device, **kw))
    elif method == "triton_autotune":
        if family.name != "gemm":
            row["skipped"] = "GEMM only"
            return row
        run, why = triton_autotune_fn(problem, inputs, smoke=smoke)
        if run is None:
            row["skipped"] = why
            return row
        row["configs"] = len(inductor_mm_configs(problem, smoke=smoke))
        t0 = time.perf_counter()
        out = run()
        _sync(device)
        row["wall_s"] = time.perf_counter() - t0
        check(out.clone())
        row.update(_timed(run, device, **kw))
    if "ms" in row and row["ms"] > 0:
        row["tflops"] = family.flops(problem) / (row["ms"] * 1e-3) / 1e12
    return row


def section_kernels(res: Results, *, device, smoke: bool, deadline: float, args) -> bool:
    """Measure what the JSON lacks; True when the section is complete."""
    tmp = Path(tempfile.mkdtemp(prefix="gpu_suite_store_"))
    try:
        for name, cat, family, problem in kernel_problems(smoke):
            todo = [m for m in KERNEL_METHODS if not res.has("kernels", f"{name}|{m}")
                    or (args.retry_errors and "error" in res.get("kernels", f"{name}|{m}"))]
            if not todo:
                continue
            inputs = family.make_inputs(problem, device)
            ref = family.reference(problem, inputs)
            for method in todo:
                if time.monotonic() > deadline:
                    print("[gpu_suite] kernels: time budget reached; run the section again to continue")
                    return False
                t0 = time.perf_counter()
                try:
                    row = _kernel_row(method, name, cat, family, problem, inputs, ref, device=device, smoke=smoke,
                                      args=args, store_path=tmp / "tune.sqlite")
                except Exception as e:  # noqa: BLE001 - a failing method is reported, never fatal to the suite
                    row = {"name": name, "category": cat, "family": family.name, "method": method,
                           "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    import record_space

                    if device.type == "cuda" and not record_space._context_ok(device):
                        res.put("kernels", f"{name}|{method}", row)
                        print(f"[gpu_suite] kernels {name} {method} broke the CUDA context; run the section again")
                        return False
                row["seconds"] = time.perf_counter() - t0
                res.put("kernels", f"{name}|{method}", row)
                ms = row.get("ms")
                print(f"[gpu_suite] kernels {name:<40} {method:<16} "
                      + (f"{ms:9.4f} ms" if ms else f"{'-':>9}   ")
                      + (f"  wall {row['wall_s']:.1f} s" if "wall_s" in row else "")
                      + (f"  ({row.get('error') or row.get('skipped') or row.get('note')})"
                         if any(k in row for k in ("error", "skipped", "note")) else ""), flush=True)
            if device.type == "cuda":
                del inputs, ref
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x and math.isfinite(x) and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def kernel_summary(rows: dict) -> dict:
    """Per category and overall: geomean speedup over aten of each method, and tuning/compile wall time."""
    by_problem: dict[str, dict] = {}
    for r in rows.values():
        by_problem.setdefault(r["name"], {})[r["method"]] = r
    out: dict[str, dict] = {}
    for cat in CATEGORIES + ("all",):
        probs = [p for p in by_problem.values() if cat == "all" or p.get("aten", {}).get("category") == cat]
        if not probs:
            continue
        cell = {"problems": len(probs)}
        for m in KERNEL_METHODS[1:]:
            sp = [p["aten"]["ms"] / p[m]["ms"] for p in probs
                  if p.get("aten", {}).get("ms") and p.get(m, {}).get("ms") and "error" not in p[m]]
            walls = [p[m]["wall_s"] for p in probs if "wall_s" in p.get(m, {})]
            cell[m] = {"geomean_speedup": _geomean(sp), "n": len(sp),
                       "wall_s_total": sum(walls) if walls else math.nan}
        out[cat] = cell
    return out


# --------------------------------------------------------------------------------------------- search

def _repo_relative(path: str) -> str:
    """``path`` relative to the repository root when it lies inside (results move between machines)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(HERE.parent))
    except ValueError:
        return str(p)

def section_search(res: Results, *, device, smoke: bool, deadline: float, args) -> bool:
    """Record the search spaces (GPU), then replay tune() on the complete ones."""
    import record_space

    known = record_space.all_shapes(smoke=smoke)
    patterns = args.search_shape or ([next(iter(known))] if smoke else list(record_space.DEFAULT_SHAPES))
    complete = True
    if device.type == "cuda" or smoke:
        for name in record_space.pick(patterns, known):
            key = f"record|{name}"
            row = res.get("search", key)
            if row and row.get("complete"):
                continue
            if time.monotonic() > deadline:
                print("[gpu_suite] search: time budget reached; run the section again to continue")
                return False
            sums = record_space.record(shapes=[name], smoke=smoke, out_dir=args.spaces_dir,
                                       budget_s=max(1.0, deadline - time.monotonic()), rep_ms=args.space_rep_ms,
                                       workers=args.workers)
            s = sums[0]
            s["path"] = _repo_relative(s["path"])
            res.put("search", key, s)
            complete &= bool(s["complete"])
    if not complete:
        return False
    if res.has("search", "replay") and not args.replay_again:
        return True
    if device.type == "cuda" and not smoke and not args.replay_on_gpu:
        print(f"[gpu_suite] search: spaces recorded; the replay needs no GPU, so it is left for the development "
              f"machine: benchmarks/gpu_suite.py --section search --results {_repo_relative(str(res.path))} "
              f"(or pass --replay-on-gpu)")
        return True
    rows = [r for k, r in res.data["sections"]["search"].items() if k.startswith("record|") and r.get("complete")]
    paths = [str(HERE.parent / r["path"]) for r in rows if (HERE.parent / r["path"]).exists()]
    if not paths:
        print("[gpu_suite] search: no complete recorded space here to replay")
        return False
    try:
        import optuna  # noqa: F401 - tune() and the plain-TPE baseline need it
    except ImportError:
        print("[gpu_suite] search: optuna is missing (install the wheels, see docs/gpu.md); replay skipped")
        return False
    if time.monotonic() > deadline - 60 and not smoke:
        print("[gpu_suite] search: too little time left to replay; run `--section search` again "
              "(on any machine: the replay needs no GPU)")
        return False
    import search_efficiency

    out = Path(tempfile.mkdtemp(prefix="gpu_suite_replay_"))
    try:
        argv = [a for p in paths for a in ("--space", p)] + ["--out", str(out), "--jobs", str(args.replay_jobs)]
        argv += (["--seeds", "2", "--budget", "6", "--methods", "tune,random"] if smoke else
                 ["--seeds", str(args.replay_seeds), "--budget", "200", "--methods", args.replay_methods])
        t0 = time.perf_counter()
        search_efficiency.main(argv)
        files = sorted(out.glob("search_efficiency*.json"))
        rec = json.loads(files[-1].read_text())
        res.put("search", "replay", {"spaces": rec["spaces"], "summary": rec["summary"], "targets": rec["targets"],
                                     "table": rec["table"], "seeds": rec["seeds"], "budget": rec["budget"],
                                     "seconds": time.perf_counter() - t0})
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return True


# --------------------------------------------------------------------------------------------- e2e

@dataclasses.dataclass(frozen=True)
class E2EItem:
    model: str
    dtype: str
    batch: int
    variant: str

    @property
    def key(self) -> str:
        return f"{self.model}|{self.dtype}|b{self.batch}|{self.variant}"


GPT2_SEQ = 512
#: the large batch of each model (warm starts are measured there only, unless --warm-all)
LARGE_BATCH = {"gpt2": 16, "resnet50": 64}


def wants_warm(item: E2EItem, *, smoke: bool, warm_all: bool) -> bool:
    """Whether ``item`` gets a warm-start measurement: compiled variants at the large batch, so once per
    model, dtype and variant (to save device time), or at every batch with ``warm_all``; in smoke, all."""
    return item.variant != "eager" and (smoke or warm_all or item.batch == LARGE_BATCH.get(item.model))


def e2e_items(smoke: bool, models: list[str] | None = None) -> list[E2EItem]:
    """What the section measures, most informative first (a budget-limited run does those)."""
    if smoke:
        return [E2EItem(m, "float32", 1, v) for m in ("gpt2", "resnet50") for v in E2E_VARIANTS]
    batches = {m: (b, 1) for m, b in LARGE_BATCH.items()}
    items = []
    for dtype in ("bfloat16", "float16"):
        for m in models or ("gpt2", "resnet50"):
            for b in batches[m]:
                items += [E2EItem(m, dtype, b, v) for v in E2E_VARIANTS]
    return items


def build_model(name: str, *, smoke: bool, layers: int = 12):
    """(model, example input spec, where it came from) for "gpt2" (GPT-2 small's sizes with ``layers``
    blocks) or "resnet50", random weights."""
    from torchtune_ops import models

    torch.manual_seed(0)
    if name == "gpt2":
        if not smoke:
            try:
                from transformers import GPT2Config, GPT2LMHeadModel

                cfg = GPT2Config(n_positions=1024, n_embd=768, n_layer=layers, n_head=12, vocab_size=50257,
                                 use_cache=False)
                model = GPT2LMHeadModel(cfg).eval()
                return (model, ("tokens", cfg.vocab_size, GPT2_SEQ),
                        f"transformers GPT2LMHeadModel (GPT-2 small config, {layers} layers)")
            except ImportError:
                cfg = models.GPT2Config(vocab=50257, seq=GPT2_SEQ, dim=768, heads=12, layers=layers)
                return (models.GPT2(cfg).eval(), ("tokens", 50257, GPT2_SEQ),
                        f"models.GPT2 at GPT-2 small sizes, {layers} layers")
        cfg = models.SIZES["tiny"]["gpt2"]
        return models.GPT2(cfg).eval(), ("tokens", cfg.vocab, cfg.seq), "models.GPT2 tiny (smoke)"
    if not smoke:
        try:
            import torchvision

            return torchvision.models.resnet50(weights=None).eval(), ("image", 224), "torchvision resnet50"
        except ImportError:
            return models.ResNet(**models.SIZES["base"]["resnet"]).eval(), ("image", 224), "models.ResNet base"
    spec = models.SIZES["tiny"]
    return models.ResNet(**spec["resnet"]).eval(), ("image", spec["image"]), "models.ResNet tiny (smoke)"


def _example(spec: tuple, batch: int, device, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if spec[0] == "tokens":
        return torch.randint(0, spec[1], (batch, spec[2]), generator=g).to(device)
    x = torch.randn(batch, 3, spec[1], spec[1], generator=g)
    return x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _logits(y) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y
    return y.logits if hasattr(y, "logits") else y[0]


def run_child(spec: dict) -> dict:
    """One e2e measurement (in a fresh process, except in smoke mode): build, compile, first call, latency.
    Shipped bundles are off, so optimize()'s cold run tunes from scratch and its warm run reads only what
    the cold run stored."""
    from torchtune_ops import settings

    with settings.override(use_shipped=False):
        out = _measure(spec)
    out["bundles"] = "off"
    return out


def _measure(spec: dict) -> dict:
    t_proc = spec.get("spawned_at")
    smoke = spec["smoke"]
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    item = E2EItem(spec["model"], spec["dtype"], spec["batch"], spec["variant"])
    model, ex_spec, origin = build_model(item.model, smoke=smoke, layers=spec.get("gpt2_layers", 12))
    model = model.to(device=device, dtype=dtype)
    if ex_spec[0] == "image":
        model = model.to(memory_format=torch.channels_last)
    x = _example(ex_spec, item.batch, device, dtype)
    out = {"origin": origin, "mode": spec["mode"]}
    with torch.no_grad():
        if spec["mode"] == "cold":
            ref = _logits(model(x)).float()  # eager reference (also warms cuBLAS/cuDNN like any first run)
            _sync(device)
        m = model
        if item.variant == "compile":
            m = torch.compile(model, dynamic=False, **({"backend": "eager"} if device.type != "cuda" else {}))
        elif item.variant == "max-autotune":
            if device.type == "cuda":
                m = torch.compile(model, mode="max-autotune", dynamic=False)
            else:
                m = torch.compile(model, backend="eager", dynamic=False)
        elif item.variant == "optimize":
            import torchtune_ops

            m = torchtune_ops.optimize(model, autotune=True, cache_dir=spec["cache_dir"], dynamic=False,
                                       max_trials=spec["max_trials"], time_budget_s=spec["time_budget_s"],
                                       compiler="inductor" if device.type == "cuda" else "eager")
        if device.type != "cuda" and item.variant in ("compile", "max-autotune"):
            out["note"] = "stand-in: torch.compile(backend='eager') (Inductor needs a CUDA GPU here)"
        elif device.type != "cuda" and item.variant == "optimize":
            out["note"] = "compiler='eager' (no Inductor on this CPU run); tuned kernels through the interpreter"
        t0 = time.perf_counter()
        y = _logits(m(x))
        _sync(device)
        out["first_call_s"] = time.perf_counter() - t0
        if t_proc is not None:
            out["process_to_first_output_s"] = time.time() - t_proc
        if spec["mode"] == "cold":
            from torchtune_ops.kernels.base import relative_error

            out["rel_err_vs_eager"] = relative_error(y.float(), ref)
            kw = (dict(warmup_ms=200.0, rep_ms=spec["rep_ms"], min_reps=10, flush_l2=False) if device.type == "cuda"
                  else dict(warmup_ms=0.0, rep_ms=1.0, min_reps=2, max_reps=3))
            rounds = [_timed(lambda: m(x), device, **kw) for _ in range(2)]
            meds = [r["ms"] for r in rounds]
            out["latency_ms"] = sum(meds) / len(meds)
            out["rounds_ms"] = meds
            spreads = [(r["p80_ms"] - r["p20_ms"]) / r["ms"] for r in rounds if r["ms"] > 0]
            out["noise"] = max(spreads + [abs(meds[0] - meds[1]) / max(min(meds), 1e-9)])
        if item.variant == "optimize":
            import torchtune_ops

            from torchtune_ops.runtime import backend

            probs = torchtune_ops.explain(print_it=False).get("problems", [])
            left = backend.left_by_cache()   # cache hits left to Inductor at compile time, by source
            out["left_to_inductor"] = sum(left.values())
            out["problems"] = len(probs) + out["left_to_inductor"]
            out["triton_winners"] = sum(1 for p in probs if p.get("kernel") != "aten")
            out["sources"] = sorted({p.get("source", "") for p in probs} | set(left))
    return out


#: most seconds one e2e measurement (a new process: build, compile or tune, time) may take
E2E_ITEM_LIMIT_S = 480.0


def _spawn_child(spec: dict, env: dict, timeout_s: float) -> dict | None:
    """Run one measurement in a new process; None when it ran past ``timeout_s`` (the section's deadline:
    measured again next run), an error row when it failed or ran past ``E2E_ITEM_LIMIT_S``."""
    spec = dict(spec, spawned_at=time.time())
    cmd = [sys.executable, str(Path(__file__).resolve()), "--e2e-child", json.dumps(spec)]
    limit = min(timeout_s, E2E_ITEM_LIMIT_S)
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        if limit < E2E_ITEM_LIMIT_S:
            return None
        return {"error": f"took more than {limit:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout)[-600:]
    return {"error": f"child exited {p.returncode}: {tail}"}


def section_e2e(res: Results, *, device, smoke: bool, deadline: float, args) -> bool:
    base = Path(tempfile.mkdtemp(prefix="gpu_suite_e2e_"))
    try:
        for item in e2e_items(smoke, args.model):
            row = res.get("e2e", item.key) or {}
            if args.retry_errors and any("error" in row.get(m, {}) for m in ("cold", "warm")):
                row = {}
            need_cold = "cold" not in row
            warm = wants_warm(item, smoke=smoke, warm_all=args.warm_all)
            need_warm = warm and "warm" not in row and "error" not in row.get("cold", {})
            if not (need_cold or need_warm):
                continue
            left = deadline - time.monotonic()
            if left < (5 if smoke else 30):
                print("[gpu_suite] e2e: time budget reached; run the section again to continue")
                return False
            caches = base / item.key.replace("|", "_")
            spec = {"model": item.model, "dtype": item.dtype, "batch": item.batch, "variant": item.variant,
                    "device": str(device), "smoke": smoke, "cache_dir": str(caches / "torchtune_ops"),
                    "max_trials": args.e2e_tune_trials, "time_budget_s": args.e2e_tune_budget_s,
                    "rep_ms": args.e2e_rep_ms, "gpt2_layers": args.gpt2_layers}
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"),
                       TRITON_CACHE_DIR=str(caches / "triton"), PYTHONUNBUFFERED="1")
            env = {k: v for k, v in env.items() if not k.startswith("TORCHTUNE_OPS_")}  # the spec decides
            if not need_cold:  # a warm measurement needs the caches of its own cold run: measure both again
                row = {}
            for mode in ("cold", "warm") if warm else ("cold",):
                s = dict(spec, mode=mode)
                t0 = time.perf_counter()
                # smoke: in-process (seconds instead of a new interpreter each), except optimize()'s warm
                # start, which shows that a new process finds what the first one tuned
                if smoke and not (item.variant == "optimize" and mode == "warm"):
                    torch._dynamo.reset()
                    r = run_child(s)
                    r["note"] = (r.get("note", "") + "; in-process (smoke)").lstrip("; ")
                else:
                    r = _spawn_child(s, env, max(30.0, deadline - time.monotonic()))
                    if r is None:
                        print(f"[gpu_suite] e2e {item.key} {mode}: stopped at the time budget; run the section again")
                        return False
                r["wall_s"] = time.perf_counter() - t0
                row[mode] = r
                res.put("e2e", item.key, dict(row, model=item.model, dtype=item.dtype, batch=item.batch,
                                              variant=item.variant))
                lat = r.get("latency_ms")
                print(f"[gpu_suite] e2e {item.key:<34} {mode:<4} first call {r.get('first_call_s', math.nan):8.2f} s"
                      + (f"  latency {lat:9.3f} ms (noise {r['noise'] * 100:.1f}%)" if lat else "")
                      + (f"  ERROR {r['error'][:200]}" if "error" in r else ""), flush=True)
                if "error" in r:
                    break
            shutil.rmtree(caches, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return True


def e2e_summary(rows: dict) -> list[dict]:
    """Per (model, dtype, batch): each variant's latency, and optimize() against the targets."""
    groups: dict[tuple, dict] = {}
    for r in rows.values():
        groups.setdefault((r["model"], r["dtype"], r["batch"]), {})[r["variant"]] = r
    out = []
    for (model, dtype, batch), by in groups.items():
        lat = {v: by[v]["cold"].get("latency_ms") for v in by if "cold" in by[v]}
        noise = max([by[v]["cold"].get("noise") or 0.0 for v in by if "cold" in by[v]] + [0.0])
        line = {"model": model, "dtype": dtype, "batch": batch, "latency_ms": lat, "noise": noise}
        o = lat.get("optimize")
        if o:
            for v in ("eager", "compile", "max-autotune"):
                if lat.get(v):
                    line[f"optimize_vs_{v}"] = lat[v] / o
                    line[f"optimize_le_{v}"] = o <= lat[v] * (1 + noise)
            ma = by.get("max-autotune", {}).get("cold", {}).get("first_call_s")
            op = by.get("optimize", {}).get("cold", {}).get("first_call_s")
            co = by.get("compile", {}).get("cold", {}).get("first_call_s")
            if ma and op:
                line["optimize_cold_over_max_autotune_cold"] = op / ma
                if co and ma > co:  # tuning time alone: each cold first call less the default compile's
                    line["tuning_s"] = {"optimize": op - co, "max-autotune": ma - co}
                    line["optimize_tuning_over_max_autotune_tuning"] = max(0.0, op - co) / (ma - co)
        out.append(line)
    return out


# --------------------------------------------------------------------------------------------- report

def _f(x, fmt="{:.3f}", none="-") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and x is not None and math.isfinite(x) else none


def markdown(data: dict) -> str:
    """The markdown summary of the suite's JSON."""
    meta = data.get("meta", {})
    secs = data.get("sections", {})
    v = meta.get("versions", {})
    lines = [f"# GPU suite: {meta.get('gpu', '?')}", "",
             f"torch {meta.get('torch')}, Triton {meta.get('triton')}, CUDA {meta.get('cuda')}, "
             f"transformers {v.get('transformers')}, torchvision {v.get('torchvision')}, optuna {v.get('optuna')}; "
             f"host {meta.get('host')}; first run {meta.get('created')}, last update {meta.get('updated')}.", ""]
    if meta.get("smoke"):
        lines += [f"**{SMOKE_NOTE}.**", ""]
    k = secs.get("kernels", {})
    if k:
        summ = kernel_summary(k)
        lines += ["## Kernels: geomean speedup over PyTorch's kernel (cuBLAS/cuDNN)", "",
                  "| category | problems | ours (tuned) | Inductor max-autotune | triton.autotune (Inductor configs) "
                  "| tuning s (ours) | compile s (max-autotune) | autotune s |", "|---|---|---|---|---|---|---|---|"]
        for cat, c in summ.items():
            lines.append(f"| {cat} | {c['problems']} | " + " | ".join(
                _f(c[m]["geomean_speedup"], "{:.2f}x") + f" ({c[m]['n']})" for m in KERNEL_METHODS[1:]) + " | "
                + " | ".join(_f(c[m]["wall_s_total"], "{:.0f}") for m in KERNEL_METHODS[1:]) + " |")
        lines += ["", "| problem | category | aten ms | ours ms | tune s | winner | max-autotune ms | compile s "
                  "| triton.autotune ms | autotune s |", "|---|---|---|---|---|---|---|---|---|---|"]
        by: dict[str, dict] = {}
        for r in k.values():
            by.setdefault(r["name"], {})[r["method"]] = r
        for name, p in by.items():
            def cell(m, field="ms"):
                r = p.get(m, {})
                if "error" in r:
                    return "error"
                if "skipped" in r:
                    return "n/a"
                return _f(r.get(field), "{:.4f}" if field == "ms" else "{:.1f}")
            winner = p.get("tuned", {}).get("winner", "-")
            winner = "aten" if winner == "aten" else ("triton" if winner != "-" else "-")
            cat = next((r.get("category") for r in p.values() if r.get("category")), "")
            lines.append(f"| {name} | {cat} | {cell('aten')} | {cell('tuned')} | {cell('tuned', 'wall_s')} "
                         f"| {winner} | "
                         f"{cell('inductor')} | {cell('inductor', 'wall_s')} | {cell('triton_autotune')} | "
                         f"{cell('triton_autotune', 'wall_s')} |")
        errs = [f"- {r['name']} / {r['method']}: {r['error']}" for r in k.values() if "error" in r]
        if errs:
            lines += ["", "Errors:", *errs]
        lines.append("")
    s = secs.get("search", {})
    if s:
        lines += ["## Search: recorded spaces and the replay of tune()", "",
                  "| shape | family | valid | recorded | failed | best ms | complete | seconds |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, r in s.items():
            if key.startswith("record|"):
                lines.append(f"| {r.get('shape')} | {r.get('family')} | {r.get('valid')} | {r.get('measured')} | "
                             f"{r.get('failed', '-')} | {_f(r.get('best_ms'), '{:.4g}')} | {r.get('complete')} | "
                             f"{_f(r.get('seconds'), '{:.0f}')} |")
        if "replay" in s:
            budget = s["replay"].get("budget") or 200
            lines += ["", f"Replay ({s['replay'].get('seeds')} seeds, budget {budget}); each cell: mean fraction of "
                      f"the optimum at 50 / at {min(200, budget)} measurements / median measurements to within 5%:",
                      "",
                      s["replay"].get("table", "")]
        lines.append("")
    e = secs.get("e2e", {})
    if e:
        lines += ["## End to end", "",
                  "| model | dtype | batch | variant | latency ms | noise | cold first call s | warm first call s "
                  "| warm process to output s | rel. err vs eager | notes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in e.values():
            c, w = r.get("cold", {}), r.get("warm", {})
            notes = "; ".join(x for x in (c.get("error"), w.get("error"), c.get("note"),
                                          (f"{c['triton_winners']}/{c['problems']} problems on Triton"
                                           if "problems" in c else None)) if x)
            lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['variant']} | {_f(c.get('latency_ms'))} | "
                         f"{_f(c.get('noise'), '{:.1%}')} | {_f(c.get('first_call_s'), '{:.1f}')} | "
                         f"{_f(w.get('first_call_s'), '{:.2f}')} | "
                         f"{_f(w.get('process_to_first_output_s'), '{:.1f}')} | "
                         f"{_f(c.get('rel_err_vs_eager'), '{:.2g}')} | {notes[:160]} |")
        lines += ["", "optimize() against the targets (latency ratio other / ours: > 1 means we are faster; "
                  "'ok' when at or below within the noise):", "",
                  "| model | dtype | batch | vs eager | vs compile | vs max-autotune | our cold / max-autotune cold "
                  "| our tuning / max-autotune's (cold first call less default compile's) |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in e2e_summary(e):
            def vs(v):
                x = g.get(f"optimize_vs_{v}")
                return "-" if x is None else f"{x:.2f}x {'ok' if g.get(f'optimize_le_{v}') else 'MISS'}"
            ratio = g.get("optimize_cold_over_max_autotune_cold")
            tr = g.get("optimize_tuning_over_max_autotune_tuning")
            lines.append(f"| {g['model']} | {g['dtype']} | {g['batch']} | {vs('eager')} | {vs('compile')} | "
                         f"{vs('max-autotune')} | {_f(ratio, '{:.2f}')} | {_f(tr, '{:.2f}')}"
                         + ("" if tr is None else (" ok" if tr <= 0.2 else " MISS")) + " |")
        lines.append("")
    return "\n".join(lines)


def short_table(data: dict) -> str:
    """The short markdown printed last: kernel geomeans by category, recorded spaces and the replay, and
    each end-to-end group's latencies with optimize()'s ratios."""
    out = []
    k = data["sections"].get("kernels", {})
    if k:
        out += ["| kernels: geomean x over aten | n | ours | max-autotune | triton.autotune | tune s (ours) |",
                "|---|---|---|---|---|---|"]
        for cat, c in kernel_summary(k).items():
            out.append(f"| {cat} | {c['problems']} | " + " | ".join(
                _f(c[m]["geomean_speedup"], "{:.2f}x") for m in KERNEL_METHODS[1:])
                + f" | {_f(c['tuned']['wall_s_total'], '{:.0f}')} |")
        out.append("")
    s = data["sections"].get("search", {})
    recs = [r for key, r in s.items() if key.startswith("record|")]
    if recs:
        out += ["| recorded space | recorded / valid | complete |", "|---|---|---|"]
        out += [f"| {r.get('shape')} | {r.get('measured')} / {r.get('valid')} | {r.get('complete')} |" for r in recs]
        out.append("")
    if "replay" in s:
        out += [s["replay"].get("table", ""), ""]
    groups = e2e_summary(data["sections"].get("e2e", {}))
    if groups:
        out += ["| e2e | eager ms | compile ms | max-autotune ms | optimize ms | noise | ours / max-autotune cold |",
                "|---|---|---|---|---|---|---|"]
        for g in groups:
            lat = g["latency_ms"]
            out.append(f"| {g['model']} {g['dtype']} b{g['batch']} | " + " | ".join(
                _f(lat.get(v)) for v in E2E_VARIANTS) + f" | {g['noise']:.1%} | "
                + f"{_f(g.get('optimize_cold_over_max_autotune_cold'), '{:.2f}')} |")
    return "\n".join(out).rstrip()


def progress(data: dict, *, smoke: bool, models: list[str] | None = None) -> str:
    """Per section: how much the JSON holds of what a full run measures, and how many failed."""
    secs = data.get("sections", {})
    k = secs.get("kernels", {})
    want = [f"{name}|{m}" for name, _, _, _ in kernel_problems(smoke) for m in KERNEL_METHODS]
    lines = [f"kernels: {sum(x in k for x in want)}/{len(want)} measurements, "
             f"{sum('error' in r for r in k.values())} failed"]
    import record_space

    known = record_space.all_shapes(smoke=smoke)
    shapes = [next(iter(known))] if smoke else record_space.pick(list(record_space.DEFAULT_SHAPES), known)
    srch = secs.get("search", {})
    done = [n for n in shapes if srch.get(f"record|{n}", {}).get("complete")]
    lines.append(f"search: {len(done)}/{len(shapes)} spaces recorded, replay {'done' if 'replay' in srch else 'to do'}")
    e = secs.get("e2e", {})
    items = e2e_items(smoke, models)
    full = [i for i in items if "cold" in e.get(i.key, {})
            and (not wants_warm(i, smoke=smoke, warm_all=False) or "warm" in e.get(i.key, {}))]
    failed = sum(any("error" in r.get(m, {}) for m in ("cold", "warm")) for r in e.values())
    lines.append(f"e2e: {len(full)}/{len(items)} measured, {failed} failed; next: "
                 + next((i.key for i in items if i not in full), "none"))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main

def machine(device: torch.device) -> dict:
    import bench_kernels

    meta = bench_kernels.machine(device)
    meta["versions"] = _versions()
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--section", default="all", choices=SECTIONS + ("all", "report"))
    ap.add_argument("--smoke", action="store_true", help="every section on CPU in seconds (CI)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="no new measurement starts after this many seconds (default 540: one device call)")
    ap.add_argument("--results", default=None,
                    help="the JSON file (default benchmarks/results/gpu_suite-<gpu>.json; benchmarks/out for smoke)")
    ap.add_argument("--mirror", default=None, help="also copy the JSON and markdown here after every update ($OUT)")
    ap.add_argument("--rep-ms", type=float, default=50.0, help="kernel timing budget per measurement, ms (50)")
    ap.add_argument("--tune-trials", type=int, default=40, help="kernels: tune_problem's max_trials (40)")
    ap.add_argument("--tune-budget-s", type=float, default=10.0,
                    help="kernels: tune_problem's seconds per problem (10)")
    ap.add_argument("--e2e-tune-trials", type=int, default=24, help="e2e: optimize()'s max_trials (24)")
    ap.add_argument("--e2e-tune-budget-s", type=float, default=8.0, help="e2e: optimize()'s seconds per problem (8)")
    ap.add_argument("--search-shape", action="append", help="record_space shape patterns (default its DEFAULT_SHAPES)")
    ap.add_argument("--spaces-dir", default=None, help="where record_space writes (default benchmarks/results/spaces)")
    ap.add_argument("--space-rep-ms", type=float, default=10.0, help="record_space timing budget per config, ms (10)")
    ap.add_argument("--workers", type=int, default=None, help="record_space compile processes (min(16, cores))")
    ap.add_argument("--replay-jobs", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--replay-seeds", type=int, default=5)
    ap.add_argument("--replay-methods", default="tune,random,optuna_tpe")
    ap.add_argument("--replay-again", action="store_true", help="replay even when the JSON has a replay")
    ap.add_argument("--replay-on-gpu", action="store_true",
                    help="replay right after recording on the GPU machine (default: leave it for a CPU machine)")
    ap.add_argument("--status", action="store_true", help="print what is measured and what is left, then exit")
    ap.add_argument("--retry-errors", action="store_true", help="measure again what failed in an earlier run")
    ap.add_argument("--model", action="append", choices=("gpt2", "resnet50"), help="e2e models (default both)")
    ap.add_argument("--warm-all", action="store_true",
                    help="e2e: warm starts at every batch (default: the large batch only)")
    ap.add_argument("--gpt2-layers", type=int, default=12, help="e2e: GPT-2 blocks (12, GPT-2 small)")
    ap.add_argument("--e2e-rep-ms", type=float, default=300.0, help="e2e latency budget per round, ms (300)")
    ap.add_argument("--e2e-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.e2e_child:
        print("RESULT " + json.dumps(json_safe(run_child(json.loads(args.e2e_child)))), flush=True)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke and args.section not in ("report", "search") and not args.status:
        print("[gpu_suite] no CUDA device: only --smoke (or --section report / a search replay) runs on CPU")
        return 2
    smoke = args.smoke
    if smoke:
        args.tune_trials, args.tune_budget_s = min(args.tune_trials, 2), min(args.tune_budget_s, 5.0)
        args.e2e_tune_trials, args.e2e_tune_budget_s = min(args.e2e_tune_trials, 2), min(args.e2e_tune_budget_s, 5.0)
        args.replay_jobs = 1
    meta = machine(device)
    meta["smoke"] = smoke
    import record_space

    if args.results:
        path = Path(args.results)
    elif device.type == "cuda" or smoke:
        path = (SMOKE_RESULTS if smoke else RESULTS) / f"gpu_suite-{record_space.slug(meta['gpu'])}.json"
    else:
        print("[gpu_suite] on a CPU, name the GPU's results: --results benchmarks/results/gpu_suite-<gpu>.json")
        return 2
    if args.spaces_dir is None and smoke:
        args.spaces_dir = str(SMOKE_RESULTS / "spaces")
    res = Results(path, meta=meta, mirror=Path(args.mirror) if args.mirror else None,
                  keep_meta=device.type != "cuda" and not smoke)
    print(f"[gpu_suite] {meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']} -> {path}")
    if args.status:
        print(progress(res.data, smoke=smoke, models=args.model))
        return 0
    if smoke:
        print(f"[gpu_suite] {SMOKE_NOTE}")
    deadline = time.monotonic() + args.budget_s
    if device.type == "cuda" and not smoke:
        # cold compile caches for this run (the e2e section gives each measurement its own)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="gpu_suite_inductor_"))
        os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="gpu_suite_triton_"))
    sections = SECTIONS if args.section == "all" else (() if args.section == "report" else (args.section,))
    done = {}
    run = {"kernels": section_kernels, "search": section_search, "e2e": section_e2e}
    for sec in sections:
        t0 = time.perf_counter()
        done[sec] = run[sec](res, device=device, smoke=smoke, deadline=deadline, args=args)
        print(f"[gpu_suite] section {sec}: {'complete' if done[sec] else 'INCOMPLETE (run it again)'} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    res.save()
    print()
    print(short_table(res.data))
    print(f"\n[gpu_suite] wrote {res.path} and {res.md_path}"
          + ("; incomplete: " + ", ".join(s for s, ok in done.items() if not ok) if not all(done.values()) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
