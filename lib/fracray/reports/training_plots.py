"""Training curves, confusion matrices, reliability diagrams, FROC curves and the backbone comparison, as PNG files."""

from __future__ import annotations

import math
from typing import Any

from .. import storage
from ..storage import StorageOptions
from .plots import _png, _pyplot

__all__ = ["write_training_plots"]


def _panels(count: int, panel_size: tuple[float, float]):
    """A grid of up to four panels a row for ``count`` plots; the spare cells are blank.
    Returns (pyplot, figure, the first ``count`` axes)."""
    plt = _pyplot()
    cols = min(4, max(1, count))
    rows = max(1, math.ceil(count / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.axis("off")
    return plt, fig, flat[:count]


def _curves(histories: dict[str, list[dict]]) -> bytes:
    names = [n for n, h in sorted(histories.items()) if h]
    plt, fig, axes = _panels(len(names), (4, 3))
    for ax, name in zip(axes, names):
        hist = histories[name]
        epochs = [h["epoch"] + 1 for h in hist]
        ax.plot(epochs, [h["train_loss"] for h in hist], "o-", label="train loss")
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=9)
        ax2 = ax.twinx()
        ax2.plot(epochs, [h["val_score"] for h in hist], "s--", color="tab:orange", label="validation score")
        ax2.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=7)
        ax2.legend(loc="upper right", fontsize=7)
    fig.suptitle("Training curves (validation score: AUROC for fracture models, accuracy for the router)",
                 fontsize=10)
    fig.tight_layout()
    return _png(fig, plt)


def _confusions(per_part: dict[str, dict]) -> bytes:
    parts = sorted(per_part)
    plt, fig, axes = _panels(len(parts), (3.2, 3))
    for ax, part in zip(axes, parts):
        m = per_part[part]
        grid = [[m["tn"], m["fp"]], [m["fn"], m["tp"]]]
        ax.imshow(grid, cmap="Blues")
        top = max(max(row) for row in grid) or 1
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(grid[i][j]), ha="center", va="center", fontsize=12,
                        color="white" if grid[i][j] > top / 2 else "black")
        ax.set_xticks([0, 1], ["pred normal", "pred abnormal"], fontsize=8)
        ax.set_yticks([0, 1], ["normal", "abnormal"], fontsize=8)
        ax.set_title(part, fontsize=10)
    fig.suptitle("Confusion matrices at each model's operating threshold", fontsize=10)
    fig.tight_layout()
    return _png(fig, plt)


def _comparison(comparison: dict[str, dict]) -> bytes:
    plt = _pyplot()
    names = sorted(comparison)
    scores = [((comparison[n].get("valid") or {}).get("auroc") or 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.9), 4))
    colors = ["tab:blue" if n.endswith("imagenet") else "tab:gray" for n in names]
    ax.bar(range(len(names)), scores, color=colors)
    ax.set_xticks(range(len(names)), [n.removeprefix("compare_") for n in names], rotation=45, ha="right",
                  fontsize=8)
    ax.set_ylabel("validation AUROC")
    ax.set_ylim(0, 1)
    ax.set_title("Backbones with (blue) and without (grey) ImageNet weights")
    fig.tight_layout()
    return _png(fig, plt)


def _reliability_axes(ax, title: str) -> None:
    """A reliability panel's frame: the unit square, confidence against fraction correct."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("confidence (max probability)", fontsize=8)
    ax.set_ylabel("fraction correct", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")


def _reliability(calibrations: dict[str, dict]) -> bytes:
    """Reliability diagrams: confidence against accuracy per bin, before and after
    temperature scaling, one panel per model (a calibrated model follows the diagonal)."""
    names = sorted(calibrations)
    plt, fig, axes = _panels(len(names), (3.2, 3.2))
    for ax, name in zip(axes, names):
        fitted = calibrations[name]
        # Show the validation split (images the temperature was not fitted on) where the bundle has it.
        cal = dict(fitted.get("valid") or fitted, temperature=fitted.get("temperature", 1.0))
        ax.plot([0, 1], [0, 1], ":", color="gray", linewidth=1)
        for key, style, label in (("reliability_before", "o--", "before"), ("reliability_after", "s-", "after")):
            bins = cal.get(key) or []
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style, markersize=3,
                    label=f"{label} (ECE {cal.get('ece_' + label, float('nan')):.3f})")
        _reliability_axes(ax, f"{name}, T = {cal.get('temperature', 1.0):.2f}")
    fitted_on = {(c.get("fitted_on") or "valid") for c in calibrations.values()}
    fig.suptitle("Calibration on the validation split: temperature scaling"
                 + (" fitted on a calibration slice of the training studies" if fitted_on == {"calibration_slice"}
                    else ""), fontsize=10)
    fig.tight_layout()
    return _png(fig, plt)


def _reliability_evaluated(evaluation: dict[str, Any]) -> bytes:
    """Reliability diagrams of an evaluation: the probabilities as served (temperature
    included) against the observed fraction correct, all images and each body part, with each
    bin's image count (a calibrated model follows the diagonal)."""
    blocks = [("all images", evaluation["overall"])]
    blocks += sorted((p, b) for p, b in (evaluation.get("per_body_part") or {}).items()
                     if b.get("reliability") and len(evaluation["per_body_part"]) > 1)
    plt, fig, axes = _panels(len(blocks), (3.2, 3.2))
    for ax, (name, block) in zip(axes, blocks):
        bins = block["reliability"]
        ax.plot([0, 1], [0, 1], ":", color="gray", linewidth=1)
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "s--", markersize=3,
                color="tab:gray", label=f"top label: ECE {block['ece']:.3f}")
        fracture = [b for b in block.get("fracture_reliability") or [] if b["n"]]
        if fracture:
            ax.plot([b["mean_probability"] for b in fracture], [b["fraction_fractured"] for b in fracture], "o-",
                    markersize=3, color="tab:blue", label=f"P(fracture): ECE {block['fracture_ece']:.3f}")
            for b in fracture:
                ax.annotate(str(b["n"]), (b["mean_probability"], b["fraction_fractured"]), fontsize=6,
                            xytext=(2, -8), textcoords="offset points")
        _reliability_axes(ax, f"{name} ({block['n']} images)")
        ax.set_xlabel("P(fracture) (blue) / top-label confidence (grey)", fontsize=8)
        ax.set_ylabel("fraction fractured / fraction correct", fontsize=8)
    fig.suptitle("Reliability of the evaluated probabilities, 10 equal-width bins (numbers: images per bin)",
                 fontsize=10)
    fig.tight_layout()
    return _png(fig, plt)


