"""What the hot path costs, as ratios against what a user would otherwise run, interleaved in one run.

    python benchmarks/bench_hotpath.py --label after           # full run (about 10 minutes on 2 cores)
    python benchmarks/bench_hotpath.py --smoke                  # a few calls of each, for CI

Three figures, each measured in child processes (TRITON_INTERPRET is read when the kernels are imported):

- ``models``: per call, a model compiled by ``torchtune_ops.optimize()`` against the same model compiled by
  ``torch.compile`` (Inductor), inference (no_grad) and training (forward + backward), on a small MLP and
  the demo's tiny GPT-2 and ResNet; in a process with TRITON_INTERPRET=1 (our ops in the graph, PyTorch's
  kernel behind them: the dispatch's cost alone) and one without (a CPU where no Triton kernel can run).
  Added microseconds per intercepted op where ops were intercepted, and the ratio ours / Inductor. With the
  interpreter each model runs twice: with an empty cache (tuning off: every op ours, PyTorch's kernel behind
  it), then (``<model>/<mode>/aten-cached``) recompiled after every problem met was stored as tuned with
  PyTorch's kernel the winner (what tuning finds on a CPU, where an interpreted Triton kernel is far slower);
  added microseconds per matmul/convolution of the model's graphs either way (``ops``; ``ops_in_graph``:
  how many of ours stay in the graph). A Triton winner's per-op cost is the ``hit`` part's site call.
  Targets: <= 3 us per intercepted op; without the interpreter within 2% of torch.compile.
- ``hit``: the host cost of a cache-hit call of ``torch.ops.torchtune_ops.mm`` whose choice is our Triton
  GEMM, from the op call to the driver-level launch (``benchmarks/_fake_driver.py`` stubs the driver, so
  this runs on a CPU), against ``torch.mm`` of the same operands; plain and split-K configurations.
  Target: <= 5 us more than PyTorch's own call. Also the same call from a compiled graph's code
  (``dispatch.mm_site``, what Inductor's code calls where shapes are static: no dispatcher).
- ``registration``: the per-call cost of one op registered three ways (``Library.impl`` for CPU only,
  ``Library.impl`` plus our Autograd kernel, ``torch.library.custom_op``), against calling the body.

Timings are per call, medians over interleaved rounds (each round runs every contender once in turn), as
wall time and thread CPU time (the CPU time leaves out time the thread spent descheduled: on a shared,
loaded machine it is the figure to read). Results go to
benchmarks/results/bench_hotpath-<label>-<host>-<date>.json (smoke runs: benchmarks/out/).

To measure a "before": ``PYTHONPATH=<older checkout> python benchmarks/bench_hotpath.py --label before``
(the script needs only the package's public ops, ``runtime.resolve._triton_usable``, ``kernels.gemm`` and
``storage``, so it runs against older code as well). On a loaded machine the models part moves between two
runs of the same code by more than a change may: alternate child runs of each checkout instead
(``TRITON_INTERPRET=1 python benchmarks/bench_hotpath.py --child-out <file> --parts models``, each with its
checkout on PYTHONPATH) and compare the medians.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _machine() -> dict:
    import torch
    import triton

    return {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "triton": triton.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _interleaved(contenders: dict, n: int, rounds: int) -> dict:
    """{name: (wall us, cpu us)} per call: medians over ``rounds`` rounds of ``n`` calls of each contender."""
    for fn in contenders.values():   # warm up
        for _ in range(max(3, n // 5)):
            fn()
    walls: dict = {k: [] for k in contenders}
    cpus: dict = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t, c = time.perf_counter(), time.thread_time()
            for _ in range(n):
                fn()
            cpus[name].append((time.thread_time() - c) / n * 1e6)
            walls[name].append((time.perf_counter() - t) / n * 1e6)
    return {k: (statistics.median(walls[k]), statistics.median(cpus[k])) for k in contenders}


# ------------------------------------------------------------------------------------------------ models

def _mlp():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)).eval()
    return model, torch.randn(8, 64)


def _model(name: str):
    from torchtune_ops import models

    if name == "mlp":
        return _mlp()
    return getattr(models, name)("tiny", seed=0)


def _models(smoke: bool) -> dict:
    from torchtune_ops import settings

    n, rounds = (3, 3) if smoke else (40, 15)
    out: dict = {}
    for name in ("mlp",) if smoke else ("mlp", "gpt2", "resnet"):
        for mode in ("inference", "training"):
            # an empty cache for each row; tuning off: with nothing to tune, record or predict, every op is
            # left to Inductor. "/recording" keeps our ops in the graph (a miss must reach our op to be
            # recorded), PyTorch's kernel behind them: what an intercepted op costs.
            for tag in ("", "/recording"):
                with tempfile.TemporaryDirectory() as d, settings.override(
                        cache_dir=d, record=os.path.join(d, "recorded.jsonl") if tag else None):
                    out.update(_model_rows(name, mode, n, rounds, tag))
    return out


def _model_rows(name: str, mode: str, n: int, rounds: int, tag: str = "") -> dict:
    """The rows of one model and mode: with an empty cache, then (with the interpreter) aten-cached."""
    import torch
    import torch._dynamo
    import torchtune_ops
    from torchtune_ops.runtime import backend, dispatch

    out: dict = {}
    torch._dynamo.reset()
    base, example = _model(name)
    ours_m = copy.deepcopy(base)
    if mode == "training":
        base.train()
        ours_m.train()
    ind = torch.compile(base, backend="inductor")
    backend.reset_counts()
    ours = torchtune_ops.optimize(ours_m)

    def call(m):
        if mode == "inference":
            def f():
                with torch.no_grad():
                    m(example)
        else:
            def f():
                loss = m(example).float().sum()
                loss.backward()
        return f

    f_ind, f_ours = call(ind), call(ours)
    f_ind()
    f_ours()  # compiles (and, with the interpreter, resolves every key once)
    counts = backend.intercepted()
    ops = sum(v for k, v in counts.items() if not k.startswith("skipped:"))
    out[f"{name}/{mode}{tag}"] = _row(_interleaved({"inductor": f_ind, "ours": f_ours}, n, rounds), ops)
    if not _cache_aten_winners():
        return out
    # the same model once its problems are tuned and PyTorch's kernel won each (what tuning finds on
    # a CPU, where an interpreted Triton kernel is far slower): recompiled against that cache
    for _ in range(3):   # a key seen only after recompiling (e.g. linear_act's addmm) is cached too
        torch._dynamo.reset()
        dispatch.reset()
        backend.reset_counts()
        ind = torch.compile(base, backend="inductor")
        ours = torchtune_ops.optimize(copy.deepcopy(ours_m))
        f_ind, f_ours = call(ind), call(ours)
        f_ind()
        f_ours()
        if not _cache_aten_winners():
            break
    row = _row(_interleaved({"inductor": f_ind, "ours": f_ours}, n, rounds), ops)
    row["ops_in_graph"] = sum(v for k, v in backend.intercepted().items() if not k.startswith("skipped:"))
    out[f"{name}/{mode}{tag}/aten-cached"] = row
    return out


def _row(r: dict, ops: int) -> dict:
    """A models row: per call times of Inductor and ours; per op over the ``ops`` matmuls/convolutions the
    model's graphs have (intercepted with an empty cache)."""
    (wi, ci), (wo, co) = r["inductor"], r["ours"]
    row = {"ops": ops, "inductor_us": round(wi, 2), "ours_us": round(wo, 2), "ratio": round(wo / wi, 4),
           "added_us": round(wo - wi, 2), "inductor_cpu_us": round(ci, 2), "ours_cpu_us": round(co, 2),
           "ratio_cpu": round(co / ci, 4), "added_cpu_us": round(co - ci, 2)}
    if ops:
        row["added_us_per_op"] = round((wo - wi) / ops, 3)
        row["added_cpu_us_per_op"] = round((co - ci) / ops, 3)
    return row


