"""Drift of P(fracture): a scoring run's distribution against the model's own validation
distribution, by the Population Stability Index (PSI).

The reference is what the model produced on its validation images (``fracray evaluate
--output`` writes it as ``validation_distribution.json``; ``fracray ship-model`` puts it beside
the shipped ``model_index.json``): the deciles of the validation P(fracture) cut [0, 1] into
``PSI_BINS`` bins, each holding about a tenth of the validation images, and a run's images are
counted in the same bins.

    PSI = sum over bins of (a_i - e_i) * ln(a_i / e_i)

with ``e_i`` the validation share and ``a_i`` the run's share of bin i, each count plus
``PSI_PSEUDO_COUNT`` (0.5, Jeffreys) so that a bin empty on one side is finite and a small
reference (a body part with 24 validation images) is not read as certain about its empty bins. Conventional reading,
used here: below ``PSI_WARN`` (0.1) stable, ``PSI_WARN`` to ``PSI_ALARM`` (0.2) a warning, at or
above ``PSI_ALARM`` an alarm. PSI of two samples of one distribution is not 0: its expectation
is about ``(bins - 1) * (1/n + 1/n_ref)`` (the chi-square approximation, :func:`psi_noise_floor`),
so a group gets a verdict only with at least ``PSI_MIN_IMAGES`` scored images and a noise floor
of at most ``PSI_MAX_NOISE_FLOOR`` (0.1, which a small reference such as one body part's 135
validation images only allows from about 270 images on: 9 (1/n + 1/135) <= 0.1): with 200 images against the shipped
model's 428 validation images the floor is 0.066, and an alarm (0.2) on data drawn from the
validation distribution itself has a chance below 1 %.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any, Sequence

import numpy as np

__all__ = ["PSI_BINS", "PSI_WARN", "PSI_ALARM", "PSI_MIN_IMAGES", "PSI_MAX_NOISE_FLOOR", "PSI_PSEUDO_COUNT", "HISTOGRAM_BINS",
           "VALIDATION_DISTRIBUTION_FORMAT", "decile_edges", "bin_index", "bin_counts", "histogram_edges",
           "psi", "psi_noise_floor", "drift_level", "validation_distribution", "check_validation_distribution"]

PSI_BINS = 10           # bins at the validation deciles
PSI_WARN = 0.1
PSI_ALARM = 0.2
PSI_MIN_IMAGES = 200    # scored images a group needs before its PSI is read as a verdict
PSI_MAX_NOISE_FLOOR = 0.1  # ... and the most PSI that chance alone may be expected to give
PSI_PSEUDO_COUNT = 0.5  # added to every bin's count on both sides
HISTOGRAM_BINS = 20     # equal-width bins of [0, 1], for the plots
VALIDATION_DISTRIBUTION_FORMAT = "fracray-validation-distribution/1"

LEVELS = ("insufficient", "ok", "warn", "alarm")


def decile_edges(probabilities: Sequence[float], bins: int = PSI_BINS) -> list[float]:
    """Bin edges from 0 to 1 at the quantiles of ``probabilities`` (deciles for 10 bins); equal
    quantiles (ties) merge, so there may be fewer bins."""
    p = np.asarray(probabilities, dtype=np.float64)
    p = p[np.isfinite(p)]
    if p.size == 0:
        raise ValueError("No probabilities to take the deciles of")
    inner = np.quantile(p, np.arange(1, bins) / bins)
    inner = np.unique(np.round(inner[(inner > 0.0) & (inner < 1.0)], 6))
    return [0.0, *(float(v) for v in inner), 1.0]


def histogram_edges(bins: int = HISTOGRAM_BINS) -> list[float]:
    return [round(float(v), 6) for v in np.linspace(0.0, 1.0, bins + 1)]


def bin_index(probabilities, edges: Sequence[float]) -> np.ndarray:
    """The bin of each probability: bin i holds [edges[i], edges[i+1]); 1.0 falls in the last."""
    inner = np.asarray(edges[1:-1], dtype=np.float64)
    return np.searchsorted(inner, np.asarray(probabilities, dtype=np.float64), side="right")


def bin_counts(probabilities: Sequence[float], edges: Sequence[float]) -> list[int]:
    p = np.asarray(probabilities, dtype=np.float64)
    p = p[np.isfinite(p)]
    return np.bincount(bin_index(p, edges), minlength=len(edges) - 1).astype(int).tolist()


def psi(reference_counts: Sequence[float], counts: Sequence[float],
        pseudo_count: float = PSI_PSEUDO_COUNT) -> float | None:
    """Population Stability Index of ``counts`` against ``reference_counts`` (same bins, each
    count plus ``pseudo_count``); None when either has no images."""
    e = np.asarray(reference_counts, dtype=np.float64)
    a = np.asarray(counts, dtype=np.float64)
    if e.shape != a.shape:
        raise ValueError(f"PSI needs counts in the same bins: {e.shape} vs {a.shape}")
    if e.sum() <= 0 or a.sum() <= 0:
        return None
    e = (e + pseudo_count) / (e.sum() + pseudo_count * e.size)
    a = (a + pseudo_count) / (a.sum() + pseudo_count * a.size)
    return float(np.sum((a - e) * np.log(a / e)))


def psi_noise_floor(bins: int, n: int, n_reference: int) -> float | None:
    """The PSI expected between two samples of one distribution: (bins - 1)(1/n + 1/n_ref)."""
    if n <= 0 or n_reference <= 0:
        return None
    return (bins - 1) * (1.0 / n + 1.0 / n_reference)


def drift_level(value: float | None, n: int, min_images: int = PSI_MIN_IMAGES,
                noise_floor: float | None = None) -> str:
    """"insufficient" (no PSI, fewer than ``min_images`` scored images, or a ``noise_floor`` above
    ``PSI_MAX_NOISE_FLOOR``), else "ok", "warn" or "alarm"."""
    if value is None or n < min_images or (noise_floor is not None and noise_floor > PSI_MAX_NOISE_FLOOR):
        return "insufficient"
    return "alarm" if value >= PSI_ALARM else ("warn" if value >= PSI_WARN else "ok")


def _summary(p: np.ndarray, edges: list[float]) -> dict[str, Any]:
    hist = histogram_edges()
    return {"n": int(p.size), "mean": float(p.mean()) if p.size else None,
            "psi_counts": bin_counts(p, edges), "histogram_counts": bin_counts(p, hist)}


def validation_distribution(probabilities: Sequence[float], body_parts: Sequence[str | None] | None = None, *,
                            source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's own distribution of P(fracture) on its validation images: the PSI bins (at
    the deciles of these probabilities) with their counts, a 20-bin histogram, and the same
    counts per body part (where ``body_parts`` names one). ``source``: what produced it
    (models, data, split, command), recorded as given."""
    p = np.asarray(probabilities, dtype=np.float64)
    keep = np.isfinite(p)
    p = p[keep]
    edges = decile_edges(p)
    out: dict[str, Any] = {
        "format": VALIDATION_DISTRIBUTION_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": dict(source or {}),
        "statistic": {"name": "psi", "warn": PSI_WARN, "alarm": PSI_ALARM, "min_images": PSI_MIN_IMAGES,
                      "max_noise_floor": PSI_MAX_NOISE_FLOOR,
                      "pseudo_count": PSI_PSEUDO_COUNT},
        "psi_edges": edges, "histogram_edges": histogram_edges(),
        "overall": _summary(p, edges), "per_body_part": {},
    }
    if body_parts is not None:
        parts = np.asarray([str(b) if b not in (None, "") else "unknown" for b in body_parts], dtype=object)[keep]
        for part in sorted(set(parts.tolist())):
            out["per_body_part"][part] = _summary(p[parts == part], edges)
    return out


def check_validation_distribution(doc: dict[str, Any], where: str = "validation distribution") -> dict[str, Any]:
    """``doc`` if it is a validation distribution this code reads, else ValueError."""
    if not isinstance(doc, dict) or doc.get("format") != VALIDATION_DISTRIBUTION_FORMAT:
        raise ValueError(f"{where} is not a {VALIDATION_DISTRIBUTION_FORMAT} document "
                         f"(format {doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r})")
    edges = doc.get("psi_edges") or []
    counts = (doc.get("overall") or {}).get("psi_counts") or []
    if len(edges) < 2 or len(counts) != len(edges) - 1 or any(b <= a for a, b in zip(edges, edges[1:])) \
            or not math.isclose(edges[0], 0.0) or not math.isclose(edges[-1], 1.0):
        raise ValueError(f"{where}: psi_edges must rise from 0 to 1 with one count per bin")
    return doc
