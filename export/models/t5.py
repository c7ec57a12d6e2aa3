"""The umt5-xxl text encoder of Wan (`wan/modules/t5.py`, `umt5_xxl(encoder_only=True)`), export-ready.

`T5Encoder.state_dict()` keys are exactly those of the official
`models_t5_umt5-xxl-enc-bf16.pth`.  The math follows the official module:

- every block has its own relative-position bias table (`shared_pos=False`), bidirectional
  buckets (32 buckets, max distance 128);
- RMS pre-norm (eps 1e-6, computed in fp32, then cast to the weight dtype);
- attention without 1/sqrt(d) scaling, softmax in fp32, padding keys masked with `finfo.min`;
- gated FFN `fc2(fc1(x) * gelu_tanh(gate(x)))`; a final RMS norm.

For export, the relative-position buckets are precomputed (with the official float32 formula)
into a table indexed by `key - query`, so no backend ever re-derives them with its own `log`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wanrt.engines.errors import CheckpointError, WanrtError
from wanrt.export.checkpoint.view import TensorSource

OFFICIAL_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"


@dataclass(frozen=True)
class T5Config:
    """Architecture of the T5 encoder; defaults are umt5-xxl as Wan builds it."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    max_tokens: int = 512  # longest sequence the bucket table covers (Wan's text_len)

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def tiny(cls, vocab_size: int = 256) -> "T5Config":
        """A few-kilobyte encoder with the real structure, for tests and tiny companion files."""
        return cls(vocab_size=vocab_size, dim=64, dim_attn=64, dim_ffn=128, num_heads=2, num_layers=2)


def relative_position_buckets(rel_pos: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucket of each `key - query` offset (the official float32 formula)."""
    half = num_buckets // 2
    buckets = (rel_pos > 0).long() * half
    rel_pos = rel_pos.abs()
    max_exact = half // 2
    # log-spaced buckets beyond max_exact; clamping to max_exact avoids log(0), whose bucket is unused
    scaled = torch.log(rel_pos.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (scaled * (half - max_exact)).long()).clamp(max=half - 1)
    return buckets + torch.where(rel_pos < max_exact, rel_pos, large)


def relative_bucket_table(cfg: T5Config, device: torch.device | str | None = None) -> torch.Tensor:
    """Bucket of each offset `key - query` in [-(max_tokens-1), max_tokens-1], indexed by offset + max_tokens - 1."""
    offsets = torch.arange(-(cfg.max_tokens - 1), cfg.max_tokens, device=device)
    return relative_position_buckets(offsets, cfg.num_buckets, cfg.max_distance)


class T5RMSNorm(nn.Module):
    """T5LayerNorm: RMS over the last dim in fp32 (no mean subtraction), then scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class T5Attention(nn.Module):
    """Multi-head self-attention without scaling; the additive `bias` carries positions and padding."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731  [B,H,L,d]
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = q @ k.transpose(-1, -2) + bias  # T5 does not scale by 1/sqrt(d)
        probs = scores.float().softmax(dim=-1).to(scores.dtype)
        out = (probs @ v).transpose(1, 2).flatten(2)
        return self.o(out)


class T5FeedForward(nn.Module):
    """Gated FFN: `fc2(fc1(x) * gelu_tanh(gate(x)))`; `gate` is a Sequential to keep the `gate.0` key."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5RelativeBias(nn.Module):
    """One block's relative-position bias: a [num_buckets, num_heads] table looked up by bucket."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """[Lq, Lk] bucket ids -> [1, heads, Lq, Lk] bias."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Block(nn.Module):
    """Pre-norm self-attention with its own position bias, then the gated FFN."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = T5RMSNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5RMSNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = T5RelativeBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        pos = self.pos_embedding(buckets)
        bias = torch.where(keep, pos, torch.finfo(pos.dtype).min)  # padding keys get finfo.min
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class T5Encoder(nn.Module):
    """umt5 encoder: `forward(input_ids [B,L] int64, attention_mask [B,L] int64) -> [B,L,dim] float32`."""

    def __init__(self, cfg: T5Config = T5Config()):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5RMSNorm(cfg.dim, cfg.eps)
        # the bucket of every offset key - query; not part of the state dict
        self.register_buffer("bucket_table", relative_bucket_table(cfg), persistent=False)

    def relative_buckets(self, length: int) -> torch.Tensor:
        """[L, L] bucket ids of `key - query` for a sequence of `length` tokens."""
        pos = torch.arange(length, device=self.bucket_table.device)
        return self.bucket_table[pos.unsqueeze(0) - pos.unsqueeze(1) + (self.config.max_tokens - 1)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(input_ids)
        if x.dtype != self.norm.weight.dtype:  # a bf16 token table (export) feeds the compute dtype
            x = x.to(self.norm.weight.dtype)
        buckets = self.relative_buckets(input_ids.shape[1])
        keep = (attention_mask != 0)[:, None, None, :]  # [B,1,1,Lk]
        for block in self.blocks:
            x = block(x, buckets, keep)
        return self.norm(x).float()


# --- loading the official checkpoint -------------------------------------------------------------

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def t5_state_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for a T5 encoder of this config."""
    shapes: dict[str, tuple[int, ...]] = {"token_embedding.weight": (cfg.vocab_size, cfg.dim)}
    for n in range(cfg.num_layers):
        p = f"blocks.{n}."
        shapes[p + "norm1.weight"] = (cfg.dim,)
        for name in "qkv":
            shapes[p + f"attn.{name}.weight"] = (cfg.dim_attn, cfg.dim)
        shapes[p + "attn.o.weight"] = (cfg.dim, cfg.dim_attn)
        shapes[p + "norm2.weight"] = (cfg.dim,)
        shapes[p + "ffn.gate.0.weight"] = (cfg.dim_ffn, cfg.dim)
        shapes[p + "ffn.fc1.weight"] = (cfg.dim_ffn, cfg.dim)
        shapes[p + "ffn.fc2.weight"] = (cfg.dim, cfg.dim_ffn)
        shapes[p + "pos_embedding.embedding.weight"] = (cfg.num_buckets, cfg.num_heads)
    shapes["norm.weight"] = (cfg.dim,)
    return shapes


def t5_config_from_shapes(shapes: dict[str, tuple[int, ...]], where: str = "T5 checkpoint") -> T5Config:
    """Infer the encoder config from official key shapes; raise CheckpointError on any mismatch."""
    if any(k.startswith("encoder.block.") for k in shapes):
        raise CheckpointError(
            f"{where}: Hugging Face UMT5 key names (encoder.block.*); expected Wan's official T5 keys "
            f"(token_embedding.weight, blocks.N.attn.q.weight, ...) as in {OFFICIAL_T5_FILE}"
        )
    needed = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
              "blocks.0.pos_embedding.embedding.weight")  # fmt: skip
    for key in needed:
        if key not in shapes:
            hint = " (a shared position bias: not Wan's umt5, which has one per block)" if "pos_embedding.embedding.weight" in shapes else ""
            raise CheckpointError(f"{where}: missing key {key!r}{hint}; expected the official umt5-xxl encoder keys of {OFFICIAL_T5_FILE}")
    vocab, dim = shapes["token_embedding.weight"]
    dim_attn = shapes["blocks.0.attn.q.weight"][0]
    dim_ffn = shapes["blocks.0.ffn.fc1.weight"][0]
    num_buckets, num_heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    num_layers = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k)))
    if dim_attn % num_heads:
        raise CheckpointError(f"{where}: attention width {dim_attn} is not a multiple of {num_heads} heads")
    cfg = T5Config(vocab, dim, dim_attn, dim_ffn, num_heads, num_layers, num_buckets)
    check_state_shapes(shapes, t5_state_shapes(cfg), where, f"the official umt5 encoder keys of {OFFICIAL_T5_FILE}")
    return cfg


