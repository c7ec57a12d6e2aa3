"""The Wan2.1 and Wan2.2 video VAEs, export-ready, with explicit chunk caches.

`WanVAE.state_dict()` keys are exactly those of the official `Wan2.1_VAE.pth` (`wan/modules/vae.py`)
and `Wan2.2_VAE.pth` (`wan/modules/vae2_2.py`); the math follows those modules.

Chunking.  The official code encodes frame 0 alone, then chunks of 4 frames (one latent frame
each), and decodes one latent frame per call (the first yields 1 frame, the others 4).  Every
kernel-3 causal conv carries the last `CACHE_T = 2` input frames of the previous call; a
`downsample3d` carries its last frame.  Here each call has one fixed shape, so one graph
serves every call and its caches are plain tensors (inputs and outputs of an engine):

- encoder call: 4 frames in, 1 latent frame out (the clip's first call gets frame 0 repeated);
- decoder call: 1 latent frame in, 4 frames out (the caller keeps frame 0 of the first call);
- a boolean `first` tensor marks the clip's first call and starts from all-zero caches.

Every operation is causal in time, so on the first call frame 0 of every activation equals
the official single-frame computation.  The official first-chunk special cases become
`torch.where(first, ...)` selections between tensors of the same shape:

- a causal conv's zero-padded single frame is its cache's zeros; its next cache is
  [zero, frame 0] (the official single frame, which it later zero-pads);
- `upsample3d` skips `time_conv` ('Rep') and keeps the frame single: each frame is repeated
  instead of split in two, and the `time_conv` cache stays zero ('Rep' pads with zeros);
- `downsample3d` skips `time_conv` and keeps the frame: frames 0, 2, ... pass through;
- Wan2.2's `AvgDown3D` pads the single frame with a zero frame in front (the input is shifted
  by one frame), and `DupUp3D` drops its first `factor_t - 1` frames (the output is shifted).

`ChunkState` hands each layer its cache in call order and collects the new ones.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from wanrt.engines.errors import CheckpointError, WanrtError

if TYPE_CHECKING:
    from wanrt.export.checkpoint.view import TensorSource

CACHE_T = 2  # frames of history a kernel-3 causal conv reads from the previous chunk

# Latent normalization constants: `WanVAE.__init__` (vae.py) and `Wan2_2_VAE.__init__` (vae2_2.py).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip

VAE_VERSIONS = ("2.1", "2.2")


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of a Wan VAE (official `WanVAE_` constructor fields)."""

    version: str  # "2.1" or "2.2"
    dim: int  # encoder base width: 96 (2.1) / 160 (2.2)
    dec_dim: int  # decoder base width: 96 (2.1) / 256 (2.2)
    z_dim: int  # latent channels: 16 / 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self) -> None:
        if self.version not in VAE_VERSIONS:
            raise ValueError(f"unknown VAE version {self.version!r}; expected one of {VAE_VERSIONS}")

    @property
    def patch_size(self) -> int:
        """Wan2.2 folds 2x2 pixels into channels before the encoder (and unfolds after the decoder)."""
        return 2 if self.version == "2.2" else 1

    @property
    def io_channels(self) -> int:
        """Channels of the encoder input / decoder output: RGB, times the patch."""
        return 3 * self.patch_size**2

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size

    @property
    def latents_mean(self) -> tuple[float, ...]:
        return WAN21_LATENTS_MEAN if self.version == "2.1" else WAN22_LATENTS_MEAN

    @property
    def latents_std(self) -> tuple[float, ...]:
        return WAN21_LATENTS_STD if self.version == "2.1" else WAN22_LATENTS_STD

    @classmethod
    def official(cls, version: str) -> "VAEConfig":
        """The released `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth` architecture."""
        if version == "2.1":
            return cls("2.1", dim=96, dec_dim=96, z_dim=16)
        if version == "2.2":
            return cls("2.2", dim=160, dec_dim=256, z_dim=48)
        raise ValueError(f"unknown VAE version {version!r}; expected one of {VAE_VERSIONS}")

    @classmethod
    def tiny(cls, version: str) -> "VAEConfig":
        """Small widths with the real latent channels and strides, for tests and tiny companion files."""
        official = cls.official(version)
        return cls(version, dim=8, dec_dim=8 if version == "2.1" else 16, z_dim=official.z_dim)


