"""The Wan VAE modules against the reference facts and diffusers' `AutoencoderKLWan`.

diffusers is the independent oracle: a tiny random `AutoencoderKLWan` (Wan2.1 layout, or the
Wan2.2 residual layout with 2x2 patches), its weights renamed to official keys, must encode and
decode like our module on clips that cross several chunks (the oracle helpers: tests/vae_oracle.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from wanrt.engines.errors import CheckpointError, WanrtError
from wanrt.engines.vae_contract import check_vae_matches
from tests.vae_oracle import diffusers_decode, diffusers_encode, diffusers_vae, official_state, one_thread, ours_from_diffusers  # noqa: F401
from wanrt.export.checkpoint.companion_keys import diffusers_vae_names, official_to_diffusers_vae_key
from wanrt.export.models.vae import VAEConfig, WanVAE, load_vae

RTOL = 1e-4


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def pair(request):
    cfg = VAEConfig.tiny(request.param)
    model = diffusers_vae(cfg)
    return cfg, model, ours_from_diffusers(model, cfg)


# ----------------------------------------------------------------------------- reference facts


@pytest.mark.parametrize(
    "version, keys, params_m, shapes",
    [
        ("2.1", 194, 126.9, {
            "encoder.conv1.weight": (96, 3, 3, 3, 3), "conv1.weight": (32, 32, 1, 1, 1), "conv2.weight": (16, 16, 1, 1, 1),
            "decoder.conv1.weight": (384, 16, 3, 3, 3), "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
            "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1), "encoder.middle.1.norm.gamma": (384, 1, 1),
            "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1), "decoder.head.2.weight": (3, 96, 3, 3, 3),
        }),
        ("2.2", 196, 704.7, {
            "encoder.conv1.weight": (160, 12, 3, 3, 3), "conv1.weight": (96, 96, 1, 1, 1),
            "decoder.conv1.weight": (1024, 48, 3, 3, 3), "decoder.head.2.weight": (12, 256, 3, 3, 3),
        }),
    ],
)  # fmt: skip
def test_official_sizes_match_the_reference(version, keys, params_m, shapes):
    """Key and parameter counts and key shapes of the released checkpoints (wan-architecture.md §3)."""
    with torch.device("meta"):
        vae = WanVAE(VAEConfig.official(version))
    state = vae.state_dict()
    assert len(state) == keys
    assert round(sum(t.numel() for t in state.values()) / 1e6, 1) == params_m
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    # encoder 26 / decoder 33 feature-cache slots in the official code = its CausalConv3d modules
    from wanrt.export.models.vae import CausalConv3d

    slots = {part: sum(isinstance(m, CausalConv3d) for m in getattr(vae, part).modules()) for part in ("encoder", "decoder")}
    if version == "2.1":
        assert slots == {"encoder": 26, "decoder": 33}
    else:
        assert slots["decoder"] == 34


# ----------------------------------------------------------------------------- against diffusers


def test_encode_equals_diffusers(pair):
    cfg, model, vae = pair
    torch.manual_seed(1)
    video = torch.rand(1, 3, 13, 32, 64) * 2 - 1  # frame 0 + 3 chunks of 4
    with torch.no_grad():
        want = diffusers_encode(model, cfg, video)
        got = vae.encode(video)
    assert got.shape == want.shape == (1, cfg.z_dim, 4, 32 // cfg.spatial_stride, 64 // cfg.spatial_stride)
    assert rel_err(got, want) < RTOL


def test_decode_equals_diffusers(pair):
    cfg, model, vae = pair
    torch.manual_seed(2)
    z = torch.randn(1, cfg.z_dim, 4, 2, 4)
    with torch.no_grad():
        want = diffusers_decode(model, cfg, z)
        got = vae.decode(z)
    assert got.shape == want.shape == (1, 3, 13, 2 * cfg.spatial_stride, 4 * cfg.spatial_stride)
    assert rel_err(got, want) < RTOL
    assert (got.abs() < 1).float().mean() > 0.5  # the comparison is not dominated by the clamp


def test_first_chunk_of_each_call_kind(pair):
    """A one-frame video and a one-latent-frame decode (TI2V's image) take only the first-chunk path."""
    cfg, model, vae = pair
    torch.manual_seed(3)
    image = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    z = torch.randn(1, cfg.z_dim, 1, 2, 2)
    with torch.no_grad():
        assert rel_err(vae.encode(image), diffusers_encode(model, cfg, image)) < RTOL
        assert rel_err(vae.decode(z), diffusers_decode(model, cfg, z)) < RTOL


def test_chunk_calls_thread_their_caches(pair):
    """`decode_chunk` per latent frame, caches handed on (the engine contract), equals diffusers' whole-clip decode."""
    cfg, model, vae = pair
    torch.manual_seed(4)
    z = torch.randn(1, cfg.z_dim, 3, 2, 2)
    with torch.no_grad():
        whole = diffusers_decode(model, cfg, z)
        frames, caches = [], None
        for k in range(3):
            out, caches = vae.decode_chunk(z[:, :, k : k + 1], torch.tensor([k == 0]), caches)
            assert out.shape[2] == 4  # every call gives 4 frames; of the first, only frame 0 is real
            frames.append(out[:, :, :1] if k == 0 else out)
    chunked = torch.cat(frames, 2).clamp(-1, 1)
    assert chunked.shape == whole.shape == (1, 3, 9, 2 * cfg.spatial_stride, 2 * cfg.spatial_stride)
    assert rel_err(chunked, whole) < RTOL
    # the official 33 (2.1) / 34 (2.2) slots, less the 1x1x1 shortcut convs that never cache
    # (2.1: 192->384; 2.2: 1024->512, 512->256)
    assert len(caches) == 32


# ----------------------------------------------------------------------------- loading


def test_load_official_pth_and_diffusers_safetensors(tmp_path, pair):
    cfg, model, vae = pair
    pth = tmp_path / "Wan_VAE.pth"
    torch.save(official_state(model, cfg), pth)
    st = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, st)
    z = torch.randn(1, cfg.z_dim, 2, 2, 2)
    with torch.no_grad():
        want = vae.decode(z)
        for path in (pth, st):
            loaded = load_vae(path)
            assert loaded.cfg == cfg
            assert torch.equal(loaded.decode(z), want)


