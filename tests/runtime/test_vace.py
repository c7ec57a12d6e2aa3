"""Wan2.1-VACE runs end to end: `make-tiny-model --task vace` (diffusers layout) -> `build-engine` -> our runtime's
final latents equal diffusers `WanVACEPipeline`'s, loaded by diffusers itself from the same folder, on the same
text embeddings and noise: masked editing with a reference image (inactive/reactive latents, packed mask, the
reference frame in front), a control video without a mask, and reference images alone.

Stated tolerance: max |ours - diffusers| / max |diffusers| <= 1e-4 (fp32 ONNX Runtime vs fp32 torch).
diffusers puts several reference images in reverse order (each new one in front); the official
`vace_encode_frames` keeps the order given, so the oracle runs use one reference image.
Bad inputs through the CLI: one line, exit 2, no output file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import AutoencoderKLWan, WanVACEPipeline, WanVACETransformer3DModel
from PIL import Image

from cli import cli
from tests.export.helpers import assert_one_line_error
from tests.runtime.oracles import OfficialSigmasUniPC, text_embeddings
from wanrt.engines.manifest import verify_bundle
from wanrt.export.tiny import make_tiny_model
from wanrt.runtime.backends import make_backend
from wanrt.runtime.pipeline import GenerationRequest, WanPipeline

pytestmark = pytest.mark.slow  # a tiny VACE DiT and the VAE exported to ONNX: a minute or two of CPU
TOLERANCE = 1e-4
STEPS = 4
FRAMES, HEIGHT, WIDTH = 5, 32, 48


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model folder, bundle folder, inputs folder): a diffusers-layout tiny VACE model and its dit+vae bundle."""
    root = tmp_path_factory.mktemp("vace")
    model = make_tiny_model(root / "model", "wan2.1", "vace", "diffusers", seed=5)
    res = CliRunner().invoke(cli, ["build-engine", str(model), "-o", str(root / "bundle"), "--components", "dit,text_encoder,vae"])
    assert res.exit_code == 0, res.output
    rng = np.random.default_rng(7)
    inputs = root / "inputs"
    for name, frames in (("video", FRAMES + 2), ("mask", FRAMES)):
        (inputs / name).mkdir(parents=True)
        for i in range(frames):
            if name == "video":
                frame = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
            else:  # gray: the left half kept (black), the rest regenerated (white), moving with the frame
                frame = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
                frame[:, : 16 + 4 * i] = 0
            Image.fromarray(frame).save(inputs / name / f"{i:03d}.png")
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(inputs / "ref.png")  # not the video's size
    (inputs / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))  # an mp4 header, no video
    return model, root / "bundle", inputs


def frames_of(folder) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(folder.iterdir())]


CASES = {  # name -> (request fields with paths relative to the inputs folder, context scale)
    "masked-edit-with-reference": (dict(video="video", mask="mask", ref_images=["ref.png"]), 0.8),
    "control-video": (dict(video="video"), 1.0),
    "reference-only": (dict(ref_images=["ref.png"]), 1.3),
}


@pytest.mark.parametrize("case", CASES)
def test_final_latents_match_diffusers_wan_vace_pipeline(built, case):
    model, bundle, inputs = built
    fields, scale = CASES[case]
    manifest = verify_bundle(bundle)
    ours = WanPipeline(bundle, manifest, make_backend())
    paths = {k: ([str(inputs / p) for p in v] if isinstance(v, list) else str(inputs / v)) for k, v in fields.items()}
    size = {} if "video" in fields else dict(height=HEIGHT, width=WIDTH)
    plan = ours.prepare(GenerationRequest(prompt="unused: embeddings are given", frames=FRAMES, steps=STEPS, seed=0,
                                          context_scale=scale, **size, **paths))  # fmt: skip
    refs = len(fields.get("ref_images", []))
    assert plan.geometry.latent_frames == refs + (FRAMES - 1) // 4 + 1
    ctx = text_embeddings(manifest.dit.text_dim)
    vace = ours.encode_condition(plan)
    assert vace.shape == (1, 96, plan.geometry.latent_frames, HEIGHT // 8, WIDTH // 8)
    noise = ours.initial_noise(plan)
    latents = ours.denoise(plan, ctx[:1], ctx[1:], noise, vace=vace)

    pipe = WanVACEPipeline(
        tokenizer=None, text_encoder=None, vae=AutoencoderKLWan.from_pretrained(model / "vae"),
        transformer=WanVACETransformer3DModel.from_pretrained(model / "transformer"),
        scheduler=OfficialSigmasUniPC(prediction_type="flow_prediction", use_flow_sigmas=True,
                                      flow_shift=manifest.sampling.shift),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    given = dict(
        video=frames_of(inputs / "video")[:FRAMES] if "video" in fields else None,
        mask=frames_of(inputs / "mask") if "mask" in fields else None,
        reference_images=[Image.open(inputs / "ref.png").convert("RGB")] if refs else None,
    )
    with torch.no_grad():
        ref = pipe(
            prompt_embeds=torch.from_numpy(ctx[:1]), negative_prompt_embeds=torch.from_numpy(ctx[1:]),
            height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS, conditioning_scale=scale,
            latents=torch.from_numpy(noise.copy()), guidance_scale=manifest.sampling.guide_scale[0],
            output_type="latent", **given,
        ).frames.numpy()  # fmt: skip
    err = np.abs(latents - ref).max() / np.abs(ref).max()
    print(f"{case}: max relative error {err:.2e}")
    assert err <= TOLERANCE, f"{case}: max relative error {err:.2e}"


def test_cli_writes_the_video_without_the_reference_frames(built, tmp_path):
    _, bundle, inputs = built
    out = tmp_path / "out.mp4"
    res = CliRunner().invoke(cli, ["run", str(bundle), "--prompt", "a fox", "--video", str(inputs / "video"),
                                   "--ref-image", str(inputs / "ref.png"), "--frames", "5", "--steps", "2",
                                   "--context-scale", "0.5", "-o", str(out), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    import av

    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)


@pytest.mark.parametrize("args,needles", [
    (["--mask", "{inputs}/mask"], ["--mask", "needs --video"]),
    (["--video", "{inputs}/video", "--mask", "{inputs}/ref.png"], ["--mask", "frames"]),  # one 40x24 image
    (["--video", "{inputs}/nothing.mp4"], ["--video", "no such video"]),
    (["--video", "{inputs}/broken.mp4"], ["--video", "unreadable video"]),
    (["--video", "{inputs}/video", "--frames", "9"], ["--video", "7 frames, fewer than the 9"]),
    (["--video", "{inputs}/video", "--height", "32", "--width", "48"], ["--height", "--video gives the size"]),
    (["--ref-image", "{inputs}/missing.png"], ["--ref-image", "missing.png"]),
    (["--image", "{inputs}/ref.png"], ["--image", "VACE"]),
])  # fmt: skip
def test_bad_input_is_one_line_and_no_output(built, tmp_path, args, needles):
    _, bundle, inputs = built
    out = tmp_path / "out.mp4"
    args = [a.format(inputs=inputs) for a in args]
    assert_one_line_error(["run", bundle, "--prompt", "a fox", "--frames", "5", *args, "-o", out], *needles)
    assert not out.exists() and list(tmp_path.iterdir()) == []
