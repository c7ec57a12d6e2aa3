"""Reference samplers for the runtime tests: diffusers' schedulers set to Wan's official sigmas."""

from __future__ import annotations

import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler


def official_unshifted_sigmas(steps: int) -> np.ndarray:
    """wan-architecture.md §2: linspace(0.999, 0, steps+1)[:-1], 0.999 being the scheduler's float32 sigma_max."""
    return np.linspace(float(np.float32(0.999)), 0.0, steps + 1)[:-1]


def diffusers_unipc(steps: int, shift: float, order: int = 2) -> UniPCMultistepScheduler:
    """diffusers' flow UniPC configured as Wan's (order 2, bh2, predict_x0, lower_order_final) on Wan's sigmas."""
    sched = UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=order, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=shift, predict_x0=True, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero",
    )  # fmt: skip
    sched.set_timesteps(sigmas=official_unshifted_sigmas(steps))
    sched.set_begin_index(0)
    return sched


def diffusers_euler(steps: int, shift: float) -> FlowMatchEulerDiscreteScheduler:
    """diffusers' flow-matching Euler on Wan's sigmas."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(sigmas=official_unshifted_sigmas(steps))
    sched.set_begin_index(0)
    return sched


def diffusers_distill(denoising_step_list: list[int], shift: float) -> FlowMatchEulerDiscreteScheduler:
    """LightX2V's step-distilled schedule as diffusers' flow Euler: the unshifted list / 1000 as sigmas, shift applied."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(sigmas=[t / 1000 for t in denoising_step_list])
    sched.set_begin_index(0)
    return sched


class OfficialSigmasUniPC(UniPCMultistepScheduler):
    """diffusers' flow UniPC, given Wan's official sigmas whatever step count a diffusers pipeline asks for."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        super().set_timesteps(device=device, sigmas=official_unshifted_sigmas(num_inference_steps))


def text_embeddings(dim: int) -> np.ndarray:
    """[cond, uncond] contexts as pad_context leaves them: true rows, then zeros up to 512."""
    rng = np.random.default_rng(1)
    ctx = np.zeros((2, 512, dim), np.float32)
    ctx[0, :7] = rng.standard_normal((7, dim))
    ctx[1, :23] = rng.standard_normal((23, dim))
    return ctx
