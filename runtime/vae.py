"""Chunked VAE decoding and encoding through the `vae_decoder` / `vae_encoder` engines (numpy only).

The engines run one temporal chunk per call with explicit causal caches (the contract is in
`engines.vae_contract`), so working memory does not grow with the number of frames: this
module loops over the chunks, feeding each call the previous call's cache outputs, and writes
each chunk's frames into the preallocated result.  The engines take one video at a time; a
batch is decoded video by video.

Spatial tiling (optional, for large resolutions) follows diffusers' `AutoencoderKLWan`
`tiled_decode` / `tiled_encode` exactly: tiles of `Tiling.height` x `Tiling.width` latent
pixels every `stride_*`, each decoded through all frames with its own caches, each blended
into its upper and left neighbours with linear ramps over the overlap (in the decoder's
2x2-patch units for Wan2.2), then cropped to the stride.  Tiled output is an approximation of
whole-frame output: the VAE's receptive field and the per-frame attention of its middle block
reach across tiles.  Only one tile's caches and one tile's frames are held at a time, plus the
blend strips of the neighbouring tiles.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from wanrt.engines.errors import WanrtError
from wanrt.engines.manifest import Component
from wanrt.engines.vae_contract import VAEChunkContract

from .backends.base import Engine


@dataclass(frozen=True)
class Tiling:
    """Spatial tiles, in latent pixels: `height` x `width` tiles every `stride_height` / `stride_width`.

    The field defaults are diffusers' Wan2.1 tiles (256 pixels every 192 at 8 pixels per latent
    pixel); `Tiling.for_stride(16)` gives diffusers' Wan2.2 tiles (the same pixels, 16 latent).
    """

    height: int = 32
    width: int = 32
    stride_height: int = 24
    stride_width: int = 24

    def __post_init__(self) -> None:
        if not (0 < self.stride_height <= self.height and 0 < self.stride_width <= self.width):
            raise WanrtError(f"tiling {self}: strides must be positive and at most the tile size")

    @classmethod
    def for_stride(cls, spatial_stride: int, tile_pixels: int = 256, stride_pixels: int = 192) -> "Tiling":
        """diffusers' tiles (`tile_pixels` every `stride_pixels`) in latent pixels of a VAE with `spatial_stride`."""
        tile, step = tile_pixels // spatial_stride, stride_pixels // spatial_stride
        return cls(tile, tile, step, step)

    def needed(self, height: int, width: int) -> bool:
        """Whether a latent grid of `height` x `width` is larger than one tile."""
        return height > self.height or width > self.width

    def count(self, height: int, width: int) -> int:
        """Tiles covering a latent grid of `height` x `width` (1 when tiling is not needed)."""
        if not self.needed(height, width):
            return 1
        return math.ceil(height / self.stride_height) * math.ceil(width / self.stride_width)


def contract_of(component: Component, part: str) -> VAEChunkContract:
    """The chunk contract in a VAE component's manifest attributes (checked to be the right part)."""
    contract = VAEChunkContract.from_attributes(component.attributes, where=f"component {component.name!r}")
    if contract.part != part:
        raise WanrtError(f"component {component.name!r} is a VAE {contract.part}, expected a VAE {part}")
    return contract


def _zero_caches(contract: VAEChunkContract, height: int, width: int) -> dict[str, np.ndarray]:
    return {
        contract.cache_names(i)[0]: np.zeros(contract.cache_shape(i, height, width), np.float32)
        for i in range(len(contract.caches))
    }


def _run_chunks(
    engine: Engine, contract: VAEChunkContract, chunks: Iterator[np.ndarray], height: int, width: int, bar: tqdm
) -> Iterator[np.ndarray]:
    """Run the engine on each chunk of a `height` x `width` latent grid, threading the caches; yield each main output."""
    main_in, main_out = engine.signature.input_names[0], engine.signature.output_names[0]
    caches = _zero_caches(contract, height, width)
    for index, chunk in enumerate(chunks):
        outputs = engine.run({main_in: chunk, "first": np.array([index == 0]), **caches})
        caches = {contract.cache_names(i)[0]: outputs[contract.cache_names(i)[1]] for i in range(len(contract.caches))}
        bar.update(1)
        yield outputs[main_out]


def _bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="call", file=sys.stderr, disable=not enabled, leave=False)


# ----------------------------------------------------------------------------- decoding


