"""train_all's report: report.md (the evaluation per body part, localisation, calibration and
each model's run) beside report.json and the plots."""

from __future__ import annotations

import json
from typing import Any

from .. import storage
from ..storage import StorageOptions
from .training_plots import write_training_plots

__all__ = ["format_report", "write_training_report"]


def write_training_report(report: dict[str, Any], output_uri: str, options: StorageOptions | None = None
                          ) -> dict[str, str]:
    """Write the plots, report.json and report.md under ``output_uri``; returns the plots
    (also set as ``report["plots"]``)."""
    report["plots"] = write_training_plots(report, output_uri, options)
    storage.write_bytes(storage.join(output_uri, "report.json"), json.dumps(report, indent=2, default=str).encode(),
                        options)
    storage.write_bytes(storage.join(output_uri, "report.md"), format_report(report).encode(), options)
    return report["plots"]


def _fmt(v, digits=3):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _localization_lines(loc: dict[str, Any] | None, plots: dict[str, str]) -> list[str]:
    """Lesion-level figures and the example overlays, for the report."""
    if not loc:
        return []
    lines = []
    lesions = loc.get("lesions")
    if lesions:
        lines += ["", f"Lesion level (models with a fracture map; {lesions['lesions']} fractures in {lesions['images']} "
                      f"images, findings from score {lesions['min_score']} up): lesion sensitivity "
                      f"{_fmt(lesions['lesion_sensitivity_at_0.5_fp'])} at 0.5 and "
                      f"{_fmt(lesions['lesion_sensitivity_at_1_fp'])} at 1 false-positive finding per image"
                      + (" (FROC: froc.png)" if "froc" in plots else "") + "."]
        if lesions.get("per_body_part"):
            lines += ["", "| body part | fractures | images | sensitivity at 0.5 FP/image | at 1 FP/image |",
                      "|---|---|---|---|---|"]
            for part, m in lesions["per_body_part"].items():
                lines.append(f"| {part} | {m['lesions']} | {m['images']} | {_fmt(m['lesion_sensitivity_at_0.5_fp'])} | "
                             f"{_fmt(m['lesion_sensitivity_at_1_fp'])} |")
    elif loc.get("models_with_fracture_map"):
        lines += ["", "Lesion level: no evaluated image has fracture boxes to score the findings against."]
    if loc.get("examples"):
        lines += ["", "Examples at the operating threshold (heatmap; fracture boxes green, findings magenta with "
                      "their scores):", ""]
        for ex in loc["examples"]:
            lines.append(f"- {ex['kind'].upper()} examples/{ex['png'].rsplit('/', 1)[-1]}: "
                         f"P(fracture) {_fmt(ex['fracture_probability'])} "
                         f"(threshold {_fmt(ex['threshold'])}), {ex['findings']} finding(s), "
                         f"{ex['fracture_boxes']} fracture box(es), {ex['heatmap']}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    ev = report["evaluation"]
    lines = [f"# fracray training report: {report['dataset']}", "",
             f"Evaluated on the {report['evaluated_split']} split through router -> per-bone classifier: "
             f"{ev['scored']} images scored, rejected: {ev['rejected'] or 'none'}"
             + (f"; router accuracy {_fmt(ev.get('router_accuracy'))}" if ev.get("router_accuracy") is not None else ""),
             "", "| body part | TP | FN | FP | TN | accuracy | precision | sensitivity | specificity | F1 | AUROC | "
             "study kappa |", "|" + "---|" * 12]
    rows = list(ev["per_body_part"].items()) + ([("all", ev["overall"])] if ev["overall"] else [])
    for part, m in rows:
        lines.append(f"| {part} | {m['tp']} | {m['fn']} | {m['fp']} | {m['tn']} | {_fmt(m['accuracy'])} | "
                     f"{_fmt(m['precision'])} | {_fmt(m['sensitivity'])} | {_fmt(m['specificity'])} | {_fmt(m['f1'])} | "
                     f"{_fmt(m['auroc'])} | {_fmt(m.get('study_kappa'))} |")
    game = ev.get("pointing_game")
    if game:
        heatmap = game.get("method", "Grad-CAM peak").split(" peak")[0]
        lines += ["", f"{heatmap} pointing game ({game['overall']['images']} fractured images with boxes): the heatmap "
                      f"peak falls inside a fracture box for {_fmt(game['overall']['hit_rate'])} of them "
                      f"(image-centre baseline {_fmt(game['overall']['center_baseline'])})."]
    lines += _localization_lines(ev.get("localization"), report.get("plots") or {})
    if "calibration" in report.get("plots", {}):
        lines += ["", "Calibration (reliability before and after temperature scaling): calibration.png"]
    lines += ["", "| model | backbone | seconds | weights MB | validation AUROC / accuracy | threshold | temperature | "
              "ECE on validation, before -> after |", "|---|---|---|---|---|---|---|---|"]
    for name, m in sorted(report["models"].items()):
        if m.get("error"):
            lines.append(f"| {name} | failed: {m['error'][:80]} | | | | | | |")
            continue
        valid = m.get("valid") or {}
        score = valid.get("auroc") if valid.get("auroc") is not None else valid.get("accuracy")
        cal = m.get("calibration") or {}
        cal = dict(cal.get("valid") or cal, temperature=cal.get("temperature"))  # validation, not the fitting slice
        lines.append(f"| {name} | {(m.get('model') or {}).get('name')} | {m['seconds']} | "
                     f"{(m.get('size') or {}).get('weights_mb')} | {_fmt(score)} | {_fmt(m.get('threshold'))} | "
                     f"{_fmt(cal.get('temperature'))} | {_fmt(cal.get('ece_before'))} -> {_fmt(cal.get('ece_after'))} |")
    return "\n".join(lines) + "\n"
