"""The ``torchtune-ops`` command (also ``python -m torchtune_ops``): tune offline, manage the cache and
bundles, report, and check an installation.

    torchtune-ops tune --shapes shapes.jsonl          # problems recorded with TORCHTUNE_OPS_RECORD
    torchtune-ops tune --model mypkg.models:build      # build() returns (model, example inputs)
    torchtune-ops cache list | show ID | export PATH | import PATH [--force] | merge PATH... -o OUT
    torchtune-ops cache clear --yes | stats
    torchtune-ops report [--plot speedups.png]
    torchtune-ops doctor

Exit status: 0 on success, 2 for a usage error, 1 for any other error, reported as one line on stderr
(no traceback for expected errors: bad bundles, unreadable files, read-only mode, ...).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Sequence, TextIO

from . import settings
from .errors import TorchTuneOpsError

PROG = "torchtune-ops"


class CliError(TorchTuneOpsError):
    """An expected failure of a command: reported as one line, exit status 1."""


# ---------------------------------------------------------------------------------------------- helpers
def entry_id(entry: Any) -> str:
    """A short stable id of a cache entry (what ``cache list`` prints and ``cache show`` accepts)."""
    text = f"{entry.fingerprint}\0{entry.family}\0{entry.problem}"
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def describe_problem(family: str, problem: dict[str, Any]) -> str:
    """A short human description of a problem dict, e.g. ``mm 127x257x67 float16 row/col bias=row relu``."""
    p = problem
    try:
        if family == "gemm":
            batch = f"{p['batch']}x" if p.get("batch", 1) != 1 else ""
            words = [f"{p['op']} {batch}{p['M']}x{p['N']}x{p['K']}", p["dtype"]]
            layouts = (p.get("a_layout", "row"), p.get("b_layout", "row"))
            if layouts != ("row", "row"):
                words.append("/".join(layouts))
            if p.get("bias", "none") != "none":
                words.append(f"bias={p['bias']}")
            if p.get("activation", "none") != "none":
                words.append(p["activation"])
            if p.get("precision") == "tf32":
                words.append("tf32")
            return " ".join(words)
        if family == "conv2d":
            groups = max(p.get("groups", 1), 1)
            words = [f"conv {p['N']}x{p['C']}x{p['H']}x{p['W']} k{p['K']}x{p['C'] // groups}x{p['R']}x{p['S']}",
                     p.get("dtype", "")]
            if list(p.get("stride", [1, 1])) != [1, 1]:
                words.append(f"s{p['stride'][0]}")
            if any(p.get("padding", [0])):
                words.append(f"p{p['padding'][0]}")
            if groups != 1:
                words.append(f"g{groups}")
            if p.get("layout", "nchw") != "nchw":
                words.append(p["layout"])
            if p.get("bias"):
                words.append("+bias")
            if p.get("activation", "none") != "none":
                words.append(p["activation"])
            return " ".join(words)
    except (KeyError, TypeError, IndexError):
        pass
    return ",".join(f"{k}={v}" for k, v in p.items())


def _table(rows: list[list[str]], head: list[str], out: TextIO) -> None:
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    out.write(line.rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for r in rows:
        out.write("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


def _ms(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _speedup(e: Any) -> float:
    return e.aten_ms / e.time_ms if e.time_ms and e.time_ms > 0 and math.isfinite(e.aten_ms) else 1.0


def _open_store(*, write: bool):
    from .storage.store import Store

    s = settings.current()
    if write and s.readonly:
        raise CliError("read-only mode (TORCHTUNE_OPS_READONLY=1): this command would write to the cache")
    return Store.open(readonly=not write or None)


def _default_device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _local_fingerprint(device: str | None = None):
    from .storage.device import fingerprint

    return fingerprint(_default_device(device))


def _select(store: Any, args: argparse.Namespace) -> list:
    fp = None if getattr(args, "all_devices", False) else _local_fingerprint(getattr(args, "device", None)).key
    return store.entries(fp, family=getattr(args, "family", None))


# ------------------------------------------------------------------------------------------------ cache
def cmd_cache_list(args: argparse.Namespace, out: TextIO) -> int:
    store = _open_store(write=False)
    entries = _select(store, args)
    rows = []
    for e in entries:
        rows.append([entry_id(e), e.family, describe_problem(e.family, json.loads(e.problem)),
                     "aten" if e.winner == "aten" else "triton", _ms(e.time_ms), _ms(e.aten_ms),
                     f"{_speedup(e):.2f}x", str(e.trials)])
    scope = "all devices" if args.all_devices else _local_fingerprint(args.device).key
    out.write(f"{len(rows)} entries ({scope}) in {store.path}\n")
    if rows:
        _table(rows, ["id", "family", "problem", "winner", "ms", "aten ms", "speedup", "trials"], out)
    return 0


def _find(store: Any, key: str):
    matches = [e for e in store.entries() if entry_id(e).startswith(key) or e.problem == key]
    if not matches:
        raise CliError(f"no cache entry matches {key!r} (see 'torchtune-ops cache list --all-devices')")
    if len(matches) > 1:
        raise CliError(f"{len(matches)} entries match {key!r}; give more characters of the id")
    return matches[0]


def cmd_cache_show(args: argparse.Namespace, out: TextIO) -> int:
    store = _open_store(write=False)
    e = _find(store, args.key)
    d = e.to_dict()
    d["problem"] = json.loads(e.problem)
    d["winner"] = e.winner if e.winner == "aten" else json.loads(e.winner)
    d["id"] = entry_id(e)
    d["speedup"] = round(_speedup(e), 4)
    trials = store.trials(e.fingerprint, e.family, problem=e.problem)
    d["measurements"] = [{"run": t.run[:8], "config": t.config if t.config == "aten" else _maybe_json(t.config),
                          "ms": t.value_ms if math.isfinite(t.value_ms) else None} for t in trials]
    out.write(json.dumps(d, indent=1) + "\n")
    return 0


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_cache_export(args: argparse.Namespace, out: TextIO) -> int:
    from .storage import bundles

    if args.storage:  # a fleet's shared results instead of the local cache
        fp = None if args.all_devices else _local_fingerprint(args.device).key
        n = _fleet().export_bundle(storage=args.storage, path=args.path, fingerprint=fp, family=args.family)
        out.write(f"wrote {n} entries from {args.storage} to {args.path}\n")
        return 0
    store = _open_store(write=False)
    fp = None if args.all_devices else _local_fingerprint(args.device).key
    b = bundles.export_store(store, fingerprint=fp, family=args.family)
    bundles.write(b, args.path)
    try:  # what we write must load back (e.g. a GPU name with characters the format does not allow)
        bundles.validate(args.path)
    except bundles.BundleError:
        os.unlink(args.path)
        raise
    out.write(f"wrote {len(b)} entries for {len(b.devices)} device(s) to {args.path}\n")
    return 0


def cmd_cache_import(args: argparse.Namespace, out: TextIO) -> int:
    from .storage import bundles

    if settings.current().readonly:
        raise CliError("read-only mode (TORCHTUNE_OPS_READONLY=1): 'cache import' would write to the cache")
    b = bundles.load(args.path)
    b.entries()  # validate everything before opening the cache for writing
    store = _open_store(write=True)
    res = bundles.import_bundle(b, store, local=_local_fingerprint(args.device), allow_incompatible=args.force)
    out.write(f"imported {res.written} entries from {args.path} into {store.path}"
              f" ({res.kept} kept: the cache's own choice was as fast or faster"
              f"{f'; {res.rekeyed} re-keyed from a compatible device' if res.rekeyed else ''}"
              f"{f'; forced foreign devices: {len(res.forced_devices)}' if res.forced_devices else ''})\n")
    return 0


def cmd_cache_merge(args: argparse.Namespace, out: TextIO) -> int:
    from .storage import bundles

    merged = bundles.merge(bundles.load(p) for p in args.paths)
    bundles.write(merged, args.output)
    out.write(f"merged {len(args.paths)} bundles into {args.output}: {len(merged)} entries, "
              f"{len(merged.devices)} device(s)\n")
    return 0


def cmd_cache_clear(args: argparse.Namespace, out: TextIO) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError("'cache clear' deletes every tuned choice; pass --yes to confirm")
        answer = input("delete every tuned choice in the cache? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            out.write("nothing deleted\n")
            return 0
    store = _open_store(write=True)
    n = store.clear()
    out.write(f"deleted {n} entries from {store.path}\n")
    return 0


def cmd_cache_stats(args: argparse.Namespace, out: TextIO) -> int:
    store = _open_store(write=False)
    st = store.stats()
    by_family: dict[str, list[int]] = {}
    for e in store.entries():
        c = by_family.setdefault(e.family, [0, 0])
        c[0] += 1
        c[1] += e.winner != "aten"
    st["bytes"] = sum(os.path.getsize(f"{store.path}{sfx}") for sfx in ("", "-wal")
                      if os.path.exists(f"{store.path}{sfx}"))
    # (this command opened the cache read-only; say whether tuning processes could write it)
    probe = store.path
    while not probe.exists() and probe != probe.parent:  # the nearest thing that exists decides
        probe = probe.parent
    st["writable"] = not settings.current().readonly and os.access(probe, os.W_OK)
    for k in ("path", "writable", "schema", "entries", "fingerprints", "trials", "claims", "bytes"):
        out.write(f"{k:<13} {st.get(k)}\n")
    for fam, (n, won) in sorted(by_family.items()):
        out.write(f"{fam:<13} {n} entries, a Triton kernel won {won}\n")
    return 0


# ----------------------------------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace, out: TextIO) -> int:
    if args.plot:
        try:
            import matplotlib
        except ImportError:
            raise CliError("--plot needs matplotlib: pip install 'torchtune-ops[plot]'") from None
    store = _open_store(write=False)
    entries = sorted(_select(store, args), key=_speedup, reverse=True)
    rows = [[e.family, describe_problem(e.family, json.loads(e.problem)), _ms(e.aten_ms),
             _ms(e.time_ms), f"{_speedup(e):.2f}x", str(e.trials),
             "aten" if e.winner == "aten" else _config_text(e.winner)] for e in entries]
    out.write(f"{len(rows)} tuned problems in {store.path}\n")
    if rows:
        _table(rows, ["family", "problem", "aten ms", "tuned ms", "speedup", "trials", "winner"], out)
        sp = [_speedup(e) for e in entries if _speedup(e) > 0]
        geo = math.exp(sum(map(math.log, sp)) / len(sp))
        won = sum(e.winner != "aten" for e in entries)
        out.write(f"geometric mean speedup {geo:.3f}x; a Triton kernel won {won} of {len(entries)}\n")
    if args.plot:
        _plot(entries, args.plot)
        out.write(f"wrote {args.plot}\n")
    return 0


def _config_text(winner: str) -> str:
    try:
        return " ".join(f"{k}={v}" for k, v in json.loads(winner).items())
    except ValueError:
        return winner


def _plot(entries: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [describe_problem(e.family, json.loads(e.problem)) for e in entries]
    values = [_speedup(e) for e in entries]
    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.3 * len(entries) + 1)))
    ax.barh(range(len(values)), values, color=["tab:green" if v > 1 else "tab:gray" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over PyTorch's kernel (aten time / tuned time)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- tune
def _progress_printer(err: TextIO):
    """One progress line per trial: rewritten in place on a terminal, one line each otherwise."""
    tty = hasattr(err, "isatty") and err.isatty()

    def show(p: Any) -> None:
        err.write("\r" + p.line()[:160].ljust(100) if tty else p.line() + "\n")
        err.flush()
    return show


def _load_entry_point(spec: str):
    import importlib

    module, sep, func = spec.partition(":")
    if not sep or not module or not func:
        raise CliError(f"--model wants MODULE:FUNCTION, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise CliError(f"cannot load {spec!r}: {e}") from None
    got = fn()
    if not isinstance(got, tuple) or len(got) != 2:
        raise CliError(f"{spec} must return (model, inputs)")
    model, inputs = got
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    return model, tuple(inputs)


def _fleet():
    try:
        from .tuning import fleet
    except ImportError as e:  # the optional extra is missing: say how to get it
        raise CliError(str(e)) from None
    return fleet


def cmd_tune(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    s = settings.current()
    if s.readonly:
        raise CliError("read-only mode (TORCHTUNE_OPS_READONLY=1): tuning is off")
    if args.storage:  # one worker of a fleet sharing the database (docs/fleet.md)
        if args.model:
            raise CliError("--storage tunes a shape file (--shapes), not --model")
        return _fleet().cli_tune(storage=args.storage, shapes=args.shapes, job=args.job, device=args.device,
                                 max_trials=args.max_trials, time_budget_s=args.time_budget,
                                 lease_s=args.lease, out=out, err=err)
    import torch

    from .storage import record

    device = _default_device(args.device)
    # read the work first, so that a bad file or entry point fails before anything else happens
    work = record.read_shapes(args.shapes) if args.shapes else _load_entry_point(args.model)
    if torch.device(device).type == "cpu":
        err.write("note: no GPU: kernels run through the Triton interpreter; timings are not GPU timings\n")
    store = _open_store(write=True)
    fp = _local_fingerprint(device).key
    before = {e.key for e in store.entries(fp)}
    t0 = time.perf_counter()
    if args.shapes:
        results = _tune_shapes(work, store, device, args, err)
    else:
        results = _tune_model(work, device, args, err)
        after = store.entries(fp)
        results = [e for e in after if e.key not in before]
    err.write("\n")
    rows = [[e.family, describe_problem(e.family, json.loads(e.problem)), _ms(e.aten_ms), _ms(e.time_ms),
             f"{_speedup(e):.2f}x", str(e.trials), "aten" if e.winner == "aten" else "triton",
             "cached" if e.key in before else "tuned"] for e in results]
    out.write(f"{len(rows)} problems on {fp} in {time.perf_counter() - t0:.1f} s (cache: {store.path})\n")
    if rows:
        _table(rows, ["family", "problem", "aten ms", "tuned ms", "speedup", "trials", "winner", ""], out)
    return 0


def _tune_shapes(shapes: list, store: Any, device: str, args: argparse.Namespace, err: TextIO) -> list:
    from .tuning import tuner
    from .kernels.registry import families

    fams = families()
    results = []
    for i, (fname, pdict) in enumerate(shapes, 1):
        fam = fams[fname]
        problem = fam.problem_from_dict(pdict)
        err.write(f"\n[{i}/{len(shapes)}] {fname} {describe_problem(fname, pdict)}\n")
        results.append(tuner.tune_problem(fam, problem, device=device, store=store, max_trials=args.max_trials,
                                          time_budget_s=args.time_budget, progress=_progress_printer(err)))
    return results


def _tune_model(work: tuple, device: str, args: argparse.Namespace, err: TextIO) -> list:
    import torch

    from . import api
    from .runtime import dispatch

    model, inputs = work
    if isinstance(model, torch.nn.Module):
        model = model.to(device)
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    # Inductor's compile time buys nothing here: only the problems matter, so the rest runs eagerly
    compiled = api.optimize(model, autotune=True, max_trials=args.max_trials, time_budget_s=args.time_budget,
                            compiler="eager")
    dispatch.set_tune_options(progress=_progress_printer(err))
    try:
        with torch.no_grad():
            compiled(*inputs)
    finally:
        dispatch.set_tune_options(progress=None)
    return []


# ----------------------------------------------------------------------------------------------- doctor
def cmd_doctor(args: argparse.Namespace, out: TextIO) -> int:
    import platform

    import torch

    from ._version import __version__
    from .storage import bundles
    from .storage.device import fingerprint

    def row(k: str, v: Any) -> None:
        out.write(f"{k:<22} {v}\n")

    row("torchtune_ops", __version__)
    row("python", platform.python_version())
    row("torch", torch.__version__)
    for dist in ("triton", "optuna", "platformdirs", "matplotlib"):
        try:
            from importlib import metadata

            row(dist, metadata.version(dist))
        except Exception:
            row(dist, "not installed")
    cuda = torch.cuda.is_available()
    device = _default_device(args.device)
    if cuda:
        p = torch.cuda.get_device_properties(torch.device(device).index or 0)
        row("device", f"{device}: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs")
    else:
        row("device", "cpu (no CUDA GPU)")
    fp = fingerprint(device)
    row("fingerprint", fp.key)
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if cuda and torch.device(device).type == "cuda":
        usable = "usable on CUDA"
    elif interpret:
        usable = "usable on CPU through the Triton interpreter (slow; timings are not GPU timings)"
    else:
        usable = ("not usable here (no CUDA GPU and TRITON_INTERPRET is not set): optimize() and the "
                  "torchtune_ops backend leave graphs to Inductor unchanged, as torch.compile")
    try:
        from .kernels.registry import families

        names = sorted(families())
        row("kernel families", f"{', '.join(names)}: {usable}")
    except Exception as e:  # a broken Triton install must still let doctor report
        row("kernel families", f"cannot import the kernels ({type(e).__name__}: {e})")
    from .storage.store import Store, default_path

    path = default_path()
    row("cache", path)
    if path.exists():
        st = Store.open(readonly=True).stats()
        size = sum(os.path.getsize(f"{path}{sfx}") for sfx in ("", "-wal") if os.path.exists(f"{path}{sfx}"))
        row("cache size", f"{size} bytes, {st['entries']} entries, {st['fingerprints']} device(s), "
                          f"{st['trials']} measurements")
        row("cache writable", os.access(path.parent, os.W_OK) and not settings.current().readonly)
    else:
        row("cache size", "no cache yet")
    s = settings.current()
    for p in s.bundles:
        row("bundle", p)
    shipped = bundles.shipped_bundle_paths()
    row("shipped bundles", ", ".join(p.name for p in shipped) if shipped else "none")
    ov = bundles.overlay()
    row("overlay", f"{len(ov)} entries from {len(ov.bundles)} bundle(s); "
                   f"{len(ov._candidates(fp.key))} device(s) match this one")
    for e in ov.errors:
        row("bundle error", e)
    out.write("\nsettings:\n")
    out.write(settings.describe() + "\n")
    return 0


# ------------------------------------------------------------------------------------------------ parse
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Tune, inspect and ship torchtune_ops' kernel choices.")
    p.add_argument("--cache-dir", help="cache directory (default: TORCHTUNE_OPS_CACHE_DIR or the user "
                                       "cache dir)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def device_opt(q: argparse.ArgumentParser) -> None:
        q.add_argument("--device", help="device whose fingerprint is used (default: cuda if present, "
                                        "else cpu)")

    t = sub.add_parser("tune", help="tune recorded shapes or a model's problems")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--shapes", help="a shape file written with TORCHTUNE_OPS_RECORD")
    src.add_argument("--model", help="MODULE:FUNCTION returning (model, inputs)")
    t.add_argument("--max-trials", type=int, default=None, help="most configurations measured per problem")
    t.add_argument("--time-budget", type=float, default=None, help="most seconds per problem")
    t.add_argument("--storage", metavar="URL", help="tune together with other workers through this database "
                   "(postgresql://... or sqlite:///...; needs torchtune-ops[fleet]; docs/fleet.md)")
    t.add_argument("--job", help="with --storage: the fleet job's name (default: derived from the shapes)")
    t.add_argument("--lease", type=float, default=60.0, help="with --storage: seconds without a heartbeat "
                   "before a worker's problem goes to another worker (default 60)")
    device_opt(t)

    c = sub.add_parser("cache", help="inspect and move the cache").add_subparsers(dest="action", required=True,
                                                                                 metavar="ACTION")
    q = c.add_parser("list", help="entries of this device (or all)")
    q.add_argument("--all-devices", action="store_true")
    q.add_argument("--family")
    device_opt(q)
    q = c.add_parser("show", help="one entry with its measurements")
    q.add_argument("key", help="an id from 'cache list' (a prefix will do) or a problem key")
    q = c.add_parser("export", help="write this device's entries (or all) to a bundle")
    q.add_argument("path")
    q.add_argument("--all-devices", action="store_true")
    q.add_argument("--family")
    q.add_argument("--storage", metavar="URL", help="export a fleet's shared results instead (docs/fleet.md)")
    device_opt(q)
    q = c.add_parser("import", help="read a bundle into the cache")
    q.add_argument("path")
    q.add_argument("--force", action="store_true", help="also import entries of incompatible devices "
                                                        "(stored under their own fingerprint)")
    device_opt(q)
    q = c.add_parser("merge", help="merge bundles into one (the faster choice per problem wins)")
    q.add_argument("paths", nargs="+")
    q.add_argument("-o", "--output", required=True)
    q = c.add_parser("clear", help="delete every entry")
    q.add_argument("--yes", action="store_true", help="do not ask")
    c.add_parser("stats", help="counts and size")

    r = sub.add_parser("report", help="aten time, tuned time, speedup and trials per problem")
    r.add_argument("--plot", metavar="FILE.png", help="also draw the speedups (needs matplotlib)")
    r.add_argument("--all-devices", action="store_true")
    r.add_argument("--family")
    device_opt(r)

    d = sub.add_parser("doctor", help="device, fingerprint, versions, cache and settings")
    device_opt(d)
    return p


_CACHE = {"list": cmd_cache_list, "show": cmd_cache_show, "export": cmd_cache_export,
          "import": cmd_cache_import, "merge": cmd_cache_merge, "clear": cmd_cache_clear,
          "stats": cmd_cache_stats}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit with status 2
    out, err = sys.stdout, sys.stderr
    try:
        if args.command == "tune":
            _interpreter_if_no_gpu()
        # (an override of None would clear TORCHTUNE_OPS_CACHE_DIR, so only a given --cache-dir is passed)
        with settings.override(**({"cache_dir": args.cache_dir} if args.cache_dir else {})):
            if args.command == "tune":
                return cmd_tune(args, out, err)
            if args.command == "cache":
                return _CACHE[args.action](args, out)
            if args.command == "report":
                return cmd_report(args, out)
            return cmd_doctor(args, out)
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:  # e.g. "torchtune-ops cache list | head": the reader left, nothing to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (TorchTuneOpsError, OSError) as e:
        err.write(f"{PROG}: error: {' '.join(str(e).split())}\n")
        return 1


def _interpreter_if_no_gpu() -> None:
    """Tuning on a machine without a GPU runs the kernels through the Triton interpreter, which must be
    chosen before any kernel module is imported."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
