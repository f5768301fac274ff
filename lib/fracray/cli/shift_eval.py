"""``fracray shift-eval``: AUROC of a model index on the same labelled images as archives change
them (quarter turns, mirror images, inverted grey scale, gamma/contrast, JPEG quality 30,
downscaled copies, a canvas with burnt-in text), beside clean."""

from __future__ import annotations

import argparse
import json
import sys

from .. import storage
from ..artifacts.index import check_model_index
from ..artifacts.shipped import default_models
from ..data import adapters
from ..data.manifest import filter_rows
from ..evaluation.shift import VARIANTS, evaluate_shift
from .common import add_storage_arguments, storage_options_from_args

__all__ = ["get_args_parser", "main"]


def get_args_parser(prog: str = "shift_eval.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("``: ", 1)[1],
        epilog="Example: shift_eval.py --dataset fracatlas --data ../shared/data/fracatlas --split valid "
               "--output runs/shift")
    parser.add_argument("--models", default=None, help="model index URI (default: $FRACRAY_MODELS, else the shipped "
                                                       "FracAtlas model)")
    parser.add_argument("--dataset", required=True, choices=sorted(adapters.ADAPTERS))
    parser.add_argument("--data", required=True, help="URI of the labelled collection")
    parser.add_argument("--split", default="valid", help="split to use, or 'all' (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated variants (default: all: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images (default: all)")
    parser.add_argument("--output", default=None, help="folder for shift.json and shift.md")
    add_storage_arguments(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str = "shift_eval.py") -> int:
    parser = get_args_parser(prog)
    args = parser.parse_args(argv)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1. Got {args.limit}")
    options = storage_options_from_args(args)
    try:
        models = args.models or default_models()
        check_model_index(models, options)
        manifest = adapters.index_dataset(args.dataset, args.data, options).manifest
        if args.split and args.split != "all":
            manifest = filter_rows(manifest, split=args.split)
        print(f"Scoring {manifest.num_rows} images of {args.data} ({args.split}) in {len(variants)} variants with "
              f"{models} ...", file=sys.stderr)
        result = evaluate_shift(manifest, models, variants=variants, storage_options=options, limit=args.limit,
                                log=lambda line: print(line, file=sys.stderr))
    except (FileNotFoundError, ValueError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    doc = result.to_dict() | {"models": models, "dataset": args.dataset, "data": args.data, "split": args.split}
    if args.output:
        storage.write_bytes(storage.join(args.output, "shift.json"), json.dumps(doc, indent=2, default=str).encode(),
                            options)
        storage.write_bytes(storage.join(args.output, "shift.md"), (result.table() + "\n").encode(), options)
    print(result.table())
    return 0
