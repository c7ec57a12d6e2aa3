"""Wan2.2-Animate from a bundle, torch-free: animate a reference image with a pose video, or replace the person in it.

Inputs are the files the official preprocessing writes (`wan/modules/animate/preprocess/`): the
pose skeleton video (`src_pose.mp4`), the face crops (`src_face.mp4`, the motion encoder's size,
512x512), the reference image (`src_ref.png`) and, to replace, the background (`src_bg.mp4`) and
the person mask (`src_mask.mp4`).  The run follows `WanAnimate.generate` (Wan2.2 `wan/animate.py`):

- the videos are padded to whole segments by ping-pong repetition (`get_valid_len`,
  `inputs_padding`); a segment is `clip_len` frames (the bundle's frame count, 77), and each
  segment after the first starts on the previous one's last `refert_num` (1) frame(s);
- the reference image is letterboxed to the pose video's size (`padding_resize`: black bars,
  bilinear resize);
- once: the umt5 context; CLIP features of the letterboxed reference image;
- per segment: VAE latents of the pose frames (`pose_latent`); `y` = [mask | latents] of the
  reference image (frame 0, mask 1) then of the conditioning video (the carried-over frames,
  then zeros, or in replace mode the background), masked by `get_i2v_mask` (the carried-over
  frames, and in replace mode 1 - the person mask, nearest-resized to the latent grid); noise
  for 1 + latent frames; the sampler loop with the face crops in [-1, 1]; decode every latent
  frame but the reference one; the carried-over frames are dropped after the first segment;
- the frames are cut back to the pose video's length.

Bad input (a missing or unreadable video, pose and face frame counts that differ, a face size
the engine does not take, a mask or background of another size or length) is a RequestError
naming the option, raised by `prepare` before any engine loads.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from wanrt.engines.errors import WanrtError

from . import image as images
from .pipeline import GenerationPlan, GenerationResult, ProgressCallback, RunStats, WanPipeline
from .request import GenerationRequest, RequestError, option_name, request_field
from .sizes import VideoGeometry, check_frames, check_size, size_multiple
from .vae import encode_video

REFER_FRAMES = 1  # official refert_num default (1 or 5): frames each segment takes from the previous one


# ---------------------------------------------------------------------------------------------- inputs


def read_video(path: str | os.PathLike, field: str) -> np.ndarray:
    """Every frame of a video file as uint8 RGB [T, H, W, 3] (PyAV); RequestError naming the option otherwise."""
    import av

    p = Path(path)
    if not p.is_file():
        raise RequestError(field, f"{option_name(field)} {p}: video not found")
    try:
        with av.open(str(p)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (OSError, ValueError, IndexError, av.FFmpegError) as e:
        raise RequestError(field, f"{option_name(field)} {p}: unreadable video ({type(e).__name__}: {e})") from None
    if not frames:
        raise RequestError(field, f"{option_name(field)} {p}: the video has no frames")
    return np.stack(frames)


def valid_length(real: int, clip_len: int, overlap: int) -> int:
    """Official `get_valid_len`: `real` frames padded up to whole segments of `clip_len` overlapping by `overlap`."""
    step = clip_len - overlap
    rest = (real - overlap) % step
    return real + (step - rest if rest else 0)


def pingpong_indices(n: int, target: int) -> list[int]:
    """Official `inputs_padding`: frame indices 0, 1, ..., n-1, n-2, ..., 0, 1, ... up to `target` of them."""
    if n == 1:
        return [0] * target
    out, idx, back = [], 0, False
    while len(out) < target:
        out.append(idx)
        idx += -1 if back else 1
        if idx in (0, n - 1):
            back = not back
    return out


def segment_starts(frames: int, clip_len: int, overlap: int) -> list[int]:
    """First frame of each segment of a `frames`-long (padded) video (official `while start + refert_num < len`)."""
    starts, start = [], 0
    while start + overlap < frames:
        starts.append(start)
        start += clip_len - overlap
    return starts


def letterbox(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Official `padding_resize`: uint8 [h, w, 3] fit into [height, width, 3] with black bars, bilinear, centered."""
    h, w = img.shape[:2]
    out = np.zeros((height, width, 3), np.uint8)
    if h / w > height / width:
        new_w = int(height / h * w)
        pad = int((width - new_w) / 2)
        out[:, pad : pad + new_w] = resize_bilinear_uint8(img, height, new_w)
    else:
        new_h = int(width / w * h)
        pad = int((height - new_h) / 2)
        out[pad : pad + new_h] = resize_bilinear_uint8(img, new_h, width)
    return out


