"""Bulk scoring of an archive: every image through the router -> classifier graph,
streamed with Ray Data through a pool of predictor actors, written as Parquet.

Output (local folder or s3:// prefix):

    images/part-000000.parquet ...  one row per input image, scored or rejected
    images/part-rejects.parquet      files the indexer refused (not images, stray files)
    studies.parquet                  one row per study (mean probability, as MURA)
    summary.json                     counts, rejects by reason, images/s
    _work/run.json, _work/manifest.parquet   what is being scored, to resume

Resumable by construction: the sorted input list is cut into fixed chunks and a
chunk's part file is written whole (rename / S3 put) only once every one of its
rows is back. A rerun with the same --output skips chunks whose part exists and
redoes the rest, so after any kill every image appears exactly once.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import re
import time
from collections import Counter, defaultdict
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..artifacts.index import check_model_index, check_operating_point
from ..data import adapters
from ..data.manifest import read_table, write_table
from ..imaging.regions import FINDINGS_TYPE
from ..inference.pool import map_predictor, plan_actors
from ..metrics.study import study_decision
from ..storage import StorageOptions
from .dicom_headers import dicom_headers

__all__ = ["ScoreConfig", "ScoringSummary", "score_archive", "IMAGE_RESULT_SCHEMA", "STUDY_RESULT_SCHEMA", "read_image_results"]

RUN_FORMAT = "fracray-score-run/1"
_PART = re.compile(r"part-(\d{6})\.parquet$")

IMAGE_RESULT_SCHEMA = pa.schema([
    ("image_uri", pa.string()),
    ("study_id", pa.string()),
    ("status", pa.string()),                 # "ok" or the reject reason
    ("error", pa.string()),
    ("body_part", pa.string()),              # from the router, or the layout with --body-part-from-layout
    ("body_part_probability", pa.float64()),  # null where the router was not asked
    ("fracture_probability", pa.float64()),
    ("label", pa.int8()),                    # 1 fracture/abnormal at the threshold, 0 not, -1 not scored
    ("threshold", pa.float64()),
    ("classifier", pa.string()),             # bundle:backbone@version
    ("router", pa.string()),
    ("engine", pa.string()),                 # what computed the probability: onnxruntime-float32, torch-float32
    ("width", pa.int32()),                   # the image's own size in pixels: the frame of the findings
    ("height", pa.int32()),
    ("sop_instance_uid", pa.string()),       # DICOM inputs: the SOP Instance UID (joins back to the PACS)
    # DICOM inputs' headers, null elsewhere (and in runs scored before they were recorded): the
    # review worklist's date filter and the monitoring's plots by day and equipment.
    ("study_date", pa.date32()),             # StudyDate, else AcquisitionDate, else ContentDate
    ("manufacturer", pa.string()),           # Manufacturer
    ("manufacturer_model", pa.string()),     # ManufacturerModelName
    ("scored_at", pa.timestamp("s", tz="UTC")),  # when the row's part file was written
    # Suspected fracture regions, best first: box [x0, x1) x [y0, y1) and peak in the image's
    # pixels, score = the fracture map's peak probability. Empty: none found or a model without
    # a fracture map; null: not scored.
    ("findings", FINDINGS_TYPE),
    ("layout_body_part", pa.string()),       # what the archive layout says, if anything
    ("known_label", pa.int8()),              # the archive's own label, -1 if unlabelled
    ("chunk_id", pa.int64()),
])

STUDY_RESULT_SCHEMA = pa.schema([
    ("study_id", pa.string()),
    ("images", pa.int64()),
    ("scored", pa.int64()),
    ("body_part", pa.string()),              # most frequent among the scored images
    ("fracture_probability", pa.float64()),  # mean over scored images (MURA's study rule)
    ("max_image_probability", pa.float64()),
    ("threshold", pa.float64()),             # mean of the images' thresholds
    ("label", pa.int8()),
    ("abnormal_images", pa.int64()),
    ("known_label", pa.int8()),              # 1 if any image is known abnormal, 0 if all known normal, else -1
])


DEFAULT_CHUNK_SIZE = 256  # images per part when no chunk size is given (small archives get fewer)


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """score_archive's options (one object, from flags or code)."""

    input: str
    models: str
    output: str
    layout: str = "auto"                 # auto, mura, fracatlas, folder, manifest, tree
    # Images per resumable part file, exactly as given; None: 256, smaller for small archives (at
    # least 16 chunks when there are 128+ images, so every actor has work).
    chunk_size: int | None = None
    batch_size: int = 32                 # images per predictor call
    concurrency: int | None = None       # predictor actors; default: one per GPU, else one per 2 CPUs
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs
    body_part_from_layout: bool = False  # trust MURA-style body-part folders over the router
    operating_point: str | None = None   # None: each model's own threshold
    engine: str = "auto"                 # what runs the models in the actors (inference.engines.choice: auto = $FRACRAY_ENGINE, else auto)
    precision: str | None = None         # exact | fast (validated bundles only); None: $FRACRAY_PRECISION, else exact
    storage: StorageOptions = StorageOptions()

    def __post_init__(self):
        if (self.chunk_size is not None and self.chunk_size < 1) or self.batch_size < 1:
            raise ValueError(f"chunk_size and batch_size must be >= 1. Got {self.chunk_size}, {self.batch_size}")
        if self.layout != "auto" and self.layout not in adapters.ADAPTERS:
            raise ValueError(f"layout must be auto or one of {sorted(adapters.ADAPTERS)}. Got {self.layout!r}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1. Got {self.concurrency}")


