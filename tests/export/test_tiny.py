"""`make-tiny-model`'s quantized layouts hold what `convert --quantize` writes from the official layout of the same seed.

Both follow the one layout table; the tables' facts are checked in tests/export/checkpoint
(test_storage.py, test_dequant.py).  Here the two writers must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from wanrt.export.convert import convert_checkpoint
from wanrt.export.tiny import make_tiny_model


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "official", "wan2.1", "i2v", "official", seed=3)


@pytest.mark.parametrize("layout,quantize,comfyui", [
    ("lightx2v-fp8", "fp8", False), ("lightx2v-int8", "int8", False), ("comfyui-fp8", "fp8", True), ("lightx2v-bf16", "bf16", False),
])  # fmt: skip
def test_tiny_layouts_equal_convert_output(official, tmp_path, layout, quantize, comfyui):
    tiny = make_tiny_model(tmp_path / layout, "wan2.1", "i2v", layout, seed=3)
    [tiny_file] = tiny.glob("*.safetensors")
    out = convert_checkpoint(official, tmp_path / "converted.safetensors", quantize=quantize, comfyui=comfyui, progress=False)
    a, b = load_file(str(tiny_file)), load_file(str(out.output))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) if a[k].dtype.itemsize == 1 else torch.equal(a[k], b[k]), k