def _linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] bilinear interpolation (half-pixel centers, borders clamped; OpenCV INTER_LINEAR, no antialias)."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def resize_bilinear_uint8(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, 3] -> [height, width, 3] bilinear, rounded."""
    rows, cols = _linear_matrix(img.shape[0], height), _linear_matrix(img.shape[1], width)
    x = np.einsum("Hh,hwc,Ww->HWc", rows, img.astype(np.float64), cols)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def to_pixels(frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [1, 3, T, H, W] in [-1, 1] (official `/ 127.5 - 1`)."""
    return np.ascontiguousarray((frames.astype(np.float32) / np.float32(127.5) - 1).transpose(3, 0, 1, 2))[None]


def nearest_resize(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """[T, H, W] -> [T, height, width], torch `interpolate(mode="nearest")` (source index floor(i * in / out))."""
    rows = np.floor(np.arange(height) * (mask.shape[1] / height)).astype(int)
    cols = np.floor(np.arange(width) * (mask.shape[2] / width)).astype(int)
    return mask[:, rows][:, :, cols]


def segment_mask(latent_frames: int, height: int, width: int, first: int, keep: np.ndarray | None = None) -> np.ndarray:
    """Official `get_i2v_mask`: [1, 4, latent_frames, h, w]; 1 on the first `first` pixel frames, else `keep` (or 0).

    `keep` [T, h, w] (replace mode: 1 - the person mask); pixel frame 0 fills the first latent
    frame's four channels, frames 1.. go four to a latent frame."""
    frames = (latent_frames - 1) * 4 + 1
    msk = np.zeros((frames, height, width), np.float32) if keep is None else keep.astype(np.float32, copy=True)
    msk[:first] = 1.0
    msk = np.concatenate([np.repeat(msk[:1], 4, axis=0), msk[1:]])
    return np.ascontiguousarray(msk.reshape(latent_frames, 4, height, width).transpose(1, 0, 2, 3))[None]


@dataclass
class AnimateInputs:
    """The preprocessed inputs, padded to whole segments (uint8 frames)."""

    mode: str
    real_frames: int  # the pose video's length: the output's
    pose: np.ndarray  # [T, H, W, 3]
    face: np.ndarray  # [T, S, S, 3]
    reference: np.ndarray  # [H, W, 3], letterboxed
    background: np.ndarray | None = None  # [T, H, W, 3] (replace)
    mask: np.ndarray | None = None  # [T, H, W] in [0, 1] (replace): the person


@dataclass
class AnimatePlan(GenerationPlan):
    """A validated Animate request: `geometry` is one segment's (`clip_len` frames)."""

    inputs: AnimateInputs | None = None
    starts: list[int] | None = None  # first frame of each segment
    refer_frames: int = REFER_FRAMES

    def summary(self):
        return {**super().summary(), "mode": self.inputs.mode, "segments": len(self.starts),
                "output_frames": self.inputs.real_frames}


# ---------------------------------------------------------------------------------------------- the pipeline


class AnimatePipeline(WanPipeline):
    """Runs a Wan2.2-Animate bundle; `prepare` reads and checks every input, `generate` runs the segments."""

    @property
    def face_size(self) -> int:
        return int(self.component(self.experts[0]).signature.input("face_pixels").shape[-1])

    def _check_inputs(self, request: GenerationRequest) -> None:
        super()._check_inputs(request)
        if request.image is None:
            raise RequestError("image", "this bundle is a Wan2.2-Animate model; --image (the reference character) is required")
        if request.pose_video is None:
            raise RequestError("pose_video", "this bundle is a Wan2.2-Animate model; --pose-video is required")
        if request.face_video is None:
            raise RequestError("face_video", "this bundle is a Wan2.2-Animate model; --face-video is required")
        if request.last_image is not None:
            raise RequestError("last_image", "--last-image is only for flf2v bundles; this one is animate")
        replace = (request.mode or "animate") == "replace"
        for name in ("background_video", "mask_video"):
            if replace and getattr(request, name) is None:
                raise RequestError(name, f"--mode replace needs {option_name(name)}")
            if not replace and getattr(request, name) is not None:
                raise RequestError(name, f"{option_name(name)} is for --mode replace")
        for name in ("height", "width"):
            if getattr(request, name) is not None:
                raise RequestError(name, f"{option_name(name)}: an Animate video takes the pose video's size")

    def _resolve_size(self, request: GenerationRequest):
        d, stride = self.manifest.sampling, self.manifest.vae.stride
        with request_field("frames"):
            clip_len = check_frames(request.frames if request.frames is not None else d.frames, stride[0])
        if clip_len <= REFER_FRAMES:
            raise RequestError("frames", f"--frames {clip_len}: a segment needs more than the {REFER_FRAMES} frame(s) it carries over")
        pose = read_video(request.pose_video, "pose_video")
        face = read_video(request.face_video, "face_video")
        real, height, width = pose.shape[0], pose.shape[1], pose.shape[2]
        if face.shape[0] != real:
            raise RequestError("face_video", f"--face-video {request.face_video}: {face.shape[0]} frames, but --pose-video has {real}")
        if face.shape[1:3] != (self.face_size, self.face_size):
            raise RequestError("face_video", f"--face-video {request.face_video}: {face.shape[2]}x{face.shape[1]} frames;"
                                             f" this bundle's motion encoder takes {self.face_size}x{self.face_size} face crops")
        with request_field("pose_video"):
            try:
                check_size(height, width, size_multiple(stride))
            except WanrtError as e:
                raise WanrtError(f"--pose-video {request.pose_video}: {e}") from None
        with request_field("image"):
            reference = letterbox(np.asarray(images.load_image(request.image)), height, width)
        target = valid_length(real, clip_len, REFER_FRAMES)
        order = pingpong_indices(real, target)
        mode = request.mode or "animate"
        background = mask = None
        if mode == "replace":
            background = self._matching_video(request.background_video, "background_video", real, height, width)[order]
            mask = self._matching_video(request.mask_video, "mask_video", real, height, width)[order, :, :, 0] / 255.0
        self._animate = AnimateInputs(mode, real, pose[order], face[order], reference, background, mask)
        self._starts = segment_starts(target, clip_len, REFER_FRAMES)
        return VideoGeometry(clip_len, height, width, stride), {}, height * width

    @staticmethod
    def _matching_video(path, field: str, frames: int, height: int, width: int) -> np.ndarray:
        video = read_video(path, field)
        if video.shape[1:3] != (height, width):
            raise RequestError(field, f"{option_name(field)} {path}: {video.shape[2]}x{video.shape[1]} frames, but the pose video is {width}x{height}")
        if video.shape[0] != frames:
            raise RequestError(field, f"{option_name(field)} {path}: {video.shape[0]} frames, but the pose video has {frames}")
        return video

    def prepare(self, request: GenerationRequest) -> AnimatePlan:
        plan = super().prepare(request)
        values = {f.name: getattr(plan, f.name) for f in fields(GenerationPlan)}
        values["first_image"] = to_pixels(self._animate.reference[None])[0, :, 0]  # CLIP sees the letterboxed reference
        return AnimatePlan(**values, inputs=self._animate, starts=self._starts)

    def run_shapes(self, plan: GenerationPlan):
        shapes = super().run_shapes(plan)
        g = plan.geometry
        for name in self.experts:
            dit = shapes[name]
            batch = dit["latent"][0]
            dit["latent"] = (batch, dit["latent"][1], g.latent_frames + 1, g.latent_height, g.latent_width)
            dit["pose_latent"] = (batch, self.manifest.vae.z_dim, g.latent_frames, g.latent_height, g.latent_width)
            dit["face_pixels"] = (batch, 3, g.frames, self.face_size, self.face_size)
        return shapes

    def stages(self, plan: GenerationPlan, decode: bool = True) -> list[str]:
        return ["text_encoder", "image_encoder", "vae_encoder", "denoise"] + (["vae_decoder"] if decode else [])

    # ---- one segment --------------------------------------------------------------------------

    def segment_condition(self, plan: AnimatePlan, start: int, carried: np.ndarray | None, memory=None) -> dict[str, np.ndarray]:
        """`y` [1, 20, 1 + F', h', w'] and `pose_latent` [1, 16, F', h', w'] of the segment starting at `start`.

        `carried`: the previous segment's last decoded frames [1, 3, n, H, W] (None for the first)."""
        g, a = plan.geometry, plan.inputs
        t, h, w = g.frames, g.latent_height, g.latent_width
        sl = slice(start, start + t)
        reference = to_pixels(a.reference[None])
        first = 0 if carried is None else plan.refer_frames
        if a.mode == "replace":
            video = to_pixels(a.background[sl])
            if carried is not None:
                video[:, :, :first] = carried[:, :, -first:]
            keep = nearest_resize(1.0 - a.mask[sl], h, w)
        else:
            video = np.zeros((1, 3, t, g.height, g.width), np.float32)
            if carried is not None:
                video[:, :, :first] = carried[:, :, -first:]
            keep = None
        with self._load("vae_encoder", memory) as engine:
            component = self.component("vae_encoder")
            pose = encode_video(engine, component, to_pixels(a.pose[sl]), plan.vae_tiling)
            ref = encode_video(engine, component, reference, plan.vae_tiling)
            cond = encode_video(engine, component, video, plan.vae_tiling)
        y_ref = np.concatenate([segment_mask(1, h, w, 1), ref], axis=1)
        y_seg = np.concatenate([segment_mask(g.latent_frames, h, w, first, keep), cond], axis=1)
        return {"y": np.concatenate([y_ref, y_seg], axis=2), "pose_latent": pose.astype(np.float32, copy=False)}

    def generate(self, plan: AnimatePlan, decode: bool = True, on_progress: ProgressCallback | None = None) -> GenerationResult:
        """Every segment of `plan`; `latents` is the last segment's, `video` all frames [1, 3, T, H, W]."""
        if self.backend is None:
            raise RuntimeError("this pipeline was made without a backend: it can plan, not generate")
        stats = RunStats(self.backend.describe(), warnings=list(plan.warnings))
        names = self.stages(plan, decode)
        self._require(*(n for n in names if n != "denoise"))
        memory = self.plan_memory(plan, decode)
        self.check_memory(memory)
        stats.memory_budget_bytes, stats.memory_plan = memory.budget_bytes, memory.to_dict()

        def timed(name: str, fn, *args, **kwargs):
            begin = time.perf_counter()
            out = fn(*args, **kwargs)
            stats.stages[name] = stats.stages.get(name, 0.0) + time.perf_counter() - begin
            return out

        prompts = [plan.prompt] + ([plan.negative_prompt] if plan.cfg else [])
        context = timed("text_encoder", self.encode_text, prompts, memory)
        context_null = context[1:2] if plan.cfg else None
        clip_fea = timed("image_encoder", self.encode_clip, plan, memory)
        rng = np.random.default_rng(plan.seed)
        g, a = plan.geometry, plan.inputs
        noise_shape = (1, self.manifest.vae.z_dim, g.latent_frames + 1, g.latent_height, g.latent_width)
        pieces, carried, latents = [], None, None
        for i, start in enumerate(plan.starts):
            if on_progress is not None:
                on_progress("segment", i, len(plan.starts))
            cond = timed("vae_encoder", self.segment_condition, plan, start, carried, memory)
            face = to_pixels(a.face[start : start + g.frames])
            noise = rng.standard_normal(noise_shape, dtype=np.float32)
            latents = timed("denoise", self.denoise, plan, context[:1], context_null, noise, clip_fea, cond["y"], None,
                            stats, memory, on_progress, inputs={"pose_latent": cond["pose_latent"], "face_pixels": face})
            if not decode:
                continue
            frames = timed("vae_decoder", self.decode, latents[:, :, 1:], plan.vae_tiling, memory)
            pieces.append(frames if i == 0 else frames[:, :, plan.refer_frames:])
            carried = frames[:, :, -plan.refer_frames:]
        video = np.concatenate(pieces, axis=2)[:, :, : a.real_frames] if decode else None
        return GenerationResult(plan, latents, video, stats)


def pipeline_class(task: str) -> type[WanPipeline]:
    """The pipeline that runs bundles of `task` (Animate bundles have their own)."""
    return AnimatePipeline if task == "animate" else WanPipeline
