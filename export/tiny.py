"""`make-tiny-model`: random Wan checkpoints in the real on-disk layouts, for tests, demos and benchmarks.

What each layout writes (file names from the Wan-AI / LightX2V / diffusers releases):

- `official`: `diffusion_pytorch_model-0000N-of-0000M.safetensors` (fp32, as the Wan-AI repos)
  + `diffusion_pytorch_model.safetensors.index.json` + `config.json` (`WanModel` fields); a DiT
  that fits one 10 GB shard is a single `diffusion_pytorch_model.safetensors` (as T2V-1.3B).
- `lightx2v-bf16` / `-fp8` / `-int8`: one `wan2.1_..._lightx2v_4step.safetensors` file; fp8 e4m3 /
  int8 block linears with per-output-channel fp32 `<layer>.weight_scale` [out,1], quantized from
  the fp32 official values (as LightX2V's `tools/convert` does from the official release); every
  other tensor bf16 (`--non_linear_dtype bf16`).
- `comfyui-fp8`: the `_comfyui` variant: fp8 block linears with a per-tensor fp32 scalar
  `<layer>.scale_weight` and the `scaled_fp8` marker (fp8 zeros(2)).  Keys are bare official
  names, as LightX2V's converter writes them; ComfyUI (`unet_prefix_from_state_dict`) and Kijai's
  loader accept both bare and `model.diffusion_model.` keys, and so does `inspect`.
How each layout stores each tensor is `export.checkpoint.storage.LAYOUTS`, which `convert` writes too.
- `diffusers`: `model_index.json`, `transformer/` (+ `transformer_2/` = low-noise expert for
  Wan2.2 A14B) holding `WanTransformer3DModel` weights (fp32, sharded + index) and config,
  `scheduler/`, `tokenizer/` (tokenizer.json as below), `text_encoder/` (transformers
  `UMT5EncoderModel` names), `vae/` (diffusers `AutoencoderKLWan` names), and for Wan2.1
  i2v/flf2v `image_encoder/` (`CLIPVisionModelWithProjection` names), each one fp32
  `model.safetensors` / `diffusion_pytorch_model.safetensors` + `config.json`.  They hold the
  official layout's companion values (bf16 T5, fp16 CLIP, fp32 VAE) exactly, in fp32.

Wan2.2 A14B writes `high_noise_model/` and `low_noise_model/` (official and LightX2V layouts).
Wan2.1-VACE (`--task vace`) adds `vace_blocks.N.*` (Wan blocks, block 0 with `before_proj`, each with
`after_proj`) and `vace_patch_embedding` (96 control channels); config.json says `vace_layers` (tiny: 4
layers, VACE blocks at 0 and 2; `--dims 1.3B`: every 2nd of 30; `--dims 14B`: every 5th of 40).
Companions (official and LightX2V layouts): `models_t5_umt5-xxl-enc-bf16.pth` (bf16), for Wan2.1 i2v/flf2v
`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (fp16, `visual.*` + `log_scale`),
`Wan2.1_VAE.pth` / `Wan2.2_VAE.pth` (fp32), and `google/umt5-xxl/` (tokenizer.json: Unigram +
Metaspace with `<pad>`=0, `</s>`=1, `<unk>`=2, `</s>` appended).  `--quantized-encoders int8|fp8`
writes LightX2V's `models_t5_umt5-xxl-enc-{fmt}.pth` / `..._huge-14-{fmt}.pth` instead of the float
T5 / CLIP: what its converter (`-t wan_t5|wan_clip --quantized`) writes from them.

Weights are random but deterministic: each tensor's generator is seeded from (seed, expert,
official key), so every layout of one seed holds the same real values.  `--dims 1.3B|14B|5B[:N]`
writes real-sized DiT shapes with N layers, streamed one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import click
import torch
from tqdm import tqdm

from wanrt.calibration.quant import quantize
from wanrt.engines.defaults import NEGATIVE_PROMPT
from wanrt.engines.errors import WanrtError
from wanrt.engines.files import atomic_output
from wanrt.engines.model import AnimateConfig, DiTConfig
from wanrt.export.checkpoint.dit_config import CLIP_TOKENS_FLF2V, CLIP_TOKENS_I2V, HEAD_DIM, expected_shapes
from wanrt.export.checkpoint.animate_keys import RELIGHTING_FILES, diffusers_animate_names, is_animate_key
from wanrt.export.checkpoint.keys import official_to_diffusers
from wanrt.export.checkpoint.names import SAME, Transform
from wanrt.export.checkpoint.safetensors_file import ITEMSIZE, torch_dtype
from wanrt.export.checkpoint.safetensors_writer import SafetensorsWriter, TensorSpec, build_header
from wanrt.export.checkpoint.storage import LAYOUTS as STORAGE_LAYOUTS
from wanrt.export.checkpoint.storage import StoredTensor, TensorStorage, is_block_linear, quantizable

FAMILY_TASKS = {"wan2.1": ("t2v", "i2v", "flf2v", "vace"), "wan2.2": ("t2v", "i2v", "ti2v", "animate")}
# --layout name -> (storage layout, code format of its block linears or None)
TINY_LAYOUTS: dict[str, tuple[str, str | None]] = {
    "official": ("official", None),
    "lightx2v-bf16": ("lightx2v", None),
    "lightx2v-fp8": ("lightx2v", "fp8"),
    "lightx2v-int8": ("lightx2v", "int8"),
    "comfyui-fp8": ("comfyui", "fp8"),
    "diffusers": ("diffusers", None),
}
LAYOUTS = tuple(TINY_LAYOUTS)
# name -> (dim, ffn_dim, num_layers) of the released models (wan/configs/*.py)
REAL_DIMS = {"1.3B": (1536, 8960, 30), "14B": (5120, 13824, 40), "5B": (3072, 14336, 30)}
TINY_DIMS = (2 * HEAD_DIM, 512, 2)
TASK_CHANNELS = {"t2v": (16, 16), "i2v": (36, 16), "flf2v": (36, 16), "ti2v": (48, 48), "vace": (16, 16), "animate": (36, 16)}
# VACE: control channels (16 inactive + 16 reactive latents + 8x8 mask), the tiny model's layers and VACE layers,
# and the released models' hint layers (VACE-1.3B: every 2nd of 30; VACE-14B: every 5th of 40)
VACE_IN_DIM = 96
TINY_VACE_LAYERS = (4, (0, 2))
REAL_VACE_LAYERS = {"1.3B": tuple(range(0, 30, 2)), "14B": tuple(range(0, 40, 5))}
# Wan2.2-Animate: tiny motion/face encoders on 32 px face crops (three ResBlocks); five layers give one face adapter block.
TINY_ANIMATE = AnimateConfig(motion_size=32, motion_channels=(8, 16, 16, 16), motion_style_dim=32, motion_dim=4,
                             motion_out_dim=32, face_hidden_dim=32, face_heads=4)
REAL_TEXT_DIM, REAL_CLIP_DIM = 4096, 1280
OFFICIAL_SHARD_BYTES = 10 * 1024**3  # the Wan-AI shards are ~10 GB
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in umt5


# --------------------------------------------------------------------------------------------
# Random weights


def tensor_seed(seed: int, component: str, key: str) -> int:
    """A stable 63-bit seed for one tensor of one component."""
    digest = hashlib.sha256(f"{seed}:{component}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_tensor(key: str, shape: tuple[int, ...], seed: int, component: str) -> torch.Tensor:
    """Deterministic fp32 values of realistic size for a parameter named `key`.

    Norm gains are near 1, biases and embeddings small, matrices ~ N(0, 1/fan_in) (so activations
    stay O(1) through the layers), modulation tables ~ N(0, 1/dim) as the official init."""
    g = torch.Generator().manual_seed(tensor_seed(seed, component, key))
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "gamma" or (leaf == "weight" and len(shape) == 1):  # RMS/LayerNorm gains (linears are 2-D+)
        return 1.0 + 0.05 * x
    if leaf in ("bias", "beta"):
        return 0.02 * x
    if leaf == "modulation":
        return x / math.sqrt(shape[-1])
    if leaf == "weight" and len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return x / math.sqrt(fan_in)
    return 0.02 * x


# --------------------------------------------------------------------------------------------
# DiT configs and layouts


def parse_dims(dims: str | None) -> tuple[int, int, int]:
    """(dim, ffn_dim, num_layers) for `None` (tiny) or "1.3B" / "14B" / "5B" with an optional ":LAYERS"."""
    if dims is None:
        return TINY_DIMS
    name, _, layers = dims.partition(":")
    if name not in REAL_DIMS:
        raise WanrtError(f"--dims {dims!r}: expected one of {', '.join(REAL_DIMS)}, optionally with ':LAYERS'")
    dim, ffn, n = REAL_DIMS[name]
    if layers:
        if not layers.isdigit() or int(layers) < 1:
            raise WanrtError(f"--dims {dims!r}: LAYERS must be a positive integer")
        n = int(layers)
    return dim, ffn, n


def check_family_task(family: str, task: str) -> None:
    if family not in FAMILY_TASKS:
        raise WanrtError(f"unknown family {family!r}; expected one of {', '.join(FAMILY_TASKS)}")
    if task not in FAMILY_TASKS[family]:
        raise WanrtError(f"{family} has no {task!r} model; its tasks are {', '.join(FAMILY_TASKS[family])}")


def tiny_dit_config(family: str, task: str, dims: str | None = None) -> DiTConfig:
    """The DiT a tiny model of this family/task gets (text/CLIP widths match the written companions)."""
    from wanrt.export.models.clip import CLIPVisionConfig
    from wanrt.export.models.t5 import T5Config

    check_family_task(family, task)
    dim, ffn, layers = parse_dims(dims)
    in_dim, out_dim = TASK_CHANNELS[task]
    image_branch = (family == "wan2.1" and task in ("i2v", "flf2v")) or task == "animate"
    vace_layers: tuple[int, ...] = ()
    if task == "vace":
        if dims is None:
            layers, vace_layers = TINY_VACE_LAYERS
        elif ":" not in dims and dims in REAL_VACE_LAYERS:
            vace_layers = REAL_VACE_LAYERS[dims]
        else:
            vace_layers = tuple(range(0, layers, 2))  # the official default (`VaceWanModel`, vace_layers=None)
    animate = None
    if task == "animate":
        animate = AnimateConfig() if dims else TINY_ANIMATE
        layers = layers if dims else animate.adapter_every  # at least one face adapter block
    return DiTConfig(
        dim=dim, ffn_dim=ffn, num_heads=dim // HEAD_DIM, num_layers=layers, in_dim=in_dim, out_dim=out_dim,
        text_dim=REAL_TEXT_DIM if dims else T5Config.tiny().dim,
        image_branch=image_branch,
        clip_tokens=(CLIP_TOKENS_FLF2V if task == "flf2v" else CLIP_TOKENS_I2V) if image_branch else None,
        clip_dim=REAL_CLIP_DIM if dims else CLIPVisionConfig.tiny().width,
        vace_layers=vace_layers, vace_in_dim=VACE_IN_DIM if vace_layers else None,
        animate=animate,
    )


@dataclass(frozen=True)
class RenamedStorage(TensorStorage):
    """An official tensor another layout stores differently shaped or split (diffusers Animate: to_k + to_v, [C] biases)."""

    parts: tuple[StoredTensor, ...] = ()
    transform: Transform | None = None

    @property
    def entries(self) -> list[StoredTensor]:
        return list(self.parts)


def stored_tensors(layout: str, key: str, shape: tuple[int, ...], res_blocks: int = 0) -> TensorStorage:
    """How a `--layout` stores one official tensor (a quantized weight brings its scale).

    `res_blocks`: the Animate motion encoder's ResBlocks (diffusers names depend on it)."""
    name, fmt = TINY_LAYOUTS[layout]
    storage = STORAGE_LAYOUTS[name]
    if storage.names == "diffusers" and is_animate_key(key):
        m = diffusers_animate_names(res_blocks).match_official(key)
        how = m.transform or SAME
        shapes = [tuple(t.shape) for t in how.split(torch.empty(shape, device="meta"), len(m.theirs))]
        parts = tuple(StoredTensor(k, storage.float_dtype, s) for k, s in zip(m.theirs, shapes))
        return RenamedStorage(parts[0], parts=parts, transform=how)
    stored_key = official_to_diffusers(key) if storage.names == "diffusers" else key
    return storage.store(stored_key, shape, fmt if quantizable(key, shape) else None)