# ----------------------------------------------------------------------------- chunk caches


class ChunkState:
    """The causal caches of one chunk call: the previous call's caches in, this call's out.

    `first` is a boolean tensor of shape [1], true on a clip's first call.  `caches` are the
    previous call's `new_caches`, in call order; `None` starts a clip from zero caches.
    """

    def __init__(self, first: torch.Tensor, caches: Sequence[torch.Tensor] | None = None):
        self.first = first
        self._previous: Iterator[torch.Tensor] | None = iter(caches) if caches is not None else None
        self.new_caches: list[torch.Tensor] = []

    def previous(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """The next layer's cache: `frames` frames shaped like `x`'s (zeros when starting a clip)."""
        if self._previous is None:
            return x.new_zeros(x.shape[0], x.shape[1], frames, x.shape[3], x.shape[4])
        try:
            return next(self._previous)
        except StopIteration:
            raise ValueError("too few caches for this chunk call") from None

    def keep(self, cache: torch.Tensor) -> None:
        """Record the next call's cache for the current layer."""
        self.new_caches.append(cache)

    def select(self, on_first: torch.Tensor, otherwise: torch.Tensor) -> torch.Tensor:
        """`on_first` on a clip's first call, else `otherwise` (broadcast like `torch.where`)."""
        return torch.where(self.first, on_first, otherwise)

    def finish(self) -> list[torch.Tensor]:
        """The new caches, after checking that every given cache was used."""
        if self._previous is not None and next(self._previous, None) is not None:
            raise ValueError("too many caches for this chunk call")
        return self.new_caches


# ----------------------------------------------------------------------------- building blocks


def per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame of `x` [B, C, T, H, W]."""
    b, c, t, h, w = x.shape
    y = module(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, y.shape[1], y.shape[2], y.shape[3]).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time: its 2·p_t front frames are the previous chunk's last input frames.

    `idle_on_first_chunk` marks `upsample3d.time_conv`, which the official code skips on the
    first chunk, leaving its cache empty (zero padding on the next call).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
        idle_on_first_chunk: bool = False,
    ):
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_dim, out_dim, kernel_size, stride, padding=(0, ph, pw))
        self.cache_frames = 2 * pt
        self.idle_on_first_chunk = idle_on_first_chunk

    def forward(self, x: torch.Tensor, state: ChunkState | None = None) -> torch.Tensor:
        if self.cache_frames == 0:
            return super().forward(x)
        n = self.cache_frames
        padded = torch.cat([state.previous(x, n), x], dim=2)
        if self.idle_on_first_chunk:
            state.keep(state.select(padded[:, :, :n], padded[:, :, -n:]))
        elif x.shape[2] == 1:  # a single frame: the first-chunk cache is the usual one
            state.keep(padded[:, :, -n:])
        else:
            state.keep(state.select(padded[:, :, 1 : n + 1], padded[:, :, -n:]))
        return super().forward(padded)


class RMSNorm(nn.Module):
    """L2-normalize over channels, times sqrt(C)·gamma (official `RMS_norm`: `F.normalize`, eps 1e-12, no bias)."""

    eps = 1e-12

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(self.eps)
        return x / norm * (self.gamma * self.scale)


class ResidualBlock(nn.Module):
    """RMS norm, SiLU, causal conv, twice, plus a shortcut (a 1x1x1 conv when the width changes)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # The official nn.Sequential indices: 0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 dropout, 6 conv.
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x)), state)
        h = conv2(F.silu(norm2(h)), state)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h·w positions of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        q, k, v = self.to_qkv(self.norm(frames)).reshape(b * t, 3 * c, h * w).chunk(3, dim=1)  # [bt, c, hw]
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # [bt, query, key]
        out = self.proj((v @ weights.transpose(1, 2)).reshape(b * t, c, h, w))
        return x + out.reshape(b, t, c, h, w).transpose(1, 2)


