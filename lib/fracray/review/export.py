"""Reviewers' feedback -> a labelled manifest that ``train_all`` reads (``--dataset manifest --data FILE``):
the feedback loop.

One row per image that the feedback labels, in the manifest schema (:data:`fracray.data.manifest.MANIFEST_SCHEMA`):
``image_uri`` where the scoring run read it, ``study_id``, ``body_part`` (the router's), ``image_label``,
``study_label``, ``boxes`` (YOLO-normalised: the findings a reviewer agreed with and the fractures a reviewer
drew as missed), ``width``/``height`` and ``label_note`` (which verdicts decided it).

What the feedback says of each image and study is :mod:`fracray.review.truth` (the rule the
concordance uses too); an image it leaves undecided takes its study's truth where that decides it:
a normal study makes every image 0, a fractured study the reviewer agreed with labels the images
the model flagged 1.

Images left unknown (-1) are not written: train_all needs labels.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pyarrow as pa

from ..data.manifest import make_manifest, write_manifest
from ..storage import StorageOptions
from ..metrics.study import study_decision
from .feedback import FeedbackRecord
from .truth import image_truth, latest_verdicts, study_truth
from .worklist import ScoringRun

__all__ = ["feedback_manifest", "export_manifest"]


def _yolo(box, width: int, height: int) -> dict[str, Any]:
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = max(0.0, min(x0, width)), max(0.0, min(x1, width))
    y0, y1 = max(0.0, min(y0, height)), max(0.0, min(y1, height))
    return {"class_id": 0, "x_center": (x0 + x1) / 2 / width, "y_center": (y0 + y1) / 2 / height,
            "width": (x1 - x0) / width, "height": (y1 - y0) / height}


def feedback_manifest(run: ScoringRun, records: list[FeedbackRecord]) -> pa.Table:
    """The manifest (a pyarrow table in MANIFEST_SCHEMA) of the images the feedback labels."""
    by_study: dict[str, list[FeedbackRecord]] = defaultdict(list)
    for r in latest_verdicts(records):
        by_study[r.study_id].append(r)
    members: dict[str, list[dict]] = defaultdict(list)
    for row in run.images_of(sorted(by_study)).to_pylist():
        if row["status"] == "ok":
            members[row["study_id"]].append(row)
    rows = []
    for study_id, verdicts in sorted(by_study.items()):
        scored = members.get(study_id, [])
        if not scored:
            continue
        model_study = study_decision([r["fracture_probability"] for r in scored], [r["threshold"] for r in scored])
        truths = {img["image_uri"]: image_truth([r for r in verdicts if r.image_id == img["image_uri"]],
                                                img["label"], img["findings"] or []) for img in scored}
        study = study_truth(verdicts, model_study["label"], list(truths.values()))
        for img in scored:
            own = truths[img["image_uri"]]
            label, note = own.label, own.reason
            if label is None and study.truth == 0:
                label, note = 0, f"{study.reason}: a normal study"
            elif label is None and study.truth == 1 and study.agreed and img["label"] == 1:
                label, note = 1, f"{study.reason}: an image the model flagged"
            if label is None:
                continue  # train_all needs labels
            width, height = img["width"] or 0, img["height"] or 0
            yolo = [_yolo(b, width, height) for b in own.boxes] if width and height and label else []
            rows.append({
                "image_uri": img["image_uri"], "dataset": "review", "split": "unassigned",
                "body_part": (img["body_part"] or "unknown").lower(), "study_id": study_id,
                "image_label": label, "study_label": -1 if study.truth is None else study.truth,
                "fracture_count": len(yolo), "boxes": yolo, "width": img["width"], "height": img["height"],
                "label_note": "review: " + note,
            })
    return make_manifest(rows)


def export_manifest(run: ScoringRun, records: list[FeedbackRecord], output: str,
                    options: StorageOptions | None = None) -> dict[str, Any]:
    """Write the feedback manifest (Parquet) to ``output``; returns counts."""
    table = feedback_manifest(run, records)
    write_manifest(table, output, options)
    labels = table["image_label"].to_pylist()
    return {"output": output, "images": table.num_rows, "fractured": sum(v == 1 for v in labels),
            "normal": sum(v == 0 for v in labels), "boxes": sum(len(b or []) for b in table["boxes"].to_pylist()),
            "studies": len(set(table["study_id"].to_pylist())), "records": len(records)}
