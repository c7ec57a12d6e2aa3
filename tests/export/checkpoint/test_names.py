"""Name tables (`export/checkpoint/names.py`): one row, both lookups; `{n}` indices and parameter suffixes carried over.

The real tables are checked against the tools' own key lists in test_keys.py (diffusers
`WanTransformer3DModel`) and tests/export/models/test_t5.py, test_clip.py, test_vae.py.
"""

from __future__ import annotations

import pytest

from wanrt.export.checkpoint.names import NameTable, Row


def test_name_table_lookups_both_ways_from_one_row():
    table = NameTable((("blocks.{n}.ffn.0", "layers.{n}.mlp.up"), ("head", "out"), ("blocks.{n}.mod", "layers.{n}.table")))
    assert table.to_theirs("blocks.12.ffn.0.weight") == "layers.12.mlp.up.weight"
    assert table.to_official("layers.12.mlp.up.bias") == "blocks.12.ffn.0.bias"
    assert table.to_theirs("blocks.3.mod") == "layers.3.table" and table.to_official("layers.3.table") == "blocks.3.mod"
    assert table.to_official("out.weight") == "head.weight"
    for unknown in ("layers.x.mlp.up.weight", "layers.1.mlp.up.scale", "blocks.1.ffn.0.weight", "out.weight.more"):
        assert table.to_official(unknown) is None, unknown
    with pytest.raises(ValueError, match="'head' appears twice"):
        NameTable((("head", "a"), ("head", "b")))


def test_a_row_of_several_stored_tensors_answers_with_all_of_them():
    table = NameTable((Row("layers.{n}.qkv", ("enc.{n}.q", "enc.{n}.k", "enc.{n}.v"), "concat"),))
    m = table.match_theirs("enc.3.k.bias")
    assert (m.official, m.theirs, m.transform) == ("layers.3.qkv.bias", ("enc.3.q.bias", "enc.3.k.bias", "enc.3.v.bias"), "concat")
    assert table.match_official("layers.3.qkv.weight").theirs == ("enc.3.q.weight", "enc.3.k.weight", "enc.3.v.weight")
    with pytest.raises(ValueError, match="made of 3 tensors"):
        table.to_theirs("layers.3.qkv.weight")
