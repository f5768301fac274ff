"""Pieces shared by the command-line entry points."""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

from ..storage import StorageOptions


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "object storage",
        "s3:// URIs use the standard AWS environment and config files for credentials "
        "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles).",
    )
    group.add_argument("--endpoint-url", default=None,
                       help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (default: $AWS_ENDPOINT_URL_S3 or "
                            "$AWS_ENDPOINT_URL, else AWS)")
    group.add_argument("--region", default=None, help="S3 region (default: $AWS_REGION or the AWS config)")
    group.add_argument("--anonymous", action="store_true", help="read public buckets without credentials")


def storage_options_from_args(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions.from_env(args.endpoint_url, args.region, args.anonymous)


def format_counts_table(counts: list[dict[str, Any]]) -> str:
    """split x body part rows, label columns, as a plain-text table."""
    table: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    for row in counts:
        table[(row["split"], row["body_part"])][row["image_label"]] = row["images"]
    labels = sorted({row["image_label"] for row in counts}, reverse=True)
    names = {1: "abnormal", 0: "normal", -1: "unlabelled"}
    header = ["split", "body part"] + [names.get(label, str(label)) for label in labels] + ["total"]
    lines = [header]
    for (split, part), by_label in sorted(table.items()):
        values = [by_label.get(label, 0) for label in labels]
        lines.append([split, part] + [str(v) for v in values] + [str(sum(values))])
    total = [sum(by.get(label, 0) for by in table.values()) for label in labels]
    lines.append(["all", ""] + [str(v) for v in total] + [str(sum(total))])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)
