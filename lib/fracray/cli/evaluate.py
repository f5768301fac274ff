"""``evaluate``: score a labelled dataset with the router -> classifier graph and report metrics."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import pyarrow as pa

from .. import storage
from ..artifacts.bundle import read_bundle_meta
from ..artifacts.describe import resolve_threshold
from ..artifacts.index import check_model_index
from ..data import adapters
from ..data.manifest import filter_rows, write_table
from ..evaluation.graph import evaluate_graph
from ..imaging.regions import FINDINGS_TYPE
from ..raycluster import connect
from ..reports.training_plots import write_training_plots
from .common import add_storage_arguments, storage_options_from_args

__all__ = ["main", "build_parser", "run_evaluate"]


def run_evaluate(models: str, dataset: str, data: str, *, split: str | None, output: str | None,
                 options=None, pointing_tolerance: float = 0.0,
                 operating_point: str | float | None = None) -> dict[str, Any]:
    index = check_model_index(models, options)  # every bundle, before Ray starts or anything is written
    manifest = adapters.index_dataset(dataset, data, options).manifest
    if split and split != "all":
        manifest = filter_rows(manifest, split=split)
    if manifest.num_rows == 0:
        raise ValueError(f"No images in split {split!r} of {data}")
    if operating_point not in (None, "", "default"):  # refuse an unknown point before any work starts
        for uri in index.classifiers.values():
            resolve_threshold(read_bundle_meta(uri, options), operating_point)
    connect()
    preds, summary = evaluate_graph(manifest, models, storage_options=options, output_uri=output,
                                    operating_point=operating_point, pointing_tolerance=pointing_tolerance)
    summary.update(models=models, dataset=dataset, data=data, split=split or "all",
                   operating_point=operating_point or "default")
    if output:
        report = {"evaluation": summary, "histories": {}, "comparison": {}}
        summary["plots"] = write_training_plots(report, output, options)
        storage.write_bytes(storage.join(output, "evaluation.json"), json.dumps(summary, indent=2).encode(), options)
        types = {"findings": FINDINGS_TYPE, "width": pa.int32(), "height": pa.int32()}  # typed even when all empty
        write_table(pa.table({k: pa.array(v, types.get(k)) for k, v in preds.items()}),
                    storage.join(output, "predictions.parquet"), options)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Score a labelled dataset through the router -> per-bone classifier graph named by a model "
                    "index, and print accuracy, sensitivity, specificity, F1, AUROC and study-level kappa, overall "
                    "and per body part, as JSON, and - where images carry fracture boxes (FracAtlas) - the pointing "
                    "game (the fracture map's peak for models with one, else Grad-CAM's) and, for models with a "
                    "fracture map, lesion sensitivity at 0.5 and 1 false-positive findings per image (FROC). With "
                    "--output also writes evaluation.json, predictions.parquet (with each image's findings), "
                    "confusion_matrices.png, froc.png and examples/*.png (true positives, false positives and false "
                    "negatives with the heatmap, the fracture boxes in green and the findings in magenta).",
        epilog="Example: evaluate.py --models runs/latest/model_index.json --dataset mura "
               "--data runs/latest/synthetic-mura --split valid",
    )
    parser.add_argument("--models", required=True, help="model index URI (model_index.json or its folder)")
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
    add_storage_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run_evaluate(args.models, args.dataset, args.data, split=args.split, output=args.output,
                               options=storage_options_from_args(args), pointing_tolerance=args.pointing_tolerance,
                               operating_point=args.operating_point)
    except (FileNotFoundError, ValueError, KeyError, ConnectionError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0
