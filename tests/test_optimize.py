"""optimize(): results against eager (forward and backward), the module's state, tuning on/off, the cache
across processes, dynamic shapes without recompiles, DISABLE, explain(), and torch.distributed."""
import io
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchtune_ops
from torchtune_ops.runtime import backend, dispatch
from torchtune_ops import settings
from torchtune_ops.storage.device import fingerprint
from torchtune_ops.tuning.timing import FakeTimer

HERE = os.path.dirname(os.path.abspath(__file__))


class Net(nn.Module):
    """Linear, conv2d and bmm layers (small, odd sizes)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.l1 = nn.Linear(5 * 4 * 4, 12)
        self.l2 = nn.Linear(12, 6)

    def forward(self, x):
        y = F.relu(self.conv(x)).flatten(1)
        h = F.relu(self.l1(y))
        q = h.view(-1, 3, 4)
        att = torch.bmm(q, q.transpose(1, 2)).flatten(1)
        return self.l2(h) + att[:, :6]


pytestmark = pytest.mark.usefixtures("fresh_runtime")  # conftest.py: no graphs, choices or tune options


@pytest.fixture
def fake_timer():
    """Every Triton configuration beats aten (tuning is fast and deterministic)."""
    dispatch.set_tune_options(timer=FakeTimer({"aten": 10.0}, default=1.0))


def _tuned():
    return sum(c.get("tuned", 0) for c in dispatch.stats()["ops"].values())


def _same_training_step(om, m, x):
    """One forward and backward through the optimized module and through the module itself agree."""
    out = om(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    ref = m(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


def test_optimize_matches_eager_forward_backward_and_keeps_module_state(ops_stay):
    torch.manual_seed(0)
    m, x = Net(), torch.randn(3, 3, 4, 4)
    om = torchtune_ops.optimize(m, compiler="eager")
    assert om.l1 is m.l1 and list(om.parameters())[0] is list(m.parameters())[0]
    assert om.state_dict().keys() == m.state_dict().keys()
    assert [n for n, _ in om.named_parameters()] == [n for n, _ in m.named_parameters()]
    om.load_state_dict(m.state_dict())
    _same_training_step(om, m, x)
    assert _tuned() == 0
    counts = backend.intercepted()
    assert counts["conv2d"] == 1 and counts["bmm"] == 3 and counts["mm_act"] == 1


def test_tuning_on_fills_the_cache_and_a_fresh_process_tunes_nothing(tmp_path, fake_timer):
    from torchtune_ops.storage.store import Store

    cache = tmp_path / "cache"
    torch.manual_seed(0)
    m, x = Net().eval(), torch.randn(2, 3, 4, 4)
    om = torchtune_ops.optimize(m, autotune=True, max_trials=2, cache_dir=cache, compiler="eager")
    with torch.no_grad():
        out = om(x)
        torch.testing.assert_close(out, m(x), rtol=1e-4, atol=1e-5)
        om(x)
    tuned = _tuned()
    assert tuned >= 3                                   # mm_act (l1+relu), addmm (l2), bmm, conv2d
    fp = fingerprint("cpu").key
    entries = Store.open(cache / "tuning.sqlite").entries(fp)
    assert len(entries) == tuned
    problems = [json.loads(e.problem) for e in entries]
    assert {(p.get("M"), p.get("N"), p.get("K")) for p in problems if "M" in p} >= {(2, 12, 80), (2, 6, 12)}
    assert all(e.fingerprint == fp for e in entries)
    torch.save({"x": x, "state": m.state_dict(), "out": out}, tmp_path / "ref.pt")

    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {HERE!r})
        from test_optimize import Net
        import torchtune_ops
        from torchtune_ops.runtime import dispatch
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        m = Net().eval()
        m.load_state_dict(ref["state"])
        om = torchtune_ops.optimize(m, autotune=True, max_trials=2, cache_dir={str(cache)!r}, compiler="eager")
        with torch.no_grad():
            out = om(ref["x"])
        assert torch.equal(out, ref["out"]), (out - ref["out"]).abs().max()
        ops = dispatch.stats()["ops"]
        print("TUNED", sum(c.get("tuned", 0) for c in ops.values()))
        print("STORE", sum(c.get("store", 0) for c in ops.values()))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHTUNE_OPS_")}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TUNED 0" in r.stdout and f"STORE {tuned}" in r.stdout, r.stdout


def test_tuning_off_tunes_nothing(tmp_path, ops_stay):
    m, x = Net().eval(), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torchtune_ops.optimize(m, cache_dir=tmp_path, compiler="eager")(x)
    from torchtune_ops.storage.store import Store

    assert _tuned() == 0
    assert not (tmp_path / "tuning.sqlite").exists() or Store.open(tmp_path / "tuning.sqlite").entries() == []
    assert {p["source"] for p in dispatch.stats()["problems"]} == {"untuned"}


def test_tuning_off_with_nothing_cached_leaves_every_op_to_inductor(tmp_path):
    """Nothing to tune, record or predict: PyTorch's kernel would serve every call, so the graph is
    Inductor's own (no op of ours), and skipped() says why."""
    torch.manual_seed(0)
    m, x = Net(), torch.randn(2, 3, 4, 4)
    om = torchtune_ops.optimize(m, cache_dir=tmp_path, compiler="eager")
    _same_training_step(om, m, x)
    assert backend.intercepted() and all(k.startswith("skipped:") for k in backend.intercepted())
    assert dispatch.stats()["problems"] == []
    reasons = backend.skipped()
    assert any("tuning is off and nothing is cached" in r for r in reasons), reasons


