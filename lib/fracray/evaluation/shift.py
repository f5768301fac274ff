"""Robustness to what archives hold: the same labelled images, changed the way real archives
change them, scored by the same predictor; AUROC per variant beside clean.

Variants (each applied to the stored image at its own resolution, then encoded as PNG, or
JPEG for the re-compression variant, and decoded by the product's own path):

    clean, rot90, rot180, rot270, hflip, vflip     quarter turns and mirror images
    invert                                          grey scale inverted (MONOCHROME1 shown raw)
    gamma_0.6, gamma_1.6, contrast_0.6              exposure and windowing
    jpeg_q30                                        re-compressed at JPEG quality 30
    downscale_0.35                                  a copy at 35 % of the side, as thumbnails/exports
    canvas_text                                     the image at 70 % on a larger canvas with burnt-in text

The predictor runs in this process (no Ray): a few hundred validation images x 13 variants.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from .. import storage
from ..metrics.classification import binary_metrics

__all__ = ["VARIANTS", "apply_variant", "ShiftResult", "evaluate_shift"]

VARIANTS = ("clean", "rot90", "rot180", "rot270", "hflip", "vflip", "invert", "gamma_0.6", "gamma_1.6",
            "contrast_0.6", "jpeg_q30", "downscale_0.35", "canvas_text")


def apply_variant(gray: np.ndarray, name: str) -> tuple[bytes, str]:
    """An 8-bit grey image -> (encoded bytes, file suffix) of the variant ``name``."""
    import cv2

    if name not in VARIANTS:
        raise ValueError(f"Unknown variant {name!r}; choose from {VARIANTS}")
    img = np.asarray(gray, np.uint8)
    suffix = ".png"
    if name.startswith("rot"):
        img = np.rot90(img, k={"rot90": 1, "rot180": 2, "rot270": 3}[name])
    elif name == "hflip":
        img = img[:, ::-1]
    elif name == "vflip":
        img = img[::-1]
    elif name == "invert":
        img = 255 - img
    elif name.startswith("gamma_"):
        g = float(name.split("_")[1])
        img = np.round(255.0 * (img / 255.0) ** g).astype(np.uint8)
    elif name.startswith("contrast_"):
        c = float(name.split("_")[1])
        mean = float(img.mean())
        img = np.clip(np.round((img.astype(np.float32) - mean) * c + mean), 0, 255).astype(np.uint8)
    elif name == "downscale_0.35":
        h, w = img.shape
        img = cv2.resize(img, (max(16, round(w * 0.35)), max(16, round(h * 0.35))), interpolation=cv2.INTER_AREA)
    elif name == "canvas_text":
        h, w = img.shape
        small = cv2.resize(img, (round(w * 0.7), round(h * 0.7)), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((h, w), np.uint8)
        top, left = round(h * 0.22), round(w * 0.08)
        canvas[top:top + small.shape[0], left:left + small.shape[1]] = small
        scale = max(0.5, min(h, w) / 500)
        for text, (x, y) in (("R", (0.02, 0.08)), ("PORTABLE AP", (0.35, 0.1)), ("ID 0457 2024-03-11", (0.05, 0.98))):
            cv2.putText(canvas, text, (round(x * w), round(y * h)), cv2.FONT_HERSHEY_SIMPLEX, scale, 255,
                        max(1, round(2 * scale)), cv2.LINE_AA)
        img = canvas
    img = np.ascontiguousarray(img)
    if name == "jpeg_q30":
        ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 30])
        suffix = ".jpg"
    else:
        ok, data = cv2.imencode(".png", img)
    if not ok:
        raise ValueError(f"could not encode variant {name}")
    return data.tobytes(), suffix


@dataclasses.dataclass
class ShiftResult:
    """AUROC (and the other binary metrics) per variant, on the same images."""

    images: int
    per_variant: dict[str, dict[str, Any]]

    def table(self) -> str:
        clean = self.per_variant.get("clean", {}).get("auroc")
        lines = ["| variant | images | AUROC | AUROC - clean | sensitivity | specificity |", "|---|---|---|---|---|---|"]
        for name, m in self.per_variant.items():
            delta = "" if clean is None or m.get("auroc") is None else f"{m['auroc'] - clean:+.3f}"
            lines.append(f"| {name} | {m['n']} | {_f(m.get('auroc'))} | {delta} | {_f(m.get('sensitivity'))} | "
                         f"{_f(m.get('specificity'))} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def evaluate_shift(manifest, index_uri: str, *, variants: tuple[str, ...] = VARIANTS, storage_options=None,
                   limit: int | None = None, log: Callable[[str], None] = print) -> ShiftResult:
    """Score every labelled image of ``manifest`` in each variant with the model index's
    predictor (each model's own threshold). Images that do not decode are left out of every
    variant alike, so the variants compare the same images."""
    from ..imaging.decode import ImageRejected
    from ..imaging.preprocess import decode_for
    from ..inference.predictor import FracturePredictor

    predictor = FracturePredictor(index_uri, storage_options, check_scope=False)
    rows = [r for r in manifest.select(["image_uri", "image_label"]).to_pylist() if r["image_label"] in (0, 1)]
    if limit:
        rows = rows[:limit]
    grays, labels = [], []
    for r in rows:
        try:
            decoded = decode_for(storage.read_bytes(r["image_uri"], storage_options), predictor.decode_config,
                                 name=r["image_uri"])
        except (ImageRejected, storage.StorageError):
            continue
        pixels = np.asarray(decoded.pixels)
        if pixels.dtype != np.uint8:
            pixels = np.clip(np.round(pixels * (255.0 / max(float(pixels.max()), 1e-6))), 0, 255).astype(np.uint8)
        grays.append(pixels if pixels.ndim == 2 else pixels[..., 0])
        labels.append(int(r["image_label"]))
    if not grays:
        raise ValueError("No labelled image of the manifest decodes: nothing to measure")
    out: dict[str, dict[str, Any]] = {}
    for name in variants:
        probs, thresholds = [], []
        for k in range(0, len(grays), 16):
            payloads = []
            for g in grays[k:k + 16]:
                data, suffix = apply_variant(g, name)
                payloads.append(data)
            for res in predictor.predict_bytes(payloads):
                probs.append(res.get("fracture_probability", np.nan))
                thresholds.append(res.get("threshold", 0.5))
        p = np.asarray(probs, np.float64)
        ok = np.isfinite(p)
        y = np.asarray(labels)[ok]
        metrics = binary_metrics(y, p[ok], float(np.median(np.asarray(thresholds)[ok])) if ok.any() else 0.5)
        metrics["n"] = int(ok.sum())
        out[name] = metrics
        log(f"  {name}: AUROC {_f(metrics.get('auroc'))} on {metrics['n']} images")
    return ShiftResult(images=len(grays), per_variant=out)
