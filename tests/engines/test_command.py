"""`cli.py verify` (`engines/command.py`): a fresh process checks a bundle with the standard library and click only."""

from __future__ import annotations

from tests.runtime.bundles import make_bundle

HEAVY = ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "ml_dtypes", "safetensors", "diffusers", "transformers",
         "tokenizers", "huggingface_hub", "PIL", "scipy", "tqdm", "av", "imageio", "cuda", "tensorrt")
NOT_NEEDED = ("wanrt.export", "wanrt.calibration", "wanrt.runtime", "wanrt.plugins_trt")


def offenders(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") or m.startswith(n + "_") for n in names))


def test_verify_imports_no_engine_runtime_or_export_side_module(tmp_path, cli_modules):
    bundle = make_bundle(tmp_path / "bundle", moe=False)
    for args in (("verify", bundle, "--json"), ("verify", bundle, "--quick")):
        code, modules = cli_modules(*args)
        assert code == 0, args
        assert offenders(modules, HEAVY) == [] and offenders(modules, NOT_NEEDED) == []
        assert "wanrt.engines.manifest" in modules  # the harness really ran verify
    (bundle / "text_encoder" / "model.onnx").write_bytes(b"damaged")
    code, modules = cli_modules("verify", bundle)
    assert code == 2 and offenders(modules, HEAVY + NOT_NEEDED) == []
