"""Pipeline arithmetic on real bundles vs numpy references: experts, CFG, samplers, I2V/TI2V conditioning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from wanrt.engines.defaults import default_negative_prompt
from wanrt.engines.errors import BundleError, WanrtError
from wanrt.engines.manifest import read_manifest
from wanrt.engines.model import SamplingDefaults
from wanrt.runtime.backends import make_backend
from wanrt.runtime.pipeline import GenerationRequest, RunStats, WanPipeline
from wanrt.runtime.vae import Tiling
from tests.runtime.bundles import CLIP_WIDTH, TEXT_DIM, clip_weight, dit_fn, text_table, tokenize, vae_gains
from tests.runtime.oracles import diffusers_euler, diffusers_unipc
from tests.runtime.recording import RecordingBackend

HIGH, LOW = "dit_high_noise", "dit_low_noise"
DISTILL = SamplingDefaults(
    sampler="distill", steps=4, shift=5.0, guide_scale=(3.5, 3.5), enable_cfg=False, boundary_step_index=2,
    denoising_step_list=[1000, 750, 500, 250], frames=5, height=32, width=48, fps=16,
)  # fmt: skip


def pipeline(bundle, budget=None) -> WanPipeline:
    return WanPipeline(bundle, read_manifest(bundle), make_backend(), memory_budget_bytes=budget)


def contexts(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, 512, TEXT_DIM), dtype=np.float32), rng.standard_normal((1, 512, TEXT_DIM), dtype=np.float32)


def reference_unipc(noise, ctx, ctx_null, steps, shift, expert_of, scale_of, y=None, clip=None, first=None):
    """Wan's loop with diffusers' UniPC as the sampler and the graphs' numpy twins as the DiT."""
    sched = diffusers_unipc(steps, shift)
    x = torch.from_numpy(noise.copy())
    if first is not None:
        x[:, :, :1] = torch.from_numpy(first)
    experts = []
    for t in sched.timesteps:
        name = expert_of(int(t))
        experts.append(name)
        fn, g = dit_fn(name, noise.shape[1]), scale_of(name)
        lat = x.numpy() if y is None else np.concatenate([x.numpy(), y], axis=1)
        ts = np.array([float(t)], np.float32)
        if first is not None:
            ts = np.full((1, noise.shape[2]), float(t), np.float32)
            ts[:, 0] = 0
        cond = fn(lat, ts, ctx, clip)
        v = cond if g is None else fn(lat, ts, ctx_null, clip) + g * (cond - fn(lat, ts, ctx_null, clip))
        x = sched.step(torch.from_numpy(v.astype(np.float32)), t, x, return_dict=False)[0]
        if first is not None:
            x[:, :, :1] = torch.from_numpy(first)
    return x.numpy(), experts


def run_moe_t2v(bundle, budget=None):
    """Our denoise vs the reference on a MoE T2V bundle: high-noise while t >= 0.875 * 1000, guide (3.0, 4.0)."""
    pipe = pipeline(bundle, budget)
    plan = pipe.prepare(GenerationRequest(prompt="a red fox", seed=1, steps=8))
    ctx, ctx_null = contexts()
    noise = pipe.initial_noise(plan)
    stats = RunStats("test")
    out = pipe.denoise(plan, ctx, ctx_null, noise, stats=stats)
    ref, experts = reference_unipc(
        noise, ctx, ctx_null, 8, 5.0, lambda t: HIGH if t >= 875 else LOW, lambda n: 4.0 if n == HIGH else 3.0
    )
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert [s.expert for s in stats.steps] == experts and set(experts) == {HIGH, LOW}
    assert all(s.cfg for s in stats.steps)
    return stats


def test_moe_t2v_cfg_batch2_matches_reference(bundle_factory):
    stats = run_moe_t2v(bundle_factory("moe_t2v"))
    assert all(s.engine_calls == 1 for s in stats.steps)  # [cond, uncond] in one batch-2 call
    assert stats.residency_mode == "keep_all"
    assert [e["action"] for e in stats.residency] == ["load", "load", "release", "release"]


