"""MURA's study rule, written once: a study's fracture probability is the mean over its
scored images, its threshold the mean of their thresholds (each image's own model's), its
label the one at that threshold, its body part the most frequent among its images.

Serving (``/v1/classify/study``), bulk scoring (``studies.parquet``) and the study-level
metrics of training and evaluation all decide a study with :func:`study_decision`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Sequence

import numpy as np

from .classification import binary_metrics

__all__ = ["study_decision", "study_level", "STUDY_RULE"]

STUDY_RULE = "mean probability over the study's images (MURA)"


def study_decision(probabilities: Sequence[float], thresholds: Sequence[float] | float,
                   body_parts: Sequence[str] | None = None) -> dict[str, Any]:
    """{fracture_probability, threshold, label, body_part} of one study from its scored images.

    ``thresholds``: each image's threshold, or one number for all of them (used as it is).
    ``body_parts``: each image's body part (None: ``body_part`` is None)."""
    if len(probabilities) == 0:
        raise ValueError("A study decision needs at least one scored image")
    probability = float(np.mean(probabilities))
    threshold = float(thresholds) if np.isscalar(thresholds) else float(np.mean(thresholds))
    return {"fracture_probability": probability, "threshold": threshold, "label": int(probability >= threshold),
            "body_part": Counter(body_parts).most_common(1)[0][0] if body_parts else None}


def study_level(study_ids: Sequence[str], labels: Sequence[int], probs: Sequence[float],
                threshold: float | Sequence[float] = 0.5) -> dict[str, Any]:
    """MURA's study-level evaluation: every study decided by :func:`study_decision`; returns the
    binary metrics on studies (``n`` = studies, AUROC on their mean probabilities) and Cohen's
    kappa. ``threshold``: one for every image, or each image's own (its model's)."""
    per_image = not np.isscalar(threshold)
    grouped: dict[str, list[int]] = defaultdict(list)
    study_label: dict[str, int] = {}
    for i, (sid, label) in enumerate(zip(study_ids, labels)):
        grouped[sid].append(i)
        study_label[sid] = int(label)
    ids = sorted(grouped)
    decisions = [study_decision([float(probs[i]) for i in grouped[s]],
                                [float(threshold[i]) for i in grouped[s]] if per_image else threshold)
                 for s in ids]
    y = [study_label[s] for s in ids]
    pred = [d["label"] for d in decisions]
    out = binary_metrics(y, [d["fracture_probability"] for d in decisions], 0.5 if per_image else threshold,
                         predicted=pred)
    if per_image:
        out["threshold"] = "per study: the mean of its images' thresholds"
    from sklearn.metrics import cohen_kappa_score

    out["kappa"] = float(cohen_kappa_score(y, pred)) if len(set(y) | set(pred)) > 1 else None
    out["studies"] = len(ids)
    return out
