"""P(fracture) from the classifier and the detector together, and what it means as a frequency.

The image's probability fuses the classifier's logit with the logit of the detector's top
box (a two-feature logistic regression fitted on held-out training images, as the best
public FracAtlas result fuses segmentation with a classifier); the fit is also what makes
P(fracture) a calibrated frequency. Box scores get their own Platt fit: P(a fracture at
IoU >= 0.3 | this box's raw score). Pure NumPy + scikit-learn: the trainer fits, the
predictor applies (:func:`fused_probability`), so serving, scoring and evaluation agree.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..imaging.regions import match_findings
from .classification import binary_metrics

__all__ = ["top_scores", "fit_fusion", "fused_probability", "fit_box_calibration", "fracture_ece",
           "fracture_reliability", "fusion_ablation", "FUSION_FEATURES"]

FUSION_FEATURES = ("classifier_logit", "top_box_logit")
_EPS = 1e-4


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def top_scores(preds: dict[str, list]) -> np.ndarray:
    """The detector's best raw box score per image of ``preds`` (0 where it found nothing)."""
    return np.asarray([float(np.max(scores)) if len(scores) else 0.0 for _, scores in preds.get("detections") or []],
                      np.float64)


def _features(logits: np.ndarray, top: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64).reshape(-1, 2)
    return np.stack([logits[:, 1] - logits[:, 0], _logit(top)], axis=1)


def fit_fusion(logits: np.ndarray, top: np.ndarray, labels: np.ndarray) -> dict[str, Any] | None:
    """Logistic regression of the label on (classifier logit, top-box logit); None without
    both classes. Lightly regularised (C=1 on standardised-scale features is plenty for two)."""
    labels = np.asarray(labels)
    if len(set(labels.tolist())) < 2 or len(labels) != len(top):
        return None
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=1.0).fit(_features(logits, top), labels)
    return {"features": list(FUSION_FEATURES), "weights": [float(w) for w in fit.coef_[0]],
            "bias": float(fit.intercept_[0]), "fitted_on_images": int(len(labels))}


def fused_probability(fusion: dict[str, Any], logits: np.ndarray, top: np.ndarray) -> np.ndarray:
    """P(fracture) per image from the fit :func:`fit_fusion` made."""
    z = _features(logits, top) @ np.asarray(fusion["weights"], np.float64) + float(fusion["bias"])
    return 1.0 / (1.0 + np.exp(-z))


def fit_box_calibration(preds: dict[str, list], manifest, preprocess, *, min_iou: float = 0.3
                        ) -> dict[str, float] | None:
    """Platt scaling of the detector's box scores on held-out images: whether each candidate
    box (score >= 0.01) matches a fracture at IoU >= ``min_iou`` (greedy, one match per
    fracture), against the logit of its raw score. None when there is nothing to fit."""
    from ..imaging.findings import detection_findings, truths_per_image

    if not preds.get("detections"):
        return None
    scores, hits = [], []
    for k, truths in truths_per_image(preds, manifest):
        found = detection_findings(*preds["detections"][k], preds["source_size"][k], preprocess, min_score=0.01)
        for score, tp in match_findings(found, truths, min_iou=min_iou):
            scores.append(score)
            hits.append(int(tp))
    if len(set(hits)) < 2:
        return None
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=1.0).fit(_logit(scores)[:, None], np.asarray(hits))
    return {"a": float(fit.coef_[0][0]), "b": float(fit.intercept_[0]), "min_iou": min_iou,
            "fitted_on_boxes": len(hits)}


def fracture_reliability(labels: Sequence[int], p: Sequence[float], n_bins: int = 10) -> list[dict[str, Any]]:
    """P(fracture) itself against the fraction fractured, in ``n_bins`` equal-width bins
    (not the top-label confidence, which folds 0.3 and 0.7 together)."""
    labels, p = np.asarray(labels, np.float64), np.asarray(p, np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = which == b
        out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(sel.sum()),
                    "mean_probability": float(p[sel].mean()) if sel.any() else None,
                    "fraction_fractured": float(labels[sel].mean()) if sel.any() else None})
    return out


def fracture_ece(labels: Sequence[int], p: Sequence[float], n_bins: int = 10) -> dict[str, Any]:
    """ECE of P(fracture) (10 equal-width bins), with its reliability bins."""
    bins = fracture_reliability(labels, p, n_bins)
    n = sum(b["n"] for b in bins)
    ece = sum(b["n"] / n * abs(b["mean_probability"] - b["fraction_fractured"]) for b in bins if b["n"]) if n else None
    return {"ece": ece, "bins": n_bins, "n": n, "reliability": bins}


def fusion_ablation(labels: np.ndarray, logits: np.ndarray, temperature: float, top: np.ndarray,
                    fused: np.ndarray) -> dict[str, Any]:
    """AUROC and P(fracture) ECE of the classifier alone, the detector alone (its top box) and
    the two fused, on the same images."""
    labels = np.asarray(labels)
    keep = labels >= 0
    logits = np.asarray(logits, np.float64).reshape(-1, 2)
    z = (logits[:, 1] - logits[:, 0]) / float(temperature)
    rows = {"classifier": 1 / (1 + np.exp(-z)), "detector": np.asarray(top, np.float64), "fused": np.asarray(fused)}
    return {name: {"auroc": binary_metrics(labels[keep], p[keep], 0.5)["auroc"],
                   "ece": fracture_ece(labels[keep], p[keep])["ece"]} for name, p in rows.items()}
