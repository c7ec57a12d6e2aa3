"""A real backend that keeps what it loads, for tests that check loading and releasing."""

from __future__ import annotations

from wanrt.runtime.backends.onnxruntime import OnnxRuntimeBackend


class RecordingBackend(OnnxRuntimeBackend):
    """The real ONNX Runtime backend, keeping every engine it loads (in order) so a test can check them."""

    def __init__(self) -> None:
        super().__init__()
        self.engines = []

    def load(self, component, bundle_dir, **kw):
        engine = super().load(component, bundle_dir, **kw)
        self.engines.append(engine)
        return engine
