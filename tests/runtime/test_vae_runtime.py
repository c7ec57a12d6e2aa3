"""Chunked VAE engines: ONNX export of the chunk graphs, and runtime/vae.py driving them.

Per version, one module-scoped export (from a checkpoint file, as build-engine does it) of a
tiny VAE with random weights taken from a diffusers `AutoencoderKLWan`.  The engines run
through the ONNX Runtime backend and must reproduce (fp32, 1e-4 relative):
- the torch module's whole-clip decode and encode (untiled), and
- diffusers' `tiled_decode` / `tiled_encode` (tiled).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from wanrt.engines.errors import BundleError, WanrtError
from wanrt.engines.manifest import Component
from wanrt.engines.vae_contract import VAEChunkContract
from wanrt.export.models.vae import VAEConfig, load_vae
from wanrt.export.onnx.lint import lint_onnx
from wanrt.export.onnx.vae import export_vae_onnx
from wanrt.runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtOptions
from wanrt.runtime.vae import Tiling, decode_latents, encode_video
from tests.vae_oracle import diffusers_encode, diffusers_vae, official_state, one_thread  # noqa: F401

RTOL = 1e-4


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@dataclasses.dataclass
class Exported:
    cfg: VAEConfig
    reference: object  # diffusers AutoencoderKLWan
    vae: object  # our WanVAE, loaded from the file that was exported
    components: dict[str, Component]
    engines: dict[str, object]
    root: Path


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def exported(request, tmp_path_factory) -> Exported:
    # the tiny companion VAE that tiny bundles carry: its trace is shared with their builds (the traced-graph cache)
    cfg = VAEConfig.tiny(request.param)
    reference = diffusers_vae(cfg, seed=5)
    root = tmp_path_factory.mktemp(f"vae{request.param}")
    path = root / "Wan_VAE.pth"
    torch.save(official_state(reference, cfg), path)
    backend = OnnxRuntimeBackend(OrtOptions(device="cpu", intra_op_threads=1))
    components, engines = {}, {}
    for part in ("encoder", "decoder"):
        name = f"vae_{part}"
        written = export_vae_onnx(path, root / name, part=part, progress=False)
        comp = written.manifest_entry(name, name, "fp32", root)
        comp = Component.from_dict(name, json.loads(json.dumps(comp.to_dict())))  # as a manifest reads it back
        components[name], engines[name] = comp, backend.load(comp, root)
    yield Exported(cfg, reference, load_vae(path), components, engines, root)
    for engine in engines.values():
        engine.release()


def test_graphs_have_the_contract_io(exported):
    """Inputs/outputs, with named dynamic spatial dims and one cache in/out pair per causal cache; lint clean."""
    assert set(exported.components) == {"vae_encoder", "vae_decoder"}
    for name, comp in exported.components.items():
        assert lint_onnx(exported.root / comp.onnx, comp.signature) == [], name
        contract = VAEChunkContract.from_attributes(comp.attributes)
        model = onnx.load(exported.root / comp.onnx, load_external_data=False)
        inputs = [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in model.graph.input]
        s = exported.cfg.spatial_stride
        main = ("video", [1, 3, 4, f"height_x{s}", f"width_x{s}"]) if name == "vae_encoder" else ("latent", [1, exported.cfg.z_dim, 1, "height", "width"])
        assert inputs[:2] == [main, ("first", [1])]
        assert len(inputs) == 2 + len(contract.caches) and len(model.graph.output) == 1 + len(contract.caches)
        assert all(c.frames in (1, 2) and c.scale in (1, 2, 4, 8) for c in contract.caches)


def test_chunked_decode_equals_whole_clip_decode(exported):
    """One latent frame per engine call, caches threaded by the runtime == the module's decode."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, exported.cfg.z_dim, 4, 3, 5), dtype=np.float32)  # batch 2: decoded one by one
    got = decode_latents(exported.engines["vae_decoder"], exported.components["vae_decoder"], z)
    with torch.no_grad():
        want = exported.vae.decode(torch.from_numpy(z)).numpy()
    assert got.shape == want.shape == (2, 3, 13, 3 * exported.cfg.spatial_stride, 5 * exported.cfg.spatial_stride)
    assert rel_err(got, want) < RTOL


