"""`make-tiny-model` (`export/tiny.py`): bad arguments are one clear error, and a model is written atomically."""

from __future__ import annotations

from tests.export.helpers import assert_one_line_error, run_cli


def test_make_tiny_model_bad_arguments(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert_one_line_error(["make-tiny-model", tmp_path / "taken", "--family", "wan2.1", "--task", "t2v"],
                          tmp_path / "taken", "already exists")
    assert_one_line_error(["make-tiny-model", tmp_path / "m", "--family", "wan2.1", "--task", "ti2v"], "wan2.1 has no 'ti2v'")
    assert_one_line_error(["make-tiny-model", tmp_path / "m", "--family", "wan2.2", "--task", "t2v", "--dims", "7B"], "--dims '7B'")
    assert not (tmp_path / "m").exists()


def test_make_tiny_model_writes_atomically(tmp_path):
    r = run_cli("make-tiny-model", tmp_path / "out", "--family", "wan2.2", "--task", "ti2v", "--layout", "lightx2v-int8", "--seed", "3")
    assert r.exit_code == 0 and r.stdout.strip() == str(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left beside it
