"""Video output: decoded [-1, 1] video -> uint8 frames -> H.264 mp4 (PyAV) and optional PNG frames.

Both writers build the output beside its destination under a temporary name and rename it
into place only when complete, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from wanrt.engines.errors import WanrtError
from wanrt.engines.files import atomic_output


def to_uint8_frames(video: np.ndarray) -> np.ndarray:
    """[3, T, H, W] (or [1, 3, T, H, W]) in [-1, 1] -> uint8 [T, H, W, 3].

    As the official `save_video`: clamp to [-1, 1], map to [0, 1], multiply by 255 and truncate.
    """
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"expected one video, got a batch of {video.shape[0]}")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W], got {list(video.shape)}")
    x = (np.clip(video, -1.0, 1.0) + 1.0) / 2.0
    return np.ascontiguousarray((x * 255.0).astype(np.uint8).transpose(1, 2, 3, 0))


def check_output_path(path: str | os.PathLike, suffix: str = ".mp4") -> Path:
    """The output path, if its folder exists and it is not a folder; WanrtError otherwise."""
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise WanrtError(f"{p}: output must be an {suffix} file")
    if p.is_dir():
        raise WanrtError(f"{p}: is a folder; expected an {suffix} file path")
    if not p.parent.is_dir():
        raise WanrtError(f"{p.parent}: output folder does not exist")
    if not os.access(p.parent, os.W_OK):
        raise WanrtError(f"{p.parent}: output folder is not writable")
    return p


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int, crf: int = 18) -> Path:
    """Encode uint8 [T, H, W, 3] frames as H.264 (yuv420p) at `fps`; atomic (temp file, then rename)."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    t, h, w, _ = frames.shape
    if t < 1 or int(fps) < 1:
        raise ValueError(f"need at least one frame and fps >= 1, got {t} frames at {fps} fps")
    if h % 2 or w % 2:  # yuv420p needs even sizes
        raise WanrtError(f"video size {w}x{h}: H.264 (yuv420p) needs an even width and height")
    dest = Path(path)
    with atomic_output(dest) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=int(fps))
            stream.width, stream.height = w, h
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return dest


def check_frames_dir(folder: str | os.PathLike) -> Path:
    """The absolute frames folder, if it is absent or holds only our `frame_*.png` files (so it may be replaced)."""
    dest = Path(folder).absolute()
    if dest.exists() and not dest.is_dir():
        raise WanrtError(f"{dest}: exists and is not a folder")
    if dest.is_dir() and any(not p.name.startswith("frame_") or p.suffix != ".png" for p in dest.iterdir()):
        raise WanrtError(f"{dest}: folder holds other files; refusing to replace it with frames")
    return dest


def write_png_frames(frames: np.ndarray, folder: str | os.PathLike) -> list[Path]:
    """Write frames as `frame_00000.png`, ... into `folder` (created, or replaced if it holds only our PNGs)."""
    from PIL import Image

    dest = check_frames_dir(folder)
    names = [f"frame_{i:05d}.png" for i in range(len(frames))]
    with atomic_output(dest, directory=True) as tmp:
        for name, frame in zip(names, frames):
            Image.fromarray(frame).save(tmp / name)
    return [dest / n for n in names]
