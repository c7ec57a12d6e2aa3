"""`cli.py serve` over HTTP on loopback: an I2V tiny bundle on 2 CPU replicas, one Ray start for the module.

The oracle for the videos is `cli.py run` with the same arguments and seed (same decoded frames).
"""

from __future__ import annotations

import base64
import os
import re
import signal
import threading

import numpy as np
import pytest
from click.testing import CliRunner

from tests.runtime.serve.servers import LONG_JOB, b64, decoded_frames, png_bytes, start_serve, stop_serve

pytest.importorskip("ray.serve", reason='ray[serve] is not installed (pip install "wanrt[serve]")')

MAX_QUEUE = 4


@pytest.fixture(scope="module")
def server(i2v_bundle, tmp_path_factory):
    server = start_serve(i2v_bundle, tmp_path_factory.mktemp("serve_http"), "--replicas", "2", "--max-queue", str(MAX_QUEUE))
    yield server
    assert stop_serve(server) == 0, server.stderr()


def with_image(image_seed: int, **fields):
    return {"prompt": "a red fox runs in snow", "image": b64(png_bytes(image_seed)), **fields}


def cancel_all(server, ids):
    """Cancel the jobs still queued or running (a DELETE of a finished job would delete it) and wait for the server to idle."""
    for job_id in ids:
        if server.job(job_id)["status"] in ("queued", "running"):
            server.request("DELETE", f"/v1/videos/{job_id}")
    for job_id in ids:
        server.finished(job_id)
    server.idle()


