"""One optimisation step, shared by the Ray Train loop and the throughput benchmark,
so the benchmark times exactly the step that training runs.

On CUDA: channels_last memory format (faster convolutions on tensor cores) and,
with ``amp``, float16 autocast with a gradient scaler. On CPU: plain float32.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..imaging.preprocess import PreprocessConfig, finalize, to_tensor

__all__ = ["TrainStep", "model_input", "place_model"]


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a model to ``device`` in the memory format its inputs will have."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def model_input(images: np.ndarray, preprocess: PreprocessConfig, device: torch.device) -> torch.Tensor:
    """Compact single-channel images from the stream (N x 1 x H x W, float16/32) ->
    the model input on ``device``. The copy ships one channel; expansion to the
    model's channels and normalisation run on the device."""
    x = finalize(to_tensor(images).to(device, non_blocking=True), preprocess)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


class TrainStep:
    """forward -> loss -> backward -> optimizer step, with AMP where it applies.

    loss_fn(logits, target) gets float32 logits; the default is cross-entropy.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 amp: bool = True, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.amp = bool(amp) and device.type == "cuda"  # float16 autocast pays off on GPUs only
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target))

    def autocast(self):
        """The forward pass's precision context; use it for validation too."""
        return torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp)

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
