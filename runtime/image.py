"""Conditioning images with Pillow + numpy: loading, torch-compatible bicubic resize, CLIP input, TI2V crop.

The official code converts a PIL image with `to_tensor(img).sub_(0.5).div_(0.5)` (values in
[-1, 1], [3, H, W]) and resizes with `torch.nn.functional.interpolate(mode="bicubic",
align_corners=False)`.  `resize_bicubic` reproduces that kernel (Keys cubic, a = -0.75, no
antialiasing, clamped borders) so the VAE and CLIP see the same pixels without torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from wanrt.engines.errors import WanrtError
from wanrt.engines.limits import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
_CUBIC_A = -0.75  # torch's bicubic coefficient


def load_image(path: str | os.PathLike):
    """Open an image file as RGB; WanrtError naming the file when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise WanrtError(f"{p}: image not found")
    limit = f"at most {MAX_IMAGE_PIXELS} pixels ({MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}) are decoded: downscale it first"
    try:
        with Image.open(p) as img:  # reads the header only: the size is known before any pixel is decoded
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise WanrtError(f"{p}: image of {width}x{height} pixels; {limit}")
            img.load()
            return img.convert("RGB")
    except Image.DecompressionBombError:  # Pillow's own bound (twice its MAX_IMAGE_PIXELS), met while opening
        raise WanrtError(f"{p}: image of more than {2 * Image.MAX_IMAGE_PIXELS} pixels; {limit}") from None
    except (UnidentifiedImageError, OSError, ValueError, MemoryError) as e:
        raise WanrtError(f"{p}: unreadable image ({type(e).__name__}: {e})") from None


def image_to_array(img) -> np.ndarray:
    """PIL RGB image -> float32 [3, H, W] in [-1, 1] (official `to_tensor(img).sub_(0.5).div_(0.5)`)."""
    x = np.asarray(img.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(((x - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1))


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys cubic convolution weights for taps at offsets -1, 0, 1, 2 from floor(x)."""
    a = np.float32(_CUBIC_A)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of torch's bicubic (align_corners=False) interpolation along one axis.

    Source coordinates and tap weights are computed in float32, as torch does for float32 images.
    """
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    real = scale * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5)
    base = np.floor(real)
    weights = _cubic_weights(real - base).astype(np.float64)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    for k, offset in enumerate((-1, 0, 1, 2)):
        idx = np.clip(base.astype(np.int64) + offset, 0, n_in - 1)
        np.add.at(m, (rows, idx), weights[:, k])
    return m


def resize_bicubic(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize float [C, H, W] (or [..., H, W]) like torch `interpolate(mode="bicubic", align_corners=False)`."""
    if x.shape[-2:] == (height, width):
        return x.astype(np.float32, copy=True)
    mh = _bicubic_matrix(x.shape[-2], height)
    mw = _bicubic_matrix(x.shape[-1], width)
    out = np.einsum("oh,...hw,pw->...op", mh, x.astype(np.float64), mw, optimize=True)
    return out.astype(np.float32)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of torch's bilinear (align_corners=False, no antialias) interpolation along one axis."""
    f32 = np.float32
    real = np.maximum(f32(n_in) / f32(n_out) * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
    base = np.minimum(real.astype(np.int64), n_in - 1)
    frac = (real - base).astype(np.float64)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, base), 1 - frac)
    np.add.at(m, (rows, np.minimum(base + 1, n_in - 1)), frac)
    return m


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize float [C, H, W] like torch `interpolate(mode="bilinear", align_corners=False)` (VACE reference images)."""
    if x.shape[-2:] == (height, width):
        return x.astype(np.float32, copy=True)
    mh, mw = _bilinear_matrix(x.shape[-2], height), _bilinear_matrix(x.shape[-1], width)
    return np.einsum("oh,...hw,pw->...op", mh, x.astype(np.float64), mw, optimize=True).astype(np.float32)


def clip_pixel_values(images: list[np.ndarray], size: int = 224) -> np.ndarray:
    """CLIP input [N, 3, size, size]: bicubic to size x size (aspect not kept), to [0, 1], CLIP mean/std."""
    out = []
    for x in images:
        y = resize_bicubic(x, size, size) * np.float32(0.5) + np.float32(0.5)
        out.append((y - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None])
    return np.stack(out).astype(np.float32)


def ti2v_image(img, width: int, height: int) -> np.ndarray:
    """TI2V conditioning frame: LANCZOS-resize to cover (width, height), center-crop, -> [3, height, width]."""
    from PIL import Image

    iw, ih = img.size
    scale = max(width / iw, height / ih)
    resized = img.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    x1 = (resized.width - width) // 2
    y1 = (resized.height - height) // 2
    return image_to_array(resized.crop((x1, y1, x1 + width, y1 + height)))


def match_last_frame(first, last):
    """FLF2V: bring the last frame to the first frame's size (scale to cover, center-crop).

    The official code means to do this but calls `center_crop` with (w, h) swapped and without
    resizing; same-size frames (the documented use) are returned unchanged either way.
    """
    from PIL import Image

    if last.size == first.size:
        return last
    fw, fh = first.size
    lw, lh = last.size
    scale = max(fw / lw, fh / lh)
    resized = last.resize((max(fw, round(lw * scale)), max(fh, round(lh * scale))), Image.BICUBIC)
    x1 = (resized.width - fw) // 2
    y1 = (resized.height - fh) // 2
    return resized.crop((x1, y1, x1 + fw, y1 + fh))


def conditioning_video(first: np.ndarray, frames: int, last: np.ndarray | None = None) -> np.ndarray:
    """VAE input for I2V/FLF2V: [1, 3, frames, H, W] = first frame, zeros, (last frame)."""
    c, h, w = first.shape
    video = np.zeros((1, c, frames, h, w), dtype=np.float32)
    video[0, :, 0] = first
    if last is not None:
        video[0, :, -1] = last
    return video


def i2v_mask(frames: int, latent_height: int, latent_width: int, last: bool = False) -> np.ndarray:
    """The 4-channel conditioning mask [1, 4, frames', h', w']: 1 on the given frames, 0 elsewhere.

    Official: ones(frames) with frames 1.. zeroed (FLF2V keeps the last), frame 0 repeated 4x,
    then (frames+3)/4 groups of 4 moved to the channel axis.
    """
    msk = np.zeros((frames + 3, latent_height, latent_width), dtype=np.float32)
    msk[:4] = 1.0
    if last:
        msk[-1] = 1.0
    lat_f = (frames + 3) // 4
    return np.ascontiguousarray(msk.reshape(lat_f, 4, latent_height, latent_width).transpose(1, 0, 2, 3))[None]
