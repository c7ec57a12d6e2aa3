"""Each engine's I/O signature: tensor names, dtypes and shapes with named dynamic dims.

These are the contract between `export/` (which must produce graphs with exactly these
inputs and outputs) and `runtime/` (which binds them).  A dim given as a string is
dynamic; `DIM_RANGES` holds the default min/max the exporter declares for it (TensorRT
optimization profiles are built from them).

DiT (`dit`, or `dit_high_noise` / `dit_low_noise` for Wan2.2 A14B):
    latent     float32 [batch, in_dim, frames, height, width]  latent frames / latent pixels;
               for i2v the 16 noise channels are followed by 4 mask + 16 image channels
    timestep   float32 [batch]          (ti2v: [batch, frames], one timestep per latent frame)
    context    float32 [batch, 512, text_dim]  T5 output trimmed to its true length, zero-padded
    clip_fea   float32 [batch, 257|514, clip_dim=1280]  Wan2.1 i2v / flf2v only
    vace_context  float32 [batch, vace_in_dim=96, frames, height, width]  VACE only: the control latents
               (16 inactive + 16 reactive latent channels, 64 packed mask channels), on the same latent
               grid as `latent` (reference-image frames first)
    context_scale float32 [batch, vace_blocks]  VACE only: the weight of each VACE block's hint (the
               official `vace_context_scale`, one per block as diffusers' `control_hidden_states_scale`);
               an input, not a build constant, so `run --context-scale` needs no rebuild, and batched like
               every DiT input, so CFG pairs it like `context`
    -> noise_pred float32 [batch, out_dim, frames, height, width]

Animate DiT (`dit`, Wan2.2-Animate-14B): the Wan2.1 i2v inputs, plus
    pose_latent  float32 [batch, 16, pose_frames, height, width]  VAE latents of the pose video;
                 pose_frames = frames - 1 (latent frame 0 is the reference image's)
    face_pixels  float32 [batch, 3, face_frames, 512, 512]  face crops in [-1, 1];
                 face_frames = 4 * (frames - 2) + 1 (the segment's video frames)

Text encoder (`text_encoder`):
    input_ids int64 [batch, tokens], attention_mask int64 [batch, tokens]
    -> context float32 [batch, tokens, dim]

Image encoder (`image_encoder`, Wan2.1 i2v / flf2v):
    pixel_values float32 [batch, 3, 224, 224]  (bicubic-resized, CLIP mean/std normalized)
    -> clip_fea float32 [batch, 257, 1280]   (penultimate block, no post-norm)

VAE (`vae_encoder`, `vae_decoder`): see `engines.vae_contract`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Dim = int | str

# Default ranges for the named dynamic dims (inclusive).  Latent units for frames/height/width.
DIM_RANGES: dict[str, tuple[int, int]] = {
    "batch": (1, 2),
    "frames": (1, 31),  # 121 video frames -> 31 latent frames
    "height": (2, 192),  # latent rows; 1536 px / 8
    "width": (2, 192),
    "tokens": (1, 512),
    "pose_frames": (1, 30),  # Animate: latent frames after the reference frame
    "face_frames": (1, 117),  # Animate: video frames of one segment (4 * (pose_frames - 1) + 1)
}

CLIP_DIM = 1280
CLIP_TOKENS = 257
CLIP_IMAGE_SIZE = 224


class InputMismatch(ValueError):
    """Inputs that do not fit an engine signature; the message names the input, the dim and what was expected."""


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[Dim, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(str(d["name"]), str(d["dtype"]), tuple(d["shape"]))


@dataclass(frozen=True)
class EngineSignature:
    """Inputs and outputs of one engine, in binding order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dim_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "dim_ranges": {k: list(v) for k, v in self.dim_ranges.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineSignature":
        return cls(
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            {k: (int(v[0]), int(v[1])) for k, v in d.get("dim_ranges", {}).items()},
        )

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def check_inputs(self, inputs: Mapping[str, tuple[Sequence[int], str]]) -> dict[str, int]:
        """Check input name -> (shape, dtype name) against this signature; return each named dim's size.

        Raises InputMismatch on the first problem, in signature order: a missing or unexpected
        input, a dtype, a rank, a fixed dim that differs, a named dim that takes two values, or
        a named dim outside `dim_ranges`.
        """
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.input_names]
        if missing or extra:
            found = [f"{what} {names}" for what, names in (("missing", missing), ("unexpected", extra)) if names]
            raise InputMismatch(f"inputs {', '.join(found)}; expected {self.input_names}")
        sizes: dict[str, int] = {}
        bound_by: dict[str, str] = {}  # named dim -> the input that first gave its size
        for spec in self.inputs:
            shape, dtype = inputs[spec.name]
            shape = [int(s) for s in shape]
            if dtype != spec.dtype:
                raise InputMismatch(f"input {spec.name}: dtype {dtype}, expected {spec.dtype}")
            if len(shape) != len(spec.shape):
                raise InputMismatch(f"input {spec.name}: shape {shape}, expected rank {len(spec.shape)} {list(spec.shape)}")
            for axis, (got, want) in enumerate(zip(shape, spec.shape)):
                if isinstance(want, int):
                    if got != want:
                        raise InputMismatch(
                            f"input {spec.name}: shape {shape}, expected {list(spec.shape)} (dim {axis} is {got}, not {want})"
                        )
                elif want in sizes:
                    if got != sizes[want]:
                        raise InputMismatch(
                            f"input {spec.name}: dim {want}={got}, but input {bound_by[want]} has {want}={sizes[want]}"
                        )
                else:
                    lo_hi = self.dim_ranges.get(want)
                    if lo_hi is not None and not lo_hi[0] <= got <= lo_hi[1]:
                        raise InputMismatch(f"input {spec.name}: dim {want}={got} is outside the range {lo_hi[0]}..{lo_hi[1]}")
                    sizes[want], bound_by[want] = got, spec.name
        return sizes


