"""Fracture regions: annotation masks for training, findings (boxes with scores) from a
fracture map at inference, and lesion-level scoring (pointing game, FROC).

Coordinates: annotations arrive normalised to [0, 1] (YOLO boxes, COCO outlines
divided by the image size); findings leave in the original image's pixels,
``[x0, y0, x1, y1]`` with x1/y1 exclusive, so they can be drawn on the upload as is.
No Ray, no torch: used by the data pipeline, the predictor and the evaluation alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

__all__ = ["Finding", "input_boxes", "rasterize_regions", "findings_from_heatmap", "yolo_to_pixels", "box_iou", "finding_hits",
           "match_findings", "average_precision", "area_ratio", "froc", "lesion_sensitivity_at", "has_regions", "FINDINGS_TYPE", "findings_to_rows",
           "findings_from_rows"]


@dataclasses.dataclass(frozen=True)
class Finding:
    """One suspected fracture: a box in the original image's pixels and its score
    (the fracture map's peak probability inside the box), and where that peak is."""

    box: tuple[int, int, int, int]
    score: float
    peak: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"box": [int(v) for v in self.box], "score": round(float(self.score), 4),
                "peak": [int(v) for v in self.peak]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Finding":
        return cls(tuple(int(v) for v in data["box"]), float(data["score"]),
                   tuple(int(v) for v in data.get("peak", _centre(data["box"]))))


def _centre(box: Sequence[float]) -> tuple[int, int]:
    return int((box[0] + box[2]) // 2), int((box[1] + box[3]) // 2)


def has_regions(boxes: Any, outlines: Any) -> bool:
    return bool(boxes) or bool(outlines)


def rasterize_regions(shape: tuple[int, int], *, boxes: Iterable[dict] | None = None,
                      outlines: Iterable[Sequence[float]] | None = None) -> np.ndarray:
    """An H x W float32 {0, 1} mask of the fracture regions: the outlines (polygons)
    where the source has them, else the boxes. Normalised coordinates in, pixels out."""
    import cv2

    h, w = int(shape[0]), int(shape[1])
    mask = np.zeros((h, w), np.uint8)
    polygons = [np.asarray(p, np.float64).reshape(-1, 2) for p in (outlines or []) if len(p) >= 6]
    if polygons:
        pts = [np.round(p * (w, h)).astype(np.int32) for p in polygons]
        cv2.fillPoly(mask, pts, 1)
    # Boxes too when there are no outlines, and always as a floor: a hairline outline can
    # rasterise to nothing at a small size, while its box still marks where the fracture is.
    if not polygons or not mask.any():
        for b in boxes or []:
            x0, y0, x1, y1 = yolo_to_pixels(b, w, h)
            mask[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = 1
    return mask.astype(np.float32)


def input_boxes(boxes: Iterable[dict] | None, pixels_hw: tuple[int, int], config, augment: dict | None = None
                ) -> np.ndarray:
    """YOLO boxes of an image whose decoded grid is ``pixels_hw`` -> K x 4 boxes (x0, y0, x1, y1)
    in model-input pixels, after the letterbox and any flips, turns and affine of ``augment``
    (each box is drawn as a plane and moved with the image, then boxed again, so every
    geometric step applies exactly as it does to the pixels). Boxes moved out of view drop."""
    from .preprocess import augment_geometry, letterbox_box

    top, left, h, w = letterbox_box(pixels_hw, config)
    out_h, out_w = config.image_size
    found = []
    for b in boxes or []:
        x0 = left + (b["x_center"] - b["width"] / 2) * w
        x1 = left + (b["x_center"] + b["width"] / 2) * w
        y0 = top + (b["y_center"] - b["height"] / 2) * h
        y1 = top + (b["y_center"] + b["height"] / 2) * h
        if augment is None:
            box = (max(0.0, x0), max(0.0, y0), min(float(out_w), x1), min(float(out_h), y1))
        else:
            plane = np.zeros((out_h, out_w), np.float32)
            plane[int(np.floor(max(y0, 0))):int(np.ceil(min(y1, out_h))),
                  int(np.floor(max(x0, 0))):int(np.ceil(min(x1, out_w)))] = 1.0
            moved = augment_geometry(plane, augment) >= 0.5
            if not moved.any():
                continue
            ys, xs = np.flatnonzero(moved.any(axis=1)), np.flatnonzero(moved.any(axis=0))
            box = (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))
        if box[2] > box[0] and box[3] > box[1]:
            found.append(box)
    return np.asarray(found, np.float32).reshape(-1, 4)


def yolo_to_pixels(box: dict, width: int, height: int) -> tuple[int, int, int, int]:
    """A YOLO box (normalised centre/size) -> [x0, y0, x1, y1] in pixels, clipped to the image."""
    x0 = (box["x_center"] - box["width"] / 2) * width
    x1 = (box["x_center"] + box["width"] / 2) * width
    y0 = (box["y_center"] - box["height"] / 2) * height
    y1 = (box["y_center"] + box["height"] / 2) * height
    return (int(np.clip(np.floor(x0), 0, width)), int(np.clip(np.floor(y0), 0, height)),
            int(np.clip(np.ceil(x1), 0, width)), int(np.clip(np.ceil(y1), 0, height)))


def findings_from_heatmap(heatmap: np.ndarray, *, threshold: float = 0.5, max_findings: int = 5,
                          min_score: float = 0.05, scale: tuple[float, float] = (1.0, 1.0)) -> list[Finding]:
    """Fracture map (H x W probabilities) -> findings, best first.

    Repeatedly: take the highest remaining peak (a local maximum of the map, so a finding's
    own flank below the region level never comes back as another finding); the pixels
    connected to it that reach ``threshold`` x its height form one finding (relative to each
    region's own peak, so two fractures of different strength stay two boxes). Stops at
    ``max_findings`` or when the next peak is below ``min_score``. ``scale`` = (sx, sy) maps
    heatmap pixels to original-image pixels.
    """
    import cv2

    heat = np.asarray(heatmap, np.float32)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"heatmap must be a 2-D array. Got shape {heat.shape}")
    findings: list[Finding] = []
    remaining = np.where(heat >= cv2.dilate(heat, np.ones((3, 3), np.uint8)), heat, 0.0).astype(np.float32)
    sx, sy = scale
    h, w = heat.shape
    for _ in range(max_findings):
        peak_idx = int(np.argmax(remaining))
        py, px = divmod(peak_idx, w)
        peak = float(remaining[py, px])
        if peak < min_score:
            break
        # The region: pixels connected to the peak that reach `threshold` of its height.
        level = (heat >= threshold * peak).astype(np.uint8)
        _, labels = cv2.connectedComponents(level, connectivity=8)
        region = labels == labels[py, px]
        ys, xs = np.nonzero(region)
        box = (int(np.floor(xs.min() * sx)), int(np.floor(ys.min() * sy)),
               int(np.ceil((xs.max() + 1) * sx)), int(np.ceil((ys.max() + 1) * sy)))
        findings.append(Finding(box, peak, (int((px + 0.5) * sx), int((py + 0.5) * sy))))
        remaining[region] = 0.0
    return findings


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def finding_hits(finding: Finding, truth_box: Sequence[float], *, min_iou: float = 0.3) -> bool:
    """The detection literature's rule for "this finding found that fracture": the boxes
    overlap with IoU >= ``min_iou`` (0.3 here, 0.5 for AP50). A peak inside a box the size of
    a third of the tibia does not count."""
    return box_iou(finding.box, truth_box) >= min_iou


def match_findings(findings: Sequence[Finding], truths: Sequence[Sequence[float]], *, min_iou: float = 0.3
                   ) -> list[tuple[float, bool]]:
    """COCO-style greedy matching on one image: findings by score, best first, each taking the
    unmatched fracture it overlaps most with IoU >= ``min_iou``; one match per fracture.
    Returns (score, true positive) per finding."""
    free = list(range(len(truths)))
    out = []
    for f in sorted(findings, key=lambda f: -f.score):
        best, best_iou = None, min_iou
        for j in free:
            iou = box_iou(f.box, truths[j])
            if iou >= best_iou:
                best, best_iou = j, iou
        if best is not None:
            free.remove(best)
        out.append((float(f.score), best is not None))
    return out


def _pooled(per_image, min_iou: float) -> tuple[list[tuple[float, bool]], int]:
    events, lesions = [], 0
    for findings, truths in per_image:
        lesions += len(truths)
        events += match_findings(findings, truths, min_iou=min_iou)
    events.sort(key=lambda e: -e[0])
    return events, lesions


def average_precision(per_image: Sequence[tuple[Sequence[Finding], Sequence[Sequence[float]]]], *,
                      min_iou: float = 0.5) -> float | None:
    """AP at IoU ``min_iou`` as COCO computes it (101-point interpolated precision over
    recall), pooled over images; non-fractured images add only false positives."""
    events, lesions = _pooled(per_image, min_iou)
    if not lesions:
        return None
    tp = np.cumsum([e[1] for e in events], dtype=np.float64)
    fp = np.cumsum([not e[1] for e in events], dtype=np.float64)
    if not len(events):
        return 0.0
    recall = tp / lesions
    precision = tp / np.maximum(tp + fp, 1e-12)
    precision = np.maximum.accumulate(precision[::-1])[::-1]   # the interpolated envelope
    points = np.linspace(0.0, 1.0, 101)
    idx = np.searchsorted(recall, points, side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in idx]))


