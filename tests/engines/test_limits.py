"""Sampling numbers are finite and in range wherever they enter: run's options, a request, a bundle's manifest.

The expectations are the issue's (finite guidance and shift, a positive memory budget, a
non-negative seed, 0 <= boundary <= 1, fps > 0), stated here rather than read from the table.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli import cli
from wanrt.engines.errors import BundleError
from wanrt.engines.manifest import MANIFEST_NAME, read_manifest
from wanrt.runtime.request import GenerationRequest, RequestError, check_fields

from .conftest import make_small_bundle

NON_FINITE = ["nan", "inf", "-inf", "NaN", "Infinity"]


@pytest.mark.parametrize("option", ["--guidance", "--shift", "--vram-budget", "--memory-budget"])
@pytest.mark.parametrize("value", NON_FINITE + ["-1"])
def test_run_refuses_non_finite_or_negative_numbers_before_any_work(tmp_path, option, value):
    r = CliRunner().invoke(cli, ["run", str(tmp_path), "--prompt", "x", "-o", str(tmp_path / "o.mp4"), option, value])
    assert r.exit_code == 2 and f"'{option}'" in r.output and "expected" in r.output, r.output
    assert not (tmp_path / "o.mp4").exists()


def test_serve_refuses_a_non_finite_budget(tmp_path):
    r = CliRunner().invoke(cli, ["serve", str(tmp_path), "--vram-budget", "nan"])
    assert r.exit_code == 2 and "'--vram-budget'" in r.output, r.output


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    field=st.sampled_from(["guidance", "shift", "steps", "frames", "height", "width", "seed"]),
    value=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**70), 2**70),
)
def test_request_numbers_are_finite_and_in_range(field, value):
    request = GenerationRequest(prompt="x", **{field: value})
    try:
        check_fields(request)
    except RequestError as e:
        assert e.field == field and str(e).startswith(f"--{field} "), str(e)
        return
    assert math.isfinite(value)
    if field in ("steps", "frames", "height", "width"):
        assert isinstance(value, int) and value >= 1
    if field == "seed":
        assert isinstance(value, int) and 0 <= value < 2**64
    if field == "shift":
        assert value > 0
    if field == "guidance":
        assert value >= 0


@pytest.mark.parametrize("field, value", [
    ("boundary", 1.5), ("boundary", -0.1), ("fps", 0), ("shift", 0), ("steps", 0), ("frames", 10**9),
    ("guide_scale", [5.0, -1.0]), ("denoising_step_list", [1000, 2000]),
])  # fmt: skip
def test_a_bundle_with_sampling_out_of_range_is_refused_at_load(tmp_path, field, value):
    make_small_bundle(tmp_path)
    path = tmp_path / MANIFEST_NAME
    d = json.loads(path.read_text())
    d["sampling"][field] = value
    path.write_text(json.dumps(d))
    with pytest.raises(BundleError, match=rf"sampling\.{field}: expected .*got"):
        read_manifest(tmp_path)


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(boundary=st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_bundle_boundary_accepted_exactly_in_zero_one(tmp_path_factory, boundary):
    root = tmp_path_factory.mktemp("b")
    make_small_bundle(root)
    path = root / MANIFEST_NAME
    d = json.loads(path.read_text())
    d["sampling"]["boundary"] = boundary
    path.write_text(json.dumps(d))
    if 0 <= boundary <= 1:
        assert read_manifest(root).sampling.boundary == boundary
    else:
        with pytest.raises(BundleError, match="sampling.boundary"):
            read_manifest(root)
