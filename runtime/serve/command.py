"""`cli.py serve BUNDLE`: the bundle behind an HTTP API on Ray Serve, until Ctrl-C or SIGTERM.

Without `--address` a local Ray instance starts on loopback and stops with the command (no
Ray process outlives it); with `--address auto` (or `ray://HOST:PORT`) the command joins an
existing cluster, deploys there, and removes only its own application when it stops.  Ctrl-C
or SIGTERM stops taking jobs, cancels the queued ones, lets the running ones finish within
`--drain-timeout` (then asks them to stop at their next step), and shuts down.
"""

from __future__ import annotations

import importlib.machinery
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from wanrt.engines.errors import WanrtError
from wanrt.engines.limits import MEMORY_BUDGET_GIB
from wanrt.engines.manifest import verify_bundle
from wanrt.engines.options import InRange

from ..backends import BACKENDS

STOP_AFTER_DRAIN_SECONDS = 30  # how long jobs asked to stop (at their next step) get after the drain limit
# Ray reads this when it is imported: "0" makes a single-node instance whose node address is 127.0.0.1,
# so that its GCS, raylet, workers and agents listen on loopback only.  (Ray 2.60 turns
# `_node_ip_address="127.0.0.1"` into the machine's routable address and then listens on every interface.)
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(frozen=True)
class ServeOptions:
    """The command's options, checked."""

    bundle: Path
    name: str = "wanrt"
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int | None = None  # None: one per GPU, or 1 on CPUs
    max_queue: int = 32
    output_dir: Path = Path("wanrt-videos")
    address: str | None = None  # None: start Ray here on loopback
    backend: str = "auto"
    vram_budget_gib: float | None = None  # `run`'s --vram-budget, per replica
    retention_hours: float = 24.0
    drain_timeout: float = 300.0


def worker_pythonpath(folder: Path) -> str | None:
    """A PYTHONPATH under which Ray's workers import the `wanrt` this process runs (a checkout); None when installed."""
    import wanrt

    root = Path(wanrt.__file__).resolve().parent
    spec = importlib.machinery.PathFinder.find_spec("wanrt")
    if spec is not None and spec.origin and Path(spec.origin).resolve().parent == root:
        return None
    (folder / "wanrt").symlink_to(root, target_is_directory=True)
    return os.pathsep.join([str(folder)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))


