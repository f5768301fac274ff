"""train_all's report: report.md (the evaluation per body part, localisation, calibration and
each model's run) beside report.json and the plots."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .. import storage
from ..storage import StorageOptions
from ..training.orchestrate import ModelRun
from .training_plots import write_training_plots

__all__ = ["TrainingReport", "format_report", "write_training_report"]


@dataclasses.dataclass
class TrainingReport:
    """The training stage's result: every model's run and the composed graph's evaluation.
    ``evaluation`` is the evaluation summary (:func:`fracray.evaluation.graph.evaluate_graph`);
    ``plots`` (name -> URI) is filled in when the report is written."""

    dataset: str
    evaluated_split: str
    body_parts: list[str]
    skipped_body_parts: list[str]
    model_index: str
    evaluation: dict[str, Any]
    runs: dict[str, ModelRun]
    seconds: float
    plots: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def histories(self) -> dict[str, list[dict]]:
        return {name: run.history for name, run in self.runs.items() if run.history}

    @property
    def comparison(self) -> dict[str, ModelRun]:
        """The backbone comparison's runs (FracAtlas paper), if one was asked for."""
        return {name: run for name, run in self.runs.items() if run.comparison}

    def to_dict(self) -> dict[str, Any]:
        """report.json: the same keys as the report's sections."""
        return {"dataset": self.dataset, "evaluated_split": self.evaluated_split, "body_parts": self.body_parts,
                "skipped_body_parts": self.skipped_body_parts, "model_index": self.model_index,
                "evaluation": self.evaluation,
                "comparison": {name: {"valid": run.valid, "seconds": run.seconds, "size": run.size, "error": run.error}
                               for name, run in self.comparison.items()},
                "models": {name: run.to_dict() for name, run in self.runs.items()},
                "histories": {name: run.history for name, run in self.runs.items()},
                "seconds": self.seconds, "plots": self.plots}


def write_training_report(report: TrainingReport, output_uri: str, options: StorageOptions | None = None
                          ) -> dict[str, str]:
    """Write the plots, report.json and report.md under ``output_uri``; returns the plots
    (also set as ``report.plots``)."""
    report.plots = write_training_plots(report.evaluation, output_uri, options, histories=report.histories,
                                        runs=report.runs, comparison=report.comparison)
    storage.write_bytes(storage.join(output_uri, "report.json"),
                        json.dumps(report.to_dict(), indent=2, default=str).encode(), options)
    storage.write_bytes(storage.join(output_uri, "report.md"), format_report(report).encode(), options)
    return report.plots


def _fmt(v, digits=3):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _localization_lines(loc: dict[str, Any] | None, plots: dict[str, str]) -> list[str]:
    """Lesion-level figures and the example overlays, for the report."""
    if not loc:
        return []
    lines = []
    lesions = loc.get("lesions")
    if lesions:
        lines += ["", f"Detection (models that localise; {lesions['lesions']} fractures in {lesions['images']} "
                      f"images, findings from score {lesions['min_score']} up, against the release's boxes): "
                      f"AP30 {_fmt(lesions.get('ap30'))}, AP50 {_fmt(lesions.get('ap50'))}; lesion sensitivity "
                      f"{_fmt(lesions['lesion_sensitivity_at_0.5_fp'])} at 0.5 and "
                      f"{_fmt(lesions['lesion_sensitivity_at_1_fp'])} at 1 false-positive finding per image "
                      f"(FROC, hit = IoU >= 0.3); median top-finding / fracture area "
                      f"{_fmt(lesions.get('median_area_ratio'), 2)}"
                      + (" (FROC: froc.png)" if "froc" in plots else "") + "."]
        if lesions.get("per_body_part"):
            lines += ["", "| body part | fractures | images | AP30 | AP50 | sensitivity at 0.5 FP/image | at 1 FP/image |",
                      "|---|---|---|---|---|---|---|"]
            for part, m in lesions["per_body_part"].items():
                lines.append(f"| {part} | {m['lesions']} | {m['images']} | {_fmt(m.get('ap30'))} | {_fmt(m.get('ap50'))} "
                             f"| {_fmt(m['lesion_sensitivity_at_0.5_fp'])} | {_fmt(m['lesion_sensitivity_at_1_fp'])} |")
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


def format_report(report: TrainingReport) -> str:
    ev = report.evaluation
    lines = [f"# fracray training report: {report.dataset}", "",
             f"Evaluated on the {report.evaluated_split} split through router -> per-bone classifier: "
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
    if (ev.get("overall") or {}).get("ece") is not None:
        lines += ["", f"Calibration of the probabilities as served, on these {ev['overall']['n']} images (not the ones "
                      f"the temperature was fitted on): ECE of P(fracture) {_fmt(ev['overall'].get('fracture_ece'))} "
                      f"(10 equal-width bins), top-label ECE {_fmt(ev['overall']['ece'])}"
                      + (" (reliability diagram: reliability.png)" if "reliability" in report.plots else "") + "."]
    lines += _localization_lines(ev.get("localization"), report.plots)
    if "calibration" in report.plots:
        lines += ["", "Calibration (reliability before and after temperature scaling): calibration.png"]
    lines += ["", "| model | backbone | seconds | weights MB | validation AUROC / accuracy | threshold | temperature | "
              "ECE on validation, before -> after |", "|---|---|---|---|---|---|---|---|"]
    for name, run in sorted(report.runs.items()):
        if run.error:
            lines.append(f"| {name} | failed: {run.error[:80]} | | | | | | |")
            continue
        valid = run.valid or {}
        score = valid.get("auroc") if valid.get("auroc") is not None else valid.get("accuracy")
        cal = run.calibration or {}
        cal = dict(cal.get("valid") or cal, temperature=cal.get("temperature"))  # validation, not the fitting slice
        lines.append(f"| {name} | {run.model.get('name')} | {run.seconds} | "
                     f"{run.size.get('weights_mb')} | {_fmt(score)} | {_fmt(run.threshold)} | "
                     f"{_fmt(cal.get('temperature'))} | {_fmt(cal.get('ece_before'))} -> {_fmt(cal.get('ece_after'))} |")
    return "\n".join(lines) + "\n"
