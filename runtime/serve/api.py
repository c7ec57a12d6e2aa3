"""The HTTP API's JSON: request bodies -> GenerationRequest, error bodies, the model card.

A `POST /v1/videos` body has the fields of `run` (GenerationRequest's), with `image` and
`last_image` as base64 PNG or JPEG, VACE's `ref_images` as a list of them, and VACE's `video`
and `mask` and Animate's `pose_video`, `face_video`, `background_video` and `mask_video` as base64
MP4 or WebM files (never as paths: those would name files on the server).  `parse_body` checks what only JSON can get wrong (the
body, unknown fields, base64, the image format); everything else is checked by the pipeline's
`prepare`, the same validation `run` uses (`runtime.request`).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path
from typing import Any

from wanrt.engines.errors import WanrtError
from wanrt.engines.manifest import Manifest
from wanrt.engines.schema import JsonLimits, load_json

from ..request import FIELDS, GenerationRequest, RequestError, option_name
from ..sizes import size_multiple

IMAGE_FIELDS = ("image", "last_image")
IMAGE_LIST_FIELDS = ("ref_images",)  # lists of base64 images
# base64 video files (VACE's control video and mask, Animate's preprocessed videos): never server paths
VIDEO_FIELDS = ("video", "mask", "pose_video", "face_video", "background_video", "mask_video")
FILE_FIELDS = IMAGE_FIELDS + IMAGE_LIST_FIELDS + VIDEO_FIELDS
MAX_BODY_BYTES = 64 * 2**20  # two base64 images of a few megapixels, with room to spare
BODY_LIMITS = JsonLimits(max_bytes=MAX_BODY_BYTES, max_depth=8)
IMAGE_FORMATS = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpg"}  # magic bytes -> file suffix
VIDEO_FORMATS = {4: (b"ftyp", "mp4"), 0: (b"\x1a\x45\xdf\xa3", "webm")}  # offset -> (magic bytes, file suffix)
_DATA_URL = re.compile(r"data:(image|video)/[a-z0-9+.-]+;base64,", re.IGNORECASE)


def parse_body(raw: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """A POST body -> (the non-image fields, the decoded images); RequestError naming the field at fault."""
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError("body", f"request body of {len(raw)} bytes; at most {MAX_BODY_BYTES} are accepted")
    try:
        body = load_json(raw, "request body", limits=BODY_LIMITS)
    except WanrtError as e:
        raise RequestError("body", str(e)) from None
    if not isinstance(body, dict):
        raise RequestError("body", f"expected a JSON object with the request's fields, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
    if "prompt" not in body:
        raise RequestError("prompt", "prompt is required")
    images: dict[str, Any] = {k: decode_image(k, v) for k, v in body.items() if k in IMAGE_FIELDS and v is not None}
    images.update({k: decode_file(k, v, "MP4 or WebM", "an MP4 or WebM video", video_suffix) for k, v in body.items()
                   if k in VIDEO_FIELDS and v is not None})
    for name in IMAGE_LIST_FIELDS:
        value = body.get(name)
        if value is not None:
            if not isinstance(value, list):
                raise RequestError(name, f"{name}: expected a list of base64 PNG or JPEG strings, got {type(value).__name__}")
            images[name] = [decode_image(name, v) for v in value]
    fields = {k: v for k, v in body.items() if k not in FILE_FIELDS}
    return fields, images


def decode_image(name: str, text: Any) -> bytes:
    """A base64 PNG/JPEG (optionally a data: URL) -> its bytes; RequestError otherwise."""
    return decode_file(name, text, "PNG or JPEG", "a PNG or JPEG image", image_suffix)


def decode_file(name: str, text: Any, kind: str, what: str, suffix) -> bytes:
    """A base64 `kind` file (optionally a data: URL) that `suffix` recognizes; RequestError otherwise."""
    if not isinstance(text, str):
        raise RequestError(name, f"{name}: expected a base64 {kind} string, got {type(text).__name__}")
    text = _DATA_URL.sub("", text.strip(), count=1)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(name, f"{name}: not valid base64 ({e})") from None
    if suffix(data) is None:
        raise RequestError(name, f"{name}: the decoded bytes are not {what}")
    return data


def image_suffix(data: bytes) -> str | None:
    return next((s for magic, s in IMAGE_FORMATS.items() if data.startswith(magic)), None)


def video_suffix(data: bytes) -> str | None:
    return next((s for at, (magic, s) in VIDEO_FORMATS.items() if data[at : at + len(magic)] == magic), None)


def file_suffix(data: bytes) -> str | None:
    return image_suffix(data) or video_suffix(data)


def materialize(fields: dict[str, Any], images: dict[str, Any], folder: str | os.PathLike) -> GenerationRequest:
    """The GenerationRequest of a parsed body, its images written as files in `folder` (the pipeline reads paths)."""

    def write(name: str, data: bytes) -> str:
        path = Path(folder) / f"{name}.{file_suffix(data)}"
        path.write_bytes(data)
        return str(path)

    paths: dict[str, Any] = {}
    for name, data in images.items():
        paths[name] = [write(f"{name}_{i}", d) for i, d in enumerate(data)] if isinstance(data, list) else write(name, data)
    return GenerationRequest(**fields, **paths)


def api_message(message: str, folder: str | os.PathLike | None = None) -> str:
    """A validation message as an API client reads it: `--last-image` -> `last_image`, no temporary paths."""
    if folder is not None:
        message = re.sub(re.escape(str(folder)) + r"/(\w+)\.(png|jpg|mp4|webm)", r"\1", message)
    for name in FIELDS:
        message = re.sub(re.escape(option_name(name)) + r"(?![\w-])", name, message)
    return message


def error_body(error: WanrtError, folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """The JSON of a 400: {"error": {"field": ..., "message": ...}}."""
    field = error.field if isinstance(error, RequestError) else None
    return {"error": {"field": field, "message": api_message(str(error), folder)}}


def accepted_sizes(manifest: Manifest) -> dict[str, Any]:
    """Frame counts and pixel sizes every DiT engine of the bundle takes (the intersection of their ranges)."""
    stride = manifest.vae.stride
    ranges: dict[str, tuple[int, int]] = {}
    for name in manifest.experts:
        for dim, (lo, hi) in manifest.components[name].signature.dim_ranges.items():
            if dim in ("frames", "height", "width"):
                old = ranges.get(dim, (lo, hi))
                ranges[dim] = (max(old[0], lo), min(old[1], hi))
    out: dict[str, Any] = {"multiple": size_multiple(stride), "frames_rule": f"{stride[0]}k+1"}
    if "frames" in ranges:
        out["frames"] = [(ranges["frames"][0] - 1) * stride[0] + 1, (ranges["frames"][1] - 1) * stride[0] + 1]
    for dim, s in (("height", stride[1]), ("width", stride[2])):
        if dim in ranges:
            out[dim] = [ranges[dim][0] * s, ranges[dim][1] * s]
    return out


def model_card(name: str, manifest: Manifest) -> dict[str, Any]:
    """What `GET /v1/models` says about the served bundle: family, task, defaults, the sizes it takes, the images it needs."""
    task = manifest.task
    images = {
        "image": "required" if task in ("i2v", "flf2v") else "optional" if task == "ti2v" else "not accepted",
        "last_image": "required" if task == "flf2v" else "not accepted",
    }
    return {
        "id": name,
        "object": "model",
        "family": manifest.family,
        "task": task,
        "precision": manifest.precision,
        "experts": manifest.experts,
        "defaults": manifest.sampling.to_dict(),
        "sizes": accepted_sizes(manifest),
        "images": images,
        "loras": [vars(lora) for lora in manifest.loras],
    }
