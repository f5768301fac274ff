"""The papers' preprocessing as one typed, serialisable config and one function.

bytes -> decode (one luminance channel) -> resize to the model's input size
      -> [augment: flip, affine] -> [enhance: edges / Laplacian sharpening]
      -> normalise (ImageNet or per-image standardisation) -> C x H x W float32

A trained model's bundle stores its :class:`PreprocessConfig` (``to_dict``), so
serving and scoring rebuild exactly the training-time preprocessing.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Literal

import numpy as np

from . import ops
from .decode import DEFAULT_MAX_PIXELS, DecodedImage, decode_image

__all__ = ["PreprocessConfig", "AugmentConfig", "preprocess_base", "geometry", "finalize", "preprocess_pixels", "preprocess_bytes",
           "decode_for", "augment_params", "to_tensor", "ModelInput", "prepare_input",
           "shared_decode_config", "letterbox_box", "augment_geometry"]

Normalization = Literal["imagenet", "per_image", "none"]
Enhancement = Literal["none", "sobel", "prewitt", "roberts", "canny", "laplacian_sharpen"]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation (MURA humerus paper: flip + affine).

    Parameters are drawn per image from a seeded generator, so an epoch is reproducible.
    """

    hflip_prob: float = 0.5
    max_rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_translate_frac: float = 0.05
    # What archives hold (the "robust" preset, :meth:`robust`): quarter turns and upside-down
    # films, inverted grey scale (MONOCHROME1 shown raw), gamma and contrast, JPEG re-compression,
    # downscaled copies, and a smaller image on a canvas with burnt-in text. Off by default.
    rot90_prob: float = 0.0          # a quarter, half or three-quarter turn (equally likely)
    vflip_prob: float = 0.0
    invert_prob: float = 0.0
    gamma_range: tuple[float, float] = (1.0, 1.0)
    contrast_range: tuple[float, float] = (1.0, 1.0)
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (25, 90)
    downscale_prob: float = 0.0
    downscale_range: tuple[float, float] = (0.3, 0.8)
    canvas_prob: float = 0.0         # shrink into a larger canvas (scale 0.55-0.85) with text burnt in

    def __post_init__(self):
        for name in ("hflip_prob", "rot90_prob", "vflip_prob", "invert_prob", "jpeg_prob", "downscale_prob",
                     "canvas_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]. Got {getattr(self, name)}")
        for name in ("scale_range", "gamma_range", "contrast_range", "downscale_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= high. Got {getattr(self, name)}")
        lo, hi = self.jpeg_quality
        if not 1 <= lo <= hi <= 100:
            raise ValueError(f"jpeg_quality must satisfy 1 <= low <= high <= 100. Got {self.jpeg_quality}")

    @classmethod
    def robust(cls) -> "AugmentConfig":
        """Flip + affine and everything archives hold (train_all --robust-augment)."""
        return cls(rot90_prob=0.5, vflip_prob=0.2, invert_prob=0.25, gamma_range=(0.6, 1.6),
                   contrast_range=(0.6, 1.3), jpeg_prob=0.3, downscale_prob=0.25, canvas_prob=0.2)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Everything needed to turn a radiograph file into a model input.

    image_size: (height, width) of the model input (from the model's timm config).
    keep_aspect: letterbox (pad) rather than stretch.
    normalization: "imagenet" (mean/std below), "per_image" ((x - mean) / std of
        each image, MURA humerus paper) or "none" ([0, 1]).
    enhancement: an edge map or Laplacian sharpening applied after resizing
        (MURA 7-bone paper); ``sharpen_factor`` 1.5 or 3.0 in the paper.
    channels: channels of the output (the luminance channel is repeated).
    """

    image_size: tuple[int, int] = (224, 224)
    keep_aspect: bool = True
    normalization: Normalization = "imagenet"
    mean: tuple[float, ...] = ops.IMAGENET_MEAN
    std: tuple[float, ...] = ops.IMAGENET_STD
    channels: int = 3
    enhancement: Enhancement = "none"
    sharpen_factor: float = 1.5
    canny_thresholds: tuple[float, float] = (0.1, 0.3)
    max_pixels: int = DEFAULT_MAX_PIXELS
    fast_jpeg_downscale: bool = True

    def __post_init__(self):
        if len(self.image_size) != 2 or min(self.image_size) <= 0:
            raise ValueError(f"image_size must be (height, width) > 0. Got {self.image_size}")
        if self.normalization not in ("imagenet", "per_image", "none"):
            raise ValueError(f"normalization must be imagenet, per_image or none. Got {self.normalization!r}")
        if self.enhancement not in ("none", "laplacian_sharpen", *ops.EDGE_FILTERS):
            raise ValueError(f"Unknown enhancement {self.enhancement!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3. Got {self.channels}")
        if self.channels == 1 and len(self.mean) == 3 and len(self.std) == 3:
            # One-channel models: average the per-channel statistics, as timm does for in_chans=1.
            object.__setattr__(self, "mean", (sum(self.mean) / 3,))
            object.__setattr__(self, "std", (sum(self.std) / 3,))
        if self.normalization == "imagenet" and (len(self.mean) not in (1, self.channels) or len(self.std) != len(self.mean)):
            raise ValueError(f"mean/std must have 1 or {self.channels} values. Got {self.mean}, {self.std}")
        # Tuples survive JSON round trips as lists; keep the dataclass hashable.
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "canny_thresholds", tuple(float(v) for v in self.canny_thresholds))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown preprocessing keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest decoded (width, height) that still fills the output."""
        out_h, out_w = self.image_size
        if self.keep_aspect:
            scale = min(out_h / height, out_w / width)
            return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))
        return out_w, out_h


