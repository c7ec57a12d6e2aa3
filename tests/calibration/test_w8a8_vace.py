"""W8A8 int8 bundle of the tiny Wan2.1 VACE, calibrated and checked end to end (the checks and their bounds:
tests/calibration/w8a8_variants.py)."""

from tests.calibration.w8a8_variants import checks_for

globals().update(checks_for("vace"))
