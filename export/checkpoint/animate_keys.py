"""Wan2.2-Animate DiT keys: the official names, the diffusers names, and the expected shapes.

Official names are those of `WanAnimateModel` (Wan2.2 `wan/modules/animate/`): the Wan2.1 I2V
DiT's keys plus `pose_patch_embedding`, `motion_encoder.enc.net_app.convs.*` (LIA's appearance
CNN: `convs.0` conv_in, `convs.1..R` ResBlocks, `convs.R+1` the final 4x4 conv),
`motion_encoder.enc.fc.*`, `motion_encoder.dec.direction.weight`, `face_encoder.*` and
`face_adapter.fuser_blocks.N.*`.  The official checkpoint also stores each Blur's constant FIR
kernel (`....conv2.0.kernel`, `....skip.0.kernel`): known, not used (the module rebuilds it).

LightX2V (`converter.py -t wan_animate_dit`) and ComfyUI keep these names (ComfyUI under its
`model.diffusion_model.` prefix; LightX2V quantizes the face adapter's linears too). diffusers'
`WanAnimateTransformer3DModel` renames them: the rows below are the inverse of diffusers'
`convert_wan_transformer_to_diffusers` (`loaders/single_file_utils.py`): the FusedLeakyReLU
biases lose their [1, C, 1, 1] shape, and `linear1_kv` is split into `to_k` and `to_v`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .names import CONCAT, NameTable, Row, Transform

if TYPE_CHECKING:
    import torch

    from wanrt.engines.model import AnimateConfig

_RES = r"motion_encoder\.enc\.net_app\.convs\.\d+\."
# Every Animate-only official key (the DiT keys are `keys.is_official_key`'s).
ANIMATE_KEY_RE = re.compile(
    r"^(pose_patch_embedding\.(weight|bias)"
    r"|motion_encoder\.enc\.net_app\.convs\.0\.(0\.weight|1\.bias)"
    rf"|{_RES}(conv1\.0\.weight|conv1\.1\.bias|conv2\.1\.weight|conv2\.2\.bias|skip\.1\.weight|weight)"
    r"|motion_encoder\.enc\.fc\.\d+\.(weight|bias)"
    r"|motion_encoder\.dec\.direction\.weight"
    r"|face_encoder\.(conv1_local|conv2|conv3)\.conv\.(weight|bias)|face_encoder\.out_proj\.(weight|bias)"
    r"|face_encoder\.padding_tokens"
    r"|face_adapter\.fuser_blocks\.\d+\.(linear1_kv|linear1_q|linear2)\.(weight|bias)"
    r"|face_adapter\.fuser_blocks\.\d+\.(q_norm|k_norm)\.weight)$"
)
# The Blur buffers of the official checkpoint: constants the module rebuilds.
ANIMATE_IGNORED = re.compile(rf"^{_RES}(conv2|skip)\.0\.kernel$")
# Keys that give an Animate checkpoint away (any one of them).
ANIMATE_MARKERS = ("pose_patch_embedding.weight", "motion_encoder.dec.direction.weight")
DIFFUSERS_ANIMATE_MARKERS = ("pose_patch_embedding.weight", "motion_encoder.motion_synthesis_weight")


def is_animate_key(key: str) -> bool:
    """True for an official key only Wan2.2-Animate's DiT has."""
    return ANIMATE_KEY_RE.match(key) is not None


def _bias_4d(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1, shape[0], 1, 1)


# diffusers stores a FusedLeakyReLU bias as [C]; the official module as [1, C, 1, 1].
BIAS_4D = Transform(
    lambda shapes: _bias_4d(tuple(shapes[0])),
    lambda ts: ts[0].reshape(_bias_4d(tuple(ts[0].shape))),
    lambda t, n: [t.reshape(t.shape[1])],
)


