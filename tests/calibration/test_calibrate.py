"""Calibration options and range collection (the methods as the issue defines them: max = running amax of |x|,
percentile = the P-th percentile of |x|; here per call, the max over calls)."""

from __future__ import annotations

import numpy as np
import pytest

from wanrt.calibration.calibrate import CalibrationError, CalibrationOptions, RangeObserver, calibration_image, parse_size


def test_max_keeps_the_running_max_per_layer():
    obs = RangeObserver({"amax_a": ["q", "k"], "amax_b": ["o"]})
    obs.update({"amax_a": np.float32(2.5), "amax_b": np.float32(0.5)})
    obs.update({"amax_a": np.float32(1.0), "amax_b": np.float32(3.0)})
    assert obs.amax == {"q": 2.5, "k": 2.5, "o": 3.0} and obs.calls == 2


def test_percentile_clips_each_call_then_keeps_the_max():
    rng = np.random.default_rng(0)
    calls = [rng.standard_normal((2, 50, 8)).astype(np.float32) * s for s in (1.0, 3.0, 0.5)]
    calls[0][0, 0, 0] = 1e3  # one outlier: clipped away by the 99th percentile
    obs = RangeObserver({"x": ["ffn.0"]}, percentile=99.0)
    for x in calls:
        obs.update({"x": x})
    want = max(np.percentile(np.abs(x), 99.0) for x in calls)
    assert obs.amax["ffn.0"] == pytest.approx(want, rel=1e-6) and want < 20


def test_a_non_finite_range_is_an_error():
    with pytest.raises(CalibrationError, match="overflows"):
        RangeObserver({"x": ["blocks.0.ffn.2"]}).update({"x": np.float32(np.inf)})


@pytest.mark.parametrize("text, want", [("832x480", (832, 480, 5)), ("64X64x9", (64, 64, 9))])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["832", "axb", "0x64", "64x64x0", "1x2x3x4"])
def test_bad_sizes(text):
    with pytest.raises(CalibrationError, match="--calib-size"):
        parse_size(text)


@pytest.mark.parametrize("opts, needle", [
    (CalibrationOptions(method="entropy"), "--calib-method 'entropy'"),
    (CalibrationOptions(method="percentile", percentile=0.0), "(0, 100]"),
    (CalibrationOptions(method="percentile", percentile=100.01), "(0, 100]"),
    (CalibrationOptions(percentile=99.0), "needs --calib-method percentile"),
    (CalibrationOptions(steps=0), "--calib-steps 0"),
])
def test_bad_options(opts, needle):
    with pytest.raises(CalibrationError, match=None) as e:
        opts.check()
    assert needle in str(e.value)


def test_percentile_100_is_the_max_and_the_default_is_99_99():
    CalibrationOptions(method="percentile", percentile=100.0).check()
    assert CalibrationOptions(method="percentile").clip_percentile == 99.99
    assert CalibrationOptions().clip_percentile is None


def test_calibration_images_are_seeded(tmp_path):
    from PIL import Image

    a = np.asarray(Image.open(calibration_image(tmp_path / "a.png", 3, 40, 24)))
    b = np.asarray(Image.open(calibration_image(tmp_path / "b.png", 3, 40, 24)))
    c = np.asarray(Image.open(calibration_image(tmp_path / "c.png", 4, 40, 24)))
    assert a.shape == (24, 40, 3) and (a == b).all() and not (a == c).all()
