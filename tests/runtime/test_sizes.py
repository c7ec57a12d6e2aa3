"""Official size rules, checked against the worked numbers of wan-architecture.md §2 and its formulas."""

from __future__ import annotations

import pytest

from wanrt.engines.errors import WanrtError
from wanrt.runtime.sizes import VideoGeometry, best_output_size, check_frames, check_latent_range, check_size, i2v_size, size_multiple

WAN21 = (4, 8, 8)
WAN22 = (4, 16, 16)


@pytest.mark.parametrize(
    "frames,h,w,stride,latent,tokens",
    [
        (81, 720, 1280, WAN21, (21, 90, 160), 75_600),
        (81, 480, 832, WAN21, (21, 60, 104), 32_760),
        (121, 704, 1280, WAN22, (31, 44, 80), 27_280),
    ],
)
def test_latent_shapes_and_tokens_from_the_facts(frames, h, w, stride, latent, tokens):
    g = VideoGeometry(frames, h, w, stride)
    assert (g.latent_frames, g.latent_height, g.latent_width) == latent
    assert g.tokens == tokens
    z = 16 if stride == WAN21 else 48
    assert g.latent_shape(z) == (1, z, *latent)


def test_frames_must_be_4k_plus_1():
    for ok in (1, 5, 81, 121):
        assert check_frames(ok) == ok
    for bad, hint in ((80, "77 or 81"), (0, "1 or 5"), (2, "1 or 5"), (-3, "1 or 5")):
        with pytest.raises(WanrtError, match=f"4k\\+1 \\(e.g. {hint}\\)"):
            check_frames(bad)


def test_size_multiples_16_and_32_for_ti2v():
    assert size_multiple(WAN21) == 16 and size_multiple(WAN22) == 32
    assert check_size(480, 832, 16) == (480, 832)
    assert check_size(704, 1280, 32) == (704, 1280)
    with pytest.raises(WanrtError, match="--height 720: .* multiples of 32"):
        check_size(720, 1280, 32)  # 720 = 22.5 * 32: a Wan2.1 size, not a TI2V one
    with pytest.raises(WanrtError, match="--height 100, --width 90: .* multiples of 16 for this model \\(e.g. 96x80\\)"):
        check_size(100, 90, 16)
    with pytest.raises(WanrtError, match="--width 0"):
        check_size(16, 0, 16)


# Worked by hand from the official rule (Wan2.1 `image2video.py`): aspect = h / w,
# lat_h = round(sqrt(A * aspect) // 8 // 2 * 2), lat_w = round(sqrt(A / aspect) // 8 // 2 * 2), size = lat * 8.
I2V_WORKED = [
    # image h x w, max area -> (h, w)
    # 0.5625 is exact: sqrt(921600*0.5625) = 720 -> 90 -> 45 -> 90 (720); sqrt(921600/0.5625) = 1280 -> 160 (1280)
    (720, 1280, 720 * 1280, (720, 1280)),
    # 399360 * (480/832) rounds to 230399.99999999997, whose root 479.99999999999994 -> 59 -> 29 -> 58 (464);
    # sqrt(399360 / (480/832)) = 832.0000000000001 -> 104 -> 52 -> 104 (832): a supported size loses a grid step
    (480, 832, 480 * 832, (464, 832)),
    # sqrt(399360*0.5625) = 473.96 -> 59 -> 29 -> 58 (464); sqrt(399360/0.5625) = 842.60 -> 105 -> 52 -> 104 (832)
    (1080, 1920, 480 * 832, (464, 832)),
    # aspect 4/3: sqrt(1228800) = 1108.51 -> 138 -> 69 -> 138 (1104); sqrt(691200) = 831.38 -> 103 -> 51 -> 102 (816)
    (1000, 750, 720 * 1280, (1104, 816)),
    # aspect 0.6441: sqrt(257228.4) = 507.18 -> 63 -> 31 -> 62 (496); sqrt(620026.6) = 787.42 -> 98 -> 49 -> 98 (784)
    (333, 517, 480 * 832, (496, 784)),
]


@pytest.mark.parametrize("img_h,img_w,area,expected", I2V_WORKED)
def test_i2v_size_follows_area_and_aspect(img_h, img_w, area, expected):
    h, w = i2v_size(img_h, img_w, area, WAN21)
    assert (h, w) == expected
    assert h % 16 == 0 and w % 16 == 0 and h * w <= area


def test_i2v_size_too_small_area_is_an_error():
    with pytest.raises(WanrtError, match="use a larger --height/--width"):
        i2v_size(10, 1000, 16 * 16, WAN21)


def test_best_output_size_worked_examples():
    # 16:9 at the TI2V area 704*1280: width-first candidate (1248, 704) is closer in aspect than (1280, 704)
    assert best_output_size(1920, 1080, 32, 32, 704 * 1280) == (1248, 704)
    assert best_output_size(1280, 704, 32, 32, 704 * 1280) == (1280, 704)
    assert best_output_size(704, 1280, 32, 32, 704 * 1280) == (704, 1280)
    for w, h in ((1000, 1000), (640, 480), (300, 1200)):
        ow, oh = best_output_size(w, h, 32, 32, 704 * 1280)
        assert ow % 32 == 0 and oh % 32 == 0 and ow * oh <= 704 * 1280
    with pytest.raises(WanrtError, match="no 32x32-aligned size"):
        best_output_size(4000, 10, 32, 32, 32 * 32)


def test_latent_range_errors_name_pixels_and_component():
    ranges = {"frames": (1, 31), "height": (2, 192), "width": (2, 192)}
    check_latent_range("dit", VideoGeometry(121, 1536, 1536, WAN21), ranges)
    with pytest.raises(WanrtError, match="125 frames \\(32 latent frames\\); the engine takes 1..121 .*'dit_low_noise'"):
        check_latent_range("dit_low_noise", VideoGeometry(125, 480, 832, WAN21), ranges)
    with pytest.raises(WanrtError, match="height 1552 px \\(194 latent\\); the engine takes 16..1536 px"):
        check_latent_range("dit", VideoGeometry(5, 1552, 832, WAN21), ranges)
