"""Every benchmark's --smoke mode runs on this machine and writes its results file (CI exercises them).

The figures themselves are not asserted (timings belong in benchmarks, not tests); what is checked is that
each script runs end to end, exits 0 and records the machine it ran on.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    env.pop("TORCHTUNE_OPS_CACHE_DIR", None)
    env["TORCHTUNE_OPS_CACHE_DIR"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _json_files(path: Path):
    files = [path] if path.is_file() else sorted(path.glob("*.json"))
    assert files, f"no results written under {path}"
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.parametrize("script, out_is_dir", [
    ("benchmarks/search_efficiency.py", True),
    ("benchmarks/sampler_overhead.py", True),
    ("benchmarks/cost_model_eval.py", True),
    ("benchmarks/bench_bundle_load.py", True),
    ("benchmarks/bench_dispatch.py", False),
    ("benchmarks/bench_store.py", False),
    ("benchmarks/bench_worker.py", False),
    ("benchmarks/bench_hotpath.py", False),
])
def test_smoke_mode_runs_and_records_the_machine(script, out_is_dir, tmp_path):
    out = tmp_path / ("results" if out_is_dir else "results.json")
    if out_is_dir:
        out.mkdir()
    _run([script, "--smoke", "--out", str(out)], tmp_path)
    for data in _json_files(out):
        text = json.dumps(data)
        assert any(k in text for k in ("machine", "host", "cpu", "device")), text[:500]


def test_fleet_benchmark_smoke_on_sqlite(tmp_path):
    out = tmp_path / "fleet.json"
    _run(["benchmarks/bench_fleet.py", "--smoke", "--backend", "sqlite", "--out", str(out)], tmp_path)
    assert _json_files(out)


def test_search_efficiency_seed_range_and_tpe_ablation(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    r = _run(["benchmarks/search_efficiency.py", "--smoke", "--methods", "tune", "--first-seed", "7",
              "--tpe", "gamma=0.25,stall=0", "--out", str(out)], tmp_path)
    assert "Seeds 7-8" in r.stdout and "tune knobs gamma=0.25,stall=0" in r.stdout
    (data,) = _json_files(out)
    assert data["first_seed"] == 7 and data["tpe"] == {"gamma": 0.25, "stall": 0}
    assert data["summary"]["convolution_kt/RTX_3090"]["tune"]["seeds"] == 2
    bad = subprocess.run([sys.executable, "benchmarks/search_efficiency.py", "--smoke", "--tpe", "gama=1",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "gama" in bad.stderr


def test_kernel_tuner_baseline_smoke_and_the_kt_check(tmp_path):
    import kernel_tuner  # noqa: F401  (the baselines extra; scripts/setup.sh installs it)
    out = tmp_path / "results"
    out.mkdir()
    _run(["benchmarks/kernel_tuner_baseline.py", "--smoke", "--out", str(out), "--log", str(tmp_path / "runs.jsonl")],
         tmp_path)
    (kt,) = _json_files(out)
    runs = kt["summary"]["pnpoly_kt/RTX_3090"]["genetic_algorithm"]
    assert kt["machine"] and runs["seeds"] == 2 and len(runs["per_seed"]["50"]) == 2
    assert runs["worst_decile"]["50"] == pytest.approx(min(runs["per_seed"]["50"]), abs=1e-5)  # one seed of 2
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 4
    kt_file = next(out.glob("kernel_tuner_baseline-*.json"))
    r = _run(["benchmarks/search_efficiency.py", "--smoke", "--methods", "tune", "--only", "pnpoly_kt/RTX_3090",
              "--space", str(ROOT.parent / "shared" / "datasets" / "pnpoly_kt" / "RTX_3090.json.gz"),
              "--kt", str(kt_file), "--out", str(out)], tmp_path)
    assert "kt:genetic_algorithm" in r.stdout or "kt:diff_evo" in r.stdout
    data = json.loads(max(out.glob("search_efficiency-*.json")).read_text())
    check = data["kt_check"]["pnpoly_kt/RTX_3090"]
    assert set(check) == {f"{k}@{c}" for k in ("fraction", "worst_decile") for c in (20, 50)}


def test_cost_model_eval_repeats_lopo_over_independent_history_draws():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import cost_model_eval as cme
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    entries = cme.synthetic_spaces([(1, 33, 17, 4000), (1, 16, 4096, 4096), (8, 512, 512, 64)])
    res = cme.lopo(entries, label="t", seeds=2, budget=15, per_problem=30, limit=1, draws=2)
    assert [r["draw"] for r in res] == [0, 1] and {r["space"] for r in res} == {entries[0][2].name}
    # the search without a prior does not depend on the training histories: measured once, shared
    assert res[0]["reach_without"] == res[1]["reach_without"]
    summ = cme.summary(res, 15)["t"]
    assert summ["draws"] == 2 and len(summ["ratio_per_draw"]) == 2
    capped = [min(r["median_without"], 16) for r in res], [min(r["median_with"], 16) for r in res]
    assert summ["ratio_of_sums"] == pytest.approx(sum(capped[0]) / sum(capped[1]))


def _inductor_files(folder: Path) -> None:
    """The four development files' names, in AutoHeuristic's mm format, with made-up timings: 12 shapes,
    12 Triton configurations and cuBLAS each (one configuration timed twice)."""
    import gzip
    import random

    header = ("m,k,n,mat1_dtype,mat2_dtype,mat1_stride_0,mat1_stride_1,mat2_stride_0,mat2_stride_1,mat1_iscontig,"
              "mat2_iscontig,using_tf32,choice,feedback")
    configs = [(bm, bk, bn, st, w) for bm in (16, 64, 128) for bn in (32, 128) for bk, st, w in ((32, 3, 4), (64, 4, 8))]
    rng = random.Random(0)
    for name, meta in (("a100_mm", ((8, 0), 166912)), ("a100_hf_train_mm", ((8, 0), 166912)),
                       ("a100_timm_train_mm", ((8, 0), 166912)), ("h100_hf_train_mm", ((9, 0), 232448))):
        lines = [json.dumps({"shared_memory": meta[1], "device_capa": list(meta[0]), "name": "mm"}), header]
        sizes = [(m, k, n) for m in (1, 17, 256, 1000, 4096) for k in (64, 257, 4096) for n in (80, 1024, 3000)]
        for m, k, n in rng.sample(sizes, 12):
            shape = f"{m},{k},{n},torch.float16,torch.float16,{k},1,1,{k},True,False,not_float_32"
            lines.append(f"{shape},extern_mm,{m * n * k * 1e-9 + 0.01:.6f}")
            for bm, bk, bn, st, w in configs + configs[:1]:
                waste = (-(-m // bm) * bm / m) * (-(-n // bn) * bn / n)
                t = m * n * k * 1e-9 * waste * (1 + 0.1 * rng.random()) + 0.005 * st + 0.002 * w
                lines.append(f"{shape},type=triton_BLOCK-M={bm}_BLOCK-K={bk}_BLOCK-N={bn}_numstages={st}"
                             f"_numwarps={w},{t:.6f}")
        with gzip.open(folder / f"{name}.txt.gz", "wt") as f:
            f.write("\n".join(lines) + "\n")


def test_perfmodel_eval_smoke_and_shipped_prior_on_any_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _inductor_files(data)
    out = tmp_path / "results"
    out.mkdir()
    r = _run(["benchmarks/perfmodel_eval.py", "--smoke", "--no-cache", "--data", str(data), "--out", str(out)],
             tmp_path)
    assert "across-GPUs" in r.stdout and "tuner across-GPUs" in r.stdout
    (res,) = _json_files(out)
    assert "machine" in res and {row["protocol"] for row in res["rows"]} >= {
        "baseline", "leave-shapes-out", "across-workloads", "across-GPUs", "tuner across-GPUs"}
    js = tmp_path / "scores.json"
    _run(["benchmarks/perfmodel_eval.py", "--prior", "shipped", "--no-cache", "--test",
          str(data / "h100_hf_train_mm.txt.gz"), "--json", str(js)], tmp_path)
    scores = json.loads(js.read_text())
    assert scores["shapes"] == 12
    for key in ("geomean", "within5"):
        assert set(scores[key]) == {"0", "1", "3", "5", "10"}
        assert all(0 < v <= 1 for v in scores[key].values())
    assert scores["geomean"]["10"] >= scores["geomean"]["0"]


def test_replay_table_from_a_results_file_a_log_and_kernel_tuner(tmp_path):
    out = tmp_path / "results"
    log = tmp_path / "runs.jsonl"
    _run(["benchmarks/search_efficiency.py", "--smoke", "--methods", "tune,random", "--out", str(out),
          "--log", str(log)], tmp_path)
    (data,) = _json_files(out)
    name = next(iter(data["summary"]))
    tune50 = data["summary"][name]["tune"]["fraction"]["50"]
    # a Kernel Tuner file with one strategy just above tune() at 50 and one far below
    kt = tmp_path / "kt.json"
    kt.write_text(json.dumps({"summary": {name: {
        "above": {"fraction": {"20": 1.0, "50": tune50 + 0.01}, "worst_decile": {"20": 0.0, "50": 0.0}, "seeds": 2},
        "below": {"fraction": {"20": 0.0, "50": 0.0}, "worst_decile": {"20": 0.0, "50": 0.0}, "seeds": 2}}}}))
    results = next(out.glob("search_efficiency-*.json"))
    r = _run(["benchmarks/replay_table.py", "--judge", "tune", "--col", f"tune={results}:tune",
              "--col", f"logged={log}:tune", "--own", "logged", "--col", f"random={log}:random",
              "--kt", str(kt), "--seeds", "2", "--budget", "50"], tmp_path)
    rows = [line for line in r.stdout.splitlines() if line.startswith("|")]
    at50 = next(line for line in rows if "| 50 |" in line)
    cells = [c.strip() for c in at50.split("|")]
    assert cells[3] == cells[4]  # the results file and the log of the same runs give the same cell
    assert f"{tune50 + 0.01:.3f} (above, 2)" in at50 and "mean MISS" in at50 and "worst ahead" in at50
    assert "| 200 |" not in r.stdout  # a budget of 50: no row at 200


def test_replay_table_pools_the_seeds_of_two_files(tmp_path):
    """A+B in --col and --kt summarises a space over the seeds of both files; a space in one keeps its own."""
    def summary(per_seed):
        return {"fraction": {"20": sum(per_seed) / len(per_seed)}, "worst_decile": {"20": min(per_seed)},
                "seeds": len(per_seed), "per_seed": {"20": per_seed}}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"summary": {"s": {"tune": summary([0.5] + [0.9] * 9)},
                                         "only_a": {"tune": summary([0.7, 0.8])}}}))
    b.write_text(json.dumps({"summary": {"s": {"tune": summary([1.0] * 10)}}}))
    kt_a, kt_b = tmp_path / "kt_a.json", tmp_path / "kt_b.json"
    kt_a.write_text(json.dumps({"summary": {"s": {"bayes": summary([0.6] * 10)}}}))
    kt_b.write_text(json.dumps({"summary": {"s": {"bayes": summary([0.8] * 10), "ga": summary([0.1] + [0.99] * 9)}}}))
    kt_c = tmp_path / "kt_c.json"  # a third file with a strategy the second lacks: both kept
    kt_c.write_text(json.dumps({"summary": {"s": {"ga": summary([0.95] * 10), "pso": summary([0.5] * 10)}}}))
    r = _run(["benchmarks/replay_table.py", "--judge", "tune", "--col", f"tune={a}+{b}:tune",
              "--kt", f"{kt_a}+{kt_b}+{kt_c}", "--seeds", "20", "--budget", "20"], tmp_path)
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("| ")}
    # 20 seeds: mean (0.5 + 9 * 0.9 + 10 * 1.0) / 20; worst decile: the lowest two, 0.5 and 0.9
    assert "| 0.930 [0.700] |" in rows["s"]
    # Kernel Tuner, every strategy of every file kept: bayes over 20 seeds, mean 0.7, worst decile 0.6 (the best
    # worst decile); ga over 20, mean (0.1 + 9 * 0.99 + 10 * 0.95) / 20, worst decile (0.1 + 0.95) / 2
    assert "| 0.925 (ga, 20) | 0.600 (bayes) | mean ahead, worst ahead |" in rows["s"]
    assert "0.750 [0.700] (2 seeds)" in rows["only_a"]
    no_seeds = tmp_path / "old.json"
    no_seeds.write_text(json.dumps({"summary": {"s": {"tune": {"fraction": {"20": 1.0}, "worst_decile": {"20": 1.0},
                                                                "seeds": 1}}}}))
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "benchmarks/replay_table.py", "--judge", "tune", "--col",
                        f"tune={a}+{no_seeds}:tune"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "per-seed fractions" in r.stderr
    # a results file says its first seed: the same seeds pooled twice are refused
    seeded = tmp_path / "seeded.json"
    seeded.write_text(json.dumps({"first_seed": 1000, "summary": {"s": {"tune": summary([0.9] * 10)}}}))
    r = subprocess.run([sys.executable, "benchmarks/replay_table.py", "--judge", "tune", "--col",
                        f"tune={seeded}+{seeded}:tune"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "the same seeds twice (1000..1009)" in r.stderr


def test_local_step_screen_reproduces_the_default_and_runs_a_variant(tmp_path):
    """Its "ei" variant is the default search: the same fractions as search_efficiency.py on the same seeds."""
    out = tmp_path / "results"
    out.mkdir()
    _run(["benchmarks/search_efficiency.py", "--smoke", "--methods", "tune", "--first-seed", "7", "--out", str(out)],
         tmp_path)
    (data,) = _json_files(out)
    ref = data["summary"]["convolution_kt/RTX_3090"]["tune"]
    screen = ["benchmarks/local_step_screen.py", "--only", "convolution_kt/RTX_3090", "--seeds", "2",
              "--first-seed", "7"]
    line = _run([*screen[:1], "ei", *screen[1:]], tmp_path).stdout.strip()
    expect = (f"@20 {ref['fraction']['20']:.3f} [{ref['worst_decile']['20']:.3f}]  "
              f"@50 {ref['fraction']['50']:.3f} [{ref['worst_decile']['50']:.3f}]")
    assert line.startswith("ei") and line.endswith(expect), (line, expect)
    assert _run([*screen[:1], "ts", *screen[1:]], tmp_path).stdout.startswith("ts ")
    bad = subprocess.run([sys.executable, *screen[:1], "ei", "--only", "no_such_space"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no_such_space" in bad.stderr
