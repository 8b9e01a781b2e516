"""A performance model learned from the trial history: warm starts, pruning and zero-shot predictions.

    from torchtune_ops.tuning import perfmodel
    model = perfmodel.PerfModel.fit(rows, family="gemm", sms=132)    # rows: [(problem, config, ms, aten_ms)]
    scores = model.predict(problem_dict, configs)                     # lower is faster (log time, relative)
    model = perfmodel.model_for(store, fingerprint_key, "gemm")       # trained on the store, saved beside it

The model is a small gradient-boosted regression-tree ensemble (numpy only) over features of the problem,
of the configuration and derived ones (tiles and waves over the multiprocessors, padding waste, shared
memory, work per tile, registers). Its target is rank-oriented: the log of each measurement over the best
of its problem, so problems of different sizes share one scale and only the order within a problem counts.
A second ensemble, trained on log(time / aten's time) where the cache knows aten's time, says by how much
a configuration is expected to beat PyTorch's kernel: the zero-shot margin.

Families without a known featurizer (and the Kernel Tuner spaces of ../shared/datasets, which have no
problem fields) are described by their configuration's parameters alone. docs/perfmodel.md has the design.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger("torchtune_ops")

__all__ = ["PerfModel", "PerfModelWarning", "Hints", "Prediction", "featurize", "model_for", "model_path",
           "history_rows", "search_hints", "related_hints", "zero_shot", "nearest_winners", "spearman", "SCHEMA",
           "NOMINAL_SMS", "prior_for", "prior_notes", "model_with_prior", "Blended", "PRIOR_HALF_WEIGHT"]

#: format version of the saved model files (a different version is retrained, not read)
SCHEMA = 1
#: multiprocessors assumed when the fingerprint has none (the interpreter): an H100's
NOMINAL_SMS = 132
#: a zero-shot prediction is used only when held-out problems reached at least this fraction of their best
MIN_CV_FRACTION = 0.9
#: ... and the held-out rank correlation is at least this
MIN_CV_SPEARMAN = 0.5
#: ... and the model predicts the configuration beats aten by at least this fraction
MIN_MARGIN = 0.10
#: fewest problems (with two or more finite trials) a model is trained on; fewer gives no model
MIN_PROBLEMS = 2
#: fewest problems before the held-out quality is trusted at all
MIN_CV_PROBLEMS = 3
#: failed measurements are learned as this much slower (log) than the slowest finite one of the problem
FAIL_PENALTY = math.log(4.0)
#: normalised log times are clipped here: past 4x slower than the best, the order matters little
CLIP = math.log(4.0)


class PerfModelWarning(RuntimeWarning):
    """A saved performance model could not be read (it is ignored and retrained)."""


# ----------------------------------------------------------------------------------------------- features

_CODES = {"row": 0, "col": 1, "strided": 2, "nchw": 0, "nhwc": 1, "ieee": 0, "tf32": 1,
          "float16": 2, "bfloat16": 2, "float32": 4}


def _log2(x: np.ndarray | float) -> np.ndarray:
    return np.log2(np.maximum(np.asarray(x, dtype=float), 1.0))


def _cdiv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.ceil(np.asarray(a, dtype=float) / np.maximum(np.asarray(b, dtype=float), 1.0))


def _gemm_view(family: str, p: Mapping[str, Any]) -> dict[str, float] | None:
    """Problem features of a GEMM or of a convolution's per-group GEMM view; None for other families."""
    if family == "gemm":
        return {"M": p["M"], "N": p["N"], "K": p["K"], "batch": max(1, int(p.get("batch", 1) or 1)),
                "es": _CODES.get(str(p.get("dtype")), 2), "a_layout": _CODES.get(p.get("a_layout"), 0),
                "b_layout": _CODES.get(p.get("b_layout"), 0), "tf32": _CODES.get(p.get("precision"), 0),
                "R": 1, "S": 1, "stride": 1, "groups": 1, "depthwise": 0}
    if family == "conv2d":
        pad = list(p.get("padding", (0, 0, 0, 0)))
        pad = pad if len(pad) == 4 else [pad[0], pad[0], pad[-1], pad[-1]]
        dil = list(p.get("dilation", (1, 1)))
        st = list(p.get("stride", (1, 1)))
        h, w, r, s = int(p["H"]), int(p["W"]), int(p["R"]), int(p["S"])
        pp = (h + pad[0] + pad[1] - dil[0] * (r - 1) - 1) // st[0] + 1
        qq = (w + pad[2] + pad[3] - dil[1] * (s - 1) - 1) // st[1] + 1
        g = max(1, int(p.get("groups", 1)))
        cg = int(p["C"]) // g
        return {"M": int(p["N"]) * max(pp, 1) * max(qq, 1), "N": int(p["K"]) // g, "K": cg * r * s, "batch": g,
                "es": _CODES.get(str(p.get("dtype")), 2), "a_layout": _CODES.get(p.get("layout"), 0),
                "b_layout": 0, "tf32": _CODES.get(p.get("precision"), 0), "R": r, "S": s,
                "stride": st[0] * st[1], "groups": g, "depthwise": int(cg == 1)}
    return None


