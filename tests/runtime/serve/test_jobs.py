"""The job table behind serve: states, the queue limit, results on disk, retention (a clock the test advances)."""

from __future__ import annotations

import pytest

from wanrt.runtime.serve.jobs import DEFAULT_RETRY_AFTER, JobTable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def table(tmp_path, clock):
    return JobTable(tmp_path, max_queue=2, retention_seconds=3600, clock=clock)


REQUEST = {"frames": 5, "height": 32, "width": 48, "steps": 4, "seed": 1}


def run_to_done(table, clock, job_id, seconds=2.0, video=b"mp4 bytes"):
    assert table.start(job_id, {"replica": "r1", "pid": 1})
    clock.now += seconds
    table.finish(job_id, video, {"denoise": seconds})


def test_a_job_runs_from_queued_to_done_with_its_mp4_written_atomically(table, clock, tmp_path):
    assert table.submit("a", REQUEST)["accepted"]
    assert table.get("a")["status"] == "queued" and table.content("a") == ("queued", None)
    clock.now += 0.5
    assert table.start("a", {"replica": "r1", "pid": 7})
    assert table.progress("a", "text_encoder", 0, 0)
    clock.now += 1.0
    assert table.progress("a", "denoise", 0, 4) and table.progress("a", "denoise", 3, 4)
    view = table.get("a")
    assert view["status"] == "running" and view["progress"] == {"stage": "denoise", "step": 3, "steps": 4}
    assert view["timings"]["queued_seconds"] == 0.5 and view["timings"]["stages"] == {"text_encoder": 1.0}
    clock.now += 2.0
    table.finish("a", b"the video", {"text_encoder": 1.0, "denoise": 1.5, "write": 0.5})
    view = table.get("a")
    assert view["status"] == "done" and view["progress"]["step"] == 4 and view["timings"]["run_seconds"] == 3.0
    assert view["worker"]["pid"] == 7 and view["timings"]["stages"]["write"] == 0.5
    assert table.content("a") == ("done", b"the video")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]  # no temporary left beside it


def test_the_queue_limit_counts_jobs_waiting_for_a_busy_replica_and_retry_after_follows_run_times(tmp_path, clock):
    table = JobTable(tmp_path, max_queue=1, retention_seconds=3600, replicas=1, clock=clock)
    assert table.submit("a", REQUEST)["accepted"]  # the idle replica is about to take it
    assert table.submit("b", REQUEST)["accepted"]  # waits
    refused = table.submit("c", REQUEST)
    assert not refused["accepted"] and "queue full (1 jobs waiting" in refused["reason"]
    assert refused["retry_after"] == DEFAULT_RETRY_AFTER
    table.start("a", {"replica": "r1"})
    assert not table.submit("c", REQUEST)["accepted"]  # b still waits: the replica is busy
    clock.now += 12.25
    table.finish("a", b"video", {})
    assert table.submit("c", REQUEST)["accepted"]  # the replica is idle again: b goes to it
    assert table.submit("d", REQUEST)["retry_after"] == 13  # ceil(12.25)
    assert table.get("d") is None
    none_waiting = JobTable(tmp_path, max_queue=0, retention_seconds=3600, replicas=2, clock=clock)
    assert [none_waiting.submit(j, REQUEST)["accepted"] for j in "xyz"] == [True, True, False]  # --max-queue 0: idle replicas only


def test_cancel_a_queued_job_is_immediate_and_it_never_starts(table):
    table.submit("a", REQUEST)
    action, view = table.cancel("a")
    assert action == "cancelled" and view["status"] == "cancelled"
    assert not table.start("a", {"replica": "r1"}) and table.get("a")["worker"] is None


def test_cancel_a_running_job_stops_it_at_its_next_step_without_a_video(table, tmp_path):
    table.submit("a", REQUEST)
    table.start("a", {"replica": "r1"})
    assert table.progress("a", "denoise", 1, 4)
    action, view = table.cancel("a")
    assert action == "stopping" and view["status"] == "running" and view["cancel_requested"]
    assert not table.progress("a", "denoise", 2, 4)  # the replica's step callback stops here
    table.stopped("a")
    assert table.get("a")["status"] == "cancelled" and table.get("a")["progress"]["step"] == 2
    table.submit("b", REQUEST)
    table.start("b", {"replica": "r1"})
    table.cancel("b")
    table.finish("b", b"too late", {})  # finished between two steps: still cancelled, nothing kept
    assert table.get("b")["status"] == "cancelled" and not list(tmp_path.iterdir())


def test_delete_of_a_finished_job_removes_it_and_its_mp4(table, clock, tmp_path):
    table.submit("a", REQUEST)
    run_to_done(table, clock, "a")
    assert (tmp_path / "a.mp4").is_file()
    assert table.cancel("a")[0] == "deleted"
    assert table.get("a") is None and table.content("a") == (None, None) and not (tmp_path / "a.mp4").exists()
    assert table.cancel("a") == ("unknown", None)


def test_finished_jobs_expire_after_the_retention_time(table, clock, tmp_path):
    table.submit("old", REQUEST)
    run_to_done(table, clock, "old")
    clock.now += 1800
    table.submit("new", REQUEST)
    run_to_done(table, clock, "new")
    table.submit("waiting", REQUEST)
    clock.now += 1801  # "old" finished 3601 s ago, "new" 1801 s ago
    assert table.get("old") is None and not (tmp_path / "old.mp4").exists()
    assert table.get("new")["status"] == "done" and (tmp_path / "new.mp4").is_file()
    clock.now += 10**6
    assert table.get("waiting")["status"] == "queued"  # only finished jobs expire


def test_a_failure_is_recorded_once_and_never_overrides_a_finished_job(table, clock):
    table.submit("a", REQUEST)
    table.start("a", {"replica": "r1"})
    table.fail("a", "its replica died")
    assert table.get("a")["status"] == "failed" and table.get("a")["error"] == "its replica died"
    table.submit("b", REQUEST)
    run_to_done(table, clock, "b")
    table.fail("b", "late")
    assert table.get("b")["status"] == "done" and table.get("b")["error"] is None


def test_drain_refuses_new_jobs_cancels_queued_ones_and_lets_running_ones_finish(table, clock):
    table.submit("running", REQUEST)
    table.start("running", {"replica": "r1"})
    table.submit("queued", REQUEST)
    assert table.drain() == {"queued": 0, "running": 1}
    assert table.health()["status"] == "draining"
    assert table.get("queued")["status"] == "cancelled" and "shutting down" in table.get("queued")["error"]
    assert table.submit("late", REQUEST) == {"accepted": False, "reason": "shutting down", "retry_after": None}
    assert table.progress("running", "denoise", 1, 4)  # goes on
    table.stop_running()  # the drain time limit
    assert not table.progress("running", "denoise", 2, 4)
