"""Transfer-learning strategies: which layers train.

A "layer" is a leaf module that owns parameters (convolution, normalisation,
linear), counted in registration order, which for these networks is forward
order. "Last N layers" means the last N such backbone layers; the classifier
head always trains. This mirrors the papers' Keras counting for the layers that
matter (those with weights).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

__all__ = ["TransferStrategy", "STRATEGY_PRESETS", "resolve_strategy", "parameter_layers", "apply_strategy",
           "is_batchnorm"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def is_batchnorm(module: nn.Module) -> bool:
    # timm's BatchNormAct2d subclasses BatchNorm2d, so this covers it too.
    return isinstance(module, _BN_TYPES)


@dataclasses.dataclass(frozen=True)
class TransferStrategy:
    """kind: "full" (everything trains), "last_n" (the last ``n_layers`` backbone
    layers and the head), "classifier_only" (the head only).
    freeze_batchnorm: every BatchNorm keeps its ImageNet statistics and affine
    parameters (eval mode, no gradient), as in the MURA 7-bone paper."""

    kind: Literal["full", "last_n", "classifier_only"] = "full"
    n_layers: int | None = None
    freeze_batchnorm: bool = False

    def __post_init__(self):
        if self.kind not in ("full", "last_n", "classifier_only"):
            raise ValueError(f"Unknown strategy kind {self.kind!r}; expected full, last_n or classifier_only")
        if self.kind == "last_n" and (self.n_layers is None or self.n_layers < 1):
            raise ValueError(f"last_n needs n_layers >= 1. Got {self.n_layers}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


STRATEGY_PRESETS: dict[str, TransferStrategy] = {
    "full": TransferStrategy("full"),
    "classifier_only": TransferStrategy("classifier_only"),
    # MURA humerus paper: DenseNet121, last 60 layers trainable.
    "last60": TransferStrategy("last_n", 60),
    # MURA 7-bone paper: EfficientNet-B0, last 20 layers, every BatchNorm frozen.
    "last20_bn_frozen": TransferStrategy("last_n", 20, freeze_batchnorm=True),
}


def resolve_strategy(strategy: str | TransferStrategy | dict) -> TransferStrategy:
    if isinstance(strategy, TransferStrategy):
        return strategy
    if isinstance(strategy, dict):
        return TransferStrategy(**strategy)
    if strategy in STRATEGY_PRESETS:
        return STRATEGY_PRESETS[strategy]
    if strategy.startswith("last") and strategy[4:].isdigit():
        return TransferStrategy("last_n", int(strategy[4:]))
    raise ValueError(f"Unknown transfer strategy {strategy!r}; expected one of {sorted(STRATEGY_PRESETS)} or lastN")


def parameter_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules that own parameters directly, in registration order."""
    return [(name, m) for name, m in module.named_modules()
            if any(True for _ in m.parameters(recurse=False))]


def apply_strategy(backbone: nn.Module, head: nn.Module, strategy: TransferStrategy) -> set[str]:
    """Set requires_grad on the backbone and head; return the names of the backbone
    layers that train (empty set for classifier_only)."""
    layers = parameter_layers(backbone)
    if strategy.kind == "full":
        trainable = {name for name, _ in layers}
    elif strategy.kind == "classifier_only":
        trainable = set()
    else:
        if strategy.n_layers > len(layers):
            raise ValueError(f"Asked to train the last {strategy.n_layers} layers, but the backbone has only "
                             f"{len(layers)} layers with parameters")
        trainable = {name for name, _ in layers[-strategy.n_layers:]}
    for name, module in layers:
        train = name in trainable and not (strategy.freeze_batchnorm and is_batchnorm(module))
        for p in module.parameters(recurse=False):
            p.requires_grad_(train)
    if strategy.freeze_batchnorm:
        trainable = {name for name in trainable if not is_batchnorm(backbone.get_submodule(name))}
    for p in head.parameters():
        p.requires_grad_(True)
    return trainable
