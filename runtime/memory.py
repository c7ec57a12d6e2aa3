"""What a component needs on the device at a run's shapes: weights, activations, I/O buffers.

`MemoryNeed` is the input of the residency arithmetic (`runtime.residency.plan_vram`).  A
backend fills it (`Backend.memory_need`); where the bundle holds no measurement of the
activation memory (TensorRT's `device_memory_size_v2`, recorded per optimization profile by
the build), `estimate_activation_bytes` gives one, and the real value replaces it once the
engine is loaded (`update_device_memory_size_for_shapes`).

The estimates (bytes, at the run's shapes), and why:

* DiT: `batch * tokens * (14 * dim + 4 * ffn_dim)`.  With a fused attention kernel (no
  tokens x tokens matrix) the peak inside one block is: the fp32 residual stream (4 * dim bytes a
  token), the modulated LayerNorm output, q, k, v and the attention output in bf16 (5 x 2 * dim),
  and the FFN hidden state before and after its GELU (2 x 2 * ffn_dim); TensorRT reuses every
  other block's memory.  E.g. Wan2.1 1.3B (1536 / 8960) at 480p (32,760 tokens), batch 1:
  1.75 GiB; a 14B expert (5120 / 13824) at 720p (75,600 tokens): 8.94 GiB.  A VACE DiT also
  keeps the embedded latent and the control stream alive across blocks: `8 * dim` more a token
  (VACE-14B at 720p, batch 1: 2.9 GiB more).
* text encoder (umt5): the same rule per token, with `ffn = 2.5 * dim` (umt5-xxl: 10240 / 4096).
* image encoder (CLIP ViT-H/14): the same rule per token, with `ffn = 4 * dim` (5120 / 1280).
* VAE chunk engines: 4 fp32 tensors of the largest feature map a chunk touches (a residual
  block's input, its norm, its conv output and the shortcut): `4 * chunk_frames * max over the
  caches of (channels * cache height * cache width) * 4`; the caches name every feature map's
  channels and scale, so this holds for both Wan VAEs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from wanrt.engines.manifest import Component
from wanrt.engines.model import DiTConfig
from wanrt.engines.signatures import EngineSignature

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class MemoryNeed:
    """Device bytes one component needs at the run's shapes."""

    name: str
    weight_bytes: int  # every weight, resident
    streamable_bytes: int = 0  # of which the engine can stream from host memory (TensorRT WEIGHT_STREAMING)
    activation_bytes: int | None = 0  # scratch while running (TensorRT device_memory_size_v2); None: unknown
    io_bytes: int = 0  # its device input and output buffers
    streaming_scratch_bytes: int = 0  # extra scratch when streaming weights (TensorRT adds it to the activations)
    activation_source: str = "backend"  # "plan" (measured when built), "estimate", "backend" (the backend's own)

    @property
    def fixed_bytes(self) -> int:
        """Weights that never stream."""
        return self.weight_bytes - self.streamable_bytes

    def with_estimate(self, estimate_bytes: int) -> "MemoryNeed":
        """This need with `estimate_bytes` as its activations when the backend could not tell."""
        if self.activation_bytes is not None:
            return self
        return replace(self, activation_bytes=int(estimate_bytes), activation_source="estimate")


def resolve_shapes(signature: EngineSignature, inputs: Shapes) -> dict[str, tuple[int, ...]]:
    """Every input and output shape of `signature` once the named dims are bound from `inputs`."""
    bound: dict[str, int] = {}
    for spec in signature.inputs:
        shape = inputs.get(spec.name)
        if shape is None:
            continue
        for want, got in zip(spec.shape, shape):
            if isinstance(want, str):
                bound.setdefault(want, int(got))
    out = {}
    for spec in (*signature.inputs, *signature.outputs):
        if spec.name in inputs:
            out[spec.name] = tuple(int(d) for d in inputs[spec.name])
        elif all(isinstance(d, int) or d in bound for d in spec.shape):
            out[spec.name] = tuple(d if isinstance(d, int) else bound[d] for d in spec.shape)
    return out


def io_bytes(signature: EngineSignature, inputs: Shapes) -> int:
    """Bytes of every input and output buffer at these input shapes (the signature's dtypes)."""
    shapes = resolve_shapes(signature, inputs)
    dtypes = {t.name: t.dtype for t in (*signature.inputs, *signature.outputs)}
    return sum(math.prod(shape) * np.dtype(dtypes[name]).itemsize for name, shape in shapes.items())


def transformer_activation_bytes(tokens: int, batch: int, dim: int, ffn_dim: int) -> int:
    """The per-block peak of a transformer with fused attention (module docstring): fp32 residual, bf16 rest."""
    return batch * tokens * (14 * dim + 4 * ffn_dim)


def estimate_activation_bytes(component: Component, inputs: Shapes, dit: DiTConfig) -> int:
    """The module docstring's estimate of `component`'s activation memory at `inputs`."""
    shapes = resolve_shapes(component.signature, inputs)
    if component.kind == "dit":
        b, _, f, h, w = shapes["latent"]
        tokens = f * h * w // 4  # 1x2x2 patches
        vace = b * tokens * 8 * dit.dim if dit.vace else 0  # VACE: the embedded latent and the control stream, fp32
        return transformer_activation_bytes(tokens, b, dit.dim, dit.ffn_dim) + vace
    if component.kind == "text_encoder":
        b, tokens, dim = shapes["context"]
        return transformer_activation_bytes(tokens, b, dim, dim * 5 // 2)
    if component.kind == "image_encoder":
        b, tokens, dim = shapes["clip_fea"]
        return transformer_activation_bytes(tokens, b, dim, dim * 4)
    caches = [s for n, s in shapes.items() if n.startswith("cache_in_")]
    frames = int(component.attributes.get("chunk_frames", 4))
    largest = max((c * hh * ww for _, c, _, hh, ww in caches), default=0)
    return 4 * frames * largest * 4
