"""The one validation of a request (`WanPipeline.prepare`): every error about the request names its field."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from wanrt.engines.manifest import read_manifest
from wanrt.runtime.pipeline import GenerationRequest, WanPipeline
from wanrt.runtime.request import RequestError, check_fields, field_named, option_name


def test_option_names_and_the_field_a_message_names_first():
    assert option_name("last_image") == "--last-image" and option_name("prompt") == "--prompt"
    assert option_name("ref_images") == "--ref-image"  # given once per image
    assert field_named("--height 40, --width 60: must be multiples of 16", ("height", "width")) == "height"
    assert field_named("--width 60: height and width must be multiples", ("height", "width")) == "width"  # options first
    assert field_named("17 frames (5 latent frames); the engine takes 1..9", ("frames", "height", "width")) == "frames"
    assert field_named("width 4096 px (512 latent); the engine takes 16..1536 px", ("frames", "height", "width")) == "width"
    assert field_named("--last-image is only for flf2v", ("image", "last_image")) == "last_image"
    assert field_named("something else", ("sampler", "steps")) == "sampler"


@pytest.mark.parametrize("kw, field, message", [
    (dict(prompt=None), "prompt", "--prompt None: expected a string"),
    (dict(frames=True), "frames", "--frames True: expected an integer"),
    (dict(steps=4.0), "steps", "--steps 4.0: expected an integer"),
    (dict(guidance="5"), "guidance", "--guidance '5': expected a number"),
    (dict(shift=math.nan), "shift", "--shift nan: expected a finite number"),
    (dict(guidance=-math.inf), "guidance", "--guidance -inf: expected a finite number"),
    (dict(sampler="ddim"), "sampler", "--sampler 'ddim': expected one of unipc, euler, distill"),
    (dict(image=3), "image", "--image 3: expected a string or a path"),
    (dict(vae_tiling=None), "vae_tiling", "--vae-tiling None: expected true or false"),
    (dict(context_scale=-0.5), "context_scale", "--context-scale -0.5: expected a finite number in [0, 10]"),
    (dict(ref_images="a.png"), "ref_images", "--ref-image 'a.png': expected a list of paths"),
    (dict(ref_images=["a.png", 3]), "ref_images", "--ref-image ['a.png', 3]: expected a list of image paths"),
])  # fmt: skip
def test_field_types_and_values_that_need_no_bundle(kw, field, message):
    with pytest.raises(RequestError) as e:
        check_fields(GenerationRequest(**{"prompt": "x", **kw}))
    assert e.value.field == field and str(e.value).startswith(message), str(e.value)


def test_numbers_of_the_right_kind_pass():
    check_fields(GenerationRequest(prompt="x", guidance=5, shift=3.0, steps=4, seed=2**63, sampler="euler", vae_tiling=True))


@pytest.fixture(scope="module")
def t2v(bundle_factory):
    bundle = bundle_factory("moe_t2v")
    return WanPipeline(bundle, read_manifest(bundle), None)


@pytest.fixture(scope="module")
def i2v(bundle_factory, tmp_path_factory):
    bundle = bundle_factory("wan21_i2v", family="wan2.1", task="i2v", moe=False, clip_tokens=257)
    folder = tmp_path_factory.mktemp("request_images")
    Image.new("RGB", (56, 40), (200, 30, 30)).save(folder / "ok.png")
    Image.new("RGB", (4000, 2), (200, 30, 30)).save(folder / "thin.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return WanPipeline(bundle, read_manifest(bundle), None), folder


@pytest.mark.parametrize("kw, field, message", [
    (dict(prompt=" "), "prompt", "--prompt is empty"),
    (dict(frames=0), "frames", "--frames 0: expected an integer in \\[1, 1001\\]"),
    (dict(frames=6), "frames", "--frames 6: the frame count must be 4k\\+1"),
    (dict(frames=125), "frames", "125 frames \\(32 latent frames\\); the engine takes 1..121"),
    (dict(height=40), "height", "--height 40: height and width must be positive multiples of 16"),
    (dict(width=8), "width", "--width 8: "),
    (dict(height=1552), "height", "height 1552 px \\(194 latent\\); the engine takes 16..1536 px"),
    (dict(steps=0), "steps", "--steps 0: expected an integer in \\[1, 1000\\]"),
    (dict(sampler="distill"), "sampler", "this bundle has no denoising_step_list"),
    (dict(seed=2**64), "seed", "--seed 18446744073709551616: expected an integer in \\[0, 2\\*\\*64 - 1\\]"),
    (dict(image="x.png"), "image", "text-to-video model .*; it takes no --image"),
    (dict(last_image="x.png"), "last_image", "text-to-video model"),
    (dict(video="x.mp4"), "video", "--video is only for VACE bundles; this one is wan2.2 t2v"),
    (dict(ref_images=["x.png"]), "ref_images", "--ref-image is only for VACE bundles"),
    (dict(context_scale=0.5), "context_scale", "--context-scale is only for VACE bundles"),
])  # fmt: skip
def test_t2v_request_errors_name_their_field(t2v, kw, field, message):
    with pytest.raises(RequestError, match=message) as e:
        t2v.prepare(GenerationRequest(**{"prompt": "a cat", **kw}))
    assert e.value.field == field


@pytest.mark.parametrize("image, kw, field, message", [
    (None, {}, "image", "this bundle is an i2v model; --image is required"),
    ("missing.png", {}, "image", "missing.png: image not found"),
    ("broken.png", {}, "image", "broken.png: unreadable image"),
    ("thin.png", {}, "image", "image 4000x2 with max area"),
    ("ok.png", dict(height=64), "width", "give both --height and --width"),
    ("ok.png", dict(width=64), "height", "give both --height and --width"),
    ("ok.png", dict(height=4096, width=4096), "height", "px \\(\\d+ latent\\); the engine takes 16..1536 px"),
    ("ok.png", dict(last_image="ok.png"), "last_image", "--last-image is only for flf2v bundles; this one is i2v"),
])  # fmt: skip
def test_i2v_request_errors_name_their_field(i2v, image, kw, field, message):
    pipe, folder = i2v
    with pytest.raises(RequestError, match=message) as e:
        pipe.prepare(GenerationRequest(prompt="a cat", image=folder / image if image else None, **kw))
    assert e.value.field == field


def test_run_prints_the_same_message_as_the_api_sees(bundle_factory, tmp_path):
    """`run` and `prepare` are one validation: the CLI shows the RequestError's message on its one error line."""
    from click.testing import CliRunner

    from cli import cli

    bundle = bundle_factory("moe_t2v")
    result = CliRunner().invoke(cli, ["run", str(bundle), "--prompt", "a cat", "--frames", "6", "-o", str(tmp_path / "x.mp4")])
    with pytest.raises(RequestError) as e:
        WanPipeline(bundle, read_manifest(bundle), None).prepare(GenerationRequest(prompt="a cat", frames=6))
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {e.value}"
