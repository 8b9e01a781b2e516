"""Judge the GEMM performance prior on real GPU timings (PyTorch AutoHeuristic's A100/H100 mm data).

For a shape, a rule that measures PyTorch's kernel (cuBLAS) plus k Triton configurations gets the best of
what it measured; its score is optimum / achieved (the optimum: the best recorded choice). Reported per
protocol: the geomean over shapes and the share within 5% of the optimum, for k = 0, 1, 3, 5, 10, beside
random k (exact expectation), AutoHeuristic's rankings shipped in torch, and the tuner replayed with and
without the prior (measurements to reach the optimum).

    python benchmarks/perfmodel_eval.py                       # every protocol (about 10 min on 2 cores)
    python benchmarks/perfmodel_eval.py --smoke               # seconds: a few shapes, few trees
    python benchmarks/perfmodel_eval.py --prior shipped --test FILE --json OUT   # the shipped prior, no training
    python benchmarks/perfmodel_eval.py --select              # choose the model's options by grouped CV (A100)
    python benchmarks/perfmodel_eval.py --ship                # train on all four files, write the shipped prior

Parsed files are cached in benchmarks/out/ (git-ignored). Results: benchmarks/results/perfmodel_eval-*.json.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # scikit-learn's threads only fight over a shared CPU

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchtune_ops.tuning import gemm_prior, inductor_data  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "inductor_mm"
FILES = ("a100_mm", "a100_hf_train_mm", "a100_timm_train_mm", "h100_hf_train_mm")
KS = (0, 1, 3, 5, 10)
OUT = ROOT / "benchmarks" / "out"
#: the model's options (chosen by ``--select``: grouped CV on the A100 files only; docs/perfmodel.md)
OPTIONS = {"learner": "sklearn", "max_iter": 200, "leaves": 31, "lr": 0.1, "target": "rank"}
#: variants of a better-predicted tile are pushed back by this much (log); chosen by ``--select`` too
DIVERSITY = 0.0


def machine() -> dict:
    return {"host": platform.node(), "machine": platform.machine(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "numpy": np.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------------------------ data

def load(path: Path, *, cache: bool = True) -> inductor_data.InductorData:
    """``inductor_data.read``, cached in benchmarks/out/ as npz + JSON (keyed by the file's size and mtime)."""
    st = path.stat()
    tag = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    base = OUT / f"inductor-{tag}"
    if cache and base.with_suffix(".json").exists() and base.with_suffix(".npz").exists():
        meta = json.loads(base.with_suffix(".json").read_text())
        arr = np.load(base.with_suffix(".npz"))
        return inductor_data.InductorData(times=arr["times"], aten=arr["aten"], **meta)
    d = inductor_data.read(path)
    if cache:
        OUT.mkdir(parents=True, exist_ok=True)
        np.savez(base.with_suffix(".npz"), times=d.times, aten=d.aten)
        base.with_suffix(".json").write_text(json.dumps({"name": d.name, "meta": d.meta, "problems": d.problems,
                                                          "raw": d.raw, "configs": d.configs}))
    return d


# ------------------------------------------------------------------------------------------------ rules

def _times(d) -> np.ndarray:
    return np.where(np.isnan(d.times), np.inf, d.times)


def score_ranking(d, rank: np.ndarray, ks=KS) -> dict:
    """Scores of "cuBLAS + the k best-ranked recorded configurations"; ``rank``: S x C, lower first,
    inf for configurations the rule would not measure (and for unrecorded ones)."""
    T = _times(d)
    rank = np.where(np.isinf(T), np.inf, rank)
    order = np.argsort(rank, axis=1, kind="stable")
    opt = d.optimum
    out = {}
    for k in ks:
        sel = order[:, :k]
        t = np.where(np.isfinite(np.take_along_axis(rank, sel, 1)), np.take_along_axis(T, sel, 1), np.inf)
        best = t.min(axis=1) if k else np.full(len(opt), np.inf)
        s = opt / np.fmin(d.aten, best)
        out[str(k)] = _summary(np.log(s), s >= 1 / 1.05)
    return out


def bootstrap(d, rank: np.ndarray, ks=(1, 3), n: int = 2000, seed: int = 0) -> dict:
    """95% interval of the geomean over shapes, resampling the shapes (how much one file can tell)."""
    T = _times(d)
    rank = np.where(np.isinf(T), np.inf, rank)
    order = np.argsort(rank, axis=1, kind="stable")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(T), size=(n, len(T)))
    out = {}
    for k in ks:
        best = np.take_along_axis(T, order[:, :k], 1).min(axis=1)
        logs = np.log(d.optimum / np.fmin(d.aten, best))
        g = np.exp(logs[idx].mean(axis=1))
        out[str(k)] = [float(np.percentile(g, 2.5)), float(np.percentile(g, 97.5))]
    return out


