"""`runtime/` and `cli.py run` work with torch (and export/, calibration/, diffusers, transformers) unimportable."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "export", "calibration", "diffusers", "transformers", "onnx", "safetensors")

# Runs before anything else in the child: any import of a forbidden top-level package raises.
BLOCKER = f"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {FORBIDDEN!r}:
            raise ImportError("blocked in the torch-free test: " + name)
sys.meta_path.insert(0, _Block())
"""


def run_blocked(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_blocker_really_blocks():
    res = run_blocked("import torch")
    assert res.returncode != 0 and "blocked in the torch-free test: torch" in res.stderr


def test_runtime_modules_import_and_run_help_without_torch():
    modules = sorted(p.stem for p in (REPO / "runtime").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r} + ['backends', 'backends.base', 'backends.onnxruntime']:\n"
        "    importlib.import_module('runtime.' + m)\n"
        "sys.argv = ['cli.py', 'run', '--help']\n"
        "import runpy\n"
        "runpy.run_path('cli.py', run_name='__main__')\n"
    )
    res = run_blocked(code)
    assert res.returncode == 0, res.stderr
    assert "--prompt" in res.stdout and "--backend [auto|onnxruntime]" in res.stdout


def test_cli_run_end_to_end_without_torch(bundle_factory, tmp_path):
    bundle = bundle_factory("moe_t2v")
    out = tmp_path / "video.mp4"
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['cli.py', 'run', {str(bundle)!r}, '--prompt', 'a red fox', '--steps', '3', '--seed', '1',"
        f" '-o', {str(out)!r}, '--json']\n"
        "try:\n"
        "    runpy.run_path('cli.py', run_name='__main__')\n"
        "finally:\n"
        "    assert not any(m.split('.')[0] in " + repr(FORBIDDEN) + " for m in sys.modules), 'forbidden module loaded'\n"
    )
    res = run_blocked(code, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and out.is_file() and out.stat().st_size > 0


def test_no_runtime_source_imports_torch_export_or_calibration():
    """Static check over every runtime module, including imports inside functions."""
    offenders = []
    for path in sorted((REPO / "runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders
