"""End to end against diffusers: `make-tiny-model` -> `build-engine` -> our runtime's final latents equal
diffusers `WanPipeline`'s on the same tiny random weights, text embeddings and initial noise.

Stated tolerance: max |ours - diffusers| / max |diffusers| <= 1e-4 after all steps (fp32 ONNX Runtime
vs fp32 torch; observed ~3e-6).  diffusers' UniPC runs on Wan's official sigmas (its own default
schedule starts at sigma 1 instead of 0.999), and the experts' guide scales are passed the
diffusers way: `guidance_scale` for `transformer` (high noise), `guidance_scale_2` for `transformer_2`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import WanPipeline, WanTransformer3DModel
from safetensors.torch import load_file

from cli import cli
from wanrt.engines.manifest import verify_bundle
from wanrt.export.checkpoint.keys import official_to_diffusers
from wanrt.export.tiny import make_tiny_model
from wanrt.runtime.backends import make_backend
from wanrt.runtime.pipeline import GenerationRequest, RunStats
from wanrt.runtime.pipeline import WanPipeline as RuntimePipeline
from tests.runtime.oracles import OfficialSigmasUniPC, text_embeddings

pytestmark = pytest.mark.slow  # two tiny models exported to ONNX: about a minute of CPU
TOLERANCE = 1e-4
STEPS = 6


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (model folder, bundle folder), each built by the real commands (DiT engines only)."""
    out = {}
    for family in ("wan2.1", "wan2.2"):
        root = tmp_path_factory.mktemp(family.replace(".", ""))
        model = make_tiny_model(root / "model", family, "t2v", seed=3)
        res = CliRunner().invoke(cli, ["build-engine", str(model), "-o", str(root / "bundle"), "--components", "dit"])
        assert res.exit_code == 0, res.output
        out[family] = (model, root / "bundle")
    return out


def diffusers_transformer(folder, cfg) -> WanTransformer3DModel:
    """The expert's official-layout weights in a diffusers transformer (keys renamed, strict)."""
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    model = WanTransformer3DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_dim,
        out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, eps=cfg.eps,
    ).eval()  # fmt: skip
    model.load_state_dict({official_to_diffusers(k): v for k, v in state.items()}, strict=True)
    return model


@pytest.mark.parametrize("family", ["wan2.1", "wan2.2"])
def test_final_latents_match_diffusers_wan_pipeline(built, family):
    model, bundle = built[family]
    manifest = verify_bundle(bundle)
    cfg, sampling = manifest.dit, manifest.sampling
    ours = RuntimePipeline(bundle, manifest, make_backend())
    plan = ours.prepare(GenerationRequest(prompt="unused: embeddings are given", frames=5, height=32, width=48,
                                          steps=STEPS, seed=0))  # fmt: skip
    ctx = text_embeddings(cfg.text_dim)
    noise = ours.initial_noise(plan)
    stats = RunStats("test")
    latents = ours.denoise(plan, ctx[:1], ctx[1:], noise, stats=stats)

    if family == "wan2.2":
        kwargs = dict(
            transformer=diffusers_transformer(model / "high_noise_model", cfg),
            transformer_2=diffusers_transformer(model / "low_noise_model", cfg),
            boundary_ratio=sampling.boundary,
        )
        scales = dict(guidance_scale=sampling.guide_scale[1], guidance_scale_2=sampling.guide_scale[0])
        assert {s.expert for s in stats.steps} == {"dit_high_noise", "dit_low_noise"}  # both experts ran
    else:
        folder = next(p.parent for p in model.rglob("*.safetensors") if "diffusion_pytorch_model" in p.name)
        kwargs = dict(transformer=diffusers_transformer(folder, cfg))
        scales = dict(guidance_scale=sampling.guide_scale[0])
    scheduler = OfficialSigmasUniPC(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=sampling.shift)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(
            prompt_embeds=torch.from_numpy(ctx[:1]), negative_prompt_embeds=torch.from_numpy(ctx[1:]),
            height=32, width=48, num_frames=5, num_inference_steps=STEPS, latents=torch.from_numpy(noise.copy()),
            output_type="latent", **scales,
        ).frames.numpy()  # fmt: skip
    err = np.abs(latents - ref).max() / np.abs(ref).max()
    assert err <= TOLERANCE, f"{family}: max relative error {err:.2e}"
