"""A real `cli.py serve` process on loopback for the HTTP tests, and a bounded HTTP client for it.

Every wait here has a deadline; every server listens on 127.0.0.1 (the default --host).
"""

from __future__ import annotations

import base64
import io
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
START_TIMEOUT = 300  # seconds for Ray + Serve + replicas to come up on a loaded 2-core machine
# a job that runs long enough to be seen running, queued behind others and cancelled (each step reports to the board)
LONG_JOB = {"prompt": "a red fox runs in snow", "steps": 1000}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(seed: int, height: int = 40, width: int = 56) -> bytes:
    """A random RGB PNG."""
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decoded_frames(mp4: bytes | Path) -> np.ndarray:
    """Every frame of an mp4 as uint8 [T, H, W, 3], decoded with PyAV."""
    import av

    source = io.BytesIO(mp4) if isinstance(mp4, bytes) else str(mp4)
    with av.open(source) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ServeProcess:
    """A running `cli.py serve --json` and its printed settings."""

    proc: subprocess.Popen
    info: dict[str, Any]
    stderr_path: Path
    output_dir: Path
    lines: queue.Queue = field(default_factory=queue.Queue)
    terminated: bool = False

    def terminate(self) -> None:
        """SIGTERM, once (a second one means "stop now, no drain")."""
        if not self.terminated and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.terminated = True

    @property
    def url(self) -> str:
        return self.info["url"]

    def request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Reply:
        data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
        except urllib.error.HTTPError as e:
            return Reply(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())

    def submit(self, body: dict[str, Any]) -> str:
        reply = self.request("POST", "/v1/videos", body)
        assert reply.status == 202, (reply.status, reply.body[:500])
        return reply.json()["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        reply = self.request("GET", f"/v1/videos/{job_id}")
        assert reply.status == 200, (reply.status, reply.body[:500])
        return reply.json()

    def wait(self, job_id: str, until, timeout: float = 120, poll: float = 0.1) -> dict[str, Any]:
        """Poll the job until `until(view)` holds; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.job(job_id)
            if until(view):
                return view
            assert time.monotonic() < deadline, f"job {job_id} still {view['status']} after {timeout} s: {view}"
            time.sleep(poll)

    def finished(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        return self.wait(job_id, lambda v: v["status"] in ("done", "failed", "cancelled"), timeout)

    def running(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        """Wait until the job runs its denoising steps (fails if it ends first)."""
        view = self.wait(job_id, lambda v: v["status"] != "queued" and (v["status"] != "running" or v["progress"]["step"] >= 1), timeout)
        assert view["status"] == "running", view
        return view

    def idle(self, timeout: float = 120) -> None:
        """Wait until no job is queued or running."""
        deadline = time.monotonic() + timeout
        while (health := self.request("GET", "/healthz").json())["queued"] or health["running"]:
            assert time.monotonic() < deadline, f"server still busy after {timeout} s: {health}"
            time.sleep(0.1)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]


def start_serve(bundle: Path, folder: Path, *args: str) -> ServeProcess:
    """Start `cli.py serve BUNDLE --json` on a free loopback port; return once it printed its settings."""
    folder.mkdir(parents=True, exist_ok=True)
    stderr_path = folder / "serve.stderr"
    out = folder / "videos"
    cmd = [sys.executable, "cli.py", "serve", str(bundle), "--port", str(free_port()), "--output-dir", str(out), "--json", *args]
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            pytest.fail(f"serve did not start in {START_TIMEOUT} s:\n{stderr_path.read_text()[-4000:]}")
        if line.startswith("{"):
            info = json.loads(line)
            return ServeProcess(proc, info, stderr_path, out, lines)
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}:\n{stderr_path.read_text()[-4000:]}")


def stop_serve(server: ServeProcess, timeout: float = 180) -> int:
    """SIGTERM (a graceful stop) unless sent already, and wait for the process; its exit code."""
    server.terminate()
    try:
        return server.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=30)
        pytest.fail(f"serve did not stop within {timeout} s of SIGTERM:\n{server.stderr()}")

