"""What a bundle tells about itself: its name, the facts /v1/models and reports show, and
its threshold at an operating point. From the metadata alone (:class:`BundleMeta`)."""

from __future__ import annotations

import decimal

from typing import Any

__all__ = ["bundle_name", "describe_bundle", "describe_localization", "describe_training", "resolve_threshold", "parse_threshold"]


def bundle_name(uri: str, meta) -> str:
    """"fracture_wrist:efficientnet_lite0@2026-11-22T10:00:00+00:00": which bundle, backbone and version."""
    return f"{uri.rstrip('/').rsplit('/', 1)[-1]}:{meta.model['name']}@{meta.created}"


def describe_bundle(uri: str, meta) -> dict[str, Any]:
    """What /v1/models and reports show of a bundle (from its metadata alone)."""
    return {"name": bundle_name(uri, meta), "uri": uri, "task": meta.task, "backbone": meta.model["name"],
            "version": meta.created, "code_version": meta.code_version, "classes": meta.classes,
            "threshold": meta.threshold, "threshold_rule": meta.threshold_rule,
            "operating_points": meta.operating_points, "temperature": meta.temperature,
            "input_size": list(meta.preprocess["image_size"]), "intended_use": meta.intended_use,
            "validation": {k: v for k, v in (meta.metrics.get("valid") or {}).items()
                           if k in ("auroc", "sensitivity", "specificity", "accuracy", "n")},
            "tta_flip": bool((meta.inference or {}).get("tta_flip", False)),
            "data": {k: v for k, v in (meta.data or {}).items() if k != "localization"},  # that one: below
            "training": describe_training(meta),
            "localization": describe_localization(meta)}


def describe_training(meta) -> dict[str, Any]:
    """How the bundle was trained: its model's whole configuration (preprocessing overrides,
    strategy, epochs, sampling, seed...), the epochs it ran and how long it took; the job's
    full configuration stays in bundle.json (``training.run``)."""
    training = meta.training or {}
    return {"config": training.get("config"), "epochs_run": training.get("epochs_run"),
            "seconds": training.get("seconds")}


def describe_localization(meta) -> dict[str, Any]:
    """A bundle's localisation facts: whether it has a fracture map (and so returns findings),
    the localisation data it was trained with, how findings are made, and its validation
    pointing game and lesion sensitivities (the long FROC arrays left out)."""
    localizes = bool((meta.model or {}).get("localization", False))
    valid = meta.metrics.get("valid_localization") or {}
    return {"localizes": localizes,
            "heatmap": "fracture map" if localizes else "Grad-CAM",
            "data": (meta.data or {}).get("localization"),
            "findings": (meta.inference or {}).get("findings") if localizes else None,
            "validation": {k: v for k, v in valid.items() if k != "froc"} or None}


def resolve_threshold(meta, operating_point: str | float | None) -> float:
    """The bundle's threshold (None, "" or "default"), a named operating point from validation,
    or a number in [0, 1] (see :func:`parse_threshold`)."""
    if operating_point is None or operating_point == "" or operating_point == "default":
        return float(meta.threshold)
    value = parse_threshold(str(operating_point))
    if value is not None:
        return value
    try:
        return float(meta.operating_points[operating_point]["threshold"])
    except KeyError:
        raise ValueError(f"Unknown operating point {operating_point!r}; this model has "
                         f"{sorted(meta.operating_points) + ['default']} or a number in [0, 1]") from None


def parse_threshold(text: str) -> float | None:
    """A threshold written as a number: its value, or None when it is not a number at all (an
    operating point's name). A number outside [0, 1], not finite, or one that a double cannot
    represent (1e-400 underflows to 0) is an error, not silently another threshold."""
    try:
        exact = decimal.Decimal(text.strip())
    except (decimal.InvalidOperation, AttributeError):
        return None
    if not exact.is_finite() or not 0 <= exact <= 1:
        raise ValueError(f"A threshold must be a number in [0, 1]. Got {text!r}")
    value = float(exact)
    if exact != 0 and value == 0.0:
        raise ValueError(f"Threshold {text!r} underflows to 0 in double precision; use 0 or a number >= 1e-300")
    return value
