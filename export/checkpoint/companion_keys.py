"""Hugging Face / diffusers names of the T5, CLIP and VAE companions, mapped to Wan's official names.

- T5: transformers `UMT5EncoderModel` (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`,
  ...) <-> `models_t5_umt5-xxl-enc-bf16.pth` (`token_embedding.weight`, `blocks.N.attn.q.weight`, ...).
- CLIP: transformers `CLIPVisionModelWithProjection` (`vision_model.*`, `visual_projection.weight`)
  <-> the `visual.*` keys of the open-clip file (prefix removed here).  Three HF tensors (q/k/v)
  make one official `attn.to_qkv`, the class/position embeddings gain leading 1-dims and
  `head` is the transpose of `visual_projection.weight`.
- VAE: diffusers `AutoencoderKLWan` <-> `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth` (`wan/modules/vae.py`,
  `vae2_2.py`).  Which layout and version a file holds is decided in `companions` (`vae_layout`,
  `is_hf_t5`, `is_hf_clip`), where `inspect` types the files without importing these maps.

T5 and CLIP are one `NameTable` each; the VAE's block indices are arithmetic on the config, so
its map is one function official -> diffusers, inverted by enumerating the official module's
keys (`diffusers_vae_names`).  `MappedSource` reads an HF file under official names, one
official tensor at a time.  The maps are verified by the oracle tests: transformers / diffusers
computing on mapped weights equals ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from wanrt.engines.errors import CheckpointError

from .animate_keys import DIFFUSERS_ANIMATE_MARKERS, diffusers_animate_names, diffusers_res_blocks
from .companions import HF_PROJECTION, HF_VISION, Shapes
from .names import CONCAT, SAME, TRANSPOSE, NameTable, Row, unsqueezed
from .safetensors_file import TensorHeader
from .view import TensorSource

if TYPE_CHECKING:  # inspect reads headers without importing torch
    import torch

# ----------------------------------------------------------------------------- T5

T5_HF_TIED = "encoder.embed_tokens.weight"  # tied to shared.weight; stored by some writers, never needed
T5_NAMES = NameTable((
    ("token_embedding", "shared"),
    ("norm", "encoder.final_layer_norm"),
    ("blocks.{n}.norm1", "encoder.block.{n}.layer.0.layer_norm"),
    ("blocks.{n}.attn.q", "encoder.block.{n}.layer.0.SelfAttention.q"),
    ("blocks.{n}.attn.k", "encoder.block.{n}.layer.0.SelfAttention.k"),
    ("blocks.{n}.attn.v", "encoder.block.{n}.layer.0.SelfAttention.v"),
    ("blocks.{n}.attn.o", "encoder.block.{n}.layer.0.SelfAttention.o"),
    ("blocks.{n}.pos_embedding.embedding", "encoder.block.{n}.layer.0.SelfAttention.relative_attention_bias"),
    ("blocks.{n}.norm2", "encoder.block.{n}.layer.1.layer_norm"),
    ("blocks.{n}.ffn.gate.0", "encoder.block.{n}.layer.1.DenseReluDense.wi_0"),
    ("blocks.{n}.ffn.fc1", "encoder.block.{n}.layer.1.DenseReluDense.wi_1"),
    ("blocks.{n}.ffn.fc2", "encoder.block.{n}.layer.1.DenseReluDense.wo"),
), suffixes=(".weight",))


def hf_t5_key_to_official(key: str) -> str | None:
    """A transformers UMT5 encoder key -> the official T5 key (None: no counterpart)."""
    return T5_NAMES.to_official(key)


def official_t5_key_to_hf(key: str) -> str:
    """An official T5 key -> the transformers UMT5 encoder key."""
    hf = T5_NAMES.to_theirs(key)
    if hf is None:
        raise CheckpointError(f"official T5 key {key!r} has no transformers UMT5 name")
    return hf


# ----------------------------------------------------------------------------- CLIP

_LAYER = HF_VISION + "encoder.layers.{n}."
CLIP_NAMES = NameTable((
    ("patch_embedding", HF_VISION + "embeddings.patch_embedding"),
    Row("cls_embedding", (HF_VISION + "embeddings.class_embedding",), unsqueezed(2)),
    Row("pos_embedding", (HF_VISION + "embeddings.position_embedding.weight",), unsqueezed(1)),
    ("pre_norm", HF_VISION + "pre_layrnorm"),
    Row("transformer.{n}.attn.to_qkv", tuple(_LAYER + f"self_attn.{m}_proj" for m in "qkv"), CONCAT),
    ("transformer.{n}.attn.proj", _LAYER + "self_attn.out_proj"),
    ("transformer.{n}.norm1", _LAYER + "layer_norm1"),
    ("transformer.{n}.norm2", _LAYER + "layer_norm2"),
    ("transformer.{n}.mlp.0", _LAYER + "mlp.fc1"),
    ("transformer.{n}.mlp.2", _LAYER + "mlp.fc2"),
    ("post_norm", HF_VISION + "post_layernorm"),
    Row("head", (HF_PROJECTION,), TRANSPOSE),
))


@dataclass(frozen=True)
class MappedTensor:
    """One official tensor made of stored HF tensors: their keys, the official shape and how to combine them."""

    stored: tuple[str, ...]
    shape: tuple[int, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]


def hf_clip_plan(shapes: Shapes, where: str) -> dict[str, MappedTensor]:
    """Official `visual.*` name (prefix removed) -> how to read it from a transformers CLIP vision file."""
    if HF_PROJECTION not in shapes:
        raise CheckpointError(
            f"{where}: no {HF_PROJECTION!r}; expected a transformers CLIPVisionModelWithProjection (Wan2.1 image_encoder)"
        )
    plan: dict[str, MappedTensor] = {}
    for key in shapes:
        m = CLIP_NAMES.match_theirs(key)  # keys of no row (an old `position_ids` buffer) are not read
        if m is None or m.official in plan:
            continue
        missing = [k for k in m.theirs if k not in shapes]
        if missing:
            raise CheckpointError(f"{where}: missing key(s) {', '.join(missing[:3])}; expected a transformers CLIP vision tower")
        how = m.transform or SAME
        plan[m.official] = MappedTensor(m.theirs, how.shape([tuple(shapes[k]) for k in m.theirs]), how.combine)
    return plan


def official_clip_to_hf(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One official `visual.*` tensor (prefix removed) as the transformers CLIP tensors it becomes."""
    m = CLIP_NAMES.match_official(key)
    if m is None:
        raise CheckpointError(f"official CLIP key visual.{key!r} has no transformers name")
    return dict(zip(m.theirs, (m.transform or SAME).split(tensor, len(m.theirs))))


# ----------------------------------------------------------------------------- VAE

VAE_SUFFIXES = (".weight", ".bias", ".gamma")
# The modules outside the encoder/decoder stages, and the parts of one residual block.
_VAE_TOP = NameTable((
    ("conv1", "quant_conv"), ("conv2", "post_quant_conv"),
    ("encoder.conv1", "encoder.conv_in"), ("encoder.head.0", "encoder.norm_out"), ("encoder.head.2", "encoder.conv_out"),
    ("decoder.conv1", "decoder.conv_in"), ("decoder.head.0", "decoder.norm_out"), ("decoder.head.2", "decoder.conv_out"),
), VAE_SUFFIXES)  # fmt: skip
_VAE_RESIDUAL = NameTable((
    ("residual.0", "norm1"), ("residual.2", "conv1"), ("residual.3", "norm2"), ("residual.6", "conv2"),
    ("shortcut", "conv_shortcut"),
), VAE_SUFFIXES)  # fmt: skip


class VAEStages(Protocol):
    """What the VAE key map depends on: `export.models.vae.VAEConfig` satisfies it."""

    version: str
    num_res_blocks: int


def _residual(tail: str) -> str:
    return _VAE_RESIDUAL.to_theirs(tail) or tail  # resample / attention tails keep their names


def official_to_diffusers_vae_key(key: str, cfg: VAEStages) -> str:
    """The `AutoencoderKLWan` name of an official VAE key."""
    top = _VAE_TOP.to_theirs(key)
    if top is not None:
        return top
    part, _, rest = key.partition(".")
    fields = rest.split(".")
    if fields[0] == "middle":  # middle.{0,2} are resnets.{0,1}; middle.1 is attentions.0
        j, tail = int(fields[1]), ".".join(fields[2:])
        return f"{part}.mid_block.attentions.0.{tail}" if j == 1 else f"{part}.mid_block.resnets.{j // 2}.{_residual(tail)}"
    per_stage = cfg.num_res_blocks + 1  # decoder residual blocks per stage (the encoder has num_res_blocks)
    if fields[0] == "downsamples" and cfg.version == "2.1":  # the same flat list in both
        return f"encoder.down_blocks.{fields[1]}.{_residual('.'.join(fields[2:]))}"
    if fields[0] == "downsamples":
        i, k, tail = fields[1], int(fields[3]), ".".join(fields[4:])
        if k == cfg.num_res_blocks:
            return f"encoder.down_blocks.{i}.downsampler.{tail}"
        return f"encoder.down_blocks.{i}.resnets.{k}.{_residual(tail)}"
    if fields[0] == "upsamples" and cfg.version == "2.1":  # flat: each stage is its resnets, then one resample
        i, r = divmod(int(fields[1]), per_stage + 1)
        tail = ".".join(fields[2:])
        if r == per_stage:
            return f"decoder.up_blocks.{i}.upsamplers.0.{tail}"
        return f"decoder.up_blocks.{i}.resnets.{r}.{_residual(tail)}"
    if fields[0] == "upsamples":
        i, k, tail = fields[1], int(fields[3]), ".".join(fields[4:])
        if k == per_stage:
            return f"decoder.up_blocks.{i}.upsampler.{tail}"
        return f"decoder.up_blocks.{i}.resnets.{k}.{_residual(tail)}"
    raise CheckpointError(f"official Wan{cfg.version} VAE key {key!r} has no diffusers AutoencoderKLWan name")


