"""Hostile checkpoint headers: the safetensors and `.pth` readers raise CheckpointError and nothing else, fast.

The named cases are the ones a robustness audit found (each crashed or hung before); the fuzz
tests generate many more (hypothesis, seeded by its database-free default: `derandomize`).
A header that is accepted must also be self-consistent: every tensor's byte span matches its
dtype and shape and lies inside the file.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wanrt.engines.errors import CheckpointError
from wanrt.export.checkpoint.pth import PthTensorInfo, read_pth_header
from wanrt.export.checkpoint.safetensors_file import ITEMSIZE, SafetensorsFile

QUICK = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
LONG = settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])

ITEMSIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "F8_E4M3": 1}  # the format spec


def safetensors_bytes(header_json: bytes, data_size: int = 64) -> bytes:
    """A file in the safetensors layout (spec: u64 little-endian header length, JSON header, data)."""
    return struct.pack("<Q", len(header_json)) + header_json + b"\0" * data_size


def read_or_error(tmp_path, blob: bytes, name: str = "x.safetensors"):
    path = tmp_path / name
    path.write_bytes(blob)
    try:
        return SafetensorsFile(path)
    except CheckpointError as e:
        message = str(e)
        assert message.startswith(str(path)) and "\n" not in message and len(message) < 600, message
        return None


def assert_consistent(f: SafetensorsFile, file_size: int) -> None:
    for h in f.tensors.values():
        assert 0 <= h.begin <= h.end <= file_size
        assert h.end - h.begin == math.prod(h.shape) * ITEMSIZE[h.dtype]


# ---- the audit's cases ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, expected",
    [
        ({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, "unknown dtype"),
        ({"w": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}}, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [10**18] * 10, "data_offsets": [0, 4]}}, "needs more than"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "invalid shape"),
        ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "invalid shape"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, "invalid data_offsets"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": {"a": 0, "b": 4}}}, "invalid data_offsets"),
        ({"w": ["F32", [1], [0, 4]]}, "lacks dtype/shape/data_offsets"),
        ({"__metadata__": {"a": 1}}, "__metadata__ must be an object of strings"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_malformed_entries_are_one_precise_error(tmp_path, header, expected):
    with pytest.raises(CheckpointError, match=expected):
        SafetensorsFile(_write(tmp_path, json.dumps(header).encode()))


def _write(tmp_path, header_json: bytes, data_size: int = 64):
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(header_json, data_size))
    return path


def test_deep_nesting_long_numbers_and_non_finite_values_are_refused(tmp_path):
    deep = b"[" * 1000 + b"]" * 1000
    with pytest.raises(CheckpointError, match="nested deeper"):
        SafetensorsFile(_write(tmp_path, b'{"w": ' + deep + b"}"))
    long_int = b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'
    with pytest.raises(CheckpointError, match="longer than 20 characters") as e:
        SafetensorsFile(_write(tmp_path, long_int))
    assert len(str(e.value)) < 300  # the literal is abbreviated in the message
    with pytest.raises(CheckpointError, match="NaN is not a JSON number"):
        SafetensorsFile(_write(tmp_path, b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'))
    with pytest.raises(CheckpointError, match="appears twice"):
        SafetensorsFile(_write(tmp_path, b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {}}'))


def test_a_2mb_header_with_a_million_dims_is_refused_by_its_rank(tmp_path):
    dims = b",".join([b"1"] * 1_000_000)
    header = b'{"w": {"dtype": "F32", "shape": [' + dims + b'], "data_offsets": [0, 4]}}'
    assert len(header) > 2_000_000
    with pytest.raises(CheckpointError, match="at most 16 sizes"):
        SafetensorsFile(_write(tmp_path, header))


def test_a_header_length_over_the_limit_or_past_the_file_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(CheckpointError, match="runs past the end of the file"):
        SafetensorsFile(path)


# ---- generated headers ----------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20)
dtypes = st.sampled_from(list(ITEMSIZES)) | st.text(max_size=5) | json_values
dims = st.integers(0, 8) | st.integers(-(2**65), 2**65) | json_scalars
entries = st.fixed_dictionaries(
    {"dtype": dtypes, "shape": st.lists(dims, max_size=20) | json_values, "data_offsets": st.lists(st.integers(-8, 300), max_size=3) | json_values}
)
headers = st.dictionaries(st.text(max_size=10), entries | json_values, max_size=5)


def _check_generated(tmp_path, header, data_size):
    blob = safetensors_bytes(json.dumps(header).encode(), data_size)
    f = read_or_error(tmp_path, blob)
    if f is not None:
        assert_consistent(f, len(blob))


@QUICK
@given(header=headers, data_size=st.integers(0, 256))
def test_generated_headers_give_a_consistent_file_or_a_checkpoint_error(tmp_path, header, data_size):
    _check_generated(tmp_path, header, data_size)


@pytest.mark.slow
@LONG
@given(header=headers, data_size=st.integers(0, 256))
def test_generated_headers_long_run(tmp_path, header, data_size):
    _check_generated(tmp_path, header, data_size)


def valid_file_bytes() -> bytes:
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    }
    return safetensors_bytes(json.dumps(header).encode(), 32)


@QUICK
@given(edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=8), cut=st.integers(0, 300))
def test_mutated_real_files_give_a_consistent_file_or_a_checkpoint_error(tmp_path, edits, cut):
    blob = bytearray(valid_file_bytes())
    for position, byte in edits:
        if position < len(blob):
            blob[position] = byte
    blob = bytes(blob[: max(cut, 1)]) if cut < len(blob) else bytes(blob)
    f = read_or_error(tmp_path, blob)
    if f is not None:
        assert_consistent(f, len(blob))


# ---- .pth -------------------------------------------------------------------------------------


def pth_bytes(state: dict) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def with_pickle(blob: bytes, edit) -> bytes:
    """The zip `blob` with its data.pkl replaced by edit(data.pkl)."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        items = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in items if n.endswith("data.pkl"))
    items[pkl] = edit(items[pkl])
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in items.items():
            z.writestr(name, data)
    return out.getvalue()


