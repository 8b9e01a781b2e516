"""Issue 20's replay table from results files: per space and at 20 / 50 / 200 measurements, each method's mean
fraction of the optimum [worst decile of seeds], the best of Kernel Tuner's strategies, and whether the judged
column is at or above the best of every other (at 3 decimals).

    python benchmarks/replay_table.py --judge after \
        --col before=results/search_efficiency-A.json:tune --col after=results/search_efficiency-B.json:tune \
        --col "optuna TPE=tpe.jsonl:optuna_tpe" --col random=results/search_efficiency-C.json:random \
        --kt results/kernel_tuner_baseline-D.json --kt results/kernel_tuner_baseline-E.json

--save WHAT also writes results/replay_table-<date>.json (the summaries, the inputs, the machine).
A column is LABEL=FILE:METHOD: a search_efficiency.py results file (its summary) or its --log file (JSON lines,
summarised here: a run that was stopped). --kt: kernel_tuner_baseline.py results files (repeatable).
FILE+FILE2 (in --col and --kt) pools the seeds of runs on disjoint seeds: each space in both is summarised
over all of its seeds (the per-seed fractions of both), a space in one of them keeps its own.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from replay import summarize, worst_decile, write_results  # noqa: E402

CHECKPOINTS = (20, 50, 200)


def _int_keys(s: dict, seed_ids: list[int] | None = None) -> dict:
    """A summary with integer checkpoints; ``seed_ids``: which seeds it holds, when known."""
    out = {k: {int(c): v for c, v in s[k].items()} for k in ("fraction", "worst_decile")} | {"seeds": s["seeds"]}
    if "per_seed" in s:
        out["per_seed"] = {int(c): v for c, v in s["per_seed"].items()}
    if seed_ids is not None:
        out["seed_ids"] = list(seed_ids)
    return out


def _file_seeds(data: dict, s: dict) -> list[int] | None:
    """The seeds of summary ``s`` in a results file that says its first seed (all its runs finished)."""
    return list(range(data["first_seed"], data["first_seed"] + s["seeds"])) if "first_seed" in data else None


def pool(a: dict, b: dict) -> dict:
    """One summary (``_int_keys`` form) over the seeds of two: the mean and the worst decile recomputed from the
    per-seed fractions of both, at the checkpoints both have."""
    if "per_seed" not in a or "per_seed" not in b:
        raise ValueError("pooling seeds needs the per-seed fractions in both results files")
    twice = sorted(set(a.get("seed_ids", ())) & set(b.get("seed_ids", ())))
    if twice:
        raise ValueError(f"pooling the same seeds twice ({twice[0]}..{twice[-1]}): pool runs on different seeds")
    per_seed = {c: list(a["per_seed"][c]) + list(b["per_seed"][c]) for c in a["per_seed"] if c in b["per_seed"]}
    return {"fraction": {c: sum(v) / len(v) for c, v in per_seed.items()},
            "worst_decile": {c: worst_decile(v) for c, v in per_seed.items()},
            "seeds": a["seeds"] + b["seeds"], "per_seed": per_seed,
            "seed_ids": list(a.get("seed_ids", ())) + list(b.get("seed_ids", ()))}


def _pooled(parts: list[dict]) -> dict:
    """space -> summary over several loaded columns (or space -> key -> summary for Kernel Tuner files)."""
    out: dict = {}
    for part in parts:
        for name, s in part.items():
            if name not in out:
                out[name] = s
            elif "fraction" in s:
                out[name] = pool(out[name], s)
            else:
                out[name] = dict(out[name]) | {k: pool(out[name][k], r) if k in out[name] else r
                                               for k, r in s.items()}
    return out


def load_column(path: str, method: str, budget: int = 200) -> dict:
    """space -> {"fraction", "worst_decile", "seeds"} of ``method`` in a results file or a --log file (whose
    runs had ``budget`` measurements: a log does not say); ``A+B`` pools the seeds of two files."""
    if "+" in path:
        return _pooled([load_column(part, method, budget) for part in path.split("+")])
    if path.endswith(".jsonl"):
        runs: dict = {}
        with open(path) as f:
            for line in f:
                if line.strip():
                    name, m, seed, out = json.loads(line)
                    if m == method:
                        out["fraction"] = {int(c): v for c, v in out["fraction"].items()}
                        runs.setdefault(name, {})[seed] = out  # a seed run twice counts once
        return {name: _int_keys(summarize(list(by.values()), budget, CHECKPOINTS), sorted(by))
                for name, by in runs.items()}
    with open(path) as f:
        data = json.load(f)
    return {name: _int_keys(by[method], _file_seeds(data, by[method]))
            for name, by in data["summary"].items() if method in by}


def load_kt(paths: list[str]) -> dict:
    """space -> strategy -> summary over every Kernel Tuner results file (a later file's space replaces; the
    parts of ``A+B`` pool their seeds)."""
    out: dict = {}
    for path in paths:
        parts = []
        for part in path.split("+"):
            with open(part) as f:
                data = json.load(f)
            parts.append({name: {s: _int_keys(r, _file_seeds(data, r)) for s, r in by.items()}
                          for name, by in data["summary"].items()})
        out.update(_pooled(parts))
    return out


def table(cols: dict[str, dict], kt: dict, judge: str, seeds: int = 50, own: tuple[str, ...] = ()) -> str:
    """The markdown table; a cell on fewer than ``seeds`` seeds says how many. Columns in ``own`` (earlier
    versions of the judged search) are shown but are not rivals."""
    names = sorted({n for c in cols.values() for n in c})
    head = list(cols) + ["best Kernel Tuner mean", "best Kernel Tuner worst decile",
                         f"{judge} vs best of the others"]
    lines = ["| space | at | " + " | ".join(head) + " |", "| --- " * (len(head) + 2) + "|"]
    for name in names:
        present = [c for c in CHECKPOINTS if any(c in col[name]["fraction"] for col in cols.values() if name in col)
                   or any(c in r["fraction"] for r in kt.get(name, {}).values())]
        for i, c in enumerate(present):
            cells = []
            for col in cols.values():
                s = col.get(name)
                cell = (f"{s['fraction'][c]:.3f} [{s['worst_decile'][c]:.3f}]" if s and c in s["fraction"]
                        else "-")
                if s and i == 0 and s["seeds"] != seeds:  # a column stopped early: say on how many seeds
                    cell += f" ({s['seeds']} seeds)"
                cells.append(cell)
            strategies = {k: r for k, r in kt.get(name, {}).items() if c in r["fraction"]}
            verdict = []
            if strategies:
                bm = max(strategies, key=lambda k: strategies[k]["fraction"][c])
                bw = max(strategies, key=lambda k: strategies[k]["worst_decile"][c])
                cells.append(f"{strategies[bm]['fraction'][c]:.3f} ({bm}, {strategies[bm]['seeds']})")
                cells.append(f"{strategies[bw]['worst_decile'][c]:.3f} ({bw})")
            else:
                cells += ["not run", "not run"]
            mine = cols[judge].get(name)
            mine = mine if mine and c in mine["fraction"] else None
            rivals = [s for label, col in cols.items() if label != judge and label not in own
                      for s in [col.get(name)] if s and c in s["fraction"]]
            rivals += list(strategies.values())
            if mine and rivals:
                for key, word in (("fraction", "mean"), ("worst_decile", "worst")):
                    a = round(mine[key][c], 3)
                    b = max(round(r[key][c], 3) for r in rivals)
                    verdict.append(f"{word} {'ahead' if a > b else 'level' if a == b else 'MISS'}")
            cells.append(", ".join(verdict) or "-")
            lines.append(f"| {name if i == 0 else ''} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--col", action="append", default=[], help="LABEL=FILE:METHOD (repeatable, in order)")
    p.add_argument("--kt", action="append", default=[], help="a kernel_tuner_baseline.py results file")
    p.add_argument("--budget", type=int, default=200, help="the measurements of the runs in a --log file")
    p.add_argument("--seeds", type=int, default=50, help="a column on fewer seeds says how many")
    p.add_argument("--own", action="append", default=[], help="a column shown but not counted as a rival "
                   "(an earlier version of the judged search; repeatable)")
    p.add_argument("--save", default="", help="also write the table and every column's summary to "
                   "OUT/replay_table-<date>.json (machine, versions, the inputs): keeps a stopped run's log")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--judge", required=True, help="the column checked against every other and Kernel Tuner")
    a = p.parse_args(argv)
    cols = {}
    try:
        for spec in a.col:
            label, rest = spec.split("=", 1)
            path, method = rest.rsplit(":", 1)
            cols[label] = load_column(path, method, a.budget)
        kt = load_kt(a.kt)
    except ValueError as e:
        p.error(str(e))
    if a.judge not in cols:
        p.error(f"--judge {a.judge!r} is not a column")
    text = table(cols, kt, a.judge, a.seeds, tuple(a.own))
    print(text)
    if a.save:
        import datetime
        import platform

        import numpy

        write_results({"benchmark": "replay_table", "what": a.save,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       "machine": platform.node(), "platform": platform.platform(),
                       "python": platform.python_version(), "versions": {"numpy": numpy.__version__},
                       "inputs": {"col": a.col, "kt": a.kt, "judge": a.judge, "own": a.own, "budget": a.budget},
                       "columns": cols, "kernel_tuner": kt, "table": text}, a.out, "replay_table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
