"""Classification metrics, with the conventions of the papers: confusion counts,
accuracy, precision, sensitivity (recall), specificity, F1, AUROC; operating thresholds
chosen on validation data. Study-level figures (MURA) are in :mod:`.study`."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["binary_metrics", "choose_threshold", "multiclass_metrics", "sensitivity_at_specificity", "wilson_interval"]


def _safe_div(a: float, b: float) -> float | None:
    return float(a / b) if b else None


def binary_metrics(labels: Sequence[int], probs: Sequence[float], threshold: float = 0.5, *,
                   predicted: Sequence[int] | None = None) -> dict[str, Any]:
    """Confusion counts and the figures made of them at ``threshold``, and AUROC. ``predicted``:
    the decisions themselves, where they were not all made at one threshold (a study's mean
    against its images' mean threshold); the counts then come from them."""
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probs, dtype=float)
    if y.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in length: {y.shape} vs {p.shape}")
    pred = p >= threshold if predicted is None else np.asarray(predicted, dtype=int).astype(bool)
    tp = int(np.sum(pred & (y == 1)))
    fn = int(np.sum(~pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    precision = _safe_div(tp, tp + fp)
    sensitivity = _safe_div(tp, tp + fn)
    f1 = (2 * precision * sensitivity / (precision + sensitivity)
          if precision is not None and sensitivity is not None and precision + sensitivity > 0 else None)
    auroc = None
    if 0 < y.sum() < len(y):
        from sklearn.metrics import roc_auc_score
        auroc = float(roc_auc_score(y, p))
    return {"n": int(len(y)), "tp": tp, "fn": fn, "fp": fp, "tn": tn, "threshold": float(threshold),
            "accuracy": _safe_div(tp + tn, len(y)), "precision": precision, "sensitivity": sensitivity,
            "specificity": _safe_div(tn, tn + fp), "f1": f1, "auroc": auroc}


def choose_threshold(labels: Sequence[int], probs: Sequence[float], *, target: str = "youden",
                     value: float | None = None) -> float:
    """An operating threshold chosen on validation data.

    target: "youden" (max sensitivity + specificity - 1), "sensitivity" (the highest
    threshold whose sensitivity >= value) or "specificity" (the lowest threshold whose
    specificity >= value). Falls back to 0.5 when a class is missing.
    """
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probs, dtype=float)
    if not 0 < y.sum() < len(y):
        return 0.5
    from sklearn.metrics import roc_curve
    fpr, tpr, thresholds = roc_curve(y, p)
    thresholds = np.clip(thresholds, 0.0, 1.0)
    if target == "youden":
        best = int(np.argmax(tpr - fpr))
    elif target == "sensitivity":
        if value is None:
            raise ValueError("target='sensitivity' needs value, e.g. 0.9")
        best = int(np.flatnonzero(tpr >= value)[0])
    elif target == "specificity":
        if value is None:
            raise ValueError("target='specificity' needs value, e.g. 0.9")
        best = int(np.flatnonzero(1 - fpr >= value)[-1])
    else:
        raise ValueError(f"target must be youden, sensitivity or specificity. Got {target!r}")
    return float(thresholds[best])


def multiclass_metrics(labels: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    y = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=float)
    pred = probs.argmax(axis=1)
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    for t, q in zip(y, pred):
        confusion[t, q] += 1
    per_class = {c: {"recall": _safe_div(confusion[i, i], confusion[i].sum()),
                     "precision": _safe_div(confusion[i, i], confusion[:, i].sum()), "n": int(confusion[i].sum())}
                 for i, c in enumerate(classes)}
    return {"n": int(len(y)), "accuracy": _safe_div(int((pred == y).sum()), len(y)), "per_class": per_class,
            "confusion": confusion.tolist(), "classes": list(classes)}


def sensitivity_at_specificity(labels: Sequence[int], probs: Sequence[float], specificity: float) -> dict[str, Any]:
    """The best sensitivity at a specificity of at least ``specificity`` (accuracy alone
    misleads on FracAtlas, where 82% of images are non-fractured)."""
    y = np.asarray(labels, dtype=int)
    if not 0 < y.sum() < len(y):
        return {"specificity_target": specificity, "sensitivity": None, "threshold": None}
    threshold = choose_threshold(labels, probs, target="specificity", value=specificity)
    m = binary_metrics(labels, probs, threshold)
    return {"specificity_target": specificity, "sensitivity": m["sensitivity"], "specificity": m["specificity"],
            "threshold": threshold}


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion ``successes / n`` (None when n is 0): unlike the
    normal approximation it stays inside [0, 1] and is usable for small counts and 0 or n successes."""
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n]. Got {successes} of {n}")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends, not rounding residue
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high
