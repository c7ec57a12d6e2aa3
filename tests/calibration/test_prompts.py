"""Calibration prompt sets: the built-in list and the user's file (one prompt per line)."""

from __future__ import annotations

import hashlib

import pytest

from wanrt.calibration.prompts import MIN_DEFAULT_PROMPTS, parse_prompts, read_prompts
from wanrt.engines.errors import WanrtError


def test_default_set_is_large_and_varied():
    ps = read_prompts()
    assert ps.source == "default"
    assert len(ps.prompts) >= MIN_DEFAULT_PROMPTS >= 32  # the issue asks for at least 32
    assert len(set(ps.prompts)) == len(ps.prompts)
    assert not any(p.startswith("#") for p in ps.prompts)
    assert any(not p.isascii() for p in ps.prompts)  # umt5 is multilingual: a few non-English prompts


def test_user_file_blank_and_comment_lines_skipped(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# mine\n\n  a cat  \nA dog\n\n", encoding="utf-8")
    ps = read_prompts(f)
    assert ps.prompts == ("a cat", "A dog") and ps.source == str(f)
    assert ps.sha256 == hashlib.sha256(b"a cat\nA dog").hexdigest()  # the prompts, not the file bytes
    assert read_prompts(f).sha256 == ps.sha256
    assert parse_prompts("a cat\r\nA dog\r\n") == ps.prompts


@pytest.mark.parametrize("content, match", [
    (None, "no such file"),
    ("", "holds no prompts"),
    ("# only a comment\n\n", "holds no prompts"),
    (b"\xff\xfe\x00bad", "unreadable"),
])
def test_bad_prompt_files_name_the_file(tmp_path, content, match):
    f = tmp_path / "prompts.txt"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content, encoding="utf-8")
    with pytest.raises(WanrtError, match=match) as e:
        read_prompts(f)
    assert str(f) in str(e.value)


def test_folder_is_an_error(tmp_path):
    with pytest.raises(WanrtError, match="a folder"):
        read_prompts(tmp_path)