def decode_latents(
    engine: Engine, component: Component, z: np.ndarray, tiling: Tiling | None = None, progress: bool = False
) -> np.ndarray:
    """Normalized latents [B, z, F, h, w] -> video [B, 3, 4F-3, h·s, w·s] float32 in [-1, 1].

    `progress` shows a bar over the engine calls on stderr.
    """
    contract = contract_of(component, "decoder")
    if z.ndim != 5 or z.shape[1] != contract.z_dim or z.shape[2] < 1:
        raise WanrtError(
            f"latents of shape {list(z.shape)}: the {component.name} engine expects [batch, {contract.z_dim}, frames, height, width]"
        )
    z = np.asarray(z, dtype=np.float32)
    b, _, f, h, w = z.shape
    s, n = contract.spatial_stride, contract.chunk_frames
    video = np.empty((b, 3, 1 + n * (f - 1), h * s, w * s), np.float32)
    tiled = tiling is not None and tiling.needed(h, w)
    with _bar(b * f * (tiling.count(h, w) if tiled else 1), "vae decode", progress) as bar:
        for i in range(b):
            if tiled:
                _decode_tiled(engine, contract, z[i : i + 1], tiling, video[i : i + 1], bar)
            else:
                _decode_region(engine, contract, z[i : i + 1], video[i : i + 1], bar)
    return np.clip(video, -1.0, 1.0, out=video)


def _decode_region(engine: Engine, contract: VAEChunkContract, z: np.ndarray, out: np.ndarray, bar: tqdm) -> None:
    """Decode latents [1, z, F, h, w] chunk by chunk into `out` [1, 3, T, h·s, w·s] (not clamped)."""
    frames = (np.ascontiguousarray(z[:, :, k : k + 1]) for k in range(z.shape[2]))
    t = 0
    for k, chunk in enumerate(_run_chunks(engine, contract, frames, z.shape[3], z.shape[4], bar)):
        chunk = chunk[:, :, :1] if k == 0 else chunk  # the first call yields one frame
        out[:, :, t : t + chunk.shape[2]] = chunk
        t += chunk.shape[2]


def _decode_tiled(
    engine: Engine, contract: VAEChunkContract, z: np.ndarray, tiling: Tiling, out: np.ndarray, bar: tqdm
) -> None:
    """diffusers `tiled_decode` for one video, writing the blended tiles into `out`."""
    s, n = contract.spatial_stride, contract.chunk_frames
    h, w = z.shape[-2:]
    frames = 1 + n * (z.shape[2] - 1)
    unit = contract.patch_size  # diffusers blends the decoder's patchified output (Wan2.2)
    blend_h, blend_w = (tiling.height - tiling.stride_height) * s, (tiling.width - tiling.stride_width) * s
    above: dict[int, np.ndarray] = {}  # column index -> bottom rows of the tile above (blended)
    for i in range(0, h, tiling.stride_height):
        left: np.ndarray | None = None  # right columns of the tile to the left (blended)
        row_above: dict[int, np.ndarray] = {}
        for j in range(0, w, tiling.stride_width):
            zt = np.ascontiguousarray(z[:, :, :, i : i + tiling.height, j : j + tiling.width])
            _check_tile(zt.shape[-2:], component_name=engine.name)
            tile = np.empty((1, 3, frames, zt.shape[3] * s, zt.shape[4] * s), np.float32)
            _decode_region(engine, contract, zt, tile, bar)
            if j in above:
                _blend(above[j], tile, blend_h, unit, axis=3)
            if left is not None:
                _blend(left, tile, blend_w, unit, axis=4)
            row_above[j], left = _tail(tile, blend_h, axis=3), _tail(tile, blend_w, axis=4)
            y, x = i * s, j * s
            crop = tile[:, :, :, : tiling.stride_height * s, : tiling.stride_width * s]
            crop = crop[:, :, :, : out.shape[3] - y, : out.shape[4] - x]
            out[:, :, :, y : y + crop.shape[3], x : x + crop.shape[4]] = crop
        above = row_above