def diffusers_vae_names(official_keys: Iterable[str], cfg: VAEStages) -> dict[str, str]:
    """diffusers name -> official name, for every key of the official module (the inverse of the map above)."""
    names: dict[str, str] = {}
    for key in official_keys:
        theirs = official_to_diffusers_vae_key(key, cfg)
        if theirs in names:
            raise ValueError(f"official VAE keys {names[theirs]!r} and {key!r} both map to {theirs!r}")
        names[theirs] = key
    return names


# ----------------------------------------------------------------------------- reading under official names


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
        plan[official] = MappedTensor((key,), tuple(source.header(key).shape), SAME.combine)
    return plan


# ----------------------------------------------------------------------------- Wan2.2-Animate (diffusers)


def diffusers_animate_source(source: TensorSource) -> TensorSource:
    """`source` with its diffusers Animate tensors under official names (other keys unchanged).

    A source without diffusers Animate keys is returned as it is."""
    keys = source.keys()
    if not any(k.startswith(("motion_encoder.res_blocks.", "face_adapter.0.")) or k == DIFFUSERS_ANIMATE_MARKERS[1] for k in keys):
        return source
    table = diffusers_animate_names(diffusers_res_blocks(keys))
    shapes = {k: tuple(source.header(k).shape) for k in keys}
    plan: dict[str, MappedTensor] = {}
    for key in keys:
        m = table.match_theirs(key)
        if m is None:
            plan[key] = MappedTensor((key,), shapes[key], SAME.combine)
            continue
        if m.official in plan:
            continue
        missing = [k for k in m.theirs if k not in shapes]
        if missing:
            raise CheckpointError(f"{source.path}: {key!r} without {missing[0]!r}; both make the official {m.official!r}")
        how = m.transform or SAME
        plan[m.official] = MappedTensor(m.theirs, how.shape([shapes[k] for k in m.theirs]), how.combine)
    return MappedSource(source, plan)
