"""`cli.py run`: a full run to mp4 + PNG frames + JSON summary, and bad inputs = one clear line, exit 2, no output."""

from __future__ import annotations

import json
import shutil

import av
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import cli
from wanrt.engines.model import SamplingDefaults

HIGH, LOW = "dit_high_noise", "dit_low_noise"


def run(*args: str):
    return CliRunner().invoke(cli, ["run", *map(str, args)], catch_exceptions=False)


def assert_clean_error(result, pattern: str, out_dir):
    import re

    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.stderr
    assert not [p for p in out_dir.iterdir() if p.suffix == ".mp4" or p.name.startswith(".")]


@pytest.fixture(scope="module")
def t2v(bundle_factory):
    return bundle_factory("moe_t2v")


@pytest.fixture(scope="module")
def i2v(bundle_factory):
    return bundle_factory("wan21_i2v", family="wan2.1", task="i2v", moe=False, clip_tokens=257)


def test_full_run_writes_mp4_frames_and_json(t2v, tmp_path):
    out, frames = tmp_path / "fox.mp4", tmp_path / "frames"
    result = run(t2v, "--prompt", "a red fox runs in snow", "--seed", 3, "--steps", 4, "-o", out,
                 "--frames-dir", frames, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output"] == str(out) and summary["seed"] == 3 and summary["steps"] == 4
    assert [s["index"] for s in summary["per_step"]] == [0, 1, 2, 3]
    assert summary["experts"][0] == HIGH and summary["experts"][-1] == LOW  # t=999 high ... low at the end
    assert set(summary["stages"]) == {"text_encoder", "denoise", "vae_decoder", "write"}
    assert summary["peak_rss_bytes"] > 0 and summary["vae_tiles"] == 1 and summary["device_peak_bytes"] is None
    host = [s["seconds"] - s["engine_seconds"] for s in summary["per_step"]]
    assert summary["host_seconds_per_step"] == pytest.approx(np.mean([max(h, 0.0) for h in host]))
    assert all(0 < s["engine_seconds"] <= s["seconds"] for s in summary["per_step"])
    with av.open(str(out)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 8  # the bundle's fps
        n = sum(1 for _ in c.decode(video=0))
    assert (stream.width, stream.height) == (48, 32) and n == 5
    pngs = sorted(frames.iterdir())
    assert len(pngs) == 5 and np.asarray(Image.open(pngs[0])).shape == (32, 48, 3)
    assert "stages" in result.stderr and "vae decode" in result.stderr  # the progress bars went to stderr


def test_memory_budget_decides_expert_residency(t2v, tmp_path):
    """Both experts stay loaded by default; a budget smaller than both makes the run release one before loading the other."""
    modes = {}
    for budget in (None, "0.000001"):
        args = ["--memory-budget", budget] if budget else []
        result = run(t2v, "--prompt", "a cat", "--steps", 4, "-o", tmp_path / f"{budget}.mp4", "--json", *args)
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        modes[budget] = summary["residency_mode"], [(e["action"], e["name"]) for e in summary["residency"]]
    assert modes[None] == ("keep_all", [("load", HIGH), ("load", LOW), ("release", HIGH), ("release", LOW)])
    assert modes["0.000001"] == ("swap", [("load", HIGH), ("release", HIGH), ("load", LOW), ("release", LOW)])


def test_i2v_run(i2v, tmp_path):
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "i2v.mp4"
    result = run(i2v, "--prompt", "a cat", "--image", img, "--height", 32, "--width", 48, "--steps", 3, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary["stages"]) >= {"text_encoder", "image_encoder", "vae_encoder", "denoise", "vae_decoder"}
    assert (summary["height"], summary["width"]) == (32, 48) and out.is_file()


def test_ti2v_run_with_image(bundle_factory, tmp_path):
    sampling = SamplingDefaults(steps=3, shift=5.0, guide_scale=(5.0, 5.0), frames=5, height=32, width=64, fps=24,
                                max_area=32 * 64)  # fmt: skip
    bundle = bundle_factory("ti2v_cli", task="ti2v", moe=False, vae_version="2.2", sampling=sampling)
    img = tmp_path / "tall.png"
    Image.new("RGB", (60, 100), (200, 30, 30)).save(img)
    out = tmp_path / "ti2v.mp4"
    result = run(bundle, "--prompt", "a cat", "--image", img, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # best_output_size(60, 100, 32, 32, 2048): a portrait 32x64 video; the image's latent frame is kept
    assert (summary["width"], summary["height"], summary["fps"]) == (32, 64, 24)
    assert "vae_encoder" in summary["stages"] and out.is_file()


def test_bad_inputs_are_one_line_exit_2_no_output(t2v, i2v, tmp_path):
    out = tmp_path / "o.mp4"
    img = tmp_path / "in.png"
    Image.new("RGB", (64, 48)).save(img)
    assert_clean_error(run(t2v, "--prompt", "x", "--image", img, "-o", out), "takes no --image", tmp_path)
    assert_clean_error(run(i2v, "--prompt", "x", "-o", out), "i2v model; --image is required", tmp_path)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert_clean_error(run(i2v, "--prompt", "x", "--image", tmp_path / "bad.jpg", "-o", out), "bad.jpg: unreadable image", tmp_path)
    assert_clean_error(run(t2v, "--prompt", "x", "--frames", 8, "-o", out), "4k\\+1", tmp_path)
    assert_clean_error(run(t2v, "--prompt", "x", "--height", 40, "-o", out), "multiples of 16", tmp_path)
    assert_clean_error(run(t2v, "--prompt", "x", "-o", tmp_path / "o.gif"), "must be an .mp4 file", tmp_path)
    assert_clean_error(run(t2v, "--prompt", "x", "-o", tmp_path / "no" / "o.mp4"), "output folder does not exist", tmp_path)
    assert_clean_error(run(tmp_path / "nowhere", "--prompt", "x", "-o", out), "not a bundle folder", tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = run(t2v, "--prompt", "x", "-o", out, "--frames-dir", tmp_path / "mine", "--json")
    assert_clean_error(result, "mine: folder holds other files", tmp_path)
    assert "denoise" not in result.stderr  # refused before any engine ran


def test_bundle_failing_verification_is_refused_before_loading(t2v, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(t2v, bundle)
    data = bundle / "dit_low_noise" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_clean_error(run(bundle, "--prompt", "x", "-o", out_dir / "o.mp4"), "model.onnx.data: sha256 mismatch", out_dir)
    data.unlink()
    assert_clean_error(run(bundle, "--prompt", "x", "-o", out_dir / "o.mp4"), "model.onnx.data: missing", out_dir)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_error(run(bundle, "--prompt", "x", "-o", out_dir / "o.mp4"), "unknown schema_version 99", out_dir)


def test_distilled_bundle_steps_mismatch(bundle_factory, tmp_path):
    sampling = SamplingDefaults(sampler="distill", steps=4, shift=5.0, enable_cfg=False, boundary_step_index=2,
                                denoising_step_list=[1000, 750, 500, 250], frames=5, height=32, width=48)  # fmt: skip
    bundle = bundle_factory("moe_distill_cli", sampling=sampling)
    assert_clean_error(run(bundle, "--prompt", "x", "--steps", 6, "-o", tmp_path / "o.mp4"), "runs exactly 4 steps", tmp_path)


def test_backend_choice_flags_and_vram_budget_in_json(t2v, tmp_path):
    """--backend auto on a bundle without plans: ONNX Runtime, and --json says why; --vram-budget is --memory-budget."""
    result = run(t2v, "--prompt", "a cat", "--steps", 2, "--vram-budget", "0.000001", "--cuda-graphs", "--json",
                 "-o", tmp_path / "a.mp4")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["backend_choice"] == {
        "requested": "auto", "chosen": "onnxruntime", "reason": "the bundle holds no TensorRT plans", "plans": {},
    }  # fmt: skip
    assert summary["memory_budget_bytes"] == int(0.000001 * 2**30) and summary["residency_mode"] == "swap"
    plan = summary["memory_plan"]
    assert not plan["fits"] and [s["name"] for s in plan["stages"]] == ["text_encoder", "denoise", "vae_decoder"]
    assert "--cuda-graphs has no effect on onnxruntime" in result.stderr
    step = summary["per_step"][0]
    assert step["gpu_seconds"] is None and step["streamed_bytes"] == 0
    assert step["resident_bytes"] == summary["memory_plan"]["components"][step["expert"]]["weight_bytes"]


def test_backend_tensorrt_without_plans_or_gpu_is_one_line(t2v, tmp_path):
    assert_clean_error(run(t2v, "--prompt", "x", "--backend", "tensorrt", "-o", tmp_path / "o.mp4"),
                       r"--backend tensorrt: the bundle holds no TensorRT plans", tmp_path)  # fmt: skip


def test_ctrl_c_leaves_no_partial_output(bundle_factory, tmp_path):
    """SIGINT in the middle of denoising: exit 130, one line on stderr, no mp4 and no temporary file."""
    import signal
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    bundle = bundle_factory("moe_t2v")
    out = tmp_path / "out" / "video.mp4"
    out.parent.mkdir()
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "cli.py", "run", str(bundle), "--prompt", "a fox", "--steps", "1000", "--frames", "81",
         "--height", "480", "--width", "832", "-o", str(out)],  # about 40 s of denoising
        cwd=repo, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(64), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while "denoise" not in "".join(seen) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert "denoise" in "".join(seen), "".join(seen)[-2000:]
    time.sleep(1.0)  # a few steps in
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    reader.join(timeout=10)
    assert "interrupted: device memory released, no output written" in "".join(seen)
    assert list(out.parent.iterdir()) == []