def _config_columns(configs: Sequence[Mapping[str, Any]],
                    names: Sequence[str]) -> dict[str, tuple[np.ndarray, bool]]:
    """Each parameter as numbers and whether it is numeric: its values when all are numbers, else a stable
    code per value."""
    cols = {}
    for n in names:
        vals = [c.get(n) for c in configs]
        if all(isinstance(v, (int, float)) for v in vals):
            cols[n] = (np.asarray(vals, dtype=float), True)
        else:
            cols[n] = (np.asarray([_stable_code(v) for v in vals], dtype=float), False)
    return cols


def _stable_code(v: Any) -> float:
    """A deterministic number for a categorical value (same in every process)."""
    return float(int(hashlib.sha1(repr(v).encode()).hexdigest()[:6], 16))


_GEMM_PARAMS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "SPLIT_K", "TMA")


def featurize(family: str, problem: Mapping[str, Any], configs: Sequence[Mapping[str, Any]], *,
              sms: int = NOMINAL_SMS, params: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """The feature matrix of ``configs`` for one problem.

    Args:
        family: the kernel family's name; "gemm" and "conv2d" get problem and derived features, any
            other name is described by its configuration parameters (and numeric problem fields) alone.
        problem: the problem as a dict (``family.problem_to_dict``); may be empty.
        configs: configurations as dicts.
        sms: multiprocessors of the device (for tiles and waves). Default ``NOMINAL_SMS``.
        params: the configuration parameters to use, in order; None (default): those of ``configs[0]``
            (for "gemm"/"conv2d": the known GEMM parameters).

    Returns:
        (X, names): an (n, F) float matrix and the feature names.
    """
    n = len(configs)
    view = _gemm_view(family, problem)
    if view is None:
        names = list(params if params is not None else (configs[0].keys() if configs else ()))
        cols = _config_columns(configs, names)
        feats = {f"cfg.{k}": v for k, (v, _) in cols.items()}
        for k, v in sorted(problem.items()):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                lv = float(np.log2(max(float(v), 1.0)))
                feats[f"prob.{k}"] = np.full(n, lv)
                for name, (col, numeric) in cols.items():  # problem size over a numeric parameter (tiles)
                    if numeric:
                        feats[f"prob.{k}/cfg.{name}"] = lv - _log2(col)
        return (np.stack(list(feats.values()), axis=1) if feats else np.zeros((n, 0))), list(feats)
    c = {k: np.asarray([float(cfg.get(k, 1 if k != "TMA" else 0)) for cfg in configs]) for k in _GEMM_PARAMS}
    M, N, K, B = (float(view[k]) for k in ("M", "N", "K", "batch"))
    bm, bn, bk, sk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], np.maximum(c["SPLIT_K"], 1)
    tm, tn = _cdiv(M, bm), _cdiv(N, bn)
    tiles = B * tm * tn * sk
    waves = tiles / sms
    kiters = _cdiv(K, bk * sk)
    es = float(view["es"])
    smem = c["num_stages"] * (bm * bk + bk * bn) * es
    feats = {
        "logM": np.full(n, _log2(M)), "logN": np.full(n, _log2(N)), "logK": np.full(n, _log2(K)),
        "logB": np.full(n, _log2(B)), "es": np.full(n, es), "a_layout": np.full(n, float(view["a_layout"])),
        "b_layout": np.full(n, float(view["b_layout"])), "tf32": np.full(n, float(view["tf32"])),
        "RS": np.full(n, float(view["R"] * view["S"])), "stride": np.full(n, float(view["stride"])),
        "depthwise": np.full(n, float(view["depthwise"])), "logflops": np.full(n, _log2(B * M * N * K)),
        "logBM": _log2(bm), "logBN": _log2(bn), "logBK": _log2(bk), "GROUP_M": c["GROUP_M"],
        "warps": c["num_warps"], "stages": c["num_stages"], "logSK": _log2(sk), "TMA": c["TMA"],
        "logtiles": _log2(tiles), "waves": np.minimum(waves, 64.0),
        "wave_eff": tiles / (np.ceil(waves) * sms),
        "pad_m": tm * bm / max(M, 1.0), "pad_n": tn * bn / max(N, 1.0),
        "pad_k": kiters * bk * sk / max(K, 1.0), "logkiters": _log2(kiters),
        "logsmem": _log2(smem), "intensity": bm * bn / (bm + bn),
        "logwork": _log2(bm * bn * kiters * bk), "regs": bm * bn / (c["num_warps"] * 32.0),
        "stages_over_k": c["num_stages"] / np.maximum(kiters, 1.0),
        "m_over_bm": _log2(M) - _log2(bm), "n_over_bn": _log2(N) - _log2(bn),
    }
    return np.stack(list(feats.values()), axis=1), list(feats)


# ------------------------------------------------------------------------------ gradient-boosted trees

