"""The Ray Serve application of `cli.py serve`: the job board, the Generator replicas, the HTTP front.

    HTTP -> Api (one replica, FastAPI)  validates with the pipeline's `prepare` (as `run` does),
            |                           queues on the board, hands the job to a Generator replica
            v
         JobBoard (a Ray actor on the `serve` machine)  the JobTable: states, progress, mp4 files
            ^
            |  start / progress (each step: the cancel check) / finish / fail
         Generator (N replicas, one job at a time each; one GPU each when the cluster has GPUs)
                                        verifies the bundle once, keeps its engines loaded

Serve's router holds the jobs waiting for a free replica; the board counts them for `--max-queue`.
A replica that dies fails the job it was running (its response raises in `Api._watch`); Serve
starts a new one and the others go on serving.
"""

# no `from __future__ import annotations` here: FastAPI reads the route signatures' types at run time
import asyncio
import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import RequestCancelledError

from wanrt.engines.errors import BundleError, WanrtError
from wanrt.engines.manifest import verify_bundle

from ..backends import make_backend
from ..animate import pipeline_class
from ..progress import Progress
from ..video import to_uint8_frames, write_mp4
from .api import MAX_BODY_BYTES, error_body, materialize, model_card, parse_body
from .jobs import JobTable
from .resident import KeepLoaded, replica_backend

NAMESPACE = "wanrt"  # the Ray namespace of the job board


@dataclass(frozen=True)
class AppConfig:
    """What the deployments need to know (travels to every replica)."""

    name: str
    bundle: str  # absolute; the same path on every machine that runs a replica
    backend: str
    memory_budget_bytes: int | None
    replicas: int
    cpus_per_replica: float
    gpus_per_replica: float
    runtime_env: dict[str, Any]

    @property
    def board_name(self) -> str:
        return f"{self.name}-jobs"


@ray.remote(num_cpus=0)
class JobBoard:
    """The JobTable as a Ray actor; its methods run one at a time."""

    def __init__(self, output_dir: str, max_queue: int, retention_seconds: float, replicas: int) -> None:
        self.table = JobTable(output_dir, max_queue, retention_seconds, replicas)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.table, method)(*args)


def board(config: AppConfig):
    return ray.get_actor(config.board_name, namespace=NAMESPACE)


class JobStopped(Exception):
    """Raised from the progress callback when the job was cancelled: the pipeline stops at that step."""


