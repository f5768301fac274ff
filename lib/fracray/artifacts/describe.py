"""What a bundle tells about itself: its name, the facts /v1/models and reports show, and
its threshold at an operating point. From the metadata alone (:class:`BundleMeta`)."""

from __future__ import annotations

from typing import Any

__all__ = ["bundle_name", "describe_bundle", "describe_localization", "resolve_threshold"]


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
            "localization": describe_localization(meta)}


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
    or a number in [0, 1]."""
    if operating_point is None or operating_point == "" or operating_point == "default":
        return float(meta.threshold)
    if isinstance(operating_point, (int, float)) or _is_number(operating_point):
        value = float(operating_point)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"threshold must be in [0, 1]. Got {value}")
        return value
    try:
        return float(meta.operating_points[operating_point]["threshold"])
    except KeyError:
        raise ValueError(f"Unknown operating point {operating_point!r}; this model has "
                         f"{sorted(meta.operating_points) + ['default']} or a number in [0, 1]") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False