class _Trees:
    """Gradient-boosted regression trees of fixed depth on binned features (squared loss, numpy only).

    Every tree is complete: node i has children 2i+1 and 2i+2; a node with feature -1 is a leaf whose
    value every row reaching it gets (so shallow splits that stop early still predict)."""

    def __init__(self, feat: np.ndarray, thr: np.ndarray, val: np.ndarray, base: float, depth: int):
        self.feat, self.thr, self.val, self.base, self.depth = feat, thr, val, base, depth

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, *, n_trees: int = 120, depth: int = 5, lr: float = 0.15,
            min_leaf: int = 4, n_bins: int = 32, subsample: float = 0.8, l2: float = 1.0,
            seed: int = 0) -> "_Trees":
        rng = np.random.default_rng(seed)
        n, F = X.shape
        edges = []
        Xb = np.zeros((n, F), dtype=np.int64)
        for f in range(F):
            u = np.unique(X[:, f])
            if len(u) > n_bins:
                u = np.unique(np.quantile(X[:, f], np.linspace(0, 1, n_bins + 1)[1:-1]))
                e = u
            else:
                e = (u[:-1] + u[1:]) / 2 if len(u) > 1 else np.zeros(0)
            edges.append(e)
            Xb[:, f] = np.searchsorted(e, X[:, f], side="left")
        nb = max(1, max(len(e) for e in edges) + 1)
        size = 2 ** (depth + 1) - 1
        feats = np.full((n_trees, size), -1, dtype=np.int64)
        thrs = np.zeros((n_trees, size))
        vals = np.zeros((n_trees, size))
        base = float(np.mean(y)) if n else 0.0
        pred = np.full(n, base)
        for t in range(n_trees):
            rows = np.flatnonzero(rng.random(n) < subsample) if subsample < 1 else np.arange(n)
            if len(rows) < 2 * min_leaf:
                rows = np.arange(n)
            g = y[rows] - pred[rows]
            node = np.zeros(len(rows), dtype=np.int64)
            xb = Xb[rows]
            for level in range(depth):
                first = 2 ** level - 1
                width = 2 ** level
                act = node >= first  # rows of nodes that stopped splitting earlier stay out
                if not act.any():
                    break
                local = node[act] - first
                ga, xa = g[act], xb[act]
                cnt_node = np.bincount(local, minlength=width).astype(float)
                sum_node = np.bincount(local, weights=ga, minlength=width)
                vals[t, first:first + width] = sum_node / (cnt_node + l2)
                best_gain = np.zeros(width)
                best_f = np.full(width, -1)
                best_b = np.zeros(width, dtype=np.int64)
                parent = sum_node ** 2 / (cnt_node + l2)
                for f in range(F):
                    key = local * nb + xa[:, f]
                    cnt = np.bincount(key, minlength=width * nb).reshape(width, nb).cumsum(axis=1)
                    sm = np.bincount(key, weights=ga, minlength=width * nb).reshape(width, nb).cumsum(axis=1)
                    cr, sr = cnt_node[:, None] - cnt, sum_node[:, None] - sm
                    gain = sm ** 2 / (cnt + l2) + sr ** 2 / (cr + l2) - parent[:, None]
                    gain[(cnt < min_leaf) | (cr < min_leaf)] = 0.0
                    b = gain.argmax(axis=1)
                    gb = gain[np.arange(width), b]
                    better = gb > best_gain + 1e-12
                    best_gain[better], best_f[better], best_b[better] = gb[better], f, b[better]
                for i in range(width):
                    f = int(best_f[i])
                    if f < 0 or best_b[i] >= len(edges[f]):
                        continue
                    feats[t, first + i] = f
                    thrs[t, first + i] = edges[f][best_b[i]]
                f_at = feats[t, node]
                split = act & (f_at >= 0)
                if not split.any():
                    break
                go_right = np.zeros(len(rows), dtype=bool)
                go_right[split] = xb[split, f_at[split]] > best_b[node[split] - first]
                # rows of unsplit nodes stay where they are (their node keeps its value as a leaf)
                node = np.where(split, 2 * node + 1 + go_right, node)
            last = 2 ** depth - 1
            deep = node >= last
            if deep.any():
                ln = node[deep] - last
                c = np.bincount(ln, minlength=2 ** depth).astype(float)
                s = np.bincount(ln, weights=g[deep], minlength=2 ** depth)
                vals[t, last:] = s / (c + l2)
            vals[t] *= lr
            pred += cls(feats[t:t + 1], thrs[t:t + 1], vals[t:t + 1], 0.0, depth).predict(X)
        return cls(feats, thrs, vals, base, depth)

    @classmethod
    def bagged(cls, X: np.ndarray, y: np.ndarray, *, n_bags: int = 3, seed: int = 0, **kw: Any) -> "_Trees":
        """The average of ``n_bags`` ensembles fitted with different row subsamples, as one ensemble
        (trees concatenated, leaf values divided by ``n_bags``): steadier predictions at the top."""
        fits = [cls.fit(X, y, seed=seed + b, **kw) for b in range(n_bags)]
        if len(fits) == 1:
            return fits[0]
        return cls(np.concatenate([f.feat for f in fits]), np.concatenate([f.thr for f in fits]),
                   np.concatenate([f.val for f in fits]) / n_bags, float(np.mean([f.base for f in fits])),
                   fits[0].depth)

    def predict(self, X: np.ndarray) -> np.ndarray:
        n = len(X)
        out = np.full(n, self.base)
        ar = np.arange(n)
        for t in range(len(self.feat)):
            feat, thr, val = self.feat[t], self.thr[t], self.val[t]
            node = np.zeros(n, dtype=np.int64)
            for _ in range(self.depth):
                f = feat[node]
                split = f >= 0
                if not split.any():
                    break
                x = X[ar, np.where(split, f, 0)]
                node = np.where(split, 2 * node + 1 + (x > thr[node]), node)
            out += val[node]
        return out

    def to_dict(self) -> dict:
        return {"feat": self.feat.tolist(), "thr": self.thr.tolist(), "val": self.val.tolist(),
                "base": self.base, "depth": self.depth}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "_Trees":
        feat = np.asarray(d["feat"], dtype=np.int64)
        thr, val = np.asarray(d["thr"], dtype=float), np.asarray(d["val"], dtype=float)
        depth = int(d["depth"])
        size = 2 ** (depth + 1) - 1
        if feat.ndim != 2 or feat.shape[1] != size or thr.shape != feat.shape or val.shape != feat.shape:
            raise ValueError("tree arrays have the wrong shape")
        return cls(feat, thr, val, float(d["base"]), depth)


