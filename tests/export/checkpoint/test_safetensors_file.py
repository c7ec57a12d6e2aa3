"""The safetensors reader (`export/checkpoint/safetensors_file.py`): every malformed header is one clear error.

Facts: peer-formats.md §5 (8-byte little-endian header length, JSON header, data_offsets relative
to the byte buffer, no holes or overlaps, the dtype strings).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.export.helpers import assert_one_line_error
from wanrt.export.checkpoint.safetensors_file import SafetensorsFile


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_header_length_past_end(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    assert_one_line_error(["inspect", p], p, "header length 10000", "past the end")


def test_truncated_file(tiny_model, tmp_path):
    src = next(tiny_model("wan2.1", "t2v", "lightx2v-bf16").glob("*.safetensors"))
    p = tmp_path / src.name
    p.write_bytes(src.read_bytes()[:-1000])
    assert_one_line_error(["inspect", p], p, "out of range", "truncated")


def test_offsets_out_of_range(tmp_path):
    p = raw_safetensors(tmp_path / "oob.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4)
    assert_one_line_error(["inspect", p], p, "'a'", "out of range")


def test_overlapping_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    p = raw_safetensors(tmp_path / "overlap.safetensors", header, b"\0" * 12)
    assert_one_line_error(["inspect", p], p, "overlap")


def test_unknown_dtype(tmp_path):
    p = raw_safetensors(tmp_path / "f4.safetensors", {"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")
    assert_one_line_error(["inspect", p], p, "unknown dtype 'F4'")


def test_read_bytes_are_the_stored_bytes_without_torch(tmp_path):
    tensors = {"json": torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8), "w": torch.arange(6, dtype=torch.float32)}
    save_file(tensors, tmp_path / "t.safetensors")
    f = SafetensorsFile(tmp_path / "t.safetensors")
    assert json.loads(f.read_bytes("json")) == {"format": "float8_e4m3fn"}
    assert f.read_bytes("w") == tensors["w"].numpy().tobytes()
