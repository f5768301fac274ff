"""Reviewers' feedback -> a labelled manifest that ``train_all`` reads (``--dataset manifest --data FILE``):
the feedback loop.

One row per image that the feedback labels, in the manifest schema (:data:`fracray.data.manifest.MANIFEST_SCHEMA`):
``image_uri`` where the scoring run read it, ``study_id``, ``body_part`` (the router's), ``image_label``,
``study_label``, ``boxes`` (YOLO-normalised: the findings a reviewer agreed with and the fractures a reviewer
drew as missed), ``width``/``height`` and ``label_note`` (which verdicts decided it).

The rules, per target (a study, an image, a finding) the latest verdict wins, whoever gave it:

- an image with a drawn missed fracture or an agreed finding is fractured (1);
- else its own verdict: agree keeps the model's label at the run's threshold, disagree flips it;
- else a study verdict: the study is fractured or not (agree keeps the model's study label, disagree
  flips it); a normal study makes every image 0, a fractured one labels the images the model flagged 1
  on agreement and leaves the others unknown;
- else, every finding of a flagged image disagreed with: 0.

Images left unknown (-1) are not written: train_all needs labels.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pyarrow as pa

from ..data.manifest import make_manifest, write_manifest
from ..storage import StorageOptions
from .feedback import FeedbackRecord
from .worklist import ScoringRun

__all__ = ["feedback_manifest", "export_manifest"]


def _latest(records: list[FeedbackRecord]) -> dict[tuple, FeedbackRecord]:
    """The latest verdict per target (missed boxes are all kept, each its own target)."""
    out: dict[tuple, FeedbackRecord] = {}
    for i, r in enumerate(sorted(records, key=lambda r: r.created_at)):
        key = ("missed", r.study_id, r.image_id, i) if r.verdict == "missed" else \
              (r.scope, r.study_id, r.image_id, r.finding)
        out[key] = r
    return out


def _yolo(box, width: int, height: int) -> dict[str, Any]:
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = max(0.0, min(x0, width)), max(0.0, min(x1, width))
    y0, y1 = max(0.0, min(y0, height)), max(0.0, min(y1, height))
    return {"class_id": 0, "x_center": (x0 + x1) / 2 / width, "y_center": (y0 + y1) / 2 / height,
            "width": (x1 - x0) / width, "height": (y1 - y0) / height}


def feedback_manifest(run: ScoringRun, records: list[FeedbackRecord]) -> pa.Table:
    """The manifest (a pyarrow table in MANIFEST_SCHEMA) of the images the feedback labels."""
    latest = _latest(records)
    by_study: dict[str, list[FeedbackRecord]] = defaultdict(list)
    for r in latest.values():
        by_study[r.study_id].append(r)
    images = run.images_of(sorted(by_study)).to_pylist()
    members: dict[str, list[dict]] = defaultdict(list)
    for row in images:
        if row["status"] == "ok":
            members[row["study_id"]].append(row)
    rows = []
    for study_id, verdicts in sorted(by_study.items()):
        scored = members.get(study_id, [])
        if not scored:
            continue
        probability = sum(r["fracture_probability"] for r in scored) / len(scored)
        threshold = sum(r["threshold"] for r in scored) / len(scored)
        model_study = int(probability >= threshold)
        study_verdict = next((r for r in verdicts if r.scope == "study"), None)
        study_label = (model_study if study_verdict.verdict == "agree" else 1 - model_study) if study_verdict else -1
        labelled = []
        for img in scored:
            uri = img["image_uri"]
            mine = [r for r in verdicts if r.image_id == uri]
            findings = img["findings"] or []
            width, height = img["width"] or 0, img["height"] or 0
            boxes, notes = [], []
            for r in mine:
                if r.verdict == "missed":
                    boxes.append(r.box)
                    notes.append(f"missed fracture drawn by {r.reviewer}")
                elif r.scope == "finding" and r.verdict == "agree" and r.finding is not None \
                        and 0 <= r.finding < len(findings):
                    f = findings[r.finding]
                    boxes.append((f["x0"], f["y0"], f["x1"], f["y1"]))
                    notes.append(f"finding {r.finding} agreed by {r.reviewer}")
            image_verdict = next((r for r in mine if r.scope == "image"), None)
            finding_verdicts = [r for r in mine if r.scope == "finding"]
            if boxes:
                label = 1
            elif image_verdict:
                label = img["label"] if image_verdict.verdict == "agree" else 1 - img["label"]
                notes.append(f"image {image_verdict.verdict}d by {image_verdict.reviewer}"
                             if image_verdict.verdict == "agree" else f"image disagreed by {image_verdict.reviewer}")
            elif study_label == 0:
                label = 0
                notes.append(f"study {study_verdict.verdict} ({study_verdict.reviewer}): normal")
            elif study_label == 1 and study_verdict.verdict == "agree" and img["label"] == 1:
                label = 1
                notes.append(f"study agreed ({study_verdict.reviewer}): flagged image")
            elif findings and finding_verdicts and len({r.finding for r in finding_verdicts
                                                        if r.verdict == "disagree"}) == len(findings):
                label = 0
                notes.append("every finding disagreed")
            else:
                label = -1
            if label == -1:
                continue
            if label == 1 and study_label == -1:
                study_label_here = 1
            else:
                study_label_here = study_label
            yolo = [_yolo(b, width, height) for b in boxes] if width and height else []
            labelled.append({
                "image_uri": uri, "dataset": "review", "split": "unassigned",
                "body_part": (img["body_part"] or "unknown").lower(), "study_id": study_id,
                "image_label": label, "study_label": study_label_here, "fracture_count": len(yolo) if label else 0,
                "boxes": yolo if label else [], "width": img["width"], "height": img["height"],
                "label_note": "review: " + "; ".join(notes),
            })
        if labelled and study_label == -1 and any(r["image_label"] == 1 for r in labelled):
            for r in labelled:
                r["study_label"] = 1
        rows += labelled
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