# ----------------------------------------------------------------------------------------------- metrics

def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (average ranks for ties); NaN if constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return sums[inv] / counts[inv]


# --------------------------------------------------------------------------------------------- the model

def _targets(values: np.ndarray) -> np.ndarray | None:
    """log(t / best) per problem with failures as slower than the slowest; None when < 2 finite values."""
    fin = np.isfinite(values) & (values > 0)
    if fin.sum() < 2:
        return None
    lv = np.log(np.where(fin, values, 1.0))
    y = lv - lv[fin].min()
    y = np.where(fin, y, y[fin].max() + FAIL_PENALTY)
    return np.minimum(y, CLIP)


@dataclasses.dataclass
class _Group:
    problem: dict
    configs: list[dict]
    values: np.ndarray
    aten_ms: float


def _groups(rows: Iterable[tuple[Mapping, Mapping, float, float]]) -> list[_Group]:
    by: dict[str, _Group] = {}
    for prob, cfg, ms, aten in rows:
        k = json.dumps(prob, sort_keys=True, default=str)
        g = by.get(k)
        if g is None:
            g = by[k] = _Group(dict(prob), [], [], float(aten) if aten is not None else math.nan)
        g.configs.append(dict(cfg))
        g.values.append(math.inf if ms is None or not math.isfinite(ms) else float(ms))
    out = []
    for g in by.values():
        seen: dict[str, int] = {}
        cfgs, vals = [], []
        for c, v in zip(g.configs, g.values):  # a configuration measured twice: its best value
            k = json.dumps(c, sort_keys=True)
            if k in seen:
                vals[seen[k]] = min(vals[seen[k]], v)
            else:
                seen[k] = len(cfgs)
                cfgs.append(c)
                vals.append(v)
        out.append(_Group(g.problem, cfgs, np.asarray(vals, dtype=float), g.aten_ms))
    return out


