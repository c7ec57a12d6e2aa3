"""`pip install .` (no extras) is the runtime alone: no torch, and `wanrt verify` / `wanrt run` work from it.

The project is installed for real into a fresh virtual environment (no system site-packages),
from a copy of the checkout, and run from a folder that is not the checkout, so nothing can
come from the source tree.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import av
import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def copy_checkout(dest: Path) -> Path:
    """The files git tracks (plus untracked, not ignored ones), as a clean source tree to install from."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def runtime_env(tmp_path_factory) -> Path:
    """A fresh venv holding `pip install SRC` (runtime dependencies only); returns its bin/ folder."""
    root = tmp_path_factory.mktemp("install")
    src = copy_checkout(root / "src")
    venv.EnvBuilder(with_pip=True, clear=True).create(root / "venv")
    bin_dir = root / "venv" / "bin"
    res = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", str(src)], capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return bin_dir


def test_runtime_install_has_no_torch_and_no_top_level_generic_packages(runtime_env):
    code = (
        "import importlib.util as u, json; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in "
        "['torch', 'onnx', 'safetensors', 'runtime', 'export', 'engines', 'wanrt', 'wanrt.runtime.pipeline']}))"
    )
    res = subprocess.run([str(runtime_env / "python"), "-c", code], capture_output=True, text=True, cwd="/", check=True)
    found = json.loads(res.stdout)
    assert found == {
        "torch": False, "onnx": False, "safetensors": False,
        "runtime": False, "export": False, "engines": False,
        "wanrt": True, "wanrt.runtime.pipeline": True,
    }


def test_installed_wanrt_verifies_and_runs_a_bundle(runtime_env, bundle_factory, tmp_path):
    bundle = bundle_factory("moe_t2v")
    wanrt = str(runtime_env / "wanrt")
    env = {"PATH": f"{runtime_env}:/usr/bin:/bin", "HOME": str(tmp_path), "WANRT_CACHE_DIR": str(tmp_path / "cache")}
    verify = subprocess.run([wanrt, "verify", str(bundle), "--json"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["ok"] is True

    out = tmp_path / "fox.mp4"
    run = subprocess.run(
        [wanrt, "run", str(bundle), "--prompt", "a red fox", "--steps", "2", "--seed", "3", "-o", str(out), "--json"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["steps"] == 2
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) > 0


def test_installed_wanrt_inspects_without_torch(runtime_env, tmp_path):
    """inspect reads headers with the standard library: it works from the runtime install."""
    model = tmp_path / "model"
    made = subprocess.run([sys.executable, "cli.py", "make-tiny-model", str(model), "--family", "wan2.1", "--task", "t2v"],
                          cwd=REPO, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]
    res = subprocess.run([str(runtime_env / "wanrt"), "inspect", str(model), "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (json.loads(res.stdout)["family"], json.loads(res.stdout)["task"]) == ("wan2.1", "t2v")


def test_installed_wanrt_names_the_missing_extra_for_export_commands(runtime_env, tmp_path):
    build = subprocess.run(
        [str(runtime_env / "wanrt"), "build-engine", str(tmp_path), "-o", str(tmp_path / "b")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert build.returncode == 2 and build.stderr.count("\n") == 1, build.stderr
    assert "build-engine" in build.stderr and 'pip install "wanrt[export]"' in build.stderr
    assert not (tmp_path / "b").exists()


def test_installed_packages_are_the_folders_of_the_checkout():
    """pyproject's package list names every package folder of the checkout (tests/ and bench/ excluded)."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    tracked = subprocess.run(["git", "ls-files", "*__init__.py"], cwd=REPO, capture_output=True, text=True, check=True)
    folders = {
        ".".join(["wanrt", *Path(rel).parent.parts])
        for rel in tracked.stdout.split()
        if Path(rel).parts[0] not in ("tests", "bench")
    }
    assert listed == folders
