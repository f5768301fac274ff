"""ONNX Runtime, the exact precision's engine on CPU: the cached export (:mod:`.export`) at
float32, outputs equal to eager PyTorch within 1e-4 on probabilities and fracture maps
(tests/test_engine.py), about twice as fast per core. Its worker threads do not spin between
runs, so actors sharing a machine do not steal each other's cores."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import ExportedGraphEngine, default_threads
from .export import ExportSettings, cached_export

__all__ = ["OnnxRuntimeEngine", "onnxruntime_outputs"]


def onnxruntime_outputs(path: str, x: np.ndarray) -> list[np.ndarray]:
    """ONNX Runtime's float32 reading of the file (the export check for this runtime)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})



class OnnxRuntimeEngine(ExportedGraphEngine):
    """The network exported to ONNX (cached, see the module's docs) and run by ONNX Runtime
    on CPU, float32: outputs equal to eager PyTorch within 1e-4."""

    name = "onnxruntime"
    precision = "float32"

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], *,
                 model_spec: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                 threads: int | None = None, settings: ExportSettings = ExportSettings()):
        import onnxruntime as ort

        if next(model.parameters()).device.type != "cpu":
            raise ValueError("The onnxruntime engine runs on CPU only")
        self.input_shape = tuple(int(v) for v in input_shape)
        self.settings = settings
        self.localizes = bool(getattr(model, "localizes", False))
        export = cached_export(model, self.input_shape, runtime=f"onnxruntime-{ort.__version__}",
                               run=onnxruntime_outputs, model_spec=model_spec, cache_dir=cache_dir, settings=settings)
        self.key, self.folder, self.path = export.key, export.folder, export.path
        self.exported = export.exported  # True when this object made the file (a cache miss)
        self.threads = int(threads) if threads else default_threads()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.session.run(self.output_names, {self.input_name: x})
        return torch.from_numpy(out[0]), (torch.from_numpy(out[1]) if len(out) > 1 else None)

