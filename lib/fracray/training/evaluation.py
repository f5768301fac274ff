"""Evaluate the router -> classifier path on a labelled manifest, with Ray Data.

Per body part: TP, FN, FP, TN, accuracy, precision, sensitivity, specificity, F1,
AUROC; study-level Cohen's kappa (MURA); router accuracy where the true body part
is known. Used by train_all's report and by ``pipelines/evaluate.py``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import pyarrow as pa

from ..storage import StorageOptions
from . import metrics as M

__all__ = ["score_manifest", "summarize_predictions"]


def score_manifest(manifest: pa.Table, index_uri: str, *, storage_options: StorageOptions | None = None,
                   batch_size: int = 32, concurrency: int = 1) -> dict[str, list]:
    """Run the predictor over every manifest row (an actor pool); one output row per input."""
    import ray

    from ..inference.predictor import FracturePredictor

    options = (storage_options or StorageOptions()).resolved()
    rows = max(1, min(256, math.ceil(manifest.num_rows / 8)))
    ds = ray.data.from_arrow([manifest.slice(s, rows) for s in range(0, manifest.num_rows, rows)])
    ds = ds.map_batches(FracturePredictor, fn_constructor_kwargs={"index_uri": index_uri, "storage_options": options},
                        batch_size=batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=concurrency))
    ds.context.enable_progress_bars = False
    out: dict[str, list] = defaultdict(list)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key, values in batch.items():
            out[key] += [v.item() if hasattr(v, "item") else v for v in values]
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
        out = M.binary_metrics(y, p, 0.5)
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
        studies = [preds["study_id"][i] for i in idx] if "study_id" in preds else None
        if studies and all(studies):
            thresholds = [float(preds["threshold"][i]) for i in idx]
            # Study decision: mean probability against the mean threshold of its images' models.
            st = M.study_level(studies, y, [pp - t + 0.5 for pp, t in zip(p, thresholds)], 0.5)
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
    """Ray Data actor: Grad-CAM of the fracture class for images with fracture boxes,
    through the same router -> classifier path as scoring."""

    def __init__(self, index_uri: str, storage_options: StorageOptions | None = None, tolerance: float = 0.0):
        from .. import storage
        from ..inference.predictor import FracturePredictor

        self.storage = storage
        self.predictor = FracturePredictor(index_uri, storage_options)
        self.options = storage_options
        self.tolerance = tolerance

    def __call__(self, batch):
        import numpy as np

        from ..imaging.decode import ImageRejected
        from ..imaging.preprocess import decode_for
        from ..inference.gradcam import heatmap_peak, pointing_hit

        out = {k: [] for k in ("image_uri", "body_part", "hit", "center_hit", "peak_x", "peak_y", "status")}
        for uri, boxes in zip(batch["image_uri"].to_pylist(), batch["boxes"].to_pylist()):
            try:
                decoded = decode_for(self.storage.read_bytes(uri, self.options), self.predictor.decode_config,
                                     name=uri)
            except (ImageRejected, self.storage.StorageError) as exc:
                status = exc.reason.value if isinstance(exc, ImageRejected) else "read_error"
                for key, value in (("image_uri", uri), ("body_part", ""), ("hit", False), ("center_hit", False),
                                   ("peak_x", np.nan), ("peak_y", np.nan), ("status", status)):
                    out[key].append(value)
                continue
            part = self.predictor.route([decoded])[0][0]
            peak = heatmap_peak(self.predictor.classifiers[part].gradcam(decoded))
            out["image_uri"].append(uri)
            out["body_part"].append(part)
            out["hit"].append(pointing_hit(peak, boxes, self.tolerance))
            out["center_hit"].append(pointing_hit((0.5, 0.5), boxes, self.tolerance))
            out["peak_x"].append(peak[0])
            out["peak_y"].append(peak[1])
            out["status"].append("ok")
        return {k: np.asarray(v, dtype=object if k in ("image_uri", "body_part", "status") else None)
                for k, v in out.items()}


def pointing_game(manifest: pa.Table, index_uri: str, *, storage_options: StorageOptions | None = None,
                  tolerance: float = 0.0, limit: int | None = None) -> dict[str, Any] | None:
    """How often the Grad-CAM peak of the fracture class falls inside a fracture box
    (FracAtlas YOLO boxes), per body part, against the image-centre baseline.
    None when the manifest has no fractured images with boxes."""
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
    ds = ds.map_batches(_PointingGameScorer, fn_constructor_kwargs={"index_uri": index_uri, "storage_options": options,
                                                                    "tolerance": tolerance},
                        batch_size=8, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1))
    ds.context.enable_progress_bars = False
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
    return {"method": "Grad-CAM peak inside a fracture box (YOLO boxes)", "tolerance": tolerance,
            "overall": rate(ok), "per_body_part": {p: rate(idx) for p, idx in sorted(parts.items())},
            "not_scored": len(results["status"]) - len(ok)}