class MiddleBlock(nn.Sequential):
    """ResidualBlock, AttentionBlock, ResidualBlock (official `middle`)."""

    def __init__(self, dim: int):
        super().__init__(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        first, attention, second = self
        return second(attention(first(x, state)), state)


class Head(nn.Sequential):
    """RMS norm, SiLU, causal conv (official `head`)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__(RMSNorm(dim, images=False), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        norm, _, conv = self
        return conv(F.silu(norm(x)), state)


class Resample(nn.Module):
    """2x spatial up/down sampling per frame; the 3d modes also double / halve time with `time_conv`."""

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            # nearest == nearest-exact (the official mode) for an integer factor of 2
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest"),
                nn.Conv2d(dim, upsample_out_dim or dim // 2, 3, padding=1),
            )
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0), idle_on_first_chunk=True)
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        if self.mode == "upsample3d":
            b, c, t, h, w = x.shape
            # time_conv yields two frames per frame, interleaved [t0 a, t0 b, t1 a, ...]
            pairs = self.time_conv(x, state).reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5)
            x = state.select(x.unsqueeze(3), pairs).reshape(b, c, 2 * t, h, w)
        x = per_frame(self.resample, x)
        if self.mode == "downsample3d":
            previous = state.previous(x, 1)
            state.keep(state.select(x[:, :, :1], x[:, :, -1:]))
            halved = self.time_conv(torch.cat([previous, x], dim=2))
            x = state.select(x[:, :, ::2], halved)
        return x


class AvgDown3D(nn.Module):
    """Wan2.2's parameter-free down shortcut: time/space to channels, then the mean of channel groups."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim = out_dim
        self.factor_t, self.factor_s = factor_t, factor_s
        self.group_size = in_dim * factor_t * factor_s * factor_s // out_dim

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        if ft > 1:  # first chunk: one frame, front-padded with ft - 1 zero frames
            x = state.select(torch.cat([torch.zeros_like(x[:, :, : ft - 1]), x[:, :, : 1 - ft]], dim=2), x)
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_dim, self.group_size, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Wan2.2's parameter-free up shortcut: repeat channels, then channels to time/space."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim = out_dim
        self.factor_t, self.factor_s = factor_t, factor_s
        self.repeats = out_dim * factor_t * factor_s * factor_s // in_dim

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        b, c, t, h, w = x.shape
        x = x.unsqueeze(2).expand(b, c, self.repeats, t, h, w)  # repeat_interleave over channels
        x = x.reshape(b, self.out_dim, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        if ft > 1:  # first chunk: the first ft - 1 frames are dropped (the tail is never used)
            x = state.select(torch.cat([x[:, :, ft - 1 :], x[:, :, 1 - ft :]], dim=2), x)
        return x


# ----------------------------------------------------------------------------- Wan2.1 encoder / decoder


def _widths(base: int, mults: Sequence[int]) -> list[int]:
    return [base * m for m in mults]


class Encoder3d(nn.Module):
    """conv1, `downsamples`, `middle`, `head` (the modules are built by the versioned subclasses)."""

    conv1: CausalConv3d
    downsamples: nn.Sequential
    middle: MiddleBlock
    head: Head

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        x = self.conv1(x, state)
        for layer in self.downsamples:
            x = layer(x, state)
        return self.head(self.middle(x, state), state)


class Decoder3d(nn.Module):
    """conv1, `middle`, `upsamples`, `head` (the modules are built by the versioned subclasses)."""

    conv1: CausalConv3d
    middle: MiddleBlock
    upsamples: nn.Sequential
    head: Head

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        x = self.middle(self.conv1(x, state), state)
        for layer in self.upsamples:
            x = layer(x, state)
        return self.head(x, state)


class Encoder21(Encoder3d):
    """Wan2.1 `Encoder3d`: a flat `downsamples` list of residual blocks and resamples."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = _widths(cfg.dim, (1, *cfg.dim_mult))
        self.conv1 = CausalConv3d(cfg.io_channels, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = MiddleBlock(dims[-1])
        self.head = Head(dims[-1], cfg.z_dim * 2)


class Decoder21(Decoder3d):
    """Wan2.1 `Decoder3d`: a flat `upsamples` list; each upsample conv halves the width."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = _widths(cfg.dec_dim, (cfg.dim_mult[-1], *reversed(cfg.dim_mult)))
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = MiddleBlock(dims[0])
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous upsample conv halved the width
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = Head(dims[-1], cfg.io_channels)


# ----------------------------------------------------------------------------- Wan2.2 encoder / decoder


class DownBlock22(nn.Module):
    """Wan2.2 `Down_ResidualBlock`: residual blocks and a resample, plus an `AvgDown3D` shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if spatial else 1)
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if spatial:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        shortcut = self.avg_shortcut(x, state)
        for layer in self.downsamples:
            x = layer(x, state)
        return x + shortcut


class UpBlock22(nn.Module):
    """Wan2.2 `Up_ResidualBlock`: residual blocks and a resample, plus a `DupUp3D` shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if spatial else None
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if spatial:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", upsample_out_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        main = x
        for layer in self.upsamples:
            main = layer(main, state)
        return main if self.avg_shortcut is None else main + self.avg_shortcut(x, state)


class Encoder22(Encoder3d):
    """Wan2.2 `Encoder3d`: `downsamples.{i}` are `Down_ResidualBlock`s."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = _widths(cfg.dim, (1, *cfg.dim_mult))
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(cfg.io_channels, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(
            *(
                DownBlock22(
                    in_dim,
                    out_dim,
                    cfg.num_res_blocks,
                    temporal=i < len(cfg.temporal_downsample) and cfg.temporal_downsample[i],
                    spatial=i != last,
                )
                for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))
            )
        )
        self.middle = MiddleBlock(dims[-1])
        self.head = Head(dims[-1], cfg.z_dim * 2)


class Decoder22(Decoder3d):
    """Wan2.2 `Decoder3d`: `upsamples.{i}` are `Up_ResidualBlock`s; upsample convs keep the width."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = _widths(cfg.dec_dim, (cfg.dim_mult[-1], *reversed(cfg.dim_mult)))
        temporal_upsample = cfg.temporal_downsample[::-1]
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = MiddleBlock(dims[0])
        self.upsamples = nn.Sequential(
            *(
                UpBlock22(
                    in_dim,
                    out_dim,
                    cfg.num_res_blocks + 1,
                    temporal=i < len(temporal_upsample) and temporal_upsample[i],
                    spatial=i != last,
                )
                for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))
            )
        )
        self.head = Head(dims[-1], cfg.io_channels)


