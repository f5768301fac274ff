"""What every engine is: the :class:`InferenceEngine` contract, how answers name an engine
(:func:`engine_label`), its threads, and what the engines that run the cached ONNX export share.

Threads: each runtime gets one intra-op thread per CPU that Ray reserved for the calling actor
or replica (rounded, at least 1), else ``torch.get_num_threads()``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ...models.detection import flip_dense_back

__all__ = ["InferenceEngine", "engine_label", "default_threads", "ExportedGraphEngine"]


class InferenceEngine(Protocol):
    """Runs a bundle's network forward. ``infer`` is ``FractureClassifier.infer``'s contract:
    a float32 N x C x H x W batch -> (N x classes logits, N x h x w fracture-map logits or None),
    with test-time flip averaging when ``tta_flip``."""

    name: str
    precision: str

    def infer(self, x: torch.Tensor, *, tta_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def describe(self) -> dict[str, Any]: ...


def engine_label(engine: InferenceEngine) -> str:
    """How answers and scoring output name the engine that computed them: ``<engine>-<precision>``."""
    return f"{engine.name}-{engine.precision}"


def default_threads() -> int:
    """Intra-op threads: the CPUs Ray reserved for this actor, replica or task (rounded, at
    least 1) when called inside one, else torch's thread count."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; elsewhere there is nothing to ask
    if ray is not None:
        try:
            if ray.is_initialized():
                context = ray.get_runtime_context()
                if context.worker.mode == ray.WORKER_MODE:
                    return max(1, round(float(context.get_assigned_resources().get("CPU", 0))))
        except Exception:  # a Ray without these APIs: fall back to torch's count
            pass
    return max(1, torch.get_num_threads())


def _flip_averaged(run: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor | None]], x: torch.Tensor,
                   tta_flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """As ``FractureClassifier.infer``: the same averaging, in the same order, on a runtime's
    outputs (``run``: a float32 N x C x H x W array -> logits, map logits or None)."""
    array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
    logits, maps = run(array)
    if tta_flip:
        logits_f, maps_f = run(np.ascontiguousarray(array[..., ::-1]))
        logits = (logits + logits_f) / 2
        maps = None if maps is None else (maps + flip_dense_back(maps_f)) / 2
    return logits, maps


class ExportedGraphEngine:
    """What the engines that run the cached export share: flip averaging exactly as
    ``FractureClassifier.infer`` does it, on the runtime's outputs (``_run``), and the
    description (``_describe_extra`` adds a runtime's own facts)."""

    name: str
    precision: str
    threads: int
    path: Path
    key: str

    def _run(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def infer(self, x: torch.Tensor, *, tta_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``FractureClassifier.infer``: the same averaging, in the same order, on the
        runtime's outputs."""
        return _flip_averaged(self._run, x, tta_flip)

    def _describe_extra(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "precision": self.precision, "device": "cpu", "threads": self.threads,
                "onnx": str(self.path), "cache_key": self.key, **self._describe_extra()}

