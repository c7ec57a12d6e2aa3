"""Merge LoRAs into a checkpoint view lazily, one base tensor at a time.

`apply_loras(view, loras, expert)` checks every LoRA against the base up front (key forms,
ranks, shapes; from headers only) and returns a `MergedView`: a read-only view of the merged
checkpoint in the base's own precision.  Loading a patched tensor computes, in float32,

    W' = W + sum over LoRAs, in order, of strength * scale * (up @ down)   (scale = alpha/rank or 1; alpha 0 is none)
    W' = W + strength * delta                                              (.diff / .diff_b / .diff_m)

and casts W' back to the stored precision; an fp8/int8 weight is dequantized with its stored
scales first and requantized with fresh scales in the same layout afterwards (the requantization
error is recorded in the view's `report`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from wanrt.calibration.formats import FORMAT_OF_DTYPE
from wanrt.calibration.quant import (
    ERROR_ROW_STRIDE, QuantError, QuantErrorSummary, dequantize, encode, quantization_error, quantize_measured,
)
from wanrt.export.checkpoint.safetensors_file import torch_dtype
from wanrt.export.checkpoint.storage import QUANTIZED_DTYPES, SCALE_AXES
from wanrt.export.checkpoint.view import TensorSource

from .keys import MAX_KEY_EXAMPLES, LowRankTerm, lightx2v_differences, lora_key_examples, resolve_lora_file
from .spec import LoraError, LoraSpec

log = logging.getLogger("wanrt.lora")

EXPERTS = ("dit", "high_noise", "low_noise")


def read_finite(source: TensorSource, key: str) -> torch.Tensor:
    """A LoRA tensor in float32; LoraError naming the file and key when it holds NaN or infinite values."""
    t = source.read(key).to(torch.float32)
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        raise LoraError(f"{source.path}: {key!r} holds {bad} NaN or infinite value(s) of {t.numel()}; a LoRA must be finite")
    return t


@dataclass(frozen=True)
class LowRankPatch:
    """`scale * up @ down` (scale already includes the strength) for one base tensor."""

    source: TensorSource
    up: str
    down: str
    scale: float

    def add_to(self, w: torch.Tensor) -> None:
        up = read_finite(self.source, self.up)
        down = read_finite(self.source, self.down)
        w.view(w.shape[0], -1).addmm_(up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1), alpha=self.scale)


@dataclass(frozen=True)
class DeltaPatch:
    """`scale * delta` for one base tensor (a full weight, bias or parameter delta)."""

    source: TensorSource
    key: str
    scale: float

    def add_to(self, w: torch.Tensor) -> None:
        w.add_(read_finite(self.source, self.key).reshape(w.shape), alpha=self.scale)  # same shape up to size-1 dims


Patch = LowRankPatch | DeltaPatch


@dataclass
class LoraMatch:
    """How one LoRA file met the base: what it patched and which of its keys it could not place."""

    spec: LoraSpec
    keys: int  # stored keys in the file
    patched: list[str] = field(default_factory=list)  # official keys of the base it changes
    skipped: list[tuple[str, str | None]] = field(default_factory=list)  # (stored key, official target or None)
    notes: list[str] = field(default_factory=list)  # where it was read as LightX2V reads it, or where LightX2V differs

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.spec.path),
            "strength": self.spec.strength,
            "expert": self.spec.expert,
            "keys": self.keys,
            "patched_tensors": len(self.patched),
            "skipped_keys": len(self.skipped),
            "skipped_examples": [k for k, _ in self.skipped[:MAX_KEY_EXAMPLES]],
            "notes": self.notes,
        }


@dataclass
class MergeReport:
    """What `apply_loras` did: per-LoRA matches and, for fp8/int8 bases, the requantization error."""

    expert: str
    loras: list[LoraMatch] = field(default_factory=list)
    requant_errors: dict[str, QuantError] = field(default_factory=dict)  # filled as patched quantized tensors load

    @property
    def requant(self) -> QuantErrorSummary:
        summary = QuantErrorSummary()
        for key, err in self.requant_errors.items():
            summary.add(key, err)
        return summary

    def to_dict(self) -> dict[str, Any]:
        return {
            "expert": self.expert,
            "loras": [m.to_dict() for m in self.loras],
            "requantization_error": self.requant.to_dict() if self.requant_errors else None,
        }


class MergedRef:
    """A base tensor with LoRA patches: the same interface as `TensorRef` (`key`, `dtype`, `shape`, `load`)."""

    def __init__(self, base: Any, patches: tuple[Patch, ...], report: MergeReport):
        self.base = base
        self.patches = patches
        self.report = report
        self.key: str = base.key
        self.dtype: str = base.dtype  # stored precision, kept after merging
        self.shape: tuple[int, ...] = tuple(base.shape)
        self.scale_layout: str | None = getattr(base, "scale_layout", None)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def quantized(self) -> bool:
        """True when the merged tensor is stored as fp8/int8 codes (like its base)."""
        return self.dtype in QUANTIZED_DTYPES

    def merged_fp32(self) -> torch.Tensor:
        """W + every patch, in float32, before casting back to the stored precision."""
        w = self.base.load(torch.float32)
        for patch in self.patches:
            patch.add_to(w)
        if not bool(torch.isfinite(w).all()):
            raise LoraError(f"{self.key}: merging the LoRAs gives NaN or infinite weights (a strength or alpha too large?)")
        return w

    def load_stored(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged tensor as it would be stored: (tensor in the stored dtype, float32 scale or None)."""
        w = self.merged_fp32()
        if not self.quantized:
            return w.to(torch_dtype(self.dtype)), None
        fmt = FORMAT_OF_DTYPE.get(self.dtype)
        if fmt is None:
            raise LoraError(f"{self.key}: merging into {self.dtype} weights is not supported (fp8_e4m3 and int8 are)")
        if self.scale_layout is None:
            if fmt != "fp8":
                raise LoraError(f"{self.key}: {self.dtype} weight without a scale; cannot requantize after merging")
            q = encode(w, fmt)  # unscaled fp8 stays unscaled: the merged values, clamped to the fp8 range
            self.report.requant_errors[self.key] = quantization_error(w, q, None)
            return q, None
        axis = SCALE_AXES[self.scale_layout]
        q, scale, err = quantize_measured(w, fmt, axis, overwrite=True, row_stride=ERROR_ROW_STRIDE)
        self.report.requant_errors[self.key] = err
        return q, scale

    def load(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The merged, real-valued tensor (requantized and dequantized for fp8/int8 bases) cast to `dtype`."""
        t, scale = self.load_stored()
        if self.quantized:
            return dequantize(t, scale, SCALE_AXES.get(self.scale_layout), dtype)
        return t.to(dtype)


class MergedView(Mapping[str, Any]):
    """A base checkpoint view with LoRAs merged in on read; unpatched tensors are the base's own refs.

    Reads like `CheckpointView` (`view[key].load(dtype)`, `load`, `iter_tensors`, `state_dict`);
    other attributes (`layout`, `precision`, `files`, ...) are the base view's.
    """

    def __init__(self, base: Mapping[str, Any], patches: dict[str, tuple[Patch, ...]], report: MergeReport):
        self.base = base
        self.report = report
        self._patched = {k: MergedRef(base[k], p, report) for k, p in patches.items() if p}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("base", "report"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, key: str) -> Any:
        ref = self._patched.get(key)
        return ref if ref is not None else self.base[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    @property
    def patched_keys(self) -> list[str]:
        return sorted(self._patched)

    def is_patched(self, key: str) -> bool:
        return key in self._patched

    def load(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One merged tensor under its official name, cast to `dtype`."""
        return self[key].load(dtype)

    def iter_tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (official key, merged tensor) pairs one at a time, in sorted key order."""
        for k in sorted(self.base):
            yield k, self[k].load(dtype)

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every merged tensor at once (tests and tiny models)."""
        return dict(self.iter_tensors(dtype))


def _shape(source: TensorSource, key: str) -> tuple[int, ...]:
    return tuple(source.header(key).shape)


def _alpha_value(source: TensorSource, key: str) -> float:
    t = source.read(key)
    if t.numel() != 1:
        raise LoraError(f"{source.path}: alpha {key!r} has shape {list(t.shape)}; expected a single number")
    value = float(t.to(torch.float64).reshape(()))
    if not math.isfinite(value):
        raise LoraError(f"{source.path}: alpha {key!r} is {value}; expected a finite number")
    return value


def _low_rank_patch(spec: LoraSpec, source: TensorSource, term: LowRankTerm, base_shape: tuple[int, ...],
                    zero_alphas: list[str]) -> tuple[LowRankPatch, float]:
    """Check ranks and shapes from the headers; return the patch and its scale (for a PEFT bias).

    A stored alpha of 0 counts as no alpha, as in LightX2V (`if pair_info["alpha"]:` in its
    `LoRALoader.apply_lora`); its key is added to `zero_alphas`."""
    up, down = _shape(source, term.up), _shape(source, term.down)
    name = source.path
    if len(up) < 2 or len(down) < 2:
        raise LoraError(f"{name}: {term.up!r} {list(up)} / {term.down!r} {list(down)}: expected up [out, rank] and down [rank, in] matrices")
    if up[1] != down[0] or any(d != 1 for d in up[2:]):
        raise LoraError(
            f"{name}: rank mismatch: up {term.up!r} is {list(up)} (rank {up[1]}) but down {term.down!r} is {list(down)} (rank {down[0]})"
        )
    if up[0] != base_shape[0] or math.prod(down[1:]) != math.prod(base_shape[1:]) or (len(base_shape) == 2 and len(down) != 2):
        raise LoraError(
            f"{name}: shape mismatch for {term.target!r}: LoRA up {list(up)} @ down {list(down)} gives"
            f" [{up[0]}, {', '.join(map(str, down[1:]))}] but the base tensor is {list(base_shape)}"
        )
    rank = down[0]
    alpha = _alpha_value(source, term.alpha) if term.alpha is not None else None
    if alpha == 0:
        zero_alphas.append(term.alpha)
        alpha = None
    if alpha is not None:
        scale = alpha / rank
    elif spec.alpha is not None:
        scale = spec.alpha / rank
    else:
        scale = 1.0
    scale *= spec.strength
    return LowRankPatch(source, term.up, term.down, scale), scale


def _without_unit_dims(shape: tuple[int, ...]) -> tuple[int, ...]:
    """`shape` with its size-1 dimensions dropped ([1, 6, d] -> [6, d])."""
    return tuple(d for d in shape if d != 1)


def _delta_patch(source: TensorSource, key: str, target: str, base_shape: tuple[int, ...], scale: float) -> DeltaPatch:
    """A full delta must have the base tensor's shape (size-1 dimensions aside: a [6, d] diff_m fits a [1, 6, d] modulation)."""
    shape = _shape(source, key)
    if _without_unit_dims(shape) != _without_unit_dims(base_shape):
        raise LoraError(
            f"{source.path}: shape mismatch: {key!r} is {list(shape)} but the base tensor {target!r} is {list(base_shape)}"
            " (a full delta must have the base tensor's shape)"
        )
    return DeltaPatch(source, key, scale)


def match_lora(spec: LoraSpec, base: Mapping[str, Any], strict: bool = False) -> tuple[LoraMatch, dict[str, list[Patch]]]:
    """Resolve one LoRA against a base view: its patches per official key, and what was skipped."""
    source, keys, terms = resolve_lora_file(spec, base)
    match = LoraMatch(spec, keys=len(keys), skipped=list(terms.unmatched))
    patches: dict[str, list[Patch]] = {}
    zero_alphas: list[str] = []
    for term in terms.low_rank:
        patch, scale = _low_rank_patch(spec, source, term, tuple(base[term.target].shape), zero_alphas)
        patches.setdefault(term.target, []).append(patch)
        if term.bias is not None:
            bias_key = term.target.rsplit(".", 1)[0] + ".bias"
            patches.setdefault(bias_key, []).append(_delta_patch(source, term.bias, bias_key, tuple(base[bias_key].shape), scale))
    for term in terms.deltas:
        patches.setdefault(term.target, []).append(_delta_patch(source, term.key, term.target, tuple(base[term.target].shape), spec.strength))
    match.patched = sorted(patches)
    if match.skipped:
        unmatched = f"LoRA {spec.path}: {len(match.skipped)} of {len(keys)} keys match nothing in the base model"
        if strict:
            raise LoraError(f"{unmatched}, e.g. {lora_key_examples(match.skipped)}; with --lora-strict every key must match a base tensor")
        log.warning("warning: %s and are skipped, e.g. %s", unmatched, lora_key_examples(match.skipped))
    match.notes = _notes(spec, zero_alphas, lightx2v_differences(terms))
    for note in match.notes:
        log.warning("note: %s", note)  # the level the CLI shows by default, as the warnings above
    return match, patches


def _notes(spec: LoraSpec, zero_alphas: list[str], lightx2v_misses: dict[str, list[str]]) -> list[str]:
    """What a user comparing with LightX2V should know: alphas of 0 read as absent, keys LightX2V would not apply."""
    notes = []
    if zero_alphas:
        instead = "1" if spec.alpha is None else "the config's alpha / rank"
        notes.append(
            f"LoRA {spec.path}: {len(zero_alphas)} layer(s) store alpha 0 (e.g. {zero_alphas[0]}); read as no alpha, as"
            f" LightX2V does: scale {instead} instead of 0 / rank, which would apply nothing"
        )
    for why, keys in lightx2v_misses.items():
        notes.append(
            f"LoRA {spec.path}: {len(keys)} key(s) use {why}, e.g. {keys[0]}; LightX2V's LoRA merge (its default,"
            " lora_dynamic_apply off) would not apply them (wanrt does), so results differ between the two tools"
        )
    return notes


def apply_loras(view: Mapping[str, Any], loras: list[LoraSpec], expert: str, strict: bool = False) -> MergedView:
    """Merge `loras` (in order, those targeting `expert` or every expert) into `view`, lazily per tensor.

    `expert` is "dit" for single-DiT models, "high_noise" or "low_noise" for Wan2.2 MoE experts.
    Raises LoraError for unreadable or malformed LoRAs, rank/shape mismatches, a LoRA matching
    nothing, or (with `strict`) any LoRA key that matches nothing.
    """
    if expert not in EXPERTS:
        raise LoraError(f"unknown expert {expert!r}; expected one of {', '.join(EXPERTS)}")
    report = MergeReport(expert)
    merged: dict[str, list[Patch]] = {}
    for spec in loras:
        if spec.expert is not None and expert == "dit":
            raise LoraError(f"LoRA {spec.path} targets the {spec.expert} expert, but this model has a single DiT (no MoE experts)")
        if spec.expert is not None and spec.expert != expert:
            continue
        match, patches = match_lora(spec, view, strict)
        report.loras.append(match)
        for key, ps in patches.items():
            merged.setdefault(key, []).extend(ps)
    return MergedView(view, {k: tuple(p) for k, p in merged.items()}, report)
