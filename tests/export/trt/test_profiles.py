"""Optimization profiles from `--sizes/--frames/--batch/--static`, hand-worked through the Wan latent rules.

The rules (wan-architecture.md §2, runtime/sizes.py): latent frames = (F-1)/4+1, latent rows =
H/8 (Wan2.1 VAE) or H/16 (Wan2.2's 16x VAE); sizes are multiples of 16 (32); 480p is 480x832
and 832x480, 720p 720x1280 and 1280x720; the first size and frame count are opt.  Every
expected shape below was worked out by hand from those rules, not taken from the code.
"""

from __future__ import annotations

import pytest

from wanrt.engines.errors import WanrtError
from wanrt.engines.signatures import dit_signature, image_encoder_signature, text_encoder_signature
from wanrt.engines.vae_contract import CacheSpec, VAEChunkContract
from wanrt.export.trt.profiles import named_dims, profile_shapes, shape_request

WAN21 = (4, 8, 8)
WAN22_5B = (4, 16, 16)
DIT = dit_signature(16, 16, 64)
TEXT = text_encoder_signature(64)
VAE_DECODER = VAEChunkContract("decoder", "2.1", 16, 8, 4, (CacheSpec(16, 2, 1), CacheSpec(32, 2, 2))).signature()


def shapes(kind, signature, stride=WAN21, sizes="480p", frames="81", batch="1-2", static=None, cfg=True, task="t2v",
           default=(480, 832)):  # fmt: skip
    request = shape_request(stride, sizes, frames, batch, static, default, 81)
    dims = named_dims(kind, request, stride, signature, cfg=cfg, task=task)
    return profile_shapes(kind, signature, dims, stride).shapes


def test_480p_81_frames_dit_takes_both_orientations_opt_first():
    got = shapes("dit", DIT)
    # 81 frames -> 21 latent; 480x832 -> 60x104, 832x480 -> 104x60; opt batch 2 (CFG in one call)
    assert got["latent"] == ((1, 16, 21, 60, 60), (2, 16, 21, 60, 104), (2, 16, 21, 104, 104))
    assert got["timestep"] == ((1,), (2,), (2,))
    assert got["context"] == ((1, 512, 64), (2, 512, 64), (2, 512, 64))


def test_vace_dit_has_room_for_reference_frames_and_takes_its_control_latents():
    vace = dit_signature(16, 16, 64, vace_in_dim=96, vace_blocks=8)
    got = shapes("dit", vace, task="vace")
    # 81 frames -> 21 latent frames, and up to 3 reference images' frames in front: max 24
    assert got["latent"] == ((1, 16, 21, 60, 60), (2, 16, 21, 60, 104), (2, 16, 24, 104, 104))
    assert got["vace_context"] == ((1, 96, 21, 60, 60), (2, 96, 21, 60, 104), (2, 96, 24, 104, 104))
    assert got["context_scale"] == ((1, 8), (2, 8), (2, 8))
    assert shapes("dit", vace, task="vace", sizes=None, frames=None, static="832x480x81")["latent"][2][2] == 21  # exact


def test_two_sizes_and_two_frame_counts_span_min_to_max():
    got = shapes("dit", DIT, sizes="720p,480p", frames="81,17")
    # 720p: 90x160 and 160x90; 480p: 60x104 and 104x60; 17 frames -> 5 latent frames; opt = 720x1280 at 81 frames
    assert got["latent"] == ((1, 16, 5, 60, 60), (2, 16, 21, 90, 160), (2, 16, 21, 160, 160))


def test_explicit_size_is_width_by_height():
    got = shapes("dit", DIT, sizes="1024x576")
    assert got["latent"][1] == (2, 16, 21, 72, 128)


def test_without_cfg_the_opt_batch_is_one():
    assert shapes("dit", DIT, cfg=False)["latent"][1][0] == 1
    assert shapes("text_encoder", TEXT, cfg=False)["input_ids"] == ((1, 1), (1, 512), (2, 512))


