"""The streaming safetensors writer, read back by the safetensors library itself."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from wanrt.engines.errors import CheckpointError
from wanrt.export.checkpoint.safetensors_writer import SafetensorsWriter, TensorSpec, save_tensors


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.fp8": (torch.randn(5, 7, generator=g) * 10).to(torch.float8_e4m3fn),
        "w.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "scale": torch.rand(5, 1, generator=g),
        "scalar": torch.tensor(0.25),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(7, dtype=torch.int64),
        "int8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "flag": torch.tensor([True, False, True]),
        "half": torch.randn(2, 2, 3, generator=g).to(torch.float16),
    }


def test_written_in_any_order_reads_back_with_safetensors(tmp_path, tensors):
    out = tmp_path / "x.safetensors"
    specs = [TensorSpec.of(k, t) for k, t in tensors.items()]
    with SafetensorsWriter(out, specs, {"source": "test", "n": "9"}) as w:
        for k in reversed(list(tensors)):  # not the header's order
            w.write(k, tensors[k])
    back = load_file(str(out))
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert torch.equal(back[k].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else back[k],
                           t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t)
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"source": "test", "n": "9"}
    # header: 8-byte aligned data start, every tensor aligned to its element size, no holes
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and 8 + n + spans[-1][1] == len(raw)
    for k, v in header.items():
        if k != "__metadata__":
            assert v["data_offsets"][0] % tensors[k].element_size() == 0
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)


def test_failure_leaves_nothing_behind(tmp_path, tensors):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"previous")
    specs = [TensorSpec.of(k, t) for k, t in tensors.items()]
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(out, specs) as w:
            w.write("scale", tensors["scale"])
            raise RuntimeError("boom")
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    with pytest.raises(CheckpointError, match="never written"):
        with SafetensorsWriter(out, specs) as w:
            w.write("scale", tensors["scale"])
    assert out.read_bytes() == b"previous" and len(list(tmp_path.iterdir())) == 1


def test_bad_writes_are_refused(tmp_path, tensors):
    specs = [TensorSpec.of("scale", tensors["scale"])]
    w = SafetensorsWriter(tmp_path / "y.safetensors", specs)
    with pytest.raises(CheckpointError, match="'other' was not declared"):
        w.write("other", tensors["scale"])
    with pytest.raises(CheckpointError, match=r"torch.float32 \[5\]; declared torch.float32 \[5, 1\]"):
        w.write("scale", tensors["scale"].reshape(5))
    w.write("scale", tensors["scale"])
    with pytest.raises(CheckpointError, match="written twice"):
        w.write("scale", tensors["scale"])
    w.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="declared twice"):
        SafetensorsWriter(tmp_path / "z.safetensors", specs + specs)


def test_save_tensors_roundtrip(tmp_path, tensors):
    path = save_tensors(tmp_path / "s.safetensors", {"a": tensors["scale"], "b": tensors["w.bf16"]})
    back = load_file(str(path))
    assert torch.equal(back["a"], tensors["scale"]) and torch.equal(back["b"], tensors["w.bf16"])
