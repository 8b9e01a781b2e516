"""The ``torchtune-ops`` command (also ``python -m torchtune_ops``): tune offline, manage the cache and
bundles, report, and check an installation.

    torchtune-ops tune --shapes shapes.jsonl          # problems recorded with TORCHTUNE_OPS_RECORD
    torchtune-ops tune --model mypkg.models:build      # build() returns (model, example inputs)
    torchtune-ops tune --shapes shapes.jsonl --retune # tune again what the cache already has
    torchtune-ops tune --cached --family gemm --retune # tune chosen cache entries again
    torchtune-ops cache list | show ID | export PATH | import PATH [--force] | merge PATH... -o OUT
    torchtune-ops cache delete --family F [--problem KEY | --id ID] [--all-matching] | clear --yes | stats
    torchtune-ops report [--plot speedups.png]
    torchtune-ops dashboard [--port 8080] [--storage FILE] [--no-serve]   # the history in optuna-dashboard
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


def describe_problem(family: str, problem: dict[str, Any]) -> str:
    """``kernels.describe.describe_problem``, imported when first needed (the CLI starts without torch)."""
    from .kernels.describe import describe_problem as describe

    return describe(family, problem)


# ---------------------------------------------------------------------------------------------- helpers
def entry_id(entry: Any) -> str:
    """A short stable id of a cache entry (what ``cache list`` prints and ``cache show`` accepts)."""
    text = f"{entry.fingerprint}\0{entry.family}\0{entry.problem}"
    return hashlib.sha1(text.encode()).hexdigest()[:10]


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
    """The cache; for a command that writes, one that writes to its file (else CliError with the reason)."""
    import warnings

    from .storage.store import Store

    s = settings.current()
    if write and s.readonly:
        raise CliError("read-only mode (TORCHTUNE_OPS_READONLY=1): this command would write to the cache")
    if not write:
        return Store.open(readonly=True)
    with warnings.catch_warnings():  # the reason is the error below, not a warning beside it
        warnings.simplefilter("ignore")
        store = Store.open()
    _check_written(store)
    return store


def _check_written(store: Any) -> None:
    """CliError when ``store`` no longer writes to its file (it could not, or a write failed)."""
    if store.mode != "disk":
        raise CliError(f"cannot write the cache {store.path}: {store.reason or store.mode}; nothing was "
                       "stored (choose a writable directory with --cache-dir or TORCHTUNE_OPS_CACHE_DIR)")


def _default_device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _local_fingerprint(device: str | None = None):
    from .storage.device import fingerprint

    return fingerprint(_default_device(device))


def _check_family(name: str | None) -> None:
    """CliError naming the known families when ``name`` is not one of them (None: no filter)."""
    if name is None:
        return
    from .kernels.registry import families

    known = sorted(families())
    if name not in known:
        raise CliError(f"unknown kernel family {name!r}; known: {', '.join(known)}")


def _select(store: Any, args: argparse.Namespace) -> list:
    fp = None if getattr(args, "all_devices", False) else _local_fingerprint(getattr(args, "device", None)).key
    _check_family(getattr(args, "family", None))
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

    _check_family(args.family)
    folder = os.path.dirname(os.path.abspath(args.path))
    if not os.path.isdir(folder):
        raise CliError(f"cannot write {args.path}: the directory {folder} does not exist")
    if args.storage:  # a fleet's shared results instead of the local cache
        fp = None if args.all_devices else _local_fingerprint(args.device).key
        n = _fleet().export_bundle(storage=args.storage, path=args.path, fingerprint=fp, family=args.family)
        out.write(f"wrote {n} entries from {args.storage} to {args.path}\n")
        return 0
    store = _open_store(write=False)
    fp = None if args.all_devices else _local_fingerprint(args.device).key
    b = bundles.export_store(store, fingerprint=fp, family=args.family)
    try:
        bundles.write(b, args.path)
    except OSError as e:
        raise CliError(f"cannot write {args.path}: {e.strerror or e}") from None
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
    _check_written(store)
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
    _check_written(store)
    out.write(f"deleted {n} entries from {store.path}\n")
    return 0


def cmd_cache_delete(args: argparse.Namespace, out: TextIO) -> int:
    store = _open_store(write=True)
    chosen = _chosen(store, args)
    for e in chosen:
        store.delete(*e.key)
    _check_written(store)
    out.write(f"deleted {len(chosen)} entr{'y' if len(chosen) == 1 else 'ies'} from {store.path}\n")
    return 0


def _chosen(store: Any, args: argparse.Namespace) -> list:
    """The entries ``--id``/``--problem``/``--family``/``--device``/``--all-devices`` select; more than one
    only with ``--all-matching`` (CliError otherwise, and when none matches)."""
    if args.id is None and args.problem is None and args.family is None:
        raise CliError("say which entries: --id ID, --problem KEY and/or --family NAME (see 'cache list')")
    got = [e for e in _select(store, args)
           if (args.id is None or entry_id(e).startswith(args.id))
           and (args.problem is None or e.problem == args.problem)]
    if not got:
        raise CliError("no cache entry matches (see 'torchtune-ops cache list')")
    if len(got) > 1 and not args.all_matching:
        raise CliError(f"{len(got)} entries match; pass --all-matching to act on all of them")
    return got


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
    # (this command opened the cache read-only; say whether tuning processes could write it, and if not why)
    from .storage.store import unwritable

    why = "read-only mode (TORCHTUNE_OPS_READONLY=1)" if settings.current().readonly else unwritable(store.path)
    st["writable"] = True if why is None else f"False ({why})"
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
        _plot(entries, args.plot, device="all devices" if args.all_devices else _local_fingerprint(args.device).key)
        out.write(f"wrote {args.plot}\n")
    return 0


def _config_text(winner: str) -> str:
    try:
        return " ".join(f"{k}={v}" for k, v in json.loads(winner).items())
    except ValueError:
        return winner


#: most problems drawn by ``report --plot`` (the fastest and the slowest halves; the rest is counted)
PLOT_MAX_BARS = 40


def _speedup_figure(entries: list, *, device: str):
    """The ``report --plot`` figure: one bar per problem (at most PLOT_MAX_BARS), a title, the device and a
    legend; its size is bounded whatever the number of problems."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranked = sorted(entries, key=_speedup, reverse=True)
    hidden = max(0, len(ranked) - PLOT_MAX_BARS)
    if hidden:
        half = PLOT_MAX_BARS // 2
        ranked = ranked[:half] + ranked[-half:]
    labels = [describe_problem(e.family, json.loads(e.problem)) for e in ranked]
    values = [_speedup(e) for e in ranked]
    won = [e.winner != "aten" for e in ranked]
    fig, ax = plt.subplots(figsize=(10, min(12.0, max(2.5, 0.28 * len(ranked) + 1.8))))
    ax.barh(range(len(values)), values, color=["tab:green" if w else "tab:gray" for w in won])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over PyTorch's kernel (aten time / tuned time)")
    ax.set_title(f"torchtune_ops: speedup per problem ({len(entries)} problems"
                 f"{f'; the {len(ranked)} fastest and slowest shown, {hidden} more not' if hidden else ''})",
                 fontsize=10)
    ax.legend(handles=[Patch(color="tab:green", label="a Triton kernel won"),
                       Patch(color="tab:gray", label="PyTorch's kernel kept")], loc="lower right", fontsize=8)
    fig.text(0.01, 0.005, f"device: {device}", fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def _plot(entries: list, path: str, *, device: str) -> None:
    import matplotlib.pyplot as plt

    fig = _speedup_figure(entries, device=device)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


# -------------------------------------------------------------------------------------------- dashboard
def cmd_dashboard(args: argparse.Namespace, out: TextIO) -> int:
    from .storage import dashboard

    if not args.no_serve:
        try:
            import optuna_dashboard  # noqa: F401  (checked before the export, which may take a while)
        except ImportError:
            raise CliError(f"the dashboard needs optuna-dashboard: {dashboard.INSTALL} "
                           "(or write the studies only, with --no-serve)") from None
    _check_family(args.family)
    store = _open_store(write=False)
    target = args.storage or str(store.path.parent / "dashboard.log")
    fp = None if not args.device else _local_fingerprint(args.device).key
    studies = dashboard.export(store, target, fingerprint=fp, family=args.family)
    out.write(f"wrote {len(studies)} studies ({sum(s.trials for s in studies)} trials) from {store.path} "
              f"to {target}\n")
    if studies:
        out.write(dashboard.summary(studies) + "\n")
    if args.no_serve:
        out.write(f"serve them with: optuna-dashboard {target}\n")
        return 0
    out.write(f"serving optuna-dashboard on http://127.0.0.1:{args.port}/ (Ctrl-C stops it)\n")
    out.flush()
    dashboard.serve(target, port=args.port)
    return 0


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
    # the budget is checked as TORCHTUNE_OPS_MAX_TRIALS/TIME_BUDGET are, with the same words
    settings.validated(max_trials=args.max_trials, time_budget=args.time_budget)
    s = settings.current()
    if s.readonly:
        raise CliError("read-only mode (TORCHTUNE_OPS_READONLY=1): tuning is off")
    if args.storage:  # one worker of a fleet sharing the database (docs/fleet.md)
        if not args.shapes or args.retune:
            raise CliError("--storage tunes a shape file (--shapes) once per problem: not --model, --cached or "
                           "--retune")
        return _fleet().cli_tune(storage=args.storage, shapes=args.shapes, job=args.job, device=args.device,
                                 max_trials=args.max_trials, time_budget_s=args.time_budget,
                                 lease_s=args.lease, out=out, err=err)
    import torch

    from .storage import record

    device = _default_device(args.device)
    if (args.id or args.problem or args.family) and not args.cached:
        raise CliError("--id, --problem and --family choose cache entries: use them with --cached")
    # read the work first, so that a bad file or entry point fails before anything else happens
    if args.cached:
        args.all_matching = True
        with contextlib.closing(_open_store(write=False)) as cache:
            work = [(e.family, json.loads(e.problem)) for e in _chosen(cache, args)]
    else:
        work = record.read_shapes(args.shapes) if args.shapes else _load_entry_point(args.model)
    if torch.device(device).type == "cpu":
        err.write("note: no GPU: kernels run through the Triton interpreter; timings are not GPU timings\n")
    store = _open_store(write=True)
    fp = _local_fingerprint(device).key
    before = {e.key: e for e in store.entries(fp)}
    t0 = time.perf_counter()
    if not args.model:
        results = _tune_shapes(work, store, device, args, err)
    else:
        results = _tune_model(work, device, args, err)
        results = [e for e in store.entries(fp) if before.get(e.key) != e]
    _check_written(store)
    err.write("\n")
    rows = [[e.family, describe_problem(e.family, json.loads(e.problem)), _ms(e.aten_ms), _ms(e.time_ms),
             f"{_speedup(e):.2f}x", str(e.trials), "aten" if e.winner == "aten" else "triton",
             "cached" if before.get(e.key) == e else "tuned"] for e in results]
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
                                          time_budget_s=args.time_budget, progress=_progress_printer(err),
                                          force=args.retune))
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
    from .storage.store import default_store

    dispatch.set_tune_options(progress=_progress_printer(err), force=args.retune or None)
    try:
        with torch.no_grad():
            compiled(*inputs)
        with settings.override(max_trials=args.max_trials, time_budget=args.time_budget):
            _check_written(default_store())  # the store the model's ops wrote to
    finally:
        dispatch.set_tune_options(progress=None, force=None)
    return []