def layout_tensors(plan: TensorStorage, master: torch.Tensor) -> list[torch.Tensor]:
    """The stored tensors of one official tensor (its fp32 master values), in the order of `plan.entries`."""
    if isinstance(plan, RenamedStorage):
        parts = plan.transform.split(master, len(plan.parts))
        return [t.to(torch_dtype(e.dtype)).contiguous() for t, e in zip(parts, plan.parts)]
    if plan.fmt is None:
        return [master.to(torch_dtype(plan.tensor.dtype))]
    q, scale = quantize(master, plan.fmt, plan.axis)
    return [q, scale.to(torch_dtype(plan.scale.dtype)).reshape(plan.scale.shape)]


def lightx2v_file_name(family: str, task: str, layout: str, expert: str) -> str:
    """LightX2V's published naming (`model_structure.md`); flf2v/ti2v names follow the same pattern."""
    if family == "wan2.1":
        stem = {"t2v": "wan2.1_t2v_14b", "i2v": "wan2.1_i2v_480p", "flf2v": "wan2.1_flf2v_720p", "vace": "wan2.1_vace_14b"}[task]
    elif task == "ti2v":
        stem = "wan2.2_ti2v_5b"
    elif task == "animate":
        stem = "wan2.2_animate_14b"
    else:
        stem = f"wan2.2_{task}_A14b_{expert}"
    storage, fmt = TINY_LAYOUTS[layout]
    quant = {None: "", "fp8": "scaled_fp8_e4m3_", "int8": "int8_"}[fmt]
    tail = "_comfyui" if storage == "comfyui" else ""
    return f"{stem}_{quant}lightx2v_4step{tail}.safetensors"


