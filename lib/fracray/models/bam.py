"""Bottleneck Attention Module (Park, Woo, Lee, Kweon, BMVC 2018).

F' = F * (1 + sigmoid(M_c(F) + M_s(F))): a channel branch (global average pool ->
MLP with a C/r bottleneck) and a spatial branch (1x1 reduce -> two dilated 3x3
convolutions -> 1x1 to one map), broadcast-added. Reduction r = 16 and dilation
d = 4 as in the paper. Placed at a network's bottlenecks, the points just before
the feature map is downsampled.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BAM", "insert_bam", "bottleneck_modules"]


class ChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return self.mlp(pooled)[:, :, None, None]


class SpatialGate(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4, convs: int = 2):
        super().__init__()
        hidden = max(channels // reduction, 1)
        layers: list[nn.Module] = [nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
        for _ in range(convs):
            layers += [nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(hidden),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(hidden, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class BAM(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4):
        super().__init__()
        if channels <= 0:
            raise ValueError(f"channels must be > 0. Got {channels}")
        self.channel = ChannelGate(channels, reduction)
        self.spatial = SpatialGate(channels, reduction, dilation)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.channel(x) + self.spatial(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.attention(x))


def bottleneck_modules(backbone: nn.Module) -> list[tuple[str, int]]:
    """(module name, channels) of the last module at strides 4, 8 and 16: each one's
    output is about to be downsampled. Read from timm's ``feature_info``."""
    info = getattr(backbone, "feature_info", None)
    if info is None:
        raise ValueError(f"{type(backbone).__name__} has no timm feature_info; cannot place BAM modules")
    chosen = {}
    for entry in info:
        if entry["reduction"] in (4, 8, 16):
            chosen[entry["reduction"]] = (entry["module"], entry["num_chs"])  # last entry per stride wins
    return [chosen[r] for r in sorted(chosen)]


def insert_bam(backbone: nn.Module, *, reduction: int = 16, dilation: int = 4) -> list[str]:
    """Insert a BAM after each bottleneck module, in place. Returns the module names."""
    names = []
    for name, channels in bottleneck_modules(backbone):
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        original = getattr(parent, child)
        setattr(parent, child, nn.Sequential(original, BAM(channels, reduction, dilation)))
        names.append(name)
    return names