def _cache_aten_winners() -> int:
    """Store every problem the runtime met (and the kernels cover) as tuned with PyTorch's kernel the
    winner, as tuning on this CPU finds; returns how many were new (0 without the interpreter: no problem
    is met there)."""
    import torch
    from torchtune_ops.runtime.choices import _memo
    from torchtune_ops.storage.device import fingerprint
    from torchtune_ops.storage.store import Entry, default_store

    store, new = default_store(), 0
    for key, c in list(_memo.items()):
        if c.family is None or not c.problem_key:
            continue
        fp = fingerprint(next(k for k in key if isinstance(k, torch.device))).key
        if store.get(fp, c.family.name, c.problem_key) is None:
            store.put(Entry(fp, c.family.name, c.problem_key, winner="aten", time_ms=1.0, aten_ms=1.0, trials=1))
            new += 1
    return new


# ------------------------------------------------------------------------------------------------ hit

def _hit(smoke: bool) -> dict:
    """Cache-hit host cost to the (stubbed) driver call; needs real JITFunctions (no interpreter)."""
    import torch
    from torchtune_ops import settings
    from torchtune_ops.kernels import gemm as kgemm
    from torchtune_ops.runtime import dispatch, ops as _registers, resolve  # noqa: F401
    from torchtune_ops.storage.device import fingerprint
    from torchtune_ops.storage.store import Entry, default_store

    sys.path.insert(0, HERE)
    from _fake_driver import fake_driver

    resolve._triton_usable = lambda device: True   # a CPU "where Triton runs": the fake driver's GPU
    ops = torch.ops.torchtune_ops
    n, rounds = (50, 3) if smoke else (3000, 15)
    out: dict = {}
    kernels = [kgemm._gemm_kernel, kgemm._splitk_epilogue_kernel]
    usable, invalid = getattr(kgemm, "_tma_usable", None), getattr(resolve, "_invalid", None)
    tma = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "TMA": 1, "WARP_SPEC": 0, "PERSISTENT": 0}
    for label, size, cfg in (("mm 16x16x16", (16, 16, 16), {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 2, "num_stages": 1}),
                             ("mm 16x64x512 split-K 4", (16, 64, 512),
                              {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 4}),
                             # descriptors: made in the kernel, or on the host (three per call, re-based
                             # on the call's tensors; the real launcher then encodes them, not stubbed here)
                             ("mm 64^3 TMA device desc", (64, 64, 64), tma),
                             ("mm 64^3 TMA host desc+store", (64, 64, 64),
                              dict(tma, HOST_DESC=1, TMA_STORE=1, EPI_SUBTILE=1))):
        # the fake driver's GPU is an sm_90: TMA there (older checkouts lack the function: skip)
        if cfg.get("TMA") and (usable is None or invalid is None
                               or (cfg.get("HOST_DESC") and not hasattr(kgemm, "_rebased"))):
            continue
        kgemm._tma_usable = (lambda device: True) if cfg.get("TMA") else usable
        resolve._invalid = (lambda *args: None) if cfg.get("TMA") else invalid  # (CPU limits: no TMA)
        m, n_, k = size
        a, b = torch.randn(m, k), torch.randn(k, n_)
        config = {"GROUP_M": 8, "num_warps": 4, "num_stages": 3, "SPLIT_K": 1, "TMA": 0, **cfg}
        with tempfile.TemporaryDirectory() as d, settings.override(cache_dir=d, autotune=False), \
                fake_driver(*kernels) as launches:
            dispatch.reset()
            problem = kgemm.gemm_problem(a, b)
            pkey = resolve._problem_key(kgemm.GEMM, problem)
            default_store().put(Entry(fingerprint(a.device).key, "gemm", pkey,
                                      winner=json.dumps(config, sort_keys=True, separators=(",", ":")),
                                      time_ms=1.0, aten_ms=2.0, trials=1))
            ops.mm(a, b)
            [p] = [q for q in dispatch.stats()["problems"] if q["op"] == "mm"]
            assert p["kernel"] != "aten", p
            before = launches.count
            ops.mm(a, b)
            assert launches.count > before, "the kernel was not launched"
            descs = sum(type(x).__name__ == "TensorDescriptor" for x in launches.last)
            assert descs == (3 if cfg.get("HOST_DESC") else 0), "host descriptors were not passed"
            contenders = {"torch.mm": lambda: torch.mm(a, b), "ours": lambda: ops.mm.default(a, b),
                          "gemm()": lambda: kgemm.gemm(a, b, config=config)}
            site = getattr(dispatch, "mm_site", None)   # what Inductor's code calls (static shapes)
            if site is not None:
                contenders["site"] = lambda: site(a, b, "", "bench-site")
            with torch.no_grad():
                r = _interleaved(contenders, n, rounds)
        (wa, ca), (wo, co), (wg, cg) = r["torch.mm"], r["ours"], r["gemm()"]
        out[label] = {"torch_mm_us": round(wa, 2), "ours_us": round(wo, 2), "added_us": round(wo - wa, 2),
                      "torch_mm_cpu_us": round(ca, 2), "ours_cpu_us": round(co, 2), "added_cpu_us": round(co - ca, 2),
                      "unbound_gemm_us": round(wg, 2), "unbound_gemm_cpu_us": round(cg, 2),
                      "launches_per_call": 2 if cfg.get("SPLIT_K", 1) > 1 else 1}
        if "site" in r:
            (ws, cs) = r["site"]
            out[label].update(site_us=round(ws, 2), site_added_us=round(ws - wa, 2), site_cpu_us=round(cs, 2),
                              site_added_cpu_us=round(cs - ca, 2))
        dispatch.reset()
    kgemm._tma_usable, resolve._invalid = usable, invalid
    return out


