"""One optimisation step, shared by the Ray Train loop and the throughput benchmark,
so the benchmark times exactly the step that training runs.

channels_last memory format on every device (CPU convolutions run it ~2x faster here, as
CUDA's tensor cores do), and the precision :func:`~fracray.training.precision.resolve_training_precision`
decides: float16 autocast with a gradient scaler on CUDA, bfloat16 autocast on CPUs with
native bf16, float32 otherwise. Weights and optimizer state stay float32.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..imaging.preprocess import PreprocessConfig, finalize, to_tensor
from .precision import resolve_training_precision

__all__ = ["TrainStep", "model_input", "place_model"]


def place_model(model: torch.nn.Module, device: torch.device, channels_last: bool = True) -> torch.nn.Module:
    """Move a model to ``device`` in the memory format its inputs will have."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def model_input(images: np.ndarray, preprocess: PreprocessConfig, device: torch.device,
                channels_last: bool = True) -> torch.Tensor:
    """Compact single-channel images from the stream (N x 1 x H x W, float16/32) ->
    the model input on ``device``. The copy ships one channel; expansion to the
    model's channels and normalisation run on the device."""
    x = finalize(to_tensor(images).to(device, non_blocking=True), preprocess)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class TrainStep:
    """forward -> loss -> backward -> optimizer step, at the resolved precision.

    precision: "auto" (float16 on CUDA, bf16 on a CPU with native bf16, else float32),
        "bf16", "float16" (CUDA) or "float32". ``amp=False`` is the old spelling of "float32".
    loss_fn(outputs, target) gets float32 outputs; the default is cross-entropy.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 amp: bool = True, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 precision: str = "auto"):
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.precision = resolve_training_precision(precision if amp else "float32", device.type)
        self.amp = self.precision != "float32"
        self.dtype = {"bf16": torch.bfloat16, "float16": torch.float16}.get(self.precision)
        # A gradient scaler only for float16 (bf16 has float32's range).
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "float16")
        self.loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target))

    def autocast(self):
        """The forward pass's precision context; use it for validation too."""
        return torch.autocast(device_type=self.device.type, dtype=self.dtype or torch.float32,
                              enabled=self.dtype is not None)

    def __call__(self, x: torch.Tensor, y, **forward_kwargs) -> torch.Tensor:
        """``forward_kwargs`` go to the model (through DDP, so gradients still synchronise);
        with them the model may return a tuple (logits, fracture maps), which ``loss_fn`` gets whole."""
        with self.autocast():
            outputs = self.model(x, **forward_kwargs)
        outputs = outputs.float() if isinstance(outputs, torch.Tensor) else tuple(o.float() for o in outputs)
        loss = self.loss_fn(outputs, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()