def froc(per_image: Sequence[tuple[Sequence[Finding], Sequence[Sequence[float]]]], *,
         min_iou: float = 0.3) -> dict[str, Any]:
    """Free-response ROC over images: for each score threshold, lesion sensitivity
    (fractures found / fractures) against false-positive findings per image.

    ``per_image``: (findings, true boxes in pixels) for every evaluated image,
    fractured or not (non-fractured images have no true boxes and add only
    false positives). A hit is IoU >= ``min_iou`` under greedy one-to-one matching
    (:func:`match_findings`); every other finding is a false positive.
    """
    events, lesions = _pooled(per_image, min_iou)
    images = len(per_image)
    thresholds, sens, fppi = [], [], []
    found = fps = 0
    for i, (score, tp) in enumerate(events):
        found += tp
        fps += not tp
        if i + 1 == len(events) or events[i + 1][0] != score:
            thresholds.append(score)
            sens.append(found / lesions if lesions else 0.0)
            fppi.append(fps / images if images else 0.0)
    return {"lesions": lesions, "images": images, "thresholds": thresholds, "sensitivity": sens,
            "fp_per_image": fppi, "min_iou": min_iou}


def area_ratio(per_image: Sequence[tuple[Sequence[Finding], Sequence[Sequence[float]]]]) -> float | None:
    """Median, over fractured images, of the top finding's area / the area of the fracture box
    it overlaps most (images whose top finding overlaps none are left out): 1 is a box the
    fracture's size, 12 a box twelve times too large."""
    ratios = []
    for findings, truths in per_image:
        if not findings or not truths:
            continue
        top = max(findings, key=lambda f: f.score)
        j = max(range(len(truths)), key=lambda k: box_iou(top.box, truths[k]))
        t = truths[j]
        if box_iou(top.box, t) > 0:
            area_t = max((t[2] - t[0]) * (t[3] - t[1]), 1)
            ratios.append((top.box[2] - top.box[0]) * (top.box[3] - top.box[1]) / area_t)
    return float(np.median(ratios)) if ratios else None


