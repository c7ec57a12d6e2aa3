"""The tiny Wan2.2-Animate DiT the Animate tests share, and its diffusers reference.

The reference is a tiny random diffusers `WanAnimateTransformer3DModel` (the Wan2.1 I2V DiT with
pose embedding, motion encoder, face encoder and face adapter), saved in the diffusers layout;
the checkpoint layer reads it under official names (`diffusers_animate_source`, as `resolve_model` does). head_dim is 128 (official RoPE split); five
blocks, so one face adapter block (after block 0).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import WanAnimateTransformer3DModel
from safetensors.torch import save_file

from wanrt.engines.model import AnimateConfig, DiTConfig
from wanrt.export.checkpoint.companion_keys import diffusers_animate_source
from wanrt.export.checkpoint.view import CheckpointView, SafetensorsSource

# face crops of 32 px: three ResBlocks (32 -> 4); the released model has 512 px and seven.
TINY_ANIMATE = AnimateConfig(motion_size=32, motion_channels=(8, 16, 16, 16), motion_style_dim=32, motion_dim=4,
                             motion_out_dim=32, face_hidden_dim=32, face_heads=4)
CFG = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=5, in_dim=36, out_dim=16, text_dim=32,
                image_branch=True, clip_tokens=257, clip_dim=64, animate=TINY_ANIMATE)


def diffusers_animate_for(cfg: DiTConfig) -> WanAnimateTransformer3DModel:
    """diffusers' Animate transformer with this architecture."""
    a = cfg.animate
    sizes = [a.motion_size >> i for i in range(len(a.motion_channels))]
    return WanAnimateTransformer3DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_dim,
        latent_channels=a.pose_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, eps=cfg.eps, image_dim=cfg.clip_dim, added_kv_proj_dim=cfg.dim,
        motion_encoder_channel_sizes={str(s): c for s, c in zip(sizes, a.motion_channels)},
        motion_encoder_size=a.motion_size, motion_style_dim=a.motion_style_dim, motion_dim=a.motion_dim,
        motion_encoder_dim=a.motion_out_dim, face_encoder_hidden_dim=a.face_hidden_dim,
        face_encoder_num_heads=a.face_heads, inject_face_latents_blocks=a.adapter_every,
    ).eval()


def diffusers_animate_model(cfg: DiTConfig, seed: int) -> WanAnimateTransformer3DModel:
    """A tiny random diffusers Animate transformer (norm weights, biases and padding tokens randomized too)."""
    torch.manual_seed(seed)
    model = diffusers_animate_for(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else p.copy_(0.2 * torch.randn_like(p))
            elif name.endswith("bias") or "padding_tokens" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def write_diffusers(model: WanAnimateTransformer3DModel, path: Path) -> CheckpointView:
    """Save the diffusers state dict as one safetensors file and open it through the checkpoint layer."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return CheckpointView([diffusers_animate_source(SafetensorsSource(path))])


def animate_inputs(cfg: DiTConfig, batch: int, grid: tuple[int, int, int], seed: int) -> dict[str, torch.Tensor]:
    """Engine-contract inputs for `grid` latent (frames, height, width): frame 0 is the reference frame."""
    g = torch.Generator().manual_seed(seed)
    frames, height, width = grid
    a = cfg.animate
    return {
        "latent": torch.randn(batch, cfg.in_dim, frames, height, width, generator=g),
        "timestep": torch.tensor([999.0, 412.0][:batch]),
        "context": torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g),
        "clip_fea": torch.randn(batch, cfg.clip_tokens, cfg.clip_dim, generator=g),
        "pose_latent": torch.randn(batch, a.pose_dim, frames - 1, height, width, generator=g),
        "face_pixels": torch.rand(batch, 3, 4 * (frames - 2) + 1, a.motion_size, a.motion_size, generator=g) * 2 - 1,
    }


def diffusers_animate_forward(model: WanAnimateTransformer3DModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference output for engine-contract inputs."""
    with torch.no_grad():
        return model(inputs["latent"], inputs["timestep"], inputs["context"], inputs["clip_fea"], inputs["pose_latent"],
                     inputs["face_pixels"], return_dict=False)[0].float()