def test_four_concurrent_requests_equal_run_with_the_same_arguments(server, i2v_bundle, tmp_path):
    from cli import cli

    requests = [
        with_image(0, seed=11),
        with_image(1, seed=12, steps=3),
        with_image(2, seed=13, prompt="a cat in the snow", negative_prompt="blurry"),
        with_image(3, seed=14, frames=9, guidance=2.5, shift=3.0, sampler="euler"),
    ]
    ids: list[str] = [None] * 4  # type: ignore[list-item]

    def post(i):
        ids[i] = server.submit(requests[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    views = [server.finished(job_id) for job_id in ids]
    assert [v["status"] for v in views] == ["done"] * 4, views
    assert len({v["worker"]["replica"] for v in views}) == 2  # both replicas served
    for body, job_id, view in zip(requests, ids, views):
        reply = server.request("GET", f"/v1/videos/{job_id}/content")
        assert reply.status == 200 and reply.headers["content-type"] == "video/mp4"
        image = tmp_path / f"{job_id}.png"
        image.write_bytes(base64.b64decode(body["image"]))
        out = tmp_path / f"{job_id}.mp4"
        args = ["run", str(i2v_bundle), "--image", str(image), "-o", str(out)]
        for name, value in body.items():
            if name != "image":
                args += [f"--{name.replace('_', '-')}", str(value)]
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        served, expected = decoded_frames(reply.body), decoded_frames(out)
        assert served.shape == expected.shape and np.array_equal(served, expected)
        assert (server.output_dir / f"{job_id}.mp4").read_bytes() == reply.body  # written under --output-dir
        assert view["request"]["seed"] == body["seed"] and view["progress"]["step"] == view["request"]["steps"]
        assert set(view["timings"]["stages"]) == {"text_encoder", "image_encoder", "vae_encoder", "denoise", "vae_decoder", "write"}
    assert not [p for p in server.output_dir.iterdir() if p.name.startswith(".")]  # no temporary left


BAD_REQUESTS = [
    ({"negative_prompt": "blurry"}, "prompt", "prompt is required"),
    ({"prompt": "  "}, "prompt", "prompt is empty"),
    ({"prompt": "a cat"}, "image", "this bundle is an i2v model; image is required"),
    ({"prompt": "a cat", "image": "not base64!"}, "image", "not valid base64"),
    ({"prompt": "a cat", "image": b64(b"GIF89a not a png")}, "image", "not a PNG or JPEG"),
    ({"prompt": "a cat", "image": b64(b"\x89PNG\r\n\x1a\n truncated")}, "image", "unreadable image"),
    ({"prompt": "a cat", "image": b64(png_bytes(0)), "frames": 0}, "frames", "frames 0: expected an integer in \\[1, 1001\\]"),
    ({"prompt": "a cat", "image": b64(png_bytes(0)), "frames": 8}, "frames", "4k\\+1 \\(e.g. 5 or 9\\)"),
    ({"prompt": "a cat", "image": b64(png_bytes(0)), "height": 4096, "width": 4096}, "height", "the engine takes 16..1536 px"),
    ({"prompt": "a cat", "image": b64(png_bytes(0)), "height": 64}, "width", "give both height and width"),
    ({"prompt": "a cat", "image": b64(png_bytes(0)), "steps": 0}, "steps", "steps 0: expected an integer in \\[1, 1000\\]"),
    ({"prompt": "a cat", "image": b64(png_bytes(0)), "steps": 2.5}, "steps", "expected an integer"),
    ({"prompt": "a cat", "image": b64(png_bytes(0)), "frames": True}, "frames", "expected an integer"),
    ({"prompt": "a cat", "image": b64(png_bytes(0)), "guidance": "high"}, "guidance", "expected a number"),
    ({"prompt": "a cat", "image": b64(png_bytes(0)), "sampler": "ddim"}, "sampler", "expected one of unipc, euler, distill"),
    ({"prompt": "a cat", "image": b64(png_bytes(0)), "sampler": "distill"}, "sampler", "no denoising_step_list"),
    ({"prompt": "a cat", "image": b64(png_bytes(0)), "seed": -1}, "seed", "seed -1: expected an integer in \\[0, 2\\*\\*64 - 1\\]"),
    ({"prompt": "a cat", "image": b64(png_bytes(0)), "last_image": b64(png_bytes(1))}, "last_image", "only for flf2v"),
    ({"prompt": "a cat", "image": b64(png_bytes(0)), "fps": 30}, "fps", "unknown field 'fps'"),
    (b'{"prompt": "a cat", "shift": NaN}', "body", "NaN is not a JSON number"),
    (b'{"prompt": "a cat", "shift": 1', "body", "not valid JSON"),
    (b"[1, 2]", "body", "expected a JSON object"),
]


@pytest.mark.parametrize("body, field, message", BAD_REQUESTS, ids=[f"{f}:{m[:20]}" for _, f, m in BAD_REQUESTS])
def test_bad_request_is_400_naming_the_field_and_queues_nothing(server, body, field, message):
    reply = server.request("POST", "/v1/videos", body)
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert error["field"] == field and re.search(message, error["message"]), error
    assert "--" not in error["message"] and "/tmp" not in error["message"]  # the API's names, no server paths
    health = server.request("GET", "/healthz").json()
    assert health["status"] == "ok" and health["queued"] == 0


def test_unknown_ids_are_404(server):
    for method, path in (("GET", "/v1/videos/nope"), ("GET", "/v1/videos/nope/content"), ("DELETE", "/v1/videos/nope")):
        reply = server.request(method, path)
        assert reply.status == 404 and reply.json()["error"]["field"] == "id", (method, path, reply.body)


def test_models_and_healthz_describe_the_bundle(server):
    card = server.request("GET", "/v1/models").json()["data"][0]
    assert (card["family"], card["task"], card["images"]["image"]) == ("wan2.1", "i2v", "required")
    assert card["defaults"]["steps"] == 6 and card["sizes"]["multiple"] == 16 and card["sizes"]["frames_rule"] == "4k+1"
    health = server.request("GET", "/healthz")
    assert health.status == 200 and health.json()["replicas"] == 2


def test_content_is_409_until_done_and_delete_removes_a_finished_job(server):
    job_id = server.submit(with_image(5, **LONG_JOB))
    server.running(job_id)
    reply = server.request("GET", f"/v1/videos/{job_id}/content")
    assert reply.status == 409 and reply.json()["status"] == "running"
    cancel_all(server, [job_id])
    done = server.submit(with_image(5, seed=1, steps=2))
    assert server.finished(done)["status"] == "done" and (server.output_dir / f"{done}.mp4").is_file()
    reply = server.request("DELETE", f"/v1/videos/{done}")
    assert reply.status == 200 and reply.json()["action"] == "deleted"
    assert server.request("GET", f"/v1/videos/{done}").status == 404 and not (server.output_dir / f"{done}.mp4").exists()


def test_full_queue_is_429_with_retry_after_and_a_queued_job_cancels(server):
    running = [server.submit(with_image(6, **LONG_JOB)) for _ in range(2)]
    for job_id in running:
        server.running(job_id)  # both replicas busy
    queued = [server.submit(with_image(7, **LONG_JOB)) for _ in range(MAX_QUEUE)]
    try:
        assert all(server.job(j)["status"] == "queued" for j in queued)
        reply = server.request("POST", "/v1/videos", with_image(8, steps=2))
        assert reply.status == 429 and int(reply.headers["retry-after"]) >= 1, reply.body
        assert "queue full" in reply.json()["error"]["message"]
        reply = server.request("DELETE", f"/v1/videos/{queued[0]}")
        assert reply.status == 200 and reply.json()["status"] == "cancelled"
        assert server.request("POST", "/v1/videos", with_image(8, steps=2)).status == 202  # the slot is free again
    finally:
        cancel_all(server, running + queued)
    view = server.job(queued[0])
    assert view["status"] == "cancelled" and view["worker"] is None and view["timings"]["run_seconds"] is None  # never ran


def test_delete_stops_a_running_job_at_the_next_step(server):
    job_id = server.submit(with_image(9, **LONG_JOB))
    server.running(job_id)
    reply = server.request("DELETE", f"/v1/videos/{job_id}")
    assert reply.status == 202 and reply.json()["action"] == "stopping"
    asked_at = reply.json()["progress"]["step"]
    view = server.finished(job_id)
    assert view["status"] == "cancelled" and view["progress"]["stage"] == "denoise"
    assert asked_at <= view["progress"]["step"] < LONG_JOB["steps"]  # stopped within the denoising loop
    assert server.request("GET", f"/v1/videos/{job_id}/content").status == 409
    assert not (server.output_dir / f"{job_id}.mp4").exists()
    server.idle()


def test_a_replica_that_dies_fails_its_job_and_the_other_keeps_serving(server):
    """Last in the module: Serve replaces the killed replica in the background."""
    job_id = server.submit(with_image(10, **LONG_JOB))
    pid = server.running(job_id)["worker"]["pid"]
    os.kill(pid, signal.SIGKILL)  # a replica process this test's server started
    view = server.finished(job_id, timeout=60)
    assert view["status"] == "failed" and "its replica died" in view["error"], view
    after = server.submit(with_image(11, seed=2, steps=2))
    view = server.finished(after, timeout=120)
    assert view["status"] == "done" and view["worker"]["pid"] != pid