def test_dynamic_shapes_tune_each_new_shape_once_without_recompiling(fake_timer):
    from torch._dynamo.utils import counters

    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    om = torchtune_ops.optimize(m, autotune=True, max_trials=2, dynamic=True, compiler="eager")
    counters.clear()
    with torch.no_grad():
        for batch in (3, 5, 7, 5, 3):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(om(x), m(x), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert _tuned() == 2 * 3                             # (mm_act, addmm) x three batch sizes, once each
    assert backend.intercepted() == {"mm_act": 1, "addmm": 1}


def test_disable_makes_optimize_plain_torch_compile(monkeypatch):
    monkeypatch.setenv("TORCHTUNE_OPS_DISABLE", "1")
    settings.reload()
    m, x = Net(), torch.randn(2, 3, 4, 4)
    out = torchtune_ops.optimize(m, autotune=True, compiler="eager")(x)
    torch.testing.assert_close(out, m(x))
    assert backend.intercepted() == {} and dispatch.stats()["ops"] == {}


def test_bad_argument_fails_at_optimize():
    with pytest.raises(torchtune_ops.SettingsError):
        torchtune_ops.optimize(Net(), autotune="sometimes")
    with pytest.raises(torchtune_ops.SettingsError):
        torchtune_ops.optimize(Net(), compiler="tvm")


def test_explain_reports_each_problem(fake_timer):
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        torchtune_ops.optimize(m, autotune=True, max_trials=2, compiler="eager")(torch.randn(3, 8))
    buf = io.StringIO()
    data = torchtune_ops.explain(file=buf)
    text = buf.getvalue()
    assert "mm_act" in text and "addmm" in text and "[3,8] x [8,16]" in text
    assert data["intercepted"] == {"mm_act": 1, "addmm": 1} and set(data["intercepted"]) == set(data["ops"])
    assert {p["source"] for p in data["problems"]} == {"tuned"}
    assert all(p["kernel"] != "aten" for p in data["problems"])


_DIST_SCRIPT = """
import os, sys, json, torch, torch.distributed as dist
import torchtune_ops.runtime.ops
from torchtune_ops.runtime import dispatch
from torchtune_ops import settings
from torchtune_ops.tuning.timing import FakeTimer
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=sys.argv[2], rank=rank, world_size=2)
dispatch.set_tune_options(timer=FakeTimer({"aten": 10.0}, default=1.0))
with settings.override(autotune=True, max_trials=2, cache_dir=sys.argv[3] + f"/rank{rank}"):
    a, b = torch.randn(9, 10), torch.randn(10, 11)
    torch.testing.assert_close(torch.ops.torchtune_ops.mm(a, b), a @ b)
[p] = dispatch.stats()["problems"]
print("RESULT", json.dumps({"source": p["source"], "kernel": p["kernel"]}))
dist.destroy_process_group()
"""


def test_distributed_rank0_tunes_and_broadcasts(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHTUNE_OPS_")}
    procs = [subprocess.Popen([sys.executable, "-c", _DIST_SCRIPT, str(r), f"tcp://127.0.0.1:{port}", str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    assert results[0]["source"] == "tuned" and results[1]["source"] == "broadcast"
    assert results[0]["kernel"] == results[1]["kernel"] != "aten"


@pytest.mark.gpu
def test_reduce_overhead_cuda_graphs_match_eager(fake_timer):
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(approximate="tanh"), nn.Linear(128, 32)).cuda().eval()
    x = torch.randn(16, 64, device="cuda")
    om = torchtune_ops.optimize(m, autotune=True, max_trials=2, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(4):
            out = om(x)
        torch.testing.assert_close(out, m(x), rtol=1e-2, atol=1e-2)
    assert backend.intercepted().get("mm_act", 0) + backend.intercepted().get("addmm", 0) >= 2


@pytest.mark.gpu
def test_no_tuning_and_no_state_change_inside_cuda_graph_capture(fake_timer):
    ops = torch.ops.torchtune_ops
    a, b = torch.randn(33, 40, device="cuda"), torch.randn(40, 24, device="cuda")
    with settings.override(autotune=True, max_trials=2):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s), torch.cuda.graph(g):
            out = ops.mm(a, b)
        g.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, a @ b, rtol=1e-2, atol=1e-2)
    assert dispatch.stats()["problems"] == [] and _tuned() == 0


_NO_TRITON_SCRIPT = textwrap.dedent("""
    import io, json, logging, os, sys, torch
    sys.path.insert(0, os.environ["TEST_DIR"])
    from test_optimize import Net
    import torchtune_ops
    from torchtune_ops.runtime import backend, dispatch
    from torch._inductor.utils import run_and_get_code

    logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
    torch.manual_seed(0)
    m = Net()
    x = torch.randn(3, 3, 4, 4)
    results = {}
    for train in (False, True):
        torch._dynamo.reset()
        theirs, ours = torch.compile(m), torchtune_ops.optimize(m, autotune=True)
        m.train(train)
        if train:
            outs = []
            for model in (theirs, ours):
                m.zero_grad()
                y = model(x)
                y.square().sum().backward()
                outs.append((y.detach(), m.l1.weight.grad.clone(), m.conv.weight.grad.clone()))
            assert all(torch.equal(p, q) for p, q in zip(*outs)), "training differs from torch.compile"
        else:
            with torch.no_grad():
                ref, code_theirs = run_and_get_code(theirs, x)
                got, code_ours = run_and_get_code(ours, x)
            assert torch.equal(got, ref), (got - ref).abs().max()
            assert not any("torchtune_ops" in c for c in code_ours), "our op is in the generated code"
            assert [c.count("extern_kernels") for c in code_ours] == [c.count("extern_kernels") for c in code_theirs]
    buf = io.StringIO()
    data = torchtune_ops.explain(file=buf)
    print("RESULT", json.dumps({"intercepted": data["intercepted"], "passthrough": data["passthrough"],
                                "problems": len(data["problems"]), "text": buf.getvalue()}))
""")


def test_no_triton_device_leaves_graphs_to_inductor_unchanged(tmp_path):
    """On a CPU without TRITON_INTERPRET no Triton kernel can run: optimize() compiles as torch.compile
    (no op of ours in Inductor's code, the same results forward and backward), says so once, stores nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHTUNE_OPS_") and k != "TRITON_INTERPRET"}
    env.update(TEST_DIR=HERE, TORCHTUNE_OPS_CACHE_DIR=str(tmp_path / "cache"), TORCHTUNE_OPS_LOG="INFO")
    r = subprocess.run([sys.executable, "-c", _NO_TRITON_SCRIPT], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert data["intercepted"] == {} and data["problems"] == 0
    assert sum(data["passthrough"].values()) == 2  # one Dynamo graph for inference, one for training
    assert "left to Inductor unchanged" in data["text"]
    said = [line for line in (r.stdout + r.stderr).splitlines() if "compiled by Inductor as torch.compile" in line]
    assert len(said) == 1, said
    assert not (tmp_path / "cache" / "tuning.sqlite").exists()
