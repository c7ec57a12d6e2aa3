"""Text/image to video from a bundle, torch-free: T2V, I2V, FLF2V, TI2V and VACE for Wan2.1 / Wan2.2.

    plan = pipeline.prepare(GenerationRequest(prompt=..., image=...))   # validate, no engines loaded
    result = pipeline.generate(plan)                                    # frames + latents + stats

Stages, each loading its engines and releasing them before the next stage:
    text_encoder   umt5: prompt (and negative prompt when any step uses CFG) -> [1, 512, D] each
    image_encoder  Wan2.1 I2V/FLF2V: CLIP features of the image(s) -> [1, 257|514, 1280]
    vae_encoder    I2V/FLF2V: the image video -> 16 latent channels, with the 4-channel mask ahead
                   of them (`y`, 20 channels appended to the 16 noise channels: in_dim 36);
                   TI2V with an image: its latent frame, which replaces latent frame 0 every step;
                   VACE: control video, mask and reference images -> `vace_context` (runtime.vace)
    denoise        the sampler loop; DiT experts through `ExpertSwitcher`
    vae_decoder    latents -> video in [-1, 1]

The initial noise comes from `numpy.random.default_rng(seed).standard_normal(float32)`: a
seed gives the same video on every machine and backend, but not the video torch's
`torch.randn(generator=manual_seed(seed))` gives in the official code (different generator).
"""

from __future__ import annotations

import os
import resource
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from wanrt.engines.defaults import default_negative_prompt, default_sampling
from wanrt.engines.errors import BundleError, WanrtError
from wanrt.engines.manifest import Component, Manifest, tokenizer_file

from . import image as images
from .backends.base import Backend, DeviceOutOfMemory, Engine
from .guidance import StepPlan, engine_max_batch, pair_static_inputs, plan_steps, predict_velocity, signature_max_batch
from .memory import estimate_activation_bytes
from .progress import Progress
from .request import ANIMATE_FIELDS, GenerationRequest, RequestError, check_fields, option_name, request_field
from .residency import ExpertSwitcher, VramBudgetError, VramPlan, gib, plan_vram
from .schedulers import make_sampler
from .sizes import VideoGeometry, best_output_size, check_frames, check_latent_range, check_size, i2v_size, size_multiple
from .vace import VaceSource, load_source, vace_context
from .vae import Tiling, contract_of

IMAGE_TASKS = ("i2v", "flf2v")
VACE_FIELDS = ("video", "mask", "ref_images", "context_scale")  # request fields only VACE bundles take


@dataclass
class GenerationPlan:
    """A validated request with every default resolved; nothing is loaded yet."""

    task: str
    family: str
    prompt: str
    negative_prompt: str
    geometry: VideoGeometry
    seed: int
    sampler: str
    shift: float
    guide_scale: tuple[float, float]
    enable_cfg: bool
    boundary: float | None
    boundary_step_index: int | None
    denoising_step_list: list[int] | None
    fps: int
    steps: list[StepPlan]
    first_image: np.ndarray | None = None  # [3, H, W] in [-1, 1], as loaded (CLIP input)
    last_image: np.ndarray | None = None
    condition_image: np.ndarray | None = None  # [3, h, w] at the video size (VAE input)
    condition_last: np.ndarray | None = None
    vae_tiling: Tiling | None = None
    vace: VaceSource | None = None  # VACE: what the control branch sees (zeros and an all-ones mask without --video)
    context_scale: float = 1.0  # VACE: hint weight
    warnings: list[str] = field(default_factory=list)

    @property
    def cfg(self) -> bool:
        return any(s.cfg for s in self.steps)

    def summary(self) -> dict[str, Any]:
        g = self.geometry
        return {
            "task": self.task, "family": self.family, "frames": g.frames, "height": g.height, "width": g.width,
            "latent": [g.latent_frames, g.latent_height, g.latent_width], "tokens": g.tokens, "seed": self.seed,
            "sampler": self.sampler, "steps": len(self.steps), "shift": self.shift,
            "guide_scale": list(self.guide_scale), "enable_cfg": self.enable_cfg, "boundary": self.boundary,
            "boundary_step_index": self.boundary_step_index, "fps": self.fps,
            "vae_tiles": self.vae_tiling.count(g.latent_height, g.latent_width) if self.vae_tiling else 1,
            **({"reference_images": g.ref_frames, "context_scale": self.context_scale} if self.vace is not None else {}),
        }