def test_two_calls_when_the_engine_takes_batch_1_and_swap_policy(bundle_factory):
    stats = run_moe_t2v(bundle_factory("moe_t2v_b1", batch_range=(1, 1)), budget=1)  # nothing fits
    assert all(s.engine_calls == 2 for s in stats.steps)
    assert stats.residency_mode == "swap"
    assert [(e["action"], e["name"]) for e in stats.residency] == [
        ("load", HIGH), ("release", HIGH), ("load", LOW), ("release", LOW),
    ]  # fmt: skip


def test_distilled_moe_switches_by_step_index_without_cfg(bundle_factory):
    bundle = bundle_factory("moe_distill", sampling=DISTILL)
    pipe = pipeline(bundle)
    plan = pipe.prepare(GenerationRequest(prompt="a cat", seed=4))
    assert [s.timestep for s in plan.steps] == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=1e-3)
    ctx, _ = contexts(2)
    noise = pipe.initial_noise(plan)
    stats = RunStats("test")
    out = pipe.denoise(plan, ctx, None, noise, stats=stats)
    # independent: float64 sigmas from the fact, Euler x <- x + (s_next - s) v, high-noise for steps 0, 1
    sig = [5 * (t / 1000) / (1 + 4 * (t / 1000)) for t in (1000, 750, 500, 250)] + [0.0]
    x = noise.astype(np.float64)
    for i in range(4):
        name = HIGH if i < 2 else LOW
        v = dit_fn(name, 16)(x.astype(np.float32), np.array([sig[i] * 1000], np.float32), ctx)
        x = x + (sig[i + 1] - sig[i]) * v
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5 * np.abs(x).max())
    assert [s.expert for s in stats.steps] == [HIGH, HIGH, LOW, LOW]
    assert not plan.cfg and all(s.engine_calls == 1 for s in stats.steps)


def test_guidance_one_skips_the_unconditional_pass(bundle_factory):
    bundle = bundle_factory("wan21_t2v", family="wan2.1", moe=False)
    pipe = pipeline(bundle)
    plan = pipe.prepare(GenerationRequest(prompt="a cat", seed=0, steps=5, guidance=1.0, negative_prompt="bad"))
    assert not plan.cfg and {s.expert for s in plan.steps} == {"dit"}
    assert plan.warnings == ["--negative-prompt has no effect: no step uses CFG (guidance 1 or CFG disabled)"]
    ctx, _ = contexts(3)
    noise = pipe.initial_noise(plan)
    out = pipe.denoise(plan, ctx, None, noise)
    ref, _ = reference_unipc(noise, ctx, None, 5, 5.0, lambda t: "dit", lambda n: None)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_wan21_i2v_conditioning_channels_and_clip(bundle_factory):
    bundle = bundle_factory("wan21_i2v", family="wan2.1", task="i2v", moe=False, clip_tokens=257)
    pipe = pipeline(bundle)
    rng = np.random.default_rng(5)
    steps, shift = 6, 3.0
    img_plan = pipe.prepare(GenerationRequest(prompt="a cat", seed=2, steps=steps, shift=shift, frames=5,
                                              image=_image_file(bundle.parent / "img.png", 48, 32)))  # fmt: skip
    g = img_plan.geometry
    y = rng.standard_normal((1, 20, g.latent_frames, g.latent_height, g.latent_width), dtype=np.float32)
    clip = rng.standard_normal((1, 257, CLIP_WIDTH), dtype=np.float32)
    ctx, ctx_null = contexts(4)
    noise = pipe.initial_noise(img_plan)
    out = pipe.denoise(img_plan, ctx, ctx_null, noise, clip_fea=clip, y=y)
    ref, _ = reference_unipc(noise, ctx, ctx_null, steps, shift, lambda t: "dit", lambda n: 3.0, y=y, clip=clip)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_wan22_i2v_moe_has_no_clip_and_swaps_experts_with_the_condition(bundle_factory):
    """Wan2.2 I2V-A14B: 16 noise + 20 condition channels, no CLIP stage, both experts at the boundary."""
    bundle = bundle_factory("wan22_i2v", family="wan2.2", task="i2v", moe=True)
    pipe = pipeline(bundle)
    plan = pipe.prepare(GenerationRequest(prompt="a cat", seed=4, steps=8, image=_image_file(bundle.parent / "i.png", 48, 32)))
    assert not pipe.dit_takes_clip and pipe.stages(plan) == ["text_encoder", "vae_encoder", "denoise", "vae_decoder"]
    g = plan.geometry
    y = np.random.default_rng(6).standard_normal((1, 20, g.latent_frames, g.latent_height, g.latent_width), dtype=np.float32)
    ctx, ctx_null = contexts(5)
    noise = pipe.initial_noise(plan)
    stats = RunStats("test")
    out = pipe.denoise(plan, ctx, ctx_null, noise, y=y, stats=stats)
    ref, experts = reference_unipc(noise, ctx, ctx_null, 8, plan.shift, lambda t: HIGH if t >= 875 else LOW,
                                   lambda n: 4.0 if n == HIGH else 3.0, y=y)  # fmt: skip
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert [s.expert for s in stats.steps] == experts and set(experts) == {HIGH, LOW}


