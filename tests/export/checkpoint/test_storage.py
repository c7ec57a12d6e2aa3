"""The layout table against the formats' facts (lightx2v-formats.md §1, peer-formats.md §2).

LightX2V's converter (`tools/convert/converter.py::quantize_model`, `wan_dit`, key_idx 2) quantizes
the 2-D tensors whose third key part is self_attn / cross_attn / ffn and stores `key + "_scale"`
[out, 1] in the source weight's dtype (fp32 for the official release); every other tensor goes to
`--non_linear_dtype` (bf16).  Its `--comfyui_mode` stores `key.replace(".weight", ".scale_weight")`
as a scalar and adds `scaled_fp8 = zeros(2, float8_e4m3fn)`.  Wan-AI releases are fp32.
"""

from __future__ import annotations

import pytest

from wanrt.export.checkpoint.dit_config import expected_shapes
from wanrt.export.checkpoint.storage import LAYOUTS, StoredTensor, quantizable, scale_granularity
from wanrt.export.tiny import tiny_dit_config

LIGHTX2V_TARGETS = {"self_attn", "cross_attn", "ffn"}


def lightx2v_quantizes(key: str, shape: tuple[int, ...]) -> bool:
    """LightX2V's converter rule: a 2-D tensor whose `key.split(".")[2]` is a target module."""
    parts = key.split(".")
    return len(shape) == 2 and len(parts) > 2 and parts[2] in LIGHTX2V_TARGETS


@pytest.mark.parametrize("family,task", [("wan2.1", "i2v"), ("wan2.2", "ti2v")])
def test_quantized_tensors_are_lightx2vs(family, task):
    shapes = expected_shapes(tiny_dit_config(family, task))
    chosen = {k for k, s in shapes.items() if quantizable(k, s)}
    assert chosen == {k for k, s in shapes.items() if lightx2v_quantizes(k, s)}
    assert "blocks.0.cross_attn.k_img.weight" in chosen or family == "wan2.2"
    assert not any(k.startswith(("head.", "img_emb.", "text_embedding.", "time_")) for k in chosen)


def test_lightx2v_layout():
    layout = LAYOUTS["lightx2v"]
    s = layout.store("blocks.3.ffn.0.weight", (512, 256), "int8")
    assert s.tensor == StoredTensor("blocks.3.ffn.0.weight", "int8", (512, 256))
    assert s.scale == StoredTensor("blocks.3.ffn.0.weight_scale", "fp32", (512, 1))  # key + "_scale", [out, 1]
    assert layout.store("blocks.3.ffn.0.weight", (512, 256), "fp8").tensor.dtype == "fp8_e4m3"
    assert layout.store("blocks.3.norm3.weight", (256,)).entries == [StoredTensor("blocks.3.norm3.weight", "bf16", (256,))]
    assert layout.markers == []


def test_comfyui_layout():
    layout = LAYOUTS["comfyui"]
    s = layout.store("blocks.0.self_attn.q.weight", (256, 256), "fp8")
    assert s.entries == [
        StoredTensor("blocks.0.self_attn.q.weight", "fp8_e4m3", (256, 256)),
        StoredTensor("blocks.0.self_attn.q.scale_weight", "fp32", ()),
    ]
    assert layout.markers == [StoredTensor("scaled_fp8", "fp8_e4m3", (2,))]
    assert layout.store("head.modulation", (1, 2, 256)).tensor.dtype == "bf16"
    with pytest.raises(ValueError, match="stores no int8"):
        layout.store("blocks.0.self_attn.q.weight", (256, 256), "int8")


@pytest.mark.parametrize("name,names", [("official", "official"), ("diffusers", "diffusers")])
def test_full_precision_layouts(name, names):
    layout = LAYOUTS[name]
    assert layout.names == names and layout.formats == () and layout.markers == []
    assert layout.store("blocks.0.ffn.0.weight", (512, 256)).tensor.dtype == "fp32"
    with pytest.raises(ValueError):
        layout.store("blocks.0.ffn.0.weight", (512, 256), "fp8")


@pytest.mark.parametrize("weight,scale,want", [
    ((512, 256), (512, 1), "per_channel"),
    ((512, 256), (512,), "per_channel"),
    ((512, 256), (), "per_tensor"),
    ((512, 256), (1,), "per_tensor"),
    ((512, 256), (1, 1), "per_tensor"),
    ((512, 256), (256, 1), None),
    ((512, 256), (512, 2), None),
])  # fmt: skip
def test_scale_shapes_read(weight, scale, want):
    assert scale_granularity(weight, scale) == want