def _run_identity(config: ScoreConfig, layout: str) -> dict[str, Any]:
    return {"format": RUN_FORMAT, "input": storage.normalize(config.input), "models": storage.normalize(config.models),
            "layout": layout, "chunk_size": config.chunk_size, "body_part_from_layout": config.body_part_from_layout,
            "operating_point": config.operating_point}


def _prepare(config: ScoreConfig, output: str, log: Callable) -> tuple[pa.Table, dict[str, Any]]:
    """Index the archive once and record it; on a rerun, reuse that record."""
    options = config.storage
    run_uri = storage.join(output, "_work", "run.json")
    manifest_uri = storage.join(output, "_work", "manifest.parquet")
    if storage.exists(run_uri, options):
        run = json.loads(storage.read_bytes(run_uri, options))
        wanted = _run_identity(config, run.get("layout", ""))
        if config.layout not in ("auto", run.get("layout")):
            wanted["layout"] = config.layout
        differs = {k: (run.get(k), v) for k, v in wanted.items() if run.get(k) != v}
        if differs:
            raise ValueError(f"{output} already holds a scoring run with other settings {differs}. Use a new --output, "
                             f"or rerun with the same settings to resume it.")
        log(f"Resuming the scoring run in {output} ({run['images']} images in {run['chunks']} chunks)")
        return read_table(manifest_uri, options), run

    layout = config.layout if config.layout != "auto" else adapters.detect_layout(config.input, options)
    log(f"Indexing {config.input} (layout: {layout}) ...")
    result = adapters.index_dataset(layout, config.input, options)
    manifest = result.manifest
    uris = manifest["image_uri"]
    unique = pc.unique(uris)
    duplicates = len(uris) - len(unique)
    if duplicates:  # a user manifest may list a file twice; score it once
        first = {}
        for i, u in enumerate(uris.to_pylist()):
            first.setdefault(u, i)
        manifest = manifest.take(sorted(first.values()))
    manifest = manifest.sort_by("image_uri")
    # A chunk size given is used as given; without one, small archives get smaller chunks (at
    # least 16 when there are 128+ images) so every actor has work. Fixed here and stored, so a
    # resume on another cluster cuts the same.
    chunk_size = config.chunk_size or max(1, min(DEFAULT_CHUNK_SIZE, max(8, math.ceil(manifest.num_rows / 16))))
    chunk_ids = np.arange(manifest.num_rows, dtype=np.int64) // chunk_size
    work = pa.table({
        "image_uri": manifest["image_uri"], "study_id": manifest["study_id"], "body_part": manifest["body_part"],
        "image_label": manifest["image_label"], "chunk_id": pa.array(chunk_ids),
    })
    rejects = result.rejects
    reject_rows = pa.table({
        "image_uri": rejects["uri"], "study_id": pa.nulls(rejects.num_rows, pa.string()),
        "status": rejects["reason"], "error": rejects["detail"],
    })
    write_table(_conform_results(reject_rows, chunk_id=-1), storage.join(output, "images", "part-rejects.parquet"),
                options)
    write_table(work, manifest_uri, options)
    run = _run_identity(config, layout) | {
        "images": work.num_rows, "index_rejects": rejects.num_rows, "duplicates_dropped": duplicates,
        "chunks": int(math.ceil(work.num_rows / chunk_size)), "effective_chunk_size": chunk_size,
        "notes": result.notes,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_bytes(run_uri, json.dumps(run, indent=2).encode(), options)  # written last: the set-up is done
    return work, run


def _conform_results(table: pa.Table, chunk_id: int | None = None) -> pa.Table:
    renames = {"true_body_part": "layout_body_part", "true_image_label": "known_label"}
    table = table.rename_columns([renames.get(c, c) for c in table.column_names])
    columns = []
    for field in IMAGE_RESULT_SCHEMA:
        if field.name in table.column_names:
            column = table[field.name]
            if pa.types.is_floating(field.type):
                column = pc.if_else(pc.is_nan(column.cast(pa.float64())), None, column.cast(pa.float64()))
            if field.type == pa.string():
                column = pc.if_else(pc.equal(column.cast(pa.string()), ""), None, column.cast(pa.string())) \
                    if field.name in ("body_part", "classifier", "router", "engine", "study_id", "layout_body_part") \
                    else column.cast(pa.string())
            columns.append(column.cast(field.type))
        elif field.name == "chunk_id" and chunk_id is not None:
            columns.append(pa.array([chunk_id] * table.num_rows, pa.int64()))
        elif field.name in ("label", "known_label"):
            columns.append(pa.array([-1] * table.num_rows, field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.table(columns, schema=IMAGE_RESULT_SCHEMA)


def _done_chunks(output: str, options: StorageOptions | None) -> set[int]:
    folder = storage.join(output, "images")
    if not storage.exists(folder, options):
        return set()
    return {int(m.group(1)) for uri in storage.list_files(folder, options) if (m := _PART.search(uri))}


def _study_table(images: pa.Table) -> pa.Table:
    by_study: dict[str, list[dict]] = defaultdict(list)
    for row in images.select(["image_uri", "study_id", "status", "body_part", "fracture_probability", "threshold",
                              "label", "known_label"]).to_pylist():
        if row["study_id"]:  # files the indexer refused belong to no study
            by_study[row["study_id"]].append(row)
    rows = []
    for study, members in sorted(by_study.items()):
        scored = [m for m in members if m["status"] == "ok"]
        probs = [m["fracture_probability"] for m in scored]
        known = [m["known_label"] for m in members if m["known_label"] in (0, 1)]
        decision = (study_decision(probs, [m["threshold"] for m in scored], [m["body_part"] for m in scored])
                    if scored else {"fracture_probability": None, "threshold": None, "label": -1, "body_part": None})
        rows.append({
            "study_id": study, "images": len(members), "scored": len(scored), "body_part": decision["body_part"],
            "fracture_probability": decision["fracture_probability"],
            "max_image_probability": max(probs) if probs else None,
            "threshold": decision["threshold"], "label": decision["label"],
            "abnormal_images": sum(m["label"] == 1 for m in scored),
            "known_label": 1 if any(known) else (0 if len(known) == len(members) else -1),
        })
    return pa.Table.from_pylist(rows, schema=STUDY_RESULT_SCHEMA)


def read_image_results(output: str, options: StorageOptions | None = None) -> pa.Table:
    """All per-image rows of a scoring run (every part file)."""
    folder = storage.join(output, "images")
    parts = sorted(u for u in storage.list_files(folder, options) if u.endswith(".parquet") and "/part-" in u)
    tables = [_current_schema(read_table(u, options)) for u in parts]
    return pa.concat_tables(tables) if tables else IMAGE_RESULT_SCHEMA.empty_table()


def _current_schema(table: pa.Table) -> pa.Table:
    """A part file in today's schema: columns added since it was written (a run resumed
    across versions, e.g. findings) come back as nulls."""
    if table.schema.equals(IMAGE_RESULT_SCHEMA):
        return table
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in IMAGE_RESULT_SCHEMA]
    return pa.table(columns, schema=IMAGE_RESULT_SCHEMA)


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _unavailable_cause(exc: BaseException) -> str | None:
    """The message of the StorageUnavailable behind an error from Ray Data, which wraps the
    actor's exception (as a cause where it survives pickling, else only in its text)."""
    seen, current = set(), exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, storage.StorageUnavailable):
            return str(current)
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    marker = f"{storage.StorageUnavailable.__module__}.{storage.StorageUnavailable.__name__}: "
    lines = [line.split(marker, 1)[1] for line in str(exc).splitlines() if marker in line]
    return lines[-1].strip() if lines else None


def _batches_or_unavailable(ds, finished: Callable[[], int], chunks: int):
    """The dataset's batches; a storage service that went away mid-run (a PACS stopped) ends the
    run with one clear error, the finished chunks kept for the rerun."""
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
    except Exception as exc:
        cause = _unavailable_cause(exc)
        if cause is None:
            raise
        raise storage.StorageUnavailable(f"{cause} Scoring stopped with {finished()} of {chunks} chunks written and "
                                         f"kept; run the same command again to score the rest.") from None


@dataclasses.dataclass(frozen=True)
class ScoringSummary:
    """A scoring run's outcome (``summary.json`` holds :meth:`to_dict`): every input counted
    once, scored or rejected by reason, over all runs into the same output; ``*_this_run``
    for this run alone."""

    input: str
    models: str
    output: str
    layout: str
    inputs: int
    scored: int
    rejected: dict[str, int]
    studies: int
    flagged_images: int
    flagged_studies: int
    scored_this_run: int
    seconds_this_run: float
    images_per_second_this_run: float | None
    resumed: bool
    duplicates_dropped: int
    finished: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def score_archive(config: ScoreConfig, *, log: Callable[[str], None] = print,
                  on_chunk: Callable[[int], None] | None = None) -> ScoringSummary:
    """Score every image under ``config.input``; returns the summary (also written to summary.json)."""
    import ray

    from ..inference.predictor import FracturePredictor, check_precision  # torch: here, not to read the results

    started = time.time()
    options = config.storage.resolved()
    output = storage.normalize(config.output)
    check_model_index(config.models, options)  # fail before any work if the index or a bundle is not there,
    check_operating_point(config.models, config.operating_point, options)  # or a model lacks the operating point
    # ... or if the engine or precision asked for cannot run them (fast: a bundle without a passed validation).
    check_precision(config.models, options, engine=config.engine, precision=config.precision,
                    device="cuda" if (config.gpus_per_actor or 0) > 0 else "cpu")
    work, run = _prepare(config, output, log)
    done = _done_chunks(output, options)
    pending = sorted(set(range(run["chunks"])) - done)
    expected = Counter(work["chunk_id"].to_pylist())
    todo_images = sum(expected[c] for c in pending)
    log(f"{run['images']} images in {run['chunks']} chunks; {len(done)} chunk(s) already scored, "
        f"{todo_images} images to go")

    scored_now = 0
    if pending:
        plan = plan_actors(config.concurrency, config.gpus_per_actor)
        if plan.gpus_per_actor and not config.gpus_per_actor:  # GPUs found: where fast does not run
            check_precision(config.models, options, engine=config.engine, precision=config.precision, device="cuda")
        # A chunk is one block: more actors than chunks would idle.
        plan = dataclasses.replace(plan, actors=min(plan.actors, len(pending)))
        # One block per chunk: a chunk's rows travel together, so they finish close in time.
        blocks = [work.filter(pc.equal(work["chunk_id"], c)) for c in pending]
        ds = map_predictor(ray.data.from_arrow(blocks), FracturePredictor,
                           {"index_uri": storage.normalize(config.models), "storage_options": options,
                            "use_known_body_part": config.body_part_from_layout,
                            "operating_point": config.operating_point, "engine": config.engine,
                            "precision": config.precision},
                           batch_size=config.batch_size, plan=plan)
        # DICOM inputs' date and equipment, read from their headers beside the predictor (nulls elsewhere).
        ds = ds.map_batches(dicom_headers, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"options": options})
        log(f"Scoring with {plan.actors} predictor actor(s)"
            + (f", {plan.gpus_per_actor:g} GPU each" if plan.gpus_per_actor else ""))
        buffers: dict[int, list[pa.Table]] = defaultdict(list)
        counts: Counter = Counter()
        written = 0
        loop_started = time.time()
        for batch in _batches_or_unavailable(ds, lambda: len(done) + written, run["chunks"]):
            for chunk in pc.unique(batch["chunk_id"]).to_pylist():
                part = batch.filter(pc.equal(batch["chunk_id"], chunk))
                buffers[chunk].append(part)
                counts[chunk] += part.num_rows
                if counts[chunk] < expected[chunk]:
                    continue
                table = _conform_results(pa.concat_tables(buffers.pop(chunk))).sort_by("image_uri")
                table = table.set_column(table.column_names.index("scored_at"), "scored_at", pa.array(
                    [_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)] * table.num_rows,
                    pa.timestamp("s", tz="UTC")))
                if table.num_rows != expected[chunk] or len(pc.unique(table["image_uri"])) != table.num_rows:
                    raise RuntimeError(f"chunk {chunk}: {table.num_rows} rows back for {expected[chunk]} images")
                write_table(table, storage.join(output, "images", f"part-{chunk:06d}.parquet"), options)
                written += 1
                scored_now += table.num_rows
                rate = scored_now / max(time.time() - loop_started, 1e-9)
                total_done = sum(expected[c] for c in done) + scored_now
                log(f"[score] chunk {chunk} written: {total_done}/{run['images']} images "
                    f"({100 * total_done / max(run['images'], 1):.0f}%), {rate:.1f} images/s, "
                    f"ETA {_eta((run['images'] - total_done) / max(rate, 1e-9))}")
                if on_chunk:
                    on_chunk(chunk)
        missing = sorted(set(pending) - _done_chunks(output, options))
        if missing:
            raise RuntimeError(f"Chunks {missing[:10]} were not completed; rerun with the same --output to finish")

    images = read_image_results(output, options)
    n_inputs = run["images"] + run["index_rejects"]
    if images.num_rows != n_inputs or len(pc.unique(images["image_uri"])) != images.num_rows:
        raise RuntimeError(f"Output has {images.num_rows} rows ({len(pc.unique(images['image_uri']))} distinct) for "
                           f"{n_inputs} inputs: the output folder was changed by something else")
    studies = _study_table(images)
    write_table(studies, storage.join(output, "studies.parquet"), options)
    statuses = Counter(images["status"].to_pylist())
    seconds = time.time() - started
    summary = ScoringSummary(
        input=run["input"], models=run["models"], output=output, layout=run["layout"],
        inputs=n_inputs, scored=statuses.get("ok", 0),
        rejected={k: v for k, v in sorted(statuses.items()) if k != "ok"},
        studies=studies.num_rows,
        flagged_images=int(pc.sum(pc.equal(images["label"], 1)).as_py() or 0),
        flagged_studies=int(pc.sum(pc.equal(studies["label"], 1)).as_py() or 0),
        scored_this_run=scored_now, seconds_this_run=round(seconds, 1),
        images_per_second_this_run=round(scored_now / seconds, 2) if scored_now else None,
        resumed=bool(done), duplicates_dropped=run.get("duplicates_dropped", 0),
        finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    storage.write_bytes(storage.join(output, "summary.json"), json.dumps(summary.to_dict(), indent=2).encode(),
                        options)
    return summary