def test_ti2v_per_frame_timesteps_and_first_frame_replacement(bundle_factory):
    sampling = SamplingDefaults(steps=5, shift=5.0, guide_scale=(5.0, 5.0), frames=9, height=32, width=64, fps=24,
                                max_area=32 * 64)  # fmt: skip
    bundle = bundle_factory("ti2v", task="ti2v", moe=False, vae_version="2.2", sampling=sampling)
    pipe = pipeline(bundle)
    plan = pipe.prepare(GenerationRequest(prompt="a cat", seed=3, image=_image_file(bundle.parent / "wide.png", 128, 64)))
    g = plan.geometry
    assert (g.width, g.height, g.latent_frames, g.latent_height, g.latent_width) == (64, 32, 3, 2, 4)
    z = np.random.default_rng(6).standard_normal((1, 48, 1, 2, 4), dtype=np.float32)
    ctx, ctx_null = contexts(5)
    noise = pipe.initial_noise(plan)
    out = pipe.denoise(plan, ctx, ctx_null, noise, image_latent=z)
    ref, _ = reference_unipc(noise, ctx, ctx_null, 5, 5.0, lambda t: "dit", lambda n: 5.0, first=z)
    np.testing.assert_array_equal(out[:, :, :1], z)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_ti2v_without_image_is_text_to_video_with_per_frame_timesteps(bundle_factory):
    sampling = SamplingDefaults(steps=4, shift=5.0, guide_scale=(5.0, 5.0), frames=9, height=32, width=64, fps=24)
    bundle = bundle_factory("ti2v_t2v", task="ti2v", moe=False, vae_version="2.2", sampling=sampling)
    pipe = pipeline(bundle)
    plan = pipe.prepare(GenerationRequest(prompt="a cat", seed=3))
    assert plan.condition_image is None and "vae_encoder" not in pipe.stages(plan)
    with pytest.raises(WanrtError, match="multiples of 32"):
        pipe.prepare(GenerationRequest(prompt="a cat", height=48, width=64))  # 16-multiples are not enough
    ctx, ctx_null = contexts(6)
    noise = pipe.initial_noise(plan)
    out = pipe.denoise(plan, ctx, ctx_null, noise)
    ref, _ = reference_unipc(noise, ctx, ctx_null, 4, 5.0, lambda t: "dit", lambda n: 5.0)  # every frame at t
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _image_file(path, w, h, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_encode_text_matches_the_graph_and_the_padding_rule(bundle_factory):
    bundle = bundle_factory("moe_t2v")
    pipe = pipeline(bundle)
    prompts = ["a red fox runs in snow", "bad blurry"]
    ctx = pipe.encode_text(prompts)
    assert ctx.shape == (2, 512, TEXT_DIM)
    table = text_table()
    for b, p in enumerate(prompts):
        ids = tokenize(p)
        np.testing.assert_allclose(ctx[b, : len(ids)], table[ids], rtol=1e-6)
        assert not ctx[b, len(ids) :].any()  # zero rows past the true length


def test_encode_clip_matches_the_graph_on_official_preprocessing(bundle_factory):
    bundle = bundle_factory("wan21_flf2v", family="wan2.1", task="flf2v", moe=False, clip_tokens=514)
    pipe = pipeline(bundle)
    first = _image_file(bundle.parent / "first.png", 40, 24, seed=1)
    last = _image_file(bundle.parent / "last.png", 40, 24, seed=2)
    plan = pipe.prepare(GenerationRequest(prompt="a cat", seed=0, image=first, last_image=last, height=32, width=48))
    feats = pipe.encode_clip(plan)
    assert feats.shape == (1, 514, CLIP_WIDTH)
    w = clip_weight(257, CLIP_WIDTH)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    for k, path in enumerate((first, last)):
        x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255).permute(2, 0, 1)[None]
        x = torch.nn.functional.interpolate(x * 2 - 1, size=(224, 224), mode="bicubic", align_corners=False)
        pix = ((x * 0.5 + 0.5) - mean) / std
        expect = (pix.mean(dim=(2, 3)).numpy() @ w).reshape(257, CLIP_WIDTH)
        np.testing.assert_allclose(feats[0, 257 * k : 257 * (k + 1)], expect, rtol=1e-4, atol=1e-5)


