"""The job table behind `serve`: states, the queue limit, progress, results on disk, retention.

One `JobTable` lives in one Ray actor (the job board, `app.JobBoard`) on the machine that runs
`serve`, so its calls never overlap and `--output-dir` is that machine's folder.  The HTTP front
submits, reads and cancels; the Generator replicas start, report progress, finish or fail.

    queued --start--> running --finish--> done
       |                 |------fail----> failed
       +--cancel--> cancelled <--stopped at the next step (cancel while running)

A finished job (done, failed, cancelled) is kept, with its mp4, until it is deleted or
`retention_seconds` pass after it finished; expired jobs are swept on every call.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from wanrt.engines.files import atomic_write_bytes

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
RECENT_RUNS = 20  # finished runs the Retry-After estimate averages
DEFAULT_RETRY_AFTER = 5  # seconds, before any job has finished


@dataclass
class Job:
    """One generation request and what became of it."""

    id: str
    created: float  # wall-clock seconds (time.time)
    request: dict[str, Any]  # the resolved request (plan summary): frames, size, steps, seed, ...
    status: str = QUEUED
    stage: str | None = None  # the pipeline stage running now (or last)
    step: int = 0  # denoising steps done ...
    steps: int = 0  # ... of this many
    started: float | None = None
    stage_started: float | None = None
    finished: float | None = None
    stages: dict[str, float] = field(default_factory=dict)  # seconds per finished stage
    error: str | None = None
    cancel_requested: bool = False
    worker: dict[str, Any] | None = None  # replica, node and pid that ran it
    path: Path | None = None  # the mp4, once done

    def view(self, now: float) -> dict[str, Any]:
        """The job as `GET /v1/videos/{id}` shows it."""
        end = self.finished if self.finished is not None else now
        return {
            "id": self.id,
            "status": self.status,
            "progress": {"stage": self.stage, "step": self.step, "steps": self.steps},
            "timings": {
                "queued_seconds": (self.started if self.started is not None else end) - self.created,
                "run_seconds": end - self.started if self.started is not None else None,
                "stages": dict(self.stages),
            },
            "error": self.error,
            "cancel_requested": self.cancel_requested,
            "request": self.request,
            "worker": self.worker,
            "created": self.created,
            "finished": self.finished,
        }


class JobTable:
    """Every job of one `serve` session; see the module docstring for the states."""

    def __init__(
        self, output_dir: str | os.PathLike, max_queue: int, retention_seconds: float, replicas: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.max_queue = max_queue  # jobs that may wait beyond those the idle replicas are about to take
        self.replicas = replicas
        self.retention_seconds = retention_seconds
        self.clock = clock
        self.accepting = True
        self.jobs: dict[str, Job] = {}
        self.recent_runs: list[float] = []

    # ---- the HTTP front ----------------------------------------------------------------------

    def submit(self, job_id: str, request: dict[str, Any]) -> dict[str, Any]:
        """Queue a validated request: {"accepted": True, "job": view}, or the reason it was refused and when to retry."""
        self.sweep()
        if not self.accepting:
            return {"accepted": False, "reason": "shutting down", "retry_after": None}
        if self.waiting(extra=1) > self.max_queue:
            return {"accepted": False, "reason": f"queue full ({self.waiting()} jobs waiting, --max-queue {self.max_queue})",
                    "retry_after": self.retry_after()}  # fmt: skip
        job = Job(job_id, self.clock(), request, steps=int(request.get("steps") or 0))
        self.jobs[job_id] = job
        return {"accepted": True, "job": job.view(self.clock())}

    def get(self, job_id: str) -> dict[str, Any] | None:
        self.sweep()
        job = self.jobs.get(job_id)
        return job.view(self.clock()) if job is not None else None

    def content(self, job_id: str) -> tuple[str | None, bytes | None]:
        """(status, mp4 bytes once done); (None, None) for an unknown id."""
        self.sweep()
        job = self.jobs.get(job_id)
        if job is None:
            return None, None
        if job.status != DONE or job.path is None:
            return job.status, None
        return job.status, job.path.read_bytes()

    def cancel(self, job_id: str) -> tuple[str, dict[str, Any] | None]:
        """DELETE: cancel a queued job, ask a running one to stop, or delete a finished one and its mp4.

        Returns the action ("cancelled", "stopping", "deleted", or "unknown") and the job's view.
        """
        self.sweep()
        job = self.jobs.get(job_id)
        if job is None:
            return "unknown", None
        if job.status == QUEUED:
            self._finish(job, CANCELLED)
            return "cancelled", job.view(self.clock())
        if job.status == RUNNING:
            job.cancel_requested = True
            return "stopping", job.view(self.clock())
        self._delete(job)
        return "deleted", job.view(self.clock())

    def counts(self) -> dict[str, int]:
        return {s: self.count(s) for s in (QUEUED, RUNNING)}

    def health(self) -> dict[str, Any]:
        """`GET /healthz`: "ok" while taking jobs, "draining" once shutdown began; the queued and running counts."""
        return {"status": "ok" if self.accepting else "draining", **self.counts()}

    def drain(self) -> dict[str, int]:
        """Stop taking jobs and cancel the queued ones; running jobs go on."""
        self.accepting = False
        for job in self.jobs.values():
            if job.status == QUEUED:
                job.error = "the server is shutting down"
                self._finish(job, CANCELLED)
        return self.counts()

    def stop_running(self) -> None:
        """Ask every running job to stop at its next step (the end of a drain's time limit)."""
        for job in self.jobs.values():
            if job.status == RUNNING:
                job.cancel_requested = True
                job.error = "the server is shutting down (drain time limit reached)"

    # ---- the Generator replicas --------------------------------------------------------------

    def start(self, job_id: str, worker: dict[str, Any]) -> bool:
        """A replica takes the job; False when it is no longer queued (cancelled, deleted)."""
        job = self.jobs.get(job_id)
        if job is None or job.status != QUEUED:
            return False
        job.status, job.started, job.worker = RUNNING, self.clock(), worker
        return True

    def progress(self, job_id: str, stage: str, step: int, steps: int) -> bool:
        """Record a stage start or a finished step (`steps` 0: a stage without steps); False when the job should stop."""
        job = self.jobs.get(job_id)
        if job is None or job.status != RUNNING:
            return False
        now = self.clock()
        if stage != job.stage:
            if job.stage is not None and job.stage_started is not None:
                job.stages[job.stage] = now - job.stage_started
            job.stage, job.stage_started = stage, now
        if steps:
            job.step, job.steps = step, steps
        return not job.cancel_requested

    def finish(self, job_id: str, video: bytes, stages: dict[str, float]) -> None:
        """Write the mp4 atomically under the output folder and mark the job done (cancelled if it was asked to stop)."""
        job = self.jobs.get(job_id)
        if job is None or job.status != RUNNING:
            return
        if job.cancel_requested:
            self._finish(job, CANCELLED)
            return
        job.path = atomic_write_bytes(self.output_dir / f"{job.id}.mp4", video)
        job.stages = dict(stages)
        job.step = job.steps
        self._finish(job, DONE)
        self.recent_runs = (self.recent_runs + [job.finished - job.started])[-RECENT_RUNS:]

    def stopped(self, job_id: str) -> None:
        """A replica stopped the job at a step because it was cancelled."""
        job = self.jobs.get(job_id)
        if job is not None and job.status == RUNNING:
            self._finish(job, CANCELLED)

    def fail(self, job_id: str, error: str) -> None:
        """Mark a queued or running job failed with `error` (a finished one keeps its state)."""
        job = self.jobs.get(job_id)
        if job is not None and job.status not in FINISHED:
            job.error = error
            self._finish(job, FAILED)

    # ---- bookkeeping -------------------------------------------------------------------------

    def count(self, status: str) -> int:
        return sum(j.status == status for j in self.jobs.values())

    def waiting(self, extra: int = 0) -> int:
        """Queued jobs (plus `extra` new ones) no idle replica is about to take: a job is queued until a replica starts it."""
        return max(0, self.count(QUEUED) + extra - max(0, self.replicas - self.count(RUNNING)))

    def retry_after(self) -> int:
        """Seconds after which a slot is likely free: the mean run time of the recent jobs."""
        if not self.recent_runs:
            return DEFAULT_RETRY_AFTER
        return max(1, math.ceil(sum(self.recent_runs) / len(self.recent_runs)))

    def sweep(self) -> list[str]:
        """Forget finished jobs (and delete their mp4) once `retention_seconds` have passed; their ids."""
        now = self.clock()
        expired = [j for j in self.jobs.values() if j.finished is not None and now - j.finished > self.retention_seconds]
        for job in expired:
            self._delete(job)
        return [j.id for j in expired]

    def _finish(self, job: Job, status: str) -> None:
        now = self.clock()
        if job.stage is not None and job.stage_started is not None and job.stage not in job.stages:
            job.stages[job.stage] = now - job.stage_started
        job.status, job.finished = status, now

    def _delete(self, job: Job) -> None:
        if job.path is not None:
            job.path.unlink(missing_ok=True)
        del self.jobs[job.id]