# ----------------------------------------------------------------------------- the VAE


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C·p·p, T, H/p, W/p] in the official `b (c r q) f h w` order."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p)  # b c t h q w r
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    x = x.reshape(b, cpp // (p * p), p, p, t, h, w)  # b c r q t h w
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, cpp // (p * p), t, h * p, w * p)


class WanVAE(nn.Module):
    """A Wan2.1 or Wan2.2 VAE whose `state_dict()` keys are the official checkpoint keys."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        encoder, decoder = (Encoder21, Decoder21) if cfg.version == "2.1" else (Encoder22, Decoder22)
        self.encoder = encoder(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # -> mu, log_var
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = decoder(cfg)

    @property
    def chunk_frames(self) -> int:
        """Video frames per encoder call and per decoder call (after the first)."""
        return self.cfg.temporal_stride

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The official mean and std as [1, z, 1, 1, 1] constants (made on the CPU: real data even when tracing on meta)."""
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(self.cfg.latents_mean, dtype=like.dtype).reshape(shape).to(like.device)
        std = torch.tensor(self.cfg.latents_std, dtype=like.dtype).reshape(shape).to(like.device)
        return mean, std

    def encode_chunk(
        self, frames: torch.Tensor, first: torch.Tensor, caches: Sequence[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One encoder call: 4 frames [B, 3, 4, H, W] -> (normalized latent frame [B, z, 1, h, w], new caches)."""
        state = ChunkState(first, caches)
        mu = self.conv1(self.encoder(patchify(frames, self.cfg.patch_size), state))[:, : self.cfg.z_dim]
        mean, std = self._latent_stats(mu)
        return (mu - mean) / std, state.finish()

    def decode_chunk(
        self, latent: torch.Tensor, first: torch.Tensor, caches: Sequence[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One decoder call: a normalized latent frame [B, z, 1, h, w] -> (4 frames, new caches).

        The frames are not yet clamped to [-1, 1] (a tiled decode blends them first); on a
        clip's first call only frame 0 is meaningful.
        """
        state = ChunkState(first, caches)
        mean, std = self._latent_stats(latent)
        x = self.decoder(self.conv2(latent * std + mean), state)
        return unpatchify(x, self.cfg.patch_size), state.finish()

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1], T = 4k+1 -> normalized latent mean [B, z, k+1, H/s, W/s]."""
        check_video_shape(tuple(video.shape), self.cfg)
        n = self.chunk_frames
        chunks = [video[:, :, :1].expand(-1, -1, n, -1, -1)]
        chunks += [video[:, :, i : i + n] for i in range(1, video.shape[2], n)]
        latents, caches = [], None
        for i, chunk in enumerate(chunks):
            latent, caches = self.encode_chunk(chunk, _first_flag(i == 0, video.device), caches)
            latents.append(latent)
        return torch.cat(latents, dim=2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, z, F, h, w] -> video [B, 3, 4F-3, h·s, w·s] clamped to [-1, 1]."""
        if z.dim() != 5 or z.shape[1] != self.cfg.z_dim:
            raise WanrtError(f"latents of shape {list(z.shape)}: expected [batch, {self.cfg.z_dim}, frames, height, width]")
        frames, caches = [], None
        for i in range(z.shape[2]):
            out, caches = self.decode_chunk(z[:, :, i : i + 1], _first_flag(i == 0, z.device), caches)
            frames.append(out[:, :, :1] if i == 0 else out)
        return torch.cat(frames, dim=2).clamp(-1.0, 1.0)


def _first_flag(first: bool, device: torch.device | None = None) -> torch.Tensor:
    return torch.tensor([first], dtype=torch.bool, device=device)


def check_video_shape(shape: tuple[int, ...], cfg: VAEConfig) -> None:
    """Raise WanrtError unless `shape` is [B, 3, 4k+1, H, W] with H, W multiples of the spatial stride."""
    s, n = cfg.spatial_stride, cfg.temporal_stride
    if len(shape) != 5 or shape[1] != 3:
        raise WanrtError(f"video of shape {list(shape)}: expected [batch, 3, frames, height, width]")
    if shape[2] % n != 1:
        raise WanrtError(f"video of {shape[2]} frames: the Wan{cfg.version} VAE needs {n}k+1 frames")
    if shape[3] % s or shape[4] % s:
        raise WanrtError(f"video of {shape[3]}x{shape[4]} pixels: the Wan{cfg.version} VAE needs multiples of {s}")


# ----------------------------------------------------------------------------- loading a checkpoint


def vae_config_from_shapes(version: str, shapes: dict[str, tuple[int, ...]], path: Path) -> VAEConfig:
    """The architecture of an official-key VAE state dict, from its tensor shapes (the version from `vae_layout`)."""
    for key in ("encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight"):
        if key not in shapes:
            raise CheckpointError(f"{path}: missing key {key!r} (expected a Wan{version} VAE checkpoint)")
    official = VAEConfig.official(version)
    block = "encoder.downsamples.{}.residual.0.gamma" if version == "2.1" else "encoder.downsamples.0.downsamples.{}.residual.0.gamma"
    num_res_blocks = next(k for k in range(len(shapes) + 1) if block.format(k) not in shapes)  # blocks of stage 0
    return VAEConfig(
        version,
        dim=shapes["encoder.conv1.weight"][0],
        dec_dim=shapes["decoder.conv1.weight"][0] // official.dim_mult[-1],
        z_dim=shapes["conv2.weight"][0],
        num_res_blocks=max(num_res_blocks, 1),
    )


def read_vae_checkpoint(
    path: str | os.PathLike | None, task: str | None = None
) -> tuple[VAEConfig, dict[str, str], "TensorSource"]:
    """(config, official name -> stored name, reader) of a VAE file, every key and shape checked.

    Accepts the official keys (`.pth` or `.safetensors`) and diffusers `AutoencoderKLWan` names;
    a missing, unexpected or misshapen key raises CheckpointError naming the file and the key.
    """
    from wanrt.export.checkpoint.companion_keys import diffusers_vae_names
    from wanrt.export.checkpoint.companions import open_companion, vae_layout
    from wanrt.export.models.t5 import check_state_shapes, require_file

    path = require_file(path, "VAE", "Wan2.1_VAE.pth or Wan2.2_VAE.pth", task)
    reader = open_companion(path)
    stored = {k: tuple(reader.header(k).shape) for k in reader.keys()}
    found = vae_layout(stored, path)
    if found is None:
        raise CheckpointError(
            f"{path}: not a Wan VAE checkpoint (neither the official keys of Wan2.1_VAE.pth / Wan2.2_VAE.pth,"
            " e.g. 'decoder.middle.0.residual.0.gamma', nor diffusers AutoencoderKLWan names)"
        )
    version, layout = found.version, found.layout
    names = {k: k for k in stored}
    if layout == "diffusers":  # the official stage layout (2 residual blocks per stage) names every released file
        released = VAEConfig.official(version)
        official = diffusers_vae_names(_meta_state(released), released)
        unexpected = [k for k in stored if k not in official]
        if unexpected:
            raise CheckpointError(f"{path}: unexpected key {unexpected[0]!r} for a diffusers AutoencoderKLWan (Wan{version})")
        names = {official[k]: k for k in stored}
    shapes = {official: stored[key] for official, key in names.items()}
    cfg = vae_config_from_shapes(version, shapes, path)
    expected = {k: tuple(v.shape) for k, v in _meta_state(cfg).items()}
    check_state_shapes(shapes, expected, str(path), f"the official Wan{version} VAE keys ({layout} layout)")
    return cfg, names, reader


def _meta_state(cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """The official state dict of a VAE of this architecture, on the meta device (keys and shapes only)."""
    with torch.device("meta"):
        return WanVAE(cfg).state_dict()


def load_vae(path: str | os.PathLike | None, dtype: torch.dtype = torch.float32, task: str | None = None) -> WanVAE:
    """Load `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth` (or the same keys in safetensors, or diffusers names).

    The version and widths come from the keys and shapes (see `read_vae_checkpoint`).
    """
    cfg, names, reader = read_vae_checkpoint(path, task)
    with torch.device("meta"):
        model = WanVAE(cfg)
    model.load_state_dict({k: reader.read(stored).to(dtype) for k, stored in names.items()}, assign=True)
    return model.eval().requires_grad_(False)