def official_config_json(cfg: DiTConfig, task: str) -> dict:
    """config.json as the Wan-AI repos ship it (`WanModel` / `VaceWanModel` / `WanAnimateModel` fields)."""
    if cfg.animate is not None:  # Wan2.2-Animate-14B: `WanAnimateModel` (register_to_config fields), no model_type
        return {
            "_class_name": "WanAnimateModel", "_diffusers_version": "0.33.1", "cross_attn_norm": True, "dim": cfg.dim,
            "eps": cfg.eps, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": cfg.in_dim,
            "motion_encoder_dim": cfg.animate.motion_out_dim, "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
            "out_dim": cfg.out_dim, "patch_size": list(cfg.patch_size), "qk_norm": True, "text_dim": cfg.text_dim,
            "text_len": cfg.text_len, "use_context_parallel": False, "use_img_emb": True, "window_size": [-1, -1],
        }
    config = {
        "_class_name": "VaceWanModel" if cfg.vace else "WanModel", "_diffusers_version": "0.30.0", "dim": cfg.dim,
        "eps": cfg.eps, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": cfg.in_dim, "model_type": task,
        "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "out_dim": cfg.out_dim, "text_len": cfg.text_len,
    }
    if cfg.vace:
        config.update(vace_in_dim=cfg.vace_in_dim, vace_layers=list(cfg.vace_layers))
    return config


