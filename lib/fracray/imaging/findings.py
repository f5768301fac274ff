"""From a model's fracture map to what a reader sees: a heatmap over the radiograph and
findings (boxes with scores) in its own pixels; and the validation figures for them
(pointing game, FROC, lesion sensitivity at 0.5 and 1 false-positive boxes per image).

The map covers the model input, letterbox included; every mapping back to the image goes
through :func:`map_to_image`, the same crop-and-resize Grad-CAM uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from .preprocess import PreprocessConfig, letterbox_box
from .regions import Finding, findings_from_heatmap, froc, lesion_sensitivity_at, yolo_to_pixels

__all__ = ["FindingsConfig", "map_to_image", "image_findings", "localization_metrics", "HEATMAP_MAX_SIDE"]

# Heatmaps are computed at most this large on a side (findings are scaled back to full
# resolution): a 2304 x 2880 map would cost 26 MB per image and find the same boxes.
HEATMAP_MAX_SIDE = 1024


@dataclasses.dataclass(frozen=True)
class FindingsConfig:
    """How a fracture map becomes findings; stored in the bundle (``inference.findings``).

    min_score: findings whose peak probability is below this are not reported.
    region_level: a finding's box covers the pixels connected to its peak that reach this
        fraction of the peak.
    max_findings: at most this many per image, best first.
    """

    min_score: float = 0.2
    region_level: float = 0.5
    max_findings: int = 5

    def __post_init__(self):
        if not 0.0 <= self.min_score <= 1.0 or not 0.0 < self.region_level <= 1.0 or self.max_findings < 1:
            raise ValueError(f"FindingsConfig needs min_score in [0, 1], region_level in (0, 1], max_findings >= 1. "
                             f"Got {self}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "FindingsConfig":
        return cls(**(data or {}))


def map_to_image(map_probs: np.ndarray, image_hw: tuple[int, int], config: PreprocessConfig, *,
                 max_side: int | None = HEATMAP_MAX_SIDE) -> tuple[np.ndarray, tuple[float, float]]:
    """A map over the model input (any grid: stride-16 cells or input pixels) -> a heatmap over
    the image, cropped out of the letterbox. Returns (heatmap, (sx, sy)): heatmap pixels times
    (sx, sy) are the image's own pixels (1, 1 unless ``max_side`` shrank it)."""
    import cv2

    m = np.asarray(map_probs, np.float32)
    in_h, in_w = config.image_size
    if m.shape != (in_h, in_w):
        m = cv2.resize(m, (in_w, in_h), interpolation=cv2.INTER_LINEAR)
    top, left, h, w = letterbox_box(image_hw, config)
    crop = m[top:top + h, left:left + w]
    img_h, img_w = int(image_hw[0]), int(image_hw[1])
    shrink = min(1.0, max_side / max(img_h, img_w)) if max_side else 1.0
    out_w, out_h = max(1, round(img_w * shrink)), max(1, round(img_h * shrink))
    heat = cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    return heat, (img_w / out_w, img_h / out_h)


def image_findings(map_probs: np.ndarray, image_hw: tuple[int, int], config: PreprocessConfig,
                   findings: FindingsConfig = FindingsConfig(), *, min_score: float | None = None
                   ) -> tuple[list[Finding], np.ndarray]:
    """(findings in the image's pixels, heatmap) for one image's fracture map."""
    heat, scale = map_to_image(map_probs, image_hw, config)
    found = findings_from_heatmap(heat, threshold=findings.region_level, max_findings=findings.max_findings,
                                  min_score=findings.min_score if min_score is None else min_score, scale=scale)
    return found, heat


def localization_metrics(preds: dict[str, list], manifest, config: PreprocessConfig, *,
                         findings: FindingsConfig = FindingsConfig()) -> dict[str, Any]:
    """Pointing game and FROC on the images of ``preds`` (from ``predict_manifest``: ``maps``,
    ``source_size`` and ``image_uri`` per image) against the manifest's fracture boxes.

    Pointing game: over fractured images with boxes, does the heatmap's peak fall inside a
    box (against the image-centre baseline). FROC: every image counts (non-fractured ones
    add only false positives); candidate findings down to score 0.01 trace the curve."""
    if not preds.get("maps"):
        return {}
    boxes_of = dict(zip(manifest["image_uri"].to_pylist(), manifest["boxes"].to_pylist()))
    hits = centre = pointed = 0
    per_image: list[tuple[Sequence[Finding], list]] = []
    for uri, label, heat_map, (h, w) in zip(preds["image_uri"], preds["image_label"], preds["maps"],
                                            preds["source_size"]):
        boxes = boxes_of.get(uri) or []
        if label == 1 and not boxes:
            continue  # a fracture whose place is unknown: neither a lesion to find nor a source of false positives
        truths = [yolo_to_pixels(b, w, h) for b in boxes] if label == 1 else []
        found, heat = image_findings(heat_map, (h, w), config, findings, min_score=0.01)
        per_image.append((found, truths))
        if label == 1 and truths:
            pointed += 1
            py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
            sx, sy = w / heat.shape[1], h / heat.shape[0]
            x, y = (px + 0.5) * sx, (py + 0.5) * sy
            hits += any(t[0] <= x < t[2] and t[1] <= y < t[3] for t in truths)
            centre += any(t[0] <= w / 2 < t[2] and t[1] <= h / 2 < t[3] for t in truths)
    curve = froc(per_image)
    return {"pointing_game": hits / pointed if pointed else None,
            "pointing_centre_baseline": centre / pointed if pointed else None, "pointing_images": pointed,
            "lesion_sensitivity_at_0.5_fp": lesion_sensitivity_at(curve, 0.5),
            "lesion_sensitivity_at_1_fp": lesion_sensitivity_at(curve, 1.0),
            "lesions": curve["lesions"], "images": curve["images"],
            "froc": {k: [round(float(v), 4) for v in curve[k]] for k in ("fp_per_image", "sensitivity")}}
