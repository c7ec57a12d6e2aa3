"""W8A8 int8 bundle of the tiny Wan2.2 TI2V-5B, calibrated and checked end to end (the checks and their bounds:
tests/calibration/w8a8_variants.py)."""

from tests.calibration.w8a8_variants import checks_for

globals().update(checks_for("ti2v"))
