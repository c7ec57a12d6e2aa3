"""The device-memory budget arithmetic and residency decisions for real Wan sizes, worked out by hand.

Sizes (bytes), all from `../shared/reference/wan-architecture.md` unless said otherwise:

* DiT weights, bf16: 2 x the parameter counts of the table (1.3B: 1.419 B, TI2V-5B: 5.000 B, each
  A14B expert: 14.288 B).  Streamable (a plan built with WEIGHT_STREAMING streams the transformer
  blocks): 2 x layers x the parameters of one block, from the key list of §1 (self- and cross-attention
  q/k/v/o with biases 8(D²+D), their q/k RMSNorms 4D, norm3 2D, ffn 2FD+F+D, modulation 6D).
* DiT activations: TensorRT's activation memory is measured when the plan is built; where it is not,
  the runtime estimates tokens x (14 dim + 4 ffn_dim) bytes per call (`runtime.memory`: fp32 residual,
  bf16 q/k/v/attention/LayerNorm outputs, bf16 FFN hidden before and after the GELU).  CFG runs as two
  batch-1 calls (the profile's batch is 1, as in demoDiffusion's Wan pipeline).  Tokens (§2): 480p
  (832x480, 81 frames) 32,760; 720p (1280x720, 81 frames) 75,600; TI2V-5B (VAE /16): 832x480x81
  -> 30x52 latent -> 15x26 patches x 21 frames = 8,190, 1280x704x121 -> 27,280.
* DiT I/O: latent in and noise_pred out in fp32 [1, z, F', h', w'], timestep, context [1, 512, 4096] fp32.
* Streaming scratch (TensorRT adds it to the activations once a budget is set): estimated as 1/20 of
  the streamable weights (two of 30-40 blocks: double-buffered prefetch); measured at load.
* text encoder (umt5-xxl, 5.68 B params, bf16): 11.36e9 B, not streamable (the build streams only the
  DiT experts); activations 2 prompts x 512 tokens x (14 x 4096 + 4 x 10240); I/O int64 ids and mask,
  fp32 context.
* VAE decoder (one latent frame per call): weights fp32, the whole VAE as an upper bound (Wan2.1
  126.9 M, Wan2.2 704.7 M params); I/O = the causal caches in and out (engines/vae_contract.py and
  bench/RESULTS.md: Wan2.1 3.518 GiB at 480x832, 8.118 GiB at 720x1280; Wan2.2 2.655 GiB at 480x832,
  5.990 GiB at 704x1280) + the chunk's video out + its latent in; activations 4 fp32 tensors of the
  largest feature map of a 4-frame chunk (Wan2.1: 96 channels at full resolution; Wan2.2: 512 channels
  at half resolution).
* margin: 1 GiB (the TensorRT backend's).

Worked out (GiB; "both" = both experts + pool + I/O + margin, "one" = one expert + pool + I/O + margin,
"stream floor" = non-streamable weights + pool + scratch + I/O + margin):

    model 480p/720p   text  | expert W  fixed  act    scratch | both   one    stream floor | VAE dec | smallest
    1.3B 480p         11.69 | 2.643    0.048  1.750  0.130   |  -     5.42   2.95         | 10.81   | 11.69
    1.3B 720p         11.69 | 2.643    0.048  4.037  0.130   |  -     7.72   5.26         | 23.02   | 23.02
    5B   480p         11.69 | 9.313    0.168  0.765  0.457   |  -     11.10  2.41         | 12.00   | 12.00
    5B   720p         11.69 | 9.313    0.168  2.550  0.457   |  -     12.91  4.22         | 22.52   | 22.52
    14B  480p (x2)    11.69 | 26.613   0.433  3.874  1.309   | 58.15  31.51  6.64         | 10.81   | 11.69
    14B  720p (x2)    11.69 | 26.613   0.433  8.940  1.309   | 63.25  36.60  11.73        | 23.02   | 23.02

The text encoder (11.69) binds at 8 GiB for every model; without --vae-tiling the VAE decoder's
caches bind at 720p (about 23 GiB); the 14B experts stream below 36.6 GiB (720p) / 31.5 GiB (480p).
"""