@functools.lru_cache(maxsize=None)
def diffusers_animate_names(res_blocks: int) -> NameTable:
    """official <-> diffusers names of the Animate modules, for a motion encoder with `res_blocks` ResBlocks."""
    convs = "motion_encoder.enc.net_app.convs."
    rows: list[Row | tuple[str, str]] = [
        ("pose_patch_embedding", "pose_patch_embedding"),
        ("motion_encoder.dec.direction.weight", "motion_encoder.motion_synthesis_weight"),
        (convs + "0.0", "motion_encoder.conv_in"),
        Row(convs + "0.1.bias", ("motion_encoder.conv_in.act_fn.bias",), BIAS_4D),
        (f"{convs}{res_blocks + 1}", "motion_encoder.conv_out"),
        ("motion_encoder.enc.fc.{n}", "motion_encoder.motion_network.{n}"),
        ("face_encoder.conv1_local.conv", "face_encoder.conv1_local"),
        ("face_encoder.conv2.conv", "face_encoder.conv2"),
        ("face_encoder.conv3.conv", "face_encoder.conv3"),
        ("face_encoder.out_proj", "face_encoder.out_proj"),
        ("face_encoder.padding_tokens", "face_encoder.padding_tokens"),
        Row("face_adapter.fuser_blocks.{n}.linear1_kv", ("face_adapter.{n}.to_k", "face_adapter.{n}.to_v"), CONCAT),
        ("face_adapter.fuser_blocks.{n}.linear1_q", "face_adapter.{n}.to_q"),
        ("face_adapter.fuser_blocks.{n}.linear2", "face_adapter.{n}.to_out"),
        ("face_adapter.fuser_blocks.{n}.q_norm", "face_adapter.{n}.norm_q"),
        ("face_adapter.fuser_blocks.{n}.k_norm", "face_adapter.{n}.norm_k"),
    ]
    for i in range(1, res_blocks + 1):  # the official list counts conv_in as convs.0: ResBlock i is diffusers' i - 1
        theirs = f"motion_encoder.res_blocks.{i - 1}."
        rows += [
            (f"{convs}{i}.conv1.0", theirs + "conv1"),
            Row(f"{convs}{i}.conv1.1.bias", (theirs + "conv1.act_fn.bias",), BIAS_4D),
            (f"{convs}{i}.conv2.1", theirs + "conv2"),
            Row(f"{convs}{i}.conv2.2.bias", (theirs + "conv2.act_fn.bias",), BIAS_4D),
            (f"{convs}{i}.skip.1", theirs + "conv_skip"),
        ]
    return NameTable(rows)


def diffusers_res_blocks(keys: Iterable[str]) -> int:
    """How many motion-encoder ResBlocks a diffusers key set holds."""
    return len({k.split(".")[2] for k in keys if k.startswith("motion_encoder.res_blocks.")})


def official_res_blocks(keys: Iterable[str]) -> int:
    """How many motion-encoder ResBlocks an official key set holds (`convs.N.conv1.*`)."""
    return len({k.split(".")[4] for k in keys if k.startswith("motion_encoder.enc.net_app.convs.") and ".conv1." in k})


def official_to_diffusers_animate(key: str, tensor: torch.Tensor, res_blocks: int) -> dict[str, torch.Tensor] | None:
    """One official Animate tensor as the diffusers tensor(s) it becomes (None: not an Animate key)."""
    m = diffusers_animate_names(res_blocks).match_official(key)
    if m is None:
        return None
    if m.transform is None:
        return {m.theirs[0]: tensor}
    return dict(zip(m.theirs, m.transform.split(tensor, len(m.theirs))))


