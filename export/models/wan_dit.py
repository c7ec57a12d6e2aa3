"""Export-ready Wan DiT (Wan2.1 T2V/I2V/FLF2V, Wan2.2 T2V/I2V-A14B experts, TI2V-5B).

One module for every released Wan DiT, with parameter names identical to the official
`WanModel` state dict (`wan/modules/model.py`), and math that follows the official forward
(see the project reference wan-architecture.md §1):

- sinusoidal time embedding (cos first), `time_embedding`, `time_projection`, every modulation
  table, every norm, the residual stream and the head run in float32;
- q/k RMSNorm over the full model dim before the head split;
- real-valued, interleaved 3D RoPE (pairs split [22, 21, 21] for head_dim 128 across frame,
  height, width), built inside the graph from the latent grid, so one export serves every
  resolution and length;
- 512 text rows attended without a mask; Wan2.1 I2V/FLF2V add the CLIP image branch
  (`img_emb`, `k_img`/`v_img`, FLF2V's `emb_pos` on 514 tokens);
- the head is modulated by `e` (the time embedding), not `e0`;
- per-frame timesteps (TI2V-5B): `timestep [B, F]`; each latent frame's tokens are modulated by
  their frame's embedding (the official code passes the same values per token).

Precision: `WanDiT(cfg, dtype=torch.bfloat16)` stores the big linears (attention, FFN, text and
image embeddings) in bf16 and runs them, and attention, in bf16 (each linear casts its input);
time embedding, modulation, norms (fp32 math, fp32 weights), RoPE, the residual stream, the
patch embedding and the head stay float32 (`param_dtype`).  Inputs and output are float32 in
every precision.

Export: `forward(latent, timestep, context, clip_fea=None) -> noise_pred` is the
`engines.signatures.dit_signature` contract; timesteps arrive as float32 (the runtime truncates
them like the official scheduler does before calling the engine).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wanrt.engines.errors import WanrtError
from wanrt.engines.model import DiTConfig
from wanrt.engines.signatures import CLIP_TOKENS, EngineSignature, dit_signature

from .attention import ATTENTION_IMPLS, attention

ROPE_THETA = 10000.0
IMG_EMB_EPS = 1e-5  # img_emb LayerNorms (MLPProj uses torch's default eps)
# Parameters kept in float32 whatever the model dtype: the official fp32 islands, and the patch
# embedding (ONNX Conv has no bf16 before opset 22; it runs once per step).
FP32_PREFIXES = ("time_embedding.", "time_projection.", "head.", "patch_embedding.", "vace_patch_embedding.")
FP32_SUFFIXES = (
    "modulation", "emb_pos", "norm_q.weight", "norm_k.weight", "norm_k_img.weight", "norm3.weight", "norm3.bias",
    "img_emb.proj.0.weight", "img_emb.proj.0.bias", "img_emb.proj.4.weight", "img_emb.proj.4.bias",
)
# Latent channels of the Wan2.2 VAE: only TI2V-5B uses it, and it is the model fed per-frame timesteps.
TI2V_LATENT_CHANNELS = 48


class DiTError(WanrtError):
    """A DiT checkpoint or config does not fit the module."""


def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the module keeps parameter `name` in when built for `dtype`."""
    if name.startswith(FP32_PREFIXES) or name.endswith(FP32_SUFFIXES):
        return torch.float32
    return dtype


def uses_per_frame_timestep(cfg: DiTConfig) -> bool:
    """TI2V-5B (48-channel Wan2.2-VAE latents) takes one timestep per latent frame."""
    return cfg.in_dim == TI2V_LATENT_CHANNELS and cfg.out_dim == TI2V_LATENT_CHANNELS


