"""Video output: official uint8 conversion, H.264 mp4 read back with PyAV, PNG frames, atomic writes."""

from __future__ import annotations

import os
import stat

import av
import numpy as np
import pytest
from PIL import Image

from wanrt.engines.errors import WanrtError
from wanrt.runtime.video import check_output_path, to_uint8_frames, write_mp4, write_png_frames


def gradient_video(t=9, h=32, w=48):
    """A smooth moving gradient in [-1, 1], [1, 3, T, H, W]."""
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    r = np.sin(xx / w * 3 + tt * 0.2)
    g = np.cos(yy / h * 2 - tt * 0.1)
    b = (xx + yy) / (w + h) * 2 - 1
    return np.stack([r, g, b])[None].astype(np.float32)


def test_uint8_conversion_is_the_official_one():
    v = np.array([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0], np.float32).reshape(1, 1, 1, 7).repeat(3, axis=0)
    out = to_uint8_frames(v)
    # clamp to [-1, 1], (x + 1) / 2 * 255, truncated (as `(tensor * 255).type(torch.uint8)`)
    assert out.shape == (1, 1, 7, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 63, 127, 254, 255, 255]
    with pytest.raises(ValueError, match="expected a video"):
        to_uint8_frames(np.zeros((4, 2, 2, 2), np.float32))


def test_mp4_round_trip(tmp_path):
    frames = to_uint8_frames(gradient_video())
    out = write_mp4(frames, tmp_path / "v.mp4", fps=16)
    assert out == tmp_path / "v.mp4" and sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 16
        assert (stream.width, stream.height) == (48, 32)
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == frames.shape
    mse = np.mean((decoded.astype(np.float64) - frames) ** 2)
    assert 10 * np.log10(255**2 / mse) > 30  # PSNR: a faithful encode of a smooth video


def test_failed_writes_leave_nothing(tmp_path):
    frames = to_uint8_frames(gradient_video(t=2))
    with pytest.raises(WanrtError, match="even width and height"):
        write_mp4(frames[:, :31], tmp_path / "odd.mp4", fps=16)
    with pytest.raises(ValueError, match="fps >= 1"):
        write_mp4(frames, tmp_path / "zero.mp4", fps=0)
    (tmp_path / "taken.mp4").mkdir()  # the final rename fails: the temp file must go too
    with pytest.raises(OSError):
        write_mp4(frames, tmp_path / "taken.mp4", fps=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.mp4"]


def test_output_path_checks(tmp_path):
    assert check_output_path(tmp_path / "a.mp4") == tmp_path / "a.mp4"
    with pytest.raises(WanrtError, match="output must be an .mp4 file"):
        check_output_path(tmp_path / "a.gif")
    with pytest.raises(WanrtError, match="output folder does not exist"):
        check_output_path(tmp_path / "nope" / "a.mp4")


def test_png_frames(tmp_path):
    frames = to_uint8_frames(gradient_video(t=3))
    paths = write_png_frames(frames, tmp_path / "frames")
    assert [p.name for p in paths] == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    for p, f in zip(paths, frames):
        np.testing.assert_array_equal(np.asarray(Image.open(p)), f)
    write_png_frames(frames[:1], tmp_path / "frames")  # replaces its own earlier frames
    assert [p.name for p in (tmp_path / "frames").iterdir()] == ["frame_00000.png"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(WanrtError, match="holds other files"):
        write_png_frames(frames, tmp_path / "mine")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_outputs_get_the_permissions_of_a_plain_write(tmp_path):
    """Temp names are private (0600/0700); the finished mp4 and frames folder get 0666/0777 less the umask."""
    frames = to_uint8_frames(gradient_video(t=2))
    old = os.umask(0o027)
    try:
        write_mp4(frames, tmp_path / "v.mp4", fps=8)
        write_png_frames(frames, tmp_path / "frames")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "v.mp4").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "frames").stat().st_mode) == 0o750
