"""Torch-free prompt tokenization: same ids as transformers with Wan's official call, official cleaning."""

from __future__ import annotations

import html
import json
import random
import string
import subprocess
import sys
import warnings
from pathlib import Path

import ftfy
import numpy as np
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from wanrt.engines.errors import WanrtError
from wanrt.runtime.text import clean_prompt, load_tokenizer, pad_context

NEGATIVE = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留"
WORDS = ["the", "a", "cat", "dog", "running", "on", "beach", "at", "sunset", "and", "with", "in", "JPEG"]


def write_umt5_like_tokenizer(folder: Path, eos_post_processor: bool = True) -> Path:
    """A small tokenizer.json built like umt5's: Unigram, spm-style normalizer, Metaspace, `$A </s>`."""
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + "éèàüöñçß…“”’" + NEGATIVE))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0 - 0.1 * i) for i, w in enumerate(WORDS)]
    vocab += [("▁" + c, -7.5) for c in string.ascii_lowercase] + [(c, -8.0) for c in chars]
    vocab += [("色调", -4.0), ("模糊", -4.5), ("质量", -4.2)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    if eos_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
        )
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "</s>", "<unk>")])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    # transformers' file-faithful fast tokenizer (what T5TokenizerFast was when Wan was written)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "pad_token": "<pad>",
              "unk_token": "<unk>", "model_max_length": 512}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def official_clean(text: str) -> str:
    """`whitespace_clean(basic_clean(text))` of wan/modules/tokenizers.py, from the reference text."""
    import regex

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = text.strip()
    text = regex.sub(r"\s+", " ", text)
    return text.strip()


PROMPTS = [
    "A cat running on the beach at sunset",
    NEGATIVE,
    "  Tabs\tand\nnewlines\r\n  and\u3000ideographic\u00a0nbsp  spaces  ",
    "mojibake: cafÃ© â€œquotedâ€\x9d and donâ€™t",
    "html: &amp;lt;b&amp;gt; bold &lt;i&gt; &quot;q&quot; &#233;t&#xe9; &nbsp;x",
    "ﬁne ＦＵＬＬＷＩＤＴＨ ① ligatures",
    "a literal </s> inside and <unk> too",
    "emoji 🐱 and unknown ☃ characters",
    "",
    " ".join(["the cat"] * 400),  # longer than 512 tokens: truncated
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return write_umt5_like_tokenizer(tmp_path_factory.mktemp("umt5"))


def test_ids_equal_transformers_official_call(tok_dir):
    import transformers  # a dev dependency: the oracle must run, never skip
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    ref = hf([official_clean(p) for p in PROMPTS], padding="max_length", truncation=True, max_length=512,
             add_special_tokens=True, return_tensors="np")  # fmt: skip
    with pytest.warns(UserWarning, match="prompt 9 is .* tokens long .* truncated to 512"):
        ids, mask = load_tokenizer(tok_dir).encode(PROMPTS)
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == (len(PROMPTS), 512)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    lengths = mask.sum(1)
    assert lengths[-1] == 512 and ids[-1, -1] == 1  # truncated row still ends with </s>
    assert lengths[-2] == 1  # the empty prompt is just </s>


def test_eos_appended_without_post_processor(tok_dir, tmp_path):
    bare = load_tokenizer(write_umt5_like_tokenizer(tmp_path / "bare", eos_post_processor=False))
    prompts = PROMPTS[:-1]
    ids, mask = bare.encode(prompts)
    want_ids, want_mask = load_tokenizer(tok_dir).encode(prompts)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    short_ids, short_mask = bare.encode(prompts, pad_to_max=False)
    width = int(want_mask.sum(1).max())
    assert short_ids.shape == (len(prompts), width)
    np.testing.assert_array_equal(short_ids, want_ids[:, :width])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation warning for short prompts
        bare.encode(prompts)


def test_cleaning_equals_official_function():
    pool = list(" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2007\u200a\u200b\u2028\u2029\u202f\u205f\u3000")
    pool += ["&amp;", "&amp;amp;", "&lt;", "&#28;", "&#x1f;", "&#133;", "&nbsp;", "&#12288;", "Ã©", "â€™", "a", "字", "\x00"]
    rng = random.Random(0)
    samples = PROMPTS + ["".join(rng.choice(pool) for _ in range(rng.randint(0, 12))) for _ in range(300)]
    for text in samples:
        assert clean_prompt(text) == official_clean(text), repr(text)


def test_pad_context_official_trim_then_zero_pad():
    rng = np.random.default_rng(0)
    mask = np.zeros((3, 40), dtype=np.int64)
    for b, n in enumerate((5, 40, 1)):
        mask[b, :n] = 1
    context = rng.standard_normal((3, 40, 8)).astype(np.float32)  # padded rows hold non-zero junk
    out = pad_context(context, mask, text_len=64)
    # wan: [u[:v] for u, v in zip(context, seq_lens)], then cat with zeros up to text_len
    want = np.stack([np.concatenate([u[:v], np.zeros((64 - v, 8), np.float32)]) for u, v in zip(context, mask.sum(1))])
    assert out.shape == (3, 64, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out, want)
    with pytest.raises(WanrtError, match="at most 32"):
        pad_context(context, mask, text_len=32)


def test_missing_or_bad_tokenizer_file(tmp_path):
    with pytest.raises(WanrtError, match=rf"tokenizer file {tmp_path / 'tokenizer.json'} not found"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(WanrtError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path)


def test_runtime_text_imports_without_torch_or_transformers(tok_dir):
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'wanrt.export'): sys.modules[name] = None  # any import of them fails\n"
        "import cli  # binds wanrt to the checkout\n"
        "from wanrt.runtime.text import load_tokenizer, pad_context\n"
        f"ids, mask = load_tokenizer({str(tok_dir)!r}).encode(['a cat'])\n"
        "print(int(mask.sum()), pad_context(ids[..., None].astype('float32'), mask).shape)\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "(1,", "512,", "1)"]  # ▁a ▁cat </s>
