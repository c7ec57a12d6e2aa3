"""Flow-matching samplers in numpy: Wan's UniPC, flow Euler, and LightX2V's step-distilled Euler.

All three integrate the velocity `v ~ noise - x0` the DiT predicts, from sigma ~ 1 (noise)
to sigma = 0, with `x_t = (1 - sigma) x0 + sigma noise`.  Each sampler exposes

    timesteps  float64 [steps]    the value the DiT receives at each step
    sigmas     float32 [steps+1]  the noise level at each step, ending at 0
    step(v, x) -> x               one update; call once per timestep, in order

Schedules (facts: wan-architecture.md §2, lightx2v-formats.md §3):

* `wan_schedule(steps, shift)`: the official `FlowUniPCMultistepScheduler(shift=1)` +
  `set_timesteps(steps, shift=shift)`: sigma = linspace(0.999, 0, steps+1)[:-1] (0.999 as the
  float32 the scheduler stores), shifted `s*sigma/(1+(s-1)*sigma)`, final sigma 0, and
  timesteps = int64(sigma*1000), i.e. truncated.  Used by UniPC and flow Euler.
* `distill_schedule(denoising_step_list, shift)`: LightX2V `WanStepDistillScheduler`:
  sigma = linspace(1, 0, 1001)[:-1] shifted, picked at index 1000 - t for each *unshifted* t
  in the list; timesteps = sigma*1000 (not truncated: 1000, 937.5, 833.33, 625 for shift 5).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from wanrt.engines.errors import WanrtError

NUM_TRAIN_TIMESTEPS = 1000
SAMPLERS = ("unipc", "euler", "distill")


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The flow-matching time shift `s*sigma / (1 + (s-1)*sigma)`."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass(frozen=True)
class FlowSchedule:
    """The noise levels of a sampling run and the timestep the DiT sees at each step."""

    sigmas: np.ndarray  # float32 [steps+1], last is 0
    timesteps: np.ndarray  # float64 [steps]

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def wan_schedule(steps: int, shift: float) -> FlowSchedule:
    """Official Wan UniPC schedule: truncated integer timesteps, shifted sigmas ending at 0."""
    if steps < 1:
        raise WanrtError(f"steps={steps}; expected at least 1")
    if shift <= 0:
        raise WanrtError(f"shift={shift}; expected a positive number")
    # FlowUniPCMultistepScheduler stores its training sigmas as float32: sigma_max = f32(1 - 1/1000).
    sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
    sigmas = shift_sigmas(np.linspace(sigma_max, 0.0, steps + 1)[:-1], shift)
    timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64).astype(np.float64)
    return FlowSchedule(np.concatenate([sigmas, [0.0]]).astype(np.float32), timesteps)


def distill_schedule(denoising_step_list: list[int], shift: float) -> FlowSchedule:
    """LightX2V step-distill schedule from an unshifted `denoising_step_list` (e.g. [1000, 750, 500, 250])."""
    if not denoising_step_list:
        raise WanrtError("denoising_step_list is empty; expected e.g. [1000, 750, 500, 250]")
    bad = [t for t in denoising_step_list if not (isinstance(t, int) and 1 <= t <= NUM_TRAIN_TIMESTEPS)]
    if bad:
        raise WanrtError(f"denoising_step_list {denoising_step_list}: entries {bad} are not integers in 1..1000")
    if shift <= 0:
        raise WanrtError(f"shift={shift}; expected a positive number")
    full = np.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1].astype(np.float32)
    full = shift_sigmas(full, np.float32(shift)).astype(np.float32)
    picked = full[[NUM_TRAIN_TIMESTEPS - t for t in denoising_step_list]]
    timesteps = (picked * np.float32(NUM_TRAIN_TIMESTEPS)).astype(np.float64)
    return FlowSchedule(np.concatenate([picked, [np.float32(0.0)]]).astype(np.float32), timesteps)


class Sampler(ABC):
    """A flow-matching sampler over a fixed schedule; `step` is called once per timestep."""

    name: str = ""

    def __init__(self, schedule: FlowSchedule) -> None:
        self.schedule = schedule
        self.step_index = 0

    @property
    def timesteps(self) -> np.ndarray:
        return self.schedule.timesteps

    @property
    def sigmas(self) -> np.ndarray:
        return self.schedule.sigmas

    @property
    def num_steps(self) -> int:
        return self.schedule.steps

    def step(self, velocity: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """Advance `sample` (float32) by one step given the model's velocity at the current timestep."""
        if self.step_index >= self.num_steps:
            raise RuntimeError(f"{self.name}: all {self.num_steps} steps already taken")
        out = self._step(velocity.astype(np.float32, copy=False), sample.astype(np.float32, copy=False))
        self.step_index += 1
        return out

    @abstractmethod
    def _step(self, velocity: np.ndarray, sample: np.ndarray) -> np.ndarray: ...


class FlowEuler(Sampler):
    """First-order flow-matching Euler: x <- x + (sigma_next - sigma) * v."""

    name = "euler"

    def _step(self, velocity: np.ndarray, sample: np.ndarray) -> np.ndarray:
        i = self.step_index
        dt = float(self.sigmas[i + 1]) - float(self.sigmas[i])
        return sample + dt * velocity


class StepDistillEuler(Sampler):
    """LightX2V's step-distilled update: x <- x - sigma*v + sigma_next*v (sigma_next = 0 at the end)."""

    name = "distill"

    def _step(self, velocity: np.ndarray, sample: np.ndarray) -> np.ndarray:
        i = self.step_index
        x = sample - float(self.sigmas[i]) * velocity
        if i < self.num_steps - 1:
            x = x + velocity * float(self.sigmas[i + 1])
        return x


