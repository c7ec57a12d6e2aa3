"""`cli.py` end to end on an image task: Wan2.2 TI2V-5B tiny model -> bundle -> video from an image."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.helpers import cli, frame_count

pytestmark = pytest.mark.slow


def test_ti2v_with_an_image_end_to_end(tmp_path):
    """Wan2.2 TI2V-5B layout -> bundle (48-channel VAE encoder and decoder) -> video from an image, with --json."""
    env = {**os.environ, "WANRT_CACHE_DIR": str(tmp_path / "cache")}
    model, bundle, out = tmp_path / "model", tmp_path / "bundle", tmp_path / "ti2v.mp4"
    assert cli("make-tiny-model", str(model), "--family", "wan2.2", "--task", "ti2v", env=env).returncode == 0
    built = cli("build-engine", str(model), "-o", str(bundle), "--json", env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    assert set(json.loads(built.stdout)["components"]) == {"dit", "text_encoder", "vae_encoder", "vae_decoder"}
    assert cli("verify", str(bundle), env=env).returncode == 0
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)).save(image)
    result = cli("run", str(bundle), "--prompt", "a cat on a sofa", "--image", str(image), "--frames", "5",
                 "--height", "64", "--width", "96", "--steps", "3", "--seed", "7", "-o", str(out), "--json", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["task"] == "ti2v" and summary["steps"] == 3 and summary["experts"] == ["dit"] * 3
    assert {"text_encoder", "vae_encoder", "denoise", "vae_decoder", "write"} <= set(summary["stages"])
    # TI2V sizes are multiples of 32 within the max area 64*96, keeping the image's 16:9 aspect
    w, h = summary["width"], summary["height"]
    assert w % 32 == 0 and h % 32 == 0 and w * h <= 64 * 96 and w > h
    assert frame_count(out) == (5, w, h, float(summary["fps"]))