def diffusers_config_json(cfg: DiTConfig) -> dict:
    """transformer/config.json of a `WanTransformer3DModel` (`WanVACETransformer3DModel` for VACE,
    `WanAnimateTransformer3DModel` for Animate)."""
    if cfg.animate is not None:
        a = cfg.animate
        sizes = [a.motion_size >> i for i in range(len(a.motion_channels))]
        return {
            "_class_name": "WanAnimateTransformer3DModel", "_diffusers_version": "0.36.0",
            "added_kv_proj_dim": cfg.dim, "attention_head_dim": cfg.head_dim, "cross_attn_norm": True, "eps": cfg.eps,
            "face_encoder_hidden_dim": a.face_hidden_dim, "face_encoder_num_heads": a.face_heads, "ffn_dim": cfg.ffn_dim,
            "freq_dim": cfg.freq_dim, "image_dim": cfg.clip_dim, "in_channels": cfg.in_dim,
            "inject_face_latents_blocks": a.adapter_every, "latent_channels": a.pose_dim, "motion_dim": a.motion_dim,
            "motion_encoder_channel_sizes": {str(n): c for n, c in zip(sizes, a.motion_channels)},
            "motion_encoder_dim": a.motion_out_dim, "motion_encoder_size": a.motion_size, "motion_style_dim": a.motion_style_dim,
            "num_attention_heads": cfg.num_heads, "num_layers": cfg.num_layers, "out_channels": cfg.out_dim,
            "patch_size": list(cfg.patch_size), "pos_embed_seq_len": None, "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 1024, "text_dim": cfg.text_dim,
        }
    vace = {"vace_layers": list(cfg.vace_layers), "vace_in_channels": cfg.vace_in_dim} if cfg.vace else {}
    return {
        "_class_name": "WanVACETransformer3DModel" if cfg.vace else "WanTransformer3DModel", "_diffusers_version": "0.33.0",
        "added_kv_proj_dim": cfg.dim if cfg.image_branch else None, "attention_head_dim": cfg.head_dim,
        "cross_attn_norm": True, "eps": cfg.eps, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim,
        "image_dim": cfg.clip_dim if cfg.image_branch else None, "in_channels": cfg.in_dim,
        "num_attention_heads": cfg.num_heads, "num_layers": cfg.num_layers, "out_channels": cfg.out_dim,
        "patch_size": list(cfg.patch_size),
        "pos_embed_seq_len": CLIP_TOKENS_FLF2V if cfg.clip_tokens == CLIP_TOKENS_FLF2V else None,
        "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": cfg.text_dim, **vace,
    }


# --------------------------------------------------------------------------------------------
# Writing


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _nbytes(t: StoredTensor) -> int:
    return math.prod(t.shape) * ITEMSIZE[t.dtype]


