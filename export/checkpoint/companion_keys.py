"""Hugging Face / diffusers names of the T5 and CLIP companions, mapped to Wan's official names.

- T5: transformers `UMT5EncoderModel` (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`,
  ...) <-> `models_t5_umt5-xxl-enc-bf16.pth` (`token_embedding.weight`, `blocks.N.attn.q.weight`, ...).
- CLIP: transformers `CLIPVisionModelWithProjection` (`vision_model.*`, `visual_projection.weight`)
  <-> the `visual.*` keys of the open-clip file (prefix removed here).  Three HF tensors (q/k/v)
  make one official `attn.to_qkv`, the class/position embeddings gain leading 1-dims and
  `head` is the transpose of `visual_projection.weight`.
- VAE: diffusers `AutoencoderKLWan` names are mapped in `export.models.vae`.

`MappedSource` reads the HF file under official names, one official tensor at a time.
The maps are verified by the oracle tests: transformers computing on mapped weights equals ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wanrt.engines.errors import CheckpointError

from .safetensors_file import TensorHeader
from .view import TensorSource

if TYPE_CHECKING:  # inspect reads headers without importing torch
    import torch

T5_FFN = {"wi_0": "gate.0", "wi_1": "fc1", "wo": "fc2"}
HF_T5_Q = "encoder.block.0.layer.0.SelfAttention.q.weight"
T5_HF_TIED = "encoder.embed_tokens.weight"  # tied to shared.weight; stored by some writers, never needed
HF_VISION = "vision_model."
HF_PROJECTION = "visual_projection.weight"


def hf_t5_key_to_official(key: str) -> str | None:
    """A transformers UMT5 encoder key -> the official T5 key (None: no counterpart)."""
    if key == "shared.weight":
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    parts = key.split(".")
    if parts[:2] != ["encoder", "block"] or len(parts) < 6 or parts[3] != "layer":
        return None
    n, layer, rest = parts[2], parts[4], ".".join(parts[5:])
    if layer == "0":
        if rest == "layer_norm.weight":
            return f"blocks.{n}.norm1.weight"
        if rest == "SelfAttention.relative_attention_bias.weight":
            return f"blocks.{n}.pos_embedding.embedding.weight"
        if parts[5] == "SelfAttention" and rest.endswith(".weight") and parts[6] in "qkvo":
            return f"blocks.{n}.attn.{parts[6]}.weight"
        return None
    if layer == "1":
        if rest == "layer_norm.weight":
            return f"blocks.{n}.norm2.weight"
        if parts[5] == "DenseReluDense" and parts[6] in T5_FFN and rest.endswith(".weight"):
            return f"blocks.{n}.ffn.{T5_FFN[parts[6]]}.weight"
    return None


def official_t5_key_to_hf(key: str) -> str:
    """An official T5 key -> the transformers UMT5 encoder key (the inverse of `hf_t5_key_to_official`)."""
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    _, n, module, *rest = key.split(".")
    block = f"encoder.block.{n}.layer"
    if module == "norm1":
        return f"{block}.0.layer_norm.weight"
    if module == "pos_embedding":
        return f"{block}.0.SelfAttention.relative_attention_bias.weight"
    if module == "attn":
        return f"{block}.0.SelfAttention.{rest[0]}.weight"
    if module == "norm2":
        return f"{block}.1.layer_norm.weight"
    if module == "ffn":
        hf = {v: k for k, v in T5_FFN.items()}[".".join(rest[:-1])]
        return f"{block}.1.DenseReluDense.{hf}.weight"
    raise CheckpointError(f"official T5 key {key!r} has no transformers UMT5 name")


@dataclass(frozen=True)
class MappedTensor:
    """One official tensor made of stored HF tensors: their keys, the official shape and how to combine them."""

    stored: tuple[str, ...]
    shape: tuple[int, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]


def _only(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _reshape(shape: tuple[int, ...]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    return lambda tensors: tensors[0].reshape(shape)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    import torch

    return torch.cat(tensors)


def _transpose(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].t().contiguous()


def hf_clip_plan(shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, MappedTensor]:
    """Official `visual.*` name (prefix removed) -> how to read it from a transformers CLIP vision file."""
    if HF_PROJECTION not in shapes:
        raise CheckpointError(
            f"{where}: no {HF_PROJECTION!r}; expected a transformers CLIPVisionModelWithProjection (Wan2.1 image_encoder)"
        )
    v = HF_VISION
    width = shapes[v + "pre_layrnorm.weight"][0] if v + "pre_layrnorm.weight" in shapes else 0
    positions = shapes.get(v + "embeddings.position_embedding.weight", (0, width))[0]
    plan = {
        "patch_embedding.weight": MappedTensor((v + "embeddings.patch_embedding.weight",), shapes.get(v + "embeddings.patch_embedding.weight", ()), _only),
        "cls_embedding": MappedTensor((v + "embeddings.class_embedding",), (1, 1, width), _reshape((1, 1, width))),
        "pos_embedding": MappedTensor((v + "embeddings.position_embedding.weight",), (1, positions, width), _reshape((1, positions, width))),
        "head": MappedTensor((HF_PROJECTION,), tuple(reversed(shapes[HF_PROJECTION])), _transpose),
    }  # fmt: skip
    for ours, theirs in (("pre_norm", "pre_layrnorm"), ("post_norm", "post_layernorm")):
        for kind in ("weight", "bias"):
            key = f"{v}{theirs}.{kind}"
            plan[f"{ours}.{kind}"] = MappedTensor((key,), shapes.get(key, ()), _only)
    layers = {int(k.split(".")[3]) for k in shapes if k.startswith(v + "encoder.layers.")}
    for n in sorted(layers):
        src, dst = f"{v}encoder.layers.{n}.", f"transformer.{n}."
        for kind in ("weight", "bias"):
            qkv = tuple(src + f"self_attn.{m}_proj.{kind}" for m in "qkv")
            q = shapes.get(qkv[0], (0,))
            plan[dst + f"attn.to_qkv.{kind}"] = MappedTensor(qkv, (3 * q[0], *q[1:]), _cat)
            for ours, theirs in (("attn.proj", "self_attn.out_proj"), ("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                                 ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):  # fmt: skip
                key = src + f"{theirs}.{kind}"
                plan[dst + f"{ours}.{kind}"] = MappedTensor((key,), shapes.get(key, ()), _only)
    missing = sorted({k for m in plan.values() for k in m.stored if k not in shapes})
    if missing:
        raise CheckpointError(f"{where}: missing key(s) {', '.join(missing[:3])}; expected a transformers CLIP vision tower")
    return plan


def official_clip_to_hf(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One official `visual.*` tensor (prefix removed) as the transformers CLIP tensors it becomes."""
    v = HF_VISION
    direct = {"patch_embedding.weight": "embeddings.patch_embedding.weight", "pre_norm.weight": "pre_layrnorm.weight",
              "pre_norm.bias": "pre_layrnorm.bias", "post_norm.weight": "post_layernorm.weight",
              "post_norm.bias": "post_layernorm.bias"}  # fmt: skip
    if key in direct:
        return {v + direct[key]: tensor}
    if key == "cls_embedding":
        return {v + "embeddings.class_embedding": tensor.reshape(-1)}
    if key == "pos_embedding":
        return {v + "embeddings.position_embedding.weight": tensor.reshape(tensor.shape[-2:])}
    if key == "head":
        return {HF_PROJECTION: tensor.t().contiguous()}
    _, n, *rest = key.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    src = f"{v}encoder.layers.{n}."
    if module == "attn.to_qkv":
        return {src + f"self_attn.{m}_proj.{kind}": t for m, t in zip("qkv", tensor.chunk(3))}
    names = {"attn.proj": "self_attn.out_proj", "norm1": "layer_norm1", "norm2": "layer_norm2",
             "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}  # fmt: skip
    if module not in names:
        raise CheckpointError(f"official CLIP key visual.{key!r} has no transformers name")
    return {src + f"{names[module]}.{kind}": tensor}


class MappedSource(TensorSource):
    """A stored (HF / diffusers) file read under official names, one official tensor per read."""

    def __init__(self, source: TensorSource, plan: dict[str, MappedTensor]):
        self.source, self.plan = source, plan
        self.path: Path = source.path
        self.metadata = source.metadata

    def keys(self) -> list[str]:
        return list(self.plan)

    def __contains__(self, key: str) -> bool:
        return key in self.plan

    def header(self, key: str) -> TensorHeader:
        m = self._mapped(key)
        first = self.source.header(m.stored[0])
        return TensorHeader(key, first.dtype, tuple(m.shape), first.begin, first.end)

    def read(self, key: str) -> torch.Tensor:
        m = self._mapped(key)
        return m.combine([self.source.read(k) for k in m.stored])

    def _mapped(self, key: str) -> MappedTensor:
        try:
            return self.plan[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r} (official name)") from None


def hf_t5_plan(source: TensorSource) -> dict[str, MappedTensor]:
    """Official T5 name -> the transformers UMT5 tensor it is read from; unknown HF keys are an error."""
    plan: dict[str, MappedTensor] = {}
    for key in source.keys():
        official = hf_t5_key_to_official(key)
        if official is None:
            if key == T5_HF_TIED:
                continue
            raise CheckpointError(f"{source.path}: unexpected key {key!r} for a transformers UMT5EncoderModel")
        plan[official] = MappedTensor((key,), tuple(source.header(key).shape), _only)
    return plan


def is_hf_t5(keys) -> bool:
    """True for transformers UMT5/T5 encoder key names."""
    return "shared.weight" in keys or HF_T5_Q in keys


def is_hf_clip(keys) -> bool:
    """True for transformers CLIP vision key names."""
    return HF_VISION + "embeddings.patch_embedding.weight" in keys
