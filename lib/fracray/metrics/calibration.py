"""Probability calibration (temperature scaling, Guo et al. 2017) and operating points.

A network trained with class weights or focal loss is confident in the wrong
places; one scalar temperature T fitted on validation logits (softmax(z / T))
fixes most of it without changing the ranking (AUROC is unchanged). The
expected calibration error (ECE) before and after is stored in the bundle.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .classification import binary_metrics, choose_threshold

__all__ = ["fit_temperature", "expected_calibration_error", "calibrate", "softmax", "operating_points",
           "reliability_bins"]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax(logits, temperature)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(p, 1e-12, None))))


def fit_temperature(logits: np.ndarray, labels: Sequence[int], *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature minimising validation negative log-likelihood.

    NLL(T) is smooth and unimodal in log T for a fixed logit matrix, so a golden-
    section search over log T is exact enough and needs no optimiser state.
    """
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    if logits.ndim != 2 or len(logits) != len(y):
        raise ValueError(f"logits must be N x C with one label per row. Got {logits.shape} and {len(y)} labels")
    if len(y) == 0 or len(set(y.tolist())) < 2:
        return 1.0  # nothing to fit on: leave the model as trained
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    golden = (np.sqrt(5) - 1) / 2
    a, b = lo + (1 - golden) * (hi - lo), lo + golden * (hi - lo)
    fa, fb = _nll(logits, y, np.exp(a)), _nll(logits, y, np.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - golden) * (hi - lo)
            fa = _nll(logits, y, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = _nll(logits, y, np.exp(b))
    return float(np.exp((lo + hi) / 2))


def reliability_bins(probs: np.ndarray, labels: Sequence[int], n_bins: int = 10) -> list[dict[str, Any]]:
    """Confidence (max probability) against accuracy, in equal-width bins."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = []
    for i in range(n_bins):
        inside = (confidence > edges[i]) & (confidence <= edges[i + 1]) if i else (confidence <= edges[1])
        if inside.any():
            bins.append({"low": float(edges[i]), "high": float(edges[i + 1]), "n": int(inside.sum()),
                         "confidence": float(confidence[inside].mean()), "accuracy": float(correct[inside].mean())})
    return bins


def expected_calibration_error(probs: np.ndarray, labels: Sequence[int], n_bins: int = 15) -> float:
    """ECE: the bin-size-weighted mean |accuracy - confidence| (Naeini et al. 2015)."""
    y = np.asarray(labels, dtype=int)
    if len(y) == 0:
        return float("nan")
    return float(sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(probs, y, n_bins)) / len(y))


def calibrate(logits: np.ndarray, labels: Sequence[int]) -> dict[str, Any]:
    """Fit T and report what it changed (ECE and NLL before and after, reliability bins)."""
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    temperature = fit_temperature(logits, y)
    before, after = softmax(logits), softmax(logits, temperature)
    return {"method": "temperature_scaling", "temperature": temperature, "n": int(len(y)),
            "ece_before": expected_calibration_error(before, y), "ece_after": expected_calibration_error(after, y),
            "nll_before": _nll(logits, y, 1.0) if len(y) else None,
            "nll_after": _nll(logits, y, temperature) if len(y) else None,
            "reliability_before": reliability_bins(before, y), "reliability_after": reliability_bins(after, y)}


def operating_points(labels: Sequence[int], probs: Sequence[float], *,
                     targets: Sequence[tuple[str, float]] = (("sensitivity", 0.90), ("sensitivity", 0.95),
                                                             ("specificity", 0.90), ("specificity", 0.95)),
                     evaluate: tuple[Sequence[int], Sequence[float]] | None = None) -> dict[str, dict[str, Any]]:
    """Named thresholds chosen on (labels, probs), each with the sensitivity and specificity it
    gave there, so a client can pick e.g. "sensitivity>=0.95" for triage.

    With ``evaluate`` = (labels, probs) of other images (the validation split, when the
    thresholds were chosen on a calibration slice), ``sensitivity``/``specificity`` are
    measured there and the choosing set's own figures are kept as ``chosen_on``.
    Two aliases follow what readers of cleared products expect: ``high_sensitivity``
    (= sensitivity>=0.95, for triage/rule-out) and ``high_specificity`` (= specificity>=0.95).
    """
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probs, dtype=np.float64)
    if not 0 < y.sum() < len(y):
        return {}
    points = {"youden": choose_threshold(y, p, target="youden")}
    for target, value in targets:
        points[f"{target}>={value:.2f}"] = choose_threshold(y, p, target=target, value=value)
    points["high_sensitivity"] = choose_threshold(y, p, target="sensitivity", value=0.95)
    points["high_specificity"] = choose_threshold(y, p, target="specificity", value=0.95)
    out = {}
    for name, threshold in points.items():
        m = binary_metrics(y, p, threshold)
        out[name] = {"threshold": float(threshold), "sensitivity": m["sensitivity"], "specificity": m["specificity"]}
        if evaluate is not None:
            e = binary_metrics(np.asarray(evaluate[0], dtype=int), np.asarray(evaluate[1], dtype=float), threshold)
            out[name] = {"threshold": float(threshold), "sensitivity": e["sensitivity"], "specificity": e["specificity"],
                         "chosen_on": {"sensitivity": m["sensitivity"], "specificity": m["specificity"], "n": len(y)}}
    return out
