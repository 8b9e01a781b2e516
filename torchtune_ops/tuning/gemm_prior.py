"""A GEMM performance prior learned from real GPU timings, shipped with the package.

    from torchtune_ops.tuning import gemm_prior
    prior = gemm_prior.shipped()                                   # priors/gemm_inductor_v1.json, or None
    model = prior.for_device(sms=132, smem=232448, capability=(9, 0))
    scores = model.predict(problem_dict, configs)                   # lower is faster

Trained on PyTorch AutoHeuristic's timings of Inductor's Triton mm template on an A100 and an H100
(``inductor_data``; ../shared/datasets/inductor_mm). Its features describe a configuration on a problem
relative to the device's limits (waves of tiles over the SMs, shared memory over its capacity, tile
efficiency on the edges, alignment), so that what it learned on one GPU carries to another; on a GPU the
data does not cover, the device's own limits are used and the nearest covered GPU is named
(``DeviceModel.note``). The target is per problem: each configuration's place among the problem's recorded
ones (0 the fastest, 1 the slowest; chosen over log(time / best) by grouped cross-validation on the A100
files); a second ensemble predicts log(time / cuBLAS's time) for the zero-shot margin.

The trees are stored as plain arrays in JSON and evaluated here with numpy: using the prior needs no
learning library. Fitting uses scikit-learn's HistGradientBoostingRegressor (the ``train`` extra) or any
function returning a ``Forest`` (the benchmark passes perfmodel's numpy trees this way). docs/perfmodel.md
has the evaluation.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["Forest", "GemmPrior", "DeviceModel", "features", "FEATURE_GROUPS", "shipped", "SHIPPED_PATH", "fit",
           "problem_arrays", "config_arrays", "diversify",
           "machine_balance", "PEAKS"]

SHIPPED_PATH = Path(__file__).resolve().parent / "priors" / "gemm_inductor_v1.json"
SCHEMA = 1
CLIP = math.log(4.0)
#: added to the score of configurations outside the data's kind (split-K, TMA, GROUP_M != 8): they follow
#: their plain twin (scores are places among a problem's configurations, 0..1: 0.05 is 5% of them)
UNSEEN_PENALTY = 0.05
_LAYOUT = {"row": 0, "col": 1, "strided": 2}
_ES = {"float16": 2, "bfloat16": 2, "float32": 4}

#: feature groups (the ablation in docs/perfmodel.md removes one at a time)
FEATURE_GROUPS = {
    "problem": ("logM", "logN", "logK", "es", "a_col", "b_col", "tf32", "log_ai"),
    "config": ("logBM", "logBN", "logBK", "warps", "stages"),
    "waves": ("log_tiles_per_sm", "waves", "wave_eff"),
    "smem": ("smem_frac", "blocks_by_smem"),
    "edges": ("pad_m", "pad_n", "pad_k", "k_rem"),
    "align": ("align_a", "align_b"),
    "derived": ("log_kiters", "tile_ai", "regs", "stages_over_k", "log_tile_work"),
    "roofline": ("log_work_per_sm", "log_traffic_per_sm", "log_balance"),
    "balance": ("log_tile_ai_over_balance", "log_ai_over_balance"),
    "arch": ("arch",),
}

#: dense fp16 tensor-core TFLOP/s and memory TB/s by compute capability (the GPU most met with each; data
#: sheets): the machine balance that arithmetic intensities are measured against
PEAKS = {(7, 0): (125.0, 0.9), (7, 5): (65.0, 0.32), (8, 0): (312.0, 2.04), (8, 6): (125.0, 0.6),
         (8, 7): (85.0, 0.2), (8, 9): (121.0, 0.3), (9, 0): (989.0, 3.35), (10, 0): (2250.0, 8.0),
         (12, 0): (210.0, 0.9)}


def machine_balance(capability: Sequence[int]) -> float:
    """fp16 FLOP per byte of memory traffic at peak, for a capability (the nearest one in ``PEAKS``)."""
    cap = tuple(int(x) for x in capability)[:2]
    key = min(PEAKS, key=lambda c: (abs(c[0] - cap[0]), abs(c[1] - cap[1])))
    tf, tb = PEAKS[key]
    return tf / tb
#: chosen by grouped CV on the training files (benchmarks/perfmodel_eval.py, "H100 shapes out"): "arch" lets the
#: prior tell its GPUs apart (it is constant when trained on one GPU); "balance" did not help there
DEFAULT_GROUPS = ("problem", "config", "waves", "smem", "edges", "align", "derived", "roofline", "arch")


def problem_arrays(problems: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """M, N, K, batch, element size, layouts and TF32 of GEMM problem dicts, as arrays."""
    def col(f):
        return np.asarray([f(p) for p in problems], dtype=float)
    return {"M": col(lambda p: p["M"]), "N": col(lambda p: p["N"]), "K": col(lambda p: p["K"]),
            "B": col(lambda p: max(1, int(p.get("batch", 1) or 1))),
            "es": col(lambda p: _ES.get(str(p.get("dtype")), 2)),
            "la": col(lambda p: _LAYOUT.get(p.get("a_layout"), 0)),
            "lb": col(lambda p: _LAYOUT.get(p.get("b_layout"), 0)),
            "tf32": col(lambda p: p.get("precision") == "tf32")}


def config_arrays(configs: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    def col(k, d):
        return np.asarray([float(c.get(k, d)) for c in configs])
    return {"bm": col("BLOCK_M", 16), "bn": col("BLOCK_N", 16), "bk": col("BLOCK_K", 16),
            "warps": col("num_warps", 4), "stages": col("num_stages", 2), "sk": col("SPLIT_K", 1)}


def _lg(x):
    return np.log2(np.maximum(x, 1.0))


def features(p: Mapping[str, np.ndarray], c: Mapping[str, np.ndarray], *, sms: float, smem: float, arch: float,
             groups: Sequence[str] = DEFAULT_GROUPS, balance: float = 150.0) -> tuple[np.ndarray, list[str]]:
    """Feature matrix of rows (problem, config), given equally long arrays (``problem_arrays`` and
    ``config_arrays`` indexed per row) and the device's SMs, shared memory per block (bytes), architecture
    code (capability major of the nearest GPU the prior knows) and fp16 machine balance (FLOP/byte;
    ``machine_balance``; float32 counts 1/16 of it, TF32 1/2)."""
    M, N, K, B, es = p["M"], p["N"], p["K"], p["B"], p["es"]
    bm, bn, bk, warps, stages = c["bm"], c["bn"], c["bk"], c["warps"], c["stages"]
    sk = np.maximum(c.get("sk", np.ones_like(bm)), 1.0)
    tm, tn = np.ceil(M / bm), np.ceil(N / bn)
    tiles = B * tm * tn * sk
    waves = tiles / sms
    kiters = np.maximum(np.ceil(K / (bk * sk)), 1.0)
    smem_use = stages * (bm * bk + bk * bn) * es
    lead_a = np.where(p["la"] == 1, M, K)
    lead_b = np.where(p["lb"] == 1, K, N)
    bal = balance * np.where(es >= 4, np.where(p["tf32"] > 0, 0.5, 1 / 16), 1.0)
    f = {
        "logM": _lg(M), "logN": _lg(N), "logK": _lg(K), "es": es, "a_col": (p["la"] == 1) * 1.0,
        "b_col": (p["lb"] == 1) * 1.0, "tf32": p["tf32"] * 1.0,
        "log_ai": _lg(M * N * K / np.maximum(M * K + K * N + M * N, 1.0)),
        "logBM": _lg(bm), "logBN": _lg(bn), "logBK": _lg(bk), "warps": warps, "stages": stages,
        "log_tiles_per_sm": np.log2(np.maximum(tiles, 1.0) / sms), "waves": np.minimum(np.ceil(waves), 64.0),
        "wave_eff": tiles / (np.ceil(waves) * sms),
        "smem_frac": smem_use / smem, "blocks_by_smem": np.minimum(np.floor(smem / np.maximum(smem_use, 1.0)), 8.0),
        "pad_m": tm * bm / np.maximum(M, 1.0), "pad_n": tn * bn / np.maximum(N, 1.0),
        "pad_k": kiters * bk * sk / np.maximum(K, 1.0), "k_rem": (np.mod(K, bk) != 0) * 1.0,
        "align_a": (np.mod(lead_a * es, 16) == 0) * 1.0, "align_b": (np.mod(lead_b * es, 16) == 0) * 1.0,
        "log_kiters": _lg(kiters), "tile_ai": bm * bn / (bm + bn), "regs": bm * bn / (warps * 32.0),
        "stages_over_k": stages / kiters, "log_tile_work": _lg(bm * bn * kiters * bk),
        # padded work and operand traffic per SM (what a compute- or a memory-bound time grows with)
        "log_work_per_sm": _lg(np.ceil(waves) * bm * bn * kiters * bk * sk),
        "log_traffic_per_sm": _lg(tiles * (bm + bn) * kiters * bk * es / sms),
        "log_balance": np.log2(bm * bn / ((bm + bn) * es)),
        # arithmetic intensity (FLOP per byte) of a tile's K step and of the whole problem over the machine's
        "log_tile_ai_over_balance": np.log2(2 * bm * bn / ((bm + bn) * es) / bal),
        "log_ai_over_balance": np.log2(2 * M * N * K / np.maximum((M * K + K * N + M * N) * es, 1.0) / bal),
        "arch": np.full(len(M), float(arch)),
    }
    names = [n for g in groups for n in FEATURE_GROUPS[g]]
    return np.stack([np.asarray(f[n], dtype=float) * np.ones(len(M)) for n in names], axis=1), names


def diversify(scores: np.ndarray, bm: np.ndarray, bn: np.ndarray, delta: float) -> np.ndarray:
    """Push back, by ``delta``, every configuration whose tile (BLOCK_M, BLOCK_N) has a better-scored one:
    the first few picks then try different tiles before variants of one. ``scores``: (..., C) for the C
    configurations whose blocks are ``bm``, ``bn``; inf stays inf."""
    if delta <= 0:
        return scores
    out = scores.copy()
    tile = bm * 1024 + bn
    for t in np.unique(tile):
        cols = tile == t
        sub = scores[..., cols]
        best = np.min(sub, axis=-1, keepdims=True)
        out[..., cols] = np.where(np.isfinite(sub) & (sub > best), sub + delta, sub)
    return out


# ------------------------------------------------------------------------------------------- the trees

@dataclasses.dataclass
class Forest:
    """Regression trees as padded arrays (tree, node): a node with ``feat`` -1 is a leaf; otherwise rows with
    ``x[feat] > thr`` go to ``right``, the others to ``left``. Prediction = base + sum of the leaves."""

    feat: np.ndarray
    thr: np.ndarray
    left: np.ndarray
    right: np.ndarray
    val: np.ndarray
    base: float
    depth: int
    _flat: Any = dataclasses.field(default=None, repr=False, compare=False)

    def predict(self, X: np.ndarray) -> np.ndarray:
        n, T = len(X), len(self.feat)
        if n == 0:
            return np.zeros(0)
        if self._flat is None:  # node arrays flattened over trees; a leaf's children are itself
            W = self.feat.shape[1]
            me = np.arange(T * W).reshape(T, W)
            off = (np.arange(T) * W)[:, None]
            leaf = self.feat < 0
            self._flat = (np.maximum(self.feat, 0).ravel(), self.thr.ravel(),
                          np.where(leaf, me, self.left + off).ravel(), np.where(leaf, me, self.right + off).ravel(),
                          self.val.ravel(), off)
        feat, thr, left, right, val, off = self._flat
        Xt = np.ascontiguousarray(X.T).ravel()
        cols = np.arange(n)[None, :]
        node = np.repeat(off, n, axis=1)
        for _ in range(self.depth):
            node = np.where(Xt[feat[node] * n + cols] > thr[node], right[node], left[node])
        return self.base + val[node].sum(axis=0)

    def to_dict(self) -> dict:
        return {"base": self.base, "depth": self.depth, "feat": self.feat.tolist(),
                "thr": [[float(f"{v:.7g}") for v in r] for r in self.thr.tolist()],
                "left": self.left.tolist(), "right": self.right.tolist(),
                "val": [[float(f"{v:.6g}") for v in r] for r in self.val.tolist()]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Forest":
        arrs = [np.asarray(d[k], dtype=np.int64 if k in ("feat", "left", "right") else float)
                for k in ("feat", "thr", "left", "right", "val")]
        if any(a.ndim != 2 or a.shape != arrs[0].shape for a in arrs):
            raise ValueError("forest arrays have different shapes")
        nodes = arrs[0].shape[1]
        for a in (arrs[2], arrs[3]):
            if a.size and (a.min() < 0 or a.max() >= nodes):
                raise ValueError("forest child index out of range")
        return cls(*arrs, base=float(d["base"]), depth=int(d["depth"]))

    @classmethod
    def from_sklearn(cls, est: Any) -> "Forest":
        """From a fitted ``HistGradientBoostingRegressor``: its per-iteration tree predictors (``_predictors``,
        node records with ``feature_idx``, ``num_threshold``, ``left``, ``right``, ``is_leaf``, ``value``)
        and ``_baseline_prediction``; private but stable since scikit-learn 0.21, and checked against
        ``est.predict`` in tests/test_gemm_prior.py."""
        trees = [pred.nodes for it in est._predictors for pred in it]
        width = max(len(nd) for nd in trees)
        T = len(trees)
        feat = np.full((T, width), -1, dtype=np.int64)
        thr, val = np.zeros((T, width)), np.zeros((T, width))
        left, right = np.zeros((T, width), dtype=np.int64), np.zeros((T, width), dtype=np.int64)
        depth = 0
        for i, nd in enumerate(trees):
            k = len(nd)
            leaf = nd["is_leaf"].astype(bool)
            feat[i, :k] = np.where(leaf, -1, nd["feature_idx"])
            thr[i, :k] = nd["num_threshold"]
            left[i, :k], right[i, :k] = np.where(leaf, 0, nd["left"]), np.where(leaf, 0, nd["right"])
            val[i, :k] = np.where(leaf, nd["value"], 0.0)
            depth = max(depth, int(nd["depth"].max()))
        return cls(feat, thr, left, right, val, float(np.ravel(est._baseline_prediction)[0]), depth)

    @classmethod
    def from_own(cls, trees: Any) -> "Forest":
        """From ``perfmodel._Trees`` (complete trees: children 2i+1, 2i+2; unsplit nodes are leaves)."""
        T, width = trees.feat.shape
        idx = np.arange(width)
        left = np.minimum(2 * idx + 1, width - 1)[None, :].repeat(T, 0)
        right = np.minimum(2 * idx + 2, width - 1)[None, :].repeat(T, 0)
        val = np.where(trees.feat < 0, trees.val, 0.0)
        return cls(trees.feat.copy(), trees.thr.copy(), left, right, val, float(trees.base), int(trees.depth))


def _fit_forest(X: np.ndarray, y: np.ndarray, *, learner: Any, max_iter: int, leaves: int, lr: float,
                seed: int) -> Forest:
    if learner == "sklearn":
        try:
            from sklearn.ensemble import HistGradientBoostingRegressor
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("fitting the GEMM prior with learner='sklearn' needs scikit-learn "
                              "(pip install 'torchtune-ops[train]'), or use learner='own'") from e
        est = HistGradientBoostingRegressor(max_iter=max_iter, max_leaf_nodes=leaves, learning_rate=lr,
                                            min_samples_leaf=20, l2_regularization=1.0, early_stopping=False,
                                            random_state=seed)
        est.fit(X, y)
        return Forest.from_sklearn(est)
    if callable(learner):
        return learner(X, y, max_iter=max_iter, leaves=leaves, lr=lr, seed=seed)
    raise ValueError(f"learner must be 'sklearn' or a function, got {learner!r}")


# -------------------------------------------------------------------------------------------- the prior

@dataclasses.dataclass
class GemmPrior:
    """A fitted prior: the ranking forest, the cuBLAS-margin forest, the feature groups, and where it came
    from (``meta``: source, version, training files, date, the GPUs with their limits)."""

    rank: Forest
    vs_aten: Forest | None
    groups: tuple[str, ...]
    meta: dict[str, Any]
    quality: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def gpus(self) -> list[dict[str, Any]]:
        return list(self.meta.get("gpus", []))

    def nearest_gpu(self, *, sms: int, capability: tuple[int, int]) -> dict[str, Any] | None:
        """The training GPU nearest to a device: same capability major first, then the closest SM count."""
        if not self.gpus:
            return None
        return min(self.gpus, key=lambda g: (abs(g["capability"][0] - capability[0]),
                                             abs(g["capability"][1] - capability[1]), abs(g["sms"] - sms)))

    def for_device(self, *, sms: int, smem: int, capability: tuple[int, int], name: str = "") -> "DeviceModel":
        """The prior on a device with these limits (see ``DeviceModel``)."""
        near = self.nearest_gpu(sms=sms, capability=capability)
        covered = near is not None and near["sms"] == sms and tuple(near["capability"]) == tuple(capability)
        label = name or f"cc{capability[0]}.{capability[1]} with {sms} SMs"
        if covered:
            note = f"GEMM prior {self.meta.get('version')}: trained on {near['name']} timings (this GPU)"
        elif near is not None:
            note = (f"GEMM prior {self.meta.get('version')}: {label} is not in its data; using this device's "
                    f"limits ({sms} SMs, {smem // 1024} KiB shared memory) and the nearest GPU's data "
                    f"({near['name']})")
        else:
            note = f"GEMM prior {self.meta.get('version')}"
        arch = float(near["capability"][0]) if near is not None else float(capability[0])
        return DeviceModel(self, sms=max(1, int(sms)), smem=max(1, int(smem)), arch=arch, note=note,
                           covered=bool(covered), balance=machine_balance(capability))

    def score_rows(self, p: Mapping[str, np.ndarray], c: Mapping[str, np.ndarray], *, sms: float, smem: float,
                   arch: float, balance: float) -> np.ndarray:
        X, _ = features(p, c, sms=sms, smem=smem, arch=arch, groups=self.groups, balance=balance)
        return self.rank.predict(X)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "kind": "gemm-prior", "meta": self.meta, "groups": list(self.groups),
                "quality": self.quality, "rank": self.rank.to_dict(),
                "vs_aten": self.vs_aten.to_dict() if self.vs_aten is not None else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GemmPrior":
        if d.get("schema") != SCHEMA or d.get("kind") != "gemm-prior":
            raise ValueError("not a GEMM prior of this schema")
        groups = tuple(d["groups"])
        if any(g not in FEATURE_GROUPS for g in groups):
            raise ValueError(f"unknown feature groups {groups}")
        rank = Forest.from_dict(d["rank"])
        n_feat = sum(len(FEATURE_GROUPS[g]) for g in groups)
        if rank.feat.max() >= n_feat:
            raise ValueError("a tree uses a feature the prior does not have")
        va = Forest.from_dict(d["vs_aten"]) if d.get("vs_aten") else None
        return cls(rank=rank, vs_aten=va, groups=groups, meta=dict(d.get("meta", {})),
                   quality=dict(d.get("quality", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), separators=(",", ":")), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "GemmPrior":
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed GEMM prior {path}: {e!r}") from e


@dataclasses.dataclass
class DeviceModel:
    """The prior on one device: the interface of ``perfmodel.PerfModel`` that ``search_hints`` and
    ``zero_shot`` use (``predict``, ``predict_vs_aten``, ``quality``, ``confident``), plus ``note``, which says
    which GPU's data it rests on."""

    prior: GemmPrior
    sms: int
    smem: int
    arch: float
    note: str
    covered: bool
    balance: float = 150.0
    family: str = "gemm"

    @property
    def quality(self) -> dict[str, float]:
        return self.prior.quality

    def _X(self, problem: Mapping[str, Any], configs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        pa = {k: np.repeat(v, len(configs)) for k, v in problem_arrays([problem]).items()}
        X, _ = features(pa, config_arrays(configs), sms=self.sms, smem=self.smem, arch=self.arch,
                        groups=self.prior.groups, balance=self.balance)
        return X

    def predict(self, problem: Mapping[str, Any], configs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Per configuration, its predicted place among the problem's (0 fastest .. 1 slowest; lower is faster)
        plus ``UNSEEN_PENALTY`` for split-K, TMA or GROUP_M other than 8; with the prior's ``diversity``
        (``meta``), variants of a better-scored tile are pushed back by it."""
        if not configs:
            return np.zeros(0)
        ca = config_arrays(configs)
        score = diversify(self.prior.rank.predict(self._X(problem, configs)), ca["bm"], ca["bn"],
                          float(self.prior.meta.get("diversity", 0.0)))
        # what Inductor's template never ran (split-K, tensor descriptors, GROUP_M other than 8) ties with its
        # plain twin in the features: measure the twin the data speaks for first
        unseen = np.asarray([int(c.get("SPLIT_K", 1)) != 1 or int(c.get("TMA", 0)) != 0
                             or int(c.get("GROUP_M", 8)) != 8 for c in configs])
        return score + UNSEEN_PENALTY * unseen

    def predict_vs_aten(self, problem: Mapping[str, Any], configs: Sequence[Mapping[str, Any]]) -> np.ndarray | None:
        if self.prior.vs_aten is None or not configs:
            return None
        return self.prior.vs_aten.predict(self._X(problem, configs))

    def confident(self) -> bool:
        """The rule of ``perfmodel.PerfModel.confident`` (MIN_CV_FRACTION 0.9, MIN_CV_SPEARMAN 0.5) on the
        prior's held-out quality across GPUs."""
        q = self.quality
        return q.get("fraction", 0.0) >= 0.9 and q.get("spearman", -1.0) >= 0.5


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> GemmPrior | None:
    try:
        return GemmPrior.load(path)
    except (OSError, ValueError):
        return None


def shipped(path: str | Path | None = None) -> GemmPrior | None:
    """The prior shipped in the package (``SHIPPED_PATH``), read once; None when missing or unreadable."""
    return _load_cached(str(path or SHIPPED_PATH))


# ---------------------------------------------------------------------------------------------- fitting

def design(datas: Sequence[Any], *, groups: Sequence[str] = DEFAULT_GROUPS, shapes: Sequence[Any] | None = None,
           arch_of: Mapping[str, float] | None = None, clip: float = CLIP, target: str = "log") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X, y_rank, y_vs_aten, shape id) over every recorded Triton timing of ``datas`` (``InductorData``),
    restricted to ``shapes[i]`` (indices) of each when given. ``arch_of`` maps a GPU name to the
    architecture code used for it (default: its capability major). The ranking target is clipped at
    ``clip`` (log; default log 4); ``target="rank"`` learns each configuration's place among its problem's
    instead (0 best, 1 worst)."""
    Xs, ys, yas, gid = [], [], [], []
    offset = 0
    for i, d in enumerate(datas):
        idx = np.arange(len(d.problems)) if shapes is None or shapes[i] is None else np.asarray(shapes[i])
        gpu, sms, smem, cap = d.limits()
        arch = (arch_of or {}).get(gpu, float(cap[0]))
        T = d.times[idx]
        s_idx, c_idx = np.nonzero(~np.isnan(T))
        pa = problem_arrays([d.problems[j] for j in idx])
        ca = config_arrays(d.configs)
        X, _ = features({k: v[s_idx] for k, v in pa.items()}, {k: v[c_idx] for k, v in ca.items()}, sms=sms,
                        smem=smem, arch=arch, groups=groups, balance=machine_balance(cap))
        t = T[s_idx, c_idx]
        best = np.nanmin(T, axis=1)[s_idx]
        y = np.minimum(np.log(t / best), clip)
        if target == "rank":  # the configuration's place among its problem's, 0 (best) .. 1 (worst)
            order = np.lexsort((t, s_idx))
            first = np.searchsorted(s_idx[order], s_idx[order], side="left")
            pos = np.empty(len(t))
            pos[order] = np.arange(len(t)) - first
            count = np.bincount(s_idx, minlength=len(idx))[s_idx]
            y = pos / np.maximum(count - 1, 1)
        ys.append(y)
        yas.append(np.clip(np.log(t / d.aten[idx][s_idx]), -CLIP, CLIP))
        Xs.append(X)
        gid.append(s_idx + offset)
        offset += len(idx)
    return np.concatenate(Xs), np.concatenate(ys), np.concatenate(yas), np.concatenate(gid)


def fit(datas: Sequence[Any], *, groups: Sequence[str] = DEFAULT_GROUPS, shapes: Sequence[Any] | None = None,
        learner: Any = "sklearn", max_iter: int = 200, leaves: int = 31, lr: float = 0.1, seed: int = 0,
        vs_aten: bool = True, clip: float = CLIP, target: str = "log", meta: Mapping[str, Any] | None = None) -> GemmPrior:
    """Fit a prior on ``datas`` (``inductor_data.InductorData``; ``shapes``: per data, the shape indices to
    use, None for all).

    Args:
        groups: the feature groups (``FEATURE_GROUPS``). Default ``DEFAULT_GROUPS``.
        learner: "sklearn" (HistGradientBoostingRegressor; default) or a function
            ``(X, y, *, max_iter, leaves, lr, seed) -> Forest`` (benchmarks/perfmodel_eval.py passes
            perfmodel's numpy trees this way, through ``Forest.from_own``).
        max_iter, leaves, lr: boosting rounds (default 200), leaves per tree (31), learning rate (0.1).
        seed: the learner's seed. Default 0.
        vs_aten: also fit the cuBLAS-margin forest (default True).
        clip: the ranking target log(time / best) is clipped here (default log 4).
        target: "log" (default: that clipped log ratio) or "rank" (the place among the problem's configurations).
        meta: recorded with the prior (source, version, ...); the training GPUs and date are added.
    """
    X, y, ya, _ = design(datas, groups=groups, shapes=shapes, clip=clip, target=target)
    kw = dict(learner=learner, max_iter=max_iter, leaves=leaves, lr=lr, seed=seed)
    rank = _fit_forest(X, y, **kw)
    va = _fit_forest(X, ya, **dict(kw, max_iter=max(20, max_iter // 2))) if vs_aten else None
    gpus: dict[str, dict] = {}
    for d in datas:
        gpu, sms, smem, cap = d.limits()
        gpus.setdefault(gpu, {"name": gpu, "sms": sms, "smem": smem, "capability": list(cap), "files": []})
        gpus[gpu]["files"].append(d.name)
    m = {"date": datetime.date.today().isoformat(), "gpus": list(gpus.values()),
         "learner": learner if isinstance(learner, str) else getattr(learner, "__name__", "custom"),
         "params": {"max_iter": max_iter, "leaves": leaves, "lr": lr, "seed": seed, "clip": clip, "target": target}}
    m.update(meta or {})
    return GemmPrior(rank=rank, vs_aten=va, groups=tuple(groups), meta=m)
