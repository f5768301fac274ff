"""``index_dataset``: a radiograph collection in any supported layout -> manifest + pictures."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from typing import Any

from .. import storage
from ..data import adapters
from ..data.manifest import IndexResult, make_rejects, summarize, write_table
from ..data.probe import probe_manifest, verify_images
from ..reports.plots import contact_sheet_png, size_histogram_png
from ..storage import StorageOptions
from .common import add_storage_arguments, format_counts_table, storage_options_from_args

__all__ = ["IndexConfig", "run_index", "main", "build_parser"]


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    dataset: str
    data: str
    output: str
    storage: StorageOptions = StorageOptions()
    probe: bool = True
    verify: bool = False
    pictures: bool = True
    split_seed: int = adapters.DEFAULT_SPLIT_SEED
    positive_classes: tuple[str, ...] = ()
    negative_classes: tuple[str, ...] = ()

    def output_paths(self) -> dict[str, str]:
        """The manifest, and beside it the rejects, summary and pictures."""
        if self.output.lower().endswith(".parquet"):
            folder = self.output.rsplit("/", 1)[0] if "/" in self.output else "."
            manifest = self.output
        else:
            folder, manifest = self.output, storage.join(self.output, "manifest.parquet")
        return {"manifest": manifest, "rejects": storage.join(folder, "rejects.parquet"),
                "summary": storage.join(folder, "summary.json"),
                "contact_sheet": storage.join(folder, "contact_sheet.png"),
                "size_histogram": storage.join(folder, "image_sizes.png")}


def run_index(config: IndexConfig, *, log=print) -> dict[str, Any]:
    """Index, probe, write everything; returns the summary that was written."""
    started = time.time()
    kwargs: dict[str, Any] = {}
    if config.dataset in ("fracatlas", "folder"):
        kwargs["split_seed"] = config.split_seed
    if config.dataset == "folder":
        kwargs.update(positive_classes=config.positive_classes, negative_classes=config.negative_classes)
    log(f"Indexing {config.dataset} layout at {config.data} ...")
    result: IndexResult = adapters.index_dataset(config.dataset, config.data, config.storage, **kwargs)
    manifest = result.manifest
    rejects = result.rejects.to_pylist()
    rejects = [(r["uri"], r["reason"], r["detail"]) for r in rejects]
    if config.probe and manifest.num_rows:
        log(f"Reading headers of {manifest.num_rows} images ...")
        manifest, unreadable = probe_manifest(
            manifest, config.storage, progress=lambda done, total: log(f"  headers {done}/{total}"))
        rejects += unreadable
    if config.verify and manifest.num_rows:
        log(f"Decoding all {manifest.num_rows} images to find truncated or corrupt files ...")
        already = {r[0] for r in rejects}
        uris = [u for u in manifest["image_uri"].to_pylist() if u not in already]
        rejects += verify_images(uris, config.storage, progress=lambda done, total: log(f"  decoded {done}/{total}"))
    paths = config.output_paths()
    write_table(manifest, paths["manifest"], config.storage)
    write_table(make_rejects(rejects), paths["rejects"], config.storage)
    counts = summarize(manifest)
    reasons = Counter(r[1] for r in rejects)
    summary = {
        "dataset": config.dataset, "data": config.data, "images": manifest.num_rows,
        "counts": counts, "rejects": dict(reasons), "rejected_files": len(rejects),
        "label_disagreements": result.label_disagreements, "notes": result.notes,
        "outputs": paths, "seconds": round(time.time() - started, 2),
    }
    if config.pictures and manifest.num_rows:
        log("Drawing the contact sheet and size histogram ...")
        storage.write_bytes(paths["contact_sheet"], contact_sheet_png(manifest, config.storage), config.storage)
        storage.write_bytes(paths["size_histogram"], size_histogram_png(manifest), config.storage)
    storage.write_bytes(paths["summary"], json.dumps(summary, indent=2).encode(), config.storage)

    log("")
    log(format_counts_table(counts))
    log("")
    log(f"{manifest.num_rows} images indexed; {len(rejects)} files rejected"
        + (": " + ", ".join(f"{n} {r}" for r, n in reasons.most_common()) if rejects else ""))
    for note in result.notes:
        log(f"note: {note}")
    log(f"Manifest: {paths['manifest']}")
    if config.pictures and manifest.num_rows:
        log(f"Look at the data: {paths['contact_sheet']}  {paths['size_histogram']}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="index_dataset.py",
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = IndexConfig(
        dataset=args.dataset, data=args.data, output=args.output, storage=storage_options_from_args(args),
        probe=not args.no_probe, verify=args.verify, pictures=not args.no_pictures, split_seed=args.split_seed,
        positive_classes=tuple(args.positive_class), negative_classes=tuple(args.negative_class),
    )
    try:
        run_index(config)
    except (FileNotFoundError, ValueError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