def letterbox_box(image_hw: tuple[int, int], config: PreprocessConfig) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the image inside the model input, as ops.resize places it: how a
    map over the model input (Grad-CAM, a fracture map) lines up with the image."""
    h, w = image_hw
    out_h, out_w = config.image_size
    if not config.keep_aspect:
        return 0, 0, out_h, out_w
    scale = min(out_h / h, out_w / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    return (out_h - new_h) // 2, (out_w - new_w) // 2, new_h, new_w


def augment_params(rng: np.random.Generator, config: AugmentConfig) -> dict[str, Any]:
    """Draw one image's augmentation parameters."""
    params = {
        "flip": bool(rng.random() < config.hflip_prob),
        "angle_deg": float(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg)),
        "scale": float(rng.uniform(*config.scale_range)),
        "translate_frac": (float(rng.uniform(-1, 1) * config.max_translate_frac),
                           float(rng.uniform(-1, 1) * config.max_translate_frac)),
    }
    if config == AugmentConfig(hflip_prob=config.hflip_prob, max_rotation_deg=config.max_rotation_deg,
                               scale_range=config.scale_range, max_translate_frac=config.max_translate_frac):
        return params  # the plain flip + affine: the same draws as before the robust options existed
    canvas = bool(rng.random() < config.canvas_prob)
    params.update(
        rot90=int(rng.integers(1, 4)) if rng.random() < config.rot90_prob else 0,
        vflip=bool(rng.random() < config.vflip_prob),
        canvas=canvas,
        invert=bool(rng.random() < config.invert_prob),
        gamma=float(np.exp(rng.uniform(*np.log(config.gamma_range)))),
        contrast=float(rng.uniform(*config.contrast_range)),
        jpeg_quality=int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
        if rng.random() < config.jpeg_prob else None,
        downscale=float(rng.uniform(*config.downscale_range)) if rng.random() < config.downscale_prob else None,
        text_seed=int(rng.integers(0, 2 ** 31)),
    )
    if canvas:  # the image shrinks into the canvas; the text goes around it
        params["scale"] *= float(rng.uniform(0.55, 0.85))
    return params


def preprocess_base(decoded: DecodedImage, config: PreprocessConfig,
                    augment: dict[str, Any] | None = None) -> np.ndarray:
    """Decoded image -> the single-channel H x W float32 image before channel
    expansion and ImageNet normalisation (which :func:`finalize` applies).

    Splitting here lets the data pipeline ship one channel (a third of the bytes)
    and leave the per-channel affine step to the consumer, e.g. on the GPU.
    """
    image = decoded.pixels
    if image.dtype == np.uint8:
        image = ops.resize(image, config.image_size, keep_aspect=config.keep_aspect)
        image = image.astype(np.float32) * np.float32(1.0 / 255.0)
        image = augment_geometry(image, augment)
    else:
        image = geometry(image.astype(np.float32, copy=False), config, augment)
    if augment is not None and "invert" in augment:
        image = _augment_appearance(image, augment)

    if config.enhancement == "laplacian_sharpen":
        image = ops.laplacian_sharpen(image, config.sharpen_factor)
    elif config.enhancement == "canny":
        image = ops.edge_map(image, "canny", low=config.canny_thresholds[0], high=config.canny_thresholds[1])
    elif config.enhancement != "none":
        image = ops.edge_map(image, config.enhancement)

    if config.normalization == "per_image":
        image = ops.per_image_standardize(image)
    return image


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """What a model needs of one image, and no more: the preprocessed single-channel input at
    the model's size (:func:`preprocess_base`) and the original's geometry, for findings and
    heatmaps in the image's own pixels. A 9999 x 9999 upload travels to a model replica as
    this (a few hundred KB), not as its full-size pixels."""

    base: np.ndarray                 # H x W float32 at config.image_size
    height: int                      # of the stored image (the frame of findings' boxes)
    width: int
    pixels_hw: tuple[int, int]       # of the decoded grid the base was made from (may be reduced)
    config: PreprocessConfig         # what made it; a model refuses an input made for another config

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels_hw