def test_chunked_encode_equals_whole_clip_encode(exported):
    s = exported.cfg.spatial_stride
    video = np.random.default_rng(1).uniform(-1, 1, (1, 3, 9, 3 * s, 2 * s)).astype(np.float32)
    got = encode_video(exported.engines["vae_encoder"], exported.components["vae_encoder"], video)
    with torch.no_grad():
        want = exported.vae.encode(torch.from_numpy(video)).numpy()
    assert got.shape == want.shape == (1, exported.cfg.z_dim, 3, 3, 2)
    assert rel_err(got, want) < RTOL


def test_tiled_decode_equals_diffusers_tiled_decode(exported):
    """Tiles of 4x4 latents every 3 (edge tiles of 2, overlapping blends) == diffusers' tiling."""
    cfg, reference = exported.cfg, exported.reference
    s, tile = cfg.spatial_stride, Tiling(height=4, width=4, stride_height=3, stride_width=3)
    z = np.random.default_rng(2).standard_normal((1, cfg.z_dim, 2, 6, 8), dtype=np.float32)
    got = decode_latents(exported.engines["vae_decoder"], exported.components["vae_decoder"], z, tiling=tile, progress=True)
    reference.enable_tiling(4 * s, 4 * s, 3 * s, 3 * s)
    try:
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
        with torch.no_grad():
            want = reference.decode(torch.from_numpy(z) * std + mean).sample.numpy()
    finally:
        reference.disable_tiling()
    assert got.shape == want.shape == (1, 3, 5, 6 * s, 8 * s)
    assert rel_err(got, want) < RTOL
    whole = decode_latents(exported.engines["vae_decoder"], exported.components["vae_decoder"], z)
    assert rel_err(got, whole) > 1e-3  # tiling is an approximation of whole-frame decoding


def test_tiled_encode_equals_diffusers_tiled_encode(exported):
    cfg, reference = exported.cfg, exported.reference
    s, tile = cfg.spatial_stride, Tiling(height=4, width=4, stride_height=3, stride_width=3)
    video = np.random.default_rng(3).uniform(-1, 1, (1, 3, 5, 6 * s, 8 * s)).astype(np.float32)
    got = encode_video(exported.engines["vae_encoder"], exported.components["vae_encoder"], video, tiling=tile)
    # diffusers measures encoder tiles in (patchified) input pixels: 8 per latent pixel for both versions
    reference.enable_tiling(4 * 8, 4 * 8, 3 * 8, 3 * 8)
    try:
        with torch.no_grad():
            want = diffusers_encode(reference, cfg, torch.from_numpy(video)).numpy()
    finally:
        reference.disable_tiling()
    assert got.shape == want.shape == (1, cfg.z_dim, 2, 6, 8)
    assert rel_err(got, want) < RTOL


def test_runtime_rejects_bad_inputs(exported):
    dec, enc = exported.components["vae_decoder"], exported.components["vae_encoder"]
    engine = exported.engines["vae_decoder"]
    with pytest.raises(WanrtError, match=r"latents of shape \[1, 7, 2, 2, 2\]"):
        decode_latents(engine, dec, np.zeros((1, 7, 2, 2, 2), np.float32))
    with pytest.raises(WanrtError, match="is a VAE encoder, expected a VAE decoder"):
        decode_latents(engine, enc, np.zeros((1, exported.cfg.z_dim, 1, 2, 2), np.float32))
    s = exported.cfg.spatial_stride
    with pytest.raises(WanrtError, match="6 frames"):
        encode_video(exported.engines["vae_encoder"], enc, np.zeros((1, 3, 6, 2 * s, 2 * s), np.float32))
    with pytest.raises(WanrtError, match="too small"):
        decode_latents(engine, dec, np.zeros((1, exported.cfg.z_dim, 1, 4, 4), np.float32), Tiling(3, 3, 3, 3))
    with pytest.raises(BundleError, match="VAE chunk contract None"):
        decode_latents(engine, dataclasses.replace(dec, attributes={}), np.zeros((1, exported.cfg.z_dim, 1, 2, 2), np.float32))