def signature_for(cfg: DiTConfig, per_frame_timestep: bool | None = None) -> EngineSignature:
    """The engine signature of a DiT expert with this config."""
    per_frame = uses_per_frame_timestep(cfg) if per_frame_timestep is None else per_frame_timestep
    return dit_signature(
        cfg.in_dim, cfg.out_dim, cfg.text_dim,
        clip_tokens=cfg.clip_tokens if cfg.image_branch else None,
        per_frame_timestep=per_frame, text_len=cfg.text_len, clip_dim=cfg.clip_dim,
        vace_in_dim=cfg.vace_in_dim if cfg.vace else None, vace_blocks=len(cfg.vace_layers),
    )


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`; no op (and no graph node) when it already is."""
    return x if x.dtype == dtype else x.to(dtype)


class Linear(nn.Linear):
    """nn.Linear that runs in its weight's dtype (casts its input); output in that dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(cast(x, self.weight.dtype), self.weight, self.bias)


class RMSNorm(nn.Module):
    """Official `WanRMSNorm` over the last dim, computed in float32 (fp32 weight); returns float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = cast(x, torch.float32)
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (official `WanLayerNorm`; fp32 weights); returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(cast(x, torch.float32), self.normalized_shape, self.weight, self.bias, self.eps)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Official `sinusoidal_embedding_1d`: [cos(t*f), sin(t*f)], f = 10000^(-i/half), in float32."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = cast(t, torch.float32).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_angles(frames: int, height: int, width: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """RoPE angles [frames*height*width, head_dim/2] for the (f, h, w) grid, tokens row-major.

    Official `rope_params` split: frame pairs get dim `head_dim - 4*(head_dim//6)` (44 -> 22
    pairs for 128), height and width `2*(head_dim//6)` each (42 -> 21 pairs); pair k of a part
    with dim d rotates by position * theta^(-2k/d).
    """
    hw_dim = 2 * (head_dim // 6)
    parts = []
    for size, dim, axis in ((frames, head_dim - 2 * hw_dim, 0), (height, hw_dim, 1), (width, hw_dim, 2)):
        inv_freq = torch.pow(ROPE_THETA, -torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        pos = torch.arange(size, device=device, dtype=torch.float32)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = size
        parts.append(torch.outer(pos, inv_freq).reshape(shape).expand(frames, height, width, dim // 2))
    return torch.cat(parts, dim=-1).reshape(frames * height * width, head_dim // 2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x [B, L, heads, head_dim] by cos/sin [L, 1, head_dim/2]."""
    real, imag = cast(x, torch.float32).unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    """Official `WanSelfAttention`: q/k RMSNorm over the full dim, 3D RoPE, no mask."""

    def __init__(self, dim: int, num_heads: int, eps: float, attention_impl: str):
        super().__init__()
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.q = Linear(dim, dim)
        self.k = Linear(dim, dim)
        self.v = Linear(dim, dim)
        self.o = Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, L, heads, head_dim]."""
        return x.unflatten(-1, (self.num_heads, -1))

    def heads_first(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, heads, head_dim] -> [B, heads, L, head_dim] in the linears' dtype (attention's layout)."""
        return cast(x.transpose(1, 2), self.q.weight.dtype)

    def out(self, attn: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Merge heads, apply `o`, restore the token layout of `like`."""
        return self.o(attn.transpose(1, 2).flatten(2)).reshape(like.shape)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, N, D] (tokens grouped by timestep) -> [B, T, N, D]."""
        tokens = x.flatten(1, 2)
        q = apply_rope(self.split(self.norm_q(self.q(tokens))), cos, sin)
        k = apply_rope(self.split(self.norm_k(self.k(tokens))), cos, sin)
        v = self.split(self.v(tokens))
        attn = attention(self.heads_first(q), self.heads_first(k), self.heads_first(v), self.attention_impl)
        return self.out(attn, x)


class CrossAttention(SelfAttention):
    """Official `WanCrossAttention` (text), plus `WanI2VCrossAttention`'s image branch when enabled."""

    def __init__(self, dim: int, num_heads: int, eps: float, attention_impl: str, image_branch: bool):
        super().__init__(dim, num_heads, eps, attention_impl)
        if image_branch:
            self.k_img = Linear(dim, dim)
            self.v_img = Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, N, D], context [B, 512, D], context_img [B, 257|514, D] -> [B, T, N, D]."""
        q = self.heads_first(self.split(self.norm_q(self.q(x.flatten(1, 2)))))
        k = self.heads_first(self.split(self.norm_k(self.k(context))))
        v = self.heads_first(self.split(self.v(context)))
        attn = attention(q, k, v, self.attention_impl)
        if context_img is not None:  # the same q attends to the CLIP tokens with its own k/v; outputs summed
            k_img = self.heads_first(self.split(self.norm_k_img(self.k_img(context_img))))
            v_img = self.heads_first(self.split(self.v_img(context_img)))
            attn = attn + attention(q, k_img, v_img, self.attention_impl)
        return self.out(attn, x)


class WanBlock(nn.Module):
    """Official `WanAttentionBlock` (norm1/norm2 parameter-free, norm3 affine before cross-attention)."""

    def __init__(self, cfg: DiTConfig, attention_impl: str):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps, attention_impl)
        self.norm3 = LayerNorm(dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, attention_impl, cfg.image_branch)
        self.norm2 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(
        self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor | None,
        cos: torch.Tensor, sin: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, T, N, D] float32 residual stream; e0 [B, T, 1, 6, D] float32."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e0).unbind(-2)
        y = self.self_attn(self.norm1(x) * (1 + scale1) + shift1, cos, sin)
        x = x + cast(y, torch.float32) * gate1
        x = x + cast(self.cross_attn(self.norm3(x), context, context_img), torch.float32)
        y = self.ffn(self.norm2(x) * (1 + scale2) + shift2)
        return x + cast(y, torch.float32) * gate2


class Head(nn.Module):
    """Official `Head`: LayerNorm, modulation by `e` (not e0), linear to patch*out_dim; float32."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float):
        super().__init__()
        self.norm = LayerNorm(dim, eps, elementwise_affine=False)
        self.head = Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, T, N, D]; e [B, T, 1, D] -> [B, T, N, patch*out_dim] float32."""
        shift, scale = (self.modulation + e.unsqueeze(-2)).unbind(-2)
        return self.head(self.norm(x) * (1 + scale) + shift)


class ImageEmbedding(nn.Module):
    """Official `MLPProj` (`img_emb`): LayerNorm, Linear, GELU, Linear, LayerNorm; FLF2V adds `emb_pos`."""

    def __init__(self, clip_dim: int, dim: int, clip_tokens: int | None):
        super().__init__()
        self.proj = nn.Sequential(
            LayerNorm(clip_dim, IMG_EMB_EPS), Linear(clip_dim, clip_dim), nn.GELU(),
            Linear(clip_dim, dim), LayerNorm(dim, IMG_EMB_EPS),
        )
        if clip_tokens is not None and clip_tokens != CLIP_TOKENS:  # FLF2V: two images, 514 tokens
            self.emb_pos = nn.Parameter(torch.zeros(1, clip_tokens, clip_dim))

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "emb_pos"):
            clip_fea = clip_fea + self.emb_pos
        return self.proj(clip_fea)


class WanDiT(nn.Module):
    """One Wan DiT expert; `forward(latent, timestep, context, clip_fea=None) -> noise_pred`.

    Inside, the residual stream is [B, T, N, D]: tokens in (frame, row, column) order, grouped
    by timestep: T = 1 (one timestep per sample) or T = latent frames (per-frame timesteps,
    N = tokens per frame), so modulation broadcasts instead of being repeated per token.
    """

    def __init__(self, cfg: DiTConfig, dtype: torch.dtype = torch.float32, attention_impl: str = "native",
                 per_frame_timestep: bool | None = None):
        super().__init__()
        if attention_impl not in ATTENTION_IMPLS:
            raise DiTError(f"unknown attention implementation {attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        if cfg.dim % cfg.num_heads or (cfg.dim // cfg.num_heads) % 2:
            raise DiTError(f"dim {cfg.dim} does not split into {cfg.num_heads} heads of even size")
        if cfg.vace and type(self) is WanDiT:
            raise DiTError("a VACE config needs the VACE module (export.models.wan_vace.WanVaceDiT; dit_module picks it)")
        self.cfg = cfg
        self.per_frame_timestep = uses_per_frame_timestep(cfg) if per_frame_timestep is None else per_frame_timestep
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), Linear(dim, dim))
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, dim), nn.SiLU(), Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(cfg, attention_impl) for _ in range(cfg.num_layers))
        self.head = Head(dim, cfg.out_dim, cfg.patch_size, cfg.eps)
        if cfg.image_branch:
            self.img_emb = ImageEmbedding(cfg.clip_dim, dim, cfg.clip_tokens)
        for name, p in self.named_parameters():
            p.data = p.data.to(param_dtype(name, dtype))

    @property
    def signature(self) -> EngineSignature:
        return signature_for(self.cfg, self.per_frame_timestep)

    def forward(
        self, latent: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor | None = None
    ) -> torch.Tensor:
        """latent [B, in_dim, F, H, W], timestep [B] (or [B, F]), context [B, 512, text_dim],
        clip_fea [B, 257|514, clip_dim] (Wan2.1 I2V/FLF2V) -> noise_pred [B, out_dim, F, H, W] float32."""
        s = self.embed(latent, timestep, context, clip_fea)
        self.run_blocks(s)
        return self.unpatchify(self.head(s.x, s.e), s)

    def patch_embed(self, latent: torch.Tensor) -> torch.Tensor:
        """The patch embedding of the latent, float32 [B, D, F/pt, H/ph, W/pw]."""
        return cast(self.patch_embedding(cast(latent, self.patch_embedding.weight.dtype)), torch.float32)

    def tokens(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch-embedded [B, D, F, H, W] -> the residual stream layout [B, T, N, D] float32 (T: timestep groups)."""
        x = cast(patches, torch.float32)
        if self.per_frame_timestep:  # [B, F, H*W, D], one timestep per latent frame
            return x.flatten(3).permute(0, 2, 3, 1)
        return x.flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, F*H*W, D]

    def embed(
        self, latent: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
    ) -> "Stream":
        """Everything the blocks read: the patch-embedded latent (or `patches`, when a variant adds to them:
        Wan2.2-Animate's pose), time modulation, text (and image) context, RoPE."""
        cfg = self.cfg
        pt, ph, pw = cfg.patch_size
        grid = (latent.shape[2] // pt, latent.shape[3] // ph, latent.shape[4] // pw)
        x = self.tokens(self.patch_embed(latent) if patches is None else patches)
        t = timestep if self.per_frame_timestep else timestep.unsqueeze(1)
        angles = rope_angles(*grid, cfg.dim // cfg.num_heads, latent.device).unsqueeze(1)

        e = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim)).unsqueeze(2)  # [B, T, 1, D]
        e0 = self.time_projection(e).unflatten(-1, (6, cfg.dim))  # [B, T, 1, 6, D]

        context_img = None
        if cfg.image_branch:
            if clip_fea is None:
                raise DiTError("this DiT has an image branch (Wan2.1 i2v/flf2v) and needs clip_fea")
            context_img = self.img_emb(clip_fea)
        return Stream(x, e, e0, self.text_embedding(context), context_img, torch.cos(angles), torch.sin(angles), grid)

    def run_blocks(self, s: "Stream", after_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> None:
        """The attention blocks over `s.x`; `after_block(i, x)`, when given, rewrites the residual stream
        [B, T, N, D] after block i (Wan2.2-Animate's face adapter)."""
        for i, block in enumerate(self.blocks):
            s.x = block(s.x, s.e0, s.context, s.context_img, s.cos, s.sin)
            if after_block is not None:
                s.x = after_block(i, s.x)

    def unpatchify(self, x: torch.Tensor, s: "Stream") -> torch.Tensor:
        """The head's [B, T, N, patch * out_dim] -> noise_pred [B, out_dim, F, H, W]."""
        cfg, (frames, height, width) = self.cfg, s.grid
        pt, ph, pw = cfg.patch_size
        x = x.reshape(x.shape[0], frames, height, width, pt, ph, pw, cfg.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], cfg.out_dim, frames * pt, height * ph, width * pw)