def _summary(logs: np.ndarray, within: np.ndarray) -> dict:
    return {"geomean": float(np.exp(np.mean(logs))), "within5": float(np.mean(within))}


def random_expected(d, ks=KS) -> dict:
    """The exact expectation of "cuBLAS + k random recorded configurations": per shape, the i-th fastest is
    the best of a k-subset with probability C(n-i, k-1) / C(n, k); geomean of the expected log score."""
    T = _times(d)
    opt = d.optimum
    out = {}
    for k in ks:
        logs, within = np.zeros(len(opt)), np.zeros(len(opt))
        for s in range(len(opt)):
            t = np.sort(T[s][np.isfinite(T[s])])
            n = len(t)
            if k == 0 or n == 0:
                p = np.zeros(n)
                base = math.log(opt[s] / d.aten[s])
                logs[s], within[s] = base, float(opt[s] / d.aten[s] >= 1 / 1.05)
                continue
            kk = min(k, n)
            p = np.array([math.comb(n - i, kk - 1) for i in range(1, n + 1)], dtype=float) / math.comb(n, kk)
            sc = opt[s] / np.fmin(d.aten[s], t)
            logs[s], within[s] = float(p @ np.log(sc)), float(p @ (sc >= 1 / 1.05))
        out[str(k)] = _summary(logs, within.astype(float))
    return out


class _Context:
    """What AutoHeuristic's generated trees read: ``get_value(name)`` over the file's fields."""

    def __init__(self, values: dict) -> None:
        self.values = values

    def get_value(self, name: str):
        return self.values[name]


def autoheuristic_ranking(d, gpu: str) -> tuple[np.ndarray | None, str]:
    """AutoHeuristic's shipped ranking (``_MMRanking{gpu}``) as a rank matrix, or (None, why not)."""
    try:
        import importlib

        mod = importlib.import_module(f"torch._inductor.autoheuristic.artifacts._MMRanking{gpu}")
        h = getattr(mod, f"MMRanking{gpu}")()
    except Exception as e:  # noqa: BLE001 - another torch may not ship them
        return None, f"{type(e).__name__}: {e}"
    col = {inductor_data.choice_name(c): j for j, c in enumerate(d.configs)}
    R = np.full(d.times.shape, np.inf)
    for s, r in enumerate(d.raw):
        m, k, n = r["m"], r["k"], r["n"]
        st = r["strides"]
        v = {"m": m, "k": k, "n": n, "mat1_stride_0": st[0], "mat1_stride_1": st[1], "mat2_stride_0": st[2],
             "mat2_stride_1": st[3], "mat1_dtype": f"torch.{r['dtype']}", "mat2_dtype": f"torch.{r['dtype']}",
             "using_tf32": r["using_tf32"], "m*k": m * k, "m*n": m * n, "k*n": k * n,
             "arith_intensity": m * k * n / (m * k + k * n + m * n) if m and k and n else 0.0,
             "mat1_iscontig": str(st[1] == 1 and st[0] == k), "mat2_iscontig": str(st[3] == 1 and st[2] == n)}
        ranked = h.get_decisions_ranked(_Context(v)) or []
        pos = 0
        for name in ranked:
            j = col.get(name)
            if j is not None and not np.isnan(d.times[s, j]) and R[s, j] == np.inf:
                R[s, j] = pos
                pos += 1
    return R, "ok"


