"""EngineSignature.check_inputs: the one check of inputs against a signature (export and runtime both use it).

Worked by hand on the Wan2.1 t2v DiT signature: latent [batch, 16, frames, height, width],
timestep [batch], context [batch, 512, 4096]; batch 1..2, frames 1..31, height/width 2..192.
"""

from __future__ import annotations

import pytest

from wanrt.engines.signatures import InputMismatch, dit_signature

SIG = dit_signature(16, 16)


def inputs(**changes):
    good = {
        "latent": ((2, 16, 3, 60, 104), "float32"),  # 480x832 px, 9 frames
        "timestep": ((2,), "float32"),
        "context": ((2, 512, 4096), "float32"),
    }
    return {k: v for k, v in {**good, **changes}.items() if v is not None}


def test_fitting_inputs_give_the_named_dims():
    assert SIG.check_inputs(inputs()) == {"batch": 2, "frames": 3, "height": 60, "width": 104}
    assert SIG.check_inputs(inputs(latent=((1, 16, 31, 192, 2), "float32"), timestep=((1,), "float32"),
                                   context=((1, 512, 4096), "float32"))) == {"batch": 1, "frames": 31, "height": 192, "width": 2}  # fmt: skip


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"context": None}, "inputs missing ['context']; expected ['latent', 'timestep', 'context']"),
        ({"clip_fea": ((2, 257, 1280), "float32")}, "inputs unexpected ['clip_fea']; expected"),
        ({"context": None, "mask": ((2,), "bool")}, "inputs missing ['context'], unexpected ['mask']"),
        ({"timestep": ((2,), "int64")}, "input timestep: dtype int64, expected float32"),
        ({"latent": ((16, 3, 60, 104), "float32")},
         "input latent: shape [16, 3, 60, 104], expected rank 5 ['batch', 16, 'frames', 'height', 'width']"),
        ({"latent": ((2, 36, 3, 60, 104), "float32")},
         "input latent: shape [2, 36, 3, 60, 104], expected ['batch', 16, 'frames', 'height', 'width'] (dim 1 is 36, not 16)"),
        ({"context": ((2, 77, 4096), "float32")}, "input context: shape [2, 77, 4096], expected ['batch', 512, 4096] (dim 1 is 77, not 512)"),
        ({"timestep": ((1,), "float32")}, "input timestep: dim batch=1, but input latent has batch=2"),
        ({"latent": ((2, 16, 3, 60, 200), "float32")}, "input latent: dim width=200 is outside the range 2..192"),
        ({"latent": ((3, 16, 3, 60, 104), "float32")}, "input latent: dim batch=3 is outside the range 1..2"),
        ({"latent": ((2, 16, 0, 60, 104), "float32")}, "input latent: dim frames=0 is outside the range 1..31"),
    ],
)
def test_each_mismatch_is_one_line_naming_the_input_the_dim_and_what_was_expected(changes, message):
    with pytest.raises(InputMismatch) as err:
        SIG.check_inputs(inputs(**changes))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_dim_without_a_range_is_only_held_consistent():
    sig = dit_signature(16, 16)
    unranged = type(sig)(sig.inputs, sig.outputs, {})
    assert unranged.check_inputs(inputs(latent=((2, 16, 3, 60, 500), "float32")))["width"] == 500
    with pytest.raises(InputMismatch, match="input context: dim batch=1, but input latent has batch=2"):
        unranged.check_inputs(inputs(context=((1, 512, 4096), "float32")))
