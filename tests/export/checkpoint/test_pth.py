"""`.pth` state dicts (`export/checkpoint/pth.py`): headers from the pickle without loading, refusals in whole sentences."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.export.helpers import assert_one_line_error
from wanrt.export.checkpoint.pth import read_pth_header


@pytest.mark.parametrize("name", ["models_t5_umt5-xxl-enc-bf16.pth", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "Wan2.1_VAE.pth"])
def test_pth_header_equals_torch_load(tiny_model, name):
    path = tiny_model("wan2.1", "i2v", "official") / name
    state = torch.load(path, map_location="cpu", weights_only=True)
    header = read_pth_header(path)
    assert list(header) == list(state)
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    for k, t in state.items():
        assert (header[k].shape, header[k].dtype) == (tuple(t.shape), names[t.dtype]), k


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pth_with_code_executing_pickle(official_copy, tmp_path):
    marker = tmp_path / "PWNED"
    t5 = official_copy / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({"token_embedding.weight": torch.zeros(2, 2), "payload": _RunsCode(marker)}, t5)
    assert_one_line_error(["inspect", official_copy], t5, "refusing to load", "code")
    assert_one_line_error(["inspect", t5], t5, "refusing to load")
    assert not marker.exists()


def test_truncated_or_foreign_pth_says_why_in_whole_sentences(official_copy, tmp_path):
    """torch's long loader errors become one clear reason, never a sentence cut off mid-word."""
    t5 = official_copy / "models_t5_umt5-xxl-enc-bf16.pth"
    data = t5.read_bytes()
    t5.write_bytes(data[: len(data) // 2])
    line = assert_one_line_error(["inspect", official_copy], t5, "not a readable .pth file", "truncated or corrupt zip archive: ")
    with pytest.raises(RuntimeError) as torch_error:
        torch.load(t5, map_location="cpu", weights_only=True, mmap=True)
    said, torch_line = line.split("truncated or corrupt zip archive: ", 1)[1], str(torch_error.value).splitlines()[0]
    assert torch_line.startswith(said) and torch_line[len(said):][:2] in ("", ".", ". ")  # torch's first sentence, whole
    t5.write_bytes(b"not a checkpoint at all\n" * 4)
    assert_one_line_error(["inspect", t5], t5, "not a zip-format torch checkpoint")


def test_first_sentence_cuts_at_sentence_or_word_boundaries():
    from wanrt.export.checkpoint.pth import first_sentence

    assert first_sentence("Failed reading zip archive: no central directory. This is an internal error. Retry.") == (
        "Failed reading zip archive: no central directory"
    )
    long = " ".join(f"word{i}" for i in range(100))  # one 590-character sentence
    cut = first_sentence(long, limit=50)
    assert cut.endswith(" ...") and len(cut) <= 54 and long.startswith(cut[: -len(" ...")] + " ")