def test_flf2v_condition_is_mask_then_vae_latents(bundle_factory):
    """y = [4 mask channels | VAE(first, zeros, last)]: checked with the VAE test graph's numpy twin
    (a chunk's latent = its mean over channels, frames and 8x8 blocks, times the per-channel gains)."""
    bundle = bundle_factory("wan21_flf2v", family="wan2.1", task="flf2v", moe=False, clip_tokens=514)
    pipe = pipeline(bundle)
    first = _image_file(bundle.parent / "f1.png", 40, 24, seed=1)
    last = _image_file(bundle.parent / "f2.png", 40, 24, seed=2)
    plan = pipe.prepare(GenerationRequest(prompt="a cat", image=first, last_image=last, height=32, width=48, frames=9))
    g = plan.geometry
    y = pipe.encode_condition(plan)
    assert y.shape == (1, 20, 3, g.latent_height, g.latent_width)
    np.testing.assert_array_equal(y[0, :4], i2v_mask_reference(9, g.latent_height, g.latent_width))
    gains = vae_gains(16)[:, None, None]

    def block_mean(x):  # [3, H, W] -> [h, w]
        return x.reshape(3, g.latent_height, 8, g.latent_width, 8).mean(axis=(0, 2, 4))

    np.testing.assert_allclose(y[0, 4:, 0], gains * block_mean(plan.condition_image), rtol=1e-5, atol=1e-6)
    assert not y[0, 4:, 1].any()  # frames 1..4 are zeros
    np.testing.assert_allclose(y[0, 4:, 2], gains * block_mean(plan.condition_last) / 4, rtol=1e-5, atol=1e-6)


