"""End to end against diffusers: `make-tiny-model --task animate` -> `build-engine` -> our runtime's final
latents of an Animate segment equal diffusers `WanAnimatePipeline`'s on the same tiny random weights (the
diffusers layout of the same seed), text/CLIP embeddings, initial noise and decoded input videos.

The runtime builds the segment's conditioning itself (VAE engines: pose latents, the reference
image's latents with its mask, the zero conditioning video) and runs its sampler; diffusers builds
its own with `AutoencoderKLWan` and runs `WanAnimateTransformer3DModel`.  Stated tolerance: max
|ours - diffusers| / max |diffusers| <= 1e-4 (fp32 ONNX Runtime vs fp32 torch).  One segment:
diffusers draws later segments' noise from its own generator.  Its `output_type="latent"` result is
de-normalized (`latents / latents_recip_std + latents_mean`, ready for its VAE decoder): normalized
back here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanAnimatePipeline, WanAnimateTransformer3DModel
from PIL import Image

from cli import cli
from wanrt.engines.manifest import verify_bundle
from wanrt.export.tiny import make_tiny_model
from wanrt.runtime.animate import AnimatePipeline, read_video
from wanrt.runtime.backends import make_backend
from wanrt.runtime.pipeline import GenerationRequest
from wanrt.runtime.video import write_mp4
from tests.runtime.oracles import official_unshifted_sigmas

pytestmark = pytest.mark.slow  # a five-block Animate DiT and the VAE exported to ONNX: a few minutes of CPU
TOLERANCE = 1e-4
STEPS, FRAMES, H, W = 4, 5, 32, 48


class OfficialSigmasUniPC(UniPCMultistepScheduler):
    """diffusers' flow UniPC, given Wan's official sigmas whatever step count the pipeline asks for."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        super().set_timesteps(device=device, sigmas=official_unshifted_sigmas(num_inference_steps))


class EmbeddedImagePipeline(WanAnimatePipeline):
    """diffusers' Animate pipeline given both the reference image (for its VAE latents) and its CLIP embeddings.

    Its `check_inputs` refuses the pair (it would compute the embeddings with transformers' CLIP
    processor, a different resize than the official CLIP input); both are checked on their own."""

    def check_inputs(self, prompt, negative_prompt, image, *args, **kwargs):
        super().check_inputs(prompt, negative_prompt, None, *args, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("animate_oracle")
    model = make_tiny_model(root / "model", "wan2.2", "animate", seed=3)
    diffusers = make_tiny_model(root / "diffusers", "wan2.2", "animate", "diffusers", seed=3)
    res = CliRunner().invoke(cli, ["build-engine", str(model), "-o", str(root / "bundle"), "--components", "dit,vae,image_encoder"])
    assert res.exit_code == 0, res.output
    rng = np.random.default_rng(5)
    write_mp4(rng.integers(0, 256, (FRAMES, H, W, 3), dtype=np.uint8), root / "pose.mp4", fps=8)
    write_mp4(rng.integers(0, 256, (FRAMES, 32, 32, 3), dtype=np.uint8), root / "face.mp4", fps=8)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "ref.png")  # the video's size: no letterbox
    return root, diffusers, root / "bundle"


def test_segment_latents_match_diffusers_animate_pipeline(built):
    root, diffusers_folder, bundle = built
    manifest = verify_bundle(bundle)
    cfg = manifest.dit
    ours = AnimatePipeline(bundle, manifest, make_backend())
    plan = ours.prepare(GenerationRequest(prompt="unused: embeddings are given", image=root / "ref.png",
                                          pose_video=root / "pose.mp4", face_video=root / "face.mp4",
                                          frames=FRAMES, steps=STEPS, seed=0))  # fmt: skip
    rng = np.random.default_rng(1)
    context = np.zeros((1, 512, cfg.text_dim), np.float32)
    context[0, :9] = rng.standard_normal((9, cfg.text_dim))
    clip_fea = rng.standard_normal((1, 257, cfg.clip_dim)).astype(np.float32)
    noise = rng.standard_normal((1, 16, plan.geometry.latent_frames + 1, H // 8, W // 8)).astype(np.float32)
    cond = ours.segment_condition(plan, 0, None)
    face = plan.inputs.face[:FRAMES].astype(np.float32) / np.float32(127.5) - 1
    latents = ours.denoise(plan, context, None, noise, clip_fea, cond["y"], None,
                           inputs={"pose_latent": cond["pose_latent"], "face_pixels": np.ascontiguousarray(face.transpose(3, 0, 1, 2))[None]})

    pipe = EmbeddedImagePipeline(
        tokenizer=None, text_encoder=None, image_processor=None, image_encoder=None,
        vae=AutoencoderKLWan.from_pretrained(diffusers_folder / "vae").eval(),
        transformer=WanAnimateTransformer3DModel.from_pretrained(diffusers_folder / "transformer").eval(),
        scheduler=OfficialSigmasUniPC(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=manifest.sampling.shift),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    frames = lambda path: [Image.fromarray(f) for f in read_video(path, "pose_video")]  # noqa: E731  the decoded mp4s
    with torch.no_grad():
        ref = pipe(
            image=Image.open(root / "ref.png").convert("RGB"), pose_video=frames(root / "pose.mp4"),
            face_video=frames(root / "face.mp4"), prompt_embeds=torch.from_numpy(context),
            image_embeds=torch.from_numpy(clip_fea), height=H, width=W, segment_frame_length=FRAMES,
            num_inference_steps=STEPS, guidance_scale=1.0, latents=torch.from_numpy(noise.copy()), output_type="latent",
        ).frames.numpy()  # fmt: skip
    vae = pipe.vae.config  # diffusers returns the latents de-normalized for its VAE decoder; ours stay normalized
    ref = (ref - np.array(vae.latents_mean).reshape(1, -1, 1, 1, 1)) / np.array(vae.latents_std).reshape(1, -1, 1, 1, 1)
    err = np.abs(latents - ref).max() / np.abs(ref).max()
    assert err <= TOLERANCE, f"max relative error {err:.2e}"
