"""Resolve what a user points at (folder, file or LightX2V config) into a described Wan model.

`resolve_model` reads headers only: it finds each DiT expert's files, builds a lazy
`CheckpointView`, infers the architecture from shapes (cross-checked against config.json),
decides family and task, finds the T5 / CLIP / VAE / tokenizer companions, and turns the
config's sampling keys into `SamplingDefaults`.

Family/task rules (shapes): Animate modules (pose_patch_embedding, motion_encoder) -> wan2.2
animate; two experts -> wan2.2 A14B (in_dim 16 t2v, 36 i2v); out_dim 48 ->
wan2.2 ti2v; in_dim 36 with img_emb -> wan2.1 i2v (flf2v with img_emb.emb_pos); in_dim 36
without img_emb -> wan2.2 i2v; VACE blocks -> wan2.1 vace; in_dim 16 -> wan2.1 t2v.  Modules of
a Wan variant wanrt does not implement (`variants.VARIANTS`) are an error naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wanrt.engines.defaults import default_sampling
from wanrt.engines.errors import CheckpointError, WanrtError
from wanrt.engines.model import DiTConfig, SamplingDefaults
from wanrt.engines.schema import load_json

from . import lightx2v_config as lx
from .companions import (
    CLIP_FILE, T5_FILE, VAE_FILES, Companion, candidate_files, find_tokenizer, pick, read_companion,
)
from .animate_keys import animate_summary, find_relighting_lora, has_diffusers_animate_keys
from .dit_config import check_config_json, declared_vace_layers, describe, infer_dit_config, is_dit_config_json
from .keys import looks_like_lora, normalize_keys
from .safetensors_file import SafetensorsFile
from .shards import INDEX_SUFFIX, ShardIndex, check_index, index_listing, read_index
from .variants import incomplete_variant, unimplemented_variant
from .view import WEIGHT_FILE_SUFFIXES, CheckpointView, is_block_linear, open_source

MOE_FOLDERS = {"high_noise": "high_noise_model", "low_noise": "low_noise_model"}
DIFFUSERS_FOLDERS = {"high_noise": "transformer", "low_noise": "transformer_2"}  # diffusers: transformer runs at high noise
STORAGE_PRECISIONS = ("fp32", "fp16", "bf16", "fp8_e4m3", "int8")  # what block linear weights may be stored as
CONVERT_METADATA_KEY = "wanrt_convert"  # safetensors metadata `cli.py convert` writes (JSON: source, expert, family, task, ...)


@dataclass
class Expert:
    """One DiT expert: its name ("dit", "high_noise", "low_noise") and a lazy view of its weights."""

    name: str
    view: CheckpointView
    location: Path  # the file or folder it was read from
    config_json: Path | None = None  # the config.json its shapes were checked against

    @property
    def files(self) -> list[Path]:
        return list(self.view.files)

    @property
    def layout(self) -> str:
        return self.view.layout


@dataclass
class ResolvedModel:
    """Everything known about a Wan model before any weight is read."""

    family: str
    task: str
    experts: list[Expert]
    dit: DiTConfig
    text_encoder: Path | None
    image_encoder: Path | None
    vae: Path | None
    vae_version: str | None
    tokenizer: Path | None
    sampling: SamplingDefaults
    config: dict[str, Any] | None
    source: Path
    config_path: Path | None = None
    notes: list[str] = field(default_factory=list)  # non-fatal findings worth showing the user
    lone_expert: str | None = None  # "high_noise"/"low_noise" when the single DiT is one expert of a Wan2.2 A14B pair
    named_loras: dict[str, Path] = field(default_factory=dict)  # LoRAs shipped with the model (`--lora NAME`): Animate's relighting

    def moe_expert(self, expert: Expert) -> str | None:
        """Which Wan2.2 A14B expert `expert` holds ("high_noise"/"low_noise"), None for a single-DiT model."""
        return self.lone_expert if expert.name == "dit" else expert.name

    def expert(self, name: str) -> Expert:
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """The `inspect --json` document."""
        experts = []
        for e in self.experts:
            experts.append({
                "name": e.name,
                "moe_expert": self.moe_expert(e),
                "files": [str(p) for p in e.files],
                "layout": e.layout,
                "precision": e.view.precision,
                "scale": e.view.scale,
                "num_params": e.view.num_params,
                "num_tensors": len(e.view),
                "unknown_keys": list(e.view.unknown_keys),
            })
        d = self.dit
        return {
            "family": self.family,
            "task": self.task,
            "experts": experts,
            "dit": {
                "dim": d.dim, "ffn_dim": d.ffn_dim, "num_heads": d.num_heads, "num_layers": d.num_layers,
                "in_dim": d.in_dim, "out_dim": d.out_dim, "text_dim": d.text_dim, "freq_dim": d.freq_dim,
                "image_branch": d.image_branch, "clip_dim": d.clip_dim if d.image_branch else None,
                "clip_tokens": d.clip_tokens, "patch_size": list(d.patch_size),
                "vace_blocks": len(d.vace_layers) if d.vace else None,
                "vace_layers": list(d.vace_layers) if d.vace else None, "vace_in_dim": d.vace_in_dim,
                **({"animate": animate_summary(d.animate, d.num_layers)} if d.animate is not None else {}),
            },
            "named_loras": {name: str(p) for name, p in self.named_loras.items()},
            "text_encoder": _str(self.text_encoder),
            "image_encoder": _str(self.image_encoder),
            "vae": _str(self.vae),
            "vae_version": self.vae_version,
            "tokenizer": _str(self.tokenizer),
            "sampling": self.sampling.to_dict(),
            "config": _str(self.config_path),
            "notes": list(self.notes),
        }


def _str(p: Path | None) -> str | None:
    return None if p is None else str(p)


# --------------------------------------------------------------------------------------------
# Locating one expert's weight files


def _file_kind(path: Path) -> str:
    """"dit", "lora" or "other" from a weights file's header."""
    keys = open_source(path).keys()
    if looks_like_lora(keys):
        return "lora"
    km = normalize_keys(keys, str(path))
    return "dit" if km.to_source and len(km.to_source) >= len(km.unknown) else "other"


