"""The CLIP ViT-H/14 image tower Wan2.1 i2v/flf2v uses (`wan/modules/clip.py`), export-ready.

`CLIPVisionEncoder.state_dict()` keys are the official `visual.*` keys of
`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` without the `visual.` prefix, including
the `post_norm` and `head` the pipeline never uses.  `forward` returns what Wan feeds the DiT,
`visual(x, use_31_block=True)`: the output of the penultimate transformer block, no post-norm,
no head.  Math: patch conv without bias, CLS token, learned positions, pre-norm LayerNorm
(eps 1e-5, computed in fp32), softmax in fp32 with 1/sqrt(head_dim) scaling, exact GELU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wanrt.engines.errors import CheckpointError
from wanrt.export.checkpoint.view import TensorSource
from wanrt.export.models.t5 import check_state_shapes, require_file

OFFICIAL_CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VISUAL_PREFIX = "visual."
HEAD_DIM = 80  # ViT-H/14: 1280 / 16 heads; the checkpoint does not record the head count


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Architecture of the vision tower; defaults are open-clip xlm-roberta ViT-H/14."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    num_layers: int = 32
    num_heads: int = 16
    mlp_dim: int = 5120
    out_dim: int = 1024  # the unused `head` projection
    eps: float = 1e-5

    @property
    def tokens(self) -> int:
        """CLS plus one token per patch (257 for 224 px / patch 14)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def tiny(cls) -> "CLIPVisionConfig":
        """Small widths with the real token grid (224 px, patch 14: 257 tokens) and head_dim 80."""
        return cls(width=160, num_layers=3, num_heads=2, mlp_dim=640, out_dim=32)


