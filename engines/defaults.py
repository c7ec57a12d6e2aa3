"""Official sampling defaults per model family and task (Wan2.1 `generate.py`, Wan2.2 configs)."""

from __future__ import annotations

from .model import SamplingDefaults

# wan/configs/shared_config.py
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# Wan2.1 prefixes a camera phrase for i2v / flf2v; Wan2.2 adds none.
NEGATIVE_PREFIX_WAN21 = {"i2v": "镜头晃动，", "flf2v": "镜头切换，"}


def default_negative_prompt(family: str, task: str) -> str:
    """The official negative prompt for a family/task."""
    prefix = NEGATIVE_PREFIX_WAN21.get(task, "") if family == "wan2.1" else ""
    return prefix + NEGATIVE_PROMPT


def default_sampling(family: str, task: str, dim: int | None = None, moe: bool = False) -> SamplingDefaults:
    """Official defaults; `moe` is True for Wan2.2 A14B (two experts), `dim` picks 480p for the 1.3B."""
    neg = default_negative_prompt(family, task)
    if family == "wan2.1":
        steps = 40 if task == "i2v" else 50  # generate.py: 40 when the task name contains "i2v"
        shift = 16.0 if task in ("flf2v", "vace") else 5.0  # generate.py: 16 for flf2v and vace
        small = dim == 1536  # T2V-1.3B and VACE-1.3B are 480p models
        h, w = (480, 832) if small else (720, 1280)
        return SamplingDefaults(
            sampler="unipc", steps=steps, shift=shift, guide_scale=(5.0, 5.0), frames=81, height=h, width=w,
            fps=16, max_area=h * w if task in ("i2v", "flf2v") else None, negative_prompt=neg,
        )
    if task == "animate":  # wan/configs/wan_animate_14B.py: 77-frame segments, no CFG (guide 1.0), 30 fps
        return SamplingDefaults(
            sampler="unipc", steps=20, shift=5.0, guide_scale=(1.0, 1.0), enable_cfg=False, frames=77, height=720,
            width=1280, fps=30, negative_prompt=neg,
        )
    if task == "ti2v" or not moe:
        return SamplingDefaults(
            sampler="unipc", steps=50, shift=5.0, guide_scale=(5.0, 5.0), frames=121, height=704, width=1280,
            fps=24, max_area=704 * 1280 if task == "ti2v" else None, negative_prompt=neg,
        )
    if task == "i2v":
        return SamplingDefaults(
            sampler="unipc", steps=40, shift=5.0, guide_scale=(3.5, 3.5), boundary=0.900, frames=81,
            height=720, width=1280, fps=16, max_area=720 * 1280, negative_prompt=neg,
        )
    return SamplingDefaults(
        sampler="unipc", steps=40, shift=12.0, guide_scale=(3.0, 4.0), boundary=0.875, frames=81,
        height=720, width=1280, fps=16, negative_prompt=neg,
    )
