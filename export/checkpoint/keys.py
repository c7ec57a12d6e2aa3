"""Wan DiT key forms: prefixes and diffusers names, normalized to official `WanModel` names.

Official names are those of `wan/modules/model.py` (`blocks.N.self_attn.q.weight`, ...).
The diffusers names are those of `WanTransformer3DModel`, written once as `DIFFUSERS_NAMES`
(both directions are lookups in it); the rows are the inverse of diffusers'
`scripts/convert_wan_to_diffusers.py` (note the norm2/norm3 swap: official `norm3` is the
affine cross-attention norm, diffusers calls it `norm2`).  A variant's block list (VACE's
`vace_blocks`, `export.checkpoint.variants`) gets the same block rows, plus its own linears
(`before_proj` -> `proj_in`, `after_proj` -> `proj_out`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from wanrt.engines.errors import CheckpointError

from .animate_keys import ANIMATE_IGNORED, is_animate_key
from .names import NameTable
from .variants import BLOCK_LISTS, VARIANT_DIFFUSERS_NAMES, VARIANT_KEYS

# Prefixes other tools put in front of official names (longest first).
OFFICIAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

# official <-> diffusers names inside one Wan attention block (`blocks.N.`, and every variant's block list).
BLOCK_ROWS = (
    ("modulation", "scale_shift_table"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("norm3", "norm2"),  # the affine cross-attention norm
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
)


def _block_rows(head: str, extra: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, str]]:
    return [(f"{head}.{{n}}.{o}", f"{head}.{{n}}.{t}") for o, t in BLOCK_ROWS + extra]


# official <-> diffusers `WanTransformer3DModel` (and `WanVACETransformer3DModel`) names, one row per module or
# parameter (`{n}`: block index).
DIFFUSERS_NAMES = NameTable((
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
    *_block_rows("blocks"),
    *(row for b in BLOCK_LISTS for row in _block_rows(b.name, b.diffusers)),
    *VARIANT_DIFFUSERS_NAMES,
))
# Keys diffusers checkpoints may carry that the official model has no use for.
DIFFUSERS_IGNORED = re.compile(rf"^({'|'.join(('blocks', *(b.name for b in BLOCK_LISTS)))})\.\d+\.attn2\.norm_added_q\.weight$")

# Every key an official Wan DiT state dict may hold (Wan2.1 t2v/i2v/flf2v, Wan2.2 all): outside the
# blocks, and inside `blocks.N.`; the implemented variants' keys come from `variants`.
_PARAMS = ("weight", "bias")
OFFICIAL_TOP_KEYS = frozenset((
    *(f"{m}.{p}" for m in ("patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                           "time_projection.1", "head.head", "img_emb.proj.0", "img_emb.proj.1", "img_emb.proj.3",
                           "img_emb.proj.4") for p in _PARAMS),
    "head.modulation", "img_emb.emb_pos",
    *VARIANT_KEYS,
))  # fmt: skip
OFFICIAL_BLOCK_KEYS = frozenset((
    "modulation",
    *(f"{a}.{m}.{p}" for a in ("self_attn", "cross_attn") for m in "qkvo" for p in _PARAMS),
    *(f"{a}.norm_{m}.weight" for a in ("self_attn", "cross_attn") for m in "qk"),
    *(f"cross_attn.{m}_img.{p}" for m in "kv" for p in _PARAMS),
    "cross_attn.norm_k_img.weight",
    *(f"{m}.{p}" for m in ("norm3", "ffn.0", "ffn.2") for p in _PARAMS),
))  # fmt: skip
# Lists of Wan attention blocks: name -> the keys allowed inside `name.N.`.
BLOCK_LIST_KEYS: dict[str, frozenset[str]] = {
    "blocks": OFFICIAL_BLOCK_KEYS,
    **{b.name: OFFICIAL_BLOCK_KEYS | b.keys for b in BLOCK_LISTS},
}

# Per-layer quantization companions: LightX2V `weight_scale` [out,1]; ComfyUI `scale_weight`
# (per tensor) and `scale_input`; newer ComfyUI `input_scale`/`comfy_quant`.
SCALE_LEAVES = frozenset(("weight_scale", "scale_weight", "scale_input", "input_scale", "comfy_quant"))
MARKER_KEYS = ("scaled_fp8",)


def diffusers_to_official(key: str) -> str | None:
    """Official name of a diffusers `WanTransformer3DModel` key, or None if it has none."""
    return DIFFUSERS_NAMES.to_official(key)


def official_to_diffusers(key: str) -> str | None:
    """diffusers name of an official key, or None if diffusers has no such parameter."""
    return DIFFUSERS_NAMES.to_theirs(key)


def is_official_key(key: str) -> bool:
    """True for a key an official Wan DiT state dict can hold (the implemented variants' modules included)."""
    head, dot, tail = key.partition(".")
    allowed = BLOCK_LIST_KEYS.get(head) if dot else None
    if allowed is not None:
        index, _, rest = tail.partition(".")
        return index.isdigit() and rest in allowed
    return key in OFFICIAL_TOP_KEYS or is_animate_key(key)


def looks_like_diffusers(keys) -> bool:
    """True when a key set uses diffusers module names (`condition_embedder.`, `attn1.`, `proj_out`)."""
    return any(k.startswith("condition_embedder.") or ".attn1.to_q." in k or k.startswith("proj_out.") for k in keys)


# Key fragments only LoRA / diff files carry (LightX2V, ComfyUI, Kijai, diffusers/PEFT, musubi forms).
LORA_KEY_RE = re.compile(
    r"(lora_(up|down|A|B|mid)\b|[._]lora[._](up|down)\b|lora_linear_layer|^lora_unet_|\.(alpha|diff|diff_b|diff_m|dora_scale)$)"
)


def looks_like_lora(keys) -> bool:
    """True when a key set holds LoRA factors or weight diffs rather than model weights."""
    return any(LORA_KEY_RE.search(k) for k in keys)


def detect_prefix(keys) -> str:
    """The prefix shared by the keys that carry the DiT (`''` for bare official names)."""
    keys = list(keys)
    for prefix in OFFICIAL_PREFIXES:
        n = sum(1 for k in keys if k.startswith(prefix))
        if n and n >= max(1, len(keys) // 2):
            return prefix
    return ""


@dataclass
class KeyMap:
    """How stored keys map onto official names."""

    form: str  # "official" or "diffusers"
    prefix: str  # stripped prefix ('' if none)
    to_source: dict[str, str] = field(default_factory=dict)  # official -> stored key
    scales: dict[str, str] = field(default_factory=dict)  # stored scale/marker key -> stored key it belongs to ('' for markers)
    unknown: list[str] = field(default_factory=list)  # stored keys that mean nothing to a Wan DiT
    ignored: list[str] = field(default_factory=list)  # stored keys known and deliberately unused


def normalize_keys(keys, where: str = "checkpoint") -> KeyMap:
    """Map every stored key to its official name; collect scale companions and unknown keys.

    In a diffusers-form file a key that already is an official name stays that name (LightX2V's
    `-d forward` conversion leaves `blocks.N.modulation` unrenamed); two stored keys naming one
    official tensor are an error (`where` names the file in it)."""
    keys = list(keys)
    prefix = detect_prefix(keys)
    stripped = [(k[len(prefix):] if k.startswith(prefix) else k, k) for k in keys]
    form = "diffusers" if looks_like_diffusers(bare for bare, _ in stripped) else "official"
    km = KeyMap(form=form, prefix=prefix)
    for bare, stored in stripped:
        if bare in MARKER_KEYS:
            km.scales[stored] = ""
            continue
        layer, dot, leaf = stored.rpartition(".")
        if dot and leaf in SCALE_LEAVES:
            km.scales[stored] = layer + ".weight"
            continue
        if ANIMATE_IGNORED.match(bare):
            km.ignored.append(stored)
            continue
        official = bare
        if form == "diffusers":
            if DIFFUSERS_IGNORED.match(bare):
                km.ignored.append(stored)
                continue
            official = diffusers_to_official(bare) or bare
        if not is_official_key(official):
            km.unknown.append(stored)
        elif official in km.to_source:
            raise CheckpointError(
                f"{where}: {km.to_source[official]!r} and {stored!r} both name the official tensor {official!r}; keep one"
            )
        else:
            km.to_source[official] = stored
    return km