class PerfModel:
    """A trained performance model for one kernel family on one device.

    ``predict`` gives a score per configuration, lower is faster (log time over the problem's best, as
    learned); ``predict_vs_aten`` the predicted log(time / aten's time), when the history had aten's
    times; ``quality`` the held-out metrics that decide whether zero-shot predictions are trusted.
    """

    def __init__(self, *, family: str, sms: int, params: list[str] | None, names: list[str], rank: _Trees,
                 vs_aten: _Trees | None, quality: dict[str, float], n_trials: int, n_problems: int):
        self.family, self.sms, self.params, self.names = family, sms, params, names
        self.rank, self.vs_aten, self.quality = rank, vs_aten, quality
        self.n_trials, self.n_problems = n_trials, n_problems

    # -- training

    @classmethod
    def fit(cls, rows: Iterable[tuple[Mapping, Mapping, float, float]], *, family: str, sms: int = NOMINAL_SMS,
            params: Sequence[str] | None = None, cv: bool = True, n_trees: int = 120, depth: int = 5,
            n_bags: int = 3, seed: int = 0) -> "PerfModel | None":
        """Train on a trial history.

        Args:
            rows: (problem dict, config dict, milliseconds or inf for a failure, aten's milliseconds or NaN)
                for every measurement of every problem.
            family: the kernel family's name (chooses the features, see ``featurize``).
            sms: the device's multiprocessors. Default ``NOMINAL_SMS``.
            params: for featurizer-less families, the configuration parameters in order; None (default):
                those of the first configuration.
            cv: estimate the held-out quality (rank correlation, fraction of the optimum reached by the
                predicted best) by leaving problems out (up to 4 folds); False leaves ``quality`` empty,
                so zero-shot predictions are never trusted. Default True.
            n_trees, depth: the ensemble's size. Defaults 120 and 5.
            n_bags: the ranking model averages this many ensembles fitted on different row subsamples
                (default 3; the held-out estimate and the aten model use one).
            seed: seed of the row subsampling. Default 0.

        Returns:
            The model, or None when fewer than ``MIN_PROBLEMS`` problems have two finite measurements.
        """
        groups = [g for g in _groups(rows) if _targets(g.values) is not None]
        if len(groups) < MIN_PROBLEMS:
            return None
        if params is None and _is_generic(family):
            params = list(groups[0].configs[0].keys())
        X, y, ya, gid, names = _design(groups, family, sms, params)
        kw = dict(n_trees=n_trees, depth=depth, seed=seed)
        rank = _Trees.bagged(X, y, n_bags=max(1, n_bags), **kw)
        have = np.isfinite(ya)
        vs_aten = _Trees.fit(X[have], ya[have], **kw) if have.sum() >= 8 else None
        quality: dict[str, float] = {}
        if cv and len(groups) >= MIN_CV_PROBLEMS:
            quality = _cross_validate(groups, X, y, gid, kw)
        return cls(family=family, sms=sms, params=params, names=names, rank=rank, vs_aten=vs_aten,
                   quality=quality, n_trials=int(sum(len(g.values) for g in groups)), n_problems=len(groups))

    # -- predicting

    def features(self, problem: Mapping[str, Any], configs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        X, names = featurize(self.family, problem, configs, sms=self.sms, params=self.params)
        if names != self.names:
            raise ValueError(f"features {names} differ from the model's {self.names}")
        return X

    def predict(self, problem: Mapping[str, Any], configs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Predicted log(time / best time of the problem) per configuration: lower is faster."""
        if not configs:
            return np.zeros(0)
        return self.rank.predict(self.features(problem, configs))

    def predict_vs_aten(self, problem: Mapping[str, Any],
                        configs: Sequence[Mapping[str, Any]]) -> np.ndarray | None:
        """Predicted log(time / aten's time) per configuration, or None without aten times to learn from."""
        if self.vs_aten is None or not configs:
            return None
        return self.vs_aten.predict(self.features(problem, configs))

    def confident(self) -> bool:
        """Whether held-out problems say the model's best guess is good (see the MIN_* constants)."""
        q = self.quality
        return (q.get("n_problems", 0) >= MIN_CV_PROBLEMS and q.get("fraction", 0.0) >= MIN_CV_FRACTION
                and q.get("spearman", -1.0) >= MIN_CV_SPEARMAN)

    # -- persistence (JSON, data only)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "family": self.family, "sms": self.sms, "params": self.params,
                "names": self.names, "rank": self.rank.to_dict(),
                "vs_aten": None if self.vs_aten is None else self.vs_aten.to_dict(), "quality": self.quality,
                "n_trials": self.n_trials, "n_problems": self.n_problems}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PerfModel":
        if d.get("schema") != SCHEMA:
            raise ValueError(f"model schema {d.get('schema')!r}, expected {SCHEMA}")
        rank = _Trees.from_dict(d["rank"])
        vs = None if d.get("vs_aten") is None else _Trees.from_dict(d["vs_aten"])
        names = [str(n) for n in d["names"]]
        for t in (rank, vs):
            if t is not None and t.feat.size and (t.feat.max() >= len(names) or t.feat.min() < -1):
                raise ValueError("tree refers to a feature the model does not have")
        params = d.get("params")
        return cls(family=str(d["family"]), sms=int(d["sms"]), params=None if params is None else list(params),
                   names=names, rank=rank, vs_aten=vs,
                   quality={str(k): float(v) for k, v in dict(d.get("quality") or {}).items()},
                   n_trials=int(d["n_trials"]), n_problems=int(d["n_problems"]))

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as JSON atomically (a temporary file renamed over ``path``)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PerfModel":
        """Read a model written by ``save``. Raises OSError or ValueError when unreadable or malformed."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls.from_dict(data)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed model file {path}: {e!r}") from e


def _is_generic(family: str) -> bool:
    """True for families described by their configuration parameters alone (see ``featurize``)."""
    return family not in _GEMM_LIKE


_GEMM_LIKE = ("gemm", "conv2d")


def _design(groups: list[_Group], family: str, sms: int, params):
    Xs, ys, yas, gids = [], [], [], []
    names: list[str] = []
    for i, g in enumerate(groups):
        X, names = featurize(family, g.problem, g.configs, sms=sms, params=params)
        y = _targets(g.values)
        fin = np.isfinite(g.values)
        ya = np.full(len(y), math.nan)
        if math.isfinite(g.aten_ms) and g.aten_ms > 0:
            ya[fin] = np.log(g.values[fin] / g.aten_ms)
        Xs.append(X), ys.append(y), yas.append(ya), gids.append(np.full(len(y), i))
    return np.concatenate(Xs), np.concatenate(ys), np.concatenate(yas), np.concatenate(gids), names


def _cross_validate(groups, X, y, gid, kw) -> dict[str, float]:
    """Leave groups of problems out: mean held-out Spearman, fraction of the optimum reached by the predicted
    best (among the measured configurations; 0 when it failed), its minimum, and the mean top-1 regret."""
    n = len(groups)
    folds = min(4, n)
    assign = np.arange(n) % folds
    rhos, fracs = [], []
    small = dict(kw, n_trees=max(30, kw["n_trees"] // 2))
    for f in range(folds):
        test = assign[gid] == f
        if test.all() or not test.any():
            continue
        trees = _Trees.fit(X[~test], y[~test], **small)
        for i in np.flatnonzero(assign == f):
            rows = gid == i
            p = trees.predict(X[rows])
            vals = groups[i].values
            fin = np.isfinite(vals)
            rho = spearman(p[fin], vals[fin])
            if not math.isnan(rho):
                rhos.append(rho)
            t = vals[int(np.argmin(p))]
            fracs.append(float(vals[fin].min() / t) if math.isfinite(t) else 0.0)
    if not fracs:
        return {}
    regret = float(np.mean([1 / f - 1 if f > 0 else math.inf for f in fracs]))
    return {"spearman": float(np.mean(rhos)) if rhos else math.nan, "fraction": float(np.mean(fracs)),
            "regret": regret, "min_fraction": float(np.min(fracs)), "n_problems": float(n)}


# ------------------------------------------------------------------------------- the store and its models

def sms_of(fingerprint: str) -> int:
    """Multiprocessors from a fingerprint key ("...|sm132|..."); ``NOMINAL_SMS`` when absent or 0."""
    m = re.search(r"\|sm(\d+)\|", "|" + fingerprint + "|")
    n = int(m.group(1)) if m else 0
    return n if n > 0 else NOMINAL_SMS


def model_path(store: Any, fingerprint: str, family: str) -> Path:
    """``<cache dir>/perfmodel-<sha256(fingerprint)[:16]>-<family>.json``: beside the store's database."""
    h = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return Path(store.path).parent / f"perfmodel-{h}-{re.sub(r'[^A-Za-z0-9_]', '_', family)}.json"


def history_rows(store: Any, fingerprint: str, family: str) -> list[tuple[dict, dict, float, float]]:
    """Every stored measurement of ``family`` under ``fingerprint`` as (problem, config, ms, aten_ms)."""
    aten = {e.problem: e.aten_ms for e in store.entries(fingerprint, family=family)}
    rows = []
    for t in store.trials(fingerprint, family):
        try:
            rows.append((json.loads(t.problem), t.config_dict(), t.value_ms, aten.get(t.problem, math.nan)))
        except ValueError:
            continue
    return rows


_models: dict[tuple[str, str, str], tuple[int, PerfModel | None]] = {}
_warned: set[str] = set()


def model_for(store: Any, fingerprint: str, family: str, *, train: bool = True,
              reuse: bool = False) -> PerfModel | None:
    """The performance model of ``family`` on the device ``fingerprint``, or None when the history is too
    short.

    Kept in memory per process; read from ``model_path`` when that file was trained on as many trials as
    the store now holds, else trained again (a second or so) and saved there unless the store is
    read-only. A file that cannot be read is ignored with one ``PerfModelWarning`` and replaced.

    Args:
        store: a ``store.Store``.
        fingerprint: the device fingerprint key.
        family: the kernel family's name.
        train: train when no fresh model exists (default True); False only loads.
        reuse: return the model already in memory without checking the store for new trials (run-time
            dispatch, where reading the history at every unseen problem would cost too much). Default False.
    """
    key = (str(store.path), fingerprint, family)
    got = _models.get(key)
    if reuse and got is not None:
        return got[1]
    rows = history_rows(store, fingerprint, family)
    n = len(rows)
    if got is not None and got[0] == n:
        return got[1]
    path = model_path(store, fingerprint, family)
    model = None
    if path.exists():
        try:
            model = PerfModel.load(path)
        except (OSError, ValueError) as e:
            if str(path) not in _warned:
                _warned.add(str(path))
                warnings.warn(f"torchtune_ops: ignoring the unreadable performance model {path} ({e})",
                              PerfModelWarning, stacklevel=2)
            model = None
        if model is not None and (model.n_trials != _usable(rows) or model.family != family):
            model = None
    if model is None and train and rows:
        model = PerfModel.fit(rows, family=family, sms=sms_of(fingerprint))
        if model is not None and not getattr(store, "readonly", False):
            try:
                model.save(path)
            except OSError as e:
                log.info("could not save the performance model %s: %s", path, e)
    _models[key] = (n, model)
    return model


def _usable(rows) -> int:
    """How many trials a model trained on ``rows`` counts (problems with two finite values, deduplicated)."""
    return int(sum(len(g.values) for g in _groups(rows) if _targets(g.values) is not None))


def forget() -> None:
    """Drop the in-memory models (tests)."""
    _models.clear()
    _warned.clear()


# ------------------------------------------------------------------------------------------------ uses

@dataclasses.dataclass(frozen=True)
class Hints:
    """What a search gets from the model: configurations to measure first, a prior, the kept candidates."""

    initial: list[dict]
    prior: list[tuple[dict, float]]
    candidates: list[dict]
    pruned: int  # how many valid candidates were dropped


def _problem_vector(family: str, p: Mapping[str, Any]) -> np.ndarray:
    v = _gemm_view(family, p)
    if v is not None:
        return np.asarray([_log2(v["M"]), _log2(v["N"]), _log2(v["K"]), _log2(v["batch"]), v["es"], v["R"] * v["S"],
                           v["a_layout"], v["b_layout"]], dtype=float)
    return np.asarray([_log2(float(x)) for _, x in sorted(p.items())
                       if isinstance(x, (int, float)) and not isinstance(x, bool)], dtype=float)


def nearest_winners(store: Any, fingerprint: str, family: str, problem: Mapping[str, Any], *,
                    k: int = 3) -> list[dict]:
    """The winning configurations (not aten) of the ``k`` stored problems nearest to ``problem`` (in log
    sizes), nearest first; each problem's best measured configuration when aten won it."""
    me = _problem_vector(family, problem)
    scored = []
    for e in store.entries(fingerprint, family=family):
        try:
            other = json.loads(e.problem)
        except ValueError:
            continue
        if other == dict(problem):
            continue
        v = _problem_vector(family, other)
        if v.shape != me.shape:
            continue
        scored.append((float(np.abs(v - me).sum()), e))
    scored.sort(key=lambda t: t[0])
    out = []
    for _, e in scored[:k]:
        cfg = e.config()
        if cfg is None:
            trials = [t for t in store.trials(fingerprint, family, problem=e.problem) if math.isfinite(t.value_ms)]
            cfg = min(trials, key=lambda t: t.value_ms).config_dict() if trials else None
        if cfg is not None:
            out.append(dict(cfg))
    return out


def search_hints(model: PerfModel | None, problem: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]], *,
                 neighbours: Sequence[Mapping[str, Any]] = (), known: Sequence[Mapping[str, Any]] = (),
                 top: int = 4, known_top: int = 4, keep_fraction: float = 0.5, floor: int = 64,
                 min_spearman: float = 0.3, prune: bool | None = None) -> Hints:
    """Warm start and pruning for one problem's search.

    Args:
        model: the performance model (None: the neighbours' winners and known configurations only).
        problem: the problem as a dict.
        candidates: every valid configuration.
        neighbours: winners of the nearest problems (``nearest_winners``), measured right after the model's
            top predictions.
        known: the family's well-known configurations; with a model only its ``known_top`` best-predicted
            ones are measured first (all of them without a model).
        top: how many of the model's best predictions are measured first. Default 4.
        known_top: see ``known``. Default 4.
        keep_fraction: the fraction of candidates kept, best predicted first, when the model's held-out rank
            correlation is at least ``min_spearman`` (else nothing is pruned). Default 0.5.
        floor: never keep fewer than this many candidates (or all when there are fewer). Default 64.
        min_spearman: see ``keep_fraction``. Default 0.3.
        prune: True prunes whatever the model's held-out quality, False never; None (default) decides by
            ``min_spearman``.

    Returns:
        ``Hints``: ``initial`` (model top, neighbours, known; deduplicated, all among the kept candidates),
        ``prior`` (every candidate with its predicted relative time, for the search's density model),
        ``candidates`` (the kept ones) and ``pruned`` (how many were dropped).
    """
    cands = [dict(c) for c in candidates]
    keyset = {json.dumps(c, sort_keys=True): i for i, c in enumerate(cands)}

    def valid(cs):
        return [dict(c) for c in cs if json.dumps(dict(c), sort_keys=True) in keyset]

    if model is None or not cands:
        init = _dedup(valid(neighbours) + valid(known))
        return Hints(initial=init, prior=[], candidates=cands, pruned=0)
    score = model.predict(problem, cands)
    order = np.argsort(score, kind="stable")
    prior = [(cands[i], float(math.exp(min(score[i], 30.0)))) for i in order]
    known_v = valid(known)
    if known_v:
        ks = model.predict(problem, known_v)
        known_v = [known_v[i] for i in np.argsort(ks, kind="stable")[:known_top]]
    init = _dedup([cands[i] for i in order[:top]] + valid(neighbours) + known_v)
    kept = cands
    rho = model.quality.get("spearman", math.nan)
    if (rho >= min_spearman if prune is None else prune) and len(cands) > floor:
        n_keep = max(floor, int(math.ceil(keep_fraction * len(cands))))
        keep_idx = set(order[:n_keep].tolist()) | {keyset[json.dumps(c, sort_keys=True)] for c in init}
        kept = [cands[i] for i in sorted(keep_idx)]
    return Hints(initial=init, prior=prior, candidates=kept, pruned=len(cands) - len(kept))


