"""Suite-wide: `wanrt` is this checkout; remembered digests and traced graphs go to a temporary cache, never
~/.cache/wanrt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

import cli  # noqa: F401  (binds the package name `wanrt` to this checkout, ahead of an installed copy)


def pytest_configure(config):
    """One temporary wanrt cache for the whole run, set before collection (modules that copy os.environ at import
    see it) and inherited by the xdist workers: remembered digests, and the traced-graph cache
    (`export.onnx.graph_cache`), which the workers and the builds they start share, so each tiny architecture is
    traced once per run (tests that need a fresh trace turn it off or point it elsewhere)."""
    if "PYTEST_XDIST_WORKER" in os.environ or "WANRT_TEST_CACHE" in os.environ:
        return  # a worker: the controller made it
    root = tempfile.mkdtemp(prefix="wanrt-test-cache-")
    os.environ.update(WANRT_TEST_CACHE=root, WANRT_CACHE_DIR=root, WANRT_GRAPH_CACHE=os.path.join(root, "graphs"))
    config.wanrt_test_cache = root


def pytest_unconfigure(config):
    root = getattr(config, "wanrt_test_cache", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)
        for name in ("WANRT_TEST_CACHE", "WANRT_CACHE_DIR", "WANRT_GRAPH_CACHE"):
            os.environ.pop(name, None)


# Runs `python cli.py ARGS` in this child process, then prints its exit code and the modules it imported
# (beyond what the interpreter's start-up imported: site hooks of installed packages load some).
_CLI_MODULES = """
import json, runpy, sys
before = set(sys.modules)
sys.argv = ["cli.py", *json.loads(sys.argv[1])]
code = 0
try:
    runpy.run_path("cli.py", run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
print()
print(json.dumps({"exit": code, "modules": sorted(set(sys.modules) - before)}))
"""


@pytest.fixture(scope="session")
def cli_modules() -> Callable[..., tuple[int, set[str]]]:
    """`cli_modules(*args)` -> (exit code, modules it imported) of a fresh `python cli.py ARGS` process."""
    repo = Path(__file__).resolve().parents[1]

    def run(*args) -> tuple[int, set[str]]:
        out = subprocess.run([sys.executable, "-c", _CLI_MODULES, json.dumps([str(a) for a in args])],
                             cwd=repo, capture_output=True, text=True, timeout=300)
        assert out.stdout.strip(), out.stderr[-2000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        return result["exit"], set(result["modules"])

    return run


@pytest.fixture(scope="session")
def stub_folder(tmp_path_factory) -> Path:
    """The stand-in TensorRT libraries (`tests/trt_stub.py`) that let the real bindings import; skips when they cannot be made."""
    from tests.trt_stub import build_stub_libraries, missing_prerequisite

    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    return build_stub_libraries(tmp_path_factory.mktemp("nvinfer-stub"))
