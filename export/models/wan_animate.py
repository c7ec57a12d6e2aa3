"""Export-ready Wan2.2-Animate DiT: the Wan2.1 I2V DiT plus pose, motion and face conditioning.

Parameter names are those of the official `WanAnimateModel` state dict (Wan2.2
`wan/modules/animate/model_animate.py`, `motion_encoder.py`, `face_blocks.py`); the math follows
its forward:

- `pose_patch_embedding` (a Conv3d like `patch_embedding`, 16 pose-latent channels) is added to
  the embedded patches of every latent frame but the first (the reference image's frame):
  `after_patch_embedding`, `x[:, :, 1:] += pose`;
- the motion encoder (`motion_encoder`, LIA's `Generator`: `enc.net_app.convs` an appearance CNN
  over each 512x512 face crop, `enc.fc` five EqualLinears, `dec.direction` the motion
  directions, orthonormalized by QR) gives one motion vector per face frame; the face encoder
  (`face_encoder`: causal Conv1d with replicate padding, stride 1, 2, 2, LayerNorm + SiLU, then
  `out_proj` and a learned padding token) turns the per-frame vectors into `face_heads + 1`
  tokens per latent frame, and a zero frame is prepended for the reference frame;
- after DiT blocks 0, 5, 10, ... (`after_transformer_block`, `block_idx % 5 == 0`) a face
  adapter block (`face_adapter.fuser_blocks[i // 5]`, `FaceBlock`) adds cross-attention of each
  latent frame's tokens to that frame's face tokens to the residual stream;
- the rest (time/text embedding, CLIP branch, blocks, head) is `WanDiT`'s.

The motion directions' QR runs once, when the weights are loaded (`MotionDirections.basis`), so
the exported graph holds the orthonormal basis as a constant (ONNX has no QR); the motion
encoder runs on all face frames at once (the official code batches them by 8 for memory).

Precision: the face adapter's linears follow the model dtype like the block linears; the motion
and face encoders, the pose embedding and the norms stay float32 (`animate_param_dtype`).

Export: `forward(latent, timestep, context, clip_fea, pose_latent, face_pixels) -> noise_pred`
is the `engines.signatures.animate_dit_signature` contract.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from wanrt.engines.model import AnimateConfig, DiTConfig
from wanrt.engines.signatures import EngineSignature, animate_dit_signature

from .attention import attention
from .wan_dit import DiTError, LayerNorm, Linear, RMSNorm, WanDiT, cast, check_view, param_dtype

BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)  # LIA's FIR blur before each stride-2 conv
LEAKY_SLOPE, LEAKY_GAIN = 0.2, 2**0.5  # FusedLeakyReLU
FACE_EPS = 1e-6  # face encoder LayerNorms, face adapter pre-norms and q/k RMSNorms
DIRECTION_JITTER = 1e-8  # official Direction: QR of weight + 1e-8
ADAPTER_FP32 = ("norm_q.weight", "norm_k.weight")


def animate_param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the Animate DiT keeps parameter `name` in when built for `dtype`."""
    if name.startswith("face_adapter."):
        return torch.float32 if name.endswith(("q_norm.weight", "k_norm.weight")) else dtype
    if name.startswith(("motion_encoder.", "face_encoder.", "pose_patch_embedding.")):
        return torch.float32
    return param_dtype(name, dtype)


def animate_signature_for(cfg: DiTConfig) -> EngineSignature:
    """The engine signature of an Animate DiT with this config."""
    a = _animate(cfg)
    return animate_dit_signature(cfg.in_dim, cfg.out_dim, cfg.text_dim, a.pose_dim, a.motion_size,
                                 clip_tokens=cfg.clip_tokens, text_len=cfg.text_len, clip_dim=cfg.clip_dim)


def _animate(cfg: DiTConfig) -> AnimateConfig:
    if cfg.animate is None:
        raise DiTError("this DiT config has no Animate modules (DiTConfig.animate is None)")
    if not cfg.image_branch:
        raise DiTError("a Wan2.2-Animate DiT has the CLIP image branch (img_emb); this config has none")
    return cfg.animate


# ----------------------------------------------------------------------------- motion encoder (LIA)


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LIA's `fused_leaky_relu`: leaky_relu(x + bias, 0.2) * sqrt(2); bias [1, C, 1, 1] or [C]."""
    return F.leaky_relu(x + bias, LEAKY_SLOPE) * LEAKY_GAIN


class FusedLeakyReLU(nn.Module):
    """Official `FusedLeakyReLU`: a per-channel bias [1, C, 1, 1], then the scaled leaky ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class EqualConv2d(nn.Module):
    """Official `EqualConv2d`: the weight scaled by 1/sqrt(fan_in) at run time."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1 / math.sqrt(in_channels * kernel * kernel)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


