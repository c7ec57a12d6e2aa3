"""A Wan DiT's architecture read off its tensor shapes, checked against config.json.

Shapes follow the official `WanModel` (Wan2.1/Wan2.2 `wan/modules/model.py`); head_dim is 128
in every released model, so `num_heads = dim / 128`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wanrt.engines.errors import CheckpointError
from wanrt.engines.model import TASKS, DiTConfig

from .animate_keys import expected_animate_shapes, infer_animate_config


HEAD_DIM = 128
CLIP_TOKENS_I2V = 257  # CLS + 16x16 patches of ViT-H/14 at 224 px
CLIP_TOKENS_FLF2V = 514  # two images
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_VACE_BLOCK_RE = re.compile(r"^vace_blocks\.(\d+)\.")

Shapes = Mapping[str, tuple[int, ...]]


def expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every official key of a DiT with this config and its shape, in module order."""
    d, p = cfg.dim, math.prod(cfg.patch_size)
    s: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, cfg.in_dim, *cfg.patch_size),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
    }
    for n in range(cfg.num_layers):
        s.update(block_shapes(cfg, f"blocks.{n}.", cfg.image_branch))
    s["head.modulation"] = (1, 2, d)
    s["head.head.weight"] = (p * cfg.out_dim, d)
    s["head.head.bias"] = (p * cfg.out_dim,)
    if cfg.image_branch:
        c = cfg.clip_dim
        s.update({
            "img_emb.proj.0.weight": (c,), "img_emb.proj.0.bias": (c,),
            "img_emb.proj.1.weight": (c, c), "img_emb.proj.1.bias": (c,),
            "img_emb.proj.3.weight": (d, c), "img_emb.proj.3.bias": (d,),
            "img_emb.proj.4.weight": (d,), "img_emb.proj.4.bias": (d,),
        })
        if cfg.clip_tokens == CLIP_TOKENS_FLF2V:
            s["img_emb.emb_pos"] = (1, CLIP_TOKENS_FLF2V, c)
    if cfg.vace:  # VaceWanModel registers vace_blocks, then vace_patch_embedding
        for n in range(len(cfg.vace_layers)):
            b = f"vace_blocks.{n}."
            s.update(block_shapes(cfg, b, image_branch=False))  # official VACE blocks: 't2v_cross_attn'
            for proj in ("before_proj",) * (n == 0) + ("after_proj",):  # block 0 alone projects the control input
                s[f"{b}{proj}.weight"] = (d, d)
                s[f"{b}{proj}.bias"] = (d,)
        s["vace_patch_embedding.weight"] = (d, cfg.vace_in_dim, *cfg.patch_size)
        s["vace_patch_embedding.bias"] = (d,)
    if cfg.animate is not None:
        s.update(expected_animate_shapes(cfg.animate, d, cfg.num_heads, cfg.num_layers, cfg.patch_size))
    return s