# ------------------------------------------------------------------------------------------------ registration

def _registration(smoke: bool) -> dict:
    import torch
    from torchtune_ops.runtime import ops as our_ops

    lib = torch.library.Library("tto_bench_reg", "DEF")
    body = torch.mm
    lib.define("plain(Tensor a, Tensor b) -> Tensor")
    lib.impl("plain", lambda a, b: body(a, b), "CPU")
    lib.define("ours(Tensor a, Tensor b) -> Tensor")
    lib.impl("ours", lambda a, b: body(a, b), "CPU")

    def kernel(a, b):   # as runtime/ops.py's autograd kernel (no key set, plain tensors straight through)
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            raise RuntimeError("not benchmarked")
        if type(a) in our_ops._PLAIN and type(b) in our_ops._PLAIN and a.is_cpu and not our_ops._dispatch_modes():
            return body(a, b)
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.tto_bench_reg.ours.default(a, b)

    lib.impl("ours", kernel, "Autograd")

    def custom(a, b):
        return body(a, b)

    custom = torch.library.custom_op("tto_bench_reg::custom", custom, mutates_args=(),
                                     schema="(Tensor a, Tensor b) -> Tensor")

    custom.register_autograd(lambda ctx, g: (g, g), setup_context=lambda ctx, inputs, output: None)
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    n, rounds = (50, 3) if smoke else (5000, 15)
    ns = torch.ops.tto_bench_reg
    with torch.no_grad():
        r = _interleaved({"body": lambda: body(a, b), "library_impl": lambda: ns.plain.default(a, b),
                          "library_impl_autograd_kernel": lambda: ns.ours.default(a, b),
                          "custom_op": lambda: ns.custom.default(a, b)}, n, rounds)
    wb, cb = r.pop("body")
    return {k: {"us": round(w, 2), "added_us": round(w - wb, 2), "cpu_us": round(c, 2), "added_cpu_us": round(c - cb, 2)}
            for k, (w, c) in r.items()}


