"""Test set-up. TRITON_INTERPRET must be set before any kernel module is imported (Triton reads it when a
kernel is decorated), so it is set here, at the top of the first module pytest imports."""
import os

# Inductor's C++ kernels on CPU (what Inductor compiles here, where a GPU would get Triton kernels) are built
# without the vector ISA: the same kernels, scalar, in half the compile time (a cold graph of test_backend's
# Net: 21 s -> 14 s). Read when torch._inductor.config is imported; subprocesses inherit it.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests never touch the user's real cache or tune behind their back.
for _k in list(os.environ):
    if _k.startswith("TORCHTUNE_OPS_"):
        del os.environ[_k]

import pytest  # noqa: E402

DEVICE = "cuda" if _HAS_CUDA else "cpu"


@pytest.fixture
def device():
    """The device the kernel tests run on: the GPU when there is one, else CPU through the interpreter."""
    return DEVICE


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache directory."""
    monkeypatch.setenv("TORCHTUNE_OPS_CACHE_DIR", str(tmp_path / "cache"))
    from torchtune_ops import settings

    settings.reload()
    yield
    settings.reload()


@pytest.fixture
def ops_stay(tmp_path, monkeypatch):
    """Keep our ops in compiled graphs with tuning off: with nothing cached and nothing to record, the
    backend leaves an op to Inductor (PyTorch's kernel would serve it all along); recording unseen problems
    (TORCHTUNE_OPS_RECORD) is a configuration in which the first call must reach our op."""
    monkeypatch.setenv("TORCHTUNE_OPS_RECORD", str(tmp_path / "recorded.jsonl"))
    from torchtune_ops import settings

    settings.reload()
    yield str(tmp_path / "recorded.jsonl")
    settings.reload()


@pytest.fixture
def fresh_runtime():
    """No compiled graphs, in-memory choices, counts or tune options before the test, and none left after."""
    import torch

    from torchtune_ops.runtime import backend, dispatch

    torch._dynamo.reset()
    backend.reset_counts()
    dispatch.reset()
    dispatch.set_tune_options(timer=None)
    yield
    torch._dynamo.reset()
    dispatch.reset()
    dispatch.set_tune_options(timer=None)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
