"""The ablation table: one row per training run, read from the bundles it wrote.

Every figure comes from the fracture model's own ``bundle.json`` (validation split,
calibration slice held out of training), so rows made by the same ``train_all``
command on the same data are comparable and nothing is copied by hand.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .. import storage
from ..storage import StorageOptions

__all__ = ["AblationRow", "ablation_row", "format_ablation_table"]


@dataclasses.dataclass(frozen=True)
class AblationRow:
    run: str
    recipe: str
    auroc: float | None
    sens_at_spec90: float | None
    sens_at_spec95: float | None
    pointing_game: float | None
    pointing_centre_baseline: float | None
    lesion_sens_05fp: float | None
    lesion_sens_1fp: float | None
    ece_valid: float | None
    accuracy_at_threshold: float | None
    accuracy_high_specificity: float | None
    majority_baseline: float | None
    train_minutes: float | None


def _recipe(config: dict[str, Any], run: dict[str, Any]) -> str:
    pre = f"{config['model']} @{config.get('image_size') or 'default'}px"
    parts = [pre, config["strategy"]]
    if config.get("head", "linear") != "linear":
        parts.append(f"head {config['head']}")
    if config.get("enhancement", "none") != "none":
        parts.append(config["enhancement"] + (f" {config['sharpen_factor']}" if config["enhancement"] ==
                                              "laplacian_sharpen" else ""))
    if config.get("normalization") not in (None, "imagenet"):
        parts.append(f"{config['normalization']} normalisation")
    if config.get("localization"):
        parts.append("fracture map")
    if config.get("negatives_per_positive"):
        parts.append(f"{config['negatives_per_positive']:g} neg/pos per epoch")
    if config.get("balance_positives"):
        parts.append("positives balanced by augmented copies")
    if config.get("tta_flip"):
        parts.append("flip TTA")
    if (run.get("training") or {}).get("exclude_hardware"):
        parts.append("hardware-free subset")
    parts.append(f"{config['epochs']} epochs")
    if config.get("seed"):
        parts.append(f"seed {config['seed']}")
    return ", ".join(parts)


def ablation_row(run_uri: str, *, model: str = "fracture_all", options: StorageOptions | None = None) -> AblationRow:
    """The row for one train_all output folder (its ``models/<model>/bundle.json``)."""
    meta = json.loads(storage.read_bytes(storage.join(run_uri, "models", model, "bundle.json"), options))
    metrics, config = meta["metrics"], meta["training"]["config"]
    valid = metrics.get("valid") or {}
    at = {round(p["specificity_target"], 2): p.get("sensitivity") for p in metrics.get("valid_operating_points", [])}
    loc = dict(metrics.get("valid_localization") or {})
    if loc.get("pointing_game") is None:
        # A model without a fracture map: the run's report has the Grad-CAM pointing game.
        try:
            game = json.loads(storage.read_bytes(storage.join(run_uri, "report.json"), options))["evaluation"]
            game = (game.get("pointing_game") or {}).get("overall") or {}
            loc.update(pointing_game=game.get("hit_rate"), pointing_centre_baseline=game.get("center_baseline"))
        except (storage.StorageError, FileNotFoundError, KeyError, ValueError):
            pass
    cal = meta.get("calibration") or {}
    ece = (cal.get("valid") or {}).get("ece_after", cal.get("ece_after"))
    n, positives = valid.get("n"), (valid.get("tp") or 0) + (valid.get("fn") or 0)
    spec_point = (meta.get("operating_points") or {}).get("high_specificity") or {}
    acc_spec = None
    if n and spec_point.get("sensitivity") is not None and spec_point.get("specificity") is not None:
        acc_spec = (spec_point["sensitivity"] * positives + spec_point["specificity"] * (n - positives)) / n
    return AblationRow(
        run=run_uri.rstrip("/").rsplit("/", 1)[-1], recipe=_recipe(config, meta["training"].get("run") or {}),
        auroc=valid.get("auroc"), sens_at_spec90=at.get(0.9), sens_at_spec95=at.get(0.95),
        pointing_game=loc.get("pointing_game"), pointing_centre_baseline=loc.get("pointing_centre_baseline"),
        lesion_sens_05fp=loc.get("lesion_sensitivity_at_0.5_fp"), lesion_sens_1fp=loc.get("lesion_sensitivity_at_1_fp"),
        ece_valid=ece, accuracy_at_threshold=valid.get("accuracy"), accuracy_high_specificity=acc_spec,
        majority_baseline=(1 - positives / n) if n else None,
        train_minutes=round(meta["training"]["seconds"] / 60, 1) if meta["training"].get("seconds") else None)


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_ablation_table(rows: list[AblationRow]) -> str:
    lines = ["| run | recipe | AUROC | sens @ spec 0.90 | sens @ spec 0.95 | pointing game (centre) | "
             "lesion sens @ 0.5 / 1 FP per image | ECE (valid) | accuracy: threshold / high_specificity (all-negative) | "
             "training min |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.run} | {r.recipe} | {_f(r.auroc)} | {_f(r.sens_at_spec90, 2)} | {_f(r.sens_at_spec95, 2)} | "
                     f"{_f(r.pointing_game, 2)} ({_f(r.pointing_centre_baseline, 2)}) | "
                     f"{_f(r.lesion_sens_05fp, 2)} / {_f(r.lesion_sens_1fp, 2)} | {_f(r.ece_valid)} | "
                     f"{_f(r.accuracy_at_threshold, 2)} / {_f(r.accuracy_high_specificity, 2)} ({_f(r.majority_baseline, 2)}) | "
                     f"{_f(r.train_minutes, 1)} |")
    return "\n".join(lines) + "\n"