def _lora_error(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: is a LoRA (lora_up/lora_down or diff keys), not a model; pass the base model as the model"
        " and this file with --lora"
    )


def _folder_files(folder: Path, expert: str) -> tuple[list[Path], ShardIndex | None]:
    """The DiT files in a folder (index honoured; one candidate auto-picked), and the index used."""
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several safetensors indexes ({', '.join(p.name for p in indexes)}); keep one")
    if indexes:
        index = read_index(indexes[0])
        return index.shards, index
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_FILE_SUFFIXES and p.is_file())
    if not files:
        if not any(folder.iterdir()):
            raise CheckpointError(f"{folder}: empty folder: no model files")
        raise CheckpointError(f"{folder}: no DiT weights (.safetensors or .pth) found")
    kinds = {p: _file_kind(p) for p in files}
    dits = [p for p in files if kinds[p] == "dit"]  # T5 / CLIP / VAE .pth companions are "other"
    if not dits:
        loras = [p for p in files if kinds[p] == "lora"]
        if loras:
            raise _lora_error(loras[0])
        raise CheckpointError(f"{folder}: no Wan DiT weights among {', '.join(p.name for p in files)}")
    if len(dits) > 1:
        quantized, original = lx.EXPERT_KEYS[expert]
        raise CheckpointError(
            f"{folder}: several candidate DiT files ({', '.join(p.name for p in dits)}) and no index;"
            f" choose one with the config key {original!r} (or {quantized!r} with dit_quantized)"
        )
    return dits, None


def _dit_config_json(folder: Path) -> Path | None:
    p = folder / "config.json"
    return p if p.is_file() and is_dit_config_json(lx.read_json(p, "config.json")) else None


