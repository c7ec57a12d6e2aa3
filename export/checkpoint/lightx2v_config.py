"""LightX2V JSON configs: read them (with `//` comments), pick checkpoint files, keep the sampling keys.

File keys follow LightX2V (`lightx2v/models/runners/wan/wan_runner.py`, `base_model.py`), with one
deliberate difference: both Wan2.2 experts use the same precedence
(`<expert>_quantized_ckpt` when `dit_quantized`, else `<expert>_original_ckpt`, else the
`<expert>_model/` folder); LightX2V ignores `low_noise_original_ckpt` when quantized.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from wanrt.engines.errors import CheckpointError
from wanrt.engines.model import SamplingDefaults
from wanrt.engines.limits import MAX_STEPS, SAMPLING_RANGES, TIMESTEP_RANGE
from wanrt.engines.schema import load_json, short


# dit_quant_scheme -> (storage dtype of the block linears, scale layout) of the files it reads.  Every
# scheme here reads one layout: per-output-channel symmetric fp8 e4m3 / int8 `<layer>.weight` with
# `<layer>.weight_scale` [out, 1]; only LightX2V's kernel and platform differ (`mm_weight.py` and
# `lightx2v_platform/ops/mm/*`: each loads with `load_fp8_perchannel_sym` / `load_int8_perchannel_sym`).
QUANT_SCHEMES: dict[str, tuple[str, str]] = {
    "fp8-vllm": ("fp8_e4m3", "per_channel"), "int8-vllm": ("int8", "per_channel"),
    "fp8-sgl": ("fp8_e4m3", "per_channel"), "int8-sgl": ("int8", "per_channel"),
    "fp8-q8f": ("fp8_e4m3", "per_channel"), "int8-q8f": ("int8", "per_channel"),
    "fp8-triton": ("fp8_e4m3", "per_channel"), "int8-triton": ("int8", "per_channel"),
    "fp8-torchao": ("fp8_e4m3", "per_channel"), "int8-torchao": ("int8", "per_channel"),
    "int8-npu": ("int8", "per_channel"),  # Ascend NPU
    "int8-tmo": ("int8", "per_channel"),  # Cambricon MLU (torch_mlu_ops)
    "int8-vllm-hygon-dcu": ("int8", "per_channel"),  # Hygon DCU
    "int8-iluvatar": ("int8", "per_channel"),  # Iluvatar CoreX
    "fp8-musa": ("fp8_e4m3", "per_channel"),  # Moore Threads MUSA
    "fp8-intel-xpu": ("fp8_e4m3", "per_channel"),  # Intel XPU
}  # fmt: skip
NOT_QUANTIZED = ("Default", "", None)
EXPERT_KEYS = {
    "dit": ("dit_quantized_ckpt", "dit_original_ckpt"),
    "high_noise": ("high_noise_quantized_ckpt", "high_noise_original_ckpt"),
    "low_noise": ("low_noise_quantized_ckpt", "low_noise_original_ckpt"),
}
# LightX2V's quantized T5 / CLIP selection (`encoder_quant`): (`<kind>_quantized`, its scheme and file keys).
ENCODER_QUANT_KEYS = ("t5_quantized", "t5_quant_scheme", "t5_quantized_ckpt",
                      "clip_quantized", "clip_quant_scheme", "clip_quantized_ckpt")  # fmt: skip
SAMPLING_KEYS = (
    "denoising_step_list", "sample_shift", "sample_guide_scale", "enable_cfg", "boundary",
    "boundary_step_index", "infer_steps", "target_video_length", "target_height", "target_width", "fps",
)


_STRING_OR_COMMENT = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.DOTALL)


def strip_json_comments(text: str) -> str:
    """Remove `//` line comments and `/* */` block comments outside JSON strings."""
    if "//" not in text and "/*" not in text:
        return text
    return _STRING_OR_COMMENT.sub(lambda m: m.group(0) if m.group(0).startswith('"') else " ", text)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict[str, Any]:
    """A JSON object from a file that may hold `//` comments; errors name the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e})") from None
    obj = load_json(strip_json_comments(text), f"{path}: invalid {what}", CheckpointError)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: {what} must hold a JSON object, not {type(obj).__name__}")
    return obj


