"""The error types users see: a message that names the file, key or value at fault."""

from __future__ import annotations


class WanrtError(Exception):
    """A problem with the user's input; the CLI prints the message on one line and exits 2."""

    exit_code = 2


class BundleError(WanrtError):
    """A bundle is missing, malformed, of an unknown schema, or fails verification."""


class CheckpointError(WanrtError):
    """A checkpoint file is malformed or does not fit what was expected of it."""