def model_scores(prior: gemm_prior.GemmPrior, d, shapes=None, *, arch: float | None = None) -> np.ndarray:
    """The prior's predicted scores for the recorded cells of ``d`` (S x C; inf elsewhere), on d's GPU."""
    gpu, sms, smem, cap = d.limits()
    dm = prior.for_device(sms=sms, smem=smem, capability=cap)
    P = np.full(d.times.shape, np.inf)
    rows = np.arange(len(d.problems)) if shapes is None else np.asarray(shapes)
    mask = np.zeros(d.times.shape, dtype=bool)
    mask[rows] = ~np.isnan(d.times[rows])
    s, c = np.nonzero(mask)
    pa, ca = gemm_prior.problem_arrays(d.problems), gemm_prior.config_arrays(d.configs)
    P[s, c] = prior.score_rows({k: v[s] for k, v in pa.items()}, {k: v[c] for k, v in ca.items()}, sms=sms,
                               smem=smem, arch=dm.arch if arch is None else arch, balance=dm.balance)
    return gemm_prior.diversify(P, ca["bm"], ca["bn"], float(prior.meta.get("diversity", 0.0)))


# -------------------------------------------------------------------------------------------- protocols

def folds_by_size(d, n_folds: int, seed: int = 0) -> np.ndarray:
    """A fold per shape, grouped by (M, N, K): dtype or layout variants of one size share a fold."""
    keys = [(p["M"], p["N"], p["K"]) for p in d.problems]
    uniq = sorted(set(keys))
    perm = np.random.default_rng(seed).permutation(len(uniq))
    fold_of = {u: int(perm[i] % n_folds) for i, u in enumerate(uniq)}
    return np.asarray([fold_of[k] for k in keys])


def own_trees(X, y, *, max_iter, leaves, lr, seed) -> gemm_prior.Forest:
    """perfmodel's numpy gradient-boosted trees (complete trees of depth log2(leaves)) as a Forest."""
    from torchtune_ops.tuning.perfmodel import _Trees

    depth = max(1, int(round(math.log2(leaves))))
    return gemm_prior.Forest.from_own(_Trees.fit(X, y, n_trees=max_iter, depth=depth, lr=lr, seed=seed))


def fit(datas, shapes=None, **kw) -> gemm_prior.GemmPrior:
    opts = dict(OPTIONS)
    opts.update(kw)
    diversity = opts.pop("diversity", DIVERSITY)
    prior = gemm_prior.fit(datas, shapes=shapes, vs_aten=opts.pop("vs_aten", False), **opts)
    prior.meta["diversity"] = diversity
    return prior


def leave_shapes_out(d, n_folds: int, **kw) -> np.ndarray:
    """Held-out scores for every shape of ``d`` from models trained on the other folds of ``d``."""
    fold = folds_by_size(d, n_folds)
    P = np.full(d.times.shape, np.inf)
    for f in range(n_folds):
        test = np.flatnonzero(fold == f)
        prior = fit([d], shapes=[np.flatnonzero(fold != f)], **kw)
        P[test] = model_scores(prior, d, test)[test]
    return P