def prepare_input(decoded: DecodedImage, config: PreprocessConfig) -> ModelInput:
    """A decoded image -> the :class:`ModelInput` of a model with ``config`` (no augmentation)."""
    return ModelInput(base=preprocess_base(decoded, config), height=decoded.height, width=decoded.width,
                      pixels_hw=tuple(int(v) for v in decoded.pixels.shape[:2]), config=config)


def geometry(plane: np.ndarray, config: PreprocessConfig, augment: dict[str, Any] | None = None) -> np.ndarray:
    """The spatial part of preprocessing (resize/letterbox, then flip + affine), for any
    plane in the decoded image's pixel grid: the image itself, or its fracture mask, so
    the mask stays aligned with what the model sees."""
    return augment_geometry(ops.resize(plane, config.image_size, keep_aspect=config.keep_aspect), augment)


def augment_geometry(image: np.ndarray, augment: dict[str, Any] | None) -> np.ndarray:
    """Flip, quarter turns and the affine: applied alike to the image and to any plane
    aligned with it (fracture masks, box planes), so labels follow the pixels."""
    if augment is None:
        return image
    if augment["flip"]:
        image = ops.hflip(image)
    if augment.get("vflip"):
        image = np.ascontiguousarray(image[::-1])
    if augment.get("rot90"):
        rotated = np.rot90(image, k=augment["rot90"])
        # A non-square input keeps its shape: the turned image is letterboxed back into it.
        image = np.ascontiguousarray(rotated) if rotated.shape == image.shape else \
            ops.resize(np.ascontiguousarray(rotated), image.shape, keep_aspect=True)
    h, w = image.shape
    dx, dy = augment["translate_frac"]
    return ops.affine(image, angle_deg=augment["angle_deg"], scale=augment["scale"], translate=(dx * w, dy * h))


_CANVAS_WORDS = ("L", "R", "AP", "LAT", "PORTABLE", "SUPINE", "WEIGHT BEARING", "ER 2024", "DX", "CR", "ID 0457",
                 "OBL", "STANDING", "HOSP")


def _augment_appearance(image: np.ndarray, augment: dict[str, Any]) -> np.ndarray:
    """Grey-level changes of the image only (after geometry): burnt-in text, contrast and
    gamma, downscaled copies, JPEG re-compression, inverted grey scale. [0, 1] in and out."""
    import cv2

    image = np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)
    h, w = image.shape
    if augment.get("canvas"):
        rng = np.random.default_rng(augment["text_seed"])
        for _ in range(int(rng.integers(2, 6))):
            text = str(rng.choice(_CANVAS_WORDS))
            size = float(rng.uniform(0.4, 1.2)) * h / 384
            org = (int(rng.uniform(0, 0.8) * w), int(rng.uniform(0.08, 1.0) * h))
            cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, size, float(rng.uniform(0.7, 1.0)),
                        max(1, round(2 * size)), cv2.LINE_AA)
    if augment.get("contrast", 1.0) != 1.0:
        mean = float(image.mean())
        image = np.clip((image - mean) * augment["contrast"] + mean, 0.0, 1.0)
    if augment.get("gamma", 1.0) != 1.0:
        image = np.power(image, np.float32(augment["gamma"]))
    if augment.get("downscale"):
        f = augment["downscale"]
        small = cv2.resize(image, (max(8, round(w * f)), max(8, round(h * f))), interpolation=cv2.INTER_AREA)
        image = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if augment.get("jpeg_quality"):
        ok, data = cv2.imencode(".jpg", np.round(image * 255).astype(np.uint8),
                                [cv2.IMWRITE_JPEG_QUALITY, int(augment["jpeg_quality"])])
        if ok:
            image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE).astype(np.float32) * np.float32(1.0 / 255.0)
    if augment.get("invert"):
        image = 1.0 - image
    return np.ascontiguousarray(image, dtype=np.float32)