def test_text_encoder_length_is_fixed_at_512():
    got = shapes("text_encoder", TEXT)
    assert got["input_ids"] == got["attention_mask"] == ((1, 1), (2, 512), (2, 512))


def test_wan22_16x_vae_floors_720p_to_704():
    # multiple 32: 720p -> 704x1280 (the official TI2V-5B size) and 1280x704; latent 44x80 / 80x44; 121 frames -> 31
    got = shapes("dit", DIT, stride=WAN22_5B, sizes="720p", frames="121")
    assert got["latent"] == ((1, 16, 31, 44, 44), (2, 16, 31, 44, 80), (2, 16, 31, 80, 80))


def test_vae_chunks_take_edge_tiles_and_scaled_caches():
    got = shapes("vae_decoder", VAE_DECODER)
    # one latent frame per call; the least size is the signature's (2: --vae-tiling edge tiles); cache 1 is at 2x
    assert got["latent"] == ((1, 16, 1, 2, 2), (1, 16, 1, 60, 104), (1, 16, 1, 104, 104))
    assert got["cache_in_01"] == ((1, 32, 2, 4, 4), (1, 32, 2, 120, 208), (1, 32, 2, 208, 208))
    assert "first" not in got  # a static input needs no profile entry


def test_image_encoder_batch_per_task():
    clip = image_encoder_signature()
    assert shapes("image_encoder", clip, task="i2v")["pixel_values"][2][0] == 1
    assert shapes("image_encoder", clip, task="flf2v")["pixel_values"] == ((1, 3, 224, 224), (2, 3, 224, 224), (2, 3, 224, 224))


def test_static_is_one_exact_shape():
    request_args = dict(sizes=None, frames=None, static="832x480x81")
    dit = shapes("dit", DIT, **request_args)
    assert dit["latent"] == ((2, 16, 21, 60, 104),) * 3
    assert shapes("vae_decoder", VAE_DECODER, **request_args)["latent"] == ((1, 16, 1, 60, 104),) * 3
    assert shapes("text_encoder", TEXT, **request_args)["input_ids"] == ((2, 1), (2, 512), (2, 512))


def test_default_size_is_the_models_preset_in_both_orientations():
    got = shapes("dit", DIT, sizes=None, frames=None, default=(720, 1280))
    assert got["latent"] == ((1, 16, 21, 90, 90), (2, 16, 21, 90, 160), (2, 16, 21, 160, 160))
    ti2v = shapes("dit", DIT, stride=WAN22_5B, sizes=None, frames=None, default=(704, 1280))
    assert ti2v["latent"][0][3:] == (44, 44) and ti2v["latent"][2][3:] == (80, 80)


@pytest.mark.parametrize("kwargs, message", [
    (dict(frames="80"), "--frames 80: the frame count must be 4k+1 (e.g. 77 or 81)"),
    (dict(sizes="100x100"), "--sizes 100x100: width and height must be multiples of 16"),
    (dict(sizes="832"), "expected 480p, 720p or WIDTHxHEIGHT"),
    (dict(sizes="720p", stride=WAN22_5B, frames="81"), None),  # fine: floored to 704
    (dict(sizes="720x720", stride=WAN22_5B), "multiples of 32"),
    (dict(batch="2-1"), "--batch '2-1': the largest batch is below the smallest"),
    (dict(batch="0-2"), "--batch: 0 must be at least 1"),
    (dict(static="832x480", sizes=None, frames=None), "expected WIDTHxHEIGHTxFRAMES"),
    (dict(static="832x480x81", frames="81", sizes=None), "--static gives the one size and frame count"),
    (dict(frames="125"), "dit: 125 frames (32 latent frames) are outside the 1..121 its graph takes"),
    (dict(sizes="2048x2048"), "dit: height 2048 px (latent 256) is outside the 16..1536 px"),
])  # fmt: skip
def test_bad_requests_name_the_option(kwargs, message):
    if message is None:
        shapes("dit", DIT, **kwargs)
        return
    with pytest.raises(WanrtError) as info:  # ProfileError, or runtime.sizes' frame-count error
        shapes("dit", DIT, **kwargs)
    assert message in str(info.value)