@dataclass
class Stream:
    """What every block of one forward pass reads; `x` is the residual stream [B, T, N, D] float32."""

    x: torch.Tensor
    e: torch.Tensor  # time embedding [B, T, 1, D] (the head's modulation)
    e0: torch.Tensor  # block modulation [B, T, 1, 6, D]
    context: torch.Tensor  # embedded text [B, 512, D]
    context_img: torch.Tensor | None  # embedded CLIP tokens (Wan2.1 I2V/FLF2V)
    cos: torch.Tensor
    sin: torch.Tensor
    grid: tuple[int, int, int]  # latent (frames, height, width) in patches


def dit_module(cfg: DiTConfig, dtype: torch.dtype = torch.float32, attention_impl: str = "native",
               per_frame_timestep: bool | None = None) -> WanDiT:
    """The DiT module of this config: `WanVaceDiT` for Wan2.1-VACE, `WanAnimateDiT` for Wan2.2-Animate, else `WanDiT`."""
    if cfg.animate is not None:
        from .wan_animate import WanAnimateDiT

        return WanAnimateDiT(cfg, dtype, attention_impl)
    if cfg.vace:
        from .wan_vace import WanVaceDiT

        return WanVaceDiT(cfg, dtype, attention_impl, per_frame_timestep)
    return WanDiT(cfg, dtype, attention_impl, per_frame_timestep)


