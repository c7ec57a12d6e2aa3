"""Static activation scales from the model's own sampling trajectory (W8A8 graphs).

The bundle being built is run as `run` would run it: our text encoder on each calibration
prompt (and the negative prompt where CFG is on), our sampler with the bundle's sampler, steps,
shift, guidance and CFG, both branches, each Wan2.2 expert only on the steps it runs
(`runtime.pipeline.WanPipeline.generate(decode=False)`).  Only the DiT graphs differ: each
quantized expert runs a copy of its weight-quantized graph that also outputs, for every quantized
MatMul, max |x| of its input (`calibration.qdq.with_amax_outputs`), or the input itself for the
percentile method.  So the ranges are those of our own graph, weights already quantized, in
ONNX Runtime; no second model is built.  Then `x -> Q -> DQ` goes in front of each MatMul with
scale = amax / qmax (`calibration.qdq.insert_activation_qdq`), rewriting only `model.onnx`.

Models that take more than a prompt get seeded synthetic inputs per prompt (smooth random colour
fields plus fine noise, `synthetic_frames`), written to the calibration's temporary folder, so the
CLIP and VAE-encoder paths run as they do for a user's files; one function per task, chosen from
`TASK_INPUTS`: i2v a first frame, flf2v a first and a last frame, ti2v a first frame on every
second prompt (text-only on the others), VACE a control video, a mask
video (a box to generate) and a reference image, Wan2.2-Animate a pose video, face crops and a
reference image, every second prompt in replace mode with a background video and a person mask.

Methods: `max` keeps the running max of |x| over every call; `percentile` takes, per call, the
P-th percentile of |x| and keeps the max of those over calls (clips the rare outliers of each
call, not those of whole steps).  Why our own collection rather than ModelOpt's `mtq.quantize`
or ONNX Runtime's `quantize_static`: it runs the bundle's exact sampler and expert schedule
through the runtime, needs no torch copy of a 14B expert, and puts Q/DQ only where TensorRT's
rules and ORT's int8 fusion want them (ModelOpt's ONNX path emits `trt`-domain nodes that ORT
rejects; `quantize_static` calibrates fp8 only with its Distribution method).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from wanrt.engines.errors import WanrtError
from wanrt.engines.files import commit_temporary, new_temporary
from wanrt.engines.manifest import Component, Manifest
from wanrt.runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtEngine
from wanrt.runtime.animate import pipeline_class
from wanrt.runtime.pipeline import WanPipeline
from wanrt.runtime.request import GenerationRequest

from .prompts import PromptSet, read_prompts
from .attention_qdq import attention_record, insert_attention_qdq, observed_inputs, quantized_sites
from .qdq import QuantizeError, insert_activation_qdq, quantized_matmuls, with_amax_outputs

METHODS = ("max", "percentile")
DEFAULT_PERCENTILE = 99.99
DEFAULT_FRAMES = 5  # two latent frames: every temporal position of the RoPE table but the length
CALIB_GRAPH = "calibration.onnx"  # beside model.onnx while calibrating (same external data file)


class CalibrationError(WanrtError):
    """Calibration options or inputs that cannot work."""


@dataclass(frozen=True)
class CalibrationOptions:
    """What `--calib-*` asked for; None: the default."""

    method: str = "max"
    percentile: float | None = None  # only with method "percentile" (default DEFAULT_PERCENTILE)
    prompts_file: str | None = None  # None: the built-in prompt set
    steps: int | None = None  # None: the bundle's own steps
    size: tuple[int, int, int] | None = None  # (width, height, frames); None: the bundle's default size, 5 frames
    seed: int = 0  # prompt i runs with seed + i

    def check(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(f"--calib-method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.percentile is not None:
            if self.method != "percentile":
                raise CalibrationError("--calib-percentile needs --calib-method percentile")
            if not 0 < self.percentile <= 100:
                raise CalibrationError(f"--calib-percentile {self.percentile:g}: expected a value in (0, 100]")
        if self.steps is not None and self.steps < 1:
            raise CalibrationError(f"--calib-steps {self.steps}: expected at least 1")

    @property
    def clip_percentile(self) -> float | None:
        if self.method != "percentile":
            return None
        return DEFAULT_PERCENTILE if self.percentile is None else self.percentile

    def record(self, prompts: PromptSet) -> dict[str, Any]:
        """What changes the scales (the cache key's and the manifest's record)."""
        width, height, frames = self.size if self.size else (None, None, DEFAULT_FRAMES)
        return {
            "method": self.method, "percentile": self.clip_percentile, "steps": self.steps, "seed": self.seed,
            "size": {"width": width, "height": height, "frames": frames},
            "prompts": {"source": prompts.source, "count": len(prompts.prompts), "sha256": prompts.sha256},
        }  # fmt: skip


def parse_size(text: str) -> tuple[int, int, int]:
    """`--calib-size WIDTHxHEIGHT[xFRAMES]` -> (width, height, frames)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (2, 3) or min(values) < 1:
        raise CalibrationError(f"--calib-size {text!r}: expected WIDTHxHEIGHT or WIDTHxHEIGHTxFRAMES, e.g. 832x480x5")
    return (values[0], values[1], values[2] if len(values) == 3 else DEFAULT_FRAMES)


