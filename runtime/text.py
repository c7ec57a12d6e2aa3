"""Prompt tokenization for the umt5 text encoder, without torch or transformers.

Reproduces Wan's `HuggingfaceTokenizer(name, seq_len=512, clean='whitespace')` called with
`add_special_tokens=True` (`wan/modules/tokenizers.py`): the official cleaning, the model's
`google/umt5-xxl/tokenizer.json` run by the `tokenizers` library, `</s>` appended, truncation to
512 tokens (EOS included), padding with `<pad>`.  `pad_context` applies the official rule to the
encoder output: keep each prompt's true length (EOS included), then zero-pad to 512 rows.
"""

from __future__ import annotations

import html
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import ftfy
import numpy as np
import tokenizers

from wanrt.engines.errors import WanrtError
from wanrt.engines.manifest import TOKENIZER_FILE

TEXT_LEN = 512  # Wan's text_len: tokens per prompt, and rows of the DiT's context
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"

# `\s` of the `regex` module the official cleaning uses: the Unicode White_Space characters.
# (The standard `re` module's `\s` also matches U+001C..U+001F, so it is spelled out here.)
_WHITESPACE_RUN = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: ftfy fix, HTML-unescape twice, strip, collapse whitespace runs."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()


@dataclass(frozen=True)
class Tokenizer:
    """A umt5 tokenizer.json with Wan's cleaning, EOS and padding rules."""

    backend: tokenizers.Tokenizer
    eos_id: int
    pad_id: int
    path: Path

    def encode(self, texts: list[str], max_len: int = TEXT_LEN, pad_to_max: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, int64 [B, max_len] (or [B, longest] with `pad_to_max=False`).

        Each prompt is cleaned, tokenized, cut to `max_len - 1` tokens (with a warning) and ended with
        `</s>`; the rest of the row is `<pad>` with mask 0.
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_len < 1:
            raise WanrtError(f"max_len {max_len}: expected at least 1 (room for {EOS_TOKEN})")
        rows = []
        for i, enc in enumerate(self.backend.encode_batch([clean_prompt(t) for t in texts], add_special_tokens=False)):
            ids = enc.ids
            if len(ids) + 1 > max_len:
                warnings.warn(
                    f"prompt {i} is {len(ids) + 1} tokens long (with {EOS_TOKEN}); truncated to {max_len} as the "
                    f"official pipeline does",
                    stacklevel=2,
                )
                ids = ids[: max_len - 1]
            rows.append(ids + [self.eos_id])
        width = max_len if pad_to_max else max((len(r) for r in rows), default=0)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for b, row in enumerate(rows):
            input_ids[b, : len(row)] = row
            mask[b, : len(row)] = 1
        return input_ids, mask


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """Load `tokenizer.json` from `folder` (e.g. the model's `google/umt5-xxl/`, or a bundle's copy)."""
    folder = Path(folder)
    path = folder if folder.is_file() else folder / TOKENIZER_FILE
    if not path.is_file():
        raise WanrtError(f"tokenizer file {path} not found; the text encoder needs the umt5-xxl {TOKENIZER_FILE}")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions for malformed files
        raise WanrtError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0][:200]})") from None
    backend.no_truncation()  # our own rules apply, whatever the file says
    backend.no_padding()
    ids = {tok: backend.token_to_id(tok) for tok in (EOS_TOKEN, PAD_TOKEN)}
    for tok, id_ in ids.items():
        if id_ is None:
            raise WanrtError(f"{path}: no {tok!r} token; expected the umt5 tokenizer (</s> = EOS, <pad> = padding)")
    return Tokenizer(backend, ids[EOS_TOKEN], ids[PAD_TOKEN], path)


def pad_context(context: np.ndarray, mask: np.ndarray, text_len: int = TEXT_LEN) -> np.ndarray:
    """The official rule: keep each prompt's first `mask.sum()` rows, zero the rest, pad to `text_len` rows.

    `context` [B, L, D] is the text encoder output, `mask` [B, L] its attention mask; returns [B, text_len, D].
    """
    if context.ndim != 3 or mask.shape != context.shape[:2]:
        raise WanrtError(f"pad_context: context {list(context.shape)} and mask {list(mask.shape)}; expected [B,L,D] and [B,L]")
    lengths = (np.asarray(mask) > 0).sum(axis=1)
    if lengths.max(initial=0) > text_len:
        raise WanrtError(f"pad_context: a prompt has {int(lengths.max())} tokens; at most {text_len} fit the DiT context")
    out = np.zeros((context.shape[0], text_len, context.shape[2]), dtype=context.dtype)
    for b, n in enumerate(lengths):
        out[b, :n] = context[b, :n]
    return out
