"""LoRA key forms, normalized to the official Wan tensor each key patches.

Accepted (facts: shared/reference/peer-formats.md §1-2, lightx2v-formats.md §2, diffusers
`loaders/lora_conversion_utils.py`):
- LightX2V / Kijai: `diffusion_model.<official module>.lora_down.weight` / `.lora_up.weight`, full
  deltas `.diff` (weight or parameter), `.diff_b` (bias), `blocks.N.diff_m` (block modulation).
- PEFT / diffusers: `transformer.` or `base_model.model.` prefix, diffusers module names
  (`attn1.to_q`, `ffn.net.0.proj`, `attn2.add_k_proj`, `proj_out`, ...), `lora_A` / `lora_B`,
  optional `.default` adapter infix, `lora_B.bias` (bias delta).
- musubi / kohya: `lora_unet_<module with dots as underscores>.lora_down.weight` and `.alpha`.
- ComfyUI: `model.diffusion_model.` prefix; `lora_linear_layer.up/down`, `_lora.up/down`, `lora.up/down`.
Per-layer `.alpha` gives scale alpha/rank (an alpha of 0 counts as absent, as in LightX2V).
`dora_scale` (DoRA) and `lora_mid` (LoCon) are refused.

`lightx2v_differences` names the keys LightX2V's own LoRA merge would not apply, so that users
know why the two tools' results differ.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from wanrt.export.checkpoint.keys import diffusers_to_official, is_official_key, official_to_diffusers
from wanrt.export.checkpoint.view import TensorSource, open_source

from .spec import LoraError, LoraSpec

# Prefixes trainers and UIs put in front of module names; stripped repeatedly, longest first.
LORA_PREFIXES = (
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "pipe.dit.",
    "model.",
    "unet.",
)
KOHYA_PREFIX = "lora_unet_"

UP, DOWN, ALPHA, DIFF, DIFF_B, DIFF_M, LORA_BIAS, MID, DORA = (
    "up", "down", "alpha", "diff", "diff_b", "diff_m", "lora_bias", "mid", "dora",
)
# (suffix, role), most specific first.
SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_linear_layer.up.weight", UP),
    (".lora_linear_layer.down.weight", DOWN),
    (".lora_B.default.weight", UP),
    (".lora_A.default.weight", DOWN),
    (".lora_B.default.bias", LORA_BIAS),
    (".lora_up.weight", UP),
    (".lora_down.weight", DOWN),
    (".lora_mid.weight", MID),
    (".lora_B.weight", UP),
    (".lora_A.weight", DOWN),
    (".lora_B.bias", LORA_BIAS),
    ("_lora.up.weight", UP),
    ("_lora.down.weight", DOWN),
    (".lora.up.weight", UP),
    (".lora.down.weight", DOWN),
    (".lora_B", UP),
    (".lora_A", DOWN),
    (".alpha", ALPHA),
    (".dora_scale", DORA),
    (".diff_b", DIFF_B),
    (".diff_m", DIFF_M),
    (".diff", DIFF),
)


@dataclass(frozen=True)
class ParsedKey:
    """A stored LoRA key split into the module it names (prefix stripped) and its role."""

    key: str  # as stored
    module: str  # e.g. "blocks.0.self_attn.q", "blocks.0.attn1.to_q" or kohya "blocks_0_self_attn_q"
    role: str  # one of UP, DOWN, ALPHA, DIFF, DIFF_B, DIFF_M, LORA_BIAS, MID, DORA
    kohya: bool = False
    prefix: str = ""  # the trainer/UI prefixes stripped from the front ("model.diffusion_model.", ...)


def strip_prefixes(name: str) -> str:
    """Remove every known trainer/UI prefix from the front of a module path."""
    changed = True
    while changed:
        changed = False
        for p in LORA_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
                break
    return name


def parse_key(key: str) -> ParsedKey | None:
    """Split one stored key into (module, role); None when no LoRA suffix matches."""
    role = None
    for suffix, r in SUFFIXES:
        if key.endswith(suffix):
            role, module = r, key[: -len(suffix)]
            break
    if role is None:
        return None
    if module.startswith(KOHYA_PREFIX):
        return ParsedKey(key, module[len(KOHYA_PREFIX):].lstrip("_"), role, kohya=True)
    stripped = strip_prefixes(module)
    return ParsedKey(key, stripped, role, prefix=module[: len(module) - len(stripped)])


def _official_name(name: str) -> str | None:
    """`name` if it is an official key, else its official name as a diffusers key, else None."""
    if is_official_key(name):
        return name
    mapped = diffusers_to_official(name)
    return mapped if mapped is not None and is_official_key(mapped) else None


def kohya_aliases(base_keys: Iterable[str]) -> dict[str, str]:
    """kohya module name (dots as underscores; official or diffusers spelling) -> official module, from the base's keys."""
    aliases: dict[str, str] = {}
    for key in base_keys:
        for name in (key, official_to_diffusers(key)):
            if name is None:
                continue
            module = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
            official = key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key
            aliases[module.replace(".", "_")] = official
    return aliases


