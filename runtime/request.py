"""What a generation asks for, and the errors that name the field at fault.

`WanPipeline.prepare` is the one validation of a request, whoever asks: `run` builds the
request from its options, `serve` from a JSON body, and both call `prepare` before any work
(`serve` before queueing).  `prepare` first calls `check_fields` (each field's type and the
values that need no bundle: the place for range checks that apply to every caller), then the
bundle's rules (frame counts, sizes the engines take, the images a task needs, sampler, steps).
Every error it raises about the request is a `RequestError` carrying the field's name, so
`run` prints `error: --frames 0: ...` and `serve` answers 400 with `"field": "frames"`.
"""

from __future__ import annotations

import os
import re
import typing
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator

from wanrt.engines.errors import BundleError, WanrtError
from wanrt.engines.limits import CONTEXT_SCALE_RANGE, SAMPLING_RANGES, SEED_RANGE, NumberRange

from .schedulers import SAMPLERS


@dataclass
class GenerationRequest:
    """What the user asked for; `None` means the bundle's default."""

    prompt: str
    negative_prompt: str | None = None
    image: str | os.PathLike | None = None
    last_image: str | os.PathLike | None = None
    frames: int | None = None
    height: int | None = None  # I2V/FLF2V/TI2V-with-image: height*width is the max area
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None  # both experts
    shift: float | None = None
    seed: int | None = None  # None: a random seed (reported in the stats)
    sampler: str | None = None  # "unipc", "euler" or "distill" (needs the bundle's denoising_step_list)
    vae_tiling: bool = False  # encode/decode in overlapping spatial tiles (bounded VAE memory at large sizes)
    video: str | os.PathLike | None = None  # VACE: control video (file or frames folder); its size is the output's
    mask: str | os.PathLike | None = None  # VACE: mask video over --video (white: generate, black: keep)
    ref_images: list | None = None  # VACE: reference image paths, prepended as latent frames
    context_scale: float | None = None  # VACE: weight of the control hints (official vace_context_scale, 1.0)
    # Wan2.2-Animate: the official preprocessing's videos (`image` is the reference character image)
    pose_video: str | os.PathLike | None = None  # skeleton video; sets the output size and length
    face_video: str | os.PathLike | None = None  # face crops (the motion encoder's size), as many frames as the pose video
    mode: str | None = None  # "animate" (default) or "replace" (needs background_video and mask_video)
    background_video: str | os.PathLike | None = None
    mask_video: str | os.PathLike | None = None


ANIMATE_MODES = ("animate", "replace")  # Wan2.2-Animate: animate the image, or replace the person in the video
ANIMATE_FIELDS = ("pose_video", "face_video", "mode", "background_video", "mask_video")  # Animate bundles only

# field name -> the types its value may have (None included where the field is optional)
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    name: tuple(t for t in typing.get_args(hint) or (hint,))
    for name, hint in typing.get_type_hints(GenerationRequest).items()
}
FIELDS = tuple(f.name for f in fields(GenerationRequest))
# request field -> its range (engines.limits: the same table a bundle's and a config's values obey)
REQUEST_RANGES: dict[str, NumberRange] = {
    "frames": SAMPLING_RANGES["frames"], "height": SAMPLING_RANGES["height"], "width": SAMPLING_RANGES["width"],
    "steps": SAMPLING_RANGES["steps"], "guidance": SAMPLING_RANGES["guide_scale"], "shift": SAMPLING_RANGES["shift"],
    "seed": SEED_RANGE, "context_scale": CONTEXT_SCALE_RANGE,
}  # fmt: skip


OPTION_NAMES = {"ref_images": "--ref-image"}  # fields whose option is not the field's name (given once per image)


def option_name(field: str) -> str:
    """The `run` option of a request field: image -> --image, last_image -> --last-image, ref_images -> --ref-image."""
    return OPTION_NAMES.get(field, "--" + field.replace("_", "-"))


class RequestError(WanrtError):
    """A request field with a bad value; `field` is the GenerationRequest attribute at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def field_named(message: str, candidates: tuple[str, ...]) -> str:
    """The candidate field `message` names first (as an option, else as a word); the first candidate if none."""
    for pattern in (lambda f: re.escape(option_name(f)) + r"(?![\w-])", lambda f: rf"(?<![\w-]){re.escape(f)}\b"):
        found = [(m.start(), f) for f in candidates if (m := re.search(pattern(f), message))]
        if found:
            return min(found)[1]
    return candidates[0]


@contextmanager
def request_field(*candidates: str) -> Iterator[None]:
    """Re-raise a WanrtError from the block (not a BundleError) as a RequestError for the field it names."""
    try:
        yield
    except (RequestError, BundleError):
        raise
    except WanrtError as e:
        raise RequestError(field_named(str(e), candidates), str(e)) from None


def _type_ok(value: object, allowed: tuple[type, ...]) -> bool:
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):  # bool is an int in Python; a flag is never a number here
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, tuple(t for t in allowed if t is not type(None)))


def _expected(allowed: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", os.PathLike: "a path",
             list: "a list of paths"}
    kinds = [names[t] for t in allowed if t in names]
    return " or ".join(kinds) + (" (or omitted)" if type(None) in allowed else "")


def check_fields(request: GenerationRequest) -> None:
    """Each field's type, and the values that need no bundle; RequestError naming the first bad field."""
    for name in FIELDS:
        value = getattr(request, name)
        if not _type_ok(value, FIELD_TYPES[name]):
            raise RequestError(name, f"{option_name(name)} {value!r}: expected {_expected(FIELD_TYPES[name])}")
    for name, rng in REQUEST_RANGES.items():
        value = getattr(request, name)
        if value is not None and not rng.contains(value):
            raise RequestError(name, f"{option_name(name)} {value!r}: expected {rng.expected()}")
    if request.ref_images is not None and not all(isinstance(p, (str, os.PathLike)) for p in request.ref_images):
        raise RequestError("ref_images", f"--ref-image {request.ref_images!r}: expected a list of image paths")
    if request.mode is not None and request.mode not in ANIMATE_MODES:
        raise RequestError("mode", f"--mode {request.mode!r}: expected one of {', '.join(ANIMATE_MODES)}")
    if request.sampler is not None and request.sampler not in SAMPLERS:
        raise RequestError("sampler", f"--sampler {request.sampler!r}: expected one of {', '.join(SAMPLERS)}")
