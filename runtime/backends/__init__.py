"""Inference backends behind one interface (ONNX Runtime now, TensorRT plans next)."""