def finalize(base, config: PreprocessConfig):
    """Single-channel base image(s) -> model input with ``config.channels`` channels.

    Accepts H x W, 1 x H x W or N x 1 x H x W, as a NumPy array or a torch tensor
    (so the step can run on the GPU); returns float32 C x H x W or N x C x H x W.
    """
    if isinstance(base, np.ndarray):
        return _finalize_numpy(base, config)
    import torch

    if base.ndim == 2:
        base = base[None]
    if base.shape[-3] != 1:
        raise ValueError(f"Expected one channel before finalize. Got shape {tuple(base.shape)}")
    base = base.float()
    if config.normalization != "imagenet":
        return base.expand(*base.shape[:-3], config.channels, *base.shape[-2:]).contiguous()
    scale, shift = _affine_coefficients(config)
    scale_t = torch.tensor(scale, dtype=torch.float32, device=base.device).view(-1, 1, 1)
    shift_t = torch.tensor(shift, dtype=torch.float32, device=base.device).view(-1, 1, 1)
    # (x - mean) / std as one fused pass that also broadcasts 1 -> C channels.
    return torch.addcmul(shift_t, base, scale_t)


def to_tensor(array: np.ndarray):
    """A torch view of a (possibly read-only) NumPy batch, e.g. one Ray handed out from
    its object store. We only read from it, so the view is safe."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def _affine_coefficients(config: PreprocessConfig) -> tuple[list[float], list[float]]:
    """(x - mean) / std == x * scale + shift, per output channel."""
    mean = list(config.mean) * (config.channels if len(config.mean) == 1 else 1)
    std = list(config.std) * (config.channels if len(config.std) == 1 else 1)
    return [1.0 / s for s in std], [-m / s for m, s in zip(mean, std)]


def _finalize_numpy(base: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    if base.ndim == 2:
        base = base[None]
    if base.shape[-3] != 1:
        raise ValueError(f"Expected one channel before finalize. Got shape {tuple(base.shape)}")
    if base.dtype == np.float16:
        # torch's float16 -> float32 copy is SIMD; NumPy's is ~20x slower.
        base = to_tensor(base).float().numpy()
    plane = base[..., 0, :, :]
    out = np.empty((*base.shape[:-3], config.channels, *base.shape[-2:]), np.float32)
    if config.normalization != "imagenet":
        out[...] = base
        return out
    # Per channel, in place: no (N, C, H, W) temporaries.
    for c, (scale, shift) in enumerate(zip(*_affine_coefficients(config))):
        channel = out[..., c, :, :]
        np.multiply(plane, np.float32(scale), out=channel)
        channel += np.float32(shift)
    return out


def preprocess_pixels(decoded: DecodedImage, config: PreprocessConfig,
                      augment: dict[str, Any] | None = None) -> np.ndarray:
    """Decoded image -> C x H x W float32 model input."""
    return finalize(preprocess_base(decoded, config, augment), config)


def decode_for(data: bytes, config: PreprocessConfig, *, name: str = "") -> DecodedImage:
    """Decode with the limits and JPEG draft size that ``config`` implies. ``name`` is the
    file name or URI: one ending in .dcm/.dicom may be DICOM without the file preamble."""
    return decode_image(
        data,
        max_pixels=config.max_pixels,
        draft_size=_DraftSizer(config) if config.fast_jpeg_downscale else None,
        name=name,
    )


def shared_decode_config(configs: list[PreprocessConfig]) -> PreprocessConfig:
    """One decode for several models (the router and the bone models): the config of the largest
    input, so that a JPEG's DCT-domain draft never leaves a model less than its own input size
    (a router at 224 px must not make a 384 px classifier see an upsampled image)."""
    if not configs:
        raise ValueError("shared_decode_config needs at least one preprocessing config")
    return max(configs, key=lambda c: (c.image_size[0] * c.image_size[1], c.max_pixels))


def preprocess_bytes(data: bytes, config: PreprocessConfig, *, augment: dict[str, Any] | None = None,
                     name: str = "") -> tuple[np.ndarray, DecodedImage]:
    """File bytes -> (model input, decoded image). Raises ImageRejected for bad input."""
    decoded = decode_for(data, config, name=name)
    return preprocess_pixels(decoded, config, augment), decoded


class _DraftSizer:
    """Lazily computed draft size: it depends on the image's own size, known only after
    the header is parsed. ``decode_image`` calls it with (width, height)."""

    def __init__(self, config: PreprocessConfig):
        self.config = config

    def __call__(self, width: int, height: int) -> tuple[int, int]:
        return self.config.draft_size(width, height)
