"""Grad-CAM (Selvaraju et al. 2017) for every registered backbone, and the pointing game.

Every timm model splits into ``forward_features`` (the last convolutional feature
map, after any BAM modules) and ``forward_head`` (pooling and, for VGG, its
pre-logits MLP). That split is the Grad-CAM target layer for all registered
backbones at once, so no per-architecture layer names are needed (libraries such
as pytorch-grad-cam ask for them). Gradients are taken with respect to the
feature map itself, so it works whatever the transfer strategy froze.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..imaging.preprocess import PreprocessConfig

__all__ = ["gradcam", "gradcam_for_image", "letterbox_box", "heatmap_peak", "pointing_hit", "overlay_png"]


def gradcam(model: torch.nn.Module, x: torch.Tensor, target_class: int = 1) -> torch.Tensor:
    """N x H x W class-activation maps at the input resolution, each scaled to [0, 1]."""
    model.eval()
    with torch.no_grad():
        features = model.backbone.forward_features(x)
    if features.ndim != 4:
        raise ValueError(f"{type(model.backbone).__name__}.forward_features returned {tuple(features.shape)}; "
                         f"Grad-CAM needs an N x C x h x w feature map")
    features = features.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.head(model.backbone.forward_head(features))
        score = logits[:, target_class].sum()
        (grads,) = torch.autograd.grad(score, features)
    weights = grads.mean(dim=(2, 3), keepdim=True)             # channel importance
    cam = torch.relu((weights * features).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12)
    return (cam / peak[:, None, None]).detach()


def letterbox_box(image_hw: tuple[int, int], config: PreprocessConfig) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the image inside the model input, as ops.resize places it."""
    h, w = image_hw
    out_h, out_w = config.image_size
    if not config.keep_aspect:
        return 0, 0, out_h, out_w
    scale = min(out_h / h, out_w / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    return (out_h - new_h) // 2, (out_w - new_w) // 2, new_h, new_w


def gradcam_for_image(model: torch.nn.Module, x: torch.Tensor, image_hw: tuple[int, int], config: PreprocessConfig,
                      target_class: int = 1) -> np.ndarray:
    """Grad-CAM of one preprocessed image, cropped out of the letterbox and resized
    to the image's own (height, width), so it lines up with the radiograph and its boxes."""
    import cv2

    cam = gradcam(model, x, target_class)[0].cpu().numpy().astype(np.float32)
    top, left, h, w = letterbox_box(image_hw, config)
    crop = cam[top:top + h, left:left + w]
    out = cv2.resize(crop, (int(image_hw[1]), int(image_hw[0])), interpolation=cv2.INTER_LINEAR)
    return np.clip(out / max(float(out.max()), 1e-12), 0.0, 1.0)


def heatmap_peak(heatmap: np.ndarray) -> tuple[float, float]:
    """(x, y) of the heatmap's maximum, normalised to [0, 1] like YOLO boxes."""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    h, w = heatmap.shape
    return (x + 0.5) / w, (y + 0.5) / h


def pointing_hit(peak_xy: tuple[float, float], boxes: Iterable[dict[str, Any]], tolerance: float = 0.0) -> bool:
    """Pointing game: does the peak fall inside any box (YOLO-normalised centre/size),
    optionally grown by ``tolerance`` (a fraction of the image) on every side?"""
    px, py = peak_xy
    for box in boxes:
        half_w, half_h = box["width"] / 2 + tolerance, box["height"] / 2 + tolerance
        if abs(px - box["x_center"]) <= half_w and abs(py - box["y_center"]) <= half_h:
            return True
    return False


def overlay_png(pixels: np.ndarray, heatmap: np.ndarray, *, max_side: int = 512, alpha: float = 0.45,
                boxes: Sequence[dict[str, Any]] = ()) -> bytes:
    """The radiograph in grey with the heatmap (jet colours) blended on top, as PNG bytes."""
    import cv2
    from matplotlib import colormaps

    gray = pixels.astype(np.float32)
    if pixels.dtype == np.uint8:
        gray /= 255.0
    else:
        lo, hi = float(gray.min()), float(gray.max())
        gray = (gray - lo) / max(hi - lo, 1e-6)
    h, w = gray.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    heat = cv2.resize(heatmap.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    colour = colormaps["jet"](heat)[..., :3]
    blended = (1 - alpha) * np.repeat(gray[..., None], 3, axis=2) + alpha * colour
    image = (np.clip(blended, 0, 1) * 255).astype(np.uint8)
    for box in boxes:
        x0 = int((box["x_center"] - box["width"] / 2) * size[0])
        y0 = int((box["y_center"] - box["height"] / 2) * size[1])
        x1 = int((box["x_center"] + box["width"] / 2) * size[0])
        y1 = int((box["y_center"] + box["height"] / 2) * size[1])
        cv2.rectangle(image, (x0, y0), (x1, y1), (0, 255, 0), 1)
    ok, encoded = cv2.imencode(".png", image[..., ::-1])  # OpenCV writes BGR
    if not ok:
        raise RuntimeError("PNG encoding of the heatmap failed")
    return encoded.tobytes()
