"""Evaluate the router -> classifier graph on a labelled manifest, with Ray Data.

Per body part: TP, FN, FP, TN, accuracy, precision, sensitivity, specificity, F1,
AUROC; study-level Cohen's kappa (MURA); router accuracy where the true body part
is known; expected calibration error and reliability bins of the probabilities as served; where
images carry fracture boxes (FracAtlas), the pointing game and - for models
with a fracture map - lesion-level FROC of the findings, with example overlays.
:func:`evaluate_graph` does all of it, for train_all's report and ``pipelines/evaluate.py``.
The predictor (torch) is imported only where Ray actors run it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from .. import storage
from ..artifacts.bundle import read_bundle_meta
from ..artifacts.describe import bundle_name
from ..artifacts.index import read_model_index
from ..imaging.regions import (Finding, area_ratio, average_precision, findings_from_rows, froc, lesion_sensitivity_at,
                               yolo_to_pixels)
from ..inference.pool import ActorPlan, map_predictor
from ..metrics.calibration import expected_calibration_error, reliability_bins
from ..metrics.fusion import fracture_ece
from ..metrics.classification import binary_metrics
from ..metrics.study import study_level
from ..storage import StorageOptions

__all__ = ["evaluate_graph", "score_manifest", "summarize_predictions", "pointing_game", "lesion_evaluation",
           "localizing_classifiers", "localization_report", "HEATMAP_FRACTURE_MAP", "HEATMAP_GRADCAM"]

HEATMAP_FRACTURE_MAP = "fracture map"  # which heatmap a pointing game or an overlay used
HEATMAP_GRADCAM = "Grad-CAM"


def evaluate_graph(manifest: pa.Table, index_uri: str, *, storage_options: StorageOptions | None = None,
                   output_uri: str | None = None, operating_point: str | float | None = None,
                   pointing_tolerance: float = 0.0, engine: str | None = None,
                   precision: str | None = None) -> tuple[dict[str, list], dict[str, Any]]:
    """The whole evaluation of the graph on a labelled manifest: (predictions, summary).
    The summary is :func:`summarize_predictions` with ``pointing_game`` and ``localization``
    (with ``output_uri``, example overlays are written under it). ``engine``, ``precision``:
    what runs the models in every stage (FracturePredictor's; the predictions' "engine" names it)."""
    runtime = {"engine": engine, "precision": precision}
    preds = score_manifest(manifest, index_uri, storage_options=storage_options, operating_point=operating_point,
                           **runtime)
    summary = summarize_predictions(preds)
    summary["pointing_game"] = pointing_game(manifest, index_uri, storage_options=storage_options,
                                             tolerance=pointing_tolerance, **runtime)
    summary["localization"] = localization_report(manifest, preds, index_uri, output_uri=output_uri,
                                                  storage_options=storage_options, **runtime)
    return preds, summary


def score_manifest(manifest: pa.Table, index_uri: str, *, storage_options: StorageOptions | None = None,
                   batch_size: int = 32, concurrency: int = 1,
                   operating_point: str | float | None = None, engine: str | None = None,
                   precision: str | None = None) -> dict[str, list]:
    """Run the predictor over every manifest row (an actor pool); one output row per input,
    labelled at ``operating_point`` (a named point of the bundles, a number, or their default)."""
    import ray

    from ..inference.predictor import FracturePredictor

    options = (storage_options or StorageOptions()).resolved()
    rows = max(1, min(256, math.ceil(manifest.num_rows / 8)))
    ds = ray.data.from_arrow([manifest.slice(s, rows) for s in range(0, manifest.num_rows, rows)])
    ds = map_predictor(ds, FracturePredictor, {"index_uri": index_uri, "storage_options": options,
                                               "operating_point": operating_point, "engine": engine,
                                               "precision": precision},
                       batch_size=batch_size, plan=ActorPlan(actors=concurrency))
    out: dict[str, list] = defaultdict(list)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):  # Arrow: nested findings stay lists
        for key, values in batch.to_pydict().items():
            out[key] += values
    return dict(out)


def _clean(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def summarize_predictions(preds: dict[str, list]) -> dict[str, Any]:
    """Metrics overall and per (true, else predicted) body part."""
    n = len(preds.get("image_uri", []))
    ok = [i for i in range(n) if preds["status"][i] == "ok"]
    labelled = [i for i in ok if preds["true_image_label"][i] in (0, 1)]
    rejected = defaultdict(int)
    for i in range(n):
        if preds["status"][i] != "ok":
            rejected[preds["status"][i]] += 1
    groups: dict[str, list[int]] = defaultdict(list)
    for i in labelled:
        true_part = preds.get("true_body_part", [None] * n)[i]
        groups[true_part if true_part not in (None, "", "unknown") else preds["body_part"][i]].append(i)

    def block(idx: list[int]) -> dict[str, Any]:
        y = [int(preds["true_image_label"][i]) for i in idx]
        p = [float(preds["fracture_probability"][i]) for i in idx]
        # Each image was labelled at its own classifier's threshold: count those decisions.
        pred = [int(preds["label"][i]) for i in idx]
        out = binary_metrics(y, p, 0.5)
        tp = sum(1 for a, b in zip(y, pred) if a == 1 and b == 1)
        fn = sum(1 for a, b in zip(y, pred) if a == 1 and b == 0)
        fp = sum(1 for a, b in zip(y, pred) if a == 0 and b == 1)
        tn = sum(1 for a, b in zip(y, pred) if a == 0 and b == 0)
        out.update(tp=tp, fn=fn, fp=fp, tn=tn, threshold="per model",
                   accuracy=(tp + tn) / len(y) if y else None,
                   precision=tp / (tp + fp) if tp + fp else None,
                   sensitivity=tp / (tp + fn) if tp + fn else None,
                   specificity=tn / (tn + fp) if tn + fp else None)
        s, r = out["precision"], out["sensitivity"]
        out["f1"] = 2 * s * r / (s + r) if s and r else None
        # Calibration of the probabilities as served (temperature included), on these images: the
        # bundles' temperatures were fitted elsewhere (a calibration slice of the training studies).
        two_class = np.stack([1.0 - np.asarray(p, dtype=np.float64), np.asarray(p, dtype=np.float64)], axis=1)
        out["ece"] = expected_calibration_error(two_class, y) if y else None
        out["reliability"] = reliability_bins(two_class, y) if y else []
        # The reliability of P(fracture) itself (10 equal-width bins): the top-label figure above folds
        # 0.3 and 0.7 into one bin and can look calibrated when P(fracture) is not.
        fracture = fracture_ece(y, p) if y else {"ece": None, "reliability": []}
        out["fracture_ece"] = fracture["ece"]
        out["fracture_reliability"] = fracture["reliability"]
        studies = [preds["study_id"][i] for i in idx] if "study_id" in preds else None
        if studies and all(studies):
            # Each study decided at the mean threshold of its images' models.
            st = study_level(studies, y, p, [float(preds["threshold"][i]) for i in idx])
            out["study_kappa"] = st["kappa"]
            out["studies"] = st["studies"]
        return out

    summary: dict[str, Any] = {"images": n, "scored": len(ok), "labelled": len(labelled), "rejected": dict(rejected),
                               "overall": block(labelled) if labelled else None,
                               "per_body_part": {part: block(idx) for part, idx in sorted(groups.items())}}
    routed = [i for i in ok if _clean(preds["body_part_probability"][i]) is not None]
    if "true_body_part" in preds and routed:  # only where a router chose the body part
        known = [i for i in routed if preds["true_body_part"][i] not in (None, "", "unknown", "mixed")]
        if known:
            right = sum(preds["true_body_part"][i] == preds["body_part"][i] for i in known)
            summary["router_accuracy"] = right / len(known)
    return summary


class _PointingGameScorer:
    """Ray Data actor: the heatmap of each image with fracture boxes - the model's fracture map
    where it has one, else Grad-CAM of the fracture class (``BundleModel.heatmap``) - through
    the same router -> classifier path as scoring."""

    def __init__(self, index_uri: str, storage_options: StorageOptions | None = None, tolerance: float = 0.0,
                 engine: str | None = None, precision: str | None = None):
        from ..inference.predictor import FracturePredictor

        self.predictor = FracturePredictor(index_uri, storage_options, engine=engine, precision=precision)
        self.options = storage_options
        self.tolerance = tolerance

    def __call__(self, batch):
        from ..imaging.decode import ImageRejected
        from ..imaging.preprocess import decode_for
        from ..inference.gradcam import heatmap_peak, pointing_hit

        out = {k: [] for k in ("image_uri", "body_part", "hit", "center_hit", "peak_x", "peak_y", "heatmap",
                               "status")}
        for uri, boxes in zip(batch["image_uri"].to_pylist(), batch["boxes"].to_pylist()):
            try:
                decoded = decode_for(storage.read_bytes(uri, self.options), self.predictor.decode_config,
                                     name=uri)
            except (ImageRejected, storage.StorageError) as exc:
                status = exc.reason.value if isinstance(exc, ImageRejected) else "read_error"
                for key, value in (("image_uri", uri), ("body_part", ""), ("hit", False), ("center_hit", False),
                                   ("peak_x", np.nan), ("peak_y", np.nan), ("heatmap", ""), ("status", status)):
                    out[key].append(value)
                continue
            part = self.predictor.route([decoded])[0][0]
            model = self.predictor.classifiers[part]
            peak = heatmap_peak(model.heatmap(decoded))
            out["heatmap"].append(HEATMAP_FRACTURE_MAP if model.localizes else HEATMAP_GRADCAM)
            out["image_uri"].append(uri)
            out["body_part"].append(part)
            out["hit"].append(pointing_hit(peak, boxes, self.tolerance))
            out["center_hit"].append(pointing_hit((0.5, 0.5), boxes, self.tolerance))
            out["peak_x"].append(peak[0])
            out["peak_y"].append(peak[1])
            out["status"].append("ok")
        return {k: np.asarray(v, dtype=object if k in ("image_uri", "body_part", "heatmap", "status") else None)
                for k, v in out.items()}


def pointing_game(manifest: pa.Table, index_uri: str, *, storage_options: StorageOptions | None = None,
                  tolerance: float = 0.0, limit: int | None = None, engine: str | None = None,
                  precision: str | None = None) -> dict[str, Any] | None:
    """How often the heatmap's peak falls inside a fracture box (FracAtlas YOLO boxes), per
    body part, against the image-centre baseline. The heatmap is the model's fracture map
    where it has one, else Grad-CAM of the fracture class; ``method`` and ``heatmaps`` say
    which. None when the manifest has no fractured images with boxes."""
    import pyarrow.compute as pc
    import ray

    if "boxes" not in manifest.column_names:
        return None
    has_boxes = pc.greater(pc.fill_null(pc.list_value_length(manifest["boxes"]), 0), 0)
    rows = manifest.filter(pc.and_(has_boxes, pc.equal(manifest["image_label"], 1))).select(["image_uri", "boxes"])
    if rows.num_rows == 0:
        return None
    if limit:
        rows = rows.slice(0, limit)
    options = (storage_options or StorageOptions()).resolved()
    block = max(1, min(64, math.ceil(rows.num_rows / 4)))
    ds = ray.data.from_arrow([rows.slice(s, block) for s in range(0, rows.num_rows, block)])
    ds = map_predictor(ds, _PointingGameScorer, {"index_uri": index_uri, "storage_options": options,
                                                 "tolerance": tolerance, "engine": engine, "precision": precision},
                       batch_size=8)
    results = defaultdict(list)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key, values in batch.items():
            results[key] += list(values)
    ok = [i for i, s in enumerate(results["status"]) if s == "ok"]

    def rate(idx: list[int]) -> dict[str, Any]:
        return {"images": len(idx), "hit_rate": sum(bool(results["hit"][i]) for i in idx) / len(idx) if idx else None,
                "center_baseline": sum(bool(results["center_hit"][i]) for i in idx) / len(idx) if idx else None}

    parts = defaultdict(list)
    for i in ok:
        parts[results["body_part"][i]].append(i)
    heatmaps = Counter(results["heatmap"][i] for i in ok)
    per_part = {p: rate(idx) | {"heatmap": results["heatmap"][idx[0]]} for p, idx in sorted(parts.items())}
    return {"method": f"{_heatmap_name(heatmaps)} peak inside a fracture box (YOLO boxes)", "tolerance": tolerance,
            "heatmaps": dict(heatmaps), "overall": rate(ok), "per_body_part": per_part,
            "not_scored": len(results["status"]) - len(ok)}


def _heatmap_name(kinds) -> str:
    kinds = {k for k in kinds if k}
    if kinds == {HEATMAP_FRACTURE_MAP}:
        return "Fracture-map"
    if kinds <= {HEATMAP_GRADCAM}:
        return "Grad-CAM"
    return "Heatmap (the fracture map where the model has one, else Grad-CAM)"


# ----------------------------------------------------------------------------- lesion level

def localizing_classifiers(index_uri: str, storage_options: StorageOptions | None = None) -> dict[str, dict]:
    """{classifier name (as predictions carry it): its findings settings} for the index's
    fracture models that have a fracture map."""
    from ..imaging.findings import FindingsConfig

    out = {}
    for uri in read_model_index(index_uri, storage_options).classifiers.values():
        meta = read_bundle_meta(uri, storage_options)
        if (meta.model or {}).get("localization"):
            findings = FindingsConfig.from_dict((meta.inference or {}).get("findings"))
            out[bundle_name(uri, meta)] = dataclasses.asdict(findings)
    return out


def _truth_boxes(boxes: list | None, label, width: int, height: int) -> list[tuple[int, int, int, int]]:
    return [yolo_to_pixels(b, width, height) for b in (boxes or [])] if label == 1 else []


def lesion_evaluation(manifest: pa.Table, preds: dict[str, list], localizing: dict[str, dict]) -> dict[str, Any] | None:
    """FROC over the evaluated images from the findings the predictor returned (``preds`` of
    :func:`score_manifest`), against the manifest's fracture boxes converted to each image's
    own pixels: lesion sensitivity against false-positive findings per image, and the
    sensitivity at 0.5 and 1 false positives per image; overall and per body part.

    Counted: labelled images scored by a model with a fracture map. A fractured image without
    boxes cannot be judged and is left out (counted); a normal image adds only false
    positives. The curve starts at the bundles' ``findings.min_score`` (the predictor reports
    nothing fainter). None when no image qualifies or the manifest has no boxes."""
    if "boxes" not in manifest.column_names or "findings" not in preds or not localizing:
        return None
    boxes_of = dict(zip(manifest["image_uri"].to_pylist(), manifest["boxes"].to_pylist()))
    n = len(preds["image_uri"])
    true_parts = preds.get("true_body_part") or [None] * n
    groups: dict[str, list] = defaultdict(list)
    everything, without_boxes = [], 0
    for i in range(n):
        label = preds["true_image_label"][i]
        if preds["status"][i] != "ok" or preds["classifier"][i] not in localizing or label not in (0, 1):
            continue
        boxes = boxes_of.get(preds["image_uri"][i]) or []
        if label == 1 and not boxes:
            without_boxes += 1
            continue
        found = [Finding.from_dict(f) for f in findings_from_rows(preds["findings"][i]) or []]
        item = (found, _truth_boxes(boxes, label, preds["width"][i], preds["height"][i]))
        everything.append(item)
        part = true_parts[i] if true_parts[i] not in (None, "", "unknown") else preds["body_part"][i]
        groups[part].append(item)
    if not everything:
        return None

    def block(items) -> dict[str, Any]:
        curve = froc(items, min_iou=0.3)
        return {"images": curve["images"], "lesions": curve["lesions"],
                "ap30": average_precision(items, min_iou=0.3), "ap50": average_precision(items, min_iou=0.5),
                "median_area_ratio": area_ratio(items),
                "lesion_sensitivity_at_0.5_fp": lesion_sensitivity_at(curve, 0.5),
                "lesion_sensitivity_at_1_fp": lesion_sensitivity_at(curve, 1.0),
                "froc": {k: [round(float(v), 4) for v in curve[k]]
                         for k in ("fp_per_image", "sensitivity", "thresholds")}}

    min_scores = sorted({c["min_score"] for c in localizing.values()})
    return block(everything) | {
        "method": "the predictor's findings against the release's boxes: AP at IoU 0.3 and 0.5 (COCO-style, greedy "
                  "by score, one match per fracture) and FROC with an IoU >= 0.3 hit; median area ratio of each "
                  "fractured image's top finding to the fracture box it overlaps most",
        "min_score": min_scores[0] if len(min_scores) == 1 else min_scores,
        "fractured_images_without_boxes": without_boxes,
        "per_body_part": {p: block(items) for p, items in sorted(groups.items())} if len(groups) > 1 else {}}


EXAMPLE_KINDS = {"tp": "true positive", "fp": "false positive", "fn": "false negative"}


def _pick_examples(manifest: pa.Table, preds: dict[str, list], per_kind: int) -> list[dict[str, Any]]:
    """A few true positives, false positives and false negatives at the operating threshold:
    the most confident of each (fractured images with boxes first), fixed for a given run."""
    boxes_of = dict(zip(manifest["image_uri"].to_pylist(),
                        manifest["boxes"].to_pylist() if "boxes" in manifest.column_names else [None] * manifest.num_rows))
    rows = defaultdict(list)
    for i, uri in enumerate(preds["image_uri"]):
        truth, label = preds["true_image_label"][i], preds["label"][i]
        if preds["status"][i] != "ok" or truth not in (0, 1):
            continue
        kind = {(1, 1): "tp", (0, 1): "fp", (1, 0): "fn"}.get((truth, label))
        if kind:
            rows[kind].append(i)
    chosen = []
    for kind in EXAMPLE_KINDS:
        p = preds["fracture_probability"]
        order = sorted(rows[kind], key=lambda i: (not boxes_of.get(preds["image_uri"][i]),
                                                  p[i] if kind == "fn" else -p[i], preds["image_uri"][i]))
        for rank, i in enumerate(order[:per_kind]):
            chosen.append({"kind": kind, "rank": rank + 1, "image_uri": preds["image_uri"][i],
                           "body_part": preds["body_part"][i], "fracture_probability": p[i],
                           "threshold": preds["threshold"][i], "boxes": boxes_of.get(preds["image_uri"][i]) or [],
                           "findings": preds["findings"][i] if "findings" in preds else []})
    return chosen


def _render_examples(index_uri: str, options: StorageOptions | None, examples: list[dict[str, Any]],
                     output_uri: str, engine: str | None = None, precision: str | None = None) -> list[dict[str, Any]]:
    """Draw each example (heatmap, ground-truth boxes, findings) with the shared overlay_png."""
    from ..imaging.decode import decode_image
    from ..imaging.preprocess import decode_for
    from ..inference.gradcam import overlay_png
    from ..inference.predictor import FracturePredictor

    predictor = FracturePredictor(index_uri, options, engine=engine, precision=precision)
    written = []
    for ex in examples:
        data = storage.read_bytes(ex["image_uri"], options)
        decoded = decode_for(data, predictor.decode_config, name=ex["image_uri"])  # what the model saw
        # Drawn on a sharper decode than the model's (JPEG draft at >= 512 px): same image, same frame.
        picture = decode_image(data, max_pixels=predictor.decode_config.max_pixels, draft_size=(512, 512),
                               name=ex["image_uri"])
        model = predictor.classifiers[ex["body_part"]]
        findings = findings_from_rows(ex["findings"]) or []
        truths = _truth_boxes(ex["boxes"], 1, decoded.width, decoded.height)
        png = overlay_png(picture.pixels, model.heatmap(decoded), truth_boxes=truths, findings=findings,
                          image_size=(decoded.width, decoded.height))
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", ex["image_uri"].rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0])
        uri = storage.join(output_uri, "examples", f"{ex['kind']}_{ex['rank']}_{stem}.png")
        storage.write_bytes(uri, png, options)
        written.append({"kind": ex["kind"], "image_uri": ex["image_uri"], "png": uri, "body_part": ex["body_part"],
                        "fracture_probability": round(float(ex["fracture_probability"]), 4),
                        "threshold": round(float(ex["threshold"]), 4), "findings": len(findings),
                        "fracture_boxes": len(truths), "heatmap": HEATMAP_FRACTURE_MAP if model.localizes
                        else HEATMAP_GRADCAM})
    return written


def localization_report(manifest: pa.Table, preds: dict[str, list], index_uri: str, *,
                        output_uri: str | None = None, storage_options: StorageOptions | None = None,
                        examples_per_kind: int = 3, engine: str | None = None,
                        precision: str | None = None) -> dict[str, Any] | None:
    """The evaluation's localisation part, for train_all's report and evaluate.py alike:
    lesion-level FROC (:func:`lesion_evaluation`) and, with ``output_uri``, example overlays
    (``examples/{tp,fp,fn}_<rank>_<image>.png``: the heatmap, fracture boxes in green, the
    findings in magenta with their scores). None when no model has a fracture map and the
    manifest has no fracture boxes."""
    import ray

    localizing = localizing_classifiers(index_uri, storage_options)
    has_boxes = "boxes" in manifest.column_names and any(manifest["boxes"].to_pylist())
    if not localizing and not has_boxes:
        return None
    out: dict[str, Any] = {"models_with_fracture_map": sorted(localizing),
                           "lesions": lesion_evaluation(manifest, preds, localizing)}
    if output_uri:
        chosen = _pick_examples(manifest, preds, examples_per_kind)
        options = (storage_options or StorageOptions()).resolved()
        task = ray.remote(num_cpus=1)(_render_examples)
        out["examples"] = (ray.get(task.remote(index_uri, options, chosen, output_uri, engine, precision))
                           if chosen else [])
    return out