def i2v_mask_reference(frames, h, w):
    """Latent frame 0 and the last one set (FLF2V), as the official mask gives for 9 frames."""
    m = np.zeros((4, (frames - 1) // 4 + 1, h, w), np.float32)
    m[:, 0] = 1
    m[3, -1] = 1  # the last video frame is the 4th slot of the last latent frame
    return m


def test_prepare_resolves_defaults(bundle_factory):
    bundle = bundle_factory("moe_t2v")
    plan = pipeline(bundle).prepare(GenerationRequest(prompt="a cat"))
    d = read_manifest(bundle).sampling
    assert (plan.geometry.frames, plan.geometry.height, plan.geometry.width) == (d.frames, d.height, d.width)
    assert len(plan.steps) == d.steps and plan.shift == d.shift and plan.guide_scale == tuple(d.guide_scale)
    assert plan.negative_prompt == d.negative_prompt and 0 <= plan.seed < 2**63
    official = pipeline(bundle_factory("wan21_t2v", family="wan2.1", moe=False))
    assert official.prepare(GenerationRequest(prompt="x")).negative_prompt == "bad blurry"
    nd = bundle_factory("no_default_neg", family="wan2.1", task="t2v", moe=False,
                        sampling=SamplingDefaults(steps=2, frames=5, height=32, width=48))  # fmt: skip
    assert pipeline(nd).prepare(GenerationRequest(prompt="x")).negative_prompt == default_negative_prompt("wan2.1", "t2v")
    # the same seed gives the same noise: numpy's PCG64 standard normal, float32
    p1 = pipeline(bundle).prepare(GenerationRequest(prompt="x", seed=9))
    np.testing.assert_array_equal(
        pipeline(bundle).initial_noise(p1),
        np.random.default_rng(9).standard_normal((1, 16, 2, 4, 6), dtype=np.float32),
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(image="x.png"), "text-to-video model .* takes no --image"),
        (dict(frames=8), "--frames 8: the frame count must be 4k\\+1 \\(e.g. 5 or 9\\)"),
        (dict(height=40), "--height 40: height and width must be positive multiples of 16"),
        (dict(width=4000), "width 4000 px \\(500 latent\\); the engine takes 16..1536 px"),
        (dict(frames=401), "401 frames \\(101 latent frames\\); the engine takes 1..121"),
        (dict(prompt=" "), "--prompt is empty"),
        (dict(steps=0), "--steps 0"),
        (dict(last_image="x.png"), "takes no --image/--last-image"),
    ],
)
def test_prepare_rejects_bad_requests(bundle_factory, kwargs, message):
    pipe = pipeline(bundle_factory("moe_t2v"))
    request = GenerationRequest(**{"prompt": "a cat", **kwargs})
    with pytest.raises(WanrtError, match=message):
        pipe.prepare(request)


def test_wan21_i2v_480p_default_shift_is_3(bundle_factory, tmp_path):
    """Wan2.1 generate.py: shift 5.0, but 3.0 for i2v at 832*480 / 480*832 (unless the user sets it)."""
    pipe = pipeline(bundle_factory("wan21_i2v", family="wan2.1", task="i2v", moe=False, clip_tokens=257))
    img = _image_file(tmp_path / "in.png", 64, 48)
    for (h, w), shift in (((480, 832), 3.0), ((832, 480), 3.0), ((720, 1280), 5.0)):
        assert pipe.prepare(GenerationRequest(prompt="x", image=img, height=h, width=w, frames=5)).shift == shift
    assert pipe.prepare(GenerationRequest(prompt="x", image=img, height=480, width=832, frames=5, shift=7.0)).shift == 7.0