def load_dit(view: Mapping, cfg: DiTConfig | None = None, dtype: torch.dtype = torch.float32,
             attention_impl: str = "native", per_frame_timestep: bool | None = None) -> WanDiT:
    """A WanDiT (WanVaceDiT for VACE) holding the weights of `view` (official key -> ref with `.shape`; `view.load(key, dtype)`).

    `cfg` defaults to the one the view's shapes imply.  Every official key the module needs must
    be in the view with its shape, and the view must hold nothing else.
    """
    cfg = cfg or view_config(view)
    check_view(view, cfg)
    with torch.device("meta"):
        model = dit_module(cfg, dtype, attention_impl, per_frame_timestep)
    state = {name: view.load(name, param_dtype(name, dtype)) for name, _ in model.named_parameters()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def view_config(view: Mapping) -> DiTConfig:
    """The DiT config the view's tensor shapes imply."""
    from wanrt.export.checkpoint.dit_config import infer_dit_config

    return infer_dit_config({k: tuple(view[k].shape) for k in view}, where=_where(view))


def expected_parameters(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> shape of every parameter of a WanDiT with this config (built on meta)."""
    with torch.device("meta"):
        model = dit_module(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_view(view: Mapping, cfg: DiTConfig, expected: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Raise DiTError naming the first missing, unexpected or misshaped tensor (`expected`: the module's parameters)."""
    where = _where(view)
    expected = expected_parameters(cfg) if expected is None else expected
    missing = [k for k in expected if k not in view]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DiTError(f"{where}: missing DiT tensor(s) {', '.join(missing[:3])}{more}")
    unknown = sorted(k for k in view if k not in expected)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise DiTError(f"{where}: tensor(s) {', '.join(unknown[:3])}{more} do not belong to a DiT with this config "
                       f"(dim {cfg.dim}, {cfg.num_layers} layers, image_branch {cfg.image_branch}, "
                       f"vace_layers {list(cfg.vace_layers)})")
    for k, shape in expected.items():
        got = tuple(view[k].shape)
        if got != shape:
            raise DiTError(f"{where}: {k} has shape {list(got)}; expected {list(shape)}")


def _where(view: Mapping) -> str:
    files = getattr(view, "files", None)
    if files:
        return str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
    return type(view).__name__
