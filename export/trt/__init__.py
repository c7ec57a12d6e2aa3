"""TensorRT plans for a bundle's components (`build-engine --target trt|all`), refit, and the GPU self-test.

Small steps, in the style of Polygraphy's `backend/trt` loaders, each a function of the TensorRT
module `trt` (the full bindings, 10.8+ or 11.x) and what the previous step made:

- `api`: importing TensorRT and the GPU check (one line naming what is missing), and one small
  function per place where TensorRT 10.x and 11.x differ;
- `profiles`: `--sizes/--frames/--batch/--static` through the family's latent rules into (min,
  opt, max) shapes of every dynamic input of every component (pure Python);
- `config`: what a build is asked for (`TrtOptions`), the builder flags each component gets,
  the builder config with its profiles and timing cache;
- `engine`: network from ONNX (strongly typed, the plugin registered first), build straight to
  the plan file, read the built engine's numbers (streamable weights, device memory per profile);
- `cache`: plan cache keys (graph + options + TensorRT version + GPU) and the timing cache file;
- `stage`: per component of a bundle build, which existing plans to keep, which to build;
- `refit`: `cli.py refit BUNDLE --lora ...` (LoRA-merged weights into the ONNX and the plans);
- `selftest`: `cli.py selftest-trt` (every component on TensorRT against ONNX Runtime).

Nothing here is imported by `runtime/`; `profiles`, `config` and `cache` load without TensorRT.
"""