def _open_expert(name: str, location: Path, root: Path | None) -> Expert:
    """Build one expert's view from a weights file or a folder."""
    if location.is_dir():
        files, index = _folder_files(location, name)
        folder = location
    elif location.is_file() and index_listing(location) is not None:
        files, index = _folder_files(location.parent, name)  # one shard of a sharded model: take them all
        folder = location.parent
    elif location.is_file():
        if location.suffix not in WEIGHT_FILE_SUFFIXES:
            raise CheckpointError(f"{location}: unsupported weights file type {location.suffix!r}; expected .safetensors or .pth")
        files, index, folder = [location], None, location.parent
    else:
        raise CheckpointError(f"{location}: no such file or folder")
    sources = [open_source(p) for p in files]
    if any(looks_like_lora(s.keys()) for s in sources):
        raise _lora_error(next(s.path for s in sources if looks_like_lora(s.keys())))
    named = sources
    if any(has_diffusers_animate_keys(s.keys()) for s in sources):  # diffusers Animate: split/reshaped tensors combined
        from .companion_keys import diffusers_animate_source  # the name maps: only for such a file (inspect stays light)

        named = [diffusers_animate_source(s) for s in sources]
    view = CheckpointView(named)
    if index is not None:
        check_index(index, {s.path: s for s in sources})
        if view.layout == "official" and any(p.name == "non_block.safetensors" for p in files):
            view.layout = "lightx2v"  # LightX2V --save_by_block: block_N + non_block + index
    config_json = _dit_config_json(folder)
    if config_json is None and root is not None and root != folder:
        config_json = _dit_config_json(root)
    return Expert(name, view, location, config_json)


def _where(expert: Expert) -> str:
    files = expert.files
    return str(files[0]) if len(files) == 1 else f"{expert.location} ({len(files)} files)"


# --------------------------------------------------------------------------------------------
# The model


