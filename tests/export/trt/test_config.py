"""Builder flags per component and option, and option checks (tensorrt.md §1-2; the real 11.4 surface in tests/data)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from wanrt.engines.errors import WanrtError
from wanrt.export.trt.config import TrtOptions, builder_flags

SURFACE = json.loads((Path(__file__).resolve().parents[2] / "data" / "tensorrt-11.4.0.106-api-surface.json").read_text())
BUILDER_FLAGS = set(SURFACE["classes"]["BuilderFlag"]["members"])
KINDS = ("dit", "text_encoder", "image_encoder", "vae_encoder", "vae_decoder")


def test_default_build_streams_dit_weights_only():
    assert builder_flags("dit", TrtOptions()) == ["WEIGHT_STREAMING"]
    for kind in KINDS[1:]:
        assert builder_flags(kind, TrtOptions()) == []


def test_version_compatible_plans_leave_the_lean_runtime_out_on_every_component():
    for kind in KINDS:
        flags = builder_flags(kind, TrtOptions(version_compatible=True))
        assert {"VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"} <= set(flags)


def test_refit_and_strip_touch_only_the_dit():
    opts = TrtOptions(refittable=True, strip_plan=True)
    assert set(builder_flags("dit", opts)) == {"WEIGHT_STREAMING", "REFIT", "STRIP_PLAN"}
    assert builder_flags("vae_decoder", opts) == [] and builder_flags("text_encoder", opts) == []
    assert "STRIP_PLAN" not in builder_flags("dit", TrtOptions(refittable=True))


def test_every_flag_we_can_set_exists_in_tensorrt_11_and_none_sets_a_precision():
    seen = set()
    for kind, vc, refit, strip in itertools.product(KINDS, (False, True), (False, True), (False, True)):
        seen |= set(builder_flags(kind, TrtOptions(version_compatible=vc, refittable=refit, strip_plan=strip)))
    assert seen <= BUILDER_FLAGS, seen - BUILDER_FLAGS
    assert not seen & {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "TF32"}  # strongly typed: precision is the graph's


@pytest.mark.parametrize("options, message", [
    (TrtOptions(opt_level=6), "--opt-level 6: expected 0..5"),
    (TrtOptions(opt_level=-1), "--opt-level -1"),
    (TrtOptions(strip_plan=True), "--strip-plan: a stripped plan gets its weights by refitting, so it needs --refittable"),
    (TrtOptions(refittable=True, strip_plan=True, version_compatible=True), "--strip-plan with --version-compatible"),
    (TrtOptions(attention_precision="fp8"), "--attention-precision fp8: the plugin's QK"),
    (TrtOptions(attention="plugin", attention_precision="fp4"), "--attention-precision 'fp4': expected one of bf16, fp8, int8"),
    (TrtOptions(plugin_dir=Path("p")), "--plugin DIR is used only with --attention plugin"),
])  # fmt: skip
def test_bad_combinations_name_the_option(options, message):
    with pytest.raises(WanrtError, match=message.replace("|", r"\|").replace(".", r"\.")):
        options.check()
    TrtOptions(opt_level=0).check()
    TrtOptions(opt_level=5, refittable=True, strip_plan=True).check()
    TrtOptions(refittable=True, version_compatible=True).check()
    TrtOptions(attention="plugin", attention_precision="int8").check()  # no --plugin DIR: compiled for the build GPU


def test_the_plugin_precision_enters_the_plan_key_only_with_the_plugin():
    native = TrtOptions().key_fields()
    assert "attention_precision" not in native  # keys of native-attention plans stay as they were
    keys = {p: TrtOptions(attention="plugin", attention_precision=p).key_fields() for p in ("bf16", "fp8", "int8")}
    assert len({tuple(sorted(k.items())) for k in keys.values()}) == 3 and keys["fp8"]["attention_precision"] == "fp8"