def lesion_sensitivity_at(curve: dict[str, Any], fp_per_image: float) -> float | None:
    """The highest lesion sensitivity the FROC curve reaches with at most ``fp_per_image``."""
    if not curve["lesions"]:
        return None
    best = 0.0
    for s, f in zip(curve["sensitivity"], curve["fp_per_image"]):
        if f <= fp_per_image:
            best = max(best, s)
    return best


# The findings of one image as a table column (bulk scoring's Parquet, evaluation): one struct
# per finding, its box [x0, y0, x1) x [y0, y1) and its peak in the image's own pixels.
FINDINGS_TYPE = pa.list_(pa.struct([("x0", pa.int32()), ("y0", pa.int32()), ("x1", pa.int32()), ("y1", pa.int32()),
                                    ("score", pa.float32()), ("peak_x", pa.int32()), ("peak_y", pa.int32())]))


def findings_to_rows(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The API's findings ({box, score, peak}) -> FINDINGS_TYPE rows."""
    return [{"x0": f["box"][0], "y0": f["box"][1], "x1": f["box"][2], "y1": f["box"][3], "score": f["score"],
             "peak_x": f["peak"][0], "peak_y": f["peak"][1]} for f in findings]


def findings_from_rows(rows: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """FINDINGS_TYPE rows -> the API's findings ({box, score, peak}); None stays None (a reject)."""
    if rows is None:
        return None
    return [{"box": [r["x0"], r["y0"], r["x1"], r["y1"]], "score": round(float(r["score"]), 4),
             "peak": [r["peak_x"], r["peak_y"]]} for r in rows]