@serve.deployment(max_ongoing_requests=1, graceful_shutdown_timeout_s=5, max_constructor_retry_count=2)
class Generator:
    """One replica: the verified bundle, its engines, one job at a time."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        manifest = verify_bundle(config.bundle, remembered=True)  # once per replica, at start
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        threads = int(cpus) if not config.gpus_per_replica and cpus >= 1 else 0
        backend = make_backend(config.backend, threads=threads)
        budget = config.memory_budget_bytes
        if budget is None:
            budget = backend.default_budget_bytes()  # as `run`'s default, taken once
        self.backend = replica_backend(backend, manifest, config.bundle, budget)
        self.pipeline = pipeline_class(manifest.task)(config.bundle, manifest, self.backend, budget, progress=Progress(enabled=False))
        self.board = board(config)
        self.worker = {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "backend": backend.describe(),
            "engines": "kept loaded" if isinstance(self.backend, KeepLoaded) else "loaded per stage",
        }

    async def run(self, job_id: str, fields: dict[str, Any], images: dict[str, bytes]) -> None:
        await asyncio.to_thread(self._run, job_id, fields, images)

    def _report(self, job_id: str, stage: str, step: int, steps: int) -> None:
        if not ray.get(self.board.call.remote("progress", job_id, stage, step, steps)):
            raise JobStopped(job_id)

    def _run(self, job_id: str, fields: dict[str, Any], images: dict[str, bytes]) -> None:
        if not ray.get(self.board.call.remote("start", job_id, self.worker)):
            return  # cancelled while it waited
        try:
            with tempfile.TemporaryDirectory(prefix="wanrt-job-") as tmp:
                plan = self.pipeline.prepare(materialize(fields, images, tmp))
                result = self.pipeline.generate(plan, on_progress=lambda *a: self._report(job_id, *a))
                self._report(job_id, "write", 0, 0)
                start = time.perf_counter()
                out = Path(tmp) / "video.mp4"
                write_mp4(to_uint8_frames(result.video), out, plan.fps)
                video = out.read_bytes()
            stages = {**result.stats.stages, "write": time.perf_counter() - start}
            ray.get(self.board.call.remote("finish", job_id, video, stages))
        except JobStopped:
            ray.get(self.board.call.remote("stopped", job_id))
        except WanrtError as e:
            ray.get(self.board.call.remote("fail", job_id, str(e)))
        except Exception as e:  # noqa: BLE001 - the job fails with the reason; the replica goes on serving
            ray.get(self.board.call.remote("fail", job_id, f"{type(e).__name__}: {e}"))

    def __del__(self) -> None:
        if isinstance(getattr(self, "backend", None), KeepLoaded):
            self.backend.close()


# Serve pickles the FastAPI app when `serve.ingress` decorates Api: what its routes use must be defined above it.
http = FastAPI(title="wanrt serve", docs_url=None, redoc_url=None)


def _unknown(job_id: str) -> Response:
    return JSONResponse({"error": {"field": "id", "message": f"no job {job_id!r} (unknown, deleted or expired)"}}, 404)


@serve.deployment(max_ongoing_requests=256, graceful_shutdown_timeout_s=5, ray_actor_options={"num_cpus": 0})
@serve.ingress(http)
class Api:
    """The HTTP front: validation before queueing, the job board behind every route."""

    def __init__(self, generator, config: AppConfig) -> None:
        self.config = config
        self.manifest = verify_bundle(config.bundle, remembered=True)
        self.planner = pipeline_class(self.manifest.task)(config.bundle, self.manifest, None)  # plans (validates), never generates
        self.board = board(config)
        self.generator = generator
        self.waiting: dict[str, Any] = {}  # job id -> its DeploymentResponse, until it ends
        self.watchers: set[asyncio.Task] = set()  # the tasks awaiting those responses (held, or they may be collected)

    async def _board(self, method: str, *args: Any) -> Any:
        return await self.board.call.remote(method, *args)

    def _plan(self, fields: dict[str, Any], images: dict[str, bytes]) -> tuple[dict[str, Any], dict[str, Any]] | Response:
        """Validate as `run` does: the fields with the seed resolved (the replica plans the same) and the
        plan's summary, or the error response (400 for the request, 500 for the bundle)."""
        with tempfile.TemporaryDirectory(prefix="wanrt-request-") as tmp:
            try:
                plan = self.planner.prepare(materialize(fields, images, tmp))
            except WanrtError as e:
                return JSONResponse(error_body(e, tmp), 500 if isinstance(e, BundleError) else 400)
        return {**fields, "seed": plan.seed}, plan.summary()

    @http.post("/v1/videos")
    async def create(self, request: Request) -> Response:
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return JSONResponse({"error": {"field": "body", "message": f"request body over {MAX_BODY_BYTES} bytes"}}, 413)
        try:
            fields, images = parse_body(await request.body())
        except WanrtError as e:
            return JSONResponse(error_body(e), 400)
        planned = await asyncio.to_thread(self._plan, fields, images)
        if isinstance(planned, Response):
            return planned
        fields, summary = planned
        job_id = uuid.uuid4().hex
        answer = await self._board("submit", job_id, summary)
        if not answer["accepted"]:
            status = 429 if answer["retry_after"] is not None else 503
            headers = {"Retry-After": str(answer["retry_after"] or 30)}
            return JSONResponse({"error": {"field": None, "message": answer["reason"]}}, status, headers=headers)
        response = self.generator.run.remote(job_id, fields, images)
        self.waiting[job_id] = response
        watcher = asyncio.get_running_loop().create_task(self._watch(job_id, response))
        self.watchers.add(watcher)
        watcher.add_done_callback(self.watchers.discard)
        return JSONResponse(answer["job"], 202, headers={"Location": f"/v1/videos/{job_id}"})

    async def _watch(self, job_id: str, response) -> None:
        """Fail the job if its replica died (or Serve could not run it); a cancelled wait is no failure."""
        try:
            await response
        except RequestCancelledError:
            pass
        except Exception as e:  # noqa: BLE001 - any way the call can end badly fails this job only
            reason = "its replica died" if isinstance(e, ray.exceptions.RayActorError) else "it could not be run"
            await self._board("fail", job_id, f"{reason} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''});"
                                              " the other replicas go on serving: submit it again")  # fmt: skip
        finally:
            self.waiting.pop(job_id, None)

    @http.get("/v1/videos/{job_id}")
    async def status(self, job_id: str) -> Response:
        view = await self._board("get", job_id)
        return JSONResponse(view) if view is not None else _unknown(job_id)

    @http.get("/v1/videos/{job_id}/content")
    async def content(self, job_id: str) -> Response:
        status, video = await self._board("content", job_id)
        if status is None:
            return _unknown(job_id)
        if video is None:
            message = f"job {job_id} is {status}; its video exists once it is done"
            return JSONResponse({"error": {"field": None, "message": message}, "status": status}, 409)
        return Response(video, media_type="video/mp4", headers={"Content-Disposition": f'attachment; filename="{job_id}.mp4"'})

    @http.delete("/v1/videos/{job_id}")
    async def delete(self, job_id: str) -> Response:
        action, view = await self._board("cancel", job_id)
        if action == "unknown":
            return _unknown(job_id)
        if action == "cancelled" and job_id in self.waiting:
            self.waiting[job_id].cancel()  # leave Serve's queue too
        return JSONResponse({**view, "action": action}, 202 if action == "stopping" else 200)

    @http.get("/healthz")
    async def healthz(self) -> Response:
        health = await self._board("health")
        return JSONResponse({**health, "replicas": self.config.replicas}, 200 if health["status"] == "ok" else 503)

    @http.get("/v1/models")
    async def models(self) -> Response:
        return JSONResponse({"object": "list", "data": [model_card(self.config.name, self.manifest)]})


def build_app(config: AppConfig):
    """The application graph: the Api front bound to `config.replicas` Generator replicas."""
    generator = Generator.options(
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica,
                           "runtime_env": config.runtime_env},  # fmt: skip
    ).bind(config)
    return Api.options(ray_actor_options={"num_cpus": 0, "runtime_env": config.runtime_env}).bind(generator, config)