def resolve_model(path: str | os.PathLike, config: str | os.PathLike | None = None) -> ResolvedModel:
    """Describe the Wan model at `path` (folder, weights file or LightX2V config), optionally with a LightX2V config."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    cfg: dict[str, Any] | None = None
    cfg_path: Path | None = Path(config).expanduser() if config is not None else None
    if cfg_path is not None:
        cfg = lx.read_json(cfg_path, "LightX2V config")
    if path.is_file() and path.suffix == ".json":
        path, cfg, cfg_path = _json_argument(path, cfg, cfg_path)

    root = path if path.is_dir() else path.parent
    notes: list[str] = []
    scheme = lx.quant_scheme(cfg, cfg_path) if cfg is not None else None
    experts = _locate_experts(path, root, cfg, cfg_path, notes)
    if cfg is not None:
        notes += lx.config_notes(cfg, [e.name for e in experts])
    for e in experts:
        if looks_like_lora(e.view.keymap.unknown) and not e.view.keymap.to_source:
            raise _lora_error(e.files[0])
        unimplemented_variant(e.view.unknown_keys, _where(e), bare=_bare(e))
    dit = _dit_config(experts)
    if dit.vace and all(_declared_vace_layers(e) is None for e in experts):
        notes.append(f"vace_layers {list(dit.vace_layers)}: no config.json (or convert metadata) says where the {len(dit.vace_layers)} VACE blocks"
                     " feed in; they are evenly spaced, as in the official VACE-1.3B and VACE-14B releases")
    for e in experts:
        _check_storage(e)
    family, task = _family_task(experts, dit)
    for e in experts:
        incomplete_variant(e.view.unknown_keys, task, _where(e), bare=_bare(e))
    record = _convert_record(experts)
    lone, known_from = _lone_expert_name(experts, record)
    if lone is not None:
        family = "wan2.2"  # one expert of a Wan2.2 A14B pair, used on its own
        notes.append(f"{experts[0].location} {known_from} the {lone} expert of a Wan2.2 A14B model used alone;"
                     " pass the model folder (or both experts in a config) to export both experts")
    if record is not None and (record.get("family"), record.get("task")) not in ((None, None), (family, task)):
        notes.append(f"{experts[0].files[0]}: its {CONVERT_METADATA_KEY} metadata says {record.get('family')} {record.get('task')},"
                     f" but the tensor shapes say {family} {task}; the shapes are used")
    for e in experts:
        if e.config_json is not None:
            check_config_json(dit, lx.read_json(e.config_json, "config.json"), e.config_json, _where(e), task, e.view.precision)
        if e.view.unknown_keys:
            shown = ", ".join(e.view.unknown_keys[:3])
            notes.append(f"{e.name}: {len(e.view.unknown_keys)} unknown tensor(s) ignored ({shown})")
        if len(e.view.precisions) > 1:
            notes.append(f"{e.name}: block linears are stored in mixed precisions {e.view.precisions}")
    if scheme is not None:
        _check_scheme(experts, scheme, cfg_path)
    elif any(e.view.precision in ("fp8_e4m3", "int8") for e in experts) and cfg is not None:
        notes.append("the DiT is stored as fp8/int8 but the config does not set dit_quantized; the scales in the file are used")

    companion_roots = [root] + ([Path(cfg["model_path"]).expanduser()] if cfg and isinstance(cfg.get("model_path"), str) else [])
    if root.name in (*MOE_FOLDERS.values(), *DIFFUSERS_FOLDERS.values()):
        companion_roots.append(root.parent)  # an expert folder was given: the encoders sit beside it
    t5, clip, vae, tokenizer = _companions(companion_roots, experts, dit, cfg, cfg_path, notes)

    sampling = default_sampling(family, task, dim=dit.dim, moe=len(experts) == 2 or lone is not None)
    if lone is not None:
        sampling = replace(sampling, boundary=None)  # one expert: nothing to switch to
    if cfg is not None:
        sampling = lx.sampling_from_config(sampling, cfg, cfg_path)
    if dit.image_branch and clip is None:
        notes.append(f"{family} {task} needs the CLIP image encoder ({CLIP_FILE}) but none was found")
    if t5 is None:
        notes.append(f"no T5 text encoder ({T5_FILE}) found")
    named_loras = {}
    if task == "animate" and (relighting := find_relighting_lora(companion_roots)) is not None:
        named_loras["relighting"] = relighting
        notes.append(f"relighting LoRA found ({relighting}); merge it with --lora relighting (the official replacement mode uses it)")
    return ResolvedModel(
        family=family, task=task, experts=experts, dit=dit,
        text_encoder=t5.path if t5 else None,
        image_encoder=clip.path if clip else None,
        vae=vae.path if vae else None,
        vae_version=vae.version if vae else None,
        tokenizer=tokenizer,
        sampling=sampling, config=cfg, source=path, config_path=cfg_path, notes=notes, lone_expert=lone,
        named_loras=named_loras,
    )


def _json_argument(path: Path, cfg: dict | None, cfg_path: Path | None) -> tuple[Path, dict | None, Path | None]:
    """A .json PATH: a DiT config.json or index stands for its folder; anything else is a LightX2V config."""
    data = lx.read_json(path)
    if is_dit_config_json(data) or "weight_map" in data:
        return path.parent, cfg, cfg_path
    if cfg is not None:
        raise CheckpointError(f"{path}: a LightX2V config given as the model while --config {cfg_path} is given too; pass one")
    model_path = data.get("model_path")
    if isinstance(model_path, str) and model_path:
        root = Path(model_path).expanduser()
        if not root.is_absolute() and not root.exists():
            root = path.parent / root
        if not root.exists():
            raise CheckpointError(f"{path}: model_path points at {model_path!r}, which does not exist")
        return root, data, path
    return path.parent, data, path


def _locate_experts(path: Path, root: Path, cfg: dict | None, cfg_path: Path | None, notes: list[str]) -> list[Expert]:
    """The DiT expert(s): MoE when the config names experts or the folder has expert subfolders."""
    folder = path if path.is_dir() else None
    moe_folders = folder is not None and all((folder / f).is_dir() for f in MOE_FOLDERS.values())
    diffusers_moe = folder is not None and all((folder / f).is_dir() for f in DIFFUSERS_FOLDERS.values())
    if (cfg is not None and lx.names_moe(cfg)) or moe_folders or diffusers_moe:
        if cfg is not None and any(cfg.get(k) for k in lx.EXPERT_KEYS["dit"]):
            notes.append("dit_original_ckpt / dit_quantized_ckpt are ignored for a two-expert (Wan2.2 A14B) model")
        experts = []
        for name in ("high_noise", "low_noise"):
            location, _ = lx.expert_checkpoint(cfg, name, cfg_path) if cfg is not None else (None, None)
            if location is None:
                sub = DIFFUSERS_FOLDERS[name] if diffusers_moe and not moe_folders else MOE_FOLDERS[name]
                location = root / sub
                if not location.is_dir():
                    q, o = lx.EXPERT_KEYS[name]
                    raise CheckpointError(
                        f"{root}: no {MOE_FOLDERS[name]}/ folder for the {name} expert; set {o!r} (or {q!r}) in the config"
                    )
            experts.append(_open_expert(name, location, root))
        return experts
    location = None
    if cfg is not None:
        location, _ = lx.expert_checkpoint(cfg, "dit", cfg_path)
    if location is None:
        location = path
        if folder is not None and (folder / "transformer").is_dir() and not any(folder.glob("*.safetensors")):
            location = folder / "transformer"  # diffusers pipeline folder
    return [_open_expert("dit", location, root)]


def _dit_config(experts: list[Expert]) -> DiTConfig:
    configs = [infer_dit_config(e.view.shapes(), _where(e), e.view.unknown_keys, _declared_vace_layers(e)) for e in experts]
    if len(configs) == 2 and configs[0] != configs[1]:
        raise CheckpointError(
            f"the high_noise expert ({_where(experts[0])}: {describe(configs[0])}) and the low_noise expert"
            f" ({_where(experts[1])}: {describe(configs[1])}) have different architectures"
        )
    return configs[0]


def _bare(expert: Expert):
    """A stored key of this expert -> its name without the file's prefix (`model.diffusion_model.`, ...)."""
    prefix = expert.view.keymap.prefix
    return lambda key: key.removeprefix(prefix)


