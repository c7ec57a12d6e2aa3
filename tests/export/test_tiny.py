"""`make-tiny-model` (`export/tiny.py`): bad arguments are one clear error, a model is written atomically,
and its quantized layouts hold what `convert --quantize` writes from the official layout of the same seed.

Both writers follow the one layout table; the table's facts are checked in tests/export/checkpoint
(test_storage.py, test_dequant.py).  Here the two writers must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.export.helpers import assert_one_line_error, run_cli
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


def test_make_tiny_model_bad_arguments(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert_one_line_error(["make-tiny-model", tmp_path / "taken", "--family", "wan2.1", "--task", "t2v"],
                          tmp_path / "taken", "already exists")
    assert_one_line_error(["make-tiny-model", tmp_path / "m", "--family", "wan2.1", "--task", "ti2v"], "wan2.1 has no 'ti2v'")
    assert_one_line_error(["make-tiny-model", tmp_path / "m", "--family", "wan2.2", "--task", "t2v", "--dims", "7B"], "--dims '7B'")
    assert not (tmp_path / "m").exists()


def test_make_tiny_model_writes_atomically(tmp_path):
    r = run_cli("make-tiny-model", tmp_path / "out", "--family", "wan2.2", "--task", "ti2v", "--layout", "lightx2v-int8", "--seed", "3")
    assert r.exit_code == 0 and r.stdout.strip() == str(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left beside it


def test_vace_fp8_layout_equals_convert_output(tmp_path):
    """VACE blocks' linears (before/after_proj too) quantize like the main blocks' in convert and make-tiny-model."""
    official = make_tiny_model(tmp_path / "official", "wan2.1", "vace", "official", seed=4)
    [tiny_file] = make_tiny_model(tmp_path / "fp8", "wan2.1", "vace", "lightx2v-fp8", seed=4).glob("*.safetensors")
    out = convert_checkpoint(official, tmp_path / "converted.safetensors", quantize="fp8", progress=False)
    a, b = load_file(str(tiny_file)), load_file(str(out.output))
    assert sorted(a) == sorted(b) and "vace_blocks.0.before_proj.weight_scale" in a
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
