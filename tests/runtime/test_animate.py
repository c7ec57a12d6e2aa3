"""Wan2.2-Animate in the runtime: the official segmenting and masking rules (wan/animate.py, worked by hand
or transcribed from `get_i2v_mask`), a two-segment run through `cli.py run` on a real (synthetic-graph)
bundle, and bad inputs = one line, exit 2, no output.
"""

from __future__ import annotations

import json
import re

import av
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import cli
from wanrt.engines.model import SamplingDefaults
from wanrt.runtime.animate import (
    AnimatePipeline, letterbox, pingpong_indices, segment_mask, segment_starts, valid_length,
)
from wanrt.runtime.backends import make_backend
from wanrt.runtime.request import GenerationRequest, RequestError
from wanrt.runtime.video import write_mp4
from tests.runtime.bundles import FACE_SIZE

H, W = 32, 48  # pose video size (multiples of 16)
CLIP_LEN = 5  # segment frames of the test bundle


def official_get_i2v_mask(lat_t, lat_h, lat_w, mask_len=1, mask_pixel_values=None):
    """`WanAnimate.get_i2v_mask` (wan/animate.py), transcribed in torch as the reference."""
    if mask_pixel_values is None:
        msk = torch.zeros(1, (lat_t - 1) * 4 + 1, lat_h, lat_w)
    else:
        msk = mask_pixel_values.clone()
    msk[:, :mask_len] = 1
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)[0]


def test_segments_follow_the_official_rules():
    assert valid_length(100, 77, 1) == 153  # 99 % 76 = 23 left over: padded by 53 frames
    assert valid_length(77, 77, 1) == 77 and valid_length(153, 77, 5) == 221  # 148 % 72 = 4: + 68
    assert segment_starts(153, 77, 1) == [0, 76]
    assert segment_starts(77, 77, 1) == [0]
    assert pingpong_indices(3, 8) == [0, 1, 2, 1, 0, 1, 2, 1]
    assert pingpong_indices(1, 3) == [0, 0, 0]


@pytest.mark.parametrize("lat_t,first", [(3, 0), (3, 1), (3, 5), (1, 1)])
def test_mask_equals_get_i2v_mask(lat_t, first):
    want = official_get_i2v_mask(lat_t, 2, 3, first).numpy()
    assert np.array_equal(segment_mask(lat_t, 2, 3, first)[0], want)


def test_replace_mask_equals_get_i2v_mask():
    keep = np.random.default_rng(0).integers(0, 2, (9, 2, 3)).astype(np.float32)
    want = official_get_i2v_mask(3, 2, 3, 1, torch.from_numpy(keep)[None]).numpy()
    assert np.array_equal(segment_mask(3, 2, 3, 1, keep)[0], want)


def test_letterbox_centers_with_black_bars():
    img = np.full((10, 10, 3), 200, np.uint8)
    out = letterbox(img, 16, 32)  # square into 2:1: 16x16 in the middle
    assert out.shape == (16, 32, 3)
    assert (out[:, :8] == 0).all() and (out[:, 24:] == 0).all() and (out[:, 8:24] == 200).all()


def _video(path, frames: int, h: int, w: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    write_mp4(rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8), path, fps=8)
    return path


@pytest.fixture(scope="module")
def animate(bundle_factory):
    sampling = SamplingDefaults(sampler="unipc", steps=3, shift=5.0, guide_scale=(1.0, 1.0), enable_cfg=False,
                                frames=CLIP_LEN, height=H, width=W, fps=8, negative_prompt="bad blurry")  # fmt: skip
    return bundle_factory("animate", task="animate", moe=False, sampling=sampling)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 14, 3), dtype=np.uint8)).save(root / "ref.png")
    return {
        "ref": root / "ref.png",
        "pose": _video(root / "pose.mp4", 7, H, W, 2),
        "face": _video(root / "face.mp4", 7, FACE_SIZE, FACE_SIZE, 3),
        "face_short": _video(root / "face_short.mp4", 6, FACE_SIZE, FACE_SIZE, 3),
        "face_big": _video(root / "face_big.mp4", 7, 16, 16, 3),
        "bg": _video(root / "bg.mp4", 7, H, W, 4),
        "mask": _video(root / "mask.mp4", 7, H, W, 5),
        "mask_small": _video(root / "mask_small.mp4", 7, H // 2, W // 2, 5),
        "broken": (root / "broken.mp4", (root / "broken.mp4").write_bytes(b"not a video"))[0],
    }


def run(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)], catch_exceptions=False)