def use_loopback_only() -> None:
    """Make the Ray this process starts a loopback-only, single-node instance (before Ray is imported)."""
    os.environ[SINGLE_NODE_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(f"ray was imported before serve could set {SINGLE_NODE_ENV}=0; it would listen on every interface")


def deploy_failure(error: str, app: str) -> str:
    """Why Ray Serve could not deploy `app`: our own error's message when a replica raised one, else Serve's."""
    from ray import serve

    try:
        status = serve.status().applications[app]
        text = "\n".join([status.message, *(d.message for d in status.deployments.values())])
    except Exception:  # noqa: BLE001 - the status is a better message when there is one, never a new failure
        text = error
    ours = re.findall(r"wanrt\.[\w.]+Error: (.+)", text)
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    return ours[-1] if ours else lines[-1] if lines else error


def check_port_free(host: str, port: int) -> None:
    """WanrtError when nothing can listen on host:port here (taken, or not an address of this machine)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise WanrtError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


def check_output_dir(folder: Path) -> Path:
    """The absolute output folder, created if absent; WanrtError when it cannot be written."""
    folder = folder.absolute()
    if folder.exists() and not folder.is_dir():
        raise WanrtError(f"--output-dir {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WanrtError(f"--output-dir {folder}: cannot create it ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise WanrtError(f"--output-dir {folder}: not writable")
    return folder


def replica_resources(cluster: dict[str, float], nodes: list[dict[str, Any]], replicas: int | None) -> tuple[int, float, float]:
    """(replicas, CPUs each, GPUs each): one GPU per replica when the cluster has GPUs, else its CPUs shared out."""
    gpus = int(cluster.get("GPU", 0))
    if gpus:
        return (replicas or gpus), 1.0, 1.0
    replicas = replicas or 1
    largest_node = max((n.get("Resources", {}).get("CPU", 0) for n in nodes if n.get("Alive")), default=1)
    return replicas, float(max(1, min(largest_node, math.floor(cluster.get("CPU", 1) / replicas)))), 0.0


class ServeSession:
    """A running `serve`: Ray (started here or joined), the job board, the application."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.started_ray = options.address is None
        self.board = None
        self.info: dict[str, Any] = {}
        self._path_dir = Path(tempfile.mkdtemp(prefix="wanrt-serve-"))

    @classmethod
    def start(cls, options: ServeOptions) -> "ServeSession":
        session = cls(options)
        try:
            session._start()
        except BaseException:
            session.close()
            raise
        return session

    def _start(self) -> None:
        if self.started_ray:
            use_loopback_only()
        import ray
        from ray import serve
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .app import NAMESPACE, AppConfig, JobBoard, build_app

        o = self.options
        pythonpath = worker_pythonpath(self._path_dir)
        runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}} if pythonpath else {}
        if self.started_ray:
            cpus = os.cpu_count() or 1
            ray.init(address="local", include_dashboard=False, num_cpus=max(cpus, o.replicas or 1), namespace=NAMESPACE,
                     logging_level="WARNING")  # fmt: skip
        else:
            ray.init(address=o.address, namespace=NAMESPACE, logging_level="WARNING")
        replicas, cpus_each, gpus_each = replica_resources(ray.cluster_resources(), ray.nodes(), o.replicas)
        config = AppConfig(
            name=o.name, bundle=str(o.bundle.absolute()), backend=o.backend,
            memory_budget_bytes=int(o.vram_budget_gib * 2**30) if o.vram_budget_gib is not None else None,
            replicas=replicas, cpus_per_replica=cpus_each, gpus_per_replica=gpus_each, runtime_env=runtime_env,
        )  # fmt: skip
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.board = JobBoard.options(
            name=config.board_name, namespace=NAMESPACE, scheduling_strategy=here, runtime_env=runtime_env
        ).remote(str(o.output_dir), o.max_queue, o.retention_hours * 3600, replicas)
        ray.get(self.board.call.remote("counts"))  # it is up
        quiet = {"log_level": "WARNING", "enable_access_log": False}
        serve.start(http_options={"host": o.host, "port": o.port}, proxy_location="HeadOnly", logging_config=quiet)
        try:
            serve.run(build_app(config), name=o.name, route_prefix="/", blocking=False, logging_config=quiet)
        except RuntimeError as e:  # a replica that cannot start (the bundle missing on its machine, ...)
            raise WanrtError(f"Ray Serve could not start {o.name!r}: {deploy_failure(str(e), o.name)}") from None
        node = getattr(ray._private.worker, "_global_node", None)
        self.info = {
            "url": f"http://{o.host}:{o.port}", "name": o.name, "bundle": config.bundle, "replicas": replicas,
            "cpus_per_replica": cpus_each, "gpus_per_replica": gpus_each, "backend": o.backend,
            "output_dir": str(o.output_dir), "max_queue": o.max_queue, "ray_started_here": self.started_ray,
            "ray_session_dir": node.get_session_dir_path() if node is not None else None,
        }  # fmt: skip

    def drain(self, timeout: float) -> dict[str, int]:
        """Stop taking jobs, cancel the queued ones, wait for the running ones (then ask them to stop); the final counts."""
        import ray

        counts = ray.get(self.board.call.remote("drain"))
        for limit, ask_to_stop in ((timeout, False), (STOP_AFTER_DRAIN_SECONDS, True)):
            if ask_to_stop and counts["running"]:
                ray.get(self.board.call.remote("stop_running"))
            deadline = time.monotonic() + limit
            while counts["running"] and time.monotonic() < deadline:
                time.sleep(0.2)
                counts = ray.get(self.board.call.remote("counts"))
        return counts

    def close(self) -> None:
        """Remove the application (and, if Ray started here, stop Ray: no Ray process is left)."""
        try:
            import ray

            if ray.is_initialized():
                from ray import serve

                try:
                    if self.started_ray:
                        serve.shutdown()
                    else:
                        serve.delete(self.options.name)
                        if self.board is not None:
                            ray.kill(self.board)
                finally:
                    ray.shutdown()
        finally:
            shutil.rmtree(self._path_dir, ignore_errors=True)