def _blend(a: np.ndarray, b: np.ndarray, extent: int, unit: int, axis: int) -> None:
    """diffusers `blend_v` / `blend_h`: ramp the start of `b` from the end of `a` along `axis`, in place.

    The ramp steps every `unit` pixels (diffusers blends Wan2.2's patchified output).
    """
    extent_units = min(a.shape[axis] // unit, b.shape[axis] // unit, extent // unit)
    size = extent_units * unit
    if size == 0:
        return
    weight = (np.arange(size) // unit / extent_units).astype(np.float32)
    shape = [1] * b.ndim
    shape[axis] = size
    weight = weight.reshape(shape)
    head = [slice(None)] * b.ndim
    head[axis] = slice(0, size)
    tail = [slice(None)] * a.ndim
    tail[axis] = slice(a.shape[axis] - size, a.shape[axis])
    b[tuple(head)] = a[tuple(tail)] * (1 - weight) + b[tuple(head)] * weight


def _tail(t: np.ndarray, size: int, axis: int) -> np.ndarray:
    """A copy of the last `size` entries of `t` along `axis` (all of them if fewer): a blend strip."""
    index = [slice(None)] * t.ndim
    index[axis] = slice(max(t.shape[axis] - size, 0), t.shape[axis])
    return t[tuple(index)].copy()


def _check_tile(spatial: tuple[int, ...], component_name: str) -> None:
    if min(spatial) < 2:
        raise WanrtError(
            f"{component_name}: a tile of {spatial[0]}x{spatial[1]} latent pixels is too small for the engine "
            "(at least 2x2); choose a tile size and stride that leave larger edge tiles"
        )


# ----------------------------------------------------------------------------- encoding


def encode_video(
    engine: Engine, component: Component, video: np.ndarray, tiling: Tiling | None = None, progress: bool = False
) -> np.ndarray:
    """Video [B, 3, T, H, W] in [-1, 1] (T = 4k+1) -> normalized latent means [B, z, k+1, H/s, W/s].

    `progress` shows a bar over the engine calls on stderr.
    """
    contract = contract_of(component, "encoder")
    s, n = contract.spatial_stride, contract.chunk_frames
    if video.ndim != 5 or video.shape[1] != 3:
        raise WanrtError(f"video of shape {list(video.shape)}: the {component.name} engine expects [batch, 3, frames, height, width]")
    b, _, t, hh, ww = video.shape
    if t % n != 1:
        raise WanrtError(f"video of {t} frames: the Wan{contract.version} VAE encodes {n}k+1 frames")
    if hh % s or ww % s:
        raise WanrtError(f"video of {hh}x{ww} pixels: the Wan{contract.version} VAE needs multiples of {s}")
    video = np.asarray(video, dtype=np.float32)
    h, w = hh // s, ww // s
    latents = np.empty((b, contract.z_dim, 1 + (t - 1) // n, h, w), np.float32)
    tiled = tiling is not None and tiling.needed(h, w)
    with _bar(b * latents.shape[2] * (tiling.count(h, w) if tiled else 1), "vae encode", progress) as bar:
        for i in range(b):
            if tiled:
                _encode_tiled(engine, contract, video[i : i + 1], tiling, latents[i : i + 1], bar)
            else:
                _encode_region(engine, contract, video[i : i + 1], latents[i : i + 1], bar)
    return latents


def _encode_region(engine: Engine, contract: VAEChunkContract, video: np.ndarray, out: np.ndarray, bar: tqdm) -> None:
    """Encode a video [1, 3, T, H, W] chunk by chunk into `out` [1, z, F, h, w]."""
    n = contract.chunk_frames
    first = np.repeat(video[:, :, :1], n, axis=2)  # chunk 0: frame 0 (only output frame 0 matters)
    chunks = [first] + [np.ascontiguousarray(video[:, :, k : k + n]) for k in range(1, video.shape[2], n)]
    for k, latent in enumerate(_run_chunks(engine, contract, iter(chunks), out.shape[3], out.shape[4], bar)):
        out[:, :, k : k + 1] = latent


def _encode_tiled(
    engine: Engine, contract: VAEChunkContract, video: np.ndarray, tiling: Tiling, out: np.ndarray, bar: tqdm
) -> None:
    """diffusers `tiled_encode` for one video, writing the blended latent tiles into `out`."""
    s = contract.spatial_stride
    h, w = out.shape[-2:]
    blend_h, blend_w = tiling.height - tiling.stride_height, tiling.width - tiling.stride_width
    above: dict[int, np.ndarray] = {}
    for i in range(0, h, tiling.stride_height):
        left: np.ndarray | None = None
        row_above: dict[int, np.ndarray] = {}
        for j in range(0, w, tiling.stride_width):
            vt = video[:, :, :, i * s : (i + tiling.height) * s, j * s : (j + tiling.width) * s]
            _check_tile((vt.shape[3] // s, vt.shape[4] // s), component_name=engine.name)
            tile = np.empty((*out.shape[:3], vt.shape[3] // s, vt.shape[4] // s), np.float32)
            _encode_region(engine, contract, vt, tile, bar)
            if j in above:
                _blend(above[j], tile, blend_h, 1, axis=3)
            if left is not None:
                _blend(left, tile, blend_w, 1, axis=4)
            row_above[j], left = _tail(tile, blend_h, axis=3), _tail(tile, blend_w, axis=4)
            crop = tile[:, :, :, : tiling.stride_height, : tiling.stride_width][:, :, :, : h - i, : w - j]
            out[:, :, :, i : i + crop.shape[3], j : j + crop.shape[4]] = crop
        above = row_above