def _ranges(*names: str) -> dict[str, tuple[int, int]]:
    return {n: DIM_RANGES[n] for n in names}


def dit_signature(
    in_dim: int,
    out_dim: int,
    text_dim: int = 4096,
    clip_tokens: int | None = None,
    per_frame_timestep: bool = False,
    text_len: int = 512,
    clip_dim: int = CLIP_DIM,
    vace_in_dim: int | None = None,
    vace_blocks: int = 0,
) -> EngineSignature:
    """Signature of a DiT expert engine (VACE: `vace_in_dim` control channels and `vace_blocks` hints)."""
    inputs = [
        TensorSpec("latent", "float32", ("batch", in_dim, "frames", "height", "width")),
        TensorSpec("timestep", "float32", ("batch", "frames") if per_frame_timestep else ("batch",)),
        TensorSpec("context", "float32", ("batch", text_len, text_dim)),
    ]
    if clip_tokens is not None:
        inputs.append(TensorSpec("clip_fea", "float32", ("batch", clip_tokens, clip_dim)))
    if vace_in_dim is not None:
        inputs.append(TensorSpec("vace_context", "float32", ("batch", vace_in_dim, "frames", "height", "width")))
        inputs.append(TensorSpec("context_scale", "float32", ("batch", vace_blocks)))
    outputs = [TensorSpec("noise_pred", "float32", ("batch", out_dim, "frames", "height", "width"))]
    return EngineSignature(tuple(inputs), tuple(outputs), _ranges("batch", "frames", "height", "width"))


def animate_dit_signature(
    in_dim: int,
    out_dim: int,
    text_dim: int,
    pose_dim: int,
    face_size: int,
    clip_tokens: int | None = CLIP_TOKENS,
    text_len: int = 512,
    clip_dim: int = CLIP_DIM,
) -> EngineSignature:
    """Signature of a Wan2.2-Animate DiT engine: the i2v DiT's, plus the pose latents and the face crops."""
    base = dit_signature(in_dim, out_dim, text_dim, clip_tokens=clip_tokens, text_len=text_len, clip_dim=clip_dim)
    inputs = base.inputs + (
        TensorSpec("pose_latent", "float32", ("batch", pose_dim, "pose_frames", "height", "width")),
        TensorSpec("face_pixels", "float32", ("batch", 3, "face_frames", face_size, face_size)),
    )
    return EngineSignature(inputs, base.outputs, {**base.dim_ranges, **_ranges("pose_frames", "face_frames")})


def text_encoder_signature(dim: int = 4096) -> EngineSignature:
    """Signature of the umt5 text encoder engine."""
    return EngineSignature(
        (
            TensorSpec("input_ids", "int64", ("batch", "tokens")),
            TensorSpec("attention_mask", "int64", ("batch", "tokens")),
        ),
        (TensorSpec("context", "float32", ("batch", "tokens", dim)),),
        _ranges("batch", "tokens"),
    )


def image_encoder_signature(dim: int = CLIP_DIM, image_size: int = CLIP_IMAGE_SIZE, tokens: int = CLIP_TOKENS) -> EngineSignature:
    """Signature of the CLIP ViT-H/14 image encoder engine (penultimate block output)."""
    return EngineSignature(
        (TensorSpec("pixel_values", "float32", ("batch", 3, image_size, image_size)),),
        (TensorSpec("clip_fea", "float32", ("batch", tokens, dim)),),
        _ranges("batch"),
    )
