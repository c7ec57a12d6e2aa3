"""The chunk contract of the VAE engines `vae_encoder` and `vae_decoder` (pure Python).

Both engines run one temporal chunk per call, so their memory does not grow with the number
of frames: every causal cache is an explicit engine input (`cache_in_NN`) and output
(`cache_out_NN`), and the runtime loops, feeding each call the previous call's cache outputs.
One graph serves every call; a boolean `first` input marks a clip's first call, which the
official code handles specially (see `export/models/vae.py`).

Dims: `height`/`width` are latent rows/columns; `height_xS`/`width_xS` are S times those
(S = `spatial_stride` for video pixels, or a cache's `scale`).  `C` below is `chunk_frames`
(4: the temporal stride).  The batch is fixed at 1 (a dynamic batch makes tracing the ~400-op
graph twice as slow and saves nothing: the runtime loops over videos).

vae_decoder, one call per latent frame f = 0 .. F-1 (F latent frames -> 4F-3 video frames):
    inputs   latent       float32 [1, z_dim, 1, height, width]     normalized latent frame f
             first        bool    [1]                              true for f == 0
             cache_in_NN  float32 [1, channels, frames, height_xS, width_xS]   per `caches[NN]`
    outputs  video        float32 [1, 3, C, height_xP, width_xP]   decoder output, NOT clamped
             cache_out_NN float32 (same shape as cache_in_NN)
    Call f = 0 with all-zero caches and first = true, and keep only video frame 0; every later
    call yields C frames.  Clamp the assembled video to [-1, 1] (after any tiling blend).

vae_encoder, one call per chunk k = 0 .. K-1 of a video of 4(K-1)+1 frames:
    inputs   video        float32 [1, 3, C, height_xP, width_xP]   pixels in [-1, 1]
             first        bool    [1]                              true for k == 0
             cache_in_NN  (as for the decoder)
    outputs  latent       float32 [1, z_dim, 1, height, width]     normalized latent mean of chunk k
             cache_out_NN
    Chunk 0 is video frame 0 repeated C times (first = true, all-zero caches); chunk k > 0 is
    frames 1 + C(k-1) .. C·k.

The caches are the tensors the official code keeps between chunks (the last 2 input frames of
every kernel-3 causal conv, the last frame of every `downsample3d`), in float32: 3.5 GiB for the
Wan2.1 decoder at 480x832 (32 caches), 6.0 GiB for the Wan2.2 decoder at 704x1280; spatial tiling
(`runtime.vae.Tiling`) bounds them by the tile size.

The manifest component's `attributes` hold `VAEChunkContract.attributes()` (contract, part,
version, z_dim, spatial_stride, chunk_frames, patch_size, and caches as [channels, frames, scale]
triples); the runtime rebuilds the contract (cache shapes for any latent size) with
`VAEChunkContract.from_attributes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import BundleError, WanrtError
from .model import VAEInfo
from .signatures import DIM_RANGES, EngineSignature, TensorSpec

CONTRACT = "wanrt-vae-chunks/1"
PARTS = ("encoder", "decoder")


@dataclass(frozen=True)
class CacheSpec:
    """One causal cache: `channels` x `frames` at `scale` times the latent height and width."""

    channels: int
    frames: int
    scale: int


def spatial_dim(axis: str, scale: int) -> str:
    """Name of the dim `scale` times the latent `axis` ("height" -> "height_x4")."""
    return axis if scale == 1 else f"{axis}_x{scale}"


@dataclass(frozen=True)
class VAEChunkContract:
    """Everything the runtime needs to drive a VAE engine chunk by chunk."""

    part: str  # "encoder" or "decoder"
    version: str  # "2.1" or "2.2"
    z_dim: int
    spatial_stride: int  # video pixels per latent pixel: 8 (2.1) / 16 (2.2)
    chunk_frames: int  # video frames per call (the temporal stride, 4)
    caches: tuple[CacheSpec, ...]
    patch_size: int = 1  # pixels folded into channels around the encoder/decoder: 2x2 for Wan2.2

    @property
    def component(self) -> str:
        return f"vae_{self.part}"

    def cache_names(self, index: int) -> tuple[str, str]:
        """(input name, output name) of cache `index`."""
        return f"cache_in_{index:02d}", f"cache_out_{index:02d}"

    def cache_shape(self, index: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of cache `index` for a latent grid of `height` x `width`."""
        c = self.caches[index]
        return (1, c.channels, c.frames, height * c.scale, width * c.scale)

    def signature(self) -> EngineSignature:
        """The engine's inputs and outputs, in binding order."""
        p = self.spatial_stride
        latent = TensorSpec("latent", "float32", (1, self.z_dim, 1, "height", "width"))
        video = TensorSpec("video", "float32", (1, 3, self.chunk_frames, spatial_dim("height", p), spatial_dim("width", p)))
        first = TensorSpec("first", "bool", (1,))
        cache_in, cache_out = [], []
        for i, c in enumerate(self.caches):
            shape = (1, c.channels, c.frames, spatial_dim("height", c.scale), spatial_dim("width", c.scale))
            name_in, name_out = self.cache_names(i)
            cache_in.append(TensorSpec(name_in, "float32", shape))
            cache_out.append(TensorSpec(name_out, "float32", shape))
        main_in, main_out = (video, latent) if self.part == "encoder" else (latent, video)
        ranges = {}
        lo, hi = DIM_RANGES["height"]
        for scale in sorted({1, p, *(c.scale for c in self.caches)}):
            for axis in ("height", "width"):
                ranges[spatial_dim(axis, scale)] = (lo * scale, hi * scale)
        return EngineSignature((main_in, first, *cache_in), (main_out, *cache_out), ranges)

    def attributes(self) -> dict[str, Any]:
        """The manifest `attributes` of the component."""
        return {
            "contract": CONTRACT,
            "part": self.part,
            "version": self.version,
            "z_dim": self.z_dim,
            "spatial_stride": self.spatial_stride,
            "chunk_frames": self.chunk_frames,
            "patch_size": self.patch_size,
            "caches": [[c.channels, c.frames, c.scale] for c in self.caches],
        }

    @classmethod
    def from_attributes(cls, attributes: dict[str, Any], where: str = "vae component") -> "VAEChunkContract":
        """Rebuild the contract from manifest attributes; BundleError names what is wrong."""
        if attributes.get("contract") != CONTRACT:
            raise BundleError(
                f"{where}: VAE chunk contract {attributes.get('contract')!r}, expected {CONTRACT!r} "
                "(rebuild the bundle with this version of wanrt)"
            )
        try:
            contract = cls(
                part=str(attributes["part"]),
                version=str(attributes["version"]),
                z_dim=int(attributes["z_dim"]),
                spatial_stride=int(attributes["spatial_stride"]),
                chunk_frames=int(attributes["chunk_frames"]),
                caches=tuple(CacheSpec(int(c), int(f), int(s)) for c, f, s in attributes["caches"]),
                patch_size=int(attributes["patch_size"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: malformed VAE chunk attributes ({type(e).__name__}: {e})") from None
        if contract.part not in PARTS:
            raise BundleError(f"{where}: VAE part {contract.part!r}, expected one of {PARTS}")
        return contract


def check_vae_matches(vae: str | int | VAEInfo, dit_out_dim: int, where: str = "") -> VAEInfo:
    """The VAE's info if its latent channels equal the DiT's `out_dim`; else a WanrtError saying which VAE is needed.

    `vae` is a version ("2.1"/"2.2"), a latent channel count (16/48) or a `VAEInfo`; `where`
    (e.g. the VAE file) prefixes the message.
    """
    if isinstance(vae, VAEInfo):
        info = vae
    elif isinstance(vae, int):
        known = {VAEInfo.for_version(v).z_dim: v for v in ("2.1", "2.2")}
        if vae not in known:
            raise WanrtError(f"{where + ': ' if where else ''}a VAE with {vae} latent channels is not a Wan VAE (16 or 48)")
        info = VAEInfo.for_version(known[vae])
    else:
        try:
            info = VAEInfo.for_version(vae)
        except ValueError as e:
            raise WanrtError(f"{where + ': ' if where else ''}{e}") from None
    if info.z_dim != dit_out_dim:
        needed = {16: "the Wan2.1 VAE (Wan2.1_VAE.pth)", 48: "the Wan2.2 VAE (Wan2.2_VAE.pth)"}
        need = needed.get(dit_out_dim, f"a VAE with {dit_out_dim} latent channels")
        raise WanrtError(
            f"{where + ': ' if where else ''}the Wan{info.version} VAE has {info.z_dim} latent channels but the DiT "
            f"predicts {dit_out_dim} (out_dim); this model needs {need}"
        )
    return info
