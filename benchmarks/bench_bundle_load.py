"""Start-up cost of a bundle: load and validate a synthetic 10,000-entry bundle (target: at most 50 ms).

    .venv/bin/python benchmarks/bench_bundle_load.py            # 10,000 entries, 15 runs
    .venv/bin/python benchmarks/bench_bundle_load.py --smoke    # 500 entries, 3 runs

Measures, each as the median of several runs in this process (imports and family set-up done first):
- ``load``: read the file, parse it and validate every field of every row (stage 1), index the rows: what
  a process pays at start for ``TORCHTUNE_OPS_BUNDLES`` or a shipped bundle (the target);
- ``first use``: the per-entry stage-2 checks (problem parser, space, ``check``) that run when an entry is
  first used, per entry;
- ``full validation``: stage 2 on every entry (what ``cache import`` and ``cache merge`` pay).

The bundle mixes GEMM problems (the shapes of GPT-2/Llama-style projections over many batch sizes, with
random odd sizes) and conv2d problems, on two devices, with the families' well-known configurations as
winners. Writes JSON (machine, versions, date, figures) under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("TRITON_INTERPRET", "1")  # kernel modules import on CPU-only machines too

TARGET_MS = 50.0


def synthetic_entries(n: int, seed: int = 0):
    """``n`` distinct fake entries (GEMM and conv2d, two devices) with valid winners."""
    from torchtune_ops.storage import bundles
    from torchtune_ops.storage.device import Fingerprint
    from torchtune_ops.kernels.registry import families
    from torchtune_ops.storage.store import problem_key

    fams = families()
    gemm, conv = fams["gemm"], fams["conv2d"]
    devices = [Fingerprint(gpu="NVIDIA H100 80GB HBM3", capability=(9, 0), sm_count=132, torch="2.11.0",
                           triton="3.6.0", kernels="0123456789ab"),
               Fingerprint(gpu="NVIDIA A100-SXM4-80GB", capability=(8, 0), sm_count=108, torch="2.11.0",
                           triton="3.6.0", kernels="0123456789ab")]
    limits = [bundles.DeviceRecord(d).limits() for d in devices]
    rng = random.Random(seed)
    hidden = (768, 1024, 2048, 3072, 4096, 5120, 8192, 11008, 14336)
    seen, out = set(), []
    while len(out) < n:
        dev = rng.randrange(len(devices))
        if rng.random() < 0.8:
            M = rng.choice((1, 2, 3, 4, 8, 16, 17, 31, 64, 128, 255, 512, 1024, 2048, 4096, rng.randint(1, 9000)))
            N, K = rng.choice(hidden), rng.choice(hidden)
            p = gemm.problem_type(rng.choice(("mm", "linear", "bmm")), 1, M, N, K,
                                  rng.choice(("float16", "bfloat16", "float32")))
            fam = gemm
        else:
            C, K = rng.choice((3, 16, 32, 64, 128, 256, 512)), rng.choice((16, 32, 64, 128, 256, 512, 1024))
            H = rng.choice((7, 14, 28, 56, 112, 224))
            R = rng.choice((1, 3, 5, 7))
            p = conv.problem_type(N=rng.choice((1, 2, 4, 8, 16, 32)), C=C, H=H, W=H, K=K, R=R, S=R,
                                  stride=(1, 1), padding=(R // 2,) * 4, dtype=rng.choice(("float16", "bfloat16")))
            fam = conv
        d = fam.problem_to_dict(p)
        k = (dev, fam.name, problem_key(d))
        if k in seen:
            continue
        seen.add(k)
        cfgs = fam.known_configs(p, limits[dev])
        if rng.random() < 0.15 or not cfgs:
            winner, t, a = "aten", 0.2, 0.2
        else:
            winner, a = rng.choice(cfgs[:6]).to_json(), rng.uniform(0.01, 5.0)
            t = a * rng.uniform(0.5, 0.99)
        out.append(bundles.BundleEntry(device=devices[dev].key, family=fam.name, problem_key=problem_key(d),
                                       problem=d, winner=winner, time_ms=t, aten_ms=a,
                                       trials=rng.randint(1, 60)))
    return out


def _median_ms(fn, runs: int) -> tuple[float, list[float], float]:
    """Median wall milliseconds, every run's, and the median CPU milliseconds of this process (steadier
    than wall time on a shared machine)."""
    times, cpu = [], []
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(times), times, statistics.median(cpu)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="500 entries, 3 runs (CI check that it runs)")
    p.add_argument("--entries", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    n, runs = (500, 3) if a.smoke else (a.entries, a.runs)

    import torch
    import triton

    from torchtune_ops import __version__
    from torchtune_ops.storage import bundles

    t0 = time.perf_counter()
    entries = synthetic_entries(n)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bundle.json")
        bundles.write(bundles.Bundle.from_entries(entries), path)
        size = os.path.getsize(path)
        bundles.load(path)  # warm: imports, family registry
        load_ms, load_all, load_cpu_ms = _median_ms(lambda: bundles.load(path), runs)
        full_ms, _, _ = _median_ms(lambda: bundles.load(path).entries(), max(1, runs // 5))
        b = bundles.load(path)
        probe = entries[: min(len(entries), 2000)]
        from torchtune_ops.kernels.registry import families

        fams = families()
        objs = [(e.device, e.family, fams[e.family].problem_from_dict(e.problem)) for e in probe]
        t0 = time.perf_counter()
        for dev, fam, prob in objs:
            assert b.find(dev, fam, prob) is not None
        first_use_us = (time.perf_counter() - t0) * 1e6 / len(objs)
        t0 = time.perf_counter()
        for dev, fam, prob in objs:
            b.find(dev, fam, prob)
        again_us = (time.perf_counter() - t0) * 1e6 / len(objs)

    result = {
        "benchmark": "bench_bundle_load", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "triton": triton.__version__, "torchtune_ops": __version__, "smoke": a.smoke,
        "entries": n, "bundle_bytes": size, "runs": runs,
        "load_ms_median": round(load_ms, 3), "load_ms_min": round(min(load_all), 3),
        "load_cpu_ms_median": round(load_cpu_ms, 3),
        "load_ms_all": [round(x, 3) for x in load_all], "load_average": list(os.getloadavg()),
        "full_validation_ms_median": round(full_ms, 3),
        "first_use_us_per_entry": round(first_use_us, 2), "repeat_lookup_us_per_entry": round(again_us, 3),
        "target_load_ms": TARGET_MS, "meets_target": load_ms <= TARGET_MS if not a.smoke else None,
        "synthetic_build_s": round(build_s, 2),
    }
    print(f"bundle of {n} entries ({size / 1e6:.2f} MB): load + stage-1 validation {load_ms:.1f} ms median "
          f"of {runs} (min {min(load_all):.1f} ms), {load_cpu_ms:.1f} ms CPU (target <= {TARGET_MS:.0f} ms); full validation {full_ms:.0f} ms; first use "
          f"{first_use_us:.1f} us/entry, then {again_us:.2f} us/entry")
    os.makedirs(a.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = os.path.join(a.out, f"bench_bundle_load{'-smoke' if a.smoke else ''}-{stamp}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
