"""Every weight the exporters write for the real Wan models fits TensorRT's 2 GiB per initializer.

The graph modules are built on the `meta` device exactly as the exporters trace them (no data),
at every precision each exporter accepts; the initializers a graph holds are these modules'
tensors (plus small constants folded from the config).
"""

from __future__ import annotations

import math

import pytest
import torch

from wanrt.engines.model import DiTConfig
from wanrt.export.onnx.encoders import (
    DTYPES,
    IMAGE_PRECISIONS,
    TEXT_PRECISIONS,
    image_encoder_graph_module,
    text_encoder_graph_module,
    token_table_dtype,
)
from wanrt.export.models.clip import CLIPVisionConfig
from wanrt.export.models.t5 import T5Config
from wanrt.export.models.vae import VAEConfig, WanVAE
from wanrt.export.models.wan_dit import WanDiT
from wanrt.export.onnx.dit import DTYPES as DIT_DTYPES
from wanrt.export.onnx.lint import MAX_INITIALIZER_BYTES

_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
REAL_DITS = {  # the released configs (wan-architecture.md section 1)
    "2.1 t2v 1.3B": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16),
    "2.1 t2v 14B": DiTConfig(**_14B, in_dim=16, out_dim=16),
    "2.1 i2v 14B": DiTConfig(**_14B, in_dim=36, out_dim=16, image_branch=True, clip_tokens=257),
    "2.1 flf2v 14B": DiTConfig(**_14B, in_dim=36, out_dim=16, image_branch=True, clip_tokens=514),
    "2.2 i2v A14B": DiTConfig(**_14B, in_dim=36, out_dim=16),
    "2.2 ti2v 5B": DiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
}


def oversized(module: torch.nn.Module) -> dict[str, float]:
    """Tensors of `module` over 2 GiB, in GiB."""
    sizes = {name: math.prod(t.shape) * t.element_size() for name, t in module.state_dict().items()}
    assert sizes, "no tensors"
    return {name: round(n / 2**30, 2) for name, n in sizes.items() if n > MAX_INITIALIZER_BYTES}


@pytest.mark.parametrize("precision", TEXT_PRECISIONS)
def test_umt5_xxl(precision):
    cfg, dtype = T5Config(), DTYPES[precision]
    for source_is_bf16 in (True, False):  # the official bf16 file, or a wider copy of it
        module = text_encoder_graph_module(cfg, dtype, token_table_dtype(cfg, dtype, source_is_bf16))
        assert module.state_dict()["token_embedding.weight"].shape == (256384, 4096)
        assert oversized(module) == {}


@pytest.mark.parametrize("precision", IMAGE_PRECISIONS)
def test_clip_vit_h(precision):
    assert oversized(image_encoder_graph_module(CLIPVisionConfig(), DTYPES[precision])) == {}


@pytest.mark.parametrize("precision", sorted(DIT_DTYPES))
@pytest.mark.parametrize("name", REAL_DITS)
def test_dit(name, precision):
    with torch.device("meta"):
        module = WanDiT(REAL_DITS[name], DIT_DTYPES[precision])
    assert oversized(module) == {}


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_vae(version):
    with torch.device("meta"):
        module = WanVAE(VAEConfig.official(version))
    assert oversized(module) == {}
