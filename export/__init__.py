"""The torch side: checkpoint formats, LoRA, export-ready modules, ONNX export, TensorRT build."""
