"""The attention plugin: kernels, TensorRT registration, ONNX op, numpy reference.

- `onnx_op`: the `wanrt::WanAttention` ONNX node our exported graphs hold (the export-side seam);
- `flash_kernel`: the Triton kernel's source; `kernels`: its variants (`KernelSpec`), launch ABI
  and `run_attention` on torch tensors (GPU, or CPU under TRITON_INTERPRET=1);
- `tiles`: per-architecture shared-memory limits, PTX ISA and tile candidates;
- `aot`: ahead-of-time compilation into a plugin folder (`build_plugin`, `plugin-build`), reading
  it back (`read_plugin`, `kernel_table`) and the manifest's `PluginRecord`;
- `tensorrt_plugin`: `register_plugin`, the `tensorrt.plugin` definitions a TensorRT build
  imports before parsing; `reference`: the math in numpy, the tests' definition.
"""
