"""Eager PyTorch: the model's own ``infer``, on CPU or CUDA. Grad-CAM and anything else that
needs gradients always runs the model this way."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["TorchEngine"]


class TorchEngine:
    """Eager PyTorch: the model's own ``infer`` (today's path; CPU or CUDA)."""

    name = "torch"
    precision = "float32"

    def __init__(self, model: nn.Module):
        self.model = model

    def infer(self, x: torch.Tensor, *, tta_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model.infer(x, tta_flip=tta_flip)

    def describe(self) -> dict[str, Any]:
        device = next(self.model.parameters()).device
        return {"engine": self.name, "precision": self.precision, "device": str(device),
                "threads": torch.get_num_threads() if device.type == "cpu" else None}

