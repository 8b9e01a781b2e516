"""Real GPU timings of Inductor's Triton mm template and cuBLAS (PyTorch AutoHeuristic's data) as trial history.

    from torchtune_ops.tuning.inductor_data import read
    data = read("h100_hf_train_mm.txt.gz")          # gzipped or not
    rows = data.rows()                              # [(problem, config, ms, aten_ms)]: PerfModel.fit's input
    cands, times = data.replay(0)                   # shape 0's recorded configurations and their times

Format (../shared/datasets/inductor_mm/README.md): line 1 is JSON metadata (``shared_memory``,
``device_capa``), then a CSV with a header, one timing per row: ``m,k,n``, dtypes, strides, contiguity,
``using_tf32``, ``choice`` (``extern_mm`` for PyTorch's kernel, or ``type=triton_BLOCK-M=.._BLOCK-K=.._
BLOCK-N=.._numstages=.._numwarps=..``) and ``feedback`` in milliseconds. Repeated timings of a (shape,
choice) pair are reduced to their median.

A Triton choice maps onto our GEMM family's parameters with GROUP_M 8, SPLIT_K 1 and TMA 0 (the template
has no split-K and no tensor descriptors). The problem is ``gemm_space.GemmProblem`` as a dict: op "mm",
batch 1, operand layouts from the strides, precision "tf32" when ``using_tf32`` is True.
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["InductorData", "read", "parse_choice", "choice_name", "layout", "KNOWN_GPUS"]

_CHOICE = re.compile(r"type=triton_BLOCK-M=(\d+)_BLOCK-K=(\d+)_BLOCK-N=(\d+)_numstages=(\d+)_numwarps=(\d+)$")
ATEN = "extern_mm"

#: the GPUs of the public data, recognised by (compute capability, shared memory per block): name, SMs
KNOWN_GPUS = {((8, 0), 166912): ("A100", 108), ((9, 0), 232448): ("H100", 132)}


def parse_choice(choice: str) -> dict[str, int] | None:
    """Our GEMM configuration for an Inductor Triton choice; None for ``extern_mm``.

    Raises:
        ValueError: a choice that is neither ``extern_mm`` nor the mm template's.
    """
    if choice == ATEN:
        return None
    m = _CHOICE.match(choice)
    if m is None:
        raise ValueError(f"unknown Inductor mm choice {choice!r}")
    bm, bk, bn, stages, warps = (int(x) for x in m.groups())
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps, "num_stages": stages,
            "SPLIT_K": 1, "TMA": 0}


def choice_name(config: dict[str, Any]) -> str:
    """The Inductor choice string of one of our GEMM configurations (GROUP_M 8, SPLIT_K 1, TMA 0 only)."""
    return (f"type=triton_BLOCK-M={config['BLOCK_M']}_BLOCK-K={config['BLOCK_K']}_BLOCK-N={config['BLOCK_N']}"
            f"_numstages={config['num_stages']}_numwarps={config['num_warps']}")


def layout(stride0: int, stride1: int) -> str:
    """"row" when the last dimension is contiguous, "col" when the first is, else "strided"."""
    if stride1 == 1:
        return "row"
    if stride0 == 1:
        return "col"
    return "strided"


@dataclasses.dataclass
class InductorData:
    """One file's timings as a matrix: ``times[s, c]`` is shape s's median time of ``configs[c]`` in ms
    (NaN when not recorded), ``aten[s]`` its median ``extern_mm`` time (NaN when not recorded)."""

    name: str
    meta: dict[str, Any]
    problems: list[dict[str, Any]]   # GemmProblem dicts
    raw: list[dict[str, Any]]        # per shape, the file's fields (m, k, n, strides, dtype, using_tf32)
    configs: list[dict[str, int]]
    times: np.ndarray
    aten: np.ndarray

    @property
    def gpu(self) -> str:
        """"A100"/"H100" for the GPUs of the public data, else "cc<major>.<minor>"."""
        return self.limits()[0]

    def limits(self) -> tuple[str, int, int, tuple[int, int]]:
        """(GPU name, SMs, shared memory per block, capability) of the device that measured the file; SMs
        are looked up in ``KNOWN_GPUS`` (the file does not record them; 108 for an unknown GPU)."""
        cap = tuple(int(x) for x in self.meta.get("device_capa", (0, 0)))[:2]
        smem = int(self.meta.get("shared_memory", 0))
        name, sms = KNOWN_GPUS.get((cap, smem), (f"cc{cap[0]}.{cap[1]}", 108))
        return name, sms, smem, cap  # type: ignore[return-value]

    @property
    def optimum(self) -> np.ndarray:
        """Per shape, the best recorded time (Triton or cuBLAS)."""
        return np.fmin(np.nanmin(np.where(np.isnan(self.times), np.inf, self.times), axis=1),
                       np.where(np.isnan(self.aten), np.inf, self.aten))

    def rows(self, shapes: Any = None) -> list[tuple[dict, dict, float, float]]:
        """(problem, config, ms, aten_ms) per recorded Triton timing of ``shapes`` (indices; None: all)."""
        idx = range(len(self.problems)) if shapes is None else shapes
        out = []
        for s in idx:
            for c in np.flatnonzero(~np.isnan(self.times[s])):
                out.append((self.problems[s], self.configs[c], float(self.times[s, c]), float(self.aten[s])))
        return out

    def replay(self, s: int) -> tuple[list[dict], dict[str, float]]:
        """Shape ``s`` as a replay space: its recorded Triton configurations and their times, keyed by
        ``json.dumps(config, sort_keys=True)`` (what a fake timer looks up)."""
        cols = np.flatnonzero(~np.isnan(self.times[s]))
        cands = [dict(self.configs[c]) for c in cols]
        return cands, {json.dumps(cfg, sort_keys=True): float(self.times[s, c]) for cfg, c in zip(cands, cols)}

    def subset(self, shapes: Any) -> "InductorData":
        """The same data restricted to ``shapes`` (indices or a boolean mask)."""
        idx = np.arange(len(self.problems))[shapes]
        return dataclasses.replace(self, problems=[self.problems[i] for i in idx], raw=[self.raw[i] for i in idx],
                                   times=self.times[idx], aten=self.aten[idx])


def _open(path: str | os.PathLike) -> io.TextIOBase:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", newline="") if gz else open(path, newline="")  # type: ignore[return-value]


def read(path: str | os.PathLike, *, name: str | None = None) -> InductorData:
    """Read one AutoHeuristic mm file (gzipped or not, recognised by its content).

    Args:
        path: the file.
        name: how reports name it. Default: the file name without ``.txt``/``.gz``.

    Raises:
        ValueError: a file not in this format (no JSON first line, missing columns, an unknown choice).
    """
    with _open(path) as f:
        first = f.readline()
        try:
            meta = json.loads(first)
        except ValueError:
            raise ValueError(f"{path}: line 1 is not the JSON metadata of an AutoHeuristic file") from None
        reader = csv.reader(f)
        header = next(reader, None) or []
        col = {h: i for i, h in enumerate(header)}
        need = ("m", "k", "n", "mat1_dtype", "mat1_stride_0", "mat1_stride_1", "mat2_stride_0", "mat2_stride_1",
                "using_tf32", "choice", "feedback")
        missing = [h for h in need if h not in col]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        shape_cols = [col[h] for h in header if h not in ("choice", "feedback")]
        ci, fi = col["choice"], col["feedback"]
        shapes: dict[tuple, int] = {}
        choices: dict[str, int] = {}
        cells: dict[tuple[int, int], list[float]] = {}
        for row in reader:
            if len(row) < len(header):
                continue
            key = tuple(row[i] for i in shape_cols)
            s = shapes.setdefault(key, len(shapes))
            c = choices.setdefault(row[ci], len(choices))
            try:
                cells.setdefault((s, c), []).append(float(row[fi]))
            except ValueError:
                continue
    names = list(choices)
    triton = [n for n in names if n != ATEN]
    tcol = {n: j for j, n in enumerate(triton)}
    configs = [parse_choice(n) for n in triton]
    times = np.full((len(shapes), len(triton)), np.nan)
    aten = np.full(len(shapes), np.nan)
    for (s, c), v in cells.items():
        med = float(np.median(v))
        if names[c] == ATEN:
            aten[s] = med
        else:
            times[s, tcol[names[c]]] = med
    problems, raw = [], []
    fields = [h for h in header if h not in ("choice", "feedback")]
    for key in shapes:
        r = dict(zip(fields, key))
        m, k, n = int(r["m"]), int(r["k"]), int(r["n"])
        dtype = r["mat1_dtype"].replace("torch.", "")
        strides = [int(r[f"mat{i}_stride_{j}"]) for i in (1, 2) for j in (0, 1)]
        raw.append({"m": m, "k": k, "n": n, "dtype": dtype, "strides": strides, "using_tf32": r["using_tf32"]})
        problems.append({"op": "mm", "batch": 1, "M": m, "N": n, "K": k, "dtype": dtype,
                         "a_layout": layout(strides[0], strides[1]), "b_layout": layout(strides[2], strides[3]),
                         "bias": "none", "activation": "none",
                         "precision": "tf32" if r["using_tf32"] == "True" else "ieee"})
    if name is None:
        name = re.sub(r"(\.txt)?(\.gz)?$", "", Path(path).name)
    return InductorData(name=name, meta=meta, problems=problems, raw=raw, configs=configs,  # type: ignore[arg-type]
                        times=times, aten=aten)
