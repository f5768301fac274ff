"""``fracray evaluate`` / ``evaluate.py``: arguments -> :class:`fracray.jobs.evaluate.EvaluateConfig`."""

from __future__ import annotations

import argparse
import json
import sys

from .. import storage
from ..artifacts.shipped import default_models
from ..data import adapters
from ..jobs.evaluate import EvaluateConfig, run_evaluate
from .common import add_engine_arguments, add_storage_arguments, add_verbose_argument, storage_options_from_args

__all__ = ["main", "build_parser", "config_from_args"]


def build_parser(prog: str = "evaluate.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Score a labelled dataset through the router -> per-bone classifier graph named by a model "
                    "index, and print accuracy, sensitivity, specificity, F1, AUROC, expected calibration error (ECE) and "
                    "study-level kappa, overall "
                    "and per body part, as JSON, and - where images carry fracture boxes (FracAtlas) - the pointing "
                    "game (the fracture map's peak for models with one, else Grad-CAM's) and, for models with a "
                    "fracture map, lesion sensitivity at 0.5 and 1 false-positive findings per image (FROC). With "
                    "--output also writes evaluation.json, predictions.parquet (with each image's findings), "
                    "confusion_matrices.png, reliability.png (reliability diagram), froc.png and examples/*.png (true positives, false positives and false "
                    "negatives with the heatmap, the fracture boxes in green and the findings in magenta).",
        epilog="Example: evaluate.py --models runs/latest/model_index.json --dataset mura "
               "--data runs/latest/synthetic-mura --split valid",
    )
    parser.add_argument("--models", default=None,
                        help="model index URI (model_index.json or its folder; default: $FRACRAY_MODELS, else the "
                             "shipped FracAtlas model in models/fracatlas)")
    parser.add_argument("--dataset", required=True, choices=sorted(adapters.ADAPTERS))
    parser.add_argument("--data", required=True, help="URI of the labelled collection")
    parser.add_argument("--split", default="valid", help="split to score, or 'all' (default: %(default)s)")
    parser.add_argument("--output", default=None, help="folder URI for the report files")
    parser.add_argument("--pointing-tolerance", type=float, default=0.0,
                        help="pointing game: grow each fracture box by this fraction of the image on every side "
                             "(default: %(default)s, the peak must lie inside the box)")
    parser.add_argument("--operating-point", default=None,
                        help="label at a named operating point of the models (e.g. high_sensitivity, "
                             "high_specificity, 'specificity>=0.90') or a number in [0, 1] (default: each model's "
                             "own threshold)")
    add_engine_arguments(parser, where="the evaluation's predictor actors")
    add_storage_arguments(parser)
    add_verbose_argument(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    return EvaluateConfig(models=args.models or default_models(), dataset=args.dataset, data=args.data, split=args.split,
                          output=args.output, storage=storage_options_from_args(args),
                          pointing_tolerance=args.pointing_tolerance, operating_point=args.operating_point,
                          engine=args.engine, precision=args.precision)


def main(argv: list[str] | None = None, *, prog: str = "evaluate.py") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        result = run_evaluate(config_from_args(args), log=lambda line: print(line, file=sys.stderr))
    except (FileNotFoundError, ValueError, KeyError, ConnectionError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.summary, indent=2, default=str))
    return 0
