"""Plain descriptions of a Wan model that the exporter writes and the runtime reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FAMILIES = ("wan2.1", "wan2.2")
TASKS = ("t2v", "i2v", "flf2v", "ti2v", "vace", "animate")
EXPERT_NAMES = ("high_noise", "low_noise")


@dataclass(frozen=True)
class AnimateConfig:
    """Wan2.2-Animate's modules beside the DiT (official `WanAnimateModel`, `wan/modules/animate/`).

    The defaults are the released 14B model's (`wan_animate_14B.py`, `model_animate.py`,
    `motion_encoder.py`, `face_blocks.py`).
    """

    pose_dim: int = 16  # pose latent channels (`pose_patch_embedding` input: the Wan2.1 VAE's z)
    motion_size: int = 512  # face crop side the motion encoder takes: 2 ** (res blocks + 2)
    motion_channels: tuple[int, ...] = (32, 64, 128, 256, 512, 512, 512, 512)  # conv_in, then each res block out
    motion_style_dim: int = 512  # appearance code width (the final 4x4 conv)
    motion_dim: int = 20  # motion directions (`dec.direction` columns)
    motion_blocks: int = 5  # EqualLinear layers of `enc.fc`
    motion_out_dim: int = 512  # motion vector width (`dec.direction` rows; the face encoder's input)
    face_hidden_dim: int = 1024  # face encoder conv width per head
    face_heads: int = 4  # face encoder heads (motion tokens per latent frame, plus one padding token)
    adapter_every: int = 5  # a face adapter block after DiT blocks 0, 5, 10, ...

    @property
    def motion_res_blocks(self) -> int:
        return len(self.motion_channels) - 1

    def adapters(self, num_layers: int) -> int:
        """Face adapter blocks of a DiT with `num_layers` blocks (official `num_layers // 5`)."""
        return num_layers // self.adapter_every

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AnimateConfig":
        d = dict(d)
        d["motion_channels"] = tuple(d.get("motion_channels", cls.motion_channels))
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of one Wan DiT expert (official `WanModel` constructor fields)."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    image_branch: bool = False  # Wan2.1 i2v/flf2v: img_emb + k_img/v_img
    clip_tokens: int | None = None  # 257 (i2v) or 514 (flf2v, with img_emb.emb_pos)
    clip_dim: int = 1280  # width of the CLIP features img_emb projects (1280 for ViT-H/14)
    text_len: int = 512
    vace_layers: tuple[int, ...] = ()  # VACE: the layers after which each VACE block's hint is added (official order)
    vace_in_dim: int | None = None  # VACE: channels of the control latents (`vace_patch_embedding` input; 96)
    animate: AnimateConfig | None = None  # Wan2.2-Animate: pose embedding, motion/face encoders, face adapter

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def vace(self) -> bool:
        """True for a Wan2.1-VACE DiT (VACE blocks and `vace_patch_embedding`)."""
        return bool(self.vace_layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["vace_layers"] = list(self.vace_layers)
        if self.animate is not None:
            d["animate"]["motion_channels"] = list(self.animate.motion_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiTConfig":
        d = dict(d)
        d["patch_size"] = tuple(d.get("patch_size", (1, 2, 2)))
        d["vace_layers"] = tuple(d.get("vace_layers", ()))
        if d.get("animate") is not None:
            d["animate"] = AnimateConfig.from_dict(d["animate"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class VAEInfo:
    """What the runtime needs to know about the VAE: version, latent channels and strides."""

    version: str  # "2.1" or "2.2"
    z_dim: int  # 16 or 48
    stride: tuple[int, int, int]  # (t, h, w): (4, 8, 8) or (4, 16, 16)

    @classmethod
    def for_version(cls, version: str) -> "VAEInfo":
        if version == "2.1":
            return cls("2.1", 16, (4, 8, 8))
        if version == "2.2":
            return cls("2.2", 48, (4, 16, 16))
        raise ValueError(f"unknown VAE version {version!r}; expected '2.1' or '2.2'")


@dataclass
class SamplingDefaults:
    """Sampling settings stored in a bundle; from the model family or a LightX2V config."""

    sampler: str = "unipc"  # "unipc", "euler" or "distill"
    steps: int = 50
    shift: float = 5.0
    guide_scale: tuple[float, float] = (5.0, 5.0)  # (low_noise, high_noise) as in Wan2.2 configs
    enable_cfg: bool = True
    boundary: float | None = None  # Wan2.2 A14B: high-noise expert while t >= boundary * 1000
    boundary_step_index: int | None = None  # distilled MoE: high-noise while step < this
    denoising_step_list: list[int] | None = None  # LightX2V step-distilled timesteps (unshifted)
    frames: int = 81
    height: int = 480
    width: int = 832
    fps: int = 16
    max_area: int | None = None  # i2v: target pixel area; the image's aspect ratio sets h/w
    negative_prompt: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["guide_scale"] = list(self.guide_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingDefaults":
        d = dict(d)
        if "guide_scale" in d:
            d["guide_scale"] = tuple(d["guide_scale"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class LoraRecord:
    """One LoRA merged into a bundle's weights."""

    path: str
    sha256: str
    strength: float = 1.0
    experts: list[str] = field(default_factory=list)  # [] means every expert
    alpha: float | None = None