# ------------------------------------------------------------------------------------------------ driver

def _child(args) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    res: dict = {"interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")}
    parts = args.parts.split(",")
    if "models" in parts:
        res["models"] = _models(args.smoke)
    if "hit" in parts:
        res["hit"] = _hit(args.smoke)
    if "registration" in parts:
        res["registration"] = _registration(args.smoke)
    with open(args.child_out, "w") as f:
        json.dump(res, f)
    return 0


def _run_child(interpret: bool, parts: str, smoke: bool) -> dict:
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1", TORCHINDUCTOR_FX_GRAPH_CACHE="0",
               TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    with tempfile.TemporaryDirectory() as d:
        env["TORCHTUNE_OPS_CACHE_DIR"] = os.path.join(d, "cache")
        out = os.path.join(d, "child.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child-out", out, "--parts", parts]
        if smoke:
            cmd.append("--smoke")
        subprocess.run(cmd, env=env, check=True)
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="few calls (CI)")
    p.add_argument("--label", default="run", help="a name for this run in the file name (e.g. before, after)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/bench_hotpath-...)")
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--parts", default="models,hit,registration", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_out:
        return _child(args)
    import torchtune_ops

    results = {"machine": _machine(), "label": args.label, "package": os.path.dirname(torchtune_ops.__file__),
               "interpreter": _run_child(True, "models", args.smoke),
               "no_interpreter": _run_child(False, "models,hit,registration", args.smoke)}
    results["targets"] = {"added_us_per_intercepted_op": 3.0, "hit_added_us": 5.0,
                          "no_interpreter_ratio_max": 1.02}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = "out" if args.smoke else "results"   # smoke runs go to the ignored benchmarks/out/
    out = args.out or os.path.join(HERE, folder, f"bench_hotpath-{args.label}-{platform.node() or 'host'}-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    _print(results)
    print(f"wrote {out}")
    return 0


def _print(results: dict) -> None:
    for where in ("interpreter", "no_interpreter"):
        print(f"== compiled models, {where.replace('_', ' ')} (us per call; ours = optimize(), inductor = torch.compile)")
        print(f"{'model/mode':<22} {'ops':>4} {'inductor':>9} {'ours':>9} {'ratio':>7} {'added/op':>9}"
              f"   cpu: {'ratio':>7} {'added/op':>9}")
        for k, v in results[where]["models"].items():
            print(f"{k:<22} {v['ops']:>4} {v['inductor_us']:>9.1f} {v['ours_us']:>9.1f} {v['ratio']:>7.3f} "
                  f"{v.get('added_us_per_op', float('nan')):>9.2f}   {'':>4} {v['ratio_cpu']:>7.3f} "
                  f"{v.get('added_cpu_us_per_op', float('nan')):>9.2f}")
    print("== cache-hit call to the (stubbed) driver launch, us per call")
    for k, v in results["no_interpreter"]["hit"].items():
        print(f"{k:<26} torch.mm {v['torch_mm_us']:>7.2f}  ours {v['ours_us']:>7.2f}  added {v['added_us']:>7.2f}"
              f"  (cpu added {v['added_cpu_us']:>7.2f}; gemm() unbound {v['unbound_gemm_us']:>7.2f})")
        if "site_us" in v:
            print(f"{'':<26} compiled-code site {v['site_us']:>7.2f}  added {v['site_added_us']:>7.2f}"
                  f"  (cpu added {v['site_added_cpu_us']:>7.2f})")
    print("== registration path, us added per call over the body")
    for k, v in results["no_interpreter"]["registration"].items():
        print(f"{k:<30} {v['added_us']:>7.2f}  (cpu {v['added_cpu_us']:>7.2f})")


if __name__ == "__main__":
    sys.exit(main())