def test_official_to_diffusers_names_every_diffusers_key(pair):
    cfg, model, ours = pair
    names = {official_to_diffusers_vae_key(k, cfg) for k in ours.state_dict()}
    assert names == set(model.state_dict())  # diffusers' own key list is the reference
    inverse = diffusers_vae_names(ours.state_dict(), cfg)
    assert all(inverse[official_to_diffusers_vae_key(k, cfg)] == k for k in ours.state_dict())


def test_load_infers_the_number_of_residual_blocks(tmp_path):
    cfg = dataclasses.replace(VAEConfig.tiny("2.2"), num_res_blocks=1)
    path = tmp_path / "vae.pth"
    torch.save(WanVAE(cfg).state_dict(), path)
    assert load_vae(path).cfg == cfg


def test_bad_vae_files_name_the_file_and_key(tmp_path):
    state = WanVAE(VAEConfig.tiny("2.1")).state_dict()
    missing = dict(state)
    del missing["decoder.head.2.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing\.pth.*decoder\.head\.2\.weight"):
        load_vae(tmp_path / "missing.pth")
    extra = {**state, "decoder.extra.weight": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"extra\.pth.*decoder\.extra\.weight"):
        load_vae(tmp_path / "extra.pth")
    wrong = {**state, "decoder.head.0.gamma": torch.zeros(5, 1, 1, 1)}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=r"wrong\.pth.*decoder\.head\.0\.gamma.*\[5, 1, 1, 1\]"):
        load_vae(tmp_path / "wrong.pth")
    torch.save({"blocks.0.weight": torch.zeros(1)}, tmp_path / "dit.pth")
    with pytest.raises(CheckpointError, match=r"dit\.pth: not a Wan VAE"):
        load_vae(tmp_path / "dit.pth")
    with pytest.raises(WanrtError, match=r"nowhere\.pth not found; the i2v task needs it"):
        load_vae(tmp_path / "nowhere.pth", task="i2v")


def test_bad_video_shapes():
    vae = WanVAE(VAEConfig.tiny("2.1"))
    with pytest.raises(WanrtError, match="10 frames.*4k\\+1"):
        vae.encode(torch.zeros(1, 3, 10, 16, 16))
    with pytest.raises(WanrtError, match="20x16 pixels.*multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 20, 16))
    with pytest.raises(WanrtError, match=r"expected \[batch, 16"):
        vae.decode(torch.zeros(1, 48, 2, 2, 2))


def test_vae_must_match_the_dit():
    """A 16-channel VAE cannot decode a 48-channel TI2V DiT's latents, and vice versa."""
    assert check_vae_matches("2.1", 16).z_dim == 16
    assert check_vae_matches(48, 48).version == "2.2"
    with pytest.raises(WanrtError, match=r"Wan2\.1_VAE\.pth: the Wan2\.1 VAE has 16 latent channels.*48.*Wan2\.2_VAE\.pth"):
        check_vae_matches("2.1", 48, where="Wan2.1_VAE.pth")
    with pytest.raises(WanrtError, match=r"Wan2\.2 VAE has 48 .* predicts 16.*Wan2\.1 VAE"):
        check_vae_matches("2.2", 16)
    with pytest.raises(WanrtError, match="32 latent channels is not a Wan VAE"):
        check_vae_matches(32, 16)
