"""``fracray check-scope`` / ``check_scope.py``: arguments -> :class:`fracray.evaluation.scope_check.ScopeCheckConfig`,
then :func:`fracray.evaluation.scope_check.run_scope_check`, and its table printed."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..evaluation.scope_check import ScopeCheckConfig, run_scope_check

__all__ = ["get_args_parser", "main"]


def get_args_parser(prog: str = "check_scope.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Measure the out-of-scope check (photos, CT/MR/US/NM and other DICOM, chest films, blank "
                    "images) against radiographs that must stay in scope. The out-of-scope set comes from "
                    "installed packages (scikit-image's sample images, pydicom's test corpus) and synthetic "
                    "non-radiographs; the in-scope set is the FracAtlas valid split and the project's synthetic "
                    "radiographs. Prints one row per group: images, how many were refused and why.",
        epilog="Example: check_scope.py --fracatlas ../shared/data/fracatlas --output runs/scope",
    )
    parser.add_argument("--fracatlas", default=ScopeCheckConfig.fracatlas,
                        help="FracAtlas root (the folder holding FracAtlas/); its valid split is the real "
                             "in-scope set. Left out when not given")
    parser.add_argument("--limit", type=int, default=ScopeCheckConfig.limit, help="at most this many FracAtlas images")
    parser.add_argument("--output", default=ScopeCheckConfig.output,
                        help="folder for scope_check.json and scope_check.md")
    parser.add_argument("--seed", type=int, default=ScopeCheckConfig.seed,
                        help="seed of the synthetic images (default: %(default)s)")
    parser.add_argument("--show-passed", action="store_true",
                        help="also list the out-of-scope inputs that were not refused")
    return parser


def main(argv: list[str] | None = None, *, prog: str = "check_scope.py") -> int:
    args = get_args_parser(prog).parse_args(argv)
    if args.fracatlas and not os.path.isdir(args.fracatlas):
        print(f"error: --fracatlas {args.fracatlas} is not a folder", file=sys.stderr)
        return 2
    started = time.time()
    result = run_scope_check(ScopeCheckConfig(fracatlas=args.fracatlas, output=args.output, limit=args.limit,
                                              seed=args.seed),
                             log=lambda m: print(m, file=sys.stderr))
    print(result.format_table())
    print(f"\nout of scope: {result.out_of_scope_refused}/{result.out_of_scope_total} refused "
          f"({result.out_of_scope_refused_by_scope_check} by the scope check, the rest by the decoder); "
          f"in scope: {result.in_scope_wrongly_refused}/{result.in_scope_total} wrongly refused as out of scope, "
          f"{result.in_scope_decoder_rejects} decoder rejects ({time.time() - started:.0f} s)")
    for row in result.table:
        for item in row["wrongly_refused_images"]:
            print(f"  wrongly refused [{row['group']}]: {item}")
        if args.show_passed:
            for name in row["passed"]:
                print(f"  passed [{row['group']}]: {name}")
    return 0