def replay_tuner(d, shapes, model, *, seeds=(0,)) -> dict:
    """``search.tune`` on each shape's recorded configurations with a fake timer: the tuner's way without a
    prior (the family's known configurations first) and with the prior (``perfmodel.search_hints``: its top
    predictions first, its predictions as the search's prior). Measurements of Triton configurations until
    the best of cuBLAS and them reaches the optimum (0 when cuBLAS is the optimum), and until within 5%."""
    from torchtune_ops.kernels import gemm_space
    from torchtune_ops.kernels.base import DeviceLimits
    from torchtune_ops.search import Space, tune
    from torchtune_ops.tuning import perfmodel

    gpu, sms, smem, cap = d.limits()
    limits = DeviceLimits(gpu, smem, sms, cap)
    dm = model
    res = {"without": {"opt": [], "5%": []}, "with": {"opt": [], "5%": []}}
    for s in shapes:
        cands, times = d.replay(int(s))
        if not cands:
            continue
        opt, aten = float(d.optimum[s]), float(d.aten[s])
        keyset = {json.dumps(c, sort_keys=True) for c in cands}
        known = [c.as_dict() for c in gemm_space.known_configs(gemm_space.GemmProblem(**d.problems[s]), limits)]
        known = [c for c in known if json.dumps(c, sort_keys=True) in keyset]
        space = Space({k: sorted({c[k] for c in cands}) for k in cands[0]})
        hints = perfmodel.search_hints(dm, d.problems[s], cands, known=known)
        for label, initial, prior in (("without", known, []), ("with", hints.initial, hints.prior)):
            for seed in seeds:
                vals: list[float] = []

                def objective(cfg, vals=vals):
                    v = times[json.dumps(cfg, sort_keys=True)]
                    vals.append(v)
                    return v
                tune(space, objective, candidates=cands, initial=initial, prior=prior, seed=seed,
                     max_trials=len(cands))
                best = np.fmin.accumulate(np.fmin(aten, np.asarray(vals)))
                for tag, tol in (("opt", 1e-9), ("5%", 0.05)):
                    if aten <= opt * (1 + tol):
                        n = 0
                    else:
                        hit = np.flatnonzero(best <= opt * (1 + tol))
                        n = int(hit[0]) + 1 if len(hit) else len(cands)
                    res[label][tag].append(n)
    out = {}
    for label, r in res.items():
        out[label] = {tag: {"mean": float(np.mean(v)), "p90": float(np.percentile(v, 90)), "n": len(v)}
                      for tag, v in r.items()}
    return out


# ------------------------------------------------------------------------------------------------- main

def _fmt(r: dict) -> str:
    return " | ".join(f"{r[str(k)]['geomean']:.3f} ({r[str(k)]['within5'] * 100:.0f}%)" for k in KS)


def evaluate_file(prior, d) -> dict:
    return {"shapes": len(d.problems), **_by_metric(score_ranking(d, model_scores(prior, d)))}


