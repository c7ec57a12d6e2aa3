"""Find and type the files a Wan model needs besides the DiT: T5, CLIP, VAE and the tokenizer.

Files are typed by their tensor names (headers only), not their file names; official names
(`models_t5_umt5-xxl-enc-bf16.pth`, ...) only break ties.  Keys follow the official modules
(`wan/modules/t5.py`, `clip.py`, `vae.py` / `vae2_2.py`), or their diffusers-folder forms:
`text_encoder/` (transformers UMT5), `image_encoder/` (transformers CLIP vision), `vae/`
(diffusers `AutoencoderKLWan`); a sharded one is read through its `*.safetensors.index.json`.
The name maps of those forms are in `companion_keys`, imported only by the loaders.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from wanrt.engines.errors import CheckpointError
from wanrt.engines.model import VAEInfo

from .encoder_quant import ScaledSource, holds_scales, stored_format
from .shards import INDEX_SUFFIX, ShardedSource, is_index
from .view import QUANTIZED_DTYPES, TensorSource, open_source

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_FILES = {"2.1": "Wan2.1_VAE.pth", "2.2": "Wan2.2_VAE.pth"}
TOKENIZER_DIRS = ("google/umt5-xxl", "tokenizer")
# Where LightX2V also looks for companions (`find_torch_model_path`).
LIGHTX2V_SUBDIRS = ("original", "fp8", "int8", "distill_models", "distill_fp8", "distill_int8")
# diffusers pipeline folders: the component subfolders holding the companions
DIFFUSERS_SUBDIRS = ("text_encoder", "image_encoder", "vae")
COMPANION_SUFFIXES = (".pth", ".pt", ".safetensors")

# Names that mark transformers T5 / CLIP files (a diffusers folder's text_encoder/, image_encoder/).
HF_T5_Q = "encoder.block.0.layer.0.SelfAttention.q.weight"
HF_VISION = "vision_model."
HF_PROJECTION = "visual_projection.weight"
VAE_Z_DIMS = {VAEInfo.for_version(v).z_dim: v for v in ("2.1", "2.2")}
VAE_IN_CHANNELS = {"2.1": 3, "2.2": 12}  # Wan2.2 patchifies 2x2 pixels into 12 channels
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Companion:
    """A typed companion file: kind "t5" / "clip" / "vae", and the width that must match the DiT."""

    kind: str
    path: Path
    width: int  # T5 model dim, CLIP vision width, or VAE z_dim
    version: str | None = None  # VAE "2.1" / "2.2"
    stored: str | None = None  # "int8" / "fp8": a LightX2V quantized T5 / CLIP (its linears stored as codes)


def is_hf_t5(keys) -> bool:
    """True for transformers UMT5/T5 encoder key names."""
    return "shared.weight" in keys or HF_T5_Q in keys


def is_hf_clip(keys) -> bool:
    """True for transformers CLIP vision key names."""
    return HF_VISION + "embeddings.patch_embedding.weight" in keys


@dataclass(frozen=True)
class VAELayout:
    """Which Wan VAE a state dict holds, and under whose names."""

    version: str  # "2.1" or "2.2"
    layout: str  # "official" or "diffusers"
    z_dim: int


def vae_layout(shapes: Shapes, where: str | Path) -> VAELayout | None:
    """The VAE a state dict holds (None: not a Wan VAE); the version from z_dim, checked against the input channels."""
    if "decoder.middle.0.residual.0.gamma" in shapes and "conv2.weight" in shapes and "encoder.conv1.weight" in shapes:
        layout, z_dim, channels = "official", shapes["conv2.weight"][0], shapes["encoder.conv1.weight"][1]
    elif "encoder.conv_in.weight" in shapes and "post_quant_conv.weight" in shapes and "decoder.conv_in.weight" in shapes:
        layout, z_dim, channels = "diffusers", shapes["post_quant_conv.weight"][1], shapes["encoder.conv_in.weight"][1]
    else:
        return None
    version = VAE_Z_DIMS.get(z_dim)
    if version is None or channels != VAE_IN_CHANNELS[version]:
        what = "a Wan VAE" if layout == "official" else "a diffusers AutoencoderKLWan"
        raise CheckpointError(
            f"{where}: {what} with z_dim {z_dim} and {channels} input channels;"
            " expected the Wan2.1 VAE (z 16, 3 channels) or the Wan2.2 VAE (z 48, 12 channels)"
        )
    return VAELayout(version, layout, z_dim)


def classify_companion(path: Path, shapes: Shapes, dtypes: Mapping[str, str]) -> Companion | None:
    """What a weights file is, from its tensor names and shapes (None: not a companion)."""
    if "token_embedding.weight" in shapes and "blocks.0.attn.q.weight" in shapes and "blocks.0.ffn.fc1.weight" in shapes:
        return Companion("t5", path, shapes["token_embedding.weight"][1], stored=stored_format(dtypes, "t5"))
    if "shared.weight" in shapes and HF_T5_Q in shapes:  # a diffusers text_encoder/ (transformers UMT5)
        if dtypes[HF_T5_Q] in QUANTIZED_DTYPES:
            return None
        return Companion("t5", path, shapes["shared.weight"][1])
    if is_hf_clip(shapes) and HF_PROJECTION in shapes:
        return Companion("clip", path, shapes[HF_VISION + "embeddings.patch_embedding.weight"][0])
    if "visual.patch_embedding.weight" in shapes and "visual.transformer.0.attn.to_qkv.weight" in shapes:
        return Companion("clip", path, shapes["visual.patch_embedding.weight"][0], stored=stored_format(dtypes, "clip"))
    vae = vae_layout(shapes, path)
    if vae is not None:
        return Companion("vae", path, vae.z_dim, vae.version)
    return None


def open_companion(path: str | Path) -> TensorSource:
    """A companion's tensors: one weights file, or an index with its shards (LightX2V's fp8/int8 codes read as real values)."""
    p = Path(path)
    source = ShardedSource(p) if is_index(p) else open_source(p)
    return ScaledSource(source) if holds_scales(source) else source


def companion_files(path: Path) -> list[Path]:
    """The files a companion is read from (an index and its shards, or the one file): what its digest covers."""
    return [path, *ShardedSource(path).shards] if is_index(path) else [path]


def read_companion(path: Path) -> Companion | None:
    """Type one weights file (or sharded index) from its header (no tensor data is read)."""
    src = open_companion(path)
    shapes, dtypes = {}, {}
    for k in src.keys():
        h = src.header(k)
        shapes[k], dtypes[k] = h.shape, h.dtype
    return classify_companion(path, shapes, dtypes)


def candidate_files(roots: list[Path], skip: set[Path]) -> list[Path]:
    """Weights files directly inside the roots, LightX2V's companion subfolders and diffusers component folders."""
    seen: list[Path] = []
    for root in roots:
        for folder in (root, *(root / s for s in LIGHTX2V_SUBDIRS + DIFFUSERS_SUBDIRS)):
            if not folder.is_dir():
                continue
            indexes = sorted(folder.glob("*" + INDEX_SUFFIX)) if folder.name in DIFFUSERS_SUBDIRS else []
            if indexes:  # a sharded diffusers component: its index stands for the shards
                seen += [p for p in indexes if p not in seen]
                continue
            for p in sorted(folder.iterdir()):
                if p.suffix in COMPANION_SUFFIXES and p.is_file() and p.resolve() not in skip and p not in seen:
                    seen.append(p)
    return seen


def pick(kind: str, found: list[Companion], official_name: str | None, config_key: str) -> Companion | None:
    """One companion of a kind: the only one, else the official file name, else an error listing them."""
    if len(found) <= 1:
        return found[0] if found else None
    named = [c for c in found if c.path.name == official_name]
    if len(named) == 1:
        return named[0]
    listing = ", ".join(str(c.path) for c in found)
    raise CheckpointError(f"several {kind} files found: {listing}; choose one with the config key {config_key!r}")


def find_tokenizer(roots: list[Path]) -> Path | None:
    """The first `google/umt5-xxl/` or `tokenizer/` folder holding a tokenizer.json.

    A folder with only a sentencepiece model is an error: the runtime reads tokenizer.json."""
    for root in roots:
        for sub in TOKENIZER_DIRS:
            if (root / sub / "tokenizer.json").is_file():
                return root / sub
    for root in roots:
        for sub in TOKENIZER_DIRS:
            if (root / sub / "spiece.model").is_file():
                raise CheckpointError(
                    f"{root / sub}: holds spiece.model but no tokenizer.json; the runtime tokenizer reads tokenizer.json"
                    " (the `tokenizers` format): add the tokenizer.json of google/umt5-xxl to that folder"
                )
    return None
