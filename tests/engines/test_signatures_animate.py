"""The Animate DiT signature: the i2v DiT inputs, then pose latents and face crops with their own named frame dims."""

from __future__ import annotations

import pytest

from wanrt.engines.signatures import InputMismatch, animate_dit_signature, dit_signature


def test_animate_signature_extends_the_i2v_one():
    sig = animate_dit_signature(36, 16, 4096, 16, 512)
    base = dit_signature(36, 16, 4096, clip_tokens=257)
    assert sig.inputs[: len(base.inputs)] == base.inputs and sig.outputs == base.outputs
    assert [(t.name, t.shape) for t in sig.inputs[-2:]] == [
        ("pose_latent", ("batch", 16, "pose_frames", "height", "width")),
        ("face_pixels", ("batch", 3, "face_frames", 512, 512)),
    ]
    assert sig.dim_ranges["pose_frames"][1] == sig.dim_ranges["frames"][1] - 1
    assert sig.dim_ranges["face_frames"][1] == 4 * (sig.dim_ranges["frames"][1] - 2) + 1  # 31 latent frames: 117 video frames


def test_check_inputs_binds_the_animate_dims():
    sig = animate_dit_signature(36, 16, 64, 16, 32, clip_dim=160)
    inputs = {"latent": ((1, 36, 21, 4, 6), "float32"), "timestep": ((1,), "float32"), "context": ((1, 512, 64), "float32"),
              "clip_fea": ((1, 257, 160), "float32"), "pose_latent": ((1, 16, 20, 4, 6), "float32"),
              "face_pixels": ((1, 3, 77, 32, 32), "float32")}  # fmt: skip
    assert sig.check_inputs(inputs)["face_frames"] == 77
    with pytest.raises(InputMismatch, match="face_pixels"):
        sig.check_inputs({**inputs, "face_pixels": ((1, 3, 77, 64, 64), "float32")})
    with pytest.raises(InputMismatch, match="pose_latent: dim height=8, but input latent has height=4"):
        sig.check_inputs({**inputs, "pose_latent": ((1, 16, 20, 8, 6), "float32")})
