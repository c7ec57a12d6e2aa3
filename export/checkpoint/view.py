"""A uniform, lazy view of one DiT expert's weights under official names, in any layout/precision."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .keys import KeyMap, normalize_keys
from .safetensors_file import NAME_TO_TORCH, CheckpointError, SafetensorsFile, TensorHeader

QUANTIZED_DTYPES = ("fp8_e4m3", "fp8_e5m2", "int8")
# The block linears LightX2V quantizes (and whose storage dtype names an expert's precision).
BLOCK_LINEAR_SUFFIXES = tuple(
    f".{m}.weight"
    for m in (
        "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
        "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
        "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2",
    )
)


def is_block_linear(key: str) -> bool:
    """True for an official key naming a block linear weight (the ones fp8/int8 files quantize)."""
    return key.startswith("blocks.") and key.endswith(BLOCK_LINEAR_SUFFIXES)


@dataclass(frozen=True)
class TensorRef:
    """Where one official tensor is stored and how to turn it back into real numbers."""

    key: str  # official name
    source: "TensorSource"
    source_key: str
    dtype: str  # storage dtype name ("bf16", "fp8_e4m3", "int8", ...)
    shape: tuple[int, ...]
    scale_source: "TensorSource | None" = None
    scale_key: str | None = None
    scale_layout: str | None = None  # "per_channel", "per_tensor", or None (unscaled)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def load_stored(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tensor as stored, and its dequantization scale (None when unscaled)."""
        t = self.source.read(self.source_key)
        scale = None if self.scale_key is None else self.scale_source.read(self.scale_key)
        return t, scale

    def load(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The real-valued tensor: dequantized (`w * scale`, in fp32) and cast to `dtype`."""
        t, scale = self.load_stored()
        if self.dtype in QUANTIZED_DTYPES:
            t = t.to(torch.float32)
            if scale is not None:
                s = scale.to(torch.float32)
                t = t * (s.reshape(-1, *([1] * (t.dim() - 1))) if self.scale_layout == "per_channel" else s.reshape(()))
        return t.to(dtype)


class TensorSource:
    """Something tensors are read from: a safetensors file or a `.pth` state dict."""

    path: Path

    def keys(self) -> list[str]:
        raise NotImplementedError

    def header(self, key: str) -> TensorHeader:
        raise NotImplementedError

    def read(self, key: str) -> torch.Tensor:
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    """Tensors of one safetensors file (validated header, reads on demand)."""

    def __init__(self, path: str | os.PathLike):
        self.file = SafetensorsFile(path)
        self.path = self.file.path
        self.metadata = self.file.metadata

    def keys(self) -> list[str]:
        return self.file.keys()

    def header(self, key: str) -> TensorHeader:
        return self.file.header(key)

    def read(self, key: str) -> torch.Tensor:
        return self.file.read(key)


_TORCH_TO_NAME = {v: k for k, v in NAME_TO_TORCH.items()}


class PthSource(TensorSource):
    """Tensors of a `.pth`/`.pt` state dict, loaded with `weights_only=True` and mmap."""

    def __init__(self, path: str | os.PathLike):
        from .pth import load_pth_state_dict

        self.path = Path(path)
        self.state = load_pth_state_dict(self.path)
        self.metadata: dict[str, str] = {}

    def keys(self) -> list[str]:
        return list(self.state)

    def header(self, key: str) -> TensorHeader:
        t = self.state[key]
        name = _TORCH_TO_NAME.get(t.dtype)
        if name is None:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {t.dtype}")
        return TensorHeader(key, name, tuple(t.shape), 0, t.numel() * t.element_size())

    def read(self, key: str) -> torch.Tensor:
        return self.state[key].clone()


def open_source(path: str | os.PathLike) -> TensorSource:
    """Open a weights file by its extension."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return SafetensorsSource(p)
    if p.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return PthSource(p)
    raise CheckpointError(f"{p}: unsupported weights file type {p.suffix!r}; expected .safetensors or .pth")


class CheckpointView(Mapping[str, TensorRef]):
    """One DiT expert's tensors under official names, read lazily from one or more files."""

    def __init__(self, sources: list[TensorSource], layout: str | None = None):
        self.sources = sources
        self.files = [s.path for s in sources]
        located: dict[str, TensorSource] = {}
        for src in sources:
            for k in src.keys():
                if k in located:
                    raise CheckpointError(
                        f"duplicate tensor {k!r} in {located[k].path} and {src.path}; the shards overlap"
                    )
                located[k] = src
        self.keymap: KeyMap = normalize_keys(located)
        self.unknown_keys = list(self.keymap.unknown)
        by_weight = {w: s for s, w in self.keymap.scales.items() if w}
        self.markers = [s for s, w in self.keymap.scales.items() if not w]
        self._refs: dict[str, TensorRef] = {}
        for official, stored in self.keymap.to_source.items():
            src = located[stored]
            h = src.header(stored)
            scale_key = by_weight.get(stored)
            layout_ = None
            scale_src = None
            if scale_key is not None and h.dtype in ("fp8_e4m3", "fp8_e5m2", "int8"):
                # prefer LightX2V's per-channel `weight_scale`, then ComfyUI's `scale_weight`
                for cand in (stored[: -len(".weight")] + ".weight_scale", stored[: -len(".weight")] + ".scale_weight"):
                    if cand in located:
                        scale_key = cand
                        break
                scale_src = located[scale_key]
                sh = scale_src.header(scale_key)
                numel = math.prod(sh.shape)
                if numel == 1:
                    layout_ = "per_tensor"
                elif numel == h.shape[0]:
                    layout_ = "per_channel"
                else:
                    raise CheckpointError(
                        f"{scale_src.path}: scale {scale_key!r} has shape {list(sh.shape)}; expected [{h.shape[0]}, 1]"
                        f" (per output channel) or a scalar for weight {stored!r} {list(h.shape)}"
                    )
            else:
                scale_key = None
            self._refs[official] = TensorRef(official, src, stored, h.dtype, h.shape, scale_src, scale_key, layout_)
        self.form = self.keymap.form
        self.layout = layout or self._guess_layout()

    def _guess_layout(self) -> str:
        if self.form == "diffusers":
            return "diffusers"
        if self.markers or any(r.scale_key and r.scale_key.endswith(".scale_weight") for r in self._refs.values()):
            return "comfyui"
        if self.keymap.prefix == "model.diffusion_model.":
            return "comfyui"
        if any(r.scale_layout == "per_channel" for r in self._refs.values()):
            return "lightx2v"
        return "official"

    # Mapping protocol
    def __getitem__(self, key: str) -> TensorRef:
        try:
            return self._refs[key]
        except KeyError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    @property
    def precision(self) -> str:
        """Storage precision of the block linear weights ("bf16", "fp8_e4m3", "int8", ...)."""
        for k in sorted(self._refs):
            if is_block_linear(k):
                return self._refs[k].dtype
        return next(iter(self._refs.values())).dtype if self._refs else "unknown"

    @property
    def scale(self) -> str | None:
        """Scale layout of the quantized block linears: "per_channel", "per_tensor" or None."""
        for k in sorted(self._refs):
            if is_block_linear(k):
                return self._refs[k].scale_layout
        return None

    @property
    def num_params(self) -> int:
        return sum(r.numel for r in self._refs.values())

    def load(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor under its official name, dequantized and cast to `dtype`."""
        return self[key].load(dtype)

    def iter_tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (official key, tensor) pairs one at a time, in sorted key order."""
        for k in sorted(self._refs):
            yield k, self._refs[k].load(dtype)

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every tensor at once (for tests and tiny models; large models should stream)."""
        return dict(self.iter_tensors(dtype))
