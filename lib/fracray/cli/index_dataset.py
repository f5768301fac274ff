"""``fracray index`` / ``index_dataset.py``: arguments -> :class:`fracray.jobs.index.IndexConfig`."""

from __future__ import annotations

import argparse
import sys

from .. import storage
from ..data import adapters
from ..jobs.index import IndexConfig, run_index
from .common import add_storage_arguments, storage_options_from_args

__all__ = ["main", "build_parser"]


def build_parser(prog: str = "index_dataset.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Index a radiograph collection into one manifest (Parquet) that training, evaluation and scoring read. "
            "Writes manifest.parquet, rejects.parquet (every file not indexed, with the reason), summary.json, "
            "contact_sheet.png (a few images per body part x label) and image_sizes.png beside it, and prints "
            "counts per split x body part x label."
        ),
        epilog=(
            "Layouts: mura = MURA v1.1 as released (folder containing MURA-v1.1/); fracatlas = FracAtlas as "
            "released (folder containing FracAtlas/); folder = <split>/<class>/*.png|jpg|dcm or <class>/*; "
            "manifest = your CSV/Parquet with an image_uri (or path) column and optional label, body_part, "
            "split, patient_id, study_id columns.\n"
            "Examples:\n"
            "  index_dataset.py --dataset fracatlas --data ../shared/data/fracatlas --output runs/fracatlas-index\n"
            "  index_dataset.py --dataset mura --data s3://bucket/mura --output s3://bucket/mura-index "
            "--endpoint-url http://minio:9000"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, choices=sorted(adapters.ADAPTERS), help="layout of --data")
    parser.add_argument("--data", required=True, help="URI of the collection: a local path or s3://bucket/prefix")
    parser.add_argument("--output", required=True,
                        help="output folder URI (or a .parquet file URI for the manifest itself)")
    parser.add_argument("--no-probe", action="store_true",
                        help="skip reading image headers (width/height/mode stay empty)")
    parser.add_argument("--verify", action="store_true",
                        help="also decode every image fully, so truncated/corrupt files are listed in rejects "
                             "now rather than during training or scoring")
    parser.add_argument("--no-pictures", action="store_true", help="skip the contact sheet and size histogram")
    parser.add_argument("--split-seed", type=int, default=adapters.DEFAULT_SPLIT_SEED,
                        help="seed of the 80/11.5/8.5 split for images no split file covers (default %(default)s)")
    parser.add_argument("--positive-class", action="append", default=[], metavar="NAME",
                        help="folder layout: an extra class folder name meaning fractured/abnormal")
    parser.add_argument("--negative-class", action="append", default=[], metavar="NAME",
                        help="folder layout: an extra class folder name meaning normal")
    add_storage_arguments(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str = "index_dataset.py") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        config = IndexConfig(
            dataset=args.dataset, data=args.data, output=args.output, storage=storage_options_from_args(args),
            probe=not args.no_probe, verify=args.verify, pictures=not args.no_pictures, split_seed=args.split_seed,
            positive_classes=tuple(args.positive_class), negative_classes=tuple(args.negative_class),
        )
        run_index(config)
    except (FileNotFoundError, ValueError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
