"""`runtime/` and `cli.py run` work with torch (and export/, calibration/, diffusers, transformers) unimportable."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "wanrt.export", "wanrt.calibration", "diffusers", "transformers", "onnx", "safetensors")


def forbidden(name: str) -> bool:
    """Whether module `name` is one of FORBIDDEN or inside one."""
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


# Runs before anything else in the child: any import of a forbidden package raises.
BLOCKER = f"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == f or name.startswith(f + ".") for f in {FORBIDDEN!r}):
            raise ImportError("blocked in the torch-free test: " + name)
sys.meta_path.insert(0, _Block())
import cli  # binds `wanrt` to the checkout
"""


def run_blocked(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_blocker_really_blocks():
    res = run_blocked("import torch")
    assert res.returncode != 0 and "blocked in the torch-free test: torch" in res.stderr
    res = run_blocked("import wanrt.export.checkpoint.keys")
    assert res.returncode != 0 and "blocked in the torch-free test: wanrt.export" in res.stderr


def test_runtime_modules_import_and_run_help_without_torch():
    modules = sorted(p.stem for p in (REPO / "runtime").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r} + ['backends', 'backends.base', 'backends.onnxruntime', 'backends.tensorrt']:\n"
        "    importlib.import_module('wanrt.runtime.' + m)\n"
        "sys.argv = ['cli.py', 'run', '--help']\n"
        "import runpy\n"
        "runpy.run_path('cli.py', run_name='__main__')\n"
    )
    res = run_blocked(code)
    assert res.returncode == 0, res.stderr
    assert "--prompt" in res.stdout and "--backend [auto|onnxruntime|tensorrt]" in res.stdout


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
        "    assert not [m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in " + repr(FORBIDDEN) + ")], 'forbidden module loaded'\n"
    )
    res = run_blocked(code, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and out.is_file() and out.stat().st_size > 0


def imported_names(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, a module of `package`; relative imports resolved."""
    package = package.split(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, f"{module}.{a.name}" if not node.module else module) for a in node.names]
    return found


def package_of(path: Path) -> str:
    """The dotted package a checkout file belongs to once installed (runtime/backends/x.py -> wanrt.runtime.backends)."""
    return ".".join(["wanrt", *path.parent.relative_to(REPO).parts])


def test_import_resolution_sees_relative_imports(tmp_path):
    """The static check's own harness: relative imports are resolved, and one reaching export/ is caught."""
    fake = tmp_path / "probe.py"
    fake.write_text("from ..export.checkpoint import keys\nfrom . import video\nimport torch.nn\nfrom wanrt.engines import errors\n")
    names = [n for _, n in imported_names(fake, "wanrt.runtime.backends")]
    assert names == ["wanrt.runtime.export.checkpoint", "wanrt.runtime.backends.video", "torch.nn", "wanrt.engines"]
    names = [n for _, n in imported_names(fake, "wanrt.runtime")]
    assert names[0] == "wanrt.export.checkpoint" and [forbidden(n) for n in names] == [True, False, True, False]


def test_no_runtime_source_imports_torch_export_or_calibration():
    """Static check over every runtime module, including imports inside functions."""
    offenders = [
        f"{path.relative_to(REPO)}:{line} {name}"
        for path in sorted((REPO / "runtime").rglob("*.py"))
        for line, name in imported_names(path, package_of(path))
        if forbidden(name)
    ]
    assert not offenders, offenders
