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

from ..imaging.preprocess import PreprocessConfig, letterbox_box

__all__ = ["gradcam", "gradcam_for_image", "heatmap_peak", "pointing_hit", "overlay_png", "TRUTH_COLOUR",
           "FINDING_COLOUR"]


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


def gradcam_for_image(model: torch.nn.Module, x: torch.Tensor, image_hw: tuple[int, int], config: PreprocessConfig,
                      target_class: int = 1, max_side: int | None = None) -> np.ndarray:
    """Grad-CAM of one preprocessed image, cropped out of the letterbox and resized
    to the image's own (height, width), so it lines up with the radiograph and its boxes
    (or to the same aspect at most ``max_side`` pixels a side)."""
    import cv2

    cam = gradcam(model, x, target_class)[0].cpu().numpy().astype(np.float32)
    top, left, h, w = letterbox_box(image_hw, config)
    crop = cam[top:top + h, left:left + w]
    img_h, img_w = int(image_hw[0]), int(image_hw[1])
    shrink = min(1.0, max_side / max(img_h, img_w)) if max_side else 1.0
    out = cv2.resize(crop, (max(1, round(img_w * shrink)), max(1, round(img_h * shrink))),
                     interpolation=cv2.INTER_LINEAR)
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


# Colours (RGB) of what overlay_png draws: the reference standard and the model's findings.
TRUTH_COLOUR = (0, 255, 0)      # green: fracture boxes of the annotations
FINDING_COLOUR = (255, 0, 255)  # magenta (not in the jet heatmap): the model's findings, with their scores


def overlay_png(pixels: np.ndarray, heatmap: np.ndarray | None = None, *, max_side: int = 512, alpha: float = 0.45,
                boxes: Sequence[dict[str, Any]] = (), truth_boxes: Sequence[Sequence[float]] = (),
                findings: Sequence[dict[str, Any]] = (), image_size: tuple[int, int] | None = None) -> bytes:
    """The radiograph in grey with the heatmap (jet colours, when given) blended on top and
    boxes drawn over it, as PNG bytes; at most ``max_side`` pixels on a side.

    The one drawing function for heatmaps, fracture boxes and findings (the HTTP API's
    ``gradcam``/``overlay`` options and the evaluation report's examples).
    ``boxes``: fracture boxes in YOLO form (normalised centre/size), green.
    ``truth_boxes``: fracture boxes ``[x0, y0, x1, y1]`` in the original image's pixels, green.
    ``findings``: the model's findings (``{"box": [x0, y0, x1, y1], "score": ...}`` in the
    original image's pixels), magenta, each labelled with its score.
    ``image_size``: (width, height) of the original image that the pixel boxes refer to;
    default: the size of ``pixels`` (they differ when a JPEG was decoded at reduced size).
    """
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
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if heatmap is not None:
        heat = cv2.resize(heatmap.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
        rgb = (1 - alpha) * rgb + alpha * colormaps["jet"](heat)[..., :3]
    image = np.ascontiguousarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    thickness = max(1, round(max(size) / 300))
    for box in boxes:
        x0 = int((box["x_center"] - box["width"] / 2) * size[0])
        y0 = int((box["y_center"] - box["height"] / 2) * size[1])
        x1 = int((box["x_center"] + box["width"] / 2) * size[0])
        y1 = int((box["y_center"] + box["height"] / 2) * size[1])
        cv2.rectangle(image, (x0, y0), (x1, y1), TRUTH_COLOUR, thickness)
    orig_w, orig_h = image_size or (w, h)
    sx, sy = size[0] / max(orig_w, 1), size[1] / max(orig_h, 1)

    def corners(b: Sequence[float]) -> tuple[tuple[int, int], tuple[int, int]]:
        x0, y0 = int(np.floor(b[0] * sx)), int(np.floor(b[1] * sy))
        x1, y1 = max(x0 + 1, int(np.ceil(b[2] * sx)) - 1), max(y0 + 1, int(np.ceil(b[3] * sy)) - 1)
        return (x0, y0), (x1, y1)

    for b in truth_boxes:
        cv2.rectangle(image, *corners(b), TRUTH_COLOUR, thickness)
    font, font_scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.35, max(size) / 1100)
    for finding in findings:
        (x0, y0), (x1, y1) = corners(finding["box"])
        cv2.rectangle(image, (x0, y0), (x1, y1), FINDING_COLOUR, thickness)
        text = f"{float(finding['score']):.2f}"
        (tw, th), base = cv2.getTextSize(text, font, font_scale, 1)
        tx = min(max(0, x0), max(0, size[0] - tw))
        ty = y0 - base - 1 if y0 - base - 1 - th >= 0 else min(size[1] - base, y1 + th + 2)  # above, else below
        cv2.rectangle(image, (tx, ty - th - 1), (tx + tw, ty + base - 1), (0, 0, 0), -1)
        cv2.putText(image, text, (tx, ty), font, font_scale, FINDING_COLOUR, 1, cv2.LINE_AA)
    ok, encoded = cv2.imencode(".png", image[..., ::-1])  # OpenCV writes BGR
    if not ok:
        raise RuntimeError("PNG encoding of the overlay failed")
    return encoded.tobytes()
