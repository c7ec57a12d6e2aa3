"""Wan DiT key forms: prefixes and diffusers names, normalized to official `WanModel` names.

Official names are those of `wan/modules/model.py` (`blocks.N.self_attn.q.weight`, ...).
The diffusers names are those of `WanTransformer3DModel`; the mapping is the inverse of
diffusers' `scripts/convert_wan_to_diffusers.py` (note the norm2/norm3 swap: official
`norm3` is the affine cross-attention norm, diffusers calls it `norm2`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Prefixes other tools put in front of official names (longest first).
OFFICIAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

# diffusers -> official, for keys outside the blocks (prefix match on the module path).
_DIFFUSERS_TOP = [
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("proj_out.", "head.head."),
    ("patch_embedding.", "patch_embedding."),
]
_DIFFUSERS_TOP_EXACT = {
    "scale_shift_table": "head.modulation",
    "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",
}
# diffusers -> official, inside `blocks.N.` (module path without the block prefix).
_DIFFUSERS_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
_DIFFUSERS_BLOCK_EXACT = {"scale_shift_table": "modulation"}
# Keys diffusers checkpoints may carry that the official model has no use for.
DIFFUSERS_IGNORED = re.compile(r"^blocks\.\d+\.attn2\.norm_added_q\.weight$")

_OFFICIAL_TO_DIFFUSERS_BLOCK = {v: k for k, v in _DIFFUSERS_BLOCK.items()}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Every key an official Wan DiT state dict may hold (Wan2.1 t2v/i2v/flf2v, Wan2.2 all).
OFFICIAL_KEY_RE = re.compile(
    r"^("
    r"patch_embedding\.(weight|bias)"
    r"|(text_embedding|time_embedding)\.[02]\.(weight|bias)"
    r"|time_projection\.1\.(weight|bias)"
    r"|head\.modulation|head\.head\.(weight|bias)"
    r"|img_emb\.proj\.[0134]\.(weight|bias)|img_emb\.emb_pos"
    r"|blocks\.\d+\.modulation"
    r"|blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]\.(weight|bias)"
    r"|blocks\.\d+\.(self_attn|cross_attn)\.norm_[qk]\.weight"
    r"|blocks\.\d+\.cross_attn\.[kv]_img\.(weight|bias)|blocks\.\d+\.cross_attn\.norm_k_img\.weight"
    r"|blocks\.\d+\.norm3\.(weight|bias)"
    r"|blocks\.\d+\.ffn\.[02]\.(weight|bias)"
    r")$"
)

# Per-layer quantization companions: LightX2V `weight_scale` [out,1]; ComfyUI `scale_weight`
# (per tensor) and `scale_input`; newer ComfyUI `input_scale`/`comfy_quant`.
SCALE_SUFFIXES = (".weight_scale", ".scale_weight", ".scale_input", ".input_scale", ".comfy_quant")
MARKER_KEYS = ("scaled_fp8",)


def diffusers_to_official(key: str) -> str | None:
    """Official name of a diffusers `WanTransformer3DModel` key, or None if it has none."""
    if key in _DIFFUSERS_TOP_EXACT:
        return _DIFFUSERS_TOP_EXACT[key]
    m = _BLOCK_RE.match(key)
    if m:
        n, rest = m.groups()
        if rest in _DIFFUSERS_BLOCK_EXACT:
            return f"blocks.{n}.{_DIFFUSERS_BLOCK_EXACT[rest]}"
        module, _, leaf = rest.rpartition(".")
        if module in _DIFFUSERS_BLOCK:
            return f"blocks.{n}.{_DIFFUSERS_BLOCK[module]}.{leaf}"
        return None
    for src, dst in _DIFFUSERS_TOP:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def official_to_diffusers(key: str) -> str | None:
    """diffusers name of an official key, or None if diffusers has no such parameter."""
    for dkey, okey in _DIFFUSERS_TOP_EXACT.items():
        if key == okey:
            return dkey
    m = _BLOCK_RE.match(key)
    if m:
        n, rest = m.groups()
        if rest == "modulation":
            return f"blocks.{n}.scale_shift_table"
        module, _, leaf = rest.rpartition(".")
        if module in _OFFICIAL_TO_DIFFUSERS_BLOCK:
            return f"blocks.{n}.{_OFFICIAL_TO_DIFFUSERS_BLOCK[module]}.{leaf}"
        return None
    for src, dst in _DIFFUSERS_TOP:
        if key.startswith(dst):
            return src + key[len(dst):]
    return None


def is_official_key(key: str) -> bool:
    """True for a key an official Wan DiT state dict can hold."""
    return OFFICIAL_KEY_RE.match(key) is not None


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


def normalize_keys(keys) -> KeyMap:
    """Map every stored key to its official name; collect scale companions and unknown keys."""
    keys = list(keys)
    prefix = detect_prefix(keys)
    stripped = {k[len(prefix):] if k.startswith(prefix) else k: k for k in keys}
    form = "diffusers" if looks_like_diffusers(stripped) else "official"
    km = KeyMap(form=form, prefix=prefix)
    for bare, stored in stripped.items():
        if bare in MARKER_KEYS:
            km.scales[stored] = ""
            continue
        scale_suffix = next((s for s in SCALE_SUFFIXES if bare.endswith(s)), None)
        if scale_suffix is not None:
            km.scales[stored] = stored[: -len(scale_suffix)] + ".weight"
            continue
        if form == "diffusers":
            if DIFFUSERS_IGNORED.match(bare):
                km.ignored.append(stored)
                continue
            official = diffusers_to_official(bare)
        else:
            official = bare
        if official is None or not is_official_key(official):
            km.unknown.append(stored)
        else:
            km.to_source[official] = stored
    return km
