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
from .regions import (Finding, area_ratio, average_precision, findings_from_heatmap, froc, lesion_sensitivity_at,
                      yolo_to_pixels)

__all__ = ["FindingsConfig", "map_to_image", "image_findings", "detection_findings", "localization_metrics",
           "calibrate_box_score", "truths_per_image", "HEATMAP_MAX_SIDE"]

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


def calibrate_box_score(score: float, calibration: dict[str, float] | None) -> float:
    """A detector's raw box score -> P(this box is a fracture at IoU >= 0.3), by the Platt fit
    stored in the bundle (``inference.box_calibration``: a, b on the score's logit); as is
    without one."""
    if not calibration:
        return float(score)
    s = min(max(float(score), 1e-6), 1 - 1e-6)
    z = calibration["a"] * float(np.log(s / (1 - s))) + calibration["b"]
    return float(1.0 / (1.0 + np.exp(-z)))


def detection_findings(boxes: np.ndarray, scores: np.ndarray, image_hw: tuple[int, int], config: PreprocessConfig,
                       findings: FindingsConfig = FindingsConfig(), *, min_score: float | None = None,
                       box_calibration: dict[str, float] | None = None) -> list[Finding]:
    """A detector's boxes in model-input pixels (K x 4, best first) -> findings in the image's
    own pixels (the letterbox undone), scores calibrated, at most ``max_findings`` at or above
    ``min_score``. A finding's peak is its box's centre."""
    top, left, h, w = letterbox_box(image_hw, config)
    img_h, img_w = int(image_hw[0]), int(image_hw[1])
    sx, sy = img_w / w, img_h / h
    floor = findings.min_score if min_score is None else min_score
    out: list[Finding] = []
    for box, raw in zip(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores, np.float64).reshape(-1)):
        score = calibrate_box_score(raw, box_calibration)
        if score < floor:
            continue
        x0 = int(np.clip(np.floor((box[0] - left) * sx), 0, img_w))
        y0 = int(np.clip(np.floor((box[1] - top) * sy), 0, img_h))
        x1 = int(np.clip(np.ceil((box[2] - left) * sx), 0, img_w))
        y1 = int(np.clip(np.ceil((box[3] - top) * sy), 0, img_h))
        if x1 <= x0 or y1 <= y0:
            continue
        out.append(Finding((x0, y0, x1, y1), score, ((x0 + x1) // 2, (y0 + y1) // 2)))
        if len(out) >= findings.max_findings:
            break
    return out


def truths_per_image(preds: dict[str, list], manifest):
    """(index into ``preds``, true boxes in the image's own pixels) for every image that counts in
    lesion-level scoring: fractured images with boxes, and non-fractured ones (no boxes: they add
    only false positives). A fractured image whose fracture's place is unknown is left out."""
    boxes_of = (dict(zip(manifest["image_uri"].to_pylist(), manifest["boxes"].to_pylist()))
                if "boxes" in manifest.column_names else {})
    for k, (uri, label, (h, w)) in enumerate(zip(preds["image_uri"], preds["image_label"], preds["source_size"])):
        boxes = boxes_of.get(uri) or []
        if label == 1 and not boxes:
            continue
        yield k, ([yolo_to_pixels(b, w, h) for b in boxes] if label == 1 else [])


def localization_metrics(preds: dict[str, list], manifest, config: PreprocessConfig, *,
                         findings: FindingsConfig = FindingsConfig(),
                         box_calibration: dict[str, float] | None = None) -> dict[str, Any]:
    """What the detection literature reports, on the images of ``preds`` (from
    ``predict_manifest``: ``maps``, a detector's ``detections``, ``source_size`` and
    ``image_uri`` per image) against the manifest's fracture boxes.

    AP30 / AP50: COCO-style AP at IoU 0.3 / 0.5 (greedy by score, one match per fracture),
    FROC with an IoU >= 0.3 hit, the median area ratio of the top finding to its fracture
    (every image counts; non-fractured ones add only false positives; candidate findings
    down to score 0.01). Secondary: the pointing game (is the heatmap's peak inside a box,
    against the image-centre baseline)."""
    if not preds.get("maps"):
        return {}
    detections = preds.get("detections")
    hits = centre = pointed = 0
    per_image: list[tuple[Sequence[Finding], list]] = []
    for k, truths in truths_per_image(preds, manifest):
        label, heat_map, (h, w) = preds["image_label"][k], preds["maps"][k], preds["source_size"][k]
        if detections is not None:
            found = detection_findings(*detections[k], (h, w), config, findings, min_score=0.01,
                                       box_calibration=box_calibration)
            heat, _ = map_to_image(heat_map, (h, w), config)
        else:
            found, heat = image_findings(heat_map, (h, w), config, findings, min_score=0.01)
        per_image.append((found, truths))
        if label == 1 and truths:
            pointed += 1
            py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
            sx, sy = w / heat.shape[1], h / heat.shape[0]
            x, y = (px + 0.5) * sx, (py + 0.5) * sy
            hits += any(t[0] <= x < t[2] and t[1] <= y < t[3] for t in truths)
            centre += any(t[0] <= w / 2 < t[2] and t[1] <= h / 2 < t[3] for t in truths)
    curve = froc(per_image, min_iou=0.3)
    return {"ap30": average_precision(per_image, min_iou=0.3), "ap50": average_precision(per_image, min_iou=0.5),
            "median_area_ratio": area_ratio(per_image), "froc_min_iou": 0.3,
            "pointing_game": hits / pointed if pointed else None,
            "pointing_centre_baseline": centre / pointed if pointed else None, "pointing_images": pointed,
            "lesion_sensitivity_at_0.5_fp": lesion_sensitivity_at(curve, 0.5),
            "lesion_sensitivity_at_1_fp": lesion_sensitivity_at(curve, 1.0),
            "lesions": curve["lesions"], "images": curve["images"],
            "froc": {k: [round(float(v), 4) for v in curve[k]] for k in ("fp_per_image", "sensitivity")}}