def blur_kernel(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Official `make_kernel([1, 3, 3, 1])`: the outer product, normalized to sum 1 [4, 4] (the checkpoint's buffer)."""
    taps = torch.tensor(BLUR_TAPS, dtype=dtype)
    return torch.outer(taps, taps) / taps.sum() ** 2


def _fir(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The [1, 3, 3, 1] / 8 FIR along `dim` of an already padded x (valid positions only)."""
    n = x.shape[dim]
    taps = [x.narrow(dim, i, n - len(BLUR_TAPS) + 1) * (w / sum(BLUR_TAPS)) for i, w in enumerate(BLUR_TAPS)]
    return taps[0] + taps[1] + taps[2] + taps[3]


class Blur(nn.Module):
    """Official `Blur` (upfirdn2d, up = down = 1): the separable [1, 3, 3, 1] FIR, normalized, per channel.

    The official module stores the 4x4 kernel as a buffer (`....kernel` keys in the checkpoint);
    it is a constant: here the filter is applied as shifted slices (no weight, no constant tensor)."""

    def __init__(self, pad: tuple[int, int]):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad[0], self.pad[1], self.pad[0], self.pad[1]))
        return _fir(_fir(x, 2), 3)


def conv_layer(in_channels: int, out_channels: int, kernel: int, downsample: bool = False, activate: bool = True) -> nn.Sequential:
    """Official `ConvLayer`: [Blur], EqualConv2d, [FusedLeakyReLU] (indices as in the checkpoint)."""
    layers: list[nn.Module] = []
    if downsample:
        p = len(BLUR_TAPS) - 2 + kernel - 1
        layers.append(Blur(((p + 1) // 2, p // 2)))
        layers.append(EqualConv2d(in_channels, out_channels, kernel, stride=2, padding=0, bias=False))
    else:
        layers.append(EqualConv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False))
    if activate:
        layers.append(FusedLeakyReLU(out_channels))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """Official `ResBlock`: 3x3 conv, blurred stride-2 3x3 conv, blurred stride-2 1x1 skip; sum / sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = conv_layer(in_channels, in_channels, 3)
        self.conv2 = conv_layer(in_channels, out_channels, 3, downsample=True)
        self.skip = conv_layer(in_channels, out_channels, 1, downsample=True, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class EqualLinear(nn.Module):
    """Official `EqualLinear` (lr_mul 1, no activation): weight scaled by 1/sqrt(in_dim)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.scale = 1 / math.sqrt(in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class AppearanceEncoder(nn.Module):
    """Official `EncoderApp` (`net_app`): conv_in, one ResBlock per halving down to 4x4, a 4x4 conv to the style code."""

    def __init__(self, a: AnimateConfig):
        super().__init__()
        ch = a.motion_channels
        convs: list[nn.Module] = [conv_layer(3, ch[0], 1)]
        convs += [ResBlock(cin, cout) for cin, cout in zip(ch[:-1], ch[1:])]
        convs.append(EqualConv2d(ch[-1], a.motion_style_dim, 4, padding=0, bias=False))
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return x.flatten(1)  # [N, style_dim, 1, 1] -> [N, style_dim]


class MotionNetwork(nn.Module):
    """Official `Encoder`: the appearance CNN (`net_app`) then the motion MLP (`fc`, no activations)."""

    def __init__(self, a: AnimateConfig):
        super().__init__()
        self.net_app = AppearanceEncoder(a)
        dims = [a.motion_style_dim] * a.motion_blocks + [a.motion_dim]
        self.fc = nn.Sequential(*(EqualLinear(i, o) for i, o in zip(dims[:-1], dims[1:])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net_app(x))


def motion_basis(direction: torch.Tensor) -> torch.Tensor:
    """The orthonormal motion directions Q [out_dim, motion_dim] of `dec.direction.weight` (QR in float32)."""
    return torch.linalg.qr(direction.float() + DIRECTION_JITTER)[0]


class MotionDirections(nn.Module):
    """Official `Direction`: motion = sum_i alpha_i * Q[:, i], Q from the QR of (weight + 1e-8), in float32.

    Q depends only on the weight: it is computed when the weight is set (`refresh`, also run
    after `load_state_dict`) and kept as a non-persistent buffer `basis` [out_dim, motion_dim]."""

    def __init__(self, out_dim: int, motion_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_dim, motion_dim))
        self.register_buffer("basis", torch.zeros(out_dim, motion_dim), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh())
        self.refresh()

    def refresh(self) -> None:
        """Recompute `basis` from the current weight."""
        if not self.weight.is_meta:
            self.register_buffer("basis", motion_basis(self.weight.detach()).to(self.weight.device), persistent=False)

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        """alpha [N, motion_dim] -> motion vectors [N, out_dim] (float32)."""
        return cast(alpha, torch.float32) @ self.basis.T


class Synthesis(nn.Module):
    """Official `Synthesis`: holds the motion directions (`dec.direction`)."""

    def __init__(self, a: AnimateConfig):
        super().__init__()
        self.direction = MotionDirections(a.motion_out_dim, a.motion_dim)


class MotionEncoder(nn.Module):
    """Official `Generator.get_motion`: face crops [N, 3, S, S] in [-1, 1] -> motion vectors [N, motion_out_dim]."""

    def __init__(self, a: AnimateConfig):
        super().__init__()
        self.enc = MotionNetwork(a)
        self.dec = Synthesis(a)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return self.dec.direction(self.enc(faces))


# ----------------------------------------------------------------------------- face encoder and adapter


class CausalConv1d(nn.Module):
    """Official `CausalConv1d`: replicate-pad (kernel - 1) frames in front, then Conv1d (`.conv`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, T] -> [B, C_out, T_out]; the padding repeats frame 0 (a Concat, not an edge Pad)."""
        first = x[:, :, :1].expand(-1, -1, self.pad)
        return self.conv(torch.cat([first, x], dim=2))


class FaceEncoder(nn.Module):
    """Official `FaceEncoder`: motion vectors [B, T, motion_out_dim] -> face tokens [B, T', heads + 1, dim].

    T' = ceil-halved twice (77 face frames -> 20 latent frames); the last token of each frame is
    the learned `padding_tokens`."""

    def __init__(self, a: AnimateConfig, dim: int):
        super().__init__()
        hidden, self.heads = a.face_hidden_dim, a.face_heads
        self.conv1_local = CausalConv1d(a.motion_out_dim, hidden * a.face_heads, 3, stride=1)
        self.conv2 = CausalConv1d(hidden, hidden, 3, stride=2)
        self.conv3 = CausalConv1d(hidden, hidden, 3, stride=2)
        self.norm1 = LayerNorm(hidden, FACE_EPS, elementwise_affine=False)
        self.norm2 = LayerNorm(hidden, FACE_EPS, elementwise_affine=False)
        self.norm3 = LayerNorm(hidden, FACE_EPS, elementwise_affine=False)
        self.out_proj = Linear(hidden, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        batch = motion.shape[0]
        x = self.conv1_local(motion.transpose(1, 2))  # [B, heads * hidden, T]
        x = x.unflatten(1, (self.heads, -1)).flatten(0, 1).transpose(1, 2)  # [B * heads, T, hidden]
        x = F.silu(self.norm1(x))
        x = F.silu(self.norm2(self.conv2(x.transpose(1, 2)).transpose(1, 2)))
        x = F.silu(self.norm3(self.conv3(x.transpose(1, 2)).transpose(1, 2)))
        x = self.out_proj(x).unflatten(0, (batch, self.heads)).transpose(1, 2)  # [B, T', heads, dim]
        pad = self.padding_tokens.expand(batch, x.shape[1], 1, -1)
        return torch.cat([cast(x, torch.float32), cast(pad, torch.float32)], dim=2)


class FaceBlock(nn.Module):
    """Official `FaceBlock`: each latent frame's tokens attend to that frame's face tokens.

    q from LayerNorm(x) (`linear1_q`), k/v from LayerNorm(face tokens) (`linear1_kv`, k first),
    RMSNorm on q/k per head, no RoPE, output `linear2`; the caller adds it to the stream."""

    def __init__(self, dim: int, num_heads: int, attention_impl: str):
        super().__init__()
        self.num_heads, self.attention_impl = num_heads, attention_impl
        self.linear1_kv = Linear(dim, 2 * dim)
        self.linear1_q = Linear(dim, dim)
        self.linear2 = Linear(dim, dim)
        self.q_norm = RMSNorm(dim // num_heads, FACE_EPS)
        self.k_norm = RMSNorm(dim // num_heads, FACE_EPS)
        self.pre_norm_feat = LayerNorm(dim, FACE_EPS, elementwise_affine=False)
        self.pre_norm_motion = LayerNorm(dim, FACE_EPS, elementwise_affine=False)

    def forward(self, x: torch.Tensor, face: torch.Tensor, frames: int) -> torch.Tensor:
        """x [B, L, D] (`frames` latent frames of tokens), face [B, frames, K, D] -> [B, L, D] float32."""
        batch = face.shape[0]
        k, v = self.linear1_kv(self.pre_norm_motion(face)).unflatten(-1, (2, self.num_heads, -1)).unbind(-3)
        q = self.linear1_q(self.pre_norm_feat(x)).unflatten(-1, (self.num_heads, -1))  # [B, L, H, d]
        dtype = self.linear1_q.weight.dtype
        q = cast(self.q_norm(q), dtype).unflatten(1, (frames, -1)).flatten(0, 1)  # [B*F, L/F, H, d]
        k = cast(self.k_norm(k), dtype).flatten(0, 1)  # [B*F, K, H, d]
        v = cast(v, dtype).flatten(0, 1)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.attention_impl)
        out = out.transpose(1, 2).flatten(2).unflatten(0, (batch, frames)).flatten(1, 2)  # [B, L, D]
        return cast(self.linear2(out), torch.float32)


class FaceAdapter(nn.Module):
    """Official `FaceAdapter`: the face blocks (`fuser_blocks`), one per `adapter_every` DiT blocks."""

    def __init__(self, dim: int, num_heads: int, count: int, attention_impl: str):
        super().__init__()
        self.fuser_blocks = nn.ModuleList(FaceBlock(dim, num_heads, attention_impl) for _ in range(count))


# ----------------------------------------------------------------------------- the DiT


class WanAnimateDiT(WanDiT):
    """Wan2.2-Animate-14B; `forward(latent, timestep, context, clip_fea, pose_latent, face_pixels) -> noise_pred`."""

    def __init__(self, cfg: DiTConfig, dtype: torch.dtype = torch.float32, attention_impl: str = "native"):
        a = _animate(cfg)
        super().__init__(cfg, dtype, attention_impl, per_frame_timestep=False)
        self.pose_patch_embedding = nn.Conv3d(a.pose_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.motion_encoder = MotionEncoder(a)
        self.face_encoder = FaceEncoder(a, cfg.dim)
        self.face_adapter = FaceAdapter(cfg.dim, cfg.num_heads, a.adapters(cfg.num_layers), attention_impl)
        for name, p in self.named_parameters():
            p.data = p.data.to(animate_param_dtype(name, dtype))

    @property
    def signature(self) -> EngineSignature:
        return animate_signature_for(self.cfg)

    def face_tokens(self, face_pixels: torch.Tensor) -> torch.Tensor:
        """face_pixels [B, 3, T, S, S] in [-1, 1] -> face tokens [B, 1 + T', heads + 1, D] (a zero first frame)."""
        batch, _, frames = face_pixels.shape[:3]
        motion = self.motion_encoder(face_pixels.transpose(1, 2).flatten(0, 1))  # [B*T, motion_out_dim]
        tokens = self.face_encoder(motion.unflatten(0, (batch, frames)))
        return torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)

    def forward(
        self, latent: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor | None = None,
        pose_latent: torch.Tensor | None = None, face_pixels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """latent [B, 36, F, H, W], pose_latent [B, 16, F-1, H, W], face_pixels [B, 3, 4(F-2)+1, S, S]
        (+ WanDiT's timestep/context/clip_fea) -> noise_pred [B, 16, F, H, W] float32."""
        if pose_latent is None or face_pixels is None:
            raise DiTError("a Wan2.2-Animate DiT needs pose_latent and face_pixels")
        x = self.patch_embed(latent)
        pose = cast(self.pose_patch_embedding(cast(pose_latent, self.pose_patch_embedding.weight.dtype)), torch.float32)
        x = torch.cat([x[:, :, :1], x[:, :, 1:] + pose], dim=2)
        s = self.embed(latent, timestep, context, clip_fea, patches=x)
        face = self.face_tokens(face_pixels)
        every, frames = self.cfg.animate.adapter_every, x.shape[2]

        def after_block(i: int, stream: torch.Tensor) -> torch.Tensor:
            if i % every:
                return stream
            block = self.face_adapter.fuser_blocks[i // every]
            return stream + block(stream.flatten(1, 2), face, frames).reshape(stream.shape)

        self.run_blocks(s, after_block)
        return self.unpatchify(self.head(s.x, s.e), s)


def load_animate_dit(view: Mapping, cfg: DiTConfig, dtype: torch.dtype = torch.float32,
                     attention_impl: str = "native") -> WanAnimateDiT:
    """A WanAnimateDiT holding the weights of `view` (official key -> ref; `view.load(key, dtype)`).

    Every official key the module needs must be in the view with its shape, and nothing else."""
    check_view(view, cfg, expected_animate_parameters(cfg))
    with torch.device("meta"):
        model = WanAnimateDiT(cfg, dtype, attention_impl)
    state = {name: view.load(name, animate_param_dtype(name, dtype)) for name, _ in model.named_parameters()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def expected_animate_parameters(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> shape of every parameter of a WanAnimateDiT with this config (built on meta)."""
    with torch.device("meta"):
        model = WanAnimateDiT(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}