def related_hints(sources: Sequence[Sequence[tuple[Mapping[str, Any], float]]],
                  candidates: Sequence[Mapping[str, Any]], *, prune: bool | None = True,
                  **options: Any) -> Hints:
    """Hints for ``search.tune`` from the measurements of related problems (other shapes, or the same
    kernel on other GPUs), described by their configurations alone.

    Args:
        sources: one list of (config, value) pairs per related problem; values of different sources need
            not be comparable (each is normalised by its own best). At least two sources with two finite
            values each, else the hints carry no model.
        candidates: the valid configurations of the problem to tune.
        prune: as in ``search_hints``; default True (there is no held-out estimate here).
        options: more keyword arguments for ``search_hints`` (top, keep_fraction, floor, known, ...).

    Returns:
        ``Hints``; pass ``initial=h.initial, prior=h.prior, candidates=h.candidates`` to ``search.tune``.

    Example:
        >>> a = [({"x": x}, abs(x - 5) + 1.0) for x in range(10)]
        >>> b = [({"x": x}, 2 * abs(x - 5) + 3.0) for x in range(10)]
        >>> related_hints([a, b], [{"x": x} for x in range(10)], top=1).initial
        [{'x': 5}]
    """
    rows = [({"source": f"s{i}"}, dict(c), v, math.nan) for i, src in enumerate(sources) for c, v in src]
    names = list(candidates[0].keys()) if candidates else None
    model = PerfModel.fit(rows, family="related", params=names, cv=False) if rows else None
    return search_hints(model, {}, candidates, prune=prune, **options)


