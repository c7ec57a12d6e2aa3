"""The HTTP API's JSON, without a server: bodies -> requests, messages, the model card against what `prepare` accepts."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.runtime.serve.servers import b64, png_bytes
from wanrt.engines.manifest import read_manifest
from wanrt.runtime.pipeline import GenerationRequest, WanPipeline
from wanrt.runtime.request import RequestError
from wanrt.runtime.serve.api import accepted_sizes, api_message, error_body, materialize, model_card, parse_body


def test_a_body_becomes_fields_and_decoded_images():
    png = png_bytes(3)
    fields, images = parse_body(f'{{"prompt": "a cat", "seed": 4, "image": "{b64(png)}", "last_image": null}}'.encode())
    assert fields == {"prompt": "a cat", "seed": 4} and images == {"image": png}
    _, images = parse_body(f'{{"prompt": "a cat", "image": "data:image/png;base64,{b64(png)}"}}'.encode())
    assert images["image"] == png  # a data: URL is accepted too


def test_reference_images_arrive_as_a_list_of_files(tmp_path):
    """VACE's ref_images: a list of base64 images, each written to its own file, in order."""
    a, b = png_bytes(3), png_bytes(5)
    fields, images = parse_body(f'{{"prompt": "a cat", "context_scale": 0.5, "ref_images": ["{b64(a)}", "{b64(b)}"]}}'.encode())
    request = materialize(fields, images, tmp_path)
    assert request.context_scale == 0.5 and [open(p, "rb").read() for p in request.ref_images] == [a, b]


def test_control_video_and_mask_arrive_as_files(tmp_path):
    """VACE's video / mask: base64 MP4 (or WebM) bytes, written as files the pipeline reads."""
    mp4 = b"\x00\x00\x00\x18ftypisom" + bytes(16)
    fields, files = parse_body(f'{{"prompt": "a cat", "video": "data:video/mp4;base64,{b64(mp4)}", "mask": "{b64(mp4)}"}}'.encode())
    request = materialize(fields, files, tmp_path)
    assert request.video == str(tmp_path / "video.mp4") and open(request.video, "rb").read() == mp4
    assert request.mask == str(tmp_path / "mask.mp4")


def test_animate_videos_arrive_as_files(tmp_path):
    """Animate's pose / face (/ background / mask) videos: uploaded files, written where the pipeline reads them."""
    mp4 = b"\x00\x00\x00\x18ftypisom" + bytes(16)
    names = ("pose_video", "face_video", "background_video", "mask_video")
    body = {"prompt": "a dancer", **{n: b64(mp4) for n in names}}
    fields, files = parse_body(json.dumps(body).encode())
    request = materialize(fields, files, tmp_path)
    for name in names:
        assert getattr(request, name) == str(tmp_path / f"{name}.mp4") and open(getattr(request, name), "rb").read() == mp4


@pytest.mark.parametrize("raw, field, message", [
    (b"{", "body", "not valid JSON"),
    (b'{"prompt": "x", "guidance": Infinity}', "body", "Infinity is not a JSON number"),
    (b'"a cat"', "body", "expected a JSON object"),
    (b'{"prompt": "x", "promt": "y"}', "promt", "unknown field 'promt'"),
    (b'{"image": null}', "prompt", "prompt is required"),
    (b'{"prompt": "x", "image": 5}', "image", "expected a base64 PNG or JPEG string, got int"),
    (b'{"prompt": "x", "last_image": "@@@@"}', "last_image", "not valid base64"),
    (('{"prompt": "x", "image": "%s"}' % base64.b64encode(b"BM a bitmap").decode()).encode(), "image", "not a PNG or JPEG"),
    (b'{"prompt": "x", "video": "L2V0Yy9wYXNzd2Q="}', "video", "not an MP4 or WebM video"),  # a path is never read
    (b'{"prompt": "x", "mask": 3}', "mask", "expected a base64 MP4 or WebM string, got int"),
    (b'{"prompt": "x", "pose_video": "/etc/passwd"}', "pose_video", "not valid base64|not an MP4 or WebM"),  # no paths
    (b'{"prompt": "x", "face_video": "L2V0Yy9wYXNzd2Q="}', "face_video", "not an MP4 or WebM video"),
    (b'{"prompt": "x", "background_video": 1}', "background_video", "expected a base64 MP4 or WebM string"),
    (b'{"prompt": "x", "mask_video": "L2V0Yy9wYXNzd2Q="}', "mask_video", "not an MP4 or WebM video"),
    (b'{"prompt": "x", "ref_images": "@@@@"}', "ref_images", "expected a list of base64"),
    (b'{"prompt": "x", "ref_images": ["@@@@"]}', "ref_images", "not valid base64"),
])  # fmt: skip
def test_a_bad_body_names_its_field(raw, field, message):
    with pytest.raises(RequestError, match=message) as e:
        parse_body(raw)
    assert e.value.field == field


