"""Conditioning images without torch, checked against torch / the official constructions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from wanrt.engines.errors import WanrtError
from wanrt.runtime.image import (
    clip_pixel_values, conditioning_video, i2v_mask, image_to_array, load_image, match_last_frame, resize_bicubic,
    ti2v_image,
)  # fmt: skip


@pytest.mark.parametrize("src,dst", [((24, 40), (32, 48)), ((37, 53), (224, 224)), ((300, 200), (64, 48)), ((8, 8), (8, 8)), ((1, 5), (3, 2))])
def test_resize_bicubic_equals_torch(src, dst):
    x = np.random.default_rng(0).uniform(-1, 1, (3, *src)).astype(np.float32)
    ours = resize_bicubic(x, *dst)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=dst, mode="bicubic", align_corners=False)[0]
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=5e-6)  # float32 summation order


def test_image_to_array_and_clip_preprocessing_equal_the_official_steps(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    x = image_to_array(img)
    # official: TF.to_tensor(img).sub_(0.5).div_(0.5)
    ref = (torch.from_numpy(arr).permute(2, 0, 1).float() / 255).sub(0.5).div(0.5)
    np.testing.assert_allclose(x, ref.numpy(), rtol=0, atol=1e-7)
    # CLIP: bicubic to 224 (aspect not kept), mul 0.5 add 0.5, Normalize(mean, std) with the facts' values
    pix = clip_pixel_values([x, -x])
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    for k, src in enumerate((ref, -ref)):
        y = torch.nn.functional.interpolate(src[None], size=(224, 224), mode="bicubic", align_corners=False)[0]
        np.testing.assert_allclose(pix[k], ((y * 0.5 + 0.5 - mean) / std).numpy(), rtol=1e-5, atol=1e-5)
    assert pix.shape == (2, 3, 224, 224) and pix.dtype == np.float32


@pytest.mark.parametrize("frames,last", [(81, False), (81, True), (5, False), (9, True), (1, False)])
def test_i2v_mask_equals_the_official_construction(frames, last):
    h, w = 3, 4
    msk = torch.ones(1, frames, h, w)
    if last:
        msk[:, 1:-1] = 0
    else:
        msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, h, w).transpose(1, 2)[0]
    ours = i2v_mask(frames, h, w, last=last)
    assert ours.shape == (1, 4, (frames - 1) // 4 + 1, h, w)
    np.testing.assert_array_equal(ours[0], msk.numpy())


def test_conditioning_video_layout():
    first = np.full((3, 4, 6), 0.5, np.float32)
    last = np.full((3, 4, 6), -0.25, np.float32)
    v = conditioning_video(first, 9, last)
    assert v.shape == (1, 3, 9, 4, 6)
    assert (v[0, :, 0] == 0.5).all() and (v[0, :, -1] == -0.25).all() and not v[0, :, 1:-1].any()
    assert not conditioning_video(first, 5)[0, :, 1:].any()


def test_ti2v_image_resizes_to_cover_then_center_crops():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255  # a white middle third
    x = ti2v_image(Image.fromarray(arr), 64, 32)
    assert x.shape == (3, 32, 64)
    # cover scale = max(64/300, 32/100) = 0.32 -> 96x32, crop x 16..80: the white band 32..64 lands at 16..48
    assert x[:, :, 20:44].min() > 0.9 and x[:, :, :12].max() < -0.9 and x[:, :, 52:].max() < -0.9
    same = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 64, 3), dtype=np.uint8))
    np.testing.assert_array_equal(ti2v_image(same, 64, 32), image_to_array(same))


def test_match_last_frame_brings_it_to_the_first_frame_size():
    first = Image.new("RGB", (64, 32))
    assert match_last_frame(first, first.copy()).size == (64, 32)
    assert match_last_frame(first, Image.new("RGB", (40, 40))).size == (64, 32)


def test_load_image_errors_and_modes(tmp_path):
    with pytest.raises(WanrtError, match="missing.png: image not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(WanrtError, match="notes.png: unreadable image"):
        load_image(tmp_path / "notes.png")
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(good)
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(WanrtError, match="cut.png: unreadable image"):
        load_image(tmp_path / "cut.png")
    assert load_image(good).mode == "RGB"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk (PNG spec: length, type, data, CRC-32 over type + data), no pixel data."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (8193, 8192), (2**31 - 1, 1 << 16)])
def test_an_image_too_large_to_decode_is_refused_from_its_header(tmp_path, width, height):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(width, height))
    with pytest.raises(WanrtError, match=r"huge\.png: image of (\d+x\d+|more than \d+) pixels; at most 67108864 pixels"):
        load_image(path)