def _dedup(cs: list[dict]) -> list[dict]:
    seen, out = set(), []
    for c in cs:
        k = json.dumps(c, sort_keys=True)
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A zero-shot choice: the configuration and the model's predicted time over aten's (below 1: faster)."""

    config: dict
    vs_aten: float


def zero_shot(model: PerfModel | None, problem: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]], *,
              margin: float = MIN_MARGIN) -> Prediction | None:
    """The model's configuration for an unseen problem when it is confident, else None (use aten).

    Confident means: the held-out problems reached at least ``MIN_CV_FRACTION`` of their optimum with the
    model's best guess and ranked with a Spearman correlation of at least ``MIN_CV_SPEARMAN``
    (``PerfModel.confident``), and the predicted time of the chosen configuration is below aten's by at
    least ``margin`` (default ``MIN_MARGIN``). The caller verifies it against aten before trusting it.
    """
    if model is None or not candidates or not model.confident():
        return None
    cands = [dict(c) for c in candidates]
    score = model.predict(problem, cands)
    best = int(np.argmin(score))
    va = model.predict_vs_aten(problem, [cands[best]])
    if va is None:
        return None
    ratio = float(math.exp(float(va[0])))
    if ratio > 1.0 - margin:
        return None
    return Prediction(config=cands[best], vs_aten=ratio)


# ------------------------------------------------------------------------------------ the shipped prior

#: local problems at which the device's own history weighs as much as the shipped prior
PRIOR_HALF_WEIGHT = 8
_prior_notes: dict[str, str] = {}


def _fingerprint_limits(fingerprint: str) -> tuple[tuple[int, int], int] | None:
    """(capability, SMs) read from a fingerprint key ("...|cc9.0|sm132|..."); None for the interpreter."""
    m = re.search(r"\|cc(\d+)\.(\d+)\|sm(\d+)\|", "|" + fingerprint + "|")
    if m is None:
        return None
    cap, sms = (int(m.group(1)), int(m.group(2))), int(m.group(3))
    return None if cap == (0, 0) or sms <= 0 else (cap, sms)


def prior_for(fingerprint: str, family: str, limits: Any = None) -> Any:
    """The shipped prior (``gemm_prior``) on the device of ``fingerprint``, or None (another family, the
    interpreter, no prior shipped). Its SMs and capability come from the fingerprint, its shared memory
    from ``limits`` (a ``kernels.base.DeviceLimits`` of a GPU) or else from the nearest GPU the prior knows.
    ``.note`` says which GPU's data it rests on (``prior_notes()``, ``explain()``, ``doctor``)."""
    from .. import settings

    if family != "gemm" or not settings.current().perfmodel_prior:
        return None
    dev = _fingerprint_limits(fingerprint)
    if dev is None:
        return None
    from . import gemm_prior

    prior = gemm_prior.shipped()
    if prior is None:
        return None
    cap, sms = dev
    smem = int(getattr(limits, "smem_per_block", 0) or 0) if limits is not None and not getattr(
        limits, "interpreter", True) else 0
    if smem <= 0:
        near = prior.nearest_gpu(sms=sms, capability=cap)
        smem = int(near["smem"]) if near else 166912
    name = fingerprint.split("|", 1)[0]
    model = prior.for_device(sms=sms, smem=smem, capability=cap, name=name)
    _prior_notes[fingerprint] = model.note
    return model