def _shard(plan: list[tuple[str, TensorStorage]], max_bytes: int, min_shards: int) -> list[list[tuple[str, TensorStorage]]]:
    """Split official keys (in module order) into consecutive shards of near-equal size, each <= `max_bytes` when possible."""
    sizes = [sum(_nbytes(e) for e in st.entries) for _, st in plan]
    total = sum(sizes)
    n = max(min_shards, math.ceil(total / max_bytes))
    shards: list[list[tuple[str, TensorStorage]]] = [[] for _ in range(n)]
    done = 0
    for item, size in zip(plan, sizes):
        shards[min(n - 1, done * n // total)].append(item)  # by where the tensor starts
        done += size
    return [s for s in shards if s]


def write_dit(folder: Path, cfg: DiTConfig, layout: str, seed: int, component: str, file_name: str | None,
              min_shards: int, progress: Callable[[int], None], sparse: bool = False) -> list[Path]:
    """Write one DiT expert into `folder`, streaming one tensor at a time; returns the files written.

    `sparse` writes the headers only and leaves the data section as a hole (all zeros)."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = expected_shapes(cfg)
    res_blocks = cfg.animate.motion_res_blocks if cfg.animate is not None else 0
    plan = [(key, stored_tensors(layout, key, shape, res_blocks)) for key, shape in shapes.items()]
    if file_name is not None:  # single file
        shards = [plan]
        names = [file_name]
    else:
        shards = _shard(plan, OFFICIAL_SHARD_BYTES, min_shards)
        n = len(shards)
        names = ["diffusion_pytorch_model.safetensors"] if n == 1 else [
            f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
        ]
    storage = STORAGE_LAYOUTS[TINY_LAYOUTS[layout][0]]
    markers = storage.markers
    # the official Animate checkpoint's Blur kernels (constants; diffusers' converter drops them)
    constants = animate_blur_kernels(cfg, storage.float_dtype) if cfg.animate is not None and storage.names == "official" else {}
    weight_map: dict[str, str] = {}
    total = 0
    written = []
    for i, (name, shard) in enumerate(zip(names, shards)):
        shard_markers = markers if i == len(shards) - 1 else []
        shard_constants = constants if i == len(shards) - 1 else {}
        entries = [e for _, st in shard for e in st.entries] + shard_markers + [e for e, _ in shard_constants.values()]
        specs = [TensorSpec(e.key, torch_dtype(e.dtype), e.shape) for e in entries]
        if sparse:
            _write_sparse(folder / name, specs)
            weight_map.update({sp.key: name for sp in specs})
            total += sum(sp.nbytes for sp in specs)
            progress(sum(math.prod(st.tensor.shape) for _, st in shard))
            written.append(folder / name)
            continue
        with SafetensorsWriter(folder / name, specs, metadata={"format": "pt"}, fsync=False) as w:
            for key, st in shard:
                master = random_tensor(key, shapes[key], seed, component)
                for e, t in zip(st.entries, layout_tensors(st, master)):
                    w.write(e.key, t)
                    weight_map[e.key] = name
                    total += t.numel() * t.element_size()
                progress(master.numel())
            for marker in shard_markers:
                w.write(marker.key, torch.zeros(marker.shape, dtype=torch_dtype(marker.dtype)))
                weight_map[marker.key] = name
            for entry, value in shard_constants.values():
                w.write(entry.key, value)
                weight_map[entry.key] = name
        written.append(folder / name)
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(folder / "diffusion_pytorch_model.safetensors.index.json", index)
    return written


def animate_blur_kernels(cfg: DiTConfig, dtype: str) -> dict[str, tuple[StoredTensor, torch.Tensor]]:
    """The Blur buffers (`....conv2.0.kernel`, `....skip.0.kernel`: the normalized [1, 3, 3, 1] outer product) of each ResBlock."""
    from wanrt.export.models.wan_animate import blur_kernel

    kernel = blur_kernel(torch_dtype(dtype))
    out = {}
    for i in range(1, cfg.animate.motion_res_blocks + 1):
        for part in ("conv2", "skip"):
            key = f"motion_encoder.enc.net_app.convs.{i}.{part}.0.kernel"
            out[key] = (StoredTensor(key, dtype, (4, 4)), kernel)
    return out


def _write_sparse(path: Path, specs: list[TensorSpec]) -> None:
    """A valid safetensors file whose data section is a hole: real header and size, no data written."""
    head, offsets = build_header(specs, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + max((end for _, end in offsets.values()), default=0))


def _dit_folders(family: str, task: str, layout: str) -> list[tuple[str, str]]:
    """(expert component name, folder relative to OUT) for each DiT expert."""
    moe = family == "wan2.2" and task in ("t2v", "i2v")
    if not moe:
        return [("dit", "transformer" if layout == "diffusers" else ".")]
    if layout == "diffusers":
        return [("high_noise", "transformer"), ("low_noise", "transformer_2")]
    return [("high_noise", "high_noise_model"), ("low_noise", "low_noise_model")]


def make_tiny_model(out: Path, family: str, task: str, layout: str = "official", seed: int = 0,
                    dims: str | None = None, *, sparse: bool = False, encoders: str | None = None) -> Path:
    """Write a random Wan model of this family/task in `layout` to `out` (atomically); returns `out`.

    `sparse=True` writes the DiT files with real headers and sizes but no data (zeros, a file
    hole): for benchmarks of header-only paths on real-sized models without writing 57 GB.
    `encoders` ("int8" / "fp8"): LightX2V's quantized T5 / CLIP files instead of the float ones."""
    out = Path(out)
    check_family_task(family, task)
    if encoders is not None and (encoders not in ("int8", "fp8") or layout == "diffusers"):
        raise WanrtError(f"--quantized-encoders {encoders!r}: expected int8 or fp8, with a layout other than diffusers")
    if layout not in LAYOUTS:
        raise WanrtError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WanrtError(f"{out}: already exists and is not an empty folder; remove it or choose another path")
    cfg = tiny_dit_config(family, task, dims)
    experts = _dit_folders(family, task, layout)
    n_params = sum(math.prod(s) for s in expected_shapes(cfg).values()) * len(experts)
    # fsync off: test and demo models, rewritten at will (the rename still makes them all-or-nothing)
    with atomic_output(out, directory=True, fsync=False) as tmp, tqdm(
        total=n_params, unit="param", unit_scale=True, desc=f"writing {out.name}", disable=dims is None, file=None
    ) as bar:
        for component, rel in experts:
            folder = tmp / rel
            single = None if layout in ("official", "diffusers") else lightx2v_file_name(family, task, layout, component)
            write_dit(folder, cfg, layout, seed, component, single, min_shards=1 if dims else 2,
                      progress=bar.update, sparse=sparse)
            if layout == "official":
                _write_json(folder / "config.json", official_config_json(cfg, task))
            elif layout == "diffusers":
                _write_json(folder / "config.json", diffusers_config_json(cfg))
        write_companions(tmp, family, task, layout, seed, cfg, real_widths=dims is not None, encoders=encoders)
        if task == "animate" and layout != "diffusers":
            write_relighting_lora(tmp / RELIGHTING_FILES[0], cfg, seed)
    return out


RELIGHTING_RANK = 4


def write_relighting_lora(path: Path, cfg: DiTConfig, seed: int) -> None:
    """Animate's `relighting_lora/`: a PEFT LoRA (`adapter_model.safetensors` + `adapter_config.json`) on every
    block linear, as the release ships it (rank 128, alpha 128 there; a small rank here)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    shapes = expected_shapes(cfg)
    for key, (out_features, in_features) in ((k, s) for k, s in shapes.items() if is_block_linear(k)):
        module = "base_model.model." + key.removesuffix(".weight")
        down = random_tensor(module + ".lora_A.weight", (RELIGHTING_RANK, in_features), seed, "relighting")
        up = 0.1 * random_tensor(module + ".lora_B.weight", (out_features, RELIGHTING_RANK), seed, "relighting")
        tensors[module + ".lora_A.weight"], tensors[module + ".lora_B.weight"] = down, up
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    targets = sorted({k.removesuffix(".weight") for k in shapes if is_block_linear(k)})
    _write_json(path.parent / "adapter_config.json", {
        "peft_type": "LORA", "r": RELIGHTING_RANK, "lora_alpha": RELIGHTING_RANK, "target_modules": targets,
        "init_lora_weights": "gaussian", "bias": "none",
    })


# --------------------------------------------------------------------------------------------
# Companions: T5, CLIP, VAE, tokenizer


def _official_state(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int, component: str) -> dict[str, torch.Tensor]:
    """The official tensors of one companion: random values from (seed, component, key), stored in `dtype`."""
    return {k: random_tensor(k, s, seed, component).to(dtype) for k, s in shapes.items()}


def _save_pth(path: Path, state: dict[str, torch.Tensor], extra: dict[str, torch.Tensor] | None = None) -> None:
    torch.save({**state, **(extra or {})}, path)


def _save_diffusers(folder: Path, file_name: str, state: dict[str, torch.Tensor], config: dict) -> None:
    """One diffusers/transformers component folder: a single fp32 safetensors file and its config.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: t.to(torch.float32).contiguous() for k, t in state.items()}, str(folder / file_name), metadata={"format": "pt"})
    _write_json(folder / "config.json", config)