from __future__ import annotations

import dataclasses

import pytest

from wanrt.engines.manifest import read_manifest
from wanrt.runtime.backends import make_backend
from wanrt.runtime.memory import MemoryNeed, estimate_activation_bytes, io_bytes, transformer_activation_bytes
from wanrt.runtime.pipeline import GenerationRequest, WanPipeline
from wanrt.runtime.residency import VramBudgetError, plan_vram

GIB = 1 << 30
MARGIN = GIB
BUDGETS = (8, 12, 16, 24, 32, 40, 48, 64, 80)

# model: dim, ffn_dim, layers, params, VAE
ARCH = {"1.3B": (1536, 8960, 30, 1.419e9, "2.1"), "5B": (3072, 14336, 30, 5.000e9, "2.2"), "14B": (5120, 13824, 40, 14.288e9, "2.1")}
TOKENS = {("1.3B", "480p"): 32760, ("1.3B", "720p"): 75600, ("5B", "480p"): 8190, ("5B", "720p"): 27280,
          ("14B", "480p"): 32760, ("14B", "720p"): 75600}  # fmt: skip
LATENT = {("2.1", "480p"): (16, 21, 60, 104), ("2.1", "720p"): (16, 21, 90, 160),
          ("2.2", "480p"): (48, 21, 30, 52), ("2.2", "720p"): (48, 31, 44, 80)}  # fmt: skip
PIXELS = {("2.1", "480p"): (480, 832), ("2.1", "720p"): (720, 1280), ("2.2", "480p"): (480, 832), ("2.2", "720p"): (704, 1280)}
VAE_CACHE_GIB = {("2.1", "480p"): 3.517742156982422, ("2.1", "720p"): 8.117866516113281,
                 ("2.2", "480p"): 2.6546716690063477, ("2.2", "720p"): 5.990028381347656}  # fmt: skip
VAE_LARGEST_MAP = {("2.1", "480p"): 96 * 480 * 832, ("2.1", "720p"): 96 * 720 * 1280,
                   ("2.2", "480p"): 512 * 240 * 416, ("2.2", "720p"): 512 * 352 * 640}  # fmt: skip
VAE_PARAMS = {"2.1": 126.9e6, "2.2": 704.7e6}


def block_params(d: int, f: int) -> int:
    """Parameters of one DiT block, from the key list (wan-architecture.md §1)."""
    return 8 * (d * d + d) + 4 * d + 2 * d + (2 * f * d + f + d) + 6 * d


