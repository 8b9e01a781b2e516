"""The layers hold: import-linter's contracts in pyproject.toml (layers, independence, no cycles) pass.

An upward import (say, storage importing the runtime) or a cycle between sibling modules fails this test,
and so CI. docs/architecture.md describes the layers.
"""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _lint(*args: str) -> subprocess.CompletedProcess:
    lint = pathlib.Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("lint-imports is missing: install the test extra (pip install -e '.[test]')")
    return subprocess.run([str(lint), "--no-cache", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_kept():
    r = _lint()
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    # The same contracts over a copy of the package with one upward import added must fail: the check
    # really looks at the code.
    import shutil

    pkg = tmp_path / "torchtune_ops"
    shutil.copytree(ROOT / "torchtune_ops", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    store = pkg / "storage" / "store.py"
    store.write_text(store.read_text() + "\n\ndef _bad():\n    from ..runtime import dispatch  # noqa\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lint = pathlib.Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0
    assert "torchtune_ops.storage.store" in r.stdout and "torchtune_ops.runtime" in r.stdout