def wait_for_stop() -> None:
    """Block until SIGINT or SIGTERM; a second one raises KeyboardInterrupt (stop now, no drain)."""
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    while not stop.wait(0.5):
        pass


@click.command("serve")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--name", default="wanrt", show_default=True, help="Name of the Ray Serve application (and the model id).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP API listens on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="HTTP port.")
@click.option("--replicas", type=click.IntRange(min=1), default=None, help="Generator replicas (default: one per GPU, or 1 on CPUs).")
@click.option("--max-queue", type=click.IntRange(min=0), default=32, show_default=True, help="Jobs that may wait for a busy replica; beyond that 429.")
@click.option("--output-dir", type=click.Path(), default="wanrt-videos", show_default=True,
              help="Where finished mp4s are kept (on the machine running serve).")  # fmt: skip
@click.option("--address", default=None, help="Join a Ray cluster (auto, HOST:PORT or ray://HOST:PORT); default: start Ray here on loopback.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help="Inference backend (as run's --backend).")
@click.option("--vram-budget", type=InRange(MEMORY_BUDGET_GIB), default=None, metavar="GIB",
              help="GiB each replica's engines may occupy (as run's --vram-budget); default: 90% of free memory.")  # fmt: skip
@click.option("--retention", type=click.FloatRange(min=0), default=24.0, show_default=True, metavar="HOURS",
              help="How long finished jobs and their mp4s are kept.")  # fmt: skip
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=300.0, show_default=True, metavar="SECONDS",
              help="On Ctrl-C/SIGTERM, how long running jobs may take to finish.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the server's address and settings as one JSON line.")
def serve_command(
    bundle: str, name: str, host: str, port: int, replicas: int | None, max_queue: int, output_dir: str,
    address: str | None, backend: str, vram_budget: float | None, retention: float, drain_timeout: float, as_json: bool,
) -> None:
    """Serve a bundle over HTTP on Ray Serve (POST /v1/videos, GET /v1/videos/{id}[/content], DELETE, /healthz, /v1/models)."""
    if address is None or not address.startswith("ray://"):  # through ray:// the bundle is on the cluster
        verify_bundle(bundle, remembered=True)  # a bad bundle is one line and exit 2, before Ray starts
    if address is None:
        check_port_free(host, port)
    options = ServeOptions(
        Path(bundle), name, host, port, replicas, max_queue, check_output_dir(Path(output_dir)), address, backend,
        vram_budget, retention, drain_timeout,
    )  # fmt: skip
    session = ServeSession.start(options)
    try:
        if as_json:
            click.echo(json.dumps(session.info), nl=True)
        else:
            i = session.info
            kind = f"{i['replicas']} GPU replica(s)" if i["gpus_per_replica"] else f"{i['replicas']} CPU replica(s)"
            click.echo(f"serving {i['bundle']} at {i['url']} ({kind}); Ctrl-C or SIGTERM to stop")
        wait_for_stop()
        click.echo("stopping: no new jobs; waiting for running ones", err=True)
        counts = session.drain(drain_timeout)
        if counts["running"]:
            click.echo(f"warning: {counts['running']} job(s) still running at shutdown", err=True)
    finally:
        session.close()
    click.echo("stopped", err=True)