def _by_metric(r: dict) -> dict:
    return {"geomean": {k: v["geomean"] for k, v in r.items()}, "within5": {k: v["within5"] for k, v in r.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder of the four development files")
    ap.add_argument("--prior", choices=("shipped",), help="score the shipped prior (no training) on --test")
    ap.add_argument("--test", type=Path, help="a file in AutoHeuristic's mm format (gzipped or not)")
    ap.add_argument("--json", type=Path, help="with --prior: where to write the scores")
    ap.add_argument("--smoke", action="store_true", help="a few shapes and trees: seconds")
    ap.add_argument("--select", action="store_true", help="choose options by grouped CV on the A100 files")
    ap.add_argument("--ship", action="store_true", help="train on all four files and write the shipped prior")
    ap.add_argument("--design", action="store_true", help="only the baselines and the feature-group CV on H100")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--out", type=Path, help="folder or .json file (default benchmarks/results, smoke: benchmarks/out)")
    ap.add_argument("--no-cache", action="store_true")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = OUT if args.smoke else ROOT / "benchmarks" / "results"
    t0 = time.time()

    if args.prior == "shipped":
        if args.test is None:
            ap.error("--prior shipped needs --test FILE")
        prior = gemm_prior.shipped()
        if prior is None:
            print(f"no shipped prior at {gemm_prior.SHIPPED_PATH}", file=sys.stderr)
            return 1
        d = load(args.test, cache=not args.no_cache)
        res = evaluate_file(prior, d)
        res.update(file=str(args.test), gpu=d.gpu, prior=prior.meta, machine=machine(),
                   baselines={"random": _by_metric(random_expected(d))}, seconds=round(time.time() - t0, 1))
        print(f"{d.name} ({d.gpu}, {res['shapes']} shapes), k = {', '.join(map(str, KS))}")
        print("  shipped prior: " + " | ".join(f"{res['geomean'][str(k)]:.3f} ({res['within5'][str(k)] * 100:.0f}%)"
                                              for k in KS))
        print(f"{time.time() - t0:.1f} s")
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        return 0

    datas = {n: load(args.data / f"{n}.txt.gz", cache=not args.no_cache) for n in FILES}
    opts = {}
    if args.smoke:
        rng = np.random.default_rng(0)
        datas = {n: d.subset(np.sort(rng.choice(len(d.problems), min(40, len(d.problems)), replace=False)))
                 for n, d in datas.items()}
        opts = {"max_iter": 10, "leaves": 8}
    a100 = [datas[n] for n in FILES[:3]]

    if args.ship:
        return ship(list(datas.values()), t0, **opts)
    if args.select:
        return select(a100, args.folds if not args.smoke else 2, t0, smoke=args.smoke)

    results: dict = {"machine": machine(), "options": dict(OPTIONS, **opts), "smoke": args.smoke, "rows": []}
    rows = results["rows"]

    def add(protocol, file, rule, r, seconds=None):
        rows.append({"protocol": protocol, "file": file, "rule": rule, **_by_metric(r),
                     **({"seconds": round(seconds, 1)} if seconds is not None else {})})
        print(f"{protocol:<16} {file:<20} {rule:<34} {_fmt(r)}" + (f"  [{seconds:.0f} s]" if seconds else ""),
              flush=True)

    print(f"{'protocol':<16} {'file':<20} {'rule':<34} k = " + " | ".join(map(str, KS)))
    ah = {}
    for name, d in datas.items():
        add("baseline", name, "random k (exact expectation)", random_expected(d))
        for gpu in ("A100", "H100"):
            R, why = autoheuristic_ranking(d, gpu)
            if R is None:
                print(f"AutoHeuristic's {gpu} ranking could not be loaded: {why}")
                results.setdefault("autoheuristic_missing", {})[gpu] = why
                continue
            ah[(name, gpu)] = R
            add("baseline", name, f"AutoHeuristic {gpu} ranking", score_ranking(d, R))

    for name, d in datas.items():   # leave shapes out, within each file
        if args.design:
            break
        t = time.time()
        add("leave-shapes-out", name, f"model ({args.folds} folds by size)",
            score_ranking(d, leave_shapes_out(d, args.folds, **opts)), time.time() - t)

    h100 = datas["h100_hf_train_mm"]
    design_cv(a100, h100, args.folds, add, **opts)
    if args.design:
        return 0

    t = time.time()                 # across workloads
    m = fit([datas["a100_mm"], datas["a100_hf_train_mm"]], **opts)
    add("across-workloads", "a100_timm_train_mm", "model (a100_mm + a100_hf_train)",
        score_ranking(datas["a100_timm_train_mm"], model_scores(m, datas["a100_timm_train_mm"])), time.time() - t)

    t = time.time()                 # across GPUs
    xg_kw = dict(opts, vs_aten=True)
    xg = fit(a100, **xg_kw)
    fit_s = time.time() - t
    t = time.time()
    P = model_scores(xg, h100)
    pred_s = time.time() - t
    add("across-GPUs", "h100_hf_train_mm", "model (all A100 files)", score_ranking(h100, P), fit_s + pred_s)
    results["across_gpus_times"] = {"fit_s": fit_s, "predict_s": pred_s, "rows_predicted": int(np.isfinite(P).sum())}
    results["across_gpus_interval"] = ci = bootstrap(h100, P)
    print(f"  95% interval over resampled shapes: k=1 {ci['1'][0]:.3f}-{ci['1'][1]:.3f}, "
          f"k=3 {ci['3'][0]:.3f}-{ci['3'][1]:.3f}")

    # the library comparison: our numpy trees (same leaves, same rounds) on the same protocol
    t = time.time()
    own = fit(a100, **dict(opts, learner=own_trees, max_iter=opts.get("max_iter", 100) if args.smoke else 100))
    own_fit = time.time() - t
    t = time.time()
    P_own = model_scores(own, h100)
    own_pred = time.time() - t
    add("across-GPUs", "h100_hf_train_mm", "model, own numpy trees (100)", score_ranking(h100, P_own),
        own_fit + own_pred)
    results["library"] = {"sklearn": {"fit_s": fit_s, "predict_s": pred_s, "trees": len(xg.rank.feat)},
                          "own": {"fit_s": own_fit, "predict_s": own_pred, "trees": len(own.rank.feat)}}

    # feature ablation across GPUs
    for g in gemm_prior.DEFAULT_GROUPS:
        if g == "arch":  # constant on one GPU: nothing to remove
            continue
        t = time.time()
        groups = tuple(x for x in gemm_prior.DEFAULT_GROUPS if x != g)
        mg = fit(a100, groups=groups, **opts)
        add("ablation x-GPU", "h100_hf_train_mm", f"model without {g}", score_ranking(h100, model_scores(mg, h100)),
            time.time() - t)

    t = time.time()
    mg = fit(a100, groups=gemm_prior.DEFAULT_GROUPS + ("balance",), **opts)
    add("ablation x-GPU", "h100_hf_train_mm", "model with balance", score_ranking(h100, model_scores(mg, h100)),
        time.time() - t)

    # the tuner itself, replayed with a fake timer on the held-out GPU and workload
    for label, d, model in (("across-GPUs", h100, xg), ("across-workloads", datas["a100_timm_train_mm"], m)):
        t = time.time()
        gpu, sms, smem, cap = d.limits()
        dm = model.for_device(sms=sms, smem=smem, capability=cap)
        shapes = range(len(d.problems)) if not args.smoke else range(8)
        r = replay_tuner(d, shapes, dm)
        rows.append({"protocol": f"tuner {label}", "file": d.name, "replay": r, "seconds": round(time.time() - t, 1)})
        print(f"tuner {label:<10} {d.name:<20} measurements to the optimum: without prior mean "
              f"{r['without']['opt']['mean']:.2f} p90 {r['without']['opt']['p90']:.0f}, with prior mean "
              f"{r['with']['opt']['mean']:.2f} p90 {r['with']['opt']['p90']:.0f}; to 5%: without "
              f"{r['without']['5%']['mean']:.2f} / {r['without']['5%']['p90']:.0f}, with {r['with']['5%']['mean']:.2f}"
              f" / {r['with']['5%']['p90']:.0f}  [{time.time() - t:.0f} s]", flush=True)

    results["seconds"] = round(time.time() - t0, 1)
    print(f"{results['seconds']:.0f} s")
    out = args.out
    if out.suffix != ".json":
        out.mkdir(parents=True, exist_ok=True)
        out = out / f"perfmodel_eval-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


def design_cv(a100, h100, n_folds: int, add, **opts) -> None:
    """The shipped prior's feature groups, by grouped CV on its training files: H100 shapes held out (folds by
    size), trained on every A100 file and the other H100 folds; the default groups, then with the machine
    balance, the architecture code, both."""
    fold = folds_by_size(h100, n_folds)
    base = tuple(g for g in gemm_prior.DEFAULT_GROUPS if g not in ("balance", "arch"))
    for extra in ((), ("balance",), ("arch",), ("balance", "arch")):
        groups = base + extra
        t = time.time()
        P = np.full(h100.times.shape, np.inf)
        for f in range(n_folds):
            test = np.flatnonzero(fold == f)
            m = fit(a100 + [h100], shapes=[None] * 3 + [np.flatnonzero(fold != f)], groups=groups, **opts)
            P[test] = model_scores(m, h100, test)[test]
        add("H100 shapes out", "h100_hf_train_mm", "model (A100 + other H100 folds)" +
            "".join(f" + {g}" for g in extra), score_ranking(h100, P), time.time() - t)


def select(a100, n_folds: int, t0: float, *, smoke: bool = False) -> int:
    """Grouped CV over the A100 files only (each file's shapes split by size into folds; train on the other
    folds of all three, score the held-out shapes): the mean over files of geomean k=1 and k=3."""
    log = dict(OPTIONS, target="log")
    grid = [dict(log, clip=math.log(4.0)), dict(log, clip=math.log(2.0)), dict(OPTIONS, target="rank"),
            dict(log, leaves=63), dict(log, max_iter=400, lr=0.05)]
    if smoke:
        grid = [dict(OPTIONS, max_iter=10, leaves=8)]
    folds = [folds_by_size(d, n_folds, seed=1) for d in a100]
    for opts in grid:
        t = time.time()
        Ps = [np.full(d.times.shape, np.inf) for d in a100]
        for f in range(n_folds):
            m = gemm_prior.fit(a100, shapes=[np.flatnonzero(fo != f) for fo in folds], vs_aten=False, **opts)
            for d, fo, P in zip(a100, folds, Ps):
                test = np.flatnonzero(fo == f)
                P[test] = model_scores(m, d, test)[test]
        for delta in (0.0, 0.02, 0.05, 0.1):
            rs = [score_ranking(d, gemm_prior.diversify(P, *_tiles(d), delta), ks=(1, 3)) for d, P in zip(a100, Ps)]
            crit = np.mean([(r["1"]["geomean"] + r["3"]["geomean"]) / 2 for r in rs])
            print(f"{json.dumps(opts)} diversity {delta}: CV k=1 {[round(r['1']['geomean'], 4) for r in rs]} k=3 "
                  f"{[round(r['3']['geomean'], 4) for r in rs]} criterion {crit:.5f} [{time.time() - t:.0f} s]",
                  flush=True)
    print(f"{time.time() - t0:.0f} s")
    return 0


def _tiles(d):
    ca = gemm_prior.config_arrays(d.configs)
    return ca["bm"], ca["bn"]


def ship(datas, t0: float, **opts) -> int:
    """Train on all four files and write ``gemm_prior.SHIPPED_PATH``, with its held-out quality on the
    across-GPU protocol recorded for the zero-shot confidence rule."""
    from torchtune_ops import __version__

    prior = fit(datas, vs_aten=True, **opts)
    prior.meta.update(source="PyTorch AutoHeuristic mm timings (AlnisM/autoheuristic-datasets, Aug 2024): "
                             "Inductor's Triton mm template and cuBLAS on A100 and H100",
                      version="gemm_inductor_v1", package=__version__,
                      files=[d.name for d in datas], shapes=int(sum(len(d.problems) for d in datas)),
                      trained_with=f"benchmarks/perfmodel_eval.py --ship ({json.dumps(dict(OPTIONS, **opts))})")
    # held-out quality for zero_shot's confidence rule: A100-trained, judged on the H100 file
    a100, h100 = datas[:3], datas[3]
    m = fit(a100, **opts)
    P = model_scores(m, h100)
    T = _times(h100)
    fr, rho = [], []
    from torchtune_ops.tuning.perfmodel import spearman

    for s in range(len(h100.problems)):
        fin = np.isfinite(T[s])
        fr.append(float(T[s][fin].min() / T[s][np.argmin(P[s])]))
        r = spearman(P[s][fin], T[s][fin])
        if not math.isnan(r):
            rho.append(r)
    prior.quality = {"fraction": float(np.mean(fr)), "spearman": float(np.mean(rho)), "n_problems": float(len(fr))}
    prior.meta["quality_protocol"] = "trained on the A100 files, judged on h100_hf_train (across GPUs)"
    gemm_prior.SHIPPED_PATH.parent.mkdir(parents=True, exist_ok=True)
    prior.save(gemm_prior.SHIPPED_PATH)
    print(f"wrote {gemm_prior.SHIPPED_PATH} ({gemm_prior.SHIPPED_PATH.stat().st_size / 1024:.0f} KiB), quality "
          f"{prior.quality}; {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
