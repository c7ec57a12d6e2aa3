"""Wan2.1-VACE conditioning, torch-free: control video, mask and reference images -> `vace_context`.

Facts (Wan2.1 `wan/vace.py`, `WanVace`):
- `prepare_source`: no video -> a zero video and an all-ones mask (generate everything); a video
  without a mask -> an all-ones mask; a mask video is read in [-1, 1] and mapped back with
  `clamp((m + 1) / 2, 0, 1)` from its first channel; a reference image that is not the video's
  size is resized (bilinear, align_corners=False) to fit and centred on a white canvas.
- `vace_encode_frames`: the mask is binarized (`> 0.5`); `inactive = video * (1 - m)` and
  `reactive = video * m` are VAE-encoded and stacked as 32 channels; each reference image is
  encoded alone (one latent frame), given 16 zero channels and put before the video's latent
  frames, in the order given.
- `vace_encode_masks`: the mask's 8x8 pixel cells become 64 channels (`view(T, h, 8, w, 8)
  .permute(2, 4, 0, 1, 3)`), resampled in time to the latent frames with `nearest-exact`, with
  zero frames for the references in front; `vace_latent` stacks latents and mask: 96 channels.
- the noise has the control latents' frames (references included); `decode_latent` drops the
  reference frames before decoding.

Inputs are the videos the user prepared (depth, pose, scribble, gray, inpainting masks); they are
read with PyAV (files) or Pillow (a folder of frames), never resized: the video gives the size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from wanrt.engines.errors import WanrtError

from . import image as images

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_CELL = 8  # pixels per side of a mask cell: the Wan2.1 VAE's spatial stride


@dataclass
class VaceSource:
    """What the VACE branch is conditioned on, as the official `prepare_source` leaves it."""

    video: np.ndarray  # [3, T, H, W] in [-1, 1] (zeros when no control video)
    mask: np.ndarray  # [1, T, H, W] in [0, 1] (1: generate, 0: keep)
    refs: list[np.ndarray] = field(default_factory=list)  # [3, H, W] in [-1, 1], at the video's size

    @property
    def ref_frames(self) -> int:
        """Latent frames the reference images add in front (one each)."""
        return len(self.refs)


def read_frames(path: str | os.PathLike, option: str) -> np.ndarray:
    """A video file (PyAV) or a folder of frame images (sorted by name) -> uint8 [T, H, W, 3]."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise WanrtError(f"{option} {p}: the folder holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        frames = [np.asarray(images.load_image(f), dtype=np.uint8) for f in files]
        if len({f.shape for f in frames}) > 1:
            sizes = sorted({f"{f.shape[1]}x{f.shape[0]}" for f in frames})
            raise WanrtError(f"{option} {p}: the frames differ in size ({', '.join(sizes)})")
        return np.stack(frames)
    if not p.is_file():
        raise WanrtError(f"{option} {p}: no such video file or frames folder")
    import av

    try:
        with av.open(str(p)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as e:
        raise WanrtError(f"{option} {p}: unreadable video ({type(e).__name__}: {e})") from None
    if not frames:
        raise WanrtError(f"{option} {p}: the video has no frames")
    return np.stack(frames)


def frames_to_video(frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [3, T, H, W] in [-1, 1] (official `to_tensor(x).sub_(0.5).div_(0.5)`)."""
    x = frames.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(((x - np.float32(0.5)) / np.float32(0.5)).transpose(3, 0, 1, 2))


def frames_to_mask(frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [1, T, H, W] in [0, 1]: the first channel, as `clamp((m + 1) / 2, 0, 1)`."""
    return (frames[None, ..., 0].astype(np.float32) / np.float32(255.0)).clip(0.0, 1.0)


def fit_reference(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A [3, h, w] image in [-1, 1] fitted into a white [3, height, width] canvas (official `prepare_source`)."""
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image.astype(np.float32, copy=True)
    scale = min(height / h, width / w)
    new_h, new_w = int(h * scale), int(w * scale)
    canvas = np.ones((3, height, width), dtype=np.float32)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[:, top : top + new_h, left : left + new_w] = images.resize_bilinear(image, new_h, new_w)
    return canvas


def load_source(
    video: str | os.PathLike | None, mask: str | os.PathLike | None, refs: list[str | os.PathLike],
    frames: int | None, height: int, width: int, default_frames: int, multiple: int, temporal_stride: int,
) -> tuple[VaceSource, int]:
    """The VACE source of a request and its frame count; WanrtError naming the option at fault.

    Without --video the size is `height` x `width` and the count `frames` (or the default); with
    one, the video gives the size, and the count is `frames` or the most 4k+1 frames the video and
    the default allow.  The mask must match the video frame for frame and pixel for pixel."""
    if video is None:
        count = frames if frames is not None else default_frames
        source = VaceSource(np.zeros((3, count, height, width), np.float32), np.ones((1, count, height, width), np.float32))
    else:
        clip = read_frames(video, "--video")
        t, h, w = clip.shape[:3]
        if h % multiple or w % multiple:
            raise WanrtError(f"--video {video}: {w}x{h} pixels; the model takes sizes in multiples of {multiple}"
                             " (resize or crop the video)")
        count = frames if frames is not None else min(default_frames, (t - 1) // temporal_stride * temporal_stride + 1)
        if t < count:
            raise WanrtError(f"--video {video}: {t} frames, fewer than the {count} to generate (pass --frames)")
        source = VaceSource(frames_to_video(clip[:count]), np.ones((1, count, h, w), np.float32))
        if mask is not None:
            m = read_frames(mask, "--mask")
            if m.shape[1:3] != (h, w) or m.shape[0] < count:
                raise WanrtError(f"--mask {mask}: {m.shape[0]} frames of {m.shape[2]}x{m.shape[1]}; the video needs"
                                 f" {count} frames of {w}x{h}")
            source.mask = frames_to_mask(m[:count])
    size = source.video.shape[-2:]
    for path in refs:
        try:
            ref = images.image_to_array(images.load_image(path))
        except WanrtError as e:
            raise WanrtError(f"--ref-image {e}") from None
        source.refs.append(fit_reference(ref, *size))
    return source, count


def pack_mask(mask: np.ndarray, ref_frames: int, temporal_stride: int = 4, cell: int = MASK_CELL) -> np.ndarray:
    """[1, T, H, W] -> [cell*cell, ref_frames + (T + 3) // 4, H / cell, W / cell] (official `vace_encode_masks`)."""
    _, t, hh, ww = mask.shape
    h, w = hh // cell, ww // cell
    cells = mask[0].reshape(t, h, cell, w, cell).transpose(2, 4, 0, 1, 3).reshape(cell * cell, t, h, w)
    latent_frames = (t + temporal_stride - 1) // temporal_stride
    picked = cells[:, nearest_exact(t, latent_frames)]
    return np.concatenate([np.zeros((cell * cell, ref_frames, h, w), np.float32), picked], axis=1)


def nearest_exact(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output of torch's `interpolate(mode="nearest-exact")` along one axis."""
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale).astype(np.int64), n_in - 1)


def vace_context(source: VaceSource, encode: Callable[[np.ndarray], np.ndarray], temporal_stride: int = 4) -> np.ndarray:
    """[1, 96, refs + latent frames, h, w]: inactive | reactive latents (refs: latent | zeros), then the packed mask.

    `encode(video [1, 3, T, H, W]) -> [1, 16, T', h, w]` is the VAE encoder (normalized latents)."""
    keep = (source.mask > 0.5).astype(np.float32)
    inactive = encode((source.video * (1 - keep))[None])
    reactive = encode((source.video * keep)[None])
    latents = [np.concatenate([inactive, reactive], axis=1)]
    refs = [encode(ref[None, :, None]) for ref in source.refs]
    latents = [np.concatenate([z, np.zeros_like(z)], axis=1) for z in refs] + latents
    mask = pack_mask(source.mask, len(refs), temporal_stride)[None]
    return np.concatenate([np.concatenate(latents, axis=2), mask], axis=1).astype(np.float32, copy=False)