def companion_configs(cfg: DiTConfig, task: str, real_widths: bool, vocab_size: int):
    """(T5Config, CLIPVisionConfig or None, VAEConfig) of the companions a tiny model gets."""
    from wanrt.export.models.clip import CLIPVisionConfig
    from wanrt.export.models.t5 import T5Config
    from wanrt.export.models.vae import VAEConfig

    t5 = T5Config.tiny(vocab_size=embedding_rows(vocab_size))
    if real_widths:  # match the real text_dim; one narrow layer keeps the file small
        t5 = replace(t5, dim=REAL_TEXT_DIM, dim_attn=REAL_TEXT_DIM, num_heads=64, dim_ffn=512, num_layers=1)
    clip = None
    if cfg.image_branch:
        clip = replace(CLIPVisionConfig(), num_layers=2) if real_widths else CLIPVisionConfig.tiny()
    return t5, clip, VAEConfig.tiny("2.2" if task == "ti2v" else "2.1")


def write_companions(root: Path, family: str, task: str, layout: str, seed: int, cfg: DiTConfig, real_widths: bool,
                     encoders: str | None = None) -> None:  # fmt: skip
    """T5 / CLIP / VAE files and the tokenizer folder a real model folder has.

    Official tensors (T5 bf16, CLIP fp16, VAE fp32) are drawn once; the diffusers layout stores
    exactly those values in fp32 under transformers / diffusers names.  `encoders` ("int8" / "fp8"):
    the T5 and CLIP files are LightX2V's quantized ones instead (`lightx2v_quantized_encoder`)."""
    from wanrt.export.models.clip import clip_state_shapes
    from wanrt.export.models.t5 import t5_state_shapes
    from wanrt.export.models.vae import WanVAE

    diffusers = layout == "diffusers"
    vocab = write_tokenizer(root / ("tokenizer" if diffusers else "google/umt5-xxl"))
    t5_cfg, clip_cfg, vae_cfg = companion_configs(cfg, task, real_widths, vocab)
    t5 = _official_state(t5_state_shapes(t5_cfg), torch.bfloat16, seed, "t5")
    clip = None
    if clip_cfg is not None:
        shapes = {"visual." + k: s for k, s in clip_state_shapes(clip_cfg).items()}
        clip = _official_state(shapes, torch.float16, seed, "clip")
    with torch.device("meta"):
        vae_shapes = {k: tuple(t.shape) for k, t in WanVAE(vae_cfg).state_dict().items()}
    vae = _official_state(vae_shapes, torch.float32, seed, "vae")
    if diffusers:
        _write_diffusers_companions(root, t5, t5_cfg, clip, clip_cfg, vae, vae_cfg)
        _write_diffusers_pipeline(root, family, task)
        return
    if clip is not None:
        clip["log_scale"] = torch.tensor(math.log(1 / 0.07), dtype=torch.float16)  # XLMRobertaCLIP.log_scale
    if encoders is not None:
        from wanrt.export.checkpoint.encoder_quant import RULES

        t5, clip = lightx2v_quantized_encoder(t5, "t5", encoders), clip and lightx2v_quantized_encoder(clip, "clip", encoders)
    _save_pth(root / (RULES["t5"].file_name.format(fmt=encoders) if encoders else T5_FILE), t5)
    if clip is not None:
        _save_pth(root / (RULES["clip"].file_name.format(fmt=encoders) if encoders else CLIP_FILE), clip)
    _save_pth(root / f"Wan{vae_cfg.version}_VAE.pth", vae)


