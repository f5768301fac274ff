"""Pure image operations used by the papers' preprocessing, on 2-D float32 arrays.

Conventions: images are HxW float32, intensities in [0, 1]; borders replicate the
edge pixel (so a flat image has zero gradient everywhere, borders included).
Kernels are applied as correlation (``cv2.filter2D``), which is what the
textbook kernel tables below mean: a positive x-gradient for intensity that
increases to the right.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = [
    "SOBEL_X", "SOBEL_Y", "PREWITT_X", "PREWITT_Y", "ROBERTS_A", "ROBERTS_B", "LAPLACIAN_4",
    "IMAGENET_MEAN", "IMAGENET_STD",
    "sobel", "prewitt", "roberts", "canny", "laplacian", "laplacian_sharpen",
    "edge_map", "EDGE_FILTERS",
    "resize", "per_image_standardize", "normalize", "hflip", "affine",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
SOBEL_Y = SOBEL_X.T.copy()
PREWITT_X = np.array([[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]], np.float32)
PREWITT_Y = PREWITT_X.T.copy()
# Roberts cross: d1 = I(y, x) - I(y+1, x+1), d2 = I(y, x+1) - I(y+1, x).
ROBERTS_A = np.array([[1, 0], [0, -1]], np.float32)
ROBERTS_B = np.array([[0, 1], [-1, 0]], np.float32)
LAPLACIAN_4 = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)

_BORDER = cv2.BORDER_REPLICATE


def _correlate(image: np.ndarray, kernel: np.ndarray, anchor: tuple[int, int] = (-1, -1)) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"Expected a 2-D grayscale image. Got shape {image.shape}")
    return cv2.filter2D(image, cv2.CV_32F, kernel, anchor=anchor, borderType=_BORDER)


def _magnitude(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    return cv2.magnitude(gx, gy)


def sobel(image: np.ndarray) -> np.ndarray:
    """Gradient magnitude sqrt(Gx^2 + Gy^2) with the 3x3 Sobel kernels."""
    return _magnitude(_correlate(image, SOBEL_X), _correlate(image, SOBEL_Y))


def prewitt(image: np.ndarray) -> np.ndarray:
    """Gradient magnitude with the 3x3 Prewitt kernels."""
    return _magnitude(_correlate(image, PREWITT_X), _correlate(image, PREWITT_Y))


def roberts(image: np.ndarray) -> np.ndarray:
    """Roberts cross magnitude, anchored at the top-left pixel of each 2x2 window."""
    return _magnitude(_correlate(image, ROBERTS_A, (0, 0)), _correlate(image, ROBERTS_B, (0, 0)))


def canny(image: np.ndarray, low: float = 0.1, high: float = 0.3, *, aperture: int = 3,
          l2_gradient: bool = True) -> np.ndarray:
    """Canny edges (OpenCV) as a {0, 1} float32 map. Thresholds are on the [0, 1] scale."""
    if not 0 <= low <= high:
        raise ValueError(f"Canny thresholds must satisfy 0 <= low <= high. Got low={low}, high={high}")
    as_u8 = np.clip(np.asarray(image, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    edges = cv2.Canny(as_u8, low * 255.0, high * 255.0, apertureSize=aperture, L2gradient=l2_gradient)
    return (edges > 0).astype(np.float32)


def laplacian(image: np.ndarray) -> np.ndarray:
    """4-neighbour Laplacian: I(y-1,x) + I(y+1,x) + I(y,x-1) + I(y,x+1) - 4 I(y,x)."""
    return _correlate(image, LAPLACIAN_4)


def laplacian_sharpen(image: np.ndarray, factor: float = 1.5) -> np.ndarray:
    """g = f - factor * laplacian(f), clipped to [0, 1] as a displayed image would be.

    The papers use factors 1.5 and 3.0.
    """
    if factor < 0:
        raise ValueError(f"Sharpening factor must be >= 0. Got {factor}")
    image = np.asarray(image, np.float32)
    return np.clip(image - np.float32(factor) * laplacian(image), 0.0, 1.0)


# The largest possible magnitude of each operator on [0, 1] images, so edge maps
# can be put on a [0, 1] scale without clipping or per-image statistics.
_EDGE_MAX = {"sobel": 4.0 * math.sqrt(2.0), "prewitt": 3.0 * math.sqrt(2.0), "roberts": math.sqrt(2.0)}

EDGE_FILTERS = ("sobel", "prewitt", "roberts", "canny")


def edge_map(image: np.ndarray, kind: str, **kwargs) -> np.ndarray:
    """Edge map of ``kind`` scaled to [0, 1] (Canny is already binary)."""
    if kind == "sobel":
        return sobel(image) * np.float32(1.0 / _EDGE_MAX["sobel"])
    if kind == "prewitt":
        return prewitt(image) * np.float32(1.0 / _EDGE_MAX["prewitt"])
    if kind == "roberts":
        return roberts(image) * np.float32(1.0 / _EDGE_MAX["roberts"])
    if kind == "canny":
        return canny(image, **kwargs)
    raise ValueError(f"Unknown edge filter {kind!r}; expected one of {EDGE_FILTERS}")


def resize(image: np.ndarray, size: tuple[int, int], *, keep_aspect: bool = True,
           pad_value: float = 0.0) -> np.ndarray:
    """Resize a 2-D image to ``size`` = (height, width).

    keep_aspect: scale to fit inside and pad the rest (centred) with ``pad_value``,
        so bones are not distorted; otherwise stretch to fill.
    Shrinking box-averages by the largest whole factor, then finishes bilinearly
    (anti-aliased); enlarging is bilinear.
    """
    out_h, out_w = int(size[0]), int(size[1])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"Target size must be positive. Got {size}")
    h, w = image.shape[:2]
    if keep_aspect:
        scale = min(out_h / h, out_w / w)
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    else:
        new_h, new_w = out_h, out_w
    factor = int(min(h / new_h, w / new_w))
    if factor >= 2:
        # Box-average by a whole factor first: OpenCV's exact-integer INTER_AREA path is
        # ~30x faster than its general one, and it is the anti-aliasing step. At most
        # factor-1 edge pixels are trimmed (centred) to make the division exact.
        hh, ww = (h // factor) * factor, (w // factor) * factor
        top, left = (h - hh) // 2, (w - ww) // 2
        image = cv2.resize(image[top:top + hh, left:left + ww], (ww // factor, hh // factor),
                           interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]
    if (new_h, new_w) != (h, w):
        # What is left is a factor below 2, where bilinear does not alias.
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    if (new_h, new_w) == (out_h, out_w):
        return image
    top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
    return cv2.copyMakeBorder(image, top, out_h - new_h - top, left, out_w - new_w - left,
                              cv2.BORDER_CONSTANT, value=pad_value)


def per_image_standardize(image: np.ndarray) -> np.ndarray:
    """(x - mean) / max(std, 1/sqrt(N)), as TensorFlow's per_image_standardization."""
    image = np.asarray(image, np.float32)
    mean = float(image.mean())
    std = max(float(image.std()), 1.0 / math.sqrt(image.size))
    return (image - np.float32(mean)) * np.float32(1.0 / std)


def normalize(image: np.ndarray, mean: float, std: float) -> np.ndarray:
    if std <= 0:
        raise ValueError(f"std must be > 0. Got {std}")
    return (np.asarray(image, np.float32) - np.float32(mean)) * np.float32(1.0 / std)


def hflip(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1])


def affine(image: np.ndarray, *, angle_deg: float = 0.0, scale: float = 1.0,
           translate: tuple[float, float] = (0.0, 0.0), fill: float = 0.0) -> np.ndarray:
    """Rotate (counter-clockwise, degrees) and scale about the image centre, then shift
    by ``translate`` = (dx, dy) pixels. Uncovered pixels get ``fill``."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0. Got {scale}")
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle_deg, scale)
    matrix[0, 2] += translate[0]
    matrix[1, 2] += translate[1]
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
