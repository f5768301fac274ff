"""The ``index`` job: a radiograph collection in any supported layout -> manifest, rejects, pictures."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter, defaultdict
from typing import Any, Callable

from .. import storage
from ..data import adapters
from ..data.manifest import IndexResult, make_rejects, summarize, write_table
from ..data.probe import probe_manifest, verify_images
from ..reports.plots import contact_sheet_png, size_histogram_png
from ..storage import StorageOptions

__all__ = ["IndexConfig", "IndexSummary", "run_index", "format_counts_table"]


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

    def __post_init__(self):
        if self.dataset not in adapters.ADAPTERS:
            raise ValueError(f"Unknown dataset layout {self.dataset!r}; choose one of {sorted(adapters.ADAPTERS)}")

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


@dataclasses.dataclass(frozen=True)
class IndexSummary:
    """What the index job wrote (``summary.json`` holds :meth:`to_dict`)."""

    dataset: str
    data: str
    images: int
    counts: list[dict[str, Any]]          # one row per split x body part x label
    rejects: dict[str, int]               # reason -> files
    rejected_files: int
    label_disagreements: int
    notes: list[str]
    outputs: dict[str, str]               # manifest, rejects, summary, contact_sheet, size_histogram
    seconds: float

    @property
    def manifest(self) -> str:
        return self.outputs["manifest"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_index(config: IndexConfig, *, log: Callable[[str], None] = print) -> IndexSummary:
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
    rejects = [(r["uri"], r["reason"], r["detail"]) for r in result.rejects.to_pylist()]
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
    summary = IndexSummary(
        dataset=config.dataset, data=config.data, images=manifest.num_rows, counts=counts, rejects=dict(reasons),
        rejected_files=len(rejects), label_disagreements=result.label_disagreements, notes=list(result.notes),
        outputs=paths, seconds=round(time.time() - started, 2))
    if config.pictures and manifest.num_rows:
        log("Drawing the contact sheet and size histogram ...")
        storage.write_bytes(paths["contact_sheet"], contact_sheet_png(manifest, config.storage), config.storage)
        storage.write_bytes(paths["size_histogram"], size_histogram_png(manifest), config.storage)
    storage.write_bytes(paths["summary"], json.dumps(summary.to_dict(), indent=2).encode(), config.storage)

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
