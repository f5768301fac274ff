"""``ablation_table``: one markdown row per train_all run, read from its fracture model's bundle."""

from __future__ import annotations

import argparse
import sys

from .. import storage
from ..reports.ablation import ablation_row, format_ablation_table
from .common import add_storage_arguments, storage_options_from_args

__all__ = ["get_args_parser", "main"]


def get_args_parser(prog: str = "ablation_table.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Print the ablation table (AUROC, sensitivity at specificity 0.90/0.95, pointing game, lesion "
                    "sensitivity at 0.5 and 1 false-positive boxes per image, ECE on the validation split, training "
                    "minutes) for train_all output folders, from the bundles they wrote.",
        epilog="Example: ablation_table.py runs/recipe-cpu-s0 runs/no-map --model fracture_all")
    parser.add_argument("runs", nargs="+", help="train_all --output folders (local or s3://)")
    parser.add_argument("--model", default="fracture_all",
                        help="which model of each run (its folder under models/; default: %(default)s)")
    add_storage_arguments(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str = "ablation_table.py") -> int:
    args = get_args_parser(prog).parse_args(argv)
    options = storage_options_from_args(args)
    rows = []
    for run in args.runs:
        try:
            rows.append(ablation_row(run, model=args.model, options=options))
        except (FileNotFoundError, KeyError, ValueError, storage.StorageError) as exc:
            print(f"error: {run}: no readable models/{args.model}/bundle.json ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
            return 2
    print(format_ablation_table(rows), end="")
    return 0
