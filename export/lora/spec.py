"""Which LoRAs to merge: `LoraSpec`, the CLI's `PATH[:STRENGTH][@EXPERT]` form, LightX2V `lora_configs`, bundle records."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wanrt.engines.errors import WanrtError
from wanrt.engines.digests import cached_sha256
from wanrt.engines.model import EXPERT_NAMES, LoraRecord

# Wan2.2 `lora_configs[].name` values and their expert names.
EXPERT_ALIASES = {"high_noise": "high_noise", "low_noise": "low_noise", "high_noise_model": "high_noise", "low_noise_model": "low_noise"}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
LORA_ARG_FORM = "PATH[:STRENGTH][@high_noise|@low_noise]"
EXPERT_BEFORE_STRENGTH = re.compile(
    rf"(?P<path>.+)@(?P<expert>{'|'.join(EXPERT_ALIASES)}):(?P<strength>[^:/\\]*)"
)  # x.safetensors@high_noise:0.5


class LoraError(WanrtError):
    """A LoRA file or LoRA argument is malformed or does not fit the base model."""


def normalize_expert(name: str, where: str = "LoRA expert") -> str:
    """`high_noise` / `low_noise` (also accepts LightX2V's `high_noise_model` / `low_noise_model`)."""
    try:
        return EXPERT_ALIASES[name]
    except KeyError:
        raise LoraError(f"{where}: unknown expert {name!r}; expected one of {', '.join(EXPERT_NAMES)}") from None


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to merge: file, strength, the Wan2.2 expert it targets (None = every expert), fallback alpha."""

    path: Path
    strength: float = 1.0
    expert: str | None = None
    alpha: float | None = None  # used as alpha/rank for layers whose file has no `.alpha`

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or not math.isfinite(self.strength):
            raise LoraError(f"LoRA {self.path}: strength {self.strength!r} is not a finite number")
        object.__setattr__(self, "strength", float(self.strength))
        if self.expert is not None:
            object.__setattr__(self, "expert", normalize_expert(self.expert, f"LoRA {self.path}"))
        if self.alpha is not None:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
                raise LoraError(f"LoRA {self.path}: alpha {self.alpha!r} is not a finite number")
            object.__setattr__(self, "alpha", float(self.alpha))

    def describe(self) -> str:
        return f"{self.path}:{self.strength:g}" + (f"@{self.expert}" if self.expert else "")


def parse_lora_arg(arg: str) -> LoraSpec:
    """Parse `PATH[:STRENGTH][@high_noise|@low_noise]` (the `--lora` option)."""
    text = arg.strip()
    if not text:
        raise LoraError(f"--lora: empty value; expected {LORA_ARG_FORM}")
    swapped = EXPERT_BEFORE_STRENGTH.fullmatch(text)
    if swapped and not Path(text).exists():
        path, expert, strength = swapped.group("path", "expert", "strength")
        raise LoraError(f"--lora {arg!r}: the expert comes last; expected {LORA_ARG_FORM}, e.g. {path}:{strength}@{expert}")
    expert = None
    head, sep, tail = text.rpartition("@")
    if sep and head and not any(c in tail for c in "/\\.:"):
        expert = normalize_expert(tail, f"--lora {arg!r}")
        text = head
    strength = 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and not any(c in tail for c in "/\\") and not tail.endswith(WEIGHT_SUFFIXES) and not Path(text).exists():
        try:
            strength = float(tail)
        except ValueError:
            raise LoraError(
                f"--lora {arg!r}: strength {tail!r} is not a number; expected {LORA_ARG_FORM}"
            ) from None
        if not math.isfinite(strength):
            raise LoraError(f"--lora {arg!r}: strength {tail!r} is not a finite number")
        text = head
    return LoraSpec(Path(text), strength, expert)


def loras_from_config(config: dict[str, Any], config_path: str | Path | None = None) -> list[LoraSpec]:
    """The LoRAs a LightX2V config names (`lora_configs`, or the older `lora_path` + `strength_model`)."""
    where = str(config_path) if config_path else "config"
    base_dir = Path(config_path).parent if config_path else None

    def locate(p: str) -> Path:
        path = Path(p).expanduser()
        if not path.is_absolute() and not path.exists() and base_dir is not None and (base_dir / path).exists():
            return base_dir / path
        return path

    specs: list[LoraSpec] = []
    entries = config.get("lora_configs") or []
    if not isinstance(entries, list):
        raise LoraError(f"{where}: lora_configs must be a list of {{path, strength, alpha, name}} objects")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise LoraError(f"{where}: lora_configs[{i}] must be an object with a string 'path'")
        name = entry.get("name")
        try:
            specs.append(
                LoraSpec(
                    locate(entry["path"]),
                    entry.get("strength", 1.0),
                    normalize_expert(name, f"{where}: lora_configs[{i}].name") if name else None,
                    entry.get("alpha"),
                )
            )
        except LoraError as e:
            raise LoraError(f"{where}: lora_configs[{i}]: {e}") from None
    legacy = config.get("lora_path")
    if legacy:
        paths = [legacy] if isinstance(legacy, str) else list(legacy)
        strength = config.get("strength_model", 1.0)
        specs.extend(LoraSpec(locate(p), strength) for p in paths)
    return specs


def lora_records(loras: list[LoraSpec]) -> list[LoraRecord]:
    """Bundle-manifest records (file sha256, strength, targeted experts) for the LoRAs merged."""
    records = []
    for spec in loras:
        if not spec.path.is_file():
            raise LoraError(f"LoRA {spec.path}: no such file")
        records.append(
            LoraRecord(
                path=str(spec.path),
                sha256=cached_sha256([spec.path])[str(spec.path)],
                strength=spec.strength,
                experts=[spec.expert] if spec.expert else [],
                alpha=spec.alpha,
            )
        )
    return records