def _declared_vace_layers(expert: Expert) -> tuple[int, ...] | None:
    """The vace_layers of the expert's config.json, else of its `cli.py convert` metadata, if either says."""
    if expert.config_json is not None:
        layers = declared_vace_layers(lx.read_json(expert.config_json, "config.json"), expert.config_json)
        if layers is not None:
            return layers
    record = _convert_record([expert])
    if record is not None and record.get("vace_layers") is not None:
        return declared_vace_layers(record, Path(f"{expert.files[0]} ({CONVERT_METADATA_KEY} metadata)"))
    return None


def _check_storage(expert: Expert) -> None:
    """Every block linear weight is stored in one of STORAGE_PRECISIONS (fp8_e5m2, fp64, ... are refused by key)."""
    for key, ref in expert.view.items():
        if is_block_linear(key) and ref.dtype not in STORAGE_PRECISIONS:
            raise CheckpointError(
                f"{ref.source.path}: {ref.source_key!r} is stored as {ref.dtype}, an unsupported storage dtype for block linear"
                f" weights; expected one of {', '.join(STORAGE_PRECISIONS)} (fp8 as float8_e4m3fn)"
            )


def _family_task(experts: list[Expert], dit: DiTConfig) -> tuple[str, str]:
    where = _where(experts[0])
    if len(experts) == 2:
        if dit.vace:
            raise CheckpointError(f"{where}: two experts with VACE blocks (a Wan2.2 A14B VACE model); wanrt runs"
                                  " Wan2.1-VACE (one DiT) only")
        tasks = {16: "t2v", 36: "i2v"}
        if dit.in_dim not in tasks or dit.out_dim != 16:
            raise CheckpointError(f"{where}: a two-expert model with in_dim {dit.in_dim}, out_dim {dit.out_dim}; Wan2.2 A14B has 16 or 36 in, 16 out")
        return "wan2.2", tasks[dit.in_dim]
    if dit.animate is not None:
        if (dit.in_dim, dit.out_dim, dit.image_branch) != (36, 16, True):
            raise CheckpointError(f"{where}: Wan2.2-Animate modules on a DiT with in_dim {dit.in_dim}, out_dim {dit.out_dim},"
                                  f" image branch {dit.image_branch}; Animate-14B is the Wan2.1 I2V DiT (36 in, 16 out, img_emb)")
        return "wan2.2", "animate"
    if dit.out_dim == 48:
        if dit.in_dim != 48:
            raise CheckpointError(f"{where}: out_dim 48 (Wan2.2 TI2V-5B) needs in_dim 48, found {dit.in_dim}")
        return "wan2.2", "ti2v"
    if dit.out_dim != 16:
        raise CheckpointError(f"{where}: out_dim {dit.out_dim}; Wan models output 16 (Wan2.1 VAE) or 48 (Wan2.2 VAE) channels")
    if dit.vace:
        if dit.in_dim != 16 or dit.image_branch:
            raise CheckpointError(
                f"{where}: VACE blocks on a DiT with in_dim {dit.in_dim}{' and an image branch' if dit.image_branch else ''};"
                " Wan2.1-VACE is a text-to-video DiT (in_dim 16, no img_emb)"
            )
        return "wan2.1", "vace"
    if dit.in_dim == 36:
        if dit.image_branch:
            return "wan2.1", "flf2v" if dit.clip_tokens == 514 else "i2v"
        return "wan2.2", "i2v"
    if dit.in_dim == 16:
        if dit.image_branch:
            raise CheckpointError(f"{where}: an image branch (img_emb) with in_dim 16; Wan i2v/flf2v models take 36 channels")
        return "wan2.1", "t2v"
    raise CheckpointError(f"{where}: in_dim {dit.in_dim}; Wan DiTs take 16 (t2v), 36 (i2v/flf2v) or 48 (ti2v) channels")