@dataclass
class StepRecord:
    """Timing of one denoising step."""

    index: int
    timestep: float
    expert: str
    guide_scale: float
    cfg: bool
    engine_calls: int
    seconds: float  # wall time of the step, expert loading excluded
    engine_seconds: float  # time inside the engine (host wall clock: copies and the wait included)
    load_seconds: float  # expert (re)loading done at this step
    gpu_seconds: float | None = None  # device time of the engine calls (CUDA events); None when not measured
    resident_bytes: int = 0  # weights of the loaded experts on the device (or host, for CPU backends)
    streamed_bytes: int = 0  # weights of this step's expert streamed from host memory on every call

    @property
    def host_seconds(self) -> float:
        """Time spent outside the engine: binding, CFG arithmetic, the sampler update."""
        return max(0.0, self.seconds - self.engine_seconds)


@dataclass
class RunStats:
    """Per-stage and per-step timing, memory and expert residency of one generation."""

    backend: str
    stages: dict[str, float] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    residency: list[dict[str, Any]] = field(default_factory=list)
    residency_mode: str | None = None
    memory_budget_bytes: int | None = None
    memory_plan: dict[str, Any] | None = None  # `VramPlan.to_dict()`: the budget arithmetic
    device_min_free_bytes: int | None = None
    device_start_free_bytes: int | None = None  # free device memory before the first engine loaded
    warnings: list[str] = field(default_factory=list)

    @staticmethod
    def peak_rss_bytes() -> int:
        """Peak resident memory of this process so far."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)

    def to_dict(self) -> dict[str, Any]:
        steps = [{**asdict(s), "host_seconds": s.host_seconds} for s in self.steps]
        return {
            "backend": self.backend,
            "stages": self.stages,
            "per_step": steps,
            "step_seconds_mean": float(np.mean([s.seconds for s in self.steps])) if self.steps else None,
            "host_seconds_per_step": float(np.mean([s.host_seconds for s in self.steps])) if self.steps else None,
            "experts": [s.expert for s in self.steps],
            "residency_mode": self.residency_mode,
            "residency": self.residency,
            "memory_budget_bytes": self.memory_budget_bytes,
            "memory_plan": self.memory_plan,
            "peak_rss_bytes": self.peak_rss_bytes(),
            "device_min_free_bytes": self.device_min_free_bytes,
            # device memory this run took at its peak (free at start minus the lowest free seen); None on CPU
            "device_peak_bytes": (
                self.device_start_free_bytes - self.device_min_free_bytes
                if self.device_start_free_bytes is not None and self.device_min_free_bytes is not None else None
            ),
            "warnings": self.warnings,
        }


@dataclass
class GenerationResult:
    plan: GenerationPlan
    latents: np.ndarray  # [1, z, F', h', w'] final latents (VACE: the reference frames first)
    video: np.ndarray | None  # [1, 3, T, H, W] in [-1, 1], None when not decoded
    stats: RunStats


# on_progress(stage, step, steps): at the start of each stage (step 0) and after each denoising step;
# steps is the stage's step count (0 for stages without steps).  Raising from it stops the run there.
ProgressCallback = Callable[[str, int, int], None]


class WanPipeline:
    """Runs one bundle on one backend (`backend=None`: a pipeline that only plans, as `serve`'s HTTP front)."""

    def __init__(
        self,
        bundle: str | os.PathLike,
        manifest: Manifest,
        backend: Backend | None,
        memory_budget_bytes: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.bundle = Path(bundle)
        self.manifest = manifest
        self.backend = backend
        self.memory_budget_bytes = memory_budget_bytes
        self.progress = progress or Progress(enabled=False)
        self.experts = manifest.experts
        if not self.experts:
            raise BundleError(f"{self.bundle}: the bundle has no DiT component")
        kinds = {manifest.components[n].expert for n in self.experts}
        if kinds & {"high_noise", "low_noise"} and kinds != {"high_noise", "low_noise"}:
            missing = ({"high_noise", "low_noise"} - kinds).pop()
            raise BundleError(
                f"{self.bundle}: holds only the {kinds.pop()} expert; a Wan2.2 A14B model needs both"
                f" (dit_{missing} is missing: build it into this bundle with build-engine)"
            )

    # ---- components -------------------------------------------------------------------------

    def component(self, name: str) -> Component:
        try:
            return self.manifest.components[name]
        except KeyError:
            raise BundleError(
                f"{self.bundle}: component {name!r} missing (has {', '.join(sorted(self.manifest.components))})"
            ) from None

    def _require(self, *names: str) -> None:
        for name in names:
            self.component(name)

    @property
    def dit_takes_clip(self) -> bool:
        return "clip_fea" in self.component(self.experts[0]).signature.input_names

    @property
    def per_frame_timestep(self) -> bool:
        return len(self.component(self.experts[0]).signature.input("timestep").shape) == 2

    # ---- planning ---------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> GenerationPlan:
        """Validate the request against the bundle and resolve defaults; loads images, no engines.

        The one validation of a request (`run` and `serve` both call it): RequestError names the field.
        """
        check_fields(request)
        self._check_inputs(request)
        geometry, plan_images, area = self._resolve_size(request)
        with request_field("frames", "height", "width"):
            for name in self.experts:
                check_latent_range(name, geometry, self.component(name).signature.dim_ranges)
        if plan_images.get("condition_image") is not None or plan_images.get("vace") is not None:
            self._require("vae_encoder")
        if self.dit_takes_clip:
            self._require("image_encoder")

        m, d = self.manifest, self.manifest.sampling
        steps = request.steps if request.steps is not None else d.steps
        sampler_name = request.sampler or d.sampler
        if sampler_name == "distill" and not d.denoising_step_list:
            raise RequestError("sampler", "sampler 'distill': this bundle has no denoising_step_list (build it with a LightX2V distill config)")
        boundary, boundary_step_index = d.boundary, d.boundary_step_index
        if sampler_name != "distill" and boundary_step_index is not None:
            # a step index splits the distilled step list only; other schedules switch experts by timestep
            boundary_step_index = None
            if boundary is None and len(self.experts) == 2:
                boundary = default_sampling(m.family, m.task, moe=True).boundary
        if sampler_name == "distill":
            n = len(d.denoising_step_list)
            if request.steps is not None and request.steps != n:
                raise RequestError("steps", 
                    f"--steps {request.steps}: this bundle's step-distilled sampler runs exactly {n} steps"
                    f" (denoising_step_list {d.denoising_step_list})"
                )
        shift = float(request.shift if request.shift is not None else self._default_shift(area))
        guide = (float(request.guidance),) * 2 if request.guidance is not None else tuple(float(g) for g in d.guide_scale)
        warnings = []
        if request.guidance is not None and not d.enable_cfg and request.guidance != 1.0:
            warnings.append(f"--guidance {request.guidance} has no effect: this bundle's sampling disables CFG")
        with request_field("sampler", "steps", "shift"):
            sampler = make_sampler(sampler_name, steps, shift, d.denoising_step_list)
        kinds = {n: self.component(n).expert for n in self.experts}
        step_plans = plan_steps(
            sampler.timesteps, self.experts, kinds, guide, d.enable_cfg, boundary, boundary_step_index
        )
        if request.negative_prompt and not any(p.cfg for p in step_plans):
            warnings.append("--negative-prompt has no effect: no step uses CFG (guidance 1 or CFG disabled)")
        # as the official code: an empty negative prompt means the default one
        negative = request.negative_prompt or d.negative_prompt or default_negative_prompt(m.family, m.task)
        seed = request.seed if request.seed is not None else secrets.randbits(63)  # check_fields checked a given one
        return GenerationPlan(
            task=m.task, family=m.family, prompt=request.prompt, negative_prompt=negative, geometry=geometry,
            seed=seed, sampler=sampler_name, shift=shift, guide_scale=guide, enable_cfg=d.enable_cfg,
            boundary=boundary, boundary_step_index=boundary_step_index,
            denoising_step_list=d.denoising_step_list, fps=d.fps, steps=step_plans, warnings=warnings,
            vae_tiling=Tiling.for_stride(m.vae.stride[1]) if request.vae_tiling else None,
            context_scale=float(request.context_scale) if request.context_scale is not None else 1.0, **plan_images,
        )

    def _check_inputs(self, request: GenerationRequest) -> None:
        """The prompt and images a task takes."""
        m, task = self.manifest, self.manifest.task
        if not request.prompt or not request.prompt.strip():
            raise RequestError("prompt", "--prompt is empty")
        if task == "t2v" and (request.image is not None or request.last_image is not None):
            raise RequestError("image" if request.image is not None else "last_image", f"this bundle is a text-to-video model ({m.family} t2v); it takes no --image/--last-image")
        for name in VACE_FIELDS:
            if task != "vace" and getattr(request, name) not in (None, []):
                raise RequestError(name, f"{option_name(name)} is only for VACE bundles; this one is {m.family} {task}")
        if task == "vace":
            if request.image is not None or request.last_image is not None:
                raise RequestError("image" if request.image is not None else "last_image",
                                   "this bundle is a VACE model; it takes --video, --mask and --ref-image, not --image/--last-image")
            if request.mask is not None and request.video is None:
                raise RequestError("mask", "--mask needs --video (the frames the mask edits)")
            if request.video is not None and (request.height is not None or request.width is not None):
                raise RequestError("height" if request.height is not None else "width",
                                   "--video gives the size of the output; drop --height/--width")
        if task in IMAGE_TASKS and request.image is None:
            raise RequestError("image", f"this bundle is an {task} model; --image is required")
        if task == "flf2v" and request.last_image is None:
            raise RequestError("last_image", "this bundle is a first-last-frame model (flf2v); --last-image is required")
        animate_only = [f for f in ANIMATE_FIELDS if getattr(request, f) is not None]
        if task != "animate" and animate_only:
            raise RequestError(animate_only[0], f"{option_name(animate_only[0])} is only for Wan2.2-Animate bundles; this one is {task}")
        if task != "flf2v" and request.last_image is not None:
            raise RequestError("last_image", f"--last-image is only for flf2v bundles; this one is {task}")
        if (request.height is None) != (request.width is None) and (task in IMAGE_TASKS or request.image is not None):
            raise RequestError("width" if request.width is None else "height", "give both --height and --width (their product is the max area of the video)")

    def _resolve_size(self, request: GenerationRequest) -> tuple[VideoGeometry, dict[str, np.ndarray], int]:
        """Video geometry, conditioning images and the max area, by the official rules of the task."""
        m, task, d = self.manifest, self.manifest.task, self.manifest.sampling
        stride = m.vae.stride
        with request_field("frames"):
            frames = check_frames(request.frames if request.frames is not None else d.frames, stride[0])
        ref_frames = 0
        multiple = size_multiple(stride)
        given_area = request.height * request.width if request.height and request.width else None
        area = given_area or d.max_area or d.height * d.width
        plan_images: dict[str, np.ndarray] = {}
        if task in IMAGE_TASKS:
            with request_field("image"):
                first = images.load_image(request.image)
                height, width = i2v_size(first.height, first.width, area, stride)
            first_arr = images.image_to_array(first)
            plan_images["first_image"] = first_arr
            plan_images["condition_image"] = images.resize_bicubic(first_arr, height, width)
            if request.last_image is not None:
                with request_field("last_image"):
                    last = images.match_last_frame(first, images.load_image(request.last_image))
                last_arr = images.image_to_array(last)
                plan_images["last_image"] = last_arr
                plan_images["condition_last"] = images.resize_bicubic(last_arr, height, width)
        elif task == "ti2v" and request.image is not None:
            with request_field("image"):
                img = images.load_image(request.image)
                width, height = best_output_size(img.width, img.height, multiple, multiple, area)
            plan_images["condition_image"] = images.ti2v_image(img, width, height)
        else:
            height = request.height if request.height is not None else d.height
            width = request.width if request.width is not None else d.width
            with request_field("height", "width"):
                check_size(height, width, multiple)
            if task == "vace":
                with request_field("video", "mask", "ref_images"):
                    source, count = load_source(
                        request.video, request.mask, list(request.ref_images or ()), request.frames, height, width,
                        d.frames, multiple, stride[0],
                    )
                with request_field("frames"):
                    frames = check_frames(count, stride[0])
                height, width = source.video.shape[-2:]
                plan_images["vace"], ref_frames = source, source.ref_frames
        return VideoGeometry(frames, height, width, stride, ref_frames), plan_images, area

    def _default_shift(self, area: int) -> float:
        """The bundle's shift; Wan2.1 `generate.py` uses 3.0 instead of 5.0 for i2v at 832*480 (480p)."""
        m, d = self.manifest, self.manifest.sampling
        family_default = m.source.get("config") is None  # not set by a LightX2V config
        if family_default and m.family == "wan2.1" and m.task == "i2v" and d.shift == 5.0 and area == 832 * 480:
            return 3.0
        return d.shift

    # ---- stages -----------------------------------------------------------------------------

    def _load(self, name: str, memory: VramPlan | None = None) -> Engine:
        budget = memory.weight_budget_bytes.get(name) if memory is not None else None
        return self.backend.load(self.component(name), self.bundle, weight_budget_bytes=budget)

    # ---- memory -----------------------------------------------------------------------------

    def run_shapes(self, plan: GenerationPlan) -> dict[str, dict[str, tuple[int, ...]]]:
        """The input shapes each component of the bundle gets in this run (VAE: one chunk, one tile)."""
        g, m = plan.geometry, self.manifest
        prompts = 2 if plan.cfg else 1
        text_len = m.dit.text_len
        shapes: dict[str, dict[str, tuple[int, ...]]] = {
            "text_encoder": {"input_ids": (prompts, text_len), "attention_mask": (prompts, text_len)}
        }
        if "image_encoder" in m.components:
            size = self.component("image_encoder").signature.inputs[0].shape[-1]
            shapes["image_encoder"] = {"pixel_values": (1 if plan.last_image is None else 2, 3, size, size)}
        for name in self.experts:
            sig = self.component(name).signature
            batch = 2 if plan.cfg and signature_max_batch(sig) >= 2 else 1
            latent = (batch, sig.inputs[0].shape[1], g.latent_frames, g.latent_height, g.latent_width)
            dit = {"latent": latent, "timestep": (batch, g.latent_frames) if self.per_frame_timestep else (batch,)}
            grid = {"frames": g.latent_frames, "height": g.latent_height, "width": g.latent_width}
            for spec in sig.inputs[2:]:  # context, clip_fea: fixed but for the batch; vace_context on the latent grid
                dit[spec.name] = (batch, *(grid.get(d, d) for d in spec.shape[1:]))
            shapes[name] = dit
        h, w = g.latent_height, g.latent_width
        if plan.vae_tiling is not None and plan.vae_tiling.needed(h, w):
            h, w = min(h, plan.vae_tiling.height), min(w, plan.vae_tiling.width)
        for name, part in (("vae_encoder", "encoder"), ("vae_decoder", "decoder")):
            if name not in m.components:
                continue
            contract = contract_of(self.component(name), part)
            caches = {contract.cache_names(i)[0]: contract.cache_shape(i, h, w) for i in range(len(contract.caches))}
            s = contract.spatial_stride
            main = ("video", (1, 3, contract.chunk_frames, h * s, w * s)) if part == "encoder" else ("latent", (1, contract.z_dim, 1, h, w))
            shapes[name] = {main[0]: main[1], "first": (1,), **caches}
        return shapes

    def plan_memory(self, plan: GenerationPlan, decode: bool = True) -> VramPlan:
        """The budget arithmetic for this run (`runtime.residency.plan_vram`) on this backend."""
        budget = self.memory_budget_bytes if self.memory_budget_bytes is not None else self.backend.default_budget_bytes()
        shapes = self.run_shapes(plan)
        names = [n for n in self.stages(plan, decode) if n != "denoise" and n in self.manifest.components] + self.experts
        needs = {}
        for name in names:
            component = self.component(name)
            need = self.backend.memory_need(component, self.bundle, shapes[name])
            needs[name] = need.with_estimate(estimate_activation_bytes(component, shapes[name], self.manifest.dit))
        return plan_vram(needs, self.experts, budget, self.backend.memory_margin_bytes)

    def check_memory(self, memory: VramPlan) -> None:
        """VramBudgetError before anything loads when the plan does not fit and the backend holds to its budget."""
        if not memory.fits and self.backend.strict_budget:
            raise VramBudgetError(memory.shortfall())

    def _run_batched(self, engine: Engine, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
        """Run batch-N feeds in one call if the engine takes N, else one item at a time."""
        n = next(iter(feeds.values())).shape[0]
        if n <= engine_max_batch(engine):
            return engine.run(feeds)[output]
        return np.concatenate([engine.run({k: v[i : i + 1] for k, v in feeds.items()})[output] for i in range(n)])

    def encode_text(self, prompts: list[str], memory: VramPlan | None = None) -> np.ndarray:
        """umt5 context [len(prompts), text_len, D], trimmed to each prompt's length and zero-padded."""
        from .text import load_tokenizer, pad_context

        if not self.manifest.tokenizer:
            raise BundleError(f"{self.bundle}: manifest names no tokenizer folder")
        tokenizer = load_tokenizer(self.bundle / tokenizer_file(self.manifest.tokenizer))  # the file verify hashed
        text_len = self.manifest.dit.text_len
        ids, mask = tokenizer.encode(prompts, max_len=text_len, pad_to_max=False)
        with self._load("text_encoder", memory) as engine:
            context = self._run_batched(engine, {"input_ids": ids, "attention_mask": mask}, "context")
        return pad_context(context.astype(np.float32, copy=False), mask, text_len)

    def encode_clip(self, plan: GenerationPlan, memory: VramPlan | None = None) -> np.ndarray:
        """CLIP features [1, 257 * n_images, width] of the first (and last) frame, un-resized images."""
        frames = [plan.first_image] + ([plan.last_image] if plan.last_image is not None else [])
        pixels = images.clip_pixel_values(frames, self.component("image_encoder").signature.inputs[0].shape[-1])
        with self._load("image_encoder", memory) as engine:
            feats = self._run_batched(engine, {"pixel_values": pixels}, "clip_fea")
        return feats.reshape(1, -1, feats.shape[-1]).astype(np.float32, copy=False)

    def encode_condition(self, plan: GenerationPlan, memory: VramPlan | None = None) -> np.ndarray:
        """I2V/FLF2V: `y` = [mask 4 | image latents z] [1, 4+z, F', h', w']; TI2V: the image latent [1, z, 1, h', w'];
        VACE: `vace_context` [1, 96, refs + F', h', w']."""
        from .vae import encode_video

        g = plan.geometry
        if plan.vace is not None:
            component = self.component("vae_encoder")
            with self._load("vae_encoder", memory) as engine:
                def encode(video: np.ndarray) -> np.ndarray:
                    return encode_video(engine, component, video, plan.vae_tiling, self.progress.enabled).astype(np.float32)

                return vace_context(plan.vace, encode, g.stride[0])
        if plan.task == "ti2v":
            video = plan.condition_image[None, :, None]
        else:
            video = images.conditioning_video(plan.condition_image, g.frames, plan.condition_last)
        with self._load("vae_encoder", memory) as engine:
            z = encode_video(engine, self.component("vae_encoder"), video, plan.vae_tiling, self.progress.enabled)
        z = z.astype(np.float32, copy=False)
        if plan.task == "ti2v":
            return z
        mask = images.i2v_mask(g.frames, g.latent_height, g.latent_width, last=plan.condition_last is not None)
        return np.concatenate([mask, z], axis=1)

    def initial_noise(self, plan: GenerationPlan) -> np.ndarray:
        """Seeded standard normal latents [1, z, F', h', w'] (numpy's generator, not torch's)."""
        shape = plan.geometry.latent_shape(self.manifest.vae.z_dim)
        return np.random.default_rng(plan.seed).standard_normal(shape, dtype=np.float32)

    def denoise(
        self,
        plan: GenerationPlan,
        context: np.ndarray,
        context_null: np.ndarray | None,
        noise: np.ndarray,
        clip_fea: np.ndarray | None = None,
        y: np.ndarray | None = None,
        image_latent: np.ndarray | None = None,
        stats: RunStats | None = None,
        memory: VramPlan | None = None,
        on_progress: ProgressCallback | None = None,
        vace: np.ndarray | None = None,
        inputs: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """The sampling loop from `noise`; returns the final latents [1, z, F', h', w'].

        `inputs`: other DiT inputs fixed for the run (Animate's `pose_latent`, `face_pixels`).

        `y` (I2V/FLF2V) is appended to the latent channels; `image_latent` (TI2V) replaces
        latent frame 0 before the first step and after every step, with timestep 0 on it.  `vace`
        (VACE's `vace_context`) goes to every call with `context_scale` for each VACE block.
        `on_progress("denoise", i, n)` follows step i of n (it may raise to stop the loop).
        """
        stats = stats if stats is not None else RunStats(self.backend.describe())
        sampler = make_sampler(plan.sampler, len(plan.steps), plan.shift, plan.denoising_step_list)
        latents = noise.astype(np.float32, copy=True)
        if image_latent is not None:
            latents[:, :, :1] = image_latent
        extra = {**({"clip_fea": clip_fea} if clip_fea is not None else {}), **(inputs or {})}
        if vace is not None:
            blocks = self.component(self.experts[0]).signature.input("context_scale").shape[1]
            extra.update(vace_context=vace, context_scale=np.full((1, blocks), plan.context_scale, dtype=np.float32))
        paired = pair_static_inputs(context, context_null, extra) if context_null is not None and plan.cfg else None
        if memory is None:
            memory = self.plan_memory(plan)
            self.check_memory(memory)
        stats.memory_budget_bytes = memory.budget_bytes
        stats.memory_plan = memory.to_dict()
        dits = [self.component(n) for n in self.experts]
        bar = self.progress.steps(len(plan.steps))
        try:
            with ExpertSwitcher(self.backend, self.bundle, dits, memory) as switcher:
                stats.residency_mode = switcher.plan.mode
                for step in plan.steps:
                    load_start = time.perf_counter()
                    engine = switcher.engine(step.expert)
                    start = time.perf_counter()
                    engine_before, gpu_before = engine.run_seconds, engine.gpu_seconds
                    x_in = latents if y is None else np.concatenate([latents, y], axis=1)
                    timestep = self._timestep(step.timestep, latents.shape[2], image_latent is not None)
                    velocity, calls = predict_velocity(engine, step, x_in, timestep, context, context_null, extra, paired)
                    latents = sampler.step(velocity, latents)
                    if image_latent is not None:
                        latents[:, :, :1] = image_latent
                    check_finite_latents(latents, step, len(plan.steps))
                    end = time.perf_counter()
                    stats.steps.append(StepRecord(
                        step.index, step.timestep, step.expert, step.guide_scale, step.cfg, calls,
                        end - start, engine.run_seconds - engine_before, start - load_start,
                        engine.gpu_seconds - gpu_before if gpu_before is not None else None,
                        sum(switcher.engine(n).resident_bytes for n in switcher.resident), engine.streamed_bytes,
                    ))
                    self._sample_device_memory(stats)
                    bar.set_postfix_str(f"t={step.timestep:g} {step.expert}", refresh=False)
                    bar.update(1)
                    if on_progress is not None:
                        on_progress("denoise", len(stats.steps), len(plan.steps))
            stats.residency = [asdict(e) for e in switcher.events]
            stats.warnings.extend(switcher.warnings)
        finally:
            bar.close()
        return latents

    def _timestep(self, t: float, latent_frames: int, first_frame_clean: bool) -> np.ndarray:
        """DiT timestep input: [1], or [1, F'] per latent frame (TI2V; frame 0 at 0 when it is the image)."""
        if not self.per_frame_timestep:
            return np.array([t], dtype=np.float32)
        ts = np.full((1, latent_frames), t, dtype=np.float32)
        if first_frame_clean:
            ts[:, 0] = 0.0
        return ts

    def _sample_device_memory(self, stats: RunStats) -> None:
        info = self.backend.memory_info()
        if info.device == "cpu":  # also a GPU backend that cannot query its memory: host RAM is not device memory
            return
        free = info.free_bytes
        if stats.device_start_free_bytes is None:
            stats.device_start_free_bytes = free
        if stats.device_min_free_bytes is None or free < stats.device_min_free_bytes:
            stats.device_min_free_bytes = free

    def decode(self, latents: np.ndarray, tiling: Tiling | None = None, memory: VramPlan | None = None) -> np.ndarray:
        """Latents -> video [1, 3, T, H, W] in [-1, 1], in spatial tiles when `tiling` is given."""
        from .vae import decode_latents

        with self._load("vae_decoder", memory) as engine:
            return decode_latents(engine, self.component("vae_decoder"), latents, tiling, self.progress.enabled)

    # ---- the whole run ----------------------------------------------------------------------

    def stages(self, plan: GenerationPlan, decode: bool = True) -> list[str]:
        names = ["text_encoder"]
        if self.dit_takes_clip:
            names.append("image_encoder")
        if plan.condition_image is not None or plan.vace is not None:
            names.append("vae_encoder")
        names.append("denoise")
        if decode:
            names.append("vae_decoder")
        return names

    def generate(
        self, plan: GenerationPlan, decode: bool = True, on_progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """Run every stage of `plan`; engines are loaded per stage and released after it.

        `on_progress` (see ProgressCallback) hears each stage start and each denoising step;
        an exception it raises (a cancelled job) ends the run after the engines are released.
        """
        if self.backend is None:
            raise RuntimeError("this pipeline was made without a backend: it can plan, not generate")
        stats = RunStats(self.backend.describe(), warnings=list(plan.warnings))
        names = self.stages(plan, decode)
        self._require(*(n for n in names if n != "denoise"))
        self._sample_device_memory(stats)  # the baseline, before any engine is loaded
        memory = self.plan_memory(plan, decode)
        self.check_memory(memory)  # before anything loads: a budget that cannot work costs nothing
        stats.memory_budget_bytes, stats.memory_plan = memory.budget_bytes, memory.to_dict()
        self.progress.start(names)

        def timed(name: str, fn, *args):
            if on_progress is not None:
                on_progress(name, 0, len(plan.steps) if name == "denoise" else 0)
            start = time.perf_counter()
            with self.progress.stage(name):
                out = fn(*args)
            stats.stages[name] = time.perf_counter() - start
            self._sample_device_memory(stats)
            return out

        try:
            prompts = [plan.prompt] + ([plan.negative_prompt] if plan.cfg else [])
            context = timed("text_encoder", self.encode_text, prompts, memory)
            context_null = context[1:2] if plan.cfg else None
            clip_fea = timed("image_encoder", self.encode_clip, plan, memory) if "image_encoder" in names else None
            cond = timed("vae_encoder", self.encode_condition, plan, memory) if "vae_encoder" in names else None
            vace = cond if plan.task == "vace" else None
            y, image_latent = (cond, None) if plan.task in IMAGE_TASKS else (None, None if vace is not None else cond)
            noise = self.initial_noise(plan)
            latents = timed(
                "denoise", self.denoise, plan, context[:1], context_null, noise, clip_fea, y, image_latent, stats,
                memory, on_progress, vace,
            )
            # VACE: the reference images' latent frames are dropped before decoding (official decode_latent)
            video_latents = latents[:, :, plan.geometry.ref_frames:]
            video = timed("vae_decoder", self.decode, video_latents, plan.vae_tiling, memory) if decode else None
        except DeviceOutOfMemory as e:
            raise VramBudgetError(out_of_memory_line(e, memory)) from None
        finally:
            self.progress.close()
        stats.warnings.extend(self.backend.take_warnings())
        return GenerationResult(plan, latents, video, stats)


class NonFiniteLatentsError(WanrtError):
    """The latents held NaN or infinite values after a denoising step: the video would be black or noise."""


def check_finite_latents(latents: np.ndarray, step: StepPlan, steps: int) -> None:
    """NonFiniteLatentsError naming the step and expert when any latent value is NaN or infinite."""
    if np.isfinite(latents).all():
        return
    bad = int(latents.size - np.count_nonzero(np.isfinite(latents)))
    raise NonFiniteLatentsError(
        f"step {step.index + 1} of {steps} ({step.expert}, timestep {step.timestep:g}): {bad} of {latents.size} latent"
        " values are NaN or infinite, so no video is written; the engine overflowed or its weights are not finite"
        " (rebuild with --precision fp32, or check the checkpoint and LoRAs the bundle was built from)"
    )


def out_of_memory_line(error: DeviceOutOfMemory, memory: VramPlan) -> str:
    """One line for a device allocation that failed: what, the numbers, the budget and the flag to change."""
    return (
        f"{error}; the plan ({memory.mode}, pool {gib(memory.activation_bytes)}, margin {gib(memory.margin_bytes)})"
        f" expected to fit in a budget of {gib(memory.budget_bytes)}: lower --vram-budget (wanrt then keeps one expert"
        " at a time or streams weights), use a smaller video, or free GPU memory other processes hold"
    )
