"""``fracray score`` / ``score_archive.py``: arguments -> :class:`fracray.scoring.archive.ScoreConfig`,
then :func:`fracray.jobs.score.run_score`.

Locally: ``python pipelines/score_archive.py --input /archive --models runs/latest --output scores/``;
on a cluster: ``ray job submit --working-dir . -- python pipelines/score_archive.py --input s3://... ``.
"""

from __future__ import annotations

import argparse
import json
import sys

from .. import storage
from ..artifacts.shipped import default_models
from ..data import adapters
from ..jobs.score import ScoreConfig, format_scoring_summary, run_score
from .common import add_engine_arguments, add_storage_arguments, add_verbose_argument, storage_options_from_args

__all__ = ["main", "build_parser", "config_from_args"]


def build_parser(prog: str = "score_archive.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Score an archive of radiographs through the router -> per-bone fracture classifiers named by a "
                    "model index. Streams the images with Ray Data through a pool of predictor actors (GPUs when the "
                    "cluster has them) and writes, under --output: images/part-*.parquet (one row per input image: "
                    "URI, study, body part and its probability, fracture probability, label, threshold, model "
                    "versions, status, error), studies.parquet (study level: mean probability over the study's "
                    "images) and summary.json. Every input appears exactly once, scored or rejected with a reason. "
                    "Interrupted? Run the same command again: finished chunks are kept and the rest is scored.",
        epilog="Example: score_archive.py --input s3://hospital-pacs-export/2025/ --models "
               "s3://models/mura-r1/model_index.json --output s3://scores/2025/",
    )
    parser.add_argument("--input", required=True, help="archive URI: a folder tree of JPEG/PNG/DICOM, a MURA or "
                                                       "FracAtlas release, or a CSV/Parquet manifest")
    parser.add_argument("--models", default=None,
                        help="model index URI (model_index.json or its folder; default: $FRACRAY_MODELS, else the "
                             "shipped FracAtlas model in models/fracatlas)")
    parser.add_argument("--output", required=True, help="output folder URI (reuse it to resume)")
    parser.add_argument("--layout", default="auto", choices=["auto", *sorted(adapters.ADAPTERS)],
                        help="archive layout (default: detected: MURA, FracAtlas, manifest file, else a plain tree)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="images per resumable output part, used exactly (default: 256, fewer for archives "
                             "under 4,096 images so that there are at least 16 parts to spread over the actors)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="predictor actors (default: one per GPU, or one per CPU without GPUs)")
    parser.add_argument("--gpus-per-actor", type=float, default=None,
                        help="GPUs per predictor actor (default: 1 if the cluster has GPUs, else 0)")
    parser.add_argument("--body-part-from-layout", action="store_true",
                        help="use the body part the layout states (e.g. MURA's XR_WRIST folders) instead of the router")
    parser.add_argument("--operating-point", default=None,
                        help="threshold to label at: a named operating point of the models (e.g. 'sensitivity>=0.95') "
                             "or a number in [0, 1] (default: each model's own threshold)")
    add_engine_arguments(parser)
    add_storage_arguments(parser)
    add_verbose_argument(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    return ScoreConfig(input=args.input, models=args.models or default_models(), output=args.output, layout=args.layout,
                       chunk_size=args.chunk_size, batch_size=args.batch_size, concurrency=args.concurrency,
                       gpus_per_actor=args.gpus_per_actor, body_part_from_layout=args.body_part_from_layout,
                       operating_point=args.operating_point, engine=args.engine, precision=args.precision,
                       storage=storage_options_from_args(args))


def main(argv: list[str] | None = None, *, prog: str = "score_archive.py") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        summary = run_score(config_from_args(args))
    except (FileNotFoundError, ValueError, ConnectionError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary.to_dict(), indent=2))
    print("\n" + format_scoring_summary(summary))
    return 0
