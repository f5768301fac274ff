"""``publish_results``: a score_archive run's results back into the PACS, as DICOM.

    score_archive.py --input 'dicomweb://pacs:8042/dicom-web?StudyDate=20261124&ModalitiesInStudy=CR%5CDX' \\
                     --models runs/latest/model_index.json --output runs/scores-20261124
    publish_results.py --scores runs/scores-20261124

Each study gets a Structured Report (TID 1500: finding, probability, threshold, model, regions)
and an overlay Secondary Capture per scored image, in new series of the same study.

One study that cannot be published (its images gone from the PACS, results the PACS refuses) is
reported with its reason, listed in <scores>/publish_failures.json, and the others are published
(exit status 1). Run the same command again once the cause is fixed: studies whose results the
PACS holds already are skipped, the missing ones published (--force: publish every study again).
"""

from __future__ import annotations

import argparse
import sys

from .. import dicomweb, storage
from ..pacs.publish import publish_scores
from .common import add_storage_arguments, storage_options_from_args

__all__ = ["get_args_parser", "main"]


def get_args_parser(prog: str = "publish_results.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="DICOMweb credentials: FRACRAY_DICOMWEB_TOKEN (bearer) or FRACRAY_DICOMWEB_USER/"
               "FRACRAY_DICOMWEB_PASSWORD; never in URIs. Publishing again replaces the same instances.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True, help="the score_archive output folder (local or s3://)")
    parser.add_argument("--pacs", default=None,
                        help="DICOMweb service to store into, e.g. dicomweb://pacs:8042/dicom-web (default: the one "
                             "the scored images came from)")
    parser.add_argument("--no-overlays", dest="overlays", action="store_false",
                        help="store the Structured Reports only, not the overlay images")
    parser.add_argument("--force", action="store_true",
                        help="publish every study again, also those whose results the PACS already holds")
    add_storage_arguments(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str = "publish_results.py") -> int:
    args = get_args_parser(prog).parse_args(argv)
    if args.pacs is not None and not dicomweb.is_dicomweb(args.pacs):
        print(f"error: --pacs must be a dicomweb:// or dicomwebs:// URI. Got {args.pacs!r}", file=sys.stderr)
        return 2
    try:
        summary = publish_scores(args.scores, args.pacs, options=storage_options_from_args(args),
                                 overlays=args.overlays, force=args.force)
    except (ValueError, FileNotFoundError, OSError, storage.StorageError) as exc:  # DicomWebError is an OSError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if summary.failed else 0