def needs_for(model: str, res: str) -> tuple[dict[str, MemoryNeed], list[str]]:
    """The module docstring's sizes as MemoryNeeds: text encoder, the expert(s), VAE decoder."""
    d, f, layers, params, vae = ARCH[model]
    weights = int(params * 2)
    streamable = block_params(d, f) * layers * 2
    c, frames, h, w = LATENT[(vae, res)]
    dit_io = 2 * (c * frames * h * w * 4) + 4 + 512 * 4096 * 4
    act = TOKENS[(model, res)] * (14 * d + 4 * f)
    experts = ["dit_high_noise", "dit_low_noise"] if model == "14B" else ["dit"]
    needs = {
        "text_encoder": MemoryNeed("text_encoder", 11_360_000_000, 0, 2 * 512 * (14 * 4096 + 4 * 10240),
                                   2 * 512 * 8 * 2 + 2 * 512 * 4096 * 4),  # fmt: skip
    }
    for name in experts:
        needs[name] = MemoryNeed(name, weights, streamable, act, dit_io, streamable // 20)
    ph, pw = PIXELS[(vae, res)]
    stride = 8 if vae == "2.1" else 16
    vae_io = int(2 * VAE_CACHE_GIB[(vae, res)] * GIB) + 3 * 4 * ph * pw * 4 + c * (ph // stride) * (pw // stride) * 4 + 1
    needs["vae_decoder"] = MemoryNeed("vae_decoder", int(VAE_PARAMS[vae] * 4), 0, 4 * 4 * VAE_LARGEST_MAP[(vae, res)] * 4, vae_io)
    return needs, experts


# Expected decision at each budget of BUDGETS (GiB), from the table in the module docstring:
# refused below "smallest"; single DiT: keep_all from "one"; MoE: keep_all from "both", swap from "one", else stream.
EXPECTED = {
    ("1.3B", "480p"): ["refused"] + ["keep_all"] * 8,
    ("1.3B", "720p"): ["refused"] * 3 + ["keep_all"] * 6,
    ("5B", "480p"): ["refused"] + ["keep_all"] * 8,
    ("5B", "720p"): ["refused"] * 3 + ["keep_all"] * 6,
    ("14B", "480p"): ["refused", "stream", "stream", "stream", "swap", "swap", "swap", "keep_all", "keep_all"],
    ("14B", "720p"): ["refused", "refused", "refused", "stream", "stream", "swap", "swap", "keep_all", "keep_all"],
}
SMALLEST_GIB = {("1.3B", "480p"): 11.69, ("1.3B", "720p"): 23.02, ("5B", "480p"): 12.00, ("5B", "720p"): 22.52,
                ("14B", "480p"): 11.69, ("14B", "720p"): 23.02}  # fmt: skip
BINDING_STAGE = {("1.3B", "480p"): "text_encoder", ("1.3B", "720p"): "vae_decoder", ("5B", "480p"): "vae_decoder",
                 ("5B", "720p"): "vae_decoder", ("14B", "480p"): "text_encoder", ("14B", "720p"): "vae_decoder"}  # fmt: skip


@pytest.mark.parametrize("model,res", sorted(EXPECTED))
def test_decisions_from_8_to_80_gib(model, res):
    needs, experts = needs_for(model, res)
    got = []
    for budget in BUDGETS:
        plan = plan_vram(needs, experts, budget * GIB, MARGIN)
        got.append(plan.mode if plan.fits else "refused")
        assert plan.smallest_budget_bytes / GIB == pytest.approx(SMALLEST_GIB[(model, res)], abs=0.006)
        if not plan.fits:
            worst = max((s for s in plan.stages if not s.fits), key=lambda s: s.floor_bytes)
            assert worst.name == BINDING_STAGE[(model, res)]
    assert got == EXPECTED[(model, res)]


def test_14b_720p_on_24_gib_streams_both_experts_within_the_budget():
    """24 GiB: each expert keeps 24 - (0.433 + 0.044 + 8.940 + 1.309 + 1) = 12.27 GiB of its 26.18 streamable GiB."""
    needs, experts = needs_for("14B", "720p")
    plan = plan_vram(needs, experts, 24 * GIB, MARGIN)
    assert plan.mode == "stream" and plan.fits
    for name in experts:
        assert plan.weight_budget_bytes[name] / GIB == pytest.approx(12.27, abs=0.01)
        assert plan.streamed_bytes[name] / GIB == pytest.approx(26.18 - 12.27, abs=0.01)
    assert plan.activation_bytes / GIB == pytest.approx(8.940 + 1.309, abs=0.005)  # the shared pool, scratch included
    assert plan.weight_budget_bytes["text_encoder"] is None and plan.weight_budget_bytes["vae_decoder"] is None
    for stage in plan.stages:
        assert stage.peak_bytes <= 24 * GIB
    # budgets above 2 GiB are plain Python ints (never TensorRT's int32 automatic-budget call)
    assert all(isinstance(v, int) and v > 2**31 for v in (plan.weight_budget_bytes[n] for n in experts))


def test_14b_480p_at_40_gib_keeps_one_expert_at_a_time():
    needs, experts = needs_for("14B", "480p")
    plan = plan_vram(needs, experts, 40 * GIB, MARGIN)
    assert plan.mode == "swap" and plan.weight_budget_bytes["dit_high_noise"] is None
    assert plan.streamed_bytes == {n: 0 for n in plan.needs}


def test_vae_tiling_moves_the_floor_to_the_dit_and_text_encoder():
    """14B 720p with --vae-tiling: 256-pixel tiles, caches 3.518 x (256 x 256) / (480 x 832) = 0.577 GiB in and out,
    activations 4 x 4 x 96 x 256 x 256 x 4 = 0.375 GiB: the VAE stage needs 3.01 GiB; the DiT stream floor
    (11.73) binds, so 12 GiB streams."""
    needs, experts = needs_for("14B", "720p")
    caches = int(3.517742156982422 * 256 * 256 / (480 * 832) * GIB)
    needs["vae_decoder"] = MemoryNeed("vae_decoder", int(126.9e6 * 4), 0, 4 * 4 * 96 * 256 * 256 * 4,
                                      2 * caches + 3 * 4 * 256 * 256 * 4 + 16 * 32 * 32 * 4 + 1)  # fmt: skip
    plan = plan_vram(needs, experts, 12 * GIB, MARGIN)
    assert plan.fits and plan.mode == "stream"
    assert plan.smallest_budget_bytes / GIB == pytest.approx(11.73, abs=0.006)
    vae = next(s for s in plan.stages if s.name == "vae_decoder")
    assert vae.peak_bytes / GIB == pytest.approx(3.01, abs=0.01)


def test_refusal_names_the_stage_the_smallest_budget_and_the_flags():
    needs, experts = needs_for("14B", "720p")
    plan = plan_vram(needs, experts, 16 * GIB, MARGIN)
    line = plan.shortfall()
    assert "\n" not in line
    assert "budget 16.00 GiB is too small: stage vae_decoder (vae_decoder) needs at least 23.02 GiB" in line
    assert "the smallest budget that works is 23.02 GiB: raise --vram-budget" in line and "--vae-tiling" in line
    eight = plan_vram(needs_for("1.3B", "480p")[0], ["dit"], 8 * GIB, MARGIN).shortfall()
    assert "stage text_encoder (text_encoder) needs at least 11.69 GiB" in eight and "--vae-tiling" not in eight


def test_an_expert_without_streamable_weights_cannot_stream():
    """A 14B plan built without WEIGHT_STREAMING: below one expert (31.51 GiB at 480p) the run is refused."""
    needs, experts = needs_for("14B", "480p")
    for name in experts:
        n = needs[name]
        needs[name] = MemoryNeed(name, n.weight_bytes, 0, n.activation_bytes, n.io_bytes, 0)
    assert plan_vram(needs, experts, 32 * GIB, MARGIN).mode == "swap"
    plan = plan_vram(needs, experts, 24 * GIB, MARGIN)
    assert not plan.fits and plan.smallest_budget_bytes / GIB == pytest.approx(31.51, abs=0.006)


def test_activation_estimates_match_the_worked_numbers():
    """runtime.memory's docstring: 1.3B at 480p 1.75 GiB, a 14B expert at 720p 8.94 GiB (batch 1)."""
    assert transformer_activation_bytes(32760, 1, 1536, 8960) == 32760 * 57344 == 1_878_589_440
    assert transformer_activation_bytes(75600, 1, 5120, 13824) == 75600 * 126976 == 9_599_385_600
    assert transformer_activation_bytes(75600, 2, 5120, 13824) == 2 * 9_599_385_600  # CFG in one batch-2 call


@pytest.fixture(scope="module")
def moe_bundle(bundle_factory):
    return bundle_factory("moe_t2v")


def test_run_shapes_and_needs_of_a_real_bundle(moe_bundle):
    """The test MoE bundle (text_dim 8, 16 latent channels, Wan2.1 VAE): 17 frames at 32x48 -> latent 5x4x6."""
    manifest = read_manifest(moe_bundle)
    pipe = WanPipeline(moe_bundle, manifest, make_backend())
    plan = pipe.prepare(GenerationRequest(prompt="a fox", frames=17, height=32, width=48, steps=2, seed=0))
    shapes = pipe.run_shapes(plan)
    assert shapes["text_encoder"] == {"input_ids": (2, 512), "attention_mask": (2, 512)}  # CFG: prompt + negative
    dit = shapes["dit_high_noise"]
    assert dit["latent"] == (2, 16, 5, 4, 6) and dit["timestep"] == (2,) and dit["context"] == (2, 512, 8)
    assert shapes["vae_decoder"]["latent"] == (1, 16, 1, 4, 6) and shapes["vae_decoder"]["first"] == (1,)
    comp = manifest.components["dit_high_noise"]
    # latent in + noise_pred out: 2 x 2x16x5x4x6 fp32; timestep 2 fp32; context 2x512x8 fp32
    assert io_bytes(comp.signature, dit) == 2 * (2 * 16 * 5 * 4 * 6 * 4) + 2 * 4 + 2 * 512 * 8 * 4
    # 5x4x6 latent -> 5 x 2 x 3 = 30 tokens, batch 2, the bundle's dim / ffn_dim
    d = manifest.dit
    assert estimate_activation_bytes(comp, dit, d) == 2 * 30 * (14 * d.dim + 4 * d.ffn_dim)
    vace = dataclasses.replace(d, vace_layers=(0,), vace_in_dim=96)  # + the embedded latent and control stream, fp32
    assert estimate_activation_bytes(comp, dit, vace) == 2 * 30 * (14 * d.dim + 4 * d.ffn_dim) + 2 * 30 * 8 * d.dim
    memory = pipe.plan_memory(plan)
    assert [s.name for s in memory.stages] == ["text_encoder", "denoise", "vae_decoder"]
    assert memory.mode == "keep_all" and memory.margin_bytes == 0  # ONNX Runtime: weights only, no margin
    assert memory.needs["dit_high_noise"].weight_bytes == sum((moe_bundle / f).stat().st_size for f in comp.files)


def test_a_strict_budget_is_refused_before_anything_loads(moe_bundle):
    """With a backend that holds to its budget, generate() refuses up front; ONNX Runtime only warns."""
    manifest = read_manifest(moe_bundle)
    backend = make_backend()
    pipe = WanPipeline(moe_bundle, manifest, backend, memory_budget_bytes=1)
    plan = pipe.prepare(GenerationRequest(prompt="a fox", frames=5, height=32, width=48, steps=2, seed=0))
    memory = pipe.plan_memory(plan)
    assert not memory.fits
    pipe.check_memory(memory)  # onnxruntime: not strict, no error
    backend.strict_budget = True  # an instance setting, as the TensorRT backend's class has it
    with pytest.raises(VramBudgetError, match=r"the smallest budget that works is"):
        pipe.generate(plan)


def test_out_of_memory_becomes_one_line_with_the_budget_and_the_flag():
    from wanrt.runtime.backends import DeviceOutOfMemory
    from wanrt.runtime.pipeline import out_of_memory_line

    needs, experts = needs_for("14B", "720p")
    plan = plan_vram(needs, experts, 24 * GIB, MARGIN)
    error = DeviceOutOfMemory("out of memory allocating 10.25 GiB for the activation memory of dit_high_noise; 3.10 GiB free of 23.99 GiB",
                              int(10.25 * GIB), int(3.1 * GIB), int(23.99 * GIB))  # fmt: skip
    line = out_of_memory_line(error, plan)
    assert "\n" not in line
    assert line.startswith("out of memory allocating 10.25 GiB for the activation memory of dit_high_noise; 3.10 GiB free")
    assert "the plan (stream, pool 10.25 GiB, margin 1.00 GiB) expected to fit in a budget of 24.00 GiB: lower --vram-budget" in line
