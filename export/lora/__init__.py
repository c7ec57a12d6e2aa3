"""LoRA support: read every common key form, merge into any precision, lazily per tensor."""

from .keys import LoraTerms, parse_key, resolve_terms
from .merge import LoraMatch, MergedRef, MergedView, MergeReport, apply_loras, match_lora
from .spec import LoraError, LoraSpec, lora_records, loras_from_config, normalize_expert, parse_lora_arg

__all__ = [
    "LoraError",
    "LoraMatch",
    "LoraSpec",
    "LoraTerms",
    "MergeReport",
    "MergedRef",
    "MergedView",
    "apply_loras",
    "lora_records",
    "loras_from_config",
    "match_lora",
    "normalize_expert",
    "parse_key",
    "parse_lora_arg",
    "resolve_terms",
]
