"""Calibration prompts: the built-in set (package data) or the user's file, one prompt per line.

A prompt file is UTF-8 text; blank lines and lines starting with `#` are skipped.  The digest
recorded in the manifest and the calibration cache key is the sha256 of the prompts joined by
newlines, so it names the prompts, not the file they came from.  Torch-free.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from wanrt.engines.errors import WanrtError

DEFAULT_PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.txt"
MIN_DEFAULT_PROMPTS = 32


@dataclass(frozen=True)
class PromptSet:
    """The prompts a calibration runs, and where they came from."""

    prompts: tuple[str, ...]
    source: str  # "default" or the file's path

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.prompts).encode("utf-8")).hexdigest()


def parse_prompts(text: str) -> tuple[str, ...]:
    """The prompts of a prompt file's text: stripped lines, blank and `#` lines skipped."""
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def read_prompts(path: str | os.PathLike | None = None) -> PromptSet:
    """The prompts of `path` (None: the built-in set); an unreadable or empty file is a WanrtError naming it."""
    if path is None:
        return PromptSet(parse_prompts(DEFAULT_PROMPTS_FILE.read_text(encoding="utf-8")), "default")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WanrtError(f"--calib-prompts {p}: no such file") from None
    except IsADirectoryError:
        raise WanrtError(f"--calib-prompts {p}: a folder, not a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WanrtError(f"--calib-prompts {p}: unreadable ({e}); expected UTF-8 text, one prompt per line") from None
    prompts = parse_prompts(text)
    if not prompts:
        raise WanrtError(f"--calib-prompts {p}: holds no prompts (one per line; blank lines and '#' lines are skipped)")
    return PromptSet(prompts, str(p))