def _froc(lesions: dict[str, Any]) -> bytes:
    """FROC curves: lesion sensitivity against false-positive findings per image, all images
    and each body part, with the 0.5 and 1 FP/image points marked."""
    curves = [("all body parts" if lesions.get("per_body_part") else "all images", lesions)]
    curves += sorted((p, c) for p, c in (lesions.get("per_body_part") or {}).items() if c["lesions"])
    plt, fig, axes = _panels(len(curves), (3.6, 3.2))
    for ax, (name, c) in zip(axes, curves):
        fppi, sens = [0.0] + list(c["froc"]["fp_per_image"]), [0.0] + list(c["froc"]["sensitivity"])
        right = max(2.0, min(max(fppi), 8.0))
        ax.plot(fppi, sens, "-", drawstyle="steps-post", color="tab:blue", linewidth=1.5)
        for fp, key, colour in ((0.5, "lesion_sensitivity_at_0.5_fp", "tab:orange"),
                                (1.0, "lesion_sensitivity_at_1_fp", "tab:red")):
            ax.axvline(fp, color="gray", linestyle=":", linewidth=1)
            value = c.get(key)
            if value is not None:
                ax.plot([fp], [value], "o", color=colour, markersize=6, label=f"{value:.2f} at {fp:g} FP/image")
        ax.set_xlim(0, right)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("false-positive findings per image", fontsize=8)
        ax.set_ylabel("lesion sensitivity", fontsize=8)
        ax.set_title(f"{name}: {c['lesions']} fractures, {c['images']} images", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("FROC of the fracture-map findings", fontsize=10)
    fig.tight_layout()
    return _png(fig, plt)


def write_training_plots(evaluation: dict[str, Any], output_uri: str, options: StorageOptions | None, *,
                         histories: dict[str, list[dict]] | None = None, runs: dict[str, Any] | None = None,
                         comparison: dict[str, Any] | None = None) -> dict[str, str]:
    """The plots of an evaluation summary (confusion matrices, reliability, FROC) and, from a training run,
    its training curves, reliability diagrams and backbone comparison; returns name -> URI.
    ``runs`` and ``comparison`` map names to :class:`fracray.training.orchestrate.ModelRun`."""
    out = {}
    histories = {k: v for k, v in (histories or {}).items() if v}
    if histories:
        out["training_curves"] = storage.join(output_uri, "training_curves.png")
        storage.write_bytes(out["training_curves"], _curves(histories), options)
    per_part = evaluation["per_body_part"]
    if per_part:
        out["confusion_matrices"] = storage.join(output_uri, "confusion_matrices.png")
        storage.write_bytes(out["confusion_matrices"], _confusions(per_part), options)
    calibrations = {name: run.calibration for name, run in (runs or {}).items()
                    if (run.calibration or {}).get("reliability_after")}
    if calibrations:
        out["calibration"] = storage.join(output_uri, "calibration.png")
        storage.write_bytes(out["calibration"], _reliability(calibrations), options)
    if (evaluation.get("overall") or {}).get("reliability"):
        out["reliability"] = storage.join(output_uri, "reliability.png")
        storage.write_bytes(out["reliability"], _reliability_evaluated(evaluation), options)
    lesions = (evaluation.get("localization") or {}).get("lesions")
    if lesions and lesions.get("lesions"):
        out["froc"] = storage.join(output_uri, "froc.png")
        storage.write_bytes(out["froc"], _froc(lesions), options)
    if comparison:
        out["comparison"] = storage.join(output_uri, "backbone_comparison.png")
        storage.write_bytes(out["comparison"], _comparison({name: {"valid": run.valid, "seconds": run.seconds,
                                                                   "size": run.size, "error": run.error}
                                                            for name, run in comparison.items()}), options)
    return out