# --------------------------------------------------------------------------------------------
# collecting ranges


@dataclass
class RangeObserver:
    """Running ranges of the quantized MatMul inputs of one expert."""

    outputs: dict[str, list[str]]  # graph output -> the layers whose input it observes
    percentile: float | None = None
    amax: dict[str, float] = field(default_factory=dict)  # layer -> range
    calls: int = 0

    def update(self, values: Mapping[str, np.ndarray]) -> None:
        self.calls += 1
        for name, layers in self.outputs.items():
            x = values[name]
            if self.percentile is None:
                r = float(np.max(x))  # already max |x| inside the graph
            else:
                a = np.abs(x.astype(np.float32, copy=False)).ravel()
                r = float(np.percentile(a, self.percentile)) if a.size else 0.0
            if not np.isfinite(r):
                raise CalibrationError(f"calibration: the input of {layers[0]} reached {r} (the model overflows)")
            for layer in layers:
                self.amax[layer] = max(self.amax.get(layer, 0.0), r)


class ObservingEngine(OrtEngine):
    """An expert's calibration graph: returns noise_pred and hands the extra outputs to its observer."""

    def __init__(self, component: Component, session, observer: RangeObserver, activations=None) -> None:
        super().__init__(component, session, 0, activations)
        self.observer = observer
        self._all = [o.name for o in session.get_outputs()]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(zip(self._all, self._session.run(self._all, feeds)))
        self.observer.update(values)
        return {n: values[n] for n in self._outputs}


