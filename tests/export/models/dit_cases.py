"""The tiny Wan DiT variants the DiT tests share, and their diffusers references.

Each case is a tiny random diffusers `WanTransformer3DModel` (`WanVACETransformer3DModel` for
VACE) whose weights are saved in the official layout (keys renamed with `export.checkpoint.keys.diffusers_to_official`); head_dim is
128 so the RoPE split is the official [22, 21, 21] pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel
from safetensors.torch import save_file

from wanrt.engines.model import DiTConfig
from wanrt.export.checkpoint.keys import DIFFUSERS_IGNORED, diffusers_to_official
from wanrt.export.checkpoint.view import CheckpointView, SafetensorsSource
from wanrt.export.models.wan_dit import signature_for

TINY = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=32)
CLIP_DIM = 64  # tiny CLIP width


@dataclass(frozen=True)
class Case:
    """One Wan DiT variant."""

    cfg: DiTConfig

    @property
    def per_frame(self) -> bool:
        return signature_for(self.cfg).input("timestep").shape == ("batch", "frames")


CASES = {
    "t2v": Case(DiTConfig(in_dim=16, out_dim=16, **TINY)),
    "i2v": Case(DiTConfig(in_dim=36, out_dim=16, image_branch=True, clip_tokens=257, clip_dim=CLIP_DIM, **TINY)),
    "flf2v": Case(DiTConfig(in_dim=36, out_dim=16, image_branch=True, clip_tokens=514, clip_dim=CLIP_DIM, **TINY)),
    "i2v_a14b": Case(DiTConfig(in_dim=36, out_dim=16, **TINY)),  # Wan2.2: 36-channel input, no CLIP branch
    "ti2v": Case(DiTConfig(in_dim=48, out_dim=48, **TINY)),  # Wan2.2 TI2V-5B: per-frame timesteps
    # Wan2.1-VACE: 3 layers, hints after layers 0 and 2 (layer 1 has none), 96 control channels
    "vace": Case(DiTConfig(in_dim=16, out_dim=16, vace_layers=(0, 2), vace_in_dim=96, **{**TINY, "num_layers": 3})),
}
VACE_SCALES = (0.7, 1.3)  # per-VACE-block hint weights of the tests (diffusers' control_hidden_states_scale)


def diffusers_for(cfg: DiTConfig) -> WanTransformer3DModel:
    """diffusers' transformer with this architecture (I2V: image_dim/added_kv_proj_dim; FLF2V: pos_embed_seq_len;
    VACE: `WanVACETransformer3DModel` with its vace_layers / vace_in_channels)."""
    if cfg.vace:
        return WanVACETransformer3DModel(
            num_attention_heads=cfg.num_heads, attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_dim,
            out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
            num_layers=cfg.num_layers, eps=cfg.eps, vace_layers=list(cfg.vace_layers), vace_in_channels=cfg.vace_in_dim,
        ).eval()
    image = {}
    if cfg.image_branch:
        image = dict(image_dim=cfg.clip_dim, added_kv_proj_dim=cfg.dim)
        if cfg.clip_tokens == 514:
            image["pos_embed_seq_len"] = 514
    return WanTransformer3DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_dim,
        out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, eps=cfg.eps, **image,
    ).eval()


def diffusers_model(case: Case, seed: int) -> WanTransformer3DModel:
    """A tiny random diffusers Wan transformer (norm weights and emb_pos randomized too)."""
    torch.manual_seed(seed)
    model = diffusers_for(case.cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else p.copy_(0.2 * torch.randn_like(p))
            elif "pos_embed" in name:
                p.copy_(0.5 * torch.randn_like(p))
    return model


def official_state(model: WanTransformer3DModel) -> dict[str, torch.Tensor]:
    """The diffusers state dict under official names (every key must have one)."""
    state = {}
    for key, t in model.state_dict().items():
        if DIFFUSERS_IGNORED.match(key):
            continue
        official = diffusers_to_official(key)
        assert official is not None, key
        state[official] = t.contiguous()
    return state


def write_official(state: dict[str, torch.Tensor], path: Path) -> CheckpointView:
    """Save official-named tensors as one safetensors file and open it through the checkpoint layer."""
    save_file(state, str(path))
    return CheckpointView([SafetensorsSource(path)])


def make_inputs(case: Case, batch: int, grid: tuple[int, int, int], seed: int) -> dict[str, torch.Tensor]:
    """Engine-contract inputs: batch items get different timesteps (ti2v: frame 0 at t=0)."""
    cfg = case.cfg
    g = torch.Generator().manual_seed(seed)
    frames, height, width = grid
    t = torch.tensor([999.0, 412.0, 37.0][:batch])
    inputs = {
        "latent": torch.randn(batch, cfg.in_dim, frames, height, width, generator=g),
        "timestep": t,
        "context": torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g),
    }
    if case.per_frame:
        inputs["timestep"] = t[:, None].repeat(1, frames)
        inputs["timestep"][:, 0] = 0.0  # the official TI2V i2v mask: the image frame is clean
    if cfg.image_branch:
        inputs["clip_fea"] = torch.randn(batch, cfg.clip_tokens, cfg.clip_dim, generator=g)
    if cfg.vace:  # diffusers takes one scale per VACE block for the whole batch
        inputs["vace_context"] = torch.randn(batch, cfg.vace_in_dim, frames, height, width, generator=g)
        inputs["context_scale"] = torch.tensor(VACE_SCALES[: len(cfg.vace_layers)]).repeat(batch, 1)
    return inputs


def diffusers_forward(model: WanTransformer3DModel, case: Case, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference output for engine-contract inputs, passed the way diffusers' pipelines pass them."""
    latent, timestep = inputs["latent"], inputs["timestep"]
    batch, _, frames, height, width = latent.shape
    if case.per_frame:  # diffusers' expand_timesteps path: one timestep per token, [B, seq_len]
        timestep = timestep.repeat_interleave((height // 2) * (width // 2), dim=1)
    clip = inputs.get("clip_fea")
    if clip is not None and case.cfg.clip_tokens == 514:  # diffusers views [2B, 257, C] as [B, 514, C]
        clip = clip.reshape(batch * 2, 257, clip.shape[-1])
    with torch.no_grad():
        if case.cfg.vace:
            return model(latent, timestep, inputs["context"], control_hidden_states=inputs["vace_context"],
                         control_hidden_states_scale=inputs["context_scale"][0], return_dict=False)[0].float()
        return model(latent, timestep, inputs["context"], clip, return_dict=False)[0].float()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return float((ours.float() - ref).abs().max() / ref.abs().max())