def block_shapes(cfg: DiTConfig, prefix: str, image_branch: bool) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of one Wan attention block under `prefix` (`blocks.N.`, `vace_blocks.N.`)."""
    d, f, b = cfg.dim, cfg.ffn_dim, prefix
    s: dict[str, tuple[int, ...]] = {}
    for attn in ("self_attn", "cross_attn"):
        for lin in ("q", "k", "v", "o"):
            s[f"{b}{attn}.{lin}.weight"] = (d, d)
            s[f"{b}{attn}.{lin}.bias"] = (d,)
        s[f"{b}{attn}.norm_q.weight"] = (d,)
        s[f"{b}{attn}.norm_k.weight"] = (d,)
        if attn == "self_attn":
            s[b + "norm3.weight"] = (d,)
            s[b + "norm3.bias"] = (d,)
    if image_branch:
        for lin in ("k_img", "v_img"):
            s[f"{b}cross_attn.{lin}.weight"] = (d, d)
            s[f"{b}cross_attn.{lin}.bias"] = (d,)
        s[b + "cross_attn.norm_k_img.weight"] = (d,)
    s[b + "ffn.0.weight"] = (f, d)
    s[b + "ffn.0.bias"] = (f,)
    s[b + "ffn.2.weight"] = (d, f)
    s[b + "ffn.2.bias"] = (d,)
    s[b + "modulation"] = (1, 6, d)
    return s


def infer_dit_config(shapes: Shapes, where: str, unknown: Sequence[str] = (),
                     vace_layers: Sequence[int] | None = None) -> DiTConfig:
    """The `DiTConfig` implied by official-named shapes; every expected tensor must be there with its shape.

    `unknown`: the stored keys that map to no official name, named when a tensor is missing.
    `vace_layers`: a VACE model's hint layers as its config.json declares them (shapes cannot place the
    VACE blocks; without it they are placed by `infer_vace_layers`)."""

    def need(key: str, ndim: int) -> tuple[int, ...]:
        if key not in shapes:
            sample = ", ".join(sorted(shapes)[:3]) or "no tensors"
            raise CheckpointError(f"{where}: no {key!r} tensor: not a Wan DiT checkpoint (keys: {sample}, ...)")
        if len(shapes[key]) != ndim:
            raise CheckpointError(f"{where}: {key} has shape {list(shapes[key])}; expected {ndim} dimensions")
        return shapes[key]

    pe = need("patch_embedding.weight", 5)
    dim, in_dim, patch = pe[0], pe[1], tuple(pe[2:])
    if dim % HEAD_DIM:
        raise CheckpointError(f"{where}: model dim {dim} (patch_embedding.weight) is not a multiple of head_dim {HEAD_DIM}")
    head = need("head.head.weight", 2)
    if head[0] % math.prod(patch):
        raise CheckpointError(f"{where}: head.head.weight has {head[0]} rows, not a multiple of the patch volume {math.prod(patch)}")
    num_layers = _count_blocks(shapes, _BLOCK_RE, "blocks", where)
    image_branch = "img_emb.proj.1.weight" in shapes or "blocks.0.cross_attn.k_img.weight" in shapes
    clip_dim, clip_tokens = DiTConfig.__dataclass_fields__["clip_dim"].default, None
    if image_branch:
        clip_dim = need("img_emb.proj.1.weight", 2)[1]
        clip_tokens = need("img_emb.emb_pos", 3)[1] if "img_emb.emb_pos" in shapes else CLIP_TOKENS_I2V
    vace_in_dim, placed = None, ()
    if "vace_patch_embedding.weight" in shapes or any(_VACE_BLOCK_RE.match(k) for k in shapes):
        if "vace_patch_embedding.weight" not in shapes:
            found = sorted(k for k in shapes if _VACE_BLOCK_RE.match(k))
            raise CheckpointError(f"{where}: VACE block tensors ({found[0]}, ...) but no vace_patch_embedding.weight:"
                                  " an incomplete Wan2.1-VACE checkpoint")
        vace_in_dim = need("vace_patch_embedding.weight", 5)[1]
        count = _count_blocks(shapes, _VACE_BLOCK_RE, "vace_blocks", where)
        placed = tuple(vace_layers) if vace_layers is not None else infer_vace_layers(count, num_layers, where)
        check_vace_layers(placed, count, num_layers, where)
    cfg = DiTConfig(
        dim=dim,
        ffn_dim=need("blocks.0.ffn.0.weight", 2)[0],
        num_heads=dim // HEAD_DIM,
        num_layers=num_layers,
        in_dim=in_dim,
        out_dim=head[0] // math.prod(patch),
        text_dim=need("text_embedding.0.weight", 2)[1],
        freq_dim=need("time_embedding.0.weight", 2)[1],
        patch_size=patch,
        image_branch=image_branch,
        clip_tokens=clip_tokens,
        clip_dim=clip_dim,
        vace_layers=placed,
        vace_in_dim=vace_in_dim,
        animate=infer_animate_config(shapes, where),
    )
    check_shapes(shapes, cfg, where, unknown)
    return cfg


def _count_blocks(shapes: Shapes, pattern: re.Pattern, name: str, where: str) -> int:
    """How many blocks `name.0 .. name.N-1` the shapes hold (a gap is an error)."""
    found = sorted({int(m.group(1)) for k in shapes if (m := pattern.match(k))})
    if not found:
        raise CheckpointError(f"{where}: no transformer blocks ({name}.N.*) found")
    missing = sorted(set(range(found[-1] + 1)) - set(found))
    if missing:
        raise CheckpointError(f"{where}: {name} 0..{found[-1]} expected but {name}.{missing[0]} has no tensors")
    return found[-1] + 1


def infer_vace_layers(count: int, num_layers: int, where: str) -> tuple[int, ...]:
    """Where `count` VACE hints go among `num_layers` layers when no config.json says: every `num_layers // count`-th.

    That is the official default (`range(0, num_layers, 2)`, VACE-1.3B's 15 of 30), VACE-14B's 8 of 40
    every 5 (diffusers `convert_wan_to_diffusers.py`), and ComfyUI's rule for files without a config
    (comfy/ldm/wan/model.py `VaceWanModel`: `range(0, num_layers, num_layers // vace_layers)`); a count
    that does not divide the layers needs config.json."""
    step = num_layers // count if count else 0
    layers = tuple(range(0, num_layers, step)) if step else ()
    if len(layers) != count:
        raise CheckpointError(
            f"{where}: {count} VACE blocks among {num_layers} layers are not evenly spaced; the layers they feed"
            " cannot be read off the weights: put the model's config.json (with vace_layers) beside it"
        )
    return layers


def check_vace_layers(layers: Sequence[int], count: int, num_layers: int, where: str) -> None:
    """The official constraints: one layer per VACE block, layer 0 first, increasing, inside the model."""
    layers = list(layers)
    if len(layers) != count:
        raise CheckpointError(f"{where}: vace_layers {layers} names {len(layers)} layers, but the weights hold {count} VACE blocks")
    if not layers or layers[0] != 0 or layers != sorted(set(layers)) or layers[-1] >= num_layers:
        raise CheckpointError(
            f"{where}: vace_layers {layers}: expected increasing layer indices starting at 0, below num_layers {num_layers}"
        )


def check_shapes(shapes: Shapes, cfg: DiTConfig, where: str, unknown: Sequence[str] = ()) -> None:
    """Raise unless every tensor `cfg` needs is present with its official shape (naming any `unknown` keys)."""
    expected = expected_shapes(cfg)
    missing = [k for k in expected if k not in shapes]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        unmapped = f"; the file's {len(unknown)} unknown key(s) ({', '.join(unknown[:3])}) have no official name" if unknown else ""
        raise CheckpointError(
            f"{where}: missing tensor(s) {', '.join(missing[:3])}{more} of a Wan DiT with {describe(cfg)}{unmapped}"
        )
    for k, shape in expected.items():
        if tuple(shapes[k]) != shape:
            raise CheckpointError(f"{where}: {k} has shape {list(shapes[k])}; a DiT with {describe(cfg)} needs {list(shape)}")


def describe(cfg: DiTConfig) -> str:
    """A one-line summary of a config for messages."""
    vace = f", {len(cfg.vace_layers)} VACE blocks at layers {list(cfg.vace_layers)}" if cfg.vace else ""
    return f"dim {cfg.dim}, ffn_dim {cfg.ffn_dim}, {cfg.num_layers} layers, in_dim {cfg.in_dim}, out_dim {cfg.out_dim}{vace}"


# config.json field -> (how to read it from DiTConfig, evidence key for messages)
_OFFICIAL_FIELDS = {
    "dim": (lambda c: c.dim, "patch_embedding.weight"),
    "ffn_dim": (lambda c: c.ffn_dim, "blocks.0.ffn.0.weight"),
    "num_heads": (lambda c: c.num_heads, "patch_embedding.weight"),
    "num_layers": (lambda c: c.num_layers, "blocks.N"),
    "in_dim": (lambda c: c.in_dim, "patch_embedding.weight"),
    "out_dim": (lambda c: c.out_dim, "head.head.weight"),
    "freq_dim": (lambda c: c.freq_dim, "time_embedding.0.weight"),
    "text_dim": (lambda c: c.text_dim, "text_embedding.0.weight"),
    "vace_in_dim": (lambda c: c.vace_in_dim, "vace_patch_embedding.weight"),
}
_DIFFUSERS_FIELDS = {
    "num_attention_heads": (lambda c: c.num_heads, "patch_embedding.weight"),
    "attention_head_dim": (lambda c: c.head_dim, "patch_embedding.weight"),
    "ffn_dim": (lambda c: c.ffn_dim, "blocks.0.ffn.0.weight"),
    "num_layers": (lambda c: c.num_layers, "blocks.N"),
    "in_channels": (lambda c: c.in_dim, "patch_embedding.weight"),
    "out_channels": (lambda c: c.out_dim, "head.head.weight"),
    "freq_dim": (lambda c: c.freq_dim, "time_embedding.0.weight"),
    "text_dim": (lambda c: c.text_dim, "text_embedding.0.weight"),
    "image_dim": (lambda c: c.clip_dim if c.image_branch else None, "img_emb.proj.1.weight"),
    "added_kv_proj_dim": (lambda c: c.dim if c.image_branch else None, "blocks.0.cross_attn.k_img.weight"),
    "pos_embed_seq_len": (lambda c: c.clip_tokens if c.clip_tokens == CLIP_TOKENS_FLF2V else None, "img_emb.emb_pos"),
    "vace_in_channels": (lambda c: c.vace_in_dim, "vace_patch_embedding.weight"),
}
OFFICIAL_CLASSES = ("WanModel", "VaceWanModel")  # config.json `_class_name` of the official releases
DIFFUSERS_CLASSES = ("WanTransformer3DModel", "WanVACETransformer3DModel")
# Wan2.2-Animate config.json: the official `WanAnimateModel` (motion_encoder_dim) and diffusers' class.
ANIMATE_CLASSES = ("WanAnimateModel", "WanAnimateTransformer3DModel")
_ANIMATE_FIELDS = {
    "motion_encoder_dim": (lambda a: a.motion_out_dim, "motion_encoder.dec.direction.weight"),
    "motion_encoder_size": (lambda a: a.motion_size, "motion_encoder.enc.net_app.convs"),
    "motion_style_dim": (lambda a: a.motion_style_dim, "motion_encoder.enc.net_app.convs"),
    "motion_dim": (lambda a: a.motion_dim, "motion_encoder.dec.direction.weight"),
    "face_encoder_hidden_dim": (lambda a: a.face_hidden_dim, "face_encoder.conv2.conv.weight"),
    "face_encoder_num_heads": (lambda a: a.face_heads, "face_encoder.conv1_local.conv.weight"),
    "inject_face_latents_blocks": (lambda a: a.adapter_every, "face_adapter.fuser_blocks"),
    "latent_channels": (lambda a: a.pose_dim, "pose_patch_embedding.weight"),
}
TORCH_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def is_dit_config_json(cfg: Mapping[str, Any]) -> bool:
    """True for an official `WanModel` / `VaceWanModel` / `WanAnimateModel` or a diffusers DiT config.json."""
    cls = cfg.get("_class_name")
    return cls in OFFICIAL_CLASSES + DIFFUSERS_CLASSES + ANIMATE_CLASSES or ("dim" in cfg and "num_layers" in cfg and "in_dim" in cfg)


def declared_vace_layers(config: Mapping[str, Any], config_path: Path) -> tuple[int, ...] | None:
    """The `vace_layers` a config.json declares (official and diffusers use that name), or None."""
    layers = config.get("vace_layers")
    if layers is None:
        return None
    if not isinstance(layers, list) or not all(type(n) is int for n in layers):
        raise CheckpointError(f"{config_path}: vace_layers is {layers!r}; expected a list of layer indices")
    return tuple(layers)


def check_config_json(cfg: DiTConfig, config: Mapping[str, Any], config_path: Path, weights: str,
                      task: str | None = None, precision: str | None = None) -> None:
    """Raise when a config.json field contradicts what the weights' shapes (or storage dtype) say."""
    diffusers = config.get("_class_name") in DIFFUSERS_CLASSES or "num_attention_heads" in config
    fields = _DIFFUSERS_FIELDS if diffusers else _OFFICIAL_FIELDS
    for name, (read, evidence) in fields.items():
        if name not in config:
            continue
        want, have = config[name], read(cfg)
        if want != have:
            raise CheckpointError(
                f"{config_path}: {name} is {want} but the weights in {weights} have {have} (from {evidence})"
            )
    _check_animate_fields(cfg, config, config_path, weights)
    if "patch_size" in config and tuple(config["patch_size"]) != tuple(cfg.patch_size):
        raise CheckpointError(
            f"{config_path}: patch_size is {config['patch_size']} but the weights in {weights} have {list(cfg.patch_size)}"
        )
    model_type = config.get("model_type")
    declared_layers = declared_vace_layers(config, config_path)
    if declared_layers is not None and declared_layers != cfg.vace_layers:
        raise CheckpointError(
            f"{config_path}: vace_layers is {config['vace_layers']} but the weights in {weights} hold"
            f" {len(cfg.vace_layers)} VACE blocks at layers {list(cfg.vace_layers)}"
        )
    if task is not None and model_type in TASKS and model_type != task:
        raise CheckpointError(
            f"{config_path}: model_type is {model_type!r} but the weights in {weights} are a {task} model"
        )
    declared = config.get("torch_dtype") or config.get("dtype")
    if precision is not None and isinstance(declared, str) and declared in TORCH_DTYPE_NAMES:
        if precision in TORCH_DTYPE_NAMES.values() and TORCH_DTYPE_NAMES[declared] != precision:
            raise CheckpointError(
                f"{config_path}: torch_dtype is {declared!r} but the weights in {weights} are stored as {precision}"
            )


def _check_animate_fields(cfg: DiTConfig, config: Mapping[str, Any], config_path: Path, weights: str) -> None:
    """An Animate config.json needs Animate weights (and the reverse), with the same motion/face encoder sizes."""
    declared = config.get("_class_name") in ANIMATE_CLASSES
    if declared and cfg.animate is None:
        raise CheckpointError(f"{config_path}: _class_name is {config['_class_name']!r} but the weights in {weights}"
                              " have no Animate modules (pose_patch_embedding, motion_encoder, face_adapter)")
    if cfg.animate is None:
        return
    if config.get("_class_name") in ("WanModel", "WanTransformer3DModel"):
        raise CheckpointError(f"{config_path}: _class_name is {config['_class_name']!r} but the weights in {weights}"
                              " are a Wan2.2-Animate DiT (pose_patch_embedding, motion_encoder, face_adapter)")
    for name, (read, evidence) in _ANIMATE_FIELDS.items():
        if name in config and config[name] is not None and config[name] != read(cfg.animate):
            raise CheckpointError(
                f"{config_path}: {name} is {config[name]} but the weights in {weights} have {read(cfg.animate)} (from {evidence})"
            )