def _convert_record(experts: list[Expert]) -> dict[str, Any] | None:
    """The `cli.py convert` metadata of a single-file DiT (what it was converted from), if it has readable metadata."""
    if len(experts) != 1 or len(experts[0].view.sources) != 1:
        return None
    raw = experts[0].view.sources[0].metadata.get(CONVERT_METADATA_KEY)
    try:
        record = load_json(raw, CONVERT_METADATA_KEY) if raw else None
    except WanrtError:
        return None
    return record if isinstance(record, dict) else None


def _lone_expert_name(experts: list[Expert], record: dict[str, Any] | None) -> tuple[str | None, str]:
    """("high_noise"/"low_noise", how it is known) when a single expert is one of a Wan2.2 pair, else (None, "").

    The convert metadata's expert decides; without it, the folder or file name does.
    """
    if len(experts) != 1:
        return None, ""
    if record is not None and record.get("expert") in MOE_FOLDERS:
        return record["expert"], f"is, by its {CONVERT_METADATA_KEY} metadata,"
    names = [*(p.name for p in experts[0].files), *(p.parent.name for p in experts[0].files)]
    for expert in MOE_FOLDERS:
        if any(expert in n for n in names):
            return expert, "looks like"
    return None, ""


def _check_scheme(experts: list[Expert], scheme: str, cfg_path: Path) -> None:
    precision, scale = lx.QUANT_SCHEMES[scheme]
    for e in experts:
        if (e.view.precision, e.view.scale) != (precision, scale):
            raise CheckpointError(
                f"{cfg_path}: dit_quant_scheme {scheme!r} reads {precision} block linears with a {scale.replace('_', '-')}"
                f" weight_scale, but {_where(e)} stores them as {e.view.precision} ({e.view.scale or 'no scale'})"
            )


