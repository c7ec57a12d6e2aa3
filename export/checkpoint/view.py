"""A uniform, lazy view of one DiT expert's weights under official names, in any layout/precision.

Each `TensorRef` says where an official tensor is stored, in which dtype, and how to turn it
back into real numbers: plain floats are cast; fp8/int8 weights are multiplied by their
LightX2V per-output-channel `weight_scale` [out,1], their ComfyUI per-tensor `scale_weight`
(a scalar), or by 1 when unscaled (layouts: `storage`; the arithmetic: `wanrt.calibration.quant`).
Building a view reads headers only (and imports no torch).
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wanrt.engines.errors import CheckpointError

from .comfy_quant import check_layers as check_comfy_quant
from .keys import KeyMap, normalize_keys
from .pth import read_pth_header
from .safetensors_file import SafetensorsFile, TensorHeader, empty_bytes
from .storage import QUANTIZED_DTYPES, SCALE_AXES, SCALE_DTYPES, WEIGHT_SCALE_SUFFIXES, is_block_linear, scale_granularity

if TYPE_CHECKING:
    import torch


def _buffer(shape: tuple[int, ...], dtype: "torch.dtype") -> "torch.Tensor":
    """A new contiguous tensor to read into (big ones on huge pages: see `empty_bytes`)."""
    return empty_bytes(math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)


@dataclass(frozen=True)
class TensorRef:
    """Where one official tensor is stored and how to turn it back into real numbers."""

    key: str  # official name
    source: "TensorSource"
    source_key: str
    dtype: str  # storage dtype name ("fp32", "bf16", "fp8_e4m3", "int8", ...)
    shape: tuple[int, ...]
    scale_source: "TensorSource | None" = None
    scale_key: str | None = None
    scale_layout: str | None = None  # "per_channel", "per_tensor", or None (unscaled)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def quantized(self) -> bool:
        """True when the stored values are fp8/int8 codes rather than real numbers."""
        return self.dtype in QUANTIZED_DTYPES

    def load_stored(self) -> "tuple[torch.Tensor, torch.Tensor | None]":
        """The tensor as stored, and its dequantization scale (None when unscaled)."""
        t = self.source.read(self.source_key)
        scale = None if self.scale_key is None else self.scale_source.read(self.scale_key)
        return t, scale

    def load(self, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """The real-valued tensor: dequantized (`w * scale`, in fp32) and cast to `dtype` (default fp32)."""
        import torch

        from wanrt.calibration.quant import decode, dequantize

        dtype = torch.float32 if dtype is None else dtype
        t, scale = self.load_stored()
        if self.quantized:
            return dequantize(t, scale, SCALE_AXES.get(self.scale_layout), dtype, out=_buffer(t.shape, dtype))
        return t if t.dtype == dtype else decode(t, dtype, out=_buffer(t.shape, dtype))


class TensorSource:
    """Something tensors are read from: a safetensors file or a `.pth` state dict."""

    path: Path
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def header(self, key: str) -> TensorHeader:
        raise NotImplementedError

    def read(self, key: str) -> "torch.Tensor":
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        """One tensor's stored bytes (small tensors: ComfyUI's `comfy_quant` JSON)."""
        import torch

        return self.read(key).contiguous().view(torch.uint8).numpy().tobytes()


class SafetensorsSource(TensorSource):
    """Tensors of one safetensors file (validated header, reads on demand)."""

    def __init__(self, path: str | os.PathLike):
        self.file = SafetensorsFile(path)
        self.path = self.file.path
        self.metadata = self.file.metadata

    def keys(self) -> list[str]:
        return self.file.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.file

    def header(self, key: str) -> TensorHeader:
        return self.file.header(key)

    def read(self, key: str) -> "torch.Tensor":
        return self.file.read(key)

    def read_bytes(self, key: str) -> bytes:
        return self.file.read_bytes(key)  # no torch: headers-only paths stay torch-free


class PthSource(TensorSource):
    """Tensors of a `.pth`/`.pt` state dict: names from the pickle, data via `weights_only=True` + mmap."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.infos = read_pth_header(self.path)
        self.metadata = {}
        self._state: dict | None = None

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def header(self, key: str) -> TensorHeader:
        try:
            info = self.infos[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None
        return TensorHeader(key, info.dtype, info.shape, 0, info.nbytes)

    def read(self, key: str) -> "torch.Tensor":
        if self._state is None:
            from .pth import load_pth_state_dict

            self._state = load_pth_state_dict(self.path)
        self.header(key)
        return self._state[key].clone()


WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def open_source(path: str | os.PathLike) -> TensorSource:
    """Open a weights file by its extension."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return SafetensorsSource(p)
    if p.suffix in WEIGHT_FILE_SUFFIXES:
        return PthSource(p)
    raise CheckpointError(f"{p}: unsupported weights file type {p.suffix!r}; expected .safetensors or .pth")


class CheckpointView(Mapping[str, TensorRef]):
    """One DiT expert's tensors under official names, read lazily from one or more files."""

    def __init__(self, sources: list[TensorSource], layout: str | None = None):
        for src in sources:
            check_comfy_quant(src)  # formats not read here fail by name, not as a shape error below
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
        where = str(self.files[0]) if len(self.files) == 1 else f"{self.files[0].parent} ({len(self.files)} files)"
        self.keymap: KeyMap = normalize_keys(located, where)
        self.unknown_keys = list(self.keymap.unknown)
        self.markers = [s for s, w in self.keymap.scales.items() if not w]
        self._refs: dict[str, TensorRef] = {}
        for official, stored in self.keymap.to_source.items():
            src = located[stored]
            h = src.header(stored)
            scale_key = None
            if h.dtype in QUANTIZED_DTYPES and stored.endswith(".weight"):
                base = stored[: -len(".weight")]
                scale_key = next((base + s for s in WEIGHT_SCALE_SUFFIXES if base + s in located), None)
            if scale_key is None:
                self._refs[official] = TensorRef(official, src, stored, h.dtype, h.shape)
                continue
            scale_src = located[scale_key]
            sh = scale_src.header(scale_key)
            if sh.dtype not in SCALE_DTYPES:
                raise CheckpointError(
                    f"{scale_src.path}: scale {scale_key!r} is stored as {sh.dtype}; expected fp32, bf16 or fp16"
                )
            scale_layout = scale_granularity(h.shape, sh.shape)
            if scale_layout is None:
                raise CheckpointError(
                    f"{scale_src.path}: scale {scale_key!r} has shape {list(sh.shape)}; expected [{h.shape[0]}, 1]"
                    f" (per output channel) or a scalar for weight {stored!r} {list(h.shape)}"
                )
            self._refs[official] = TensorRef(official, src, stored, h.dtype, h.shape, scale_src, scale_key, scale_layout)
        self.form = self.keymap.form
        self.layout = layout or self._guess_layout()

    def _guess_layout(self) -> str:
        if self.form == "diffusers":
            return "diffusers"
        comfy_scales = any(s.endswith((".scale_weight", ".comfy_quant")) for s in self.keymap.scales)
        if self.markers or comfy_scales or self.keymap.prefix == "model.diffusion_model.":
            return "comfyui"
        if any(r.scale_layout == "per_channel" for r in self._refs.values()):
            return "lightx2v"
        if len(self.sources) == 1 and self.precision != "fp32":
            return "lightx2v"  # official releases are fp32; a single bf16/fp16 file is a LightX2V-style export
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

    @functools.cached_property
    def _block_linears(self) -> list[TensorRef]:
        """The block linear weights (the refs are fixed once built: computed once)."""
        return [r for k, r in self._refs.items() if is_block_linear(k)]

    @property
    def precision(self) -> str:
        """Storage precision of the block linear weights ("bf16", "fp8_e4m3", "int8", ...), the most common one."""
        refs = self._block_linears or list(self._refs.values())
        if not refs:
            return "unknown"
        return Counter(r.dtype for r in refs).most_common(1)[0][0]

    @property
    def precisions(self) -> dict[str, int]:
        """How many block linear weights are stored in each dtype (more than one entry: a mixed file)."""
        return dict(Counter(r.dtype for r in self._block_linears))

    @property
    def scale(self) -> str | None:
        """Scale layout of the quantized block linears: "per_channel", "per_tensor" or None."""
        layouts = Counter(r.scale_layout for r in self._block_linears if r.quantized)
        return layouts.most_common(1)[0][0] if layouts else None

    @property
    def num_params(self) -> int:
        return sum(r.numel for r in self._refs.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Official key -> shape (headers only)."""
        return {k: r.shape for k, r in self._refs.items()}

    def load(self, key: str, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """One tensor under its official name, dequantized and cast to `dtype` (default fp32)."""
        return self[key].load(dtype)

    def iter_tensors(self, dtype: "torch.dtype | None" = None) -> Iterator[tuple[str, "torch.Tensor"]]:
        """Stream (official key, tensor) pairs one at a time, in storage order (sequential reads)."""
        for k in sorted(self._refs, key=self._storage_order):
            yield k, self._refs[k].load(dtype)

    def _storage_order(self, key: str) -> tuple[int, int]:
        r = self._refs[key]
        return self.sources.index(r.source), r.source.header(r.source_key).begin

    def state_dict(self, dtype: "torch.dtype | None" = None) -> dict[str, "torch.Tensor"]:
        """Every tensor at once (for tests and tiny models; large models should stream)."""
        return dict(self.iter_tensors(dtype))
