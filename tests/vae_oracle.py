"""The diffusers VAE oracle shared by the VAE module tests and the runtime's VAE tests.

A tiny random diffusers `AutoencoderKLWan` (Wan2.1 layout, or the Wan2.2 residual layout with
2x2 patches), its weights renamed to official keys by the checkpoint layer's map.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan

from wanrt.export.checkpoint.companion_keys import diffusers_vae_names
from wanrt.export.models.vae import VAEConfig, WanVAE


def diffusers_vae(cfg: VAEConfig, seed: int = 0) -> AutoencoderKLWan:
    """A random diffusers `AutoencoderKLWan` of `cfg`'s architecture; norm gains and biases randomized too."""
    torch.manual_seed(seed)
    extra = {}
    if cfg.version == "2.2":
        extra = dict(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16)
    model = AutoencoderKLWan(
        base_dim=cfg.dim,
        decoder_base_dim=cfg.dec_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temporal_downsample),
        latents_mean=list(cfg.latents_mean),
        latents_std=list(cfg.latents_std),
        **extra,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def official_state(model: AutoencoderKLWan, cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """The diffusers weights under official keys (every key must map)."""
    with torch.device("meta"):
        names = diffusers_vae_names(WanVAE(cfg).state_dict(), cfg)
    state = {}
    for key, value in model.state_dict().items():
        assert key in names, key
        state[names[key]] = value.clone()
    return state


def ours_from_diffusers(model: AutoencoderKLWan, cfg: VAEConfig) -> WanVAE:
    vae = WanVAE(cfg).eval()
    vae.load_state_dict(official_state(model, cfg), strict=True)
    return vae


def latent_stats(cfg: VAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, cfg.z_dim, 1, 1, 1)
    return torch.tensor(cfg.latents_mean).view(shape), torch.tensor(cfg.latents_std).view(shape)


def diffusers_encode(model: AutoencoderKLWan, cfg: VAEConfig, video: torch.Tensor) -> torch.Tensor:
    """diffusers' latent mean, normalized the official way."""
    mean, std = latent_stats(cfg)
    return (model.encode(video).latent_dist.mode() - mean) / std


def diffusers_decode(model: AutoencoderKLWan, cfg: VAEConfig, z: torch.Tensor) -> torch.Tensor:
    mean, std = latent_stats(cfg)
    return model.decode(z * std + mean).sample


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these tiny convolutions only lose time to thread handoffs (autouse where imported)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