# ----------------------------------------------------------------------------------------------- doctor
def _prior_line(fp_key: str, device: Any) -> str:
    """What the shipped GEMM performance prior is and what it rests on for this device."""
    from .tuning import gemm_prior, perfmodel

    prior = gemm_prior.shipped()
    if prior is None:
        return f"none ({gemm_prior.SHIPPED_PATH} missing or unreadable)"
    gpus = ", ".join(g["name"] for g in prior.gpus)
    head = f"{prior.meta.get('version')} (trained on {gpus}, {prior.meta.get('date')})"
    if not settings.current().perfmodel_prior:
        return f"{head}; off (TORCHTUNE_OPS_PERFMODEL_PRIOR=0)"
    try:
        from .kernels.base import device_limits

        limits = device_limits(device)
    except Exception:  # noqa: BLE001 - doctor reports, it does not fail
        limits = None
    model = perfmodel.prior_for(fp_key, "gemm", limits)
    if model is None:
        return f"{head}; not used on this device (no GPU)"
    return f"{head}; {model.note}"


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
        from .storage.store import unwritable

        why = "read-only mode (TORCHTUNE_OPS_READONLY=1)" if settings.current().readonly else unwritable(path)
        row("cache writable", True if why is None else f"False ({why})")
    else:
        row("cache size", "no cache yet")
    row("GEMM prior", _prior_line(fp.key, device))
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
    src.add_argument("--cached", action="store_true", help="the cache's own entries of this device, chosen "
                     "with --id/--problem/--family (with --retune: tune them again)")
    t.add_argument("--id", help="with --cached: an entry id from 'cache list' (a prefix will do)")
    t.add_argument("--problem", metavar="KEY", help="with --cached: a problem key")
    t.add_argument("--family", help="with --cached: a kernel family")
    t.add_argument("--max-trials", type=int, default=None, help="most configurations measured per problem")
    t.add_argument("--time-budget", type=float, default=None, help="most seconds per problem")
    t.add_argument("--retune", action="store_true", help="tune again problems the cache already has (the "
                   "new answer replaces the old); without it, only those tuned with a smaller budget (or without "
                   "trials) are, the faster answer kept")
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
    q = c.add_parser("delete", help="delete chosen entries (tuned again at their next use with tuning on)")
    q.add_argument("--id", help="an id from 'cache list' (a prefix will do)")
    q.add_argument("--problem", metavar="KEY", help="a problem key (as 'cache show' prints it)")
    q.add_argument("--family")
    q.add_argument("--all-devices", action="store_true")
    q.add_argument("--all-matching", action="store_true", help="delete every entry that matches (needed "
                   "when more than one does)")
    device_opt(q)
    q = c.add_parser("clear", help="delete every entry")
    q.add_argument("--yes", action="store_true", help="do not ask")
    c.add_parser("stats", help="counts and size")

    r = sub.add_parser("report", help="aten time, tuned time, speedup and trials per problem")
    r.add_argument("--plot", metavar="FILE.png", help="also draw the speedups (needs matplotlib)")
    r.add_argument("--all-devices", action="store_true")
    r.add_argument("--family")
    device_opt(r)

    b = sub.add_parser("dashboard", help="write the tuning history as Optuna studies (one per problem) and serve "
                                         "optuna-dashboard on 127.0.0.1")
    b.add_argument("--port", type=int, default=8080, help="port of the dashboard (default 8080)")
    b.add_argument("--storage", metavar="FILE|URL", help="where the studies go: a journal file, a .db/.sqlite "
                   "file or a database URL (default: dashboard.log in the cache directory)")
    b.add_argument("--no-serve", action="store_true", help="write the studies only")
    b.add_argument("--family", help="only this kernel family")
    b.add_argument("--device", help="only this device's problems (default: every device in the cache)")

    d = sub.add_parser("doctor", help="device, fingerprint, versions, cache and settings")
    device_opt(d)
    return p


_CACHE = {"list": cmd_cache_list, "show": cmd_cache_show, "export": cmd_cache_export,
          "import": cmd_cache_import, "merge": cmd_cache_merge, "clear": cmd_cache_clear,
          "delete": cmd_cache_delete, "stats": cmd_cache_stats}


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
            if args.command == "dashboard":
                return cmd_dashboard(args, out)
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
