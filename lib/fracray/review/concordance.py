"""Concordance of the model with its reviewers: study-level sensitivity and specificity
estimated from reviewers' feedback (:class:`~fracray.review.feedback.FeedbackRecord`).

Each reviewed study gets a reviewer truth (:mod:`fracray.review.truth`, the rule the export
uses too), compared with the model's study decision (the ``label`` of ``studies.parquet``,
MURA's rule). A missed fracture in an unflagged study is a false negative; in a flagged study the
study-level call was right (TP) and the miss is counted among the missed boxes.

Verification bias: only studies someone reviewed are counted, and reviewers open flagged studies
far more often than unflagged ones, so the sensitivity here is optimistic (fractures in
unreviewed, unflagged studies are never seen) and neither figure estimates the archive's.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

from ..metrics.classification import wilson_interval
from .feedback import FeedbackRecord
from .truth import image_truth, latest_verdicts, study_truth

__all__ = ["study_truths", "concordance", "VERIFICATION_BIAS_NOTE"]

VERIFICATION_BIAS_NOTE = ("Estimated from reviewed studies only (verification bias): reviewers open flagged studies "
                          "more often than unflagged ones, so fractures in unreviewed, unflagged studies are never "
                          "counted; sensitivity is optimistic and neither figure is the archive's.")


def study_truths(feedback: Sequence[FeedbackRecord], study_labels: Mapping[str, int],
                 image_labels: Mapping[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """{study_id: {"truth": 1 | 0 | None, "model": the study's label or None, "reason": ...}} for
    every study with feedback, by :mod:`fracray.review.truth` (the rule the export uses too).
    ``study_labels``: the run's study decisions (1, 0, -1 not scored); ``image_labels``: the run's
    image labels by image_uri, for image-level verdicts."""
    image_labels = image_labels or {}
    by_study: dict[str, list[FeedbackRecord]] = defaultdict(list)
    for record in latest_verdicts(feedback):
        by_study[record.study_id].append(record)
    said: dict[str, set[str]] = defaultdict(set)  # every study-level verdict, not only the latest
    for record in feedback:
        if record.scope == "study":
            said[record.study_id].add(record.verdict)
    out: dict[str, dict[str, Any]] = {}
    for study, records in by_study.items():
        model = study_labels.get(study)
        model = int(model) if model in (0, 1) else None
        by_image: dict[str, list[FeedbackRecord]] = defaultdict(list)
        for r in records:
            if r.image_id is not None:
                by_image[r.image_id].append(r)
        images = [image_truth(v, image_labels.get(uri)) for uri, v in by_image.items()]
        decided = study_truth(records, model, images)
        out[study] = {"truth": decided.truth, "model": model, "reason": decided.reason,
                      "conflicting": len(said[study]) > 1, "records": len(records)}
    return out


def _rate(successes: int, n: int) -> dict[str, Any]:
    interval = wilson_interval(successes, n)
    return {"value": successes / n if n else None, "successes": successes, "n": n,
            "ci95": list(interval) if interval else None}


def concordance(feedback: Sequence[FeedbackRecord], study_labels: Mapping[str, int],
                image_labels: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Counts (TP, FP, TN, FN over decided studies), sensitivity, specificity, PPV, NPV with
    Wilson 95 % intervals, the finding-level agreement, and how many reviewed studies could not be
    decided or are not in the run. See the module's docstring for the rules."""
    truths = study_truths(feedback, study_labels, image_labels)
    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    undecided = not_in_run = 0
    for study, t in truths.items():
        if study not in study_labels:
            not_in_run += 1
            continue
        if t["truth"] is None or t["model"] is None:
            undecided += 1
            continue
        key = ("t" if t["truth"] == t["model"] else "f") + ("p" if t["model"] == 1 else "n")
        counts[key] += 1
    tp, fp, tn, fn = counts["tp"], counts["fp"], counts["tn"], counts["fn"]
    findings = [r for r in feedback if r.scope == "finding"]
    agreed = sum(r.verdict == "agree" for r in findings)
    return {
        "level": "study", "reviewed_studies": len(truths), "decided_studies": tp + fp + tn + fn,
        "undecided_studies": undecided, "not_in_run": not_in_run,
        "conflicting_studies": sum(t["conflicting"] for t in truths.values()),
        **counts,
        "sensitivity": _rate(tp, tp + fn), "specificity": _rate(tn, tn + fp),
        "ppv": _rate(tp, tp + fp), "npv": _rate(tn, tn + fn),
        "findings": {"reviewed": len(findings), "agreed": agreed, "precision": _rate(agreed, len(findings)),
                     "missed_boxes": sum(r.scope == "missed" for r in feedback)},
        "records": len(feedback), "reviewers": len({r.reviewer for r in feedback}),
        "interval": "Wilson score, 95 %",
        "note": VERIFICATION_BIAS_NOTE,
    }