def target_of(p: ParsedKey, kohya: dict[str, str]) -> str | None:
    """The official tensor a parsed key patches (None when it names nothing a Wan DiT has)."""
    module = p.module
    if p.kohya:
        module = kohya.get(module)
        if module is None:
            return None
    if p.role == DIFF_M:
        return _official_name(f"{module}.modulation")
    if p.role in (DIFF_B, LORA_BIAS):
        return _official_name(f"{module}.bias")
    if p.role == DIFF:  # a weight delta, or a delta of a bare parameter (`blocks.N.modulation.diff`)
        return _official_name(f"{module}.weight") or _official_name(module)
    return _official_name(f"{module}.weight")


@dataclass
class LowRankTerm:
    """`strength * scale * up @ down` added to `target`."""

    target: str
    up: str
    down: str
    alpha: str | None = None  # stored key of the per-layer alpha
    bias: str | None = None  # PEFT `lora_B.bias`: added to the target's bias with the same scale


@dataclass
class DeltaTerm:
    """`strength * delta` added to `target` (`.diff`, `.diff_b`, `.diff_m`)."""

    target: str
    key: str


@dataclass
class LoraTerms:
    """A LoRA file's keys resolved against a base: what patches what, and what matched nothing."""

    low_rank: list[LowRankTerm] = field(default_factory=list)
    deltas: list[DeltaTerm] = field(default_factory=list)
    unmatched: list[tuple[str, str | None]] = field(default_factory=list)  # (stored key, official target or None)

    @property
    def targets(self) -> set[str]:
        return {t.target for t in self.low_rank} | {t.target for t in self.deltas} | {
            t.target.rsplit(".", 1)[0] + ".bias" for t in self.low_rank if t.bias
        }


def resolve_terms(source_name: str, keys: Iterable[str], base_keys: Iterable[str]) -> LoraTerms:
    """Group a LoRA file's keys into low-rank pairs and deltas on official targets of the base.

    Raises LoraError for DoRA / LoCon files and for an up without its down (or the reverse);
    keys whose target the base lacks, and keys in no LoRA form, land in `unmatched`.
    """
    base = set(base_keys)
    kohya = kohya_aliases(base)
    terms = LoraTerms()
    groups: dict[tuple[str, bool], dict[str, str]] = {}  # (module, kohya) -> role -> stored key
    for key in keys:
        p = parse_key(key)
        if p is None:
            terms.unmatched.append((key, None))
            continue
        if p.role == DORA:
            raise LoraError(f"{source_name}: DoRA LoRAs are not supported yet (found {key!r}); use a plain LoRA")
        if p.role == MID:
            raise LoraError(f"{source_name}: LoCon/Tucker LoRAs ({key!r}, lora_mid) are not supported; use a plain LoRA")
        if p.role in (DIFF, DIFF_B, DIFF_M):
            target = target_of(p, kohya)
            if target in base:
                terms.deltas.append(DeltaTerm(target, key))
            else:
                terms.unmatched.append((key, target))
            continue
        g = groups.setdefault((p.module, p.kohya), {})
        if p.role in g:
            raise LoraError(f"{source_name}: keys {g[p.role]!r} and {key!r} both give the {p.role} of module {p.module!r}")
        g[p.role] = key
    for (module, is_kohya), g in groups.items():
        p = ParsedKey(g.get(UP) or g.get(DOWN) or next(iter(g.values())), module, UP, is_kohya)
        target = target_of(p, kohya)
        if UP in g and DOWN not in g:
            raise LoraError(f"{source_name}: {g[UP]!r} has no matching down/A matrix")
        if DOWN in g and UP not in g:
            raise LoraError(f"{source_name}: {g[DOWN]!r} has no matching up/B matrix")
        if UP not in g:  # an alpha or bias on its own
            terms.unmatched.extend((k, target) for k in g.values())
            continue
        if target not in base:
            terms.unmatched.extend((k, target) for k in g.values())
            continue
        bias = g.get(LORA_BIAS)
        if bias is not None and target.rsplit(".", 1)[0] + ".bias" not in base:
            terms.unmatched.append((bias, target.rsplit(".", 1)[0] + ".bias"))
            bias = None
        terms.low_rank.append(LowRankTerm(target, g[UP], g[DOWN], g.get(ALPHA), bias))
    return terms


