"""Progress bars on stderr: one over the pipeline's stages, one over the denoising steps and the VAE calls (with ETA)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from tqdm import tqdm


class Progress:
    """A stage bar and a per-step bar; every method is a no-op when disabled."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._stages: tqdm | None = None

    def start(self, stages: list[str]) -> None:
        """Open the stage bar for the stages about to run."""
        self.close()
        self._stages = tqdm(
            total=len(stages), desc="stages", unit="stage", file=sys.stderr, disable=not self.enabled,
            dynamic_ncols=True, position=0, leave=True,
            bar_format="{desc}: {n_fmt}/{total_fmt} stages [{elapsed}]",  # stages differ in length: no ETA
        )

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Show `name` as the current stage while the block runs."""
        if self._stages is not None:
            self._stages.set_description_str(name)
        yield
        if self._stages is not None:
            self._stages.update(1)

    def steps(self, total: int, desc: str = "denoise") -> tqdm:
        """A bar over `total` steps (tqdm shows elapsed time and ETA)."""
        return tqdm(
            total=total, desc=desc, unit="step", file=sys.stderr, disable=not self.enabled,
            dynamic_ncols=True, position=1, leave=False,
        )

    def close(self) -> None:
        if self._stages is not None:
            self._stages.close()
            self._stages = None