def expected_animate_shapes(a: AnimateConfig, dim: int, num_heads: int, num_layers: int,
                            patch_size: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    """Every Animate-only official key and its shape (the Blur kernels excluded)."""
    convs = "motion_encoder.enc.net_app.convs."
    ch = a.motion_channels
    s: dict[str, tuple[int, ...]] = {
        "pose_patch_embedding.weight": (dim, a.pose_dim, *patch_size),
        "pose_patch_embedding.bias": (dim,),
        convs + "0.0.weight": (ch[0], 3, 1, 1),
        convs + "0.1.bias": (1, ch[0], 1, 1),
    }
    for i, (cin, cout) in enumerate(zip(ch[:-1], ch[1:]), start=1):
        s[f"{convs}{i}.conv1.0.weight"] = (cin, cin, 3, 3)
        s[f"{convs}{i}.conv1.1.bias"] = (1, cin, 1, 1)
        s[f"{convs}{i}.conv2.1.weight"] = (cout, cin, 3, 3)
        s[f"{convs}{i}.conv2.2.bias"] = (1, cout, 1, 1)
        s[f"{convs}{i}.skip.1.weight"] = (cout, cin, 1, 1)
    s[f"{convs}{len(ch)}.weight"] = (a.motion_style_dim, ch[-1], 4, 4)
    dims = [a.motion_style_dim] * a.motion_blocks + [a.motion_dim]
    for n, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
        s[f"motion_encoder.enc.fc.{n}.weight"] = (o, i)
        s[f"motion_encoder.enc.fc.{n}.bias"] = (o,)
    s["motion_encoder.dec.direction.weight"] = (a.motion_out_dim, a.motion_dim)
    h = a.face_hidden_dim
    s.update({
        "face_encoder.conv1_local.conv.weight": (h * a.face_heads, a.motion_out_dim, 3),
        "face_encoder.conv1_local.conv.bias": (h * a.face_heads,),
        "face_encoder.conv2.conv.weight": (h, h, 3), "face_encoder.conv2.conv.bias": (h,),
        "face_encoder.conv3.conv.weight": (h, h, 3), "face_encoder.conv3.conv.bias": (h,),
        "face_encoder.out_proj.weight": (dim, h), "face_encoder.out_proj.bias": (dim,),
        "face_encoder.padding_tokens": (1, 1, 1, dim),
    })  # fmt: skip
    for n in range(a.adapters(num_layers)):
        b = f"face_adapter.fuser_blocks.{n}."
        s[b + "linear1_kv.weight"], s[b + "linear1_kv.bias"] = (2 * dim, dim), (2 * dim,)
        for lin in ("linear1_q", "linear2"):
            s[f"{b}{lin}.weight"], s[f"{b}{lin}.bias"] = (dim, dim), (dim,)
        s[b + "q_norm.weight"] = s[b + "k_norm.weight"] = (dim // num_heads,)
    return s


def infer_animate_config(shapes: Mapping[str, tuple[int, ...]], where: str) -> AnimateConfig | None:
    """The AnimateConfig official-named shapes imply (None: not an Animate DiT)."""
    from wanrt.engines.errors import CheckpointError
    from wanrt.engines.model import AnimateConfig

    if not any(k in shapes for k in ANIMATE_MARKERS):
        return None
    for key in ANIMATE_MARKERS + ("face_encoder.conv2.conv.weight", "face_encoder.conv1_local.conv.weight"):
        if key not in shapes:
            raise CheckpointError(f"{where}: a Wan2.2-Animate DiT (pose/motion keys present) without {key!r}")
    convs = "motion_encoder.enc.net_app.convs."
    res = official_res_blocks(shapes)
    try:
        channels = [shapes[convs + "0.0.weight"][0]] + [shapes[f"{convs}{i}.conv2.1.weight"][0] for i in range(1, res + 1)]
        style = shapes[f"{convs}{res + 1}.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"{where}: Wan2.2-Animate motion encoder without {e.args[0]!r}") from None
    fc = sorted({int(k.split(".")[3]) for k in shapes if k.startswith("motion_encoder.enc.fc.")})
    direction = shapes["motion_encoder.dec.direction.weight"]
    hidden = shapes["face_encoder.conv2.conv.weight"][0]
    return AnimateConfig(
        pose_dim=shapes["pose_patch_embedding.weight"][1],
        motion_size=2 ** (res + 2),
        motion_channels=tuple(channels),
        motion_style_dim=style,
        motion_dim=direction[1],
        motion_blocks=len(fc),
        motion_out_dim=direction[0],
        face_hidden_dim=hidden,
        face_heads=shapes["face_encoder.conv1_local.conv.weight"][0] // hidden,
    )


# The relighting LoRA of the Wan2.2-Animate-14B release (PEFT, rank 128, alpha 128, every block linear):
# `relighting_lora/adapter_model.safetensors`; the official code loads `relighting_lora.ckpt` (wan_animate_14B.py).
RELIGHTING_FILES = ("relighting_lora/adapter_model.safetensors", "relighting_lora.ckpt")


def find_relighting_lora(roots: Iterable[Path]) -> Path | None:
    """The relighting LoRA beside an Animate model, if shipped (safetensors first)."""
    for name in RELIGHTING_FILES:
        for root in roots:
            if (root / name).is_file():
                return root / name
    return None


def animate_summary(a: AnimateConfig, num_layers: int) -> dict[str, object]:
    """The Animate modules, as `inspect` reports them."""
    return {
        "pose_patch_embedding": {"in_channels": a.pose_dim},
        "motion_encoder": {"face_size": a.motion_size, "res_blocks": a.motion_res_blocks, "channels": list(a.motion_channels),
                           "style_dim": a.motion_style_dim, "motion_dim": a.motion_dim, "out_dim": a.motion_out_dim},
        "face_encoder": {"hidden_dim": a.face_hidden_dim, "heads": a.face_heads, "tokens_per_frame": a.face_heads + 1},
        "face_adapter": {"blocks": a.adapters(num_layers), "after_dit_blocks": list(range(0, num_layers, a.adapter_every))[:a.adapters(num_layers)]},
    }