def test_a_materialized_request_plans_like_the_same_request_from_files(bundle_factory, tmp_path):
    bundle = bundle_factory("wan21_i2v", family="wan2.1", task="i2v", moe=False, clip_tokens=257)
    pipe = WanPipeline(bundle, read_manifest(bundle), None)  # planning needs no backend
    png = png_bytes(5, 36, 60)
    (tmp_path / "first.png").write_bytes(png)
    direct = pipe.prepare(GenerationRequest(prompt="a cat", image=tmp_path / "first.png", seed=2))
    (tmp_path / "api").mkdir()
    served = pipe.prepare(materialize({"prompt": "a cat", "seed": 2}, {"image": png}, tmp_path / "api"))
    assert served.geometry == direct.geometry and served.summary() == direct.summary()
    assert np.array_equal(served.condition_image, direct.condition_image)
    with pytest.raises(RuntimeError, match="without a backend"):
        pipe.generate(served)


def test_messages_use_the_api_field_names_and_hide_temporary_paths(tmp_path):
    assert api_message("--last-image is only for flf2v bundles") == "last_image is only for flf2v bundles"
    assert api_message("give both --height and --width (their product ...)") == "give both height and width (their product ...)"
    assert api_message("--negative-prompt has no effect; --vae-tiling-x stays") == "negative_prompt has no effect; --vae-tiling-x stays"
    message = f"{tmp_path}/image.png: unreadable image (cannot identify image file '{tmp_path}/image.png')"
    assert api_message(message, tmp_path) == "image: unreadable image (cannot identify image file 'image')"
    body = error_body(RequestError("frames", "--frames 0: the frame count must be 4k+1"))
    assert body == {"error": {"field": "frames", "message": "frames 0: the frame count must be 4k+1"}}


@pytest.mark.parametrize("tag, kw", [("moe_t2v", {}), ("wan21_i2v", dict(family="wan2.1", task="i2v", moe=False, clip_tokens=257))])
def test_the_model_card_sizes_are_what_prepare_accepts(bundle_factory, tag, kw, tmp_path):
    """At each edge of the advertised ranges prepare accepts the size, one multiple beyond it refuses it."""
    bundle = bundle_factory(tag, **kw)
    manifest = read_manifest(bundle)
    pipe = WanPipeline(bundle, manifest, None)
    card = model_card("tiny", manifest)
    sizes = card["sizes"]
    assert card["task"] == manifest.task and card["defaults"] == manifest.sampling.to_dict()
    if manifest.task == "i2v":
        assert card["images"] == {"image": "required", "last_image": "not accepted"}
        return  # an image's aspect ratio sets the size; the t2v case below checks the ranges
    assert card["images"] == {"image": "not accepted", "last_image": "not accepted"}
    step = {"frames": 4, "height": sizes["multiple"], "width": sizes["multiple"]}
    for dim in ("frames", "height", "width"):
        lo, hi = sizes[dim]
        for value in (lo, hi):
            pipe.prepare(GenerationRequest(prompt="x", **{dim: value}))
        for value in (lo - step[dim], hi + step[dim]):
            with pytest.raises(RequestError) as e:
                pipe.prepare(GenerationRequest(prompt="x", **{dim: value}))
            assert e.value.field == dim
    assert accepted_sizes(manifest) == sizes
