"""DiT architecture from shapes and config.json (`export/checkpoint/dit_config.py`): contradictions are one clear error."""

from __future__ import annotations

import json

from tests.export.helpers import assert_one_line_error


def test_shape_contradicting_config_json(official_copy):
    cfg = json.loads((official_copy / "config.json").read_text())
    cfg["dim"] = 512
    (official_copy / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(["inspect", official_copy], official_copy / "config.json", "dim is 512", "256")


def test_dtype_contradicting_config_json(official_copy):
    cfg = json.loads((official_copy / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (official_copy / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(["inspect", official_copy], official_copy / "config.json", "bfloat16", "fp32")