def _lambda(sigma: float) -> float:
    """log-SNR of the flow schedule, log(1 - sigma) - log(sigma); +inf at sigma = 0."""
    with np.errstate(divide="ignore"):
        return float(np.log(np.float64(1.0 - sigma)) - np.log(np.float64(sigma)))


class FlowUniPC(Sampler):
    """UniPC multistep (UniP predictor + UniC corrector) on x0 predictions, B(h) = expm1(h) ("bh2").

    Configured as Wan's `FlowUniPCMultistepScheduler`: `predict_x0=True`, `solver_type="bh2"`,
    `lower_order_final=True`, no disabled correctors; `order` is `solver_order` (Wan: 2).
    """

    name = "unipc"

    def __init__(self, schedule: FlowSchedule, order: int = 2, lower_order_final: bool = True) -> None:
        super().__init__(schedule)
        if order < 1:
            raise WanrtError(f"UniPC order {order}; expected >= 1")
        self.order = order
        self.lower_order_final = lower_order_final
        self.x0_preds: list[np.ndarray] = []  # most recent last, at most `order`
        self.last_sample: np.ndarray | None = None
        self.this_order = 0
        self.lower_order_nums = 0

    def _coefficients(self, rks: list[float], hh: float, order: int) -> tuple[np.ndarray, np.ndarray, float, float]:
        """R, b, h*phi_1(h) and B(h) of the UniPC linear system (bh2)."""
        h_phi_1 = float(np.expm1(hh))
        b_h = h_phi_1
        h_phi_k = h_phi_1 / hh - 1.0
        factorial = 1
        r_rows, b = [], []
        rk = np.asarray(rks + [1.0], dtype=np.float64)
        for k in range(1, order + 1):
            r_rows.append(rk ** (k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        return np.stack(r_rows), np.asarray(b), h_phi_1, b_h

    def _differences(self, lambda_s0: float, h: float, order: int, offset: int) -> tuple[list[float], list[np.ndarray]]:
        """rk ratios and scaled differences D1 of the older x0 predictions against the newest."""
        m0 = self.x0_preds[-1]
        rks, d1s = [], []
        for k in range(1, order):
            si = self.step_index - k - offset
            rk = (_lambda(float(self.sigmas[si])) - lambda_s0) / h
            rks.append(rk)
            d1s.append((self.x0_preds[-(k + 1)] - m0) / np.float32(rk))
        return rks, d1s

    def _predict(self, sample: np.ndarray, order: int) -> np.ndarray:
        """UniP: from sigma[i] to sigma[i+1]."""
        i = self.step_index
        sigma_t, sigma_s0 = float(self.sigmas[i + 1]), float(self.sigmas[i])
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        rks, d1s = self._differences(lambda_s0, h, order, offset=0)
        r, b, h_phi_1, b_h = self._coefficients(rks, -h, order)
        m0 = self.x0_preds[-1]
        alpha_t = 1.0 - sigma_t
        x_t = (sigma_t / sigma_s0) * sample - (alpha_t * h_phi_1) * m0
        if d1s:
            rhos = [0.5] if order == 2 else list(np.linalg.solve(r[:-1, :-1], b[:-1]))
            x_t = x_t - (alpha_t * b_h) * sum(float(rho) * d for rho, d in zip(rhos, d1s))
        return x_t.astype(np.float32, copy=False)

    def _correct(self, x0_pred: np.ndarray, last_sample: np.ndarray, order: int) -> np.ndarray:
        """UniC: redo the last step from sigma[i-1] to sigma[i] using the new x0 prediction."""
        i = self.step_index
        sigma_t, sigma_s0 = float(self.sigmas[i]), float(self.sigmas[i - 1])
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        rks, d1s = self._differences(lambda_s0, h, order, offset=1)
        r, b, h_phi_1, b_h = self._coefficients(rks, -h, order)
        rhos = [0.5] if order == 1 else [float(v) for v in np.linalg.solve(r, b)]
        m0 = self.x0_preds[-1]
        alpha_t = 1.0 - sigma_t
        x_t = (sigma_t / sigma_s0) * last_sample - (alpha_t * h_phi_1) * m0
        correction = rhos[-1] * (x0_pred - m0)
        for rho, d in zip(rhos[:-1], d1s):
            correction = correction + rho * d
        return (x_t - (alpha_t * b_h) * correction).astype(np.float32, copy=False)

    def _step(self, velocity: np.ndarray, sample: np.ndarray) -> np.ndarray:
        i = self.step_index
        x0_pred = sample - float(self.sigmas[i]) * velocity
        if i > 0 and self.last_sample is not None:
            sample = self._correct(x0_pred, self.last_sample, self.this_order)
        self.x0_preds = (self.x0_preds + [x0_pred])[-self.order :]
        order = min(self.order, self.num_steps - i) if self.lower_order_final else self.order
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev = self._predict(sample, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.order)
        return prev


def make_sampler(
    name: str, steps: int, shift: float, denoising_step_list: list[int] | None = None
) -> Sampler:
    """A fresh sampler: "unipc" (Wan default), "euler", or "distill" (needs `denoising_step_list`)."""
    if name == "unipc":
        return FlowUniPC(wan_schedule(steps, shift))
    if name == "euler":
        return FlowEuler(wan_schedule(steps, shift))
    if name == "distill":
        if denoising_step_list is None:
            raise WanrtError("sampler 'distill' needs a denoising_step_list (e.g. [1000, 750, 500, 250])")
        return StepDistillEuler(distill_schedule(list(denoising_step_list), shift))
    raise WanrtError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
