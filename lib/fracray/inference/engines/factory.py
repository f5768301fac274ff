"""The engine for a loaded model (:func:`make_engine`): the runtime that the chosen engine and
precision (:mod:`.choice`) name, on this device."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from .base import InferenceEngine
from .choice import check_fast_runs_here, requested, resolve_engine
from .onnxruntime_engine import OnnxRuntimeEngine
from .openvino_engine import OpenVinoEngine
from .torch_engine import TorchEngine

__all__ = ["make_engine"]


def make_engine(model: nn.Module, input_shape: tuple[int, int, int], *, engine: str | None = None,
                device: str | torch.device = "cpu", model_spec: dict[str, Any] | None = None,
                cache_dir: str | os.PathLike | None = None, threads: int | None = None,
                precision: str | None = None, environment: bool = True,
                fast_graph: str | os.PathLike | None = None) -> InferenceEngine:
    """The engine for a loaded model whose input is ``input_shape`` (C, H, W). ``model_spec``:
    what identifies the model beyond its weights (the bundle's model description), part of the
    cache key. With "auto", a model that does not export faithfully runs on torch (a warning
    says why); asked for by name, onnxruntime raises instead. ``precision``: "exact" or "fast"
    as given, for the caller has decided it (``choice.resolve_precision``; BundleModel calls it);
    "fast" is OpenVINO (bf16, or int8 on ``fast_graph``), never a fallback, and whether a bundle
    may run it is the caller's check (``fast_gate.check_fast_mode``).
    ``environment=False``: ignore ``$FRACRAY_ENGINE`` (the fast-mode validation runs both).
    ``fast_graph``: in fast precision, a quantised (INT8) graph to run instead of the export at bf16."""
    if requested("precision", precision, environment=False) == "fast":
        check_fast_runs_here(device, engine, environment=environment)
        return OpenVinoEngine(model, input_shape, model_spec=model_spec, cache_dir=cache_dir, threads=threads,
                              graph=fast_graph)
    name = resolve_engine(engine, device, environment=environment)
    if name == "torch":
        return TorchEngine(model)
    try:
        return OnnxRuntimeEngine(model, input_shape, model_spec=model_spec, cache_dir=cache_dir, threads=threads)
    except Exception as exc:
        if requested("engine", engine, environment=environment) != "auto":
            raise
        warnings.warn(f"ONNX Runtime engine unavailable for this model ({type(exc).__name__}: {exc}); "
                      f"running it on eager PyTorch", RuntimeWarning, stacklevel=2)
        return TorchEngine(model)