def quant_scheme(config: dict[str, Any], config_path: Path) -> str | None:
    """The DiT quantization scheme when `dit_quantized` is on (validated), else None."""
    if not config.get("dit_quantized", False):
        return None
    scheme = config.get("dit_quant_scheme")
    if scheme in NOT_QUANTIZED:
        raise CheckpointError(
            f"{config_path}: dit_quantized is true but dit_quant_scheme is {scheme!r}; supported: {', '.join(QUANT_SCHEMES)}"
        )
    if scheme not in QUANT_SCHEMES:
        raise CheckpointError(
            f"{config_path}: dit_quant_scheme {scheme!r} is not supported; supported (per-channel fp8 e4m3 / int8"
            f" with weight_scale [out,1]): {', '.join(QUANT_SCHEMES)}"
        )
    return scheme


# Config keys read but not acted on, with why: (keys, reason).  One row per component.
IGNORED_KEYS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("use_tae", "tae_path"), "the bundle decodes with the Wan VAE; LightX2V's tiny TAE decoder is not exported"),
    (("vae_name",), "the VAE is found by its tensors; set vae_path to choose a file"),
)


# Every key wanrt reads from a LightX2V config (the ignored ones included: they get their own note).
READ_KEYS: tuple[str, ...] = (
    *SAMPLING_KEYS, *(k for keys in EXPERT_KEYS.values() for k in keys), "dit_quantized", "dit_quant_scheme",
    "model_path", "model_cls", "t5_original_ckpt", "t5_tokenizer_path", "clip_original_ckpt", "vae_path",
    "lora_configs", *(k for keys, _ in IGNORED_KEYS for k in keys), *ENCODER_QUANT_KEYS,
)  # fmt: skip
MISSPELLING_CUTOFF = 0.85  # difflib ratio: one or two edits in a key of ten or more characters


@functools.cache
def lightx2v_keys() -> frozenset[str]:
    """Top-level keys of LightX2V's own configs (data/lightx2v_config_keys.json, its source recorded there)."""
    data = json.loads((Path(__file__).parent / "data" / "lightx2v_config_keys.json").read_text())
    return frozenset(data["keys"])


def misspelled_key_notes(config: dict[str, Any]) -> list[str]:
    """A note for each key that no LightX2V config uses but that is close to a key wanrt reads."""
    known = lightx2v_keys() | set(READ_KEYS)
    notes = []
    for key in config:
        if key in known:
            continue
        close = difflib.get_close_matches(key, READ_KEYS, n=1, cutoff=MISSPELLING_CUTOFF)
        if close:
            notes.append(f"{key!r} is not a LightX2V config key and is ignored; did you mean {close[0]!r}?")
    return notes


def config_notes(config: dict[str, Any], experts: list[str]) -> list[str]:
    """Notes on config keys that are set but change nothing here (`experts`: the DiT experts in use)."""
    notes = misspelled_key_notes(config)
    for keys, why in IGNORED_KEYS:
        present = [k for k in keys if config.get(k) not in (None, False, "")]
        if present:
            notes.append(f"{', '.join(present)} {'is' if len(present) == 1 else 'are'} ignored: {why}")
    for flag, *keys in (ENCODER_QUANT_KEYS[:3], ENCODER_QUANT_KEYS[3:]):
        present = [k for k in keys if config.get(k) not in (None, "", "Default")]
        if present and not config.get(flag, False):
            notes.append(f"{', '.join(present)} {'is' if len(present) == 1 else 'are'} not used: {flag} is not true"
                         " (LightX2V reads the quantized file only then)")  # fmt: skip
    if not config.get("dit_quantized", False):
        for expert in experts:
            key = EXPERT_KEYS[expert][0]
            if config.get(key):
                notes.append(f"{key} is not used: dit_quantized is not true (LightX2V reads the quantized file only then)")
    return notes


def config_file(config: dict[str, Any], key: str, config_path: Path) -> Path | None:
    """The existing file or folder a path-valued config key names (None when unset).

    Relative paths are tried against the working directory (as LightX2V does), then the
    config's folder, then `model_path`."""
    value = config.get(key)
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise CheckpointError(f"{config_path}: {key} must be a path string, not {value!r}")
    p = Path(value).expanduser()
    tried = [p] if p.is_absolute() else [Path.cwd() / p, config_path.parent / p]
    if not p.is_absolute() and isinstance(config.get("model_path"), str):
        tried.append(Path(config["model_path"]).expanduser() / p)
    for cand in tried:
        if cand.exists():
            return cand
    where = " or ".join(str(t) for t in dict.fromkeys(tried))
    raise CheckpointError(f"{config_path}: {key} points at {value!r}, which does not exist (looked for {where})")


