"""The documented range of every number a user, a LightX2V config or a bundle sets for sampling.

One table, read at build time (config keys), at load time (a bundle's `sampling`) and at run
time (`run`'s options, `serve`'s JSON fields): a value outside its range, NaN or infinite is
refused before any work, naming where it came from.  The upper bounds keep a mistyped value
from turning into hours of work or an allocation the machine cannot make; each is far beyond
what the Wan models were trained for (up to 1280x720, 81 frames, 50 steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_STEPS = 1000  # the models' 1000 training timesteps
MAX_FRAMES = 1001  # 4n+1 frames: about a minute at 16 fps
MAX_SIDE = 4096  # pixels per side of a video or of a conditioning image after resizing
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE  # an input image larger than this is refused before it is decoded


@dataclass(frozen=True)
class NumberRange:
    """An interval [low, high] (or (low, high] with `low_open`); `integer` also requires a whole number."""

    low: float
    high: float
    low_open: bool = False
    integer: bool = False
    high_text: str = ""  # how `high` is written in messages, when not as a plain number

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not (math.isfinite(value) and (not self.integer or value.is_integer())):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def expected(self) -> str:
        """'an integer in [1, 1000]', 'a finite number in (0, 100]'."""
        kind = "an integer" if self.integer else "a finite number"
        low, high = (f"{int(v)}" if self.integer else f"{v:g}" for v in (self.low, self.high))
        return f"{kind} in {'(' if self.low_open else '['}{low}, {self.high_text or high}]"


# SamplingDefaults field -> its range (guide_scale: each of its two values)
SAMPLING_RANGES: dict[str, NumberRange] = {
    "steps": NumberRange(1, MAX_STEPS, integer=True),
    "shift": NumberRange(0, 100, low_open=True),
    "guide_scale": NumberRange(0, 100),
    "boundary": NumberRange(0, 1),
    "boundary_step_index": NumberRange(0, MAX_STEPS, integer=True),
    "frames": NumberRange(1, MAX_FRAMES, integer=True),
    "height": NumberRange(1, MAX_SIDE, integer=True),
    "width": NumberRange(1, MAX_SIDE, integer=True),
    "fps": NumberRange(1, 240, integer=True),
    "max_area": NumberRange(1, MAX_SIDE * MAX_SIDE, integer=True),
}
TIMESTEP_RANGE = NumberRange(0, 1000, integer=True)
CONTEXT_SCALE_RANGE = NumberRange(0, 10)  # VACE hint weight (official vace_context_scale: 1.0; 0 turns the control off)  # each entry of a denoising_step_list
SEED_RANGE = NumberRange(0, 2**64 - 1, integer=True, high_text="2**64 - 1")  # numpy's generator takes any non-negative 64-bit seed
MEMORY_BUDGET_GIB = NumberRange(0, 2**20, low_open=True)  # --vram-budget


def out_of_range(field: str, value: Any) -> NumberRange | None:
    """The range `value` breaks for sampling field `field` (each item of a list field), else None."""
    rng = SAMPLING_RANGES.get(field) or (TIMESTEP_RANGE if field == "denoising_step_list" else None)
    if rng is None or value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    return rng if not items or not all(rng.contains(v) for v in items) else None


def first_out_of_range(values: dict[str, Any]) -> tuple[str, Any, NumberRange] | None:
    """(field, value, range) of the first sampling value outside its range, in table order; None when all fit."""
    for field in (*SAMPLING_RANGES, "denoising_step_list"):
        if field in values and (rng := out_of_range(field, values[field])) is not None:
            return field, values[field], rng
    return None
