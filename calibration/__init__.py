"""fp8/int8 weight quantization, activation calibration, Q/DQ placement."""
