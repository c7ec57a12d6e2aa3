"""The VAE exporter's refusals (its graphs are run against diffusers in tests/runtime/test_vae_runtime.py)."""

from __future__ import annotations

import pytest

from wanrt.engines.errors import WanrtError
from wanrt.export.models.vae import VAEConfig, WanVAE
from wanrt.export.onnx.vae import export_vae_onnx


def test_precision_is_fp32_only_and_parts_are_named(tmp_path):
    vae = WanVAE(VAEConfig.tiny("2.1"))
    with pytest.raises(WanrtError, match="VAE precision 'bf16'.*fp32 only"):
        export_vae_onnx(vae, tmp_path / "vae_decoder", "bf16", part="decoder")
    with pytest.raises(WanrtError, match=r"unknown VAE part 'middle'; expected one of \('encoder', 'decoder'\)"):
        export_vae_onnx(vae, tmp_path / "vae_middle", part="middle")
    assert list(tmp_path.iterdir()) == []
