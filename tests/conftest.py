"""Suite-wide: `wanrt` is this checkout; remembered digests go to a temporary cache, never ~/.cache/wanrt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import cli  # noqa: F401  (binds the package name `wanrt` to this checkout, ahead of an installed copy)


@pytest.fixture(scope="session", autouse=True)
def private_digest_cache(tmp_path_factory):
    old = os.environ.get("WANRT_CACHE_DIR")
    os.environ["WANRT_CACHE_DIR"] = str(tmp_path_factory.mktemp("wanrt-cache"))
    yield
    if old is None:
        os.environ.pop("WANRT_CACHE_DIR", None)
    else:
        os.environ["WANRT_CACHE_DIR"] = old


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
