"""OpenVINO, the fast precision's engine on CPU: the bundle's INT8 graph, or the cached export
(:mod:`.export`) with ``INFERENCE_PRECISION_HINT`` bf16 (on a CPU without bf16 the plugin runs
float32 and the engine says so in its precision). Not equal to eager PyTorch: a bundle runs it
only after a passed validation (:mod:`.fast_gate`). Its threads are not pinned to cores, so
actors sharing a machine do not steal each other's cores."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import ExportedGraphEngine, default_threads
from .choice import FAST_ENGINE, FAST_PRECISION, openvino_version
from .export import ExportSettings, cached_export

__all__ = ["OpenVinoEngine"]


def _openvino_config(precision: str, threads: int) -> dict[str, Any]:
    """The CPU plugin's settings: ``threads`` inference threads for one request at a time,
    not pinned to cores (Ray actors sharing a machine would all pin to the same first ones)."""
    return {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}


def _openvino_outputs(path: str, x: np.ndarray) -> list[np.ndarray]:
    """OpenVINO's float32 reading of the file (the export check for this runtime)."""
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", _openvino_config("f32", 1))
    result = compiled.create_infer_request().infer({0: x})
    return [np.array(result[out]) for out in compiled.outputs]


def _type_name(value: Any) -> str:
    """An OpenVINO element type as its short name ("bf16", "f32")."""
    name = getattr(value, "get_type_name", None)
    return str(name() if callable(name) else value)


class OpenVinoEngine(ExportedGraphEngine):
    """The fast precision: the same cached ONNX export as :class:`OnnxRuntimeEngine`,
    compiled by OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT`` bf16. ``precision``
    is what the compiled model reports (bf16 where the CPU has it, else f32). Not equal to
    eager PyTorch: a bundle runs it only after a passed validation (see the module's docs)."""

    name = FAST_ENGINE
    precision = FAST_PRECISION

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], *,
                 model_spec: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                 threads: int | None = None, settings: ExportSettings = ExportSettings(),
                 precision: str = FAST_PRECISION, graph: str | os.PathLike | None = None):
        import openvino as ov

        if next(model.parameters()).device.type != "cpu":
            raise ValueError("The openvino engine runs on CPU only")
        self.input_shape = tuple(int(v) for v in input_shape)
        self.settings = settings
        self.localizes = bool(getattr(model, "localizes", False))
        self.version = openvino_version() or ov.__version__
        self.graph_sha256 = None
        if graph is None:  # the float export (checked once against eager PyTorch), at ``precision``
            export = cached_export(model, self.input_shape, runtime=f"openvino-{self.version}",
                                   run=_openvino_outputs, model_spec=model_spec, cache_dir=cache_dir,
                                   settings=settings)
            self.key, self.folder, self.path = export.key, export.folder, export.path
            self.exported = export.exported
        else:  # a quantised graph: its INT8 operations run as quantised, the rest at float32
            self.path = Path(graph)
            self.graph_sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
            self.key, self.folder, self.exported = self.graph_sha256[:32], self.path.parent, False
            precision = "f32"
        self.threads = int(threads) if threads else default_threads()
        core = ov.Core()
        network = core.read_model(str(self.path))
        # Compiled for one image (static shapes are the CPU plugin's fast path, and the CPU
        # runs image by image: BundleModel.predict); a bigger batch runs as a loop.
        network.reshape([1, *self.input_shape])
        self.compiled = core.compile_model(network, "CPU", _openvino_config(precision, self.threads))
        self.precision = ("int8" if graph is not None
                          else _type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT")))
        self.outputs = list(self.compiled.outputs)
        # One request, one call at a time (a request is not thread-safe; with one stream,
        # parallel requests would only queue behind each other).
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def _run_one(self, x: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            result = self._request.infer({0: x})
            return [np.array(result[o], dtype=np.float32, copy=True) for o in self.outputs]  # it reuses its buffers

    def _run(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        if len(x) == 0:  # no images: outputs with no rows
            return tuple(None if t is None else t[:0] for t in self._run(np.zeros((1, *x.shape[1:]), np.float32)))
        out = [np.concatenate(parts) for parts in zip(*(self._run_one(x[i:i + 1]) for i in range(len(x))))]
        return torch.from_numpy(out[0]), (torch.from_numpy(out[1]) if len(out) > 1 else None)

    def _describe_extra(self) -> dict[str, Any]:
        return {"openvino": self.version, **({"graph_sha256": self.graph_sha256} if self.graph_sha256 else {})}

