"""What reviewers' feedback says is true: the one reading of the verdicts that the export (a
labelled manifest for training) and the concordance (the model against its reviewers) share.

Per target (a study, an image, a finding) the latest verdict wins, whoever gave it; every drawn
missed fracture is kept (each its own target).

- An image is fractured if a reviewer drew a missed fracture on it or agreed with one of its
  findings; else its own verdict decides (agree keeps the model's label, disagree flips it); else
  it is not decided. A finding a reviewer disagreed with says only that the box is wrong, not
  that the image is normal: it decides nothing.
- A study is fractured if one of its images is; else its latest study verdict decides (agree keeps
  the model's study decision, disagree flips it); else it is not decided.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .feedback import FeedbackRecord

__all__ = ["latest_verdicts", "ImageTruth", "image_truth", "StudyTruth", "study_truth"]


def latest_verdicts(records: Sequence[FeedbackRecord]) -> list[FeedbackRecord]:
    """The latest verdict per target, oldest first (missed fractures are all kept)."""
    out: dict[tuple, FeedbackRecord] = {}
    for i, r in enumerate(sorted(records, key=lambda r: r.created_at)):
        key = ("missed", r.study_id, r.image_id, i) if r.verdict == "missed" else \
              (r.scope, r.study_id, r.image_id, r.finding)
        out[key] = r
    return sorted(out.values(), key=lambda r: r.created_at)


@dataclasses.dataclass(frozen=True)
class ImageTruth:
    label: int | None                       # 1, 0, or None (the feedback does not decide it)
    boxes: tuple[tuple[float, ...], ...]    # where the fractures are (drawn, or agreed findings), image pixels
    reason: str


def image_truth(verdicts: Sequence[FeedbackRecord], model_label: int | None,
                findings: Sequence[dict[str, Any]] = ()) -> ImageTruth:
    """The truth of one image from its latest verdicts (``latest_verdicts``, this image's only),
    the model's label for it and its findings (rows with x0, y0, x1, y1)."""
    boxes, reasons = [], []
    for r in verdicts:
        if r.verdict == "missed":
            if r.box:
                boxes.append(tuple(float(v) for v in r.box))
            reasons.append(f"missed fracture drawn by {r.reviewer}")
        elif r.scope == "finding" and r.verdict == "agree" and r.finding is not None:
            if 0 <= r.finding < len(findings):
                f = findings[r.finding]
                boxes.append((float(f["x0"]), float(f["y0"]), float(f["x1"]), float(f["y1"])))
            reasons.append(f"finding {r.finding} agreed by {r.reviewer}")
    if reasons:
        return ImageTruth(1, tuple(boxes), "; ".join(reasons))
    own = [r for r in verdicts if r.scope == "image"]
    if own and model_label in (0, 1):
        latest = own[-1]
        label = model_label if latest.verdict == "agree" else 1 - model_label
        return ImageTruth(label, (), f"image {latest.verdict}d by {latest.reviewer}")
    return ImageTruth(None, (), "not decided")


@dataclasses.dataclass(frozen=True)
class StudyTruth:
    truth: int | None         # 1, 0, or None (not decided)
    reason: str
    from_study_verdict: bool  # decided by a study-level verdict (not by one of its images)
    agreed: bool              # that verdict agreed with the model


def study_truth(verdicts: Sequence[FeedbackRecord], model_label: int | None,
                images: Sequence[ImageTruth] = ()) -> StudyTruth:
    """The truth of one study from its latest verdicts, the model's study decision and its
    images' truths (:func:`image_truth`)."""
    study_level = [r for r in verdicts if r.scope == "study"]
    fractured = [t for t in images if t.label == 1]
    if fractured:
        return StudyTruth(1, fractured[0].reason, False, False)
    if study_level and model_label in (0, 1):
        latest = study_level[-1]
        truth = model_label if latest.verdict == "agree" else 1 - model_label
        return StudyTruth(truth, f"study {latest.verdict}d by {latest.reviewer}", True, latest.verdict == "agree")
    return StudyTruth(None, "not scored" if study_level else "no study-level verdict", False, False)