def require_file(path: str | os.PathLike | None, component: str, expected_name: str, task: str | None) -> Path:
    """The path if it is an existing file; otherwise a WanrtError naming the file and who needs it."""
    need = f"the {task} task needs it" if task else "it is needed for this export"
    if path is None:
        raise WanrtError(f"{component} file {expected_name} not found; {need}")
    p = Path(path)
    if not p.is_file():
        raise WanrtError(f"{component} file {p} not found; {need} (expected {expected_name})")
    return p


def open_t5_checkpoint(path: str | os.PathLike | None, task: str | None = None) -> tuple[T5Config, TensorSource]:
    """The config (inferred and checked from the key shapes) and lazy reader (official names) of a T5 file.

    Accepts the official keys and transformers `UMT5EncoderModel` names (a diffusers `text_encoder/`)."""
    from wanrt.export.checkpoint.companion_keys import MappedSource, hf_t5_plan
    from wanrt.export.checkpoint.companions import is_hf_t5, open_companion

    p = require_file(path, "text encoder (umt5-xxl T5)", OFFICIAL_T5_FILE, task)
    source = open_companion(p)
    if is_hf_t5(set(source.keys())):  # diffusers text_encoder/: transformers UMT5EncoderModel names
        source = MappedSource(source, hf_t5_plan(source))
    return t5_config_from_shapes({k: tuple(source.header(k).shape) for k in source.keys()}, where=str(p)), source


def load_t5_encoder(path: str | os.PathLike | None, dtype: torch.dtype = torch.float32, task: str | None = None) -> T5Encoder:
    """Build the encoder from an official T5 checkpoint (.pth or .safetensors), config from shapes.

    Tensors are read and cast one at a time, so peak memory is the model in `dtype` plus one tensor.
    """
    if dtype == torch.float16:
        raise WanrtError("T5 precision fp16 is not supported: umt5-xxl activations overflow fp16; use bf16 or fp32")
    cfg, source = open_t5_checkpoint(path, task)
    with torch.device("meta"):
        model = T5Encoder(cfg)
    state = {k: source.read(k).to(dtype) for k in source.keys()}
    model.load_state_dict(state, strict=True, assign=True)
    model.bucket_table = relative_bucket_table(cfg, device="cpu")  # built on meta: compute it for real
    return model.eval().requires_grad_(False)


def check_state_shapes(
    shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str, what: str, prefix: str = ""
) -> None:
    """Raise CheckpointError unless `shapes` has exactly the `expected` keys and shapes (`prefix` for messages)."""
    missing = sorted(set(expected) - set(shapes), key=natural_key)
    unexpected = sorted(set(shapes) - set(expected), key=natural_key)
    if missing or unexpected:
        parts = [f"{len(missing)} missing key(s) {few_keys([prefix + k for k in missing])}"] if missing else []
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {few_keys([prefix + k for k in unexpected])}")
        raise CheckpointError(f"{where}: {'; '.join(parts)}; expected {what}")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise CheckpointError(f"{where}: {prefix}{key} has shape {list(shapes[key])}, expected {list(shape)}")


def natural_key(key: str) -> list:
    """Sort key that orders `blocks.2` before `blocks.10`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def few_keys(keys: list[str], n: int = 3) -> str:
    """The first `n` keys, comma-separated, with an ellipsis when there are more."""
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