# LightX2V's LoRA merge (`lightx2v/utils/lora_loader.py`, `LoRALoader`, used by
# `lightx2v/models/networks/lora_adapter.py` on the default `lora_dynamic_apply: false` path):
# the target of an up matrix or a delta is its key without the suffix, with the first matching
# prefix of LIGHTX2V_PREFIXES removed (one only), plus `.weight` / `.bias` / `.modulation`; no
# other renaming, and no kohya names.  It patches a base tensor only when that name is one.
# (Its `lora_dynamic_apply: true` path, `base_model.py::_load_lora_file`, strips `diffusion_model.`,
# `transformer.` or `model.diffusion_model.` but renames no module either.)
LIGHTX2V_PREFIXES = ("diffusion_model.", "model.", "unet.")
LIGHTX2V_SUFFIXES: tuple[tuple[str, str], ...] = (  # (stored suffix, appended to the module), in its matching order
    (".lora_up.weight", ".weight"),
    ("_lora.up.weight", ".weight"),
    (".lora_B.weight", ".weight"),
    (".lora.up.weight", ".weight"),
    (".lora_B", ".weight"),
    (".lora_linear_layer.up.weight", ".weight"),
    (".lora_B.default.weight", ".weight"),
    (".diff", ".weight"),
    (".diff_b", ".bias"),
    (".diff_m", ".modulation"),
)


def lightx2v_target(key: str) -> str | None:
    """The tensor LightX2V's LoRA merge patches with stored key `key` (an up matrix or a delta); None if it reads no such key."""
    for suffix, leaf in LIGHTX2V_SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            prefix = next((p for p in LIGHTX2V_PREFIXES if module.startswith(p)), "")
            return module[len(prefix):] + leaf
    return None


def lightx2v_difference(p: ParsedKey, target: str) -> str | None:
    """Why LightX2V's LoRA merge would not patch `target` (which wanrt patches) with key `p`; None when it would."""
    if lightx2v_target(p.key) == target:
        return None
    if p.kohya:
        return "kohya `lora_unet_` names (LightX2V reads none)"
    reasons = []
    if p.prefix != next((q for q in LIGHTX2V_PREFIXES if p.prefix.startswith(q)), ""):
        reasons.append(f"the `{p.prefix}` prefix (LightX2V strips only one of `{'`, `'.join(LIGHTX2V_PREFIXES)}`)")
    if target != p.module and not target.startswith(p.module + "."):
        reasons.append("diffusers module names such as `attn1.to_q` (LightX2V renames none)")
    if p.role == DIFF and not target.endswith(".weight"):
        reasons.append("`.diff` deltas of a parameter such as `blocks.N.modulation.diff` (LightX2V reads `X.diff` as"
                       " `X.weight`; it takes block modulation deltas as `blocks.N.diff_m`)")
    if p.role == LORA_BIAS:
        reasons.append("PEFT `lora_B.bias` bias deltas (LightX2V reads none)")
    return " and ".join(reasons) or "a key form LightX2V does not read"


def lightx2v_differences(terms: LoraTerms) -> dict[str, list[str]]:
    """The stored keys wanrt applies that LightX2V's LoRA merge would not, grouped by why."""
    found: dict[str, list[str]] = {}

    def check(key: str, target: str, *companions: str) -> None:
        why = lightx2v_difference(parse_key(key), target)
        if why is not None:
            found.setdefault(why, []).extend((key, *companions))

    for t in terms.low_rank:
        check(t.up, t.target, t.down)
        if t.bias is not None:
            check(t.bias, t.target.rsplit(".", 1)[0] + ".bias")
    for d in terms.deltas:
        check(d.key, d.target)
    return found


MAX_KEY_EXAMPLES = 3


def lora_key_examples(skipped: list[tuple[str, str | None]]) -> str:
    """Up to MAX_KEY_EXAMPLES skipped keys, one per distinct target."""
    parts, seen = [], set()
    for key, target in skipped:
        if target in seen and target is not None:
            continue
        seen.add(target)
        parts.append(f"{key} (base has no {target})" if target else key)
        if len(parts) == MAX_KEY_EXAMPLES:
            break
    return ", ".join(parts) + (", ..." if len(skipped) > len(parts) else "")


def resolve_lora_file(spec: LoraSpec, base_keys: Iterable[str]) -> tuple[TensorSource, list[str], LoraTerms]:
    """Open a LoRA file (headers only) and resolve its keys against the base: (source, its keys, the terms).

    LoraError when the file is missing or unreadable, or when none of its keys patches the base;
    `convert`/`build-engine` merge from the terms, `inspect --config` stops here (no torch)."""
    if not spec.path.is_file():
        raise LoraError(f"LoRA {spec.path}: no such file")
    base = list(base_keys)
    source = open_source(spec.path)
    keys = source.keys()
    terms = resolve_terms(str(spec.path), keys, base)
    if not terms.low_rank and not terms.deltas:
        raise LoraError(
            f"LoRA {spec.path} matches none of the base's {len(base)} tensors (is it for another model?);"
            f" its keys look like: {lora_key_examples(terms.unmatched)}"
        )
    return source, keys, terms
