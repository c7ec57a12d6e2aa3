"""Wan DiT variants told apart by the modules they add to the base `WanModel`: one table, `VARIANTS`.

Each row names a released variant, the task wanrt runs it as (`None`: not implemented here), the
official top-level modules only it has (a key belongs to module `m` when it is `m` or starts with
`m.`), and where those names come from.  A row that wanrt implements also lists its exact keys
outside block lists and its lists of Wan attention blocks (`BlockList`), so that `keys` accepts
them as official names and renames them to and from diffusers.

The rule the table serves: a Wan DiT checkpoint holding a variant's modules is that variant; an
implemented one is read as such, any other is an error naming the variant and the keys that
give it away (`unimplemented_variant`), never a model built without them.  Keys no row claims stay
"unknown" (listed by `inspect`, not used).  Adding a variant is one row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from wanrt.engines.errors import CheckpointError

_PARAMS = ("weight", "bias")


@dataclass(frozen=True)
class BlockList:
    """A list of Wan attention blocks beside `blocks` (`name.N.<Wan block key>`), and the linears its blocks add."""

    name: str  # official module name, e.g. "vace_blocks"
    linears: tuple[str, ...] = ()  # linears beyond a Wan block's (weight + bias each)
    diffusers: tuple[tuple[str, str], ...] = ()  # (official, diffusers) names of those linears inside a block

    @property
    def keys(self) -> frozenset[str]:
        """The keys its linears add inside `name.N.`."""
        return frozenset(f"{m}.{p}" for m in self.linears for p in _PARAMS)


@dataclass(frozen=True)
class Variant:
    """One Wan DiT variant and the official modules that give it away."""

    name: str  # as the releases name it
    task: str | None  # the wanrt task that runs it; None: not implemented
    modules: tuple[str, ...]  # official top-level modules (or parameters) only this variant has
    source: str  # where the module names were read
    keys: frozenset[str] = frozenset()  # implemented: its exact keys outside its block lists
    block_lists: tuple[BlockList, ...] = ()  # implemented: its lists of Wan attention blocks
    diffusers: tuple[tuple[str, str], ...] = ()  # implemented: (official, diffusers) names of its top-level modules

    def owns(self, key: str) -> bool:
        """True when an official-named key belongs to one of this variant's modules."""
        return any(key == m or key.startswith(m + ".") for m in self.modules)


VACE_BLOCKS = BlockList("vace_blocks", ("before_proj", "after_proj"),
                        (("before_proj", "proj_in"), ("after_proj", "proj_out")))  # fmt: skip

VARIANTS: tuple[Variant, ...] = (
    Variant(
        "Wan2.1-VACE (1.3B, 14B)", "vace", ("vace_patch_embedding", "vace_blocks"),
        "Wan2.1 wan/modules/vace_model.py (VaceWanModel); diffusers WanVACETransformer3DModel",
        keys=frozenset(f"vace_patch_embedding.{p}" for p in _PARAMS), block_lists=(VACE_BLOCKS,),
        diffusers=(("vace_patch_embedding", "vace_patch_embedding"),),
    ),
    Variant(  # its keys and diffusers names are animate_keys' NameTable (conv stacks, split to_k/to_v)
        "Wan2.2-Animate-14B", "animate", ("pose_patch_embedding", "motion_encoder", "face_encoder", "face_adapter"),
        "Wan2.2 wan/modules/animate/model_animate.py (WanAnimateModel); diffusers WanAnimateTransformer3DModel",
    ),
    Variant(
        "Wan2.2-S2V-14B (speech to video)", None,
        ("casual_audio_encoder", "audio_injector", "trainable_cond_mask", "cond_encoder", "frame_packer", "motioner",
         "zip_motion_out", "token_freqs"),
        "Wan2.2 wan/modules/s2v/model_s2v.py (WanModel_S2V)",
    ),
    Variant("Wan-Fun camera control", None, ("control_adapter",), "ComfyUI comfy/model_detection.py (camera, camera_2.2)"),
    Variant("HuMo (audio)", None, ("audio_proj",), "ComfyUI comfy/model_detection.py (humo)"),
    Variant("Wan-Fun reference control", None, ("ref_conv",), "ComfyUI comfy/model_detection.py (in_dim_ref_conv)"),
)  # fmt: skip

IMPLEMENTED = tuple(v for v in VARIANTS if v.task is not None)
BLOCK_LISTS: tuple[BlockList, ...] = tuple(b for v in IMPLEMENTED for b in v.block_lists)
VARIANT_KEYS: frozenset[str] = frozenset(k for v in IMPLEMENTED for k in v.keys)
VARIANT_DIFFUSERS_NAMES: tuple[tuple[str, str], ...] = tuple(r for v in IMPLEMENTED for r in v.diffusers)


def variant_of(keys: Iterable[str]) -> Variant | None:
    """The variant whose modules these official-named keys hold (None: the base model)."""
    keys = list(keys)
    for variant in VARIANTS:
        if any(variant.owns(k) for k in keys):
            return variant
    return None


def variant_keys(variant: Variant, keys: Iterable[str]) -> list[str]:
    """The keys among `keys` that belong to `variant`'s modules, in their order."""
    return [k for k in keys if variant.owns(k)]


def unimplemented_variant(keys: Iterable[str], where: str, bare=lambda k: k) -> None:
    """Raise CheckpointError when the keys hold a variant wanrt does not implement, naming it and its keys.

    `bare(stored_key)` gives a stored key's official-form name (prefix stripped) to match against the table."""
    stored = list(keys)
    for variant in VARIANTS:
        if variant.task is not None:
            continue
        found = [s for s in stored if variant.owns(bare(s))]
        if found:
            raise CheckpointError(
                f"{where}: a {variant.name} checkpoint ({_evidence(variant, found, bare)}; {variant.source}),"
                " a Wan variant wanrt does not implement; its extra modules would be dropped, so it is refused"
            )


def _evidence(variant: Variant, found: list[str], bare) -> str:
    """The first stored key of each of the variant's modules found, and how many tensors they are."""
    first = {}
    for s in found:
        module = next(m for m in variant.modules if bare(s) == m or bare(s).startswith(m + "."))
        first.setdefault(module, s)
    return f"{', '.join(first.values())}: {len(found)} tensor(s) of its modules"


def incomplete_variant(keys: Iterable[str], task: str, where: str, bare=lambda k: k) -> None:
    """Raise CheckpointError when unused keys belong to an implemented variant the model was not read as.

    `keys`: the stored keys no official name took; `task`: what the model resolved to.  A VACE tensor in a
    model that is not a complete VACE model is a partial variant, not a stray key."""
    stored = list(keys)
    for variant in IMPLEMENTED:
        if variant.task == task:
            continue
        found = [s for s in stored if variant.owns(bare(s))]
        if found:
            raise CheckpointError(
                f"{where}: {_evidence(variant, found, bare)} belong to {variant.name} ({variant.source}), but the other"
                f" {variant.name} tensors are missing, so the model reads as {task}; pass the complete checkpoint"
            )
