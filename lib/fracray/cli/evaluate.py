"""``evaluate``: score a labelled dataset with the router -> classifier graph and report metrics."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .. import storage
from ..data import adapters
from ..data.manifest import filter_rows
from ..training.evaluation import pointing_game, score_manifest, summarize_predictions
from .common import add_storage_arguments, storage_options_from_args

__all__ = ["main", "build_parser", "run_evaluate"]


def run_evaluate(models: str, dataset: str, data: str, *, split: str | None, output: str | None,
                 options=None, pointing_tolerance: float = 0.0) -> dict[str, Any]:
    import ray

    from ..reports.training_plots import write_training_plots

    manifest = adapters.index_dataset(dataset, data, options).manifest
    if split and split != "all":
        manifest = filter_rows(manifest, split=split)
    if manifest.num_rows == 0:
        raise ValueError(f"No images in split {split!r} of {data}")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    preds = score_manifest(manifest, models, storage_options=options)
    summary = summarize_predictions(preds)
    summary["pointing_game"] = pointing_game(manifest, models, storage_options=options, tolerance=pointing_tolerance)
    summary.update(models=models, dataset=dataset, data=data, split=split or "all")
    if output:
        report = {"evaluation": summary, "histories": {}, "comparison": {}}
        summary["plots"] = write_training_plots(report, output, options)
        storage.write_bytes(storage.join(output, "evaluation.json"), json.dumps(summary, indent=2).encode(), options)
        import pyarrow as pa

        from ..data.manifest import write_table
        write_table(pa.table(preds), storage.join(output, "predictions.parquet"), options)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Score a labelled dataset through the router -> per-bone classifier graph named by a model "
                    "index, and print accuracy, sensitivity, specificity, F1, AUROC and study-level kappa, overall "
                    "and per body part, as JSON, and - where images carry fracture boxes (FracAtlas) - the Grad-CAM pointing game. With --output also writes evaluation.json, predictions.parquet "
                    "and confusion_matrices.png.",
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
    add_storage_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run_evaluate(args.models, args.dataset, args.data, split=args.split, output=args.output,
                               options=storage_options_from_args(args), pointing_tolerance=args.pointing_tolerance)
    except (FileNotFoundError, ValueError, KeyError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0