def test_prepare_rejects_bad_image_requests(bundle_factory, tmp_path):
    i2v = pipeline(bundle_factory("wan21_i2v", family="wan2.1", task="i2v", moe=False, clip_tokens=257))
    with pytest.raises(WanrtError, match="i2v model; --image is required"):
        i2v.prepare(GenerationRequest(prompt="a cat"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(WanrtError, match="bad.png: unreadable image"):
        i2v.prepare(GenerationRequest(prompt="a cat", image=bad))
    with pytest.raises(WanrtError, match="image not found"):
        i2v.prepare(GenerationRequest(prompt="a cat", image=tmp_path / "none.png"))
    ok = _image_file(tmp_path / "ok.png", 8, 8)
    with pytest.raises(WanrtError, match="--last-image is only for flf2v bundles; this one is i2v"):
        i2v.prepare(GenerationRequest(prompt="a cat", image=ok, last_image=ok))
    with pytest.raises(WanrtError, match="give both --height and --width"):
        i2v.prepare(GenerationRequest(prompt="a cat", image=_image_file(tmp_path / "ok.png", 8, 8), height=480))
    distill = pipeline(bundle_factory("moe_distill", sampling=DISTILL))
    with pytest.raises(WanrtError, match="runs exactly 4 steps"):
        distill.prepare(GenerationRequest(prompt="a cat", steps=8))


def test_sampler_override(bundle_factory):
    """--sampler euler on a UniPC bundle runs flow Euler (vs diffusers); distill needs a denoising_step_list."""
    pipe = pipeline(bundle_factory("wan21_t2v", family="wan2.1", moe=False))
    plan = pipe.prepare(GenerationRequest(prompt="a cat", seed=2, steps=5, sampler="euler"))
    assert plan.sampler == "euler"
    ctx, ctx_null = contexts()
    noise = pipe.initial_noise(plan)
    out = pipe.denoise(plan, ctx, ctx_null, noise)
    sched, x = diffusers_euler(5, plan.shift), torch.from_numpy(noise.copy())
    fn, g = dit_fn("dit", noise.shape[1]), plan.guide_scale[0]
    for t in sched.timesteps:
        ts = np.array([np.trunc(float(t) + 1e-3)], np.float32)  # the official loop feeds int timesteps
        cond, uncond = fn(x.numpy(), ts, ctx), fn(x.numpy(), ts, ctx_null)
        x = sched.step(torch.from_numpy((uncond + g * (cond - uncond)).astype(np.float32)), t, x, return_dict=False)[0]
    np.testing.assert_allclose(out, x.numpy(), rtol=1e-5, atol=1e-5 * np.abs(x.numpy()).max())
    with pytest.raises(WanrtError, match="sampler 'distill': this bundle has no denoising_step_list"):
        pipe.prepare(GenerationRequest(prompt="a cat", sampler="distill"))
    distill = pipeline(bundle_factory("moe_distill", sampling=DISTILL))
    plan = distill.prepare(GenerationRequest(prompt="a cat", sampler="euler", steps=6))
    # boundary_step_index 2 splits the 4-step distilled list; 6 Euler steps switch at Wan2.2 T2V's t >= 875 instead
    assert (plan.sampler, plan.boundary, plan.boundary_step_index) == ("euler", 0.875, None)
    assert [s.expert for s in plan.steps] == [HIGH if s.timestep >= 875 else LOW for s in plan.steps]
    assert {s.expert for s in plan.steps} == {HIGH, LOW}


def test_a_lone_moe_expert_is_refused(bundle_factory):
    """One A14B expert alone would run every step with the wrong expert: an error, not a silent fallback."""
    bundle = bundle_factory("moe_t2v")
    manifest = read_manifest(bundle)
    del manifest.components[HIGH]
    with pytest.raises(BundleError, match="holds only the low_noise expert; .*dit_high_noise is missing"):
        WanPipeline(bundle, manifest, make_backend())


def test_missing_components_are_named(bundle_factory):
    bundle = bundle_factory("no_vae", with_vae=False)
    pipe = pipeline(bundle)
    plan = pipe.prepare(GenerationRequest(prompt="a cat", steps=2))
    with pytest.raises(BundleError, match="component 'vae_decoder' missing"):
        pipe.generate(plan)


def test_vae_tiling_decodes_in_tiles_with_the_same_video(bundle_factory):
    """--vae-tiling: one decoder call per tile and latent frame; the test VAE is pointwise, so tiles blend to the same video."""
    bundle = bundle_factory("moe_t2v")
    tiling = Tiling.for_stride(8)
    assert tiling == Tiling(32, 32, 24, 24)  # diffusers: 256-pixel tiles every 192 pixels, 8 pixels per latent pixel
    assert Tiling.for_stride(16) == Tiling(16, 16, 12, 12)  # Wan2.2: the same pixels at 16 per latent pixel
    z = np.random.default_rng(3).standard_normal((1, 16, 2, tiling.height + 10, 12), dtype=np.float32)
    tiles = tiling.count(z.shape[3], z.shape[4])
    assert tiles > 1
    videos, calls = [], []
    for t in (None, tiling):
        backend = RecordingBackend()
        pipe = WanPipeline(bundle, read_manifest(bundle), backend)
        videos.append(pipe.decode(z, t))
        calls.append(sum(e.calls for e in backend.engines if e.name == "vae_decoder"))
    assert calls == [z.shape[2], z.shape[2] * tiles]
    np.testing.assert_allclose(videos[1], videos[0], rtol=0, atol=1e-6)
    plan = pipeline(bundle).prepare(GenerationRequest(prompt="a cat", steps=2, height=8 * (tiling.height + 10), width=96, vae_tiling=True))
    assert plan.vae_tiling == tiling and plan.summary()["vae_tiles"] == tiles
