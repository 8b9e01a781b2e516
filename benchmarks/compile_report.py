"""What the compiler makes of our kernels on an H100 (or A100), without a GPU: the compile gate.

    python benchmarks/compile_report.py --arch sm_90a --json OUT.json          # the representative set
    python benchmarks/compile_report.py --arch sm_90a --subset ci --gate       # CI's problems; exit 1 on a finding
    python benchmarks/compile_report.py --arch sm_90a --subset ci --cover --gate   # what CI runs (see cover())
    python benchmarks/compile_report.py --arch sm_80 --only odd                # problems whose label has "odd"
    python benchmarks/compile_report.py --problem 'gemm:{"op":"mm","batch":1,"M":64,"N":64,"K":64,"dtype":"float16"}' \
        --config '{"BLOCK_M":64,"BLOCK_N":64,"BLOCK_K":32,"GROUP_M":8,"num_warps":4,"num_stages":3}'
    python benchmarks/compile_report.py --smoke                                # seconds (a test runs it)

Every known configuration of each family (``known_configs`` for the target's limits) is compiled for the
representative problems with the installed Triton and its ptxas (``torchtune_ops.kernels.inspect``),
specialised as a launch on that GPU would be, and one row per (problem, configuration) gives registers,
spill bytes, shared memory, the MMA instruction (wgmma / mma.sync / fma), the widest global load and
whether cp.async / TMA are used. ``--gate`` exits 1 when a known configuration spills or exceeds the
target's limits. Rows are printed as a table and written as JSON (``--json``). Compiles run in at most
``--workers`` (2) processes; the whole representative set takes a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: interpreted kernels cannot be compiled
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset (3.6's default)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from torchtune_ops.kernels import inspect as kinspect  # noqa: E402
from torchtune_ops.kernels.base import Config  # noqa: E402
from representative import CI_SUBSET, FAMILIES, REPRESENTATIVE, SMOKE  # noqa: E402


FIELDS = ("family", "problem", "config", "known", "index", "registers", "spill_bytes", "stack_bytes",
          "shared_bytes", "mma", "vector_loads", "cp_async", "tma", "tma_store", "host_desc",
          "findings")


def _compile_row(task: tuple) -> dict:
    label, fam_name, problem, cfg_json, known, index, arch = task
    family = FAMILIES[fam_name]
    limits = kinspect.TARGETS[arch][1]
    cfg = Config.from_json(cfg_json)
    row = dict(family=fam_name, problem=label, config=str(cfg), known=known, index=index, arch=arch)
    why = family.check(cfg.as_dict(), problem, limits)
    try:
        builds = kinspect.compile_config(family, problem, cfg, arch=arch)
    except Exception as e:  # noqa: BLE001 - a failing build is a finding, not the end of the report
        row.update(registers=None, spill_bytes=None, stack_bytes=None, shared_bytes=None, mma="", vector_loads=0,
                   cp_async=False, tma=False, tma_store=False, host_desc=False, findings=[f"compile failed: {type(e).__name__}: {str(e)[:200]}"])
        return row
    main = builds[0]
    findings = [f"{b.kernel}: {f}" if i else f for i, b in enumerate(builds) for f in b.problems(limits)]
    if why is not None:
        findings.append(f"check rejects: {why}")
    row.update(registers=main.registers, spill_bytes=max(b.spill_bytes for b in builds),
               stack_bytes=main.stack_bytes, shared_bytes=main.shared_bytes, mma=main.mma,
               vector_loads=main.vector_loads, cp_async=main.cp_async, tma=main.tma,
               tma_store=main.tma_store, host_desc=main.host_desc, findings=findings)
    return row


_TILE = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "SPLIT_K")


def cover(known: list) -> list:
    """The known configurations CI's gate compiles (``--cover``), in their order: the first ones, greedily,
    until every value of every parameter appears (each BLOCK_*, GROUP_M, num_warps, num_stages, SPLIT_K and
    TMA / WARP_SPEC / PERSISTENT / HOST_DESC / TMA_STORE / EPI_SUBTILE value); then, per variant (the
    descriptor axes, split-K or not), every configuration of its largest accumulator per warp (all its
    stage counts: where the registers are most) and its largest pipeline (where the shared memory is).
    Of the spills the gate found in its history (benchmarks/results/compile_report-sm_90a-before.json and
    -host-desc.json), this set holds at least one on each CI problem that had any."""
    dicts = [c.as_dict() for c in known]
    need = {kv for d in dicts for kv in d.items()}
    chosen = set()
    while need:
        i = max(range(len(dicts)), key=lambda i: (len(need & set(dicts[i].items())), -i))
        chosen.add(i)
        need -= set(dicts[i].items())
    variants: dict = {}
    for i, d in enumerate(dicts):
        key = tuple(sorted((k, v) for k, v in d.items() if k not in _TILE)) + (d.get("SPLIT_K", 1) > 1,)
        variants.setdefault(key, []).append(i)

    def acc(i):
        return dicts[i]["BLOCK_M"] * dicts[i]["BLOCK_N"] / dicts[i]["num_warps"]

    def pipeline(i):
        return (dicts[i]["BLOCK_M"] + dicts[i]["BLOCK_N"]) * dicts[i]["BLOCK_K"] * dicts[i]["num_stages"]

    for group in variants.values():
        top = max(acc(i) for i in group)
        chosen.update(i for i in group if acc(i) == top)
        chosen.add(max(group, key=lambda i: (pipeline(i), -i)))
    return [known[i] for i in sorted(chosen)]


def tasks_for(problems, arch: str, configs: list[Config] | None = None, max_known: int | None = None,
              covered: bool = False) -> list:
    limits = kinspect.TARGETS[arch][1]
    out = []
    for label, fam_name, problem in problems:
        known = FAMILIES[fam_name].known_configs(problem, limits)
        chosen = configs if configs is not None else (cover(known) if covered else known[:max_known])
        for cfg in chosen:
            index = known.index(cfg) if cfg in known else None
            out.append((label, fam_name, problem, cfg.to_json(), index is not None, index, arch))
    return out


def run(tasks: list, workers: int) -> list[dict]:
    if workers <= 1 or len(tasks) < 4:
        return [_compile_row(t) for t in tasks]
    # Interleave so that each process gets a mix of cheap and costly compiles.
    rows = []
    with cf.ProcessPoolExecutor(max_workers=workers) as pool:
        for row in pool.map(_compile_row, tasks, chunksize=1):
            rows.append(row)
            if len(rows) % 50 == 0:
                print(f"[compile_report] {len(rows)}/{len(tasks)} built", file=sys.stderr, flush=True)
    return rows


def environment() -> dict:
    import torch
    import triton

    return dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), host=platform.node(),
                python=platform.python_version(), torch=torch.__version__, triton=triton.__version__)


def table(rows: list[dict]) -> str:
    head = f"{'problem':32} {'config':44} {'known':>5} {'regs':>4} {'spill':>5} {'smem':>6} {'mma':>5} {'ld':>3}  findings"
    lines = [head, "-" * len(head)]
    for r in rows:
        c = Config.from_json(json.dumps(_cfg_dict(r["config"])))
        short = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{num_warps} s{num_stages}".format(**c.as_dict())
        extra = [k + "=" + str(v) for k, v in c.items if k not in (
            "BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "GROUP_M") and v not in (0, 1, False)]
        short = " ".join([short] + extra)
        known = "" if r["index"] is None else f"#{r['index']}"
        lines.append(f"{r['problem'][:32]:32} {short[:44]:44} {known:>5} {_s(r['registers']):>4} "
                     f"{_s(r['spill_bytes']):>5} {_s(r['shared_bytes']):>6} {r['mma']:>5} {r['vector_loads']:>3}  "
                     + "; ".join(r["findings"]))
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per problem: known configurations, how many spill / fail, most registers and spill bytes."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r["known"]:
            by.setdefault(r["problem"], []).append(r)
    head = f"{'problem':32} {'known':>5} {'spill':>5} {'fail':>4} {'max spill B':>11} {'2-warp':>6} {'mma':>12} {'ld bits':>7}"
    lines = [head, "-" * len(head)]
    for label, rs in by.items():
        spills = [r for r in rs if r["spill_bytes"]]
        fails = [r for r in rs if r["findings"]]
        mmas = sorted({r["mma"] for r in rs})
        lines.append(f"{label[:32]:32} {len(rs):>5} {len(spills):>5} {len(fails):>4} "
                     f"{max((r['spill_bytes'] or 0) for r in rs):>11} "
                     f"{sum(1 for r in rs if 'num_warps=2' in r['config']):>6} {'/'.join(mmas):>12} "
                     f"{max(r['vector_loads'] for r in rs):>7}")
    return "\n".join(lines)


def markdown(before: list[dict], after: list[dict]) -> str:
    """Per problem, known configurations before -> after: how many, how many spill, most spill bytes,
    how many with 2 warps, how many use mma.sync where a warpgroup's wgmma could serve (BLOCK_M >= 64),
    the widest load (bits) and how many fail the gate."""
    def stats(rows, label):
        rs = [r for r in rows if r["known"] and r["problem"] == label]
        if not rs:
            return None
        return (len(rs), sum(1 for r in rs if r["spill_bytes"]), max((r["spill_bytes"] or 0) for r in rs),
                sum(1 for r in rs if "num_warps=2" in r["config"]),
                sum(1 for r in rs if r["mma"] == "mma" and _cfg_dict(r["config"])["BLOCK_M"] >= 64),
                max(r["vector_loads"] for r in rs), sum(1 for r in rs if _fails(r)))
    labels = list(dict.fromkeys(r["problem"] for r in before + after))
    out = ["| problem | known | spilling | max spill B | 2-warp | mma.sync at BLOCK_M >= 64 | widest load (bits) "
           "| gate findings |", "|---|---|---|---|---|---|---|---|"]
    for label in labels:
        b, a = stats(before, label), stats(after, label)
        cells = [" -> ".join(str(x[i]) if x else "-" for x in (b, a)) for i in range(7)]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _fails(row: dict) -> bool:
    """Whether the gate fails on a row, by today's rule: any spill or other finding (reports written
    while the gate tolerated small spills have spilling rows without a finding)."""
    return bool(row["findings"]) or bool(row["spill_bytes"])


def _cfg_dict(text: str) -> dict:
    return {k: int(v) if v.lstrip("-").isdigit() else v for k, v in (p.split("=") for p in text.split())}


def _s(v) -> str:
    return "-" if v is None else str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90a", choices=sorted(kinspect.TARGETS))
    ap.add_argument("--json", type=Path, help="write the rows (with the environment) to this file")
    ap.add_argument("--subset", choices=("all", "ci"), default="all")
    ap.add_argument("--only", help="problems whose label contains this text")
    ap.add_argument("--problem", action="append", default=[],
                    help='FAMILY:JSON of a problem (GemmProblem / ConvProblem fields); repeatable')
    ap.add_argument("--config", action="append", default=[], help="a configuration as JSON; repeatable "
                    "(default: the family's known configurations)")
    ap.add_argument("--max-known", type=int, help="only the first N known configurations per problem")
    ap.add_argument("--cover", action="store_true", help="only the known configurations that cover every "
                    "parameter value and each variant's heaviest tiles (see cover(); CI's gate)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gate", action="store_true", help="exit 1 when a known configuration has a finding")
    ap.add_argument("--smoke", action="store_true", help="two tiny problems, two configurations each")
    ap.add_argument("--summary", action="store_true", help="print the per-problem summary only")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                    help="compile nothing: print the markdown table of two reports' JSON")
    args = ap.parse_args(argv)
    if args.compare:
        print(markdown(*(json.loads(p.read_text())["rows"] for p in args.compare)))
        return 0

    if args.smoke:
        problems, args.max_known = SMOKE, 2
    elif args.problem:
        problems = []
        for spec in args.problem:
            fam_name, _, text = spec.partition(":")
            problems.append((text, fam_name, FAMILIES[fam_name].problem_from_dict(json.loads(text))))
    else:
        problems = REPRESENTATIVE if args.subset == "all" else [p for p in REPRESENTATIVE if p[0] in CI_SUBSET]
    if args.only:
        problems = [p for p in problems if args.only in p[0]]
    configs = [Config.from_json(c) for c in args.config] or None
    tasks = tasks_for(problems, args.arch, configs, args.max_known, covered=args.cover)
    t0 = time.perf_counter()
    rows = run(tasks, args.workers)
    wall = time.perf_counter() - t0
    if not args.summary:
        print(table(rows))
        print()
    print(summary(rows))
    bad = [r for r in rows if r["known"] and r["findings"]]
    print(f"\n{len(rows)} builds for {args.arch} in {wall:.0f} s; {len(bad)} known configurations with findings")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        head = json.dumps(dict(environment(), arch=args.arch, wall_s=round(wall, 1)), sort_keys=True)[:-1]
        body = ",\n".join(json.dumps(r, sort_keys=True, separators=(",", ":")) for r in rows)
        args.json.write_text(head + ', "rows": [\n' + body + "\n]}\n")  # one row a line: small diffs
    return 1 if args.gate and bad else 0


if __name__ == "__main__":
    sys.exit(main())