@pytest.mark.parametrize("mode", ["animate", "replace"])
def test_two_segment_run_writes_every_pose_frame(animate, media, tmp_path, mode):
    extra = ["--mode", "replace", "--background-video", media["bg"], "--mask-video", media["mask"]] if mode == "replace" else []
    out = tmp_path / "out.mp4"
    r = run(animate, "--prompt", "a red fox", "--image", media["ref"], "--pose-video", media["pose"], "--face-video",
            media["face"], "--seed", "3", "-o", out, "--json", *extra)  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    # 7 frames in segments of 5 overlapping by 1: valid length 9, segments at 0 and 4
    assert (summary["segments"], summary["output_frames"], summary["mode"]) == (2, 7, mode)
    assert len(summary["per_step"]) == 2 * 3
    with av.open(str(out)) as c:
        frames = [f for f in c.decode(video=0)]
    assert len(frames) == 7 and (frames[0].height, frames[0].width) == (H, W)


def test_second_segment_is_conditioned_on_the_first_ones_last_frame(animate, media):
    manifest_pipeline = AnimatePipeline(animate, _manifest(animate), make_backend("onnxruntime"))
    plan = manifest_pipeline.prepare(GenerationRequest(prompt="a fox", image=media["ref"], pose_video=media["pose"],
                                                       face_video=media["face"], seed=1))  # fmt: skip
    carried = np.full((1, 3, 1, H, W), 0.5, np.float32)
    first = manifest_pipeline.segment_condition(plan, 0, None)
    second = manifest_pipeline.segment_condition(plan, 4, carried)
    y1, y2 = first["y"], second["y"]
    assert y1.shape == y2.shape == (1, 20, 3, H // 8, W // 8) and first["pose_latent"].shape == (1, 16, 2, H // 8, W // 8)
    assert (y1[:, :4, 0] == 1).all() and (y2[:, :4, 0] == 1).all()  # the reference frame's mask
    assert (y1[:, :4, 1:] == 0).all()  # nothing carried over into the first segment
    assert (y2[:, :4, 1] == 1).all() and (y2[:, :4, 2] == 0).all()  # one carried frame: latent frame 1's mask
    assert not np.allclose(y1[:, 4:, 1], y2[:, 4:, 1])  # its latents see the carried frame


def _manifest(bundle):
    from wanrt.engines.manifest import verify_bundle

    return verify_bundle(bundle)


def test_bad_inputs_are_one_line_exit_2_no_output(animate, media, tmp_path):
    base = [animate, "--prompt", "a fox", "--image", media["ref"], "-o", tmp_path / "out.mp4"]
    cases = [
        ([], r"--pose-video is required"),
        (["--pose-video", media["pose"]], r"--face-video is required"),
        (["--pose-video", media["pose"], "--face-video", media["face_short"]], r"--face-video .*6 frames, but --pose-video has 7"),
        (["--pose-video", media["pose"], "--face-video", media["face_big"]], r"takes 8x8 face crops"),
        (["--pose-video", media["broken"], "--face-video", media["face"]], r"--pose-video .*broken.mp4: unreadable video"),
        (["--pose-video", tmp_path / "nope.mp4", "--face-video", media["face"]], r"video not found"),
        (["--pose-video", media["pose"], "--face-video", media["face"], "--mode", "replace", "--background-video", media["bg"],
          "--mask-video", media["mask_small"]], r"--mask-video .*24x16 frames, but the pose video is 48x32"),
        (["--pose-video", media["pose"], "--face-video", media["face"], "--mode", "replace"], r"--mode replace needs --background-video"),
        (["--pose-video", media["pose"], "--face-video", media["face"], "--mask-video", media["mask"]], r"--mask-video is for --mode replace"),
    ]
    for args, pattern in cases:
        r = run(*base, *args)
        assert r.exit_code == 2, (args, r.output)
        lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and re.search(pattern, lines[0]), (pattern, r.stderr)
        assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*"))


def test_animate_options_on_other_bundles_are_refused(bundle_factory, media):
    t2v = bundle_factory("moe_t2v")
    pipeline = AnimatePipeline.__mro__[1](t2v, _manifest(t2v), None)
    with pytest.raises(RequestError, match="--pose-video is only for Wan2.2-Animate bundles") as e:
        pipeline.prepare(GenerationRequest(prompt="a fox", pose_video=media["pose"]))
    assert e.value.field == "pose_video"
