"""`cli.py serve` before Ray starts: the missing extra, bad options (one line, exit 2), and the settings it derives."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import cli
from wanrt.runtime.serve.command import replica_resources, worker_pythonpath

REPO = Path(__file__).resolve().parents[3]


def python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_without_ray_serve_exits_2_naming_the_extra(bundle_factory):
    bundle = bundle_factory("moe_t2v")
    res = python(f"import sys; sys.modules['ray'] = None\nimport cli\nsys.argv = ['cli.py', 'serve', {str(bundle)!r}]\ncli.main()")
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == "error: 'serve' needs ray, not installed here: pip install \"wanrt[serve]\""


def serve(*args: str):
    return CliRunner().invoke(cli, ["serve", *map(str, args)])


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_bad_bundle_is_one_line_before_ray_starts(tmp_path):
    (tmp_path / "not-a-bundle").mkdir()
    line = one_error_line(serve(tmp_path / "not-a-bundle", "--output-dir", tmp_path / "out"))
    assert "not-a-bundle" in line and "manifest" in line
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


def test_a_taken_port_and_a_file_as_output_folder_are_one_line(bundle_factory, tmp_path):
    bundle = bundle_factory("moe_t2v")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(serve(bundle, "--port", port, "--output-dir", tmp_path / "out"))
    assert line.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen there")
    (tmp_path / "file").write_text("x")
    assert "--output-dir" in one_error_line(serve(bundle, "--output-dir", tmp_path / "file"))


def test_replicas_get_one_gpu_each_or_share_the_cpus():
    node = lambda cpus, gpus=0: {"Alive": True, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}  # noqa: E731
    assert replica_resources({"CPU": 32, "GPU": 4}, [node(32, 4)], None) == (4, 1.0, 1.0)  # one per GPU by default
    assert replica_resources({"CPU": 32, "GPU": 4}, [node(32, 4)], 2) == (2, 1.0, 1.0)
    assert replica_resources({"CPU": 2}, [node(2)], None) == (1, 2.0, 0.0)
    assert replica_resources({"CPU": 2}, [node(2)], 2) == (2, 1.0, 0.0)
    assert replica_resources({"CPU": 2}, [node(2)], 3) == (3, 1.0, 0.0)  # at least one CPU each
    assert replica_resources({"CPU": 16}, [node(8), node(8)], 1) == (1, 8.0, 0.0)  # no more than one machine has


def test_workers_import_this_checkout_through_the_pythonpath_serve_gives_them(tmp_path):
    pythonpath = worker_pythonpath(tmp_path)
    assert pythonpath is not None and pythonpath.split(":")[0] == str(tmp_path)  # a checkout, not an installed wanrt
    res = subprocess.run([sys.executable, "-c", "import wanrt.runtime.serve.jobs as j, os; print(os.path.realpath(j.__file__))"],
                         cwd=tmp_path, env={"PYTHONPATH": pythonpath, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str((REPO / "runtime" / "serve" / "jobs.py").resolve())


def test_a_local_ray_is_single_node_on_loopback():
    """What `serve` sets before importing ray makes Ray pick 127.0.0.1 as its node address (checked without starting it)."""
    pytest.importorskip("ray", reason='ray[serve] is not installed (pip install "wanrt[serve]")')
    res = python("import cli\nfrom wanrt.runtime.serve.command import use_loopback_only\nuse_loopback_only()\n"
                 "from ray._private import services\nprint(services.get_node_ip_address())")  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == "127.0.0.1", res.stderr