def lightx2v_converter_codes(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [out, in], scale [out, 1]) of one weight as LightX2V's converter computes them (`quant/quant.py`).

    The arithmetic runs in the weight's own dtype (bf16 for the official T5), as there:
    scale = amax(|w|, dim 1).clamp(1e-5) / qmax; int8 codes round(w / scale) clamped to [-128, 127];
    fp8 codes w / scale clipped to +-448, then qtorch's `float_quantize(x.float(), 4, 3, "nearest")`,
    which rounds ties away from zero (not to even) and gives +0 for every value that rounds to zero:
    here a nudge of 2**-12 relative (below half a bf16/fp16 step from any e4m3 midpoint) before
    torch's round-to-nearest-even cast, and -0 codes (0x80) written as +0."""
    from wanrt.calibration.quant import code_dtype
    from wanrt.calibration.formats import quant_format

    f = quant_format(fmt)
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / f.qmax
    x = w / scale
    if fmt == "int8":
        return torch.clamp(torch.round(x), f.qmin, f.qmax).to(torch.int8), scale
    x = torch.clip(x, f.qmin, f.qmax).float()
    codes = x.add_(x * 2**-12).to(code_dtype(f))
    bits = codes.view(torch.uint8)
    bits[bits == 0x80] = 0
    return codes, scale


def lightx2v_quantized_encoder(state: dict[str, torch.Tensor], kind: str, fmt: str) -> dict[str, torch.Tensor]:
    """The state dict LightX2V's converter writes for an official T5 / CLIP file (`-t wan_t5|wan_clip --quantized
    --linear_type FMT --non_linear_dtype` the file's own dtype): linears as codes, the rest kept, in the source's
    key order, then every `<key>_scale` (the converter replaces each weight in place and appends its scale)."""
    from wanrt.export.checkpoint.encoder_quant import RULES, SCALE_SUFFIX

    rule, out, scales = RULES[kind], {}, {}
    for key, t in state.items():
        if rule.dropped is not None and rule.dropped in key:
            continue
        if t.dim() == 2 and rule.quantizes(key):
            out[key], scales[key + SCALE_SUFFIX] = lightx2v_converter_codes(t, fmt)
        else:
            out[key] = t
    return out | scales


def _write_diffusers_companions(root: Path, t5: dict, t5_cfg, clip: dict | None, clip_cfg, vae: dict, vae_cfg) -> None:
    """text_encoder/, image_encoder/ (Wan2.1 i2v/flf2v) and vae/ of a diffusers Wan pipeline folder."""
    from wanrt.export.checkpoint.companion_keys import official_clip_to_hf, official_t5_key_to_hf, official_to_diffusers_vae_key

    _save_diffusers(root / "text_encoder", "model.safetensors", {official_t5_key_to_hf(k): t for k, t in t5.items()}, {
        "architectures": ["UMT5EncoderModel"], "model_type": "umt5", "d_model": t5_cfg.dim,
        "d_kv": t5_cfg.dim_attn // t5_cfg.num_heads, "d_ff": t5_cfg.dim_ffn, "num_heads": t5_cfg.num_heads,
        "num_layers": t5_cfg.num_layers, "vocab_size": t5_cfg.vocab_size, "feed_forward_proj": "gated-gelu",
        "relative_attention_num_buckets": t5_cfg.num_buckets, "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6, "dense_act_fn": "gelu_new", "is_gated_act": True, "torch_dtype": "float32",
    })  # fmt: skip
    if clip is not None:
        hf: dict[str, torch.Tensor] = {}
        for k, t in clip.items():
            hf.update(official_clip_to_hf(k.removeprefix("visual."), t))
        _save_diffusers(root / "image_encoder", "model.safetensors", hf, {
            "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
            "hidden_size": clip_cfg.width, "intermediate_size": clip_cfg.mlp_dim,
            "num_hidden_layers": clip_cfg.num_layers, "num_attention_heads": clip_cfg.num_heads,
            "image_size": clip_cfg.image_size, "patch_size": clip_cfg.patch_size, "projection_dim": clip_cfg.out_dim,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5, "torch_dtype": "float32",
        })  # fmt: skip
    residual = vae_cfg.version == "2.2"
    _save_diffusers(root / "vae", "diffusion_pytorch_model.safetensors",
                    {official_to_diffusers_vae_key(k, vae_cfg): t for k, t in vae.items()}, {
        "_class_name": "AutoencoderKLWan", "_diffusers_version": "0.35.0", "base_dim": vae_cfg.dim,
        "decoder_base_dim": vae_cfg.dec_dim, "z_dim": vae_cfg.z_dim, "dim_mult": list(vae_cfg.dim_mult),
        "num_res_blocks": vae_cfg.num_res_blocks, "temperal_downsample": list(vae_cfg.temporal_downsample),
        "latents_mean": list(vae_cfg.latents_mean), "latents_std": list(vae_cfg.latents_std),
        "is_residual": residual, "in_channels": vae_cfg.io_channels, "out_channels": vae_cfg.io_channels,
        "patch_size": vae_cfg.patch_size if residual else None, "scale_factor_spatial": vae_cfg.spatial_stride,
        "scale_factor_temporal": vae_cfg.temporal_stride,
    })  # fmt: skip


