"""`cli.py serve` on SIGTERM: no new jobs, queued ones cancelled, the running one finishes, no Ray process left.

One Ray start for the module (a t2v tiny bundle, one CPU replica); also checks that the server's
process tree listens on loopback only, but for the one socket per replica Ray Serve binds wide (authenticated).
"""

from __future__ import annotations

import socket
import time

import psutil
import pytest

from tests.runtime.serve.servers import LONG_JOB, decoded_frames, start_serve, stop_serve

pytest.importorskip("ray.serve", reason='ray[serve] is not installed (pip install "wanrt[serve]")')
grpc = pytest.importorskip("grpc", reason="grpcio (a ray[serve] dependency) is not installed")

LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def listening(processes: list[psutil.Process]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of `processes`."""
    found = []
    for p in processes:
        try:
            found += [(c.laddr.ip, c.laddr.port, p.name()) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return found


def unauthenticated_call(port: int) -> grpc.StatusCode:
    """The status of a call to a Serve replica's gRPC server made without Ray's auth token."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest", request_serializer=bytes, response_deserializer=bytes)
        try:
            call(b"", timeout=30)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def alive(processes: list[psutil.Process]) -> list[str]:
    """Those of `processes` still running (same pid and start time), described."""
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigterm_drains_then_leaves_no_ray_process(t2v_bundle, tmp_path):
    server = start_serve(t2v_bundle, tmp_path, "--replicas", "1")
    try:
        tree = process_tree(server.proc.pid)
        session = server.info["ray_session_dir"]
        assert session and server.info["ray_started_here"] and len(tree) > 5, server.info
        sockets = listening(tree)
        assert any(name == "gcs_server" for _, _, name in sockets) and any(name == "raylet" for _, _, name in sockets)
        wide = [(port, name) for ip, port, name in sockets if ip not in LOOPBACK]
        # Ray Serve 2.60 binds each replica's inter-deployment gRPC server to "[::]:0" (hard-coded in
        # ray/serve/_private/replica.py); it is the only one, and it refuses calls without Ray's auth token
        assert sorted(name for _, name in wide) == ["ray::ServeReplica:wanrt:Api", "ray::ServeReplica:wanrt:Generator"], sockets
        for port, _ in wide:
            assert unauthenticated_call(port) == grpc.StatusCode.UNAUTHENTICATED

        running = server.submit({**LONG_JOB, "seed": 1, "steps": 400})
        server.running(running)
        queued = server.submit({"prompt": "a cat", "seed": 2})
        assert server.job(queued)["status"] == "queued"  # the one replica is busy

        server.terminate()
        deadline = time.monotonic() + 60
        while server.request("GET", "/healthz").status != 503:  # draining
            assert time.monotonic() < deadline and server.proc.poll() is None, server.stderr()
            time.sleep(0.05)
        refused = server.request("POST", "/v1/videos", {"prompt": "a cat"})
        assert refused.status == 503 and "shutting down" in refused.json()["error"]["message"]
        view = server.job(queued)
        assert view["status"] == "cancelled" and "shutting down" in view["error"]
        assert server.job(running)["status"] in ("running", "done")
    finally:
        code = stop_serve(server)
    assert code == 0, server.stderr()

    frames = decoded_frames(server.output_dir / f"{running}.mp4")  # the running job finished, whole
    assert frames.shape == (5, 32, 48, 3)
    assert not (server.output_dir / f"{queued}.mp4").exists()
    deadline = time.monotonic() + 30  # ray.shutdown has returned; give the kernel a moment to reap
    while (left := alive(tree)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    mentioning = [p.pid for p in psutil.process_iter(["cmdline"]) if any(session in a for a in (p.info["cmdline"] or []))]
    assert not mentioning, mentioning
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) != 0  # nothing listens on the port