def read_pth_or_error(tmp_path, blob: bytes):
    path = tmp_path / "x.pth"
    path.write_bytes(blob)
    try:
        return read_pth_header(path)
    except CheckpointError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e), str(e)
        return None


def test_pth_negative_shape_and_unknown_storage_name_the_file(tmp_path):
    import torch

    blob = pth_bytes({"w": torch.zeros(2, 3)})
    # the pickle holds the size as BININT1 2, BININT1 3, TUPLE2 (pickle protocol 2); -2 is BININT (4 bytes)
    negative = with_pickle(blob, lambda p: p.replace(b"K\x02K\x03\x86", b"J\xfe\xff\xff\xffK\x03\x86"))
    with pytest.raises(CheckpointError, match=r"x\.pth: not a valid tensor state dict: .*invalid shape \(-2, 3\)"):
        read_pth_header(_put(tmp_path, negative))
    unknown = with_pickle(blob, lambda p: p.replace(b"torch\nFloatStorage\n", b"torch\nComplexFloatStorage\n"))
    with pytest.raises(CheckpointError, match=r"x\.pth: tensor 'w' has unsupported dtype"):
        read_pth_header(_put(tmp_path, unknown))
    bogus = with_pickle(blob, lambda p: p.replace(b"torch\nFloatStorage\n", b"torch\nNoSuchStorage\n"))
    with pytest.raises(CheckpointError, match=r"x\.pth: refusing to load"):
        read_pth_header(_put(tmp_path, bogus))
    bad_memo = with_pickle(blob, lambda p: p.replace(b"h\x04", b"h\x7f", 1) if b"h\x04" in p else p + b"h\x7f")
    read_pth_or_error(tmp_path, bad_memo)  # a memo index that was never stored: only a CheckpointError, if any


def _put(tmp_path, blob: bytes):
    path = tmp_path / "x.pth"
    path.write_bytes(blob)
    return path


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 170), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_pickles_give_tensor_infos_or_a_checkpoint_error(tmp_path, edits):
    import torch

    def edit(pkl: bytes) -> bytes:
        out = bytearray(pkl)
        for position, byte in edits:
            if position < len(out):
                out[position] = byte
        return bytes(out)

    state = read_pth_or_error(tmp_path, with_pickle(pth_bytes({"w": torch.zeros(2, 3)}), edit))
    if state is not None:
        assert all(isinstance(k, str) and isinstance(v, PthTensorInfo) for k, v in state.items())
        assert all(all(s >= 0 for s in v.shape) for v in state.values())
