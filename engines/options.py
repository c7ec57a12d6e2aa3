"""Click parameter types shared by every command: numbers checked against `engines.limits` ranges.

click's own `FloatRange` lets NaN through (every comparison with NaN is false) and has no upper
bound unless given one; `InRange` refuses NaN, infinities and values outside the range with
click's usual one-line usage error, naming the option.
"""

from __future__ import annotations

from typing import Any

import click

from .limits import NumberRange


class InRange(click.ParamType):
    """A number within a `NumberRange` (an int when the range is integral, else a float)."""

    def __init__(self, rng: NumberRange) -> None:
        self.rng = rng
        self.name = "integer" if rng.integer else "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(value) if self.rng.integer else float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r}: expected {self.rng.expected()}", param, ctx)
        if not self.rng.contains(number):
            self.fail(f"{value!r}: expected {self.rng.expected()}", param, ctx)
        return number