class CalibrationBackend(OnnxRuntimeBackend):
    """ONNX Runtime on the CPU, running the named experts' calibration graphs instead of their own."""

    def __init__(self, graphs: Mapping[str, Path], observers: Mapping[str, RangeObserver]) -> None:
        from wanrt.runtime.backends.onnxruntime import OrtOptions

        super().__init__(OrtOptions(device="cpu"))
        self.graphs, self.observers = dict(graphs), dict(observers)

    def load(self, component: Component, bundle_dir, *, activations=None, weight_budget_bytes=None):
        if component.name not in self.graphs:
            return super().load(component, bundle_dir, activations=activations, weight_budget_bytes=weight_budget_bytes)
        import onnxruntime as ort

        session = ort.InferenceSession(str(self.graphs[component.name]), sess_options=self.session_options(),
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        return ObservingEngine(component, session, self.observers[component.name], activations)


def synthetic_frames(seed: int, frames: int, width: int, height: int) -> np.ndarray:
    """Seeded uint8 [T, H, W, 3]: low-frequency colour fields (bicubic 4x4 -> size) drifting from a first to a
    last field over the frames, plus fine noise in every frame (one frame: the first field)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    first = rng.random((4, 4, 3))
    last = rng.random((4, 4, 3)) if frames > 1 else first
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        a = t / max(frames - 1, 1)
        coarse = Image.fromarray((((1 - a) * first + a * last) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0.0, 8.0, (height, width, 3))
        out[t] = np.clip(pixels, 0, 255).astype(np.uint8)
    return out


def calibration_image(path: Path, seed: int, width: int, height: int) -> Path:
    """Write a seeded synthetic RGB picture (`synthetic_frames`' single frame)."""
    from PIL import Image

    Image.fromarray(synthetic_frames(seed, 1, width, height)[0]).save(path)
    return path


def synthetic_mask(seed: int, frames: int, width: int, height: int) -> np.ndarray:
    """Seeded uint8 [T, H, W, 3] mask video: white (255) inside one box of a third to two thirds of each side, black outside."""
    rng = np.random.default_rng(seed)
    h, w = (int(rng.integers(n // 3, 2 * n // 3 + 1)) for n in (height, width))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    mask = np.zeros((frames, height, width, 3), np.uint8)
    mask[:, top : top + h, left : left + w] = 255
    return mask


def calibration_video(path: Path, frames: np.ndarray, fps: int) -> Path:
    """Write uint8 [T, H, W, 3] frames as the H.264 mp4 a user would pass (`runtime.video.write_mp4`)."""
    from wanrt.runtime.video import write_mp4

    return write_mp4(frames, path, fps)


IMAGE_SIZE = (832, 480)  # synthetic conditioning pictures when --calib-size leaves the size to the bundle


@dataclass(frozen=True)
class SyntheticInputs:
    """What one calibration prompt's synthetic conditioning files are made from, and where they go."""

    folder: Path  # the calibration's temporary folder
    index: int  # the prompt's index (names its files)
    seed: int  # the prompt's seed
    size: tuple[int, int] | None  # --calib-size's (width, height); None: the task's default
    frames: int
    pipeline: WanPipeline

    def path(self, name: str) -> Path:
        return self.folder / f"{self.index}_{name}"

    def video_size(self) -> tuple[int, int]:
        """(width, height) of a task whose input videos give the output size: --calib-size, else the bundle's default."""
        d = self.pipeline.manifest.sampling
        return self.size or (d.width, d.height)

    @property
    def fps(self) -> int:
        return self.pipeline.manifest.sampling.fps


def image_inputs(request: GenerationRequest, s: SyntheticInputs) -> None:
    """i2v: the first frame."""
    request.image = calibration_image(s.path("image.png"), s.seed, *(s.size or IMAGE_SIZE))


def first_last_inputs(request: GenerationRequest, s: SyntheticInputs) -> None:
    """flf2v: the first and the last frame."""
    image_inputs(request, s)
    request.last_image = calibration_image(s.path("last.png"), s.seed + 10**6, *(s.size or IMAGE_SIZE))


def ti2v_inputs(request: GenerationRequest, s: SyntheticInputs) -> None:
    """Wan2.2 TI2V: every second prompt with a first frame (its text-only and image-conditioned runs both)."""
    if s.index % 2:
        image_inputs(request, s)


def vace_inputs(request: GenerationRequest, s: SyntheticInputs) -> None:
    """VACE: a control video, a mask over it (a box to generate, the rest kept) and one reference image.

    The video gives the output size, so the request's height and width are dropped."""
    width, height = s.video_size()
    request.height = request.width = None
    request.video = calibration_video(s.path("video.mp4"), synthetic_frames(s.seed, s.frames, width, height), s.fps)
    request.mask = calibration_video(s.path("mask.mp4"), synthetic_mask(s.seed, s.frames, width, height), s.fps)
    request.ref_images = [calibration_image(s.path("ref.png"), s.seed + 10**6, width, height)]


def animate_inputs(request: GenerationRequest, s: SyntheticInputs) -> None:
    """Wan2.2-Animate: pose video, face crops (the motion encoder's size) and reference image, one segment long;
    every second prompt in replace mode, with a background video and a person mask.

    The pose video gives the output size, so the request's height and width are dropped."""
    width, height = s.video_size()
    face = s.pipeline.face_size  # an AnimatePipeline's
    request.height = request.width = None
    request.pose_video = calibration_video(s.path("pose.mp4"), synthetic_frames(s.seed, s.frames, width, height), s.fps)
    request.face_video = calibration_video(s.path("face.mp4"), synthetic_frames(s.seed + 1, s.frames, face, face), s.fps)
    request.image = calibration_image(s.path("ref.png"), s.seed + 10**6, width, height)
    if s.index % 2:
        request.mode = "replace"
        background = synthetic_frames(s.seed + 2, s.frames, width, height)
        request.background_video = calibration_video(s.path("background.mp4"), background, s.fps)
        request.mask_video = calibration_video(s.path("mask.mp4"), synthetic_mask(s.seed, s.frames, width, height), s.fps)


# task -> what its calibration requests add to the prompt (tasks absent here take the prompt alone)
TASK_INPUTS: dict[str, Callable[[GenerationRequest, SyntheticInputs], None]] = {
    "i2v": image_inputs, "flf2v": first_last_inputs, "ti2v": ti2v_inputs, "vace": vace_inputs, "animate": animate_inputs,
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# calibrating a staged bundle


@dataclass
class CalibrationResult:
    """The calibrated experts' records (for their manifest entries) and what it cost."""

    records: dict[str, dict[str, Any]]  # component -> quantization.activations record (scales included)
    seconds: float
    prompts: int
    runs: list[Any] = field(default_factory=list)  # each prompt's runtime.pipeline.RunStats (stage and step timings)


def calibrate_bundle(
    root: Path,
    manifest: Manifest,
    experts: list[str],
    scheme: str,
    options: CalibrationOptions,
    log: Callable[[str], None] = lambda msg: None,
    progress: bool = True,
    attention: bool = False,
) -> CalibrationResult:
    """Calibrate the weight-quantized experts `experts` of the staged bundle `root` and rewrite their graphs to W8A8.

    `attention` (`--quantize-attention`, fp8): also observe q, k, v of the quantized attentions
    and put fp8 Q/DQ on them and their softmax output (`calibration.attention_qdq`)."""
    options.check()
    prompts = read_prompts(options.prompts_file)
    if "text_encoder" not in manifest.components or not manifest.tokenizer:
        raise CalibrationError("calibration runs the bundle's text encoder: build it in the same bundle "
                               "(drop --components, or add text_encoder), or use --weights-only")  # fmt: skip
    graphs, observers, models, runs = {}, {}, {}, []
    for name in experts:
        graph = root / manifest.components[name].onnx
        model = onnx.load(str(graph), load_external_data=False)
        if not quantized_matmuls(model):
            raise CalibrationError(f"{name}: {graph} has no quantized linears to calibrate")
        sites = quantized_sites(model) if attention else []
        if attention and not sites:
            raise CalibrationError(f"{name}: {graph} has no native attention to quantize (--quantize-attention)")
        calib, outputs = with_amax_outputs(model, full_inputs=options.clip_percentile is not None, extra=observed_inputs(sites))
        graphs[name] = graph.with_name(CALIB_GRAPH)
        onnx.save(calib, str(graphs[name]))
        observers[name] = RangeObserver(outputs, options.clip_percentile)
        models[name] = (graph, model, sites)
    start = time.perf_counter()
    images = tempfile.TemporaryDirectory(prefix="wanrt-calib-")  # the synthetic conditioning pictures and videos
    try:
        backend = CalibrationBackend(graphs, observers)
        pipeline = pipeline_class(manifest.task)(root, manifest, backend)
        width, height, frames = options.size if options.size else (None, None, DEFAULT_FRAMES)
        add_inputs = TASK_INPUTS.get(manifest.task)
        bar = tqdm(prompts.prompts, desc="calibrating", unit="prompt", disable=not progress)
        for i, prompt in enumerate(bar):
            request = GenerationRequest(prompt=prompt, frames=frames, height=height, width=width,
                                        steps=options.steps, seed=options.seed + i)  # fmt: skip
            if add_inputs is not None:
                size = (width, height) if options.size else None
                add_inputs(request, SyntheticInputs(Path(images.name), i, options.seed + i, size, frames, pipeline))
            if manifest.sampling.sampler == "distill":
                request.steps = None  # a step-distilled schedule runs its own step list
            try:
                runs.append(pipeline.generate(pipeline.prepare(request), decode=False).stats)
            except WanrtError as e:
                raise CalibrationError(f"calibration prompt {i + 1} of {len(prompts.prompts)}: {e}") from None
        bar.close()
    finally:
        images.cleanup()
        for path in graphs.values():
            path.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    records = {}
    for name, (graph, model, sites) in models.items():
        obs = observers[name]
        if obs.calls == 0:
            raise CalibrationError(f"{name}: no calibration step ran this expert (its steps: none at this schedule)")
        try:
            scales = insert_activation_qdq(model, scheme, obs.amax)
            attention_scales = insert_attention_qdq(model, sites, obs.amax) if sites else None
        except QuantizeError as e:
            raise CalibrationError(f"{name}: {e}") from None
        tmp = new_temporary(graph)
        onnx.save(model, str(tmp))
        commit_temporary(tmp, graph)
        records[name] = {
            **options.record(prompts), "calls": obs.calls,
            "scales": {layer: scales[layer] for layer in sorted(scales)},
            "scales_sha256": hashlib.sha256(json.dumps(scales, sort_keys=True).encode()).hexdigest(),
            **({"attention": attention_record(attention_scales)} if sites else {}),
        }  # fmt: skip
        also = f" and {len(sites)} attentions (q, k, v; softmax output fixed)" if sites else ""
        log(f"{name}: calibrated {len(scales)} linear inputs{also} on {obs.calls} DiT calls ({options.method})")
    return CalibrationResult(records, seconds, len(prompts.prompts), runs)


def calibration_key(options: CalibrationOptions) -> dict[str, Any]:
    """The calibration options as the build cache key covers them (the prompts by digest)."""
    return options.record(read_prompts(options.prompts_file))

