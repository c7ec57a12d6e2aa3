"""W8A8 fp8 bundle of the tiny Wan2.1 FLF2V, calibrated and checked end to end (the checks and their bounds:
tests/calibration/w8a8_variants.py)."""

from tests.calibration.w8a8_variants import checks_for

globals().update(checks_for("flf2v"))
