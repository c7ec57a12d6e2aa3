"""LoRA support: read every common key form, merge into any precision, lazily per tensor.

The merge (torch) is imported on first use, so `inspect` can check a config's LoRAs
(`spec`, `keys`: headers only) without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .keys import LoraTerms, parse_key, resolve_lora_file, resolve_terms
from .spec import LoraError, LoraSpec, lora_records, loras_from_config, normalize_expert, parse_lora_arg

_MERGE_NAMES = ("LoraMatch", "MergedRef", "MergedView", "MergeReport", "apply_loras", "match_lora")


def __getattr__(name: str) -> Any:
    if name in _MERGE_NAMES:
        return getattr(importlib.import_module(".merge", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "resolve_lora_file",
    "resolve_terms",
]