def prior_notes() -> dict[str, str]:
    """Per fingerprint key, what the shipped prior said about the device it was used on in this process."""
    return dict(_prior_notes)


class Blended:
    """The device's own model and the shipped prior, weighed by how much the device has measured: the own
    model's weight is n / (n + ``PRIOR_HALF_WEIGHT``) for n problems in its history. The quality and the
    aten margin are the own model's when it has them."""

    def __init__(self, own: PerfModel, prior: Any, *, half: float = PRIOR_HALF_WEIGHT) -> None:
        self.own, self.prior = own, prior
        self.weight = own.n_problems / (own.n_problems + half)
        self.family = own.family
        self.note = getattr(prior, "note", "")

    @property
    def quality(self) -> dict[str, float]:
        return self.own.quality or self.prior.quality

    def predict(self, problem: Mapping[str, Any], configs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return self.weight * self.own.predict(problem, configs) + (1 - self.weight) * self.prior.predict(problem,
                                                                                                          configs)

    def predict_vs_aten(self, problem: Mapping[str, Any], configs: Sequence[Mapping[str, Any]]) -> np.ndarray | None:
        own = self.own.predict_vs_aten(problem, configs)
        return own if own is not None else self.prior.predict_vs_aten(problem, configs)

    def confident(self) -> bool:
        return self.own.confident() if self.own.quality else self.prior.confident()


def model_with_prior(store: Any, fingerprint: str, family: str, *, limits: Any = None, reuse: bool = False) -> Any:
    """What the tuner and the zero-shot path use: the device's own model (``model_for``) blended with the
    shipped prior (``prior_for``); the prior alone with an empty history; the own model alone for families
    and devices the prior does not cover; None when there is neither."""
    own = model_for(store, fingerprint, family, reuse=reuse)
    try:
        prior = prior_for(fingerprint, family, limits)
    except Exception as e:  # noqa: BLE001 - a broken prior must not stop tuning
        log.info("shipped performance prior unavailable (%s: %s)", type(e).__name__, e)
        prior = None
    if prior is None:
        return own
    if own is None:
        return prior
    return Blended(own, prior)