def expert_checkpoint(config: dict[str, Any], expert: str, config_path: Path) -> tuple[Path | None, str | None]:
    """The file/folder the config names for one expert, and the key that named it (symmetric precedence)."""
    quantized_key, original_key = EXPERT_KEYS[expert]
    if config.get("dit_quantized", False):
        p = config_file(config, quantized_key, config_path)
        if p is not None:
            return p, quantized_key
    p = config_file(config, original_key, config_path)
    return (p, original_key) if p is not None else (None, None)


def names_moe(config: dict[str, Any]) -> bool:
    """True when the config selects Wan2.2 two-expert checkpoints."""
    keys = EXPERT_KEYS["high_noise"] + EXPERT_KEYS["low_noise"]
    return any(config.get(k) for k in keys) or "moe" in str(config.get("model_cls", ""))


def _guide_scale(value: Any, config_path: Path) -> tuple[float, float]:
    """LightX2V's `sample_guide_scale` (a number, or [high_noise, low_noise]) as our (low_noise, high_noise)."""
    rng = SAMPLING_RANGES["guide_scale"]
    if rng.contains(value):
        return float(value), float(value)
    if isinstance(value, list) and len(value) in (1, 2) and all(rng.contains(v) for v in value):
        high, low = float(value[0]), float(value[-1])  # wan_runner: [0] while high-noise, [1] while low-noise
        return low, high
    raise CheckpointError(
        f"{config_path}: sample_guide_scale {short(value)}: expected {rng.expected()}, or [high_noise, low_noise] of them"
    )


def sampling_from_config(base: SamplingDefaults, config: dict[str, Any], config_path: Path) -> SamplingDefaults:
    """Family defaults overridden by the config's sampling keys (absent keys keep the defaults).

    A `denoising_step_list` selects the step-distilled sampler; without `enable_cfg` it also
    turns CFG off, as in every LightX2V distill config (LightX2V's own default is off)."""

    def number(key: str, field: str) -> Any:
        """config[key], checked against the range of SamplingDefaults.`field` (engines.limits)."""
        v, rng = config[key], SAMPLING_RANGES[field]
        if not rng.contains(v):
            raise CheckpointError(f"{config_path}: {key} {short(v)}: expected {rng.expected()}")
        return int(v) if rng.integer else float(v)

    s = replace(base)
    if "denoising_step_list" in config:
        steps = config["denoising_step_list"]
        if not (isinstance(steps, list) and 0 < len(steps) <= MAX_STEPS and all(TIMESTEP_RANGE.contains(t) for t in steps)):
            raise CheckpointError(
                f"{config_path}: denoising_step_list {short(steps)}: expected a list of 1 to {MAX_STEPS} timesteps,"
                f" each {TIMESTEP_RANGE.expected()}"
            )
        steps = [int(t) for t in steps]
        s = replace(s, sampler="distill", denoising_step_list=steps, steps=len(steps), enable_cfg=False)
    elif "infer_steps" in config:
        s = replace(s, steps=number("infer_steps", "steps"))
    if "sample_shift" in config:
        s = replace(s, shift=number("sample_shift", "shift"))
    if "sample_guide_scale" in config:
        s = replace(s, guide_scale=_guide_scale(config["sample_guide_scale"], config_path))
    if "enable_cfg" in config:
        if not isinstance(config["enable_cfg"], bool):
            raise CheckpointError(f"{config_path}: enable_cfg must be true or false, not {config['enable_cfg']!r}")
        s = replace(s, enable_cfg=config["enable_cfg"])
    if "boundary" in config:
        s = replace(s, boundary=number("boundary", "boundary"))
    if "boundary_step_index" in config:
        s = replace(s, boundary_step_index=number("boundary_step_index", "boundary_step_index"))
    for key, field in (("target_video_length", "frames"), ("target_height", "height"), ("target_width", "width"), ("fps", "fps")):
        if key in config:
            s = replace(s, **{field: number(key, field)})
    if s.max_area is not None and (s.height, s.width) != (base.height, base.width):
        s = replace(s, max_area=s.height * s.width)  # i2v: the target area follows the configured size
    return s