class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, as the official `LayerNorm` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class CLIPSelfAttention(nn.Module):
    """Fused-qkv multi-head attention, softmax in fp32."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (width // num_heads) ** -0.5
        self.to_qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.to_qkv(x).unflatten(-1, (3, self.num_heads, -1))  # [B,L,3,H,d]
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B,H,L,d]
        scores = (q * self.scale) @ k.transpose(-1, -2)
        probs = scores.float().softmax(dim=-1).to(v.dtype)
        return self.proj((probs @ v).transpose(1, 2).flatten(2))


class CLIPBlock(nn.Module):
    """Pre-norm transformer block with an exact-GELU MLP (`mlp.0`, `mlp.2`)."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.norm1 = LayerNormFP32(cfg.width, eps=cfg.eps)
        self.attn = CLIPSelfAttention(cfg.width, cfg.num_heads)
        self.norm2 = LayerNormFP32(cfg.width, eps=cfg.eps)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, cfg.mlp_dim), nn.GELU(), nn.Linear(cfg.mlp_dim, cfg.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVisionEncoder(nn.Module):
    """`forward(pixel_values [B,3,224,224] float32) -> [B,257,width] float32` (penultimate block)."""

    def __init__(self, cfg: CLIPVisionConfig = CLIPVisionConfig()):
        super().__init__()
        self.config = cfg
        p, w = cfg.patch_size, cfg.width
        self.patch_embedding = nn.Conv2d(3, w, kernel_size=p, stride=p, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.tokens, w))
        self.pre_norm = LayerNormFP32(w, eps=cfg.eps)
        self.transformer = nn.ModuleList(CLIPBlock(cfg) for _ in range(cfg.num_layers))
        self.post_norm = LayerNormFP32(w, eps=cfg.eps)  # unused by Wan; kept for the key set
        self.head = nn.Parameter(torch.zeros(w, cfg.out_dim))  # unused by Wan; kept for the key set

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B, patches, width]: the stride-`p` conv as a matmul over flattened p x p patches.

        Identical to `patch_embedding(x).flatten(2).transpose(1, 2)`, but exports to MatMul, which
        ONNX allows in bf16 (Conv has no bf16 before opset 22).
        """
        p = self.config.patch_size
        b, c, h, w = x.shape
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        return patches @ self.patch_embedding.weight.flatten(1).t()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embed_patches(pixel_values.to(self.patch_embedding.weight.dtype))
        cls = self.cls_embedding.expand(x.shape[0], -1, -1)
        x = self.pre_norm(torch.cat([cls, x], dim=1) + self.pos_embedding)
        for block in self.transformer[:-1]:  # Wan's use_31_block: stop before the last block
            x = block(x)
        return x.float()


# --- loading the official checkpoint -------------------------------------------------------------

_BLOCK_KEY = re.compile(r"transformer\.(\d+)\.")


def clip_state_shapes(cfg: CLIPVisionConfig) -> dict[str, tuple[int, ...]]:
    """Official key (without `visual.`) -> shape for a vision tower of this config."""
    w, m = cfg.width, cfg.mlp_dim
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (w, 3, cfg.patch_size, cfg.patch_size),
        "cls_embedding": (1, 1, w),
        "pos_embedding": (1, cfg.tokens, w),
        "pre_norm.weight": (w,),
        "pre_norm.bias": (w,),
    }
    for n in range(cfg.num_layers):
        p = f"transformer.{n}."
        shapes |= {
            p + "norm1.weight": (w,), p + "norm1.bias": (w,),
            p + "attn.to_qkv.weight": (3 * w, w), p + "attn.to_qkv.bias": (3 * w,),
            p + "attn.proj.weight": (w, w), p + "attn.proj.bias": (w,),
            p + "norm2.weight": (w,), p + "norm2.bias": (w,),
            p + "mlp.0.weight": (m, w), p + "mlp.0.bias": (m,),
            p + "mlp.2.weight": (w, m), p + "mlp.2.bias": (w,),
        }  # fmt: skip
    shapes |= {"post_norm.weight": (w,), "post_norm.bias": (w,), "head": (w, cfg.out_dim)}
    return shapes


def clip_config_from_shapes(shapes: dict[str, tuple[int, ...]], where: str = "CLIP checkpoint") -> CLIPVisionConfig:
    """Infer the tower config from official `visual.*` shapes (prefix removed); raise on any mismatch."""
    for key in ("patch_embedding.weight", "pos_embedding", "transformer.0.mlp.0.weight", "head"):
        if key not in shapes:
            raise CheckpointError(
                f"{where}: missing key {VISUAL_PREFIX + key!r}; expected the official open-clip ViT-H/14 "
                f"visual keys of {OFFICIAL_CLIP_FILE}"
            )
    width, _, patch, _ = shapes["patch_embedding.weight"]
    grid = round((shapes["pos_embedding"][1] - 1) ** 0.5)
    if width % HEAD_DIM:
        raise CheckpointError(f"{where}: vision width {width} is not a multiple of the ViT-H head size {HEAD_DIM}")
    cfg = CLIPVisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        num_layers=1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))),
        num_heads=width // HEAD_DIM,
        mlp_dim=shapes["transformer.0.mlp.0.weight"][0],
        out_dim=shapes["head"][1],
    )
    what = f"the official ViT-H/14 visual keys of {OFFICIAL_CLIP_FILE}"
    check_state_shapes(shapes, clip_state_shapes(cfg), where, what, prefix=VISUAL_PREFIX)
    return cfg


def open_clip_checkpoint(
    path: str | os.PathLike | None, task: str | None = None
) -> tuple[CLIPVisionConfig, TensorSource, dict[str, str]]:
    """The tower config (inferred and checked), lazy reader and module key -> `visual.*` key of a CLIP file.

    Accepts the official open-clip keys and transformers `CLIPVisionModelWithProjection` names."""
    from wanrt.export.checkpoint.companion_keys import MappedSource, hf_clip_plan
    from wanrt.export.checkpoint.companions import is_hf_clip, open_companion

    p = require_file(path, "image encoder (CLIP ViT-H/14)", OFFICIAL_CLIP_FILE, task)
    source = open_companion(p)
    if is_hf_clip(set(source.keys())):  # diffusers image_encoder/: transformers CLIP vision names
        plan = hf_clip_plan({k: tuple(source.header(k).shape) for k in source.keys()}, str(p))
        source = MappedSource(source, {VISUAL_PREFIX + k: m for k, m in plan.items()})
    keys = {k[len(VISUAL_PREFIX) :]: k for k in source.keys() if k.startswith(VISUAL_PREFIX)}
    if not keys:
        raise CheckpointError(f"{p}: no 'visual.*' keys; expected the official CLIP checkpoint {OFFICIAL_CLIP_FILE}")
    cfg = clip_config_from_shapes({k: tuple(source.header(v).shape) for k, v in keys.items()}, where=str(p))
    return cfg, source, keys


def load_clip_vision(path: str | os.PathLike | None, dtype: torch.dtype = torch.float32, task: str | None = None) -> CLIPVisionEncoder:
    """Build the vision tower from the `visual.*` keys of the official CLIP checkpoint (.pth or .safetensors)."""
    cfg, source, keys = open_clip_checkpoint(path, task)
    with torch.device("meta"):
        model = CLIPVisionEncoder(cfg)
    state = {k: source.read(v).to(dtype) for k, v in keys.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