def _companions(roots: list[Path], experts: list[Expert], dit: DiTConfig, cfg: dict | None, cfg_path: Path | None,
                notes: list[str]) -> tuple[Companion | None, Companion | None, Companion | None, Path | None]:
    """T5, CLIP, VAE and tokenizer: from config keys when set, else typed files in the model folder."""
    dit_files = {p.resolve() for e in experts for p in e.files}
    found: dict[str, list[Companion]] = {"t5": [], "clip": [], "vae": []}
    for p in candidate_files(roots, dit_files):
        if p.suffix == ".safetensors" and _safetensors_is_dit_or_lora(p):
            continue
        c = read_companion(p)
        if c is not None:
            found[c.kind].append(c)
    chosen: dict[str, Companion | None] = {}
    for kind, key in (("t5", "t5_original_ckpt"), ("clip", "clip_original_ckpt"), ("vae", "vae_path")):
        if kind != "vae" and cfg is not None and cfg.get(f"{kind}_quantized", False) is True and (kind == "t5" or dit.image_branch):
            chosen[kind] = _quantized_companion(kind, cfg, cfg_path, roots)
            continue
        explicit = lx.config_file(cfg, key, cfg_path) if cfg is not None else None
        if explicit is not None:
            c = read_companion(explicit) if explicit.is_file() else None
            if c is None or c.kind != kind:
                raise CheckpointError(f"{cfg_path}: {key} points at {explicit}, which is not a {kind.upper()} checkpoint")
            chosen[kind] = c
            continue
        cands = found[kind]
        if kind == "vae":
            fitting = [c for c in cands if c.width == dit.out_dim]
            cands = fitting or cands
        official = VAE_FILES.get("2.2" if dit.out_dim == 48 else "2.1") if kind == "vae" else {"t5": T5_FILE, "clip": CLIP_FILE}[kind]
        chosen[kind] = pick(kind.upper(), cands, official, key)
    t5, clip, vae = chosen["t5"], chosen["clip"], chosen["vae"]
    if t5 is not None and t5.width != dit.text_dim:
        raise CheckpointError(f"{t5.path}: T5 width {t5.width} does not match the DiT's text_dim {dit.text_dim}")
    if clip is not None and dit.image_branch and clip.width != dit.clip_dim:
        raise CheckpointError(f"{clip.path}: CLIP width {clip.width} does not match the DiT's img_emb input {dit.clip_dim}")
    if clip is not None and not dit.image_branch:
        clip = None  # Wan2.2 folders and t2v models use no image encoder
    if vae is not None and vae.width != dit.out_dim:
        raise CheckpointError(
            f"{vae.path}: Wan{vae.version} VAE has z_dim {vae.width} but the DiT outputs {dit.out_dim} latent channels"
        )
    tokenizer = None
    explicit_tok = lx.config_file(cfg, "t5_tokenizer_path", cfg_path) if cfg is not None else None
    if explicit_tok is not None:
        if not (explicit_tok / "tokenizer.json").is_file():
            raise CheckpointError(f"{cfg_path}: t5_tokenizer_path points at {explicit_tok}, which holds no tokenizer.json")
        tokenizer = explicit_tok
    else:
        tokenizer = find_tokenizer(roots)
    return t5, clip, vae, tokenizer


def _quantized_companion(kind: str, cfg: dict, cfg_path: Path, roots: list[Path]) -> Companion:
    """The LightX2V fp8/int8 T5 / CLIP a config with `<kind>_quantized: true` selects, checked against its scheme.

    `<kind>_quantized_ckpt`, else LightX2V's default file name under the model folders (`encoder_quant`)."""
    from .companions import open_companion
    from .encoder_quant import RULES, check_quantized_file, check_scheme, default_file, scheme_format

    rule = RULES[kind]
    flag, scheme_key, ckpt_key = rule.config_keys
    scheme = check_scheme(cfg, kind, cfg_path)
    path = lx.config_file(cfg, ckpt_key, cfg_path) or default_file(kind, scheme, roots)
    if path is None:
        name = rule.file_name.format(fmt=scheme_format(scheme))
        raise CheckpointError(f"{cfg_path}: {flag} is true but {ckpt_key} is not set and no {name} is in"
                              f" {', '.join(str(r) for r in roots)} (or the subfolders int8/, fp8/, original/, ... there)")  # fmt: skip
    found = read_companion(path) if path.is_file() else None
    if found is None or found.kind != kind:
        raise CheckpointError(f"{cfg_path}: {ckpt_key if cfg.get(ckpt_key) else flag} selects {path}, which is not a"
                              f" {kind.upper()} checkpoint")  # fmt: skip
    check_quantized_file(open_companion(path), kind, scheme, f"{scheme_key} {scheme!r}")
    return found


def _safetensors_is_dit_or_lora(path: Path) -> bool:
    keys = SafetensorsFile(path).keys()
    return looks_like_lora(keys) or bool(normalize_keys(keys, str(path)).to_source)