def _write_diffusers_pipeline(root: Path, family: str, task: str) -> None:
    """model_index.json and scheduler config of a diffusers Wan pipeline (the components this writer makes)."""
    moe = family == "wan2.2" and task in ("t2v", "i2v")
    image = task in ("i2v", "flf2v", "animate")
    pipeline = {"animate": "WanAnimatePipeline", "vace": "WanVACEPipeline"}.get(task, "WanImageToVideoPipeline" if image else "WanPipeline")
    index = {
        "_class_name": pipeline,
        "_diffusers_version": "0.35.0",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", {"animate": "WanAnimateTransformer3DModel", "vace": "WanVACETransformer3DModel"}.get(task, "WanTransformer3DModel")],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if (family == "wan2.1" or task == "animate") and image:
        index["image_encoder"] = ["transformers", "CLIPVisionModelWithProjection"]
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    if moe:
        index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
        index["boundary_ratio"] = 0.9 if task == "i2v" else 0.875
    if task == "ti2v":
        index["expand_timesteps"] = True
    _write_json(root / "model_index.json", index)
    shift = {"ti2v": 5.0, "flf2v": 16.0, "animate": 5.0}.get(task, 3.0)  # convert_wan_to_diffusers.py
    _write_json(root / "scheduler" / "scheduler_config.json", {
        "_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.35.0", "flow_shift": shift,
        "num_train_timesteps": 1000, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
        "solver_order": 2, "predict_x0": True, "solver_type": "bh2", "lower_order_final": True,
    })


def embedding_rows(vocab_size: int) -> int:
    """Rows of the T5 token embedding: the vocabulary padded to a multiple of 128 (umt5: 256300 -> 256384)."""
    return -(-vocab_size // 128) * 128


def tokenizer_vocab() -> list[tuple[str, float]]:
    """A small umt5-style Unigram vocabulary: specials, byte fallbacks, then pieces with log-prob scores."""
    words = (
        "a an the of and in on at to with through from is are red fox running fresh snow cat dog man woman "
        "walking sitting city street night day sky sun light water river forest mountain car camera slow "
        "motion close up shot video of white black blue green yellow girl boy people beautiful cinematic"
    ).split()
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()"))
    cjk = sorted({c for c in NEGATIVE_PROMPT if ord(c) > 0x2E80})
    vocab: list[tuple[str, float]] = [(t, 0.0) for t in SPECIAL_TOKENS]
    vocab += [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    vocab.append(("▁", -3.0))
    vocab += [("▁" + w, -6.0 - 0.1 * i) for i, w in enumerate(words)]
    vocab += [("▁" + c, -9.0) for c in chars]
    vocab += [(c, -9.5) for c in chars]
    vocab += [(c, -8.0) for c in cjk]
    return vocab


def write_tokenizer(folder: Path) -> int:
    """tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) like google/umt5-xxl; returns the vocab size."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = tokenizer_vocab()
    tok = Tokenizer(models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index("<unk>"), byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", SPECIAL_TOKENS.index("</s>"))]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(folder / "tokenizer_config.json", {
        **specials, "additional_special_tokens": [], "clean_up_tokenization_spaces": True, "extra_ids": 0,
        "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "T5Tokenizer",
    })
    return len(vocab)


# --------------------------------------------------------------------------------------------
# CLI


@click.command("make-tiny-model")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--family", type=click.Choice(list(FAMILY_TASKS)), required=True)
@click.option("--task", type=click.Choice(["t2v", "i2v", "flf2v", "ti2v", "vace", "animate"]), required=True)
@click.option("--layout", type=click.Choice(list(LAYOUTS)), default="official", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dims", default=None, metavar="1.3B|14B|5B[:LAYERS]",
              help="Real-sized DiT shapes (for benchmarks) with an optional number of layers.")
@click.option("--sparse", is_flag=True,
              help="DiT files with real headers and sizes but no data (a file hole): for header-only benchmarks.")
@click.option("--quantized-encoders", "encoders", type=click.Choice(["int8", "fp8"]), default=None,
              help="Write LightX2V's quantized T5 / CLIP files (models_t5_umt5-xxl-enc-int8.pth, ...) instead of the float ones.")
def make_tiny_model_command(out: Path, family: str, task: str, layout: str, seed: int, dims: str | None, sparse: bool,
                            encoders: str | None) -> None:  # fmt: skip
    """Write a random Wan checkpoint in a real on-disk layout (tiny dims unless --dims)."""
    path = make_tiny_model(out, family, task, layout, seed, dims, sparse=sparse, encoders=encoders)
    click.echo(str(path))
