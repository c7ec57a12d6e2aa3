"""A LightX2V config's sampling numbers are finite and in range at build time, the error naming the file and key.

The ranges are the issue's and the models' own facts, written here independently of
`engines.limits`: 0 <= boundary <= 1, fps > 0, shift > 0, steps >= 1, guidance >= 0, sizes and
frame counts positive; anything else (NaN, infinities, booleans, strings) is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wanrt.engines.defaults import default_sampling
from wanrt.engines.errors import CheckpointError
from wanrt.export.checkpoint.lightx2v_config import read_json, sampling_from_config

# config key -> (SamplingDefaults field, a predicate every accepted value satisfies)
RULES = {
    "infer_steps": ("steps", lambda v: v == int(v) and v >= 1),
    "sample_shift": ("shift", lambda v: v > 0),
    "boundary": ("boundary", lambda v: 0 <= v <= 1),
    "boundary_step_index": ("boundary_step_index", lambda v: v == int(v) and v >= 0),
    "target_video_length": ("frames", lambda v: v == int(v) and v >= 1),
    "target_height": ("height", lambda v: v == int(v) and v >= 1),
    "target_width": ("width", lambda v: v == int(v) and v >= 1),
    "fps": ("fps", lambda v: v == int(v) and v > 0),
}
BASE = default_sampling("wan2.2", "t2v", moe=True)
WHERE = Path("cfg.json")

values = (
    st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**70), 2**70) | st.booleans() | st.text(max_size=3)
    | st.none() | st.sampled_from([0, 1, 0.5, 16, 81, 480, 1e9, -1, 1.5])
)  # fmt: skip


@settings(max_examples=300, deadline=None, derandomize=True)
@given(key=st.sampled_from(sorted(RULES)), value=values)
def test_every_sampling_key_is_checked(key, value):
    field, ok = RULES[key]
    try:
        s = sampling_from_config(BASE, {key: value}, WHERE)
    except CheckpointError as e:
        assert str(e).startswith(f"cfg.json: {key} ") and "expected" in str(e), str(e)
        return
    assert not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and ok(value)
    assert getattr(s, field) == value


@settings(max_examples=150, deadline=None, derandomize=True)
@given(value=values | st.lists(values, max_size=3))
def test_guide_scale_is_finite_and_not_negative(value):
    try:
        s = sampling_from_config(BASE, {"sample_guide_scale": value}, WHERE)
    except CheckpointError as e:
        assert str(e).startswith("cfg.json: sample_guide_scale "), str(e)
        return
    items = value if isinstance(value, list) else [value]
    assert items and all(not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in items)
    assert set(s.guide_scale) == {float(v) for v in items}


@pytest.mark.parametrize("steps", [[], [1000, -1], [1000, 1001], [1000.5], [True], "1000"])
def test_denoising_step_lists_hold_timesteps(steps):
    with pytest.raises(CheckpointError, match=r"cfg\.json: denoising_step_list .*timesteps"):
        sampling_from_config(BASE, {"denoising_step_list": steps}, WHERE)


def test_fps_zero_is_refused_at_build_time_naming_the_key():
    with pytest.raises(CheckpointError, match=r"cfg\.json: fps 0: expected an integer in \[1, "):
        sampling_from_config(BASE, {"fps": 0}, WHERE)


@pytest.mark.parametrize("text", ['{"sample_shift": NaN}', '{"boundary": Infinity}', '{"fps": 1e999}', '{"infer_steps": ' + "9" * 100 + "}"])
def test_non_finite_and_endless_numbers_do_not_parse(tmp_path, text):
    path = tmp_path / "cfg.json"
    path.write_text(text)
    with pytest.raises(CheckpointError, match=str(path)):
        read_json(path, "LightX2V config")


def test_a_valid_config_round_trips(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"infer_steps": 40, "sample_shift": 12.0, "boundary": 0.875, "fps": 16}))
    s = sampling_from_config(BASE, read_json(path), WHERE)
    assert (s.steps, s.shift, s.boundary, s.fps) == (40, 12.0, 0.875, 16)


# ---- misspelled keys ------------------------------------------------------------------------

from difflib import SequenceMatcher  # noqa: E402

from wanrt.export.checkpoint.lightx2v_config import READ_KEYS, lightx2v_keys, misspelled_key_notes  # noqa: E402


def one_edit_misspellings(key: str) -> set[str]:
    """Every string one deletion, one transposition or one doubled letter away from `key`."""
    out = {key[:i] + key[i + 1 :] for i in range(len(key))}
    out |= {key[:i] + key[i + 1] + key[i] + key[i + 2 :] for i in range(len(key) - 1)}
    out |= {key[:i] + key[i] + key[i:] for i in range(len(key))}
    return out - {key}


def test_no_key_of_lightx2vs_own_configs_is_called_misspelled():
    keys = lightx2v_keys()
    assert {"infer_steps", "sample_shift", "cpu_offload", "feature_caching"} <= keys  # the snapshot is real LightX2V
    assert misspelled_key_notes(dict.fromkeys(keys, 1)) == []


@pytest.mark.parametrize("key", [k for k in READ_KEYS if len(k) >= 8])
def test_a_one_edit_misspelling_of_a_read_key_names_the_key(key):
    known = lightx2v_keys() | set(READ_KEYS)
    for typo in sorted(one_edit_misspellings(key) - known):
        (note,) = misspelled_key_notes({typo: 1})
        assert note.startswith(f"{typo!r} is not a LightX2V config key and is ignored; did you mean ")
        suggested = note.rsplit("did you mean ", 1)[1].rstrip("?").strip("'")
        # the suggestion is the key the typo came from, or a read key at least as close to it
        assert suggested == key or SequenceMatcher(None, typo, suggested).ratio() >= SequenceMatcher(None, typo, key).ratio()
