"""Official Wan size rules: frame counts, pixel sizes, I2V sizes from an area, TI2V output sizes.

Facts (wan-architecture.md §2, Wan2.1/2.2 `image2video.py`, `textimage2video.py`, `utils.py`):
* frames are 4k+1 (the VAE packs frame 0 alone, then 4 frames per latent frame);
* height and width are multiples of vae_stride * patch = 8*2 = 16 (32 for TI2V-5B's 16x VAE);
* I2V / FLF2V take their size from `max_area` and the image's aspect ratio:
  lat_h = round(sqrt(A*h/w) // 8 // 2 * 2), lat_w = round(sqrt(A*w/h) // 8 // 2 * 2);
* TI2V with an image uses `best_output_size(w, h, 32, 32, max_area)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wanrt.engines.errors import WanrtError

PATCH = (1, 2, 2)


@dataclass(frozen=True)
class VideoGeometry:
    """Pixel size of a video and the latent grid it maps to."""

    frames: int
    height: int
    width: int
    stride: tuple[int, int, int]  # VAE (t, h, w) compression
    ref_frames: int = 0  # VACE: latent frames of reference images before the video's (dropped before decoding)

    @property
    def latent_frames(self) -> int:
        """Latent frames the DiT denoises: the video's, and any reference frames in front."""
        return (self.frames - 1) // self.stride[0] + 1 + self.ref_frames

    @property
    def latent_height(self) -> int:
        return self.height // self.stride[1]

    @property
    def latent_width(self) -> int:
        return self.width // self.stride[2]

    def latent_shape(self, channels: int) -> tuple[int, int, int, int, int]:
        """[1, channels, frames', height', width']."""
        return (1, channels, self.latent_frames, self.latent_height, self.latent_width)

    @property
    def tokens(self) -> int:
        """DiT sequence length: latent frames x (latent h / 2) x (latent w / 2)."""
        return self.latent_frames * (self.latent_height // PATCH[1]) * (self.latent_width // PATCH[2])


def size_multiple(stride: tuple[int, int, int]) -> int:
    """Pixel multiple a size must have: VAE spatial stride x DiT patch (16, or 32 for the Wan2.2 VAE)."""
    return stride[1] * PATCH[1]


def check_frames(frames: int, temporal_stride: int = 4) -> int:
    """`frames` if it is 4k+1 and positive, else WanrtError naming the nearest valid counts."""
    if frames < 1 or (frames - 1) % temporal_stride:
        lo = max(1, (frames - 1) // temporal_stride * temporal_stride + 1)
        raise WanrtError(
            f"--frames {frames}: the frame count must be {temporal_stride}k+1 (e.g. {lo} or {lo + temporal_stride})"
        )
    return frames


def check_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """(height, width) if both are positive multiples of `multiple`, else WanrtError."""
    bad = [f"--{n} {v}" for n, v in (("height", height), ("width", width)) if v < multiple or v % multiple]
    if bad:
        raise WanrtError(
            f"{', '.join(bad)}: height and width must be positive multiples of {multiple} for this model"
            f" (e.g. {max(multiple, height // multiple * multiple)}x{max(multiple, width // multiple * multiple)})"
        )
    return height, width


def i2v_size(image_height: int, image_width: int, max_area: int, stride: tuple[int, int, int]) -> tuple[int, int]:
    """Official I2V/FLF2V (height, width): the largest grid-aligned size of the image's aspect within `max_area`."""
    aspect = image_height / image_width
    lat_h = round(math.sqrt(max_area * aspect) // stride[1] // PATCH[1] * PATCH[1])
    lat_w = round(math.sqrt(max_area / aspect) // stride[2] // PATCH[2] * PATCH[2])
    if lat_h < PATCH[1] or lat_w < PATCH[2]:
        raise WanrtError(
            f"image {image_width}x{image_height} with max area {max_area} px gives a {lat_w * stride[2]}x"
            f"{lat_h * stride[1]} video; use a larger --height/--width or a less elongated image"
        )
    return lat_h * stride[1], lat_w * stride[2]


def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: int) -> tuple[int, int]:
    """Wan2.2 `best_output_size`: (width, height) multiples of (dw, dh) within the area, closest in aspect ratio."""
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow
    ow1 = int(ow // dw * dw)
    oh2 = int(oh // dh * dh)
    if ow1 < dw or oh2 < dh:
        raise WanrtError(
            f"image {w}x{h} with max area {expected_area} px leaves no {dw}x{dh}-aligned size;"
            " use a larger --height/--width or a less elongated image"
        )
    oh1 = int(expected_area / ow1 // dh * dh)
    ow2 = int(expected_area / oh2 // dw * dw)
    if oh1 < dh or ow2 < dw:
        raise WanrtError(f"image {w}x{h}: no {dw}x{dh}-aligned size fits max area {expected_area} px")
    ratio1, ratio2 = ow1 / oh1, ow2 / oh2
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return ow1, oh1
    return ow2, oh2


def check_latent_range(
    name: str, geometry: VideoGeometry, dim_ranges: dict[str, tuple[int, int]]
) -> None:
    """WanrtError unless the latent frames/height/width lie in the ranges the engine `name` was built for."""
    sizes = {"frames": geometry.latent_frames, "height": geometry.latent_height, "width": geometry.latent_width}
    px = {"frames": geometry.stride[0], "height": geometry.stride[1], "width": geometry.stride[2]}
    for dim, value in sizes.items():
        lo_hi = dim_ranges.get(dim)
        if lo_hi is None or lo_hi[0] <= value <= lo_hi[1]:
            continue
        lo, hi = lo_hi
        if dim == "frames":
            what = f"{geometry.frames} frames ({value} latent frames); the engine takes {(lo - 1) * px[dim] + 1}..{(hi - 1) * px[dim] + 1}"
        else:
            what = f"{dim} {getattr(geometry, dim)} px ({value} latent); the engine takes {lo * px[dim]}..{hi * px[dim]} px"
        raise WanrtError(f"{what} (component {name!r} was built for latent {dim} {lo}..{hi})")
