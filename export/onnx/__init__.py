"""ONNX export of every bundle component, and the TensorRT lint of the graphs.

- `component`: what an export writes (`ExportedComponent`): `out_dir/model.onnx` plus one
  external data file `out_dir/model.onnx.data`, written through a temporary folder;
- `torch_to_onnx`: the generic machinery every exporter uses (`export_onnx`: trace, stream the
  weights, fold constants without touching a weight, name the signature's dims, run graph
  passes, write);
- `dit`, `encoders`, `vae`: one exporter per component kind, each
  `export_*_onnx(source, out_dir, precision, **options) -> ExportedComponent`
  (`export.build.EXPORTERS` maps component kinds to them);
- `lint`: the TensorRT-compatibility lint (`python cli.py lint-onnx FILE`), with the parser's
  operator list in `data/`;
- `bf16`: a bf16 graph rewritten to run where bf16 kernels are missing (ONNX Runtime on CPU).

A new exporter is one module here and one `EXPORTERS` entry; a rewrite of the traced graph
(Q/DQ insertion, a plugin-node variant) is a function `(onnx_ir.Model) -> None` handed to
`export_onnx(passes=...)` through the exporter's `passes` option.

Nothing is imported here, so `lint` (onnx only) loads without torch.
"""
