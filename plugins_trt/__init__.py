"""The attention plugin: kernels, TensorRT registration, ONNX op, numpy reference."""
