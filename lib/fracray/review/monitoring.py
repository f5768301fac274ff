"""The monitoring report of a scoring run: by day, body part and equipment, the distribution of
P(fracture), the positive rate, the reject and out-of-scope rates, drift against the model's own
validation distribution (PSI, :mod:`fracray.metrics.drift`) with its alarms, and the concordance
with reviewers' feedback (:mod:`.concordance`).

The report is computed where the Parquet lies (local or s3://): one pass of
``pyarrow.dataset`` over ``images/part-*.parquet`` reads only the columns it needs, batch by
batch, and folds the rows into small cubes of counts, one per grouping, keyed by (group, status,
label, histogram bin, PSI bin); every figure is a roll-up of a cube. Memory follows the cubes'
size (groups x bins), not the run's rows; ``studies.parquet`` is read only for the
reviewed studies.

Groupings and where their keys come from:

- day: the DICOM StudyDate (``study_date``) where the run has any; else the scoring date (a
  ``scored_at`` column where a run has one, else the modification time of each part file),
  and the grouping says so.
- body part: the classifier's ``body_part`` (the router's choice, or MURA's folder with
  --body-part-from-layout); where that is a single all-parts model (``"all"``) the archive
  layout's ``layout_body_part`` where it names one.
- equipment: DICOM ``manufacturer`` / ``manufacturer_model``; unavailable (not an error) where
  the run has no such columns or no value in them (JPEG/PNG archives).

Rates are over images (inputs): ``reject_rate`` counts every input that was not scored for a
reason other than being out of scope (unreadable, truncated, not an image, ...),
``out_of_scope_rate`` those refused as not a limb radiograph (status ``out_of_scope``),
``positive_rate`` the images labelled 1 among the scored ones.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from .. import storage
from ..artifacts.index import validation_distribution_file
from ..imaging.scope import OUT_OF_SCOPE
from ..metrics import drift
from ..storage import StorageOptions
from .concordance import concordance
from .feedback import FeedbackRecord

__all__ = ["MonitoringReport", "Grouping", "GroupStats", "MonitoringError", "monitoring_report",
           "load_validation_distribution", "GROUPINGS"]

REPORT_FORMAT = "fracray-monitoring-report/1"
GROUPINGS = ("day", "body_part", "equipment")
UNKNOWN = "unknown"
_ALL_PARTS = "all"  # the body part of a single all-parts classifier
# Columns the report reads (the others of a part file are never read).
_COLUMNS = ("status", "fracture_probability", "label", "body_part", "layout_body_part", "study_date", "scored_at",
            "manufacturer", "manufacturer_model")
_MIN_PART_REFERENCE = 100  # validation images a body part needs to be its own drift reference


class MonitoringError(ValueError):
    """A run the report cannot be made of (not a scoring output, a damaged part file, a bad reference)."""


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """One group's figures. ``histogram``: counts of scored P(fracture) in 20 equal bins of
    [0, 1]; ``psi_counts``: in the validation distribution's PSI bins."""

    key: str
    images: int
    scored: int
    rejected: int
    out_of_scope: int
    positive: int
    rejects_by_reason: dict[str, int]
    mean_probability: float | None
    histogram: tuple[int, ...]
    psi_counts: tuple[int, ...]
    psi: float | None = None
    psi_level: str = "insufficient"
    psi_noise_floor: float | None = None
    psi_reference: str | None = None

    @property
    def positive_rate(self) -> float | None:
        return self.positive / self.scored if self.scored else None

    @property
    def reject_rate(self) -> float | None:
        return self.rejected / self.images if self.images else None

    @property
    def out_of_scope_rate(self) -> float | None:
        return self.out_of_scope / self.images if self.images else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(histogram=list(self.histogram), psi_counts=list(self.psi_counts), positive_rate=self.positive_rate,
                 reject_rate=self.reject_rate, out_of_scope_rate=self.out_of_scope_rate)
        return d


@dataclasses.dataclass(frozen=True)
class Grouping:
    """One way of cutting the run: ``available`` False (with ``note`` saying why) where the run
    has no such column or no value in it; ``source`` says which column the keys come from."""

    name: str
    available: bool
    source: str | None
    note: str | None
    groups: tuple[GroupStats, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "available": self.available, "source": self.source, "note": self.note,
                "groups": [g.to_dict() for g in self.groups]}


@dataclasses.dataclass(frozen=True)
class MonitoringReport:
    run: str
    created: str
    models: str | None
    overall: GroupStats
    groupings: Mapping[str, Grouping]
    drift: dict[str, Any]               # statistic, thresholds, reference, overall verdict, alarms
    concordance: dict[str, Any] | None  # None without feedback
    validation: dict[str, Any] | None   # the reference's histogram (for the plots), None where there is none
    notes: tuple[str, ...] = ()

    @property
    def alarms(self) -> list[dict[str, Any]]:
        """Every group (and the run as a whole) whose PSI reached the alarm threshold."""
        return [a for a in self.drift.get("flags", []) if a["level"] == "alarm"]

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "run": self.run, "created": self.created, "models": self.models,
                "overall": self.overall.to_dict(), "groupings": {k: g.to_dict() for k, g in self.groupings.items()},
                "drift": self.drift, "alarms": self.alarms, "concordance": self.concordance,
                "validation": self.validation, "notes": list(self.notes)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


# ---------------------------------------------------------------- reading the run


def _read_json(uri: str, options: StorageOptions | None) -> dict[str, Any] | None:
    try:
        if not storage.exists(uri, options):
            return None
        return json.loads(storage.read_bytes(uri, options))
    except (storage.StorageError, ValueError):
        return None


def _part_files(run: str, options: StorageOptions | None) -> list[str]:
    folder = storage.join(run, "images")
    if not storage.exists(folder, options):
        raise MonitoringError(f"{run} is not a scoring output: it has no images/ folder (fracray score writes "
                              f"images/part-*.parquet)")
    parts = sorted(u for u in storage.list_files(folder, options) if u.endswith(".parquet") and "/part-" in u)
    if not parts:
        raise MonitoringError(f"{run}/images holds no part-*.parquet files: nothing was scored there yet")
    return parts


@dataclasses.dataclass(frozen=True)
class _Parts:
    """The run's part files, read as pyarrow datasets of at most ``_FILES_PER_SCAN`` files at a
    time: a dataset keeps every file's footer once read (~80 kB each with the findings' nested
    schema), so one dataset over a 1M-row run's 3,900 files would hold ~300 MB for nothing."""

    filesystem: Any
    paths: tuple[str, ...]
    schema: pa.Schema                 # the columns the report reads, as the files hold them
    file_days: dict[str, str | None]  # path -> the file's modification day (UTC)

    def datasets(self):
        for i in range(0, len(self.paths), _FILES_PER_SCAN):
            yield pads.dataset(list(self.paths[i:i + _FILES_PER_SCAN]), filesystem=self.filesystem, format="parquet",
                               schema=self.schema)


_FILES_PER_SCAN = 256


def _dataset(parts: list[str], options: StorageOptions | None) -> _Parts:
    """The part files with the union of the columns the report reads (a run resumed across
    versions may have parts without the newer columns: null there), and each file's day."""
    fs, _ = storage.resolve(parts[0], options)
    paths = [storage.resolve(u, options)[1] for u in parts]
    schemas = []
    for uri, path in {parts[0]: paths[0], parts[-1]: paths[-1]}.items():
        schemas.append(_open_schema(uri, path, fs))
    # Part-rejects is last in name order (written when the run starts, in that version's schema).
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise MonitoringError(f"The part files under {parts[0].rsplit('/', 1)[0]} disagree on their columns: {exc}") \
            from None
    fields = [schema.field(c) for c in _COLUMNS if c in schema.names]
    missing = [c for c in ("status", "fracture_probability", "label") if c not in schema.names]
    if missing:
        raise MonitoringError(f"{parts[0]} is not a fracray scoring part file: it lacks {missing}")
    days = {}  # where a row has no scored_at (runs before it, rejects of the indexer): its file's time
    for info in fs.get_file_info(pafs.FileSelector(paths[0].rsplit("/", 1)[0])):  # one listing, not one per file
        mtime = info.mtime
        days[info.path] = mtime.astimezone(_dt.timezone.utc).date().isoformat() if mtime else None
    return _Parts(fs, tuple(paths), pa.schema(fields), days)


def _open_schema(uri: str, path: str, fs) -> pa.Schema:
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path, filesystem=fs)
    except (pa.ArrowException, OSError) as exc:
        raise MonitoringError(f"{uri} is not a readable Parquet file ({exc}); the run is damaged: rescore that chunk "
                              f"(delete the file and rerun the same `fracray score` command)") from None


def _study_day(batch: pa.RecordBatch) -> pa.Array:
    if "study_date" not in batch.schema.names:
        return pa.nulls(batch.num_rows, pa.string())
    column = batch.column("study_date")
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):  # YYYYMMDD as DICOM writes it
        text = pc.utf8_slice_codeunits(column, 0, 8)
        column = pc.strptime(text, format="%Y%m%d", unit="s", error_is_null=True)
    return column.cast(pa.date32()).cast(pa.string())


def _scoring_day(batch: pa.Table) -> pa.Array:
    fallback = batch.column("_file_day")
    if "scored_at" in batch.schema.names:
        scored = batch.column("scored_at").cast(pa.timestamp("s", tz="UTC")).cast(pa.date32()).cast(pa.string())
        return pc.coalesce(scored, fallback)
    return fallback


def _body_part_key(batch: pa.RecordBatch) -> pa.Array:
    part = batch.column("body_part") if "body_part" in batch.schema.names else pa.nulls(batch.num_rows, pa.string())
    if "layout_body_part" in batch.schema.names:
        layout = batch.column("layout_body_part")
        layout = pc.if_else(pc.is_in(layout, pa.array(["", UNKNOWN])), None, layout)
        # A single all-parts model says nothing about the body part: the layout's, where it knows.
        part = pc.if_else(pc.or_kleene(pc.is_null(part), pc.equal(part, _ALL_PARTS)),
                          pc.coalesce(layout, part), part)
    return pc.fill_null(part, UNKNOWN)


def _equipment_key(batch: pa.RecordBatch, has: tuple[bool, bool]) -> pa.Array:
    n = batch.num_rows
    maker = batch.column("manufacturer") if has[0] else pa.nulls(n, pa.string())
    model = batch.column("manufacturer_model") if has[1] else pa.nulls(n, pa.string())
    maker, model = pc.utf8_trim_whitespace(maker), pc.utf8_trim_whitespace(model)
    maker = pc.if_else(pc.equal(maker, ""), None, maker)
    model = pc.if_else(pc.equal(model, ""), None, model)
    joined = pc.binary_join_element_wise(pc.fill_null(maker, "?"), pc.fill_null(model, "?"), " / ")
    return pc.if_else(pc.and_(pc.is_null(maker), pc.is_null(model)), UNKNOWN, joined)


_DIMENSIONS = ("day", "scoring_day", "body_part", "equipment")
_MEASURES = ["status", "label", "hbin", "pbin"]
_FOLD_ROWS = 131_072  # rows of derived keys gathered before they are folded into the cubes


def _cubes(parts: _Parts, psi_edges: Sequence[float], run: str) -> dict[str, dict[str, list]]:
    """For each dimension (day = StudyDate, scoring_day, body_part, equipment) its cube: counts
    ``n`` and probability sums ``p`` by (key, status, label, hbin, pbin), hbin and pbin the scored
    image's histogram and PSI bins (-1 when not scored). One scan; the rows are folded every
    ``_FOLD_ROWS``, so memory follows the cubes (keys x ~30 bins), not the run."""
    names = parts.schema.names
    has_equipment = ("manufacturer" in names, "manufacturer_model" in names)
    hist_edges = drift.histogram_edges()
    folded: dict[str, list[pa.Table]] = {d: [] for d in _DIMENSIONS}
    pending: list[pa.RecordBatch] = []
    pending_rows = 0

    def fold() -> None:  # the keys of the gathered rows, computed once for all of them, into the cubes
        nonlocal pending, pending_rows
        if not pending:
            return
        rows = pa.Table.from_batches(pending).combine_chunks()
        pending, pending_rows = [], 0
        p = rows.column("fracture_probability").to_numpy().astype(np.float64)
        status = pc.fill_null(rows.column("status"), "unknown")
        scored = pc.equal(status, "ok").to_numpy(zero_copy_only=False) & np.isfinite(p)
        hbin = np.where(scored, drift.bin_index(np.nan_to_num(p), hist_edges), -1).astype(np.int16)
        pbin = np.where(scored, drift.bin_index(np.nan_to_num(p), psi_edges), -1).astype(np.int16)
        table = pa.table({
            "day": pc.fill_null(_study_day(rows), UNKNOWN),
            "scoring_day": pc.fill_null(_scoring_day(rows), UNKNOWN),
            "body_part": _body_part_key(rows), "equipment": _equipment_key(rows, has_equipment),
            "status": status, "label": pc.fill_null(rows.column("label").cast(pa.int8()), -1),
            "hbin": hbin, "pbin": pbin, "p": np.where(scored, p, 0.0), "n": np.ones(rows.num_rows, np.int64),
        })
        for d in _DIMENSIONS:
            folded[d].append(_fold(table, d))

    try:
        for tagged in (t for dataset in parts.datasets()
                       for t in dataset.scanner(columns=names, batch_size=_FOLD_ROWS).scan_batches()):
            batch = tagged.record_batch
            if batch.num_rows == 0:
                continue
            day = parts.file_days.get(tagged.fragment.path)
            pending.append(batch.append_column("_file_day", pa.array([day] * batch.num_rows, pa.string())))
            pending_rows += batch.num_rows
            if pending_rows >= _FOLD_ROWS:
                fold()
        fold()
    except (pa.ArrowException, OSError) as exc:
        raise MonitoringError(f"Cannot read the scoring output under {run}/images: {_short(exc)}. A part file is "
                              f"damaged: delete it and rerun the same `fracray score` command to rescore its "
                              f"chunk.") from None
    out = {}
    for d in _DIMENSIONS:
        if folded[d]:
            out[d] = _fold(pa.concat_tables(folded[d]), d).to_pydict()
        else:
            out[d] = {c: [] for c in [d, *_MEASURES, "n", "p"]}
    return out


def _fold(table: pa.Table, key: str) -> pa.Table:
    out = table.group_by([key, *_MEASURES]).aggregate([("n", "sum"), ("p", "sum")])
    return out.rename_columns([{"n_sum": "n", "p_sum": "p"}.get(c, c) for c in out.column_names])


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:400] if text else type(exc).__name__


# ---------------------------------------------------------------- roll-ups


def _rollup(cube: dict[str, list], key: str | None, n_hist: int, n_psi: int) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    keys = cube[key] if key else [_ALL_PARTS] * len(cube["n"])
    for k, status, label, hbin, pbin, n, p in zip(keys, cube["status"], cube["label"], cube["hbin"], cube["pbin"],
                                                  cube["n"], cube["p"]):
        g = groups.get(k)
        if g is None:
            g = groups[k] = {"images": 0, "scored": 0, "rejected": 0, "out_of_scope": 0, "positive": 0,
                             "reasons": defaultdict(int), "psum": 0.0, "hist": [0] * n_hist, "psi": [0] * n_psi}
        g["images"] += n
        if status == "ok":
            g["positive"] += n if label == 1 else 0
            if hbin >= 0:
                g["scored"] += n
                g["psum"] += p
                g["hist"][hbin] += n
                g["psi"][pbin] += n
        elif status == OUT_OF_SCOPE:
            g["out_of_scope"] += n
        else:
            g["rejected"] += n
            g["reasons"][status] += n
    return groups


def _stats(key: str, g: dict[str, Any], reference: dict[str, Any] | None, reference_name: str | None) -> GroupStats:
    value = level = floor = None
    if reference is not None:
        counts = reference["psi_counts"]
        value = drift.psi(counts, g["psi"])
        floor = drift.psi_noise_floor(len(counts), g["scored"], int(sum(counts)))
        level = drift.drift_level(value, g["scored"], noise_floor=floor)
    return GroupStats(
        key=key, images=g["images"], scored=g["scored"], rejected=g["rejected"], out_of_scope=g["out_of_scope"],
        positive=g["positive"], rejects_by_reason=dict(sorted(g["reasons"].items())),
        mean_probability=g["psum"] / g["scored"] if g["scored"] else None, histogram=tuple(g["hist"]),
        psi_counts=tuple(g["psi"]), psi=None if value is None else round(value, 6),
        psi_level=level or "unavailable", psi_noise_floor=None if floor is None else round(floor, 6),
        psi_reference=reference_name)


def load_validation_distribution(source: str | Mapping[str, Any] | None, models: str | None,
                                 options: StorageOptions | None = None) -> tuple[dict[str, Any] | None, str]:
    """(the validation distribution, where it came from): ``source`` as given (a document or its
    URI), else the file beside the run's model index; (None, why) where there is none."""
    if isinstance(source, Mapping):
        return drift.check_validation_distribution(dict(source)), "given"
    uri = source
    if uri is None:
        if not models:
            return None, "the run's summary names no model index"
        try:
            uri = validation_distribution_file(models)
        except (storage.StorageError, ValueError) as exc:
            return None, f"no model index to look beside ({exc})"
        if not storage.exists(uri, options):
            return None, (f"{uri} does not exist: evaluate the model with `fracray evaluate --output` and ship it "
                          f"with `fracray ship-model --evaluation`, or pass --validation")
    try:
        doc = json.loads(storage.read_bytes(uri, options))
    except (storage.StorageError, ValueError, OSError) as exc:
        raise MonitoringError(f"Cannot read the validation distribution {uri}: {exc}") from None
    try:
        return drift.check_validation_distribution(doc, uri), uri
    except ValueError as exc:
        raise MonitoringError(str(exc)) from None


def _study_labels(run: str, study_ids: set[str], options: StorageOptions | None) -> dict[str, int]:
    uri = storage.join(run, "studies.parquet")
    if not study_ids or not storage.exists(uri, options):
        return {}
    fs, path = storage.resolve(uri, options)
    try:
        table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
            columns=["study_id", "label"], filter=pc.field("study_id").isin(sorted(study_ids)))
    except (pa.ArrowException, OSError) as exc:
        raise MonitoringError(f"Cannot read {uri}: {_short(exc)}") from None
    return {s: int(v) for s, v in zip(table["study_id"].to_pylist(), table["label"].to_pylist())}


def _image_labels(dataset_parts: list[str], image_ids: set[str], options: StorageOptions | None) -> dict[str, int]:
    if not image_ids:
        return {}
    fs, _ = storage.resolve(dataset_parts[0], options)
    paths = [storage.resolve(u, options)[1] for u in dataset_parts]
    try:
        table = pads.dataset(paths, filesystem=fs, format="parquet").to_table(
            columns=["image_uri", "label"], filter=pc.field("image_uri").isin(sorted(image_ids)))
    except (pa.ArrowException, OSError) as exc:
        raise MonitoringError(f"Cannot read the image rows of the reviewed images: {_short(exc)}") from None
    return {u: int(v) for u, v in zip(table["image_uri"].to_pylist(), table["label"].to_pylist()) if v in (0, 1)}


# ---------------------------------------------------------------- the report


def monitoring_report(run: str, feedback: Sequence[FeedbackRecord] | None = None, *,
                      validation: str | Mapping[str, Any] | None = None,
                      storage_options: StorageOptions | None = None) -> MonitoringReport:
    """The monitoring report of the scoring output ``run`` (what ``fracray score --output`` wrote).

    feedback: reviewers' verdicts (concordance is None without them).
    validation: the model's validation distribution of P(fracture) (a document or its URI);
        default: ``validation_distribution.json`` beside the model index the run was scored with.
    """
    options = (storage_options or StorageOptions()).resolved()
    run = storage.normalize(run)
    parts = _part_files(run, options)
    summary = _read_json(storage.join(run, "summary.json"), options) or {}
    run_record = _read_json(storage.join(run, "_work", "run.json"), options) or {}
    models = summary.get("models") or run_record.get("models")
    reference, reference_source = load_validation_distribution(validation, models, options)
    notes: list[str] = []
    psi_edges = reference["psi_edges"] if reference else [0.0, 1.0]
    files = _dataset(parts, options)
    names = files.schema.names
    cubes = _cubes(files, psi_edges, run)
    n_hist, n_psi = drift.HISTOGRAM_BINS, len(psi_edges) - 1

    overall_reference = reference["overall"] if reference else None
    per_part = {k: v for k, v in (reference or {}).get("per_body_part", {}).items()
                if v.get("n", 0) >= _MIN_PART_REFERENCE}
    overall = _stats("all", _rollup(cubes["body_part"], None, n_hist, n_psi).get(_ALL_PARTS) or _empty(n_hist, n_psi),
                     overall_reference, "validation: all images" if reference else None)

    groupings: dict[str, Grouping] = {}
    for name in GROUPINGS:
        source, note = _grouping_source(name, names, cubes)
        if note:
            notes.append(note)
        if source is None:
            groupings[name] = Grouping(name, False, None, note)
            continue
        dimension = "scoring_day" if source.startswith("scoring date") else name
        rolled = _rollup(cubes[dimension], dimension, n_hist, n_psi)
        groups = []
        for key in sorted(rolled):
            ref, ref_name = overall_reference, "validation: all images"
            if name == "body_part" and key in per_part:
                ref, ref_name = per_part[key], f"validation: {key}"
            groups.append(_stats(key, rolled[key], ref, ref_name if reference else None))
        groupings[name] = Grouping(name, True, source, note, tuple(groups))

    flags = []
    for grouping in [Grouping("run", True, None, None, (overall,)), *groupings.values()]:
        for g in grouping.groups:
            if g.psi_level in ("warn", "alarm"):
                flags.append({"grouping": grouping.name, "group": g.key, "psi": g.psi, "level": g.psi_level,
                              "images": g.scored, "reference": g.psi_reference})
    levels = [f["level"] for f in flags]
    drift_doc: dict[str, Any] = {
        "statistic": "psi",
        "definition": "Population Stability Index of the scored images' P(fracture) against the model's own "
                      "validation distribution, in bins at the validation deciles: sum (a - e) ln(a / e), "
                      f"each bin's count plus {drift.PSI_PSEUDO_COUNT}",
        "warn": drift.PSI_WARN, "alarm": drift.PSI_ALARM, "min_images": drift.PSI_MIN_IMAGES,
        "max_noise_floor": drift.PSI_MAX_NOISE_FLOOR,
        "noise_floor": "(bins - 1)(1/n + 1/n_reference): the PSI expected without any drift",
        "reference": reference_source, "available": reference is not None,
        "status": ("unavailable" if reference is None else
                   "alarm" if "alarm" in levels else "warn" if "warn" in levels else
                   "ok" if overall.psi_level == "ok" else "insufficient"),
        "flags": flags,
    }
    if reference is None:
        notes.append(f"No drift reference: {reference_source}")

    validation_view = None
    if reference:
        validation_view = {"source": reference.get("source"), "histogram_edges": reference["histogram_edges"],
                           "psi_edges": reference["psi_edges"], "overall": reference["overall"],
                           "per_body_part": reference.get("per_body_part", {})}

    agreement = None
    if feedback is not None:
        feedback = list(feedback)
        agreement = concordance(feedback, _study_labels(run, {r.study_id for r in feedback}, options),
                                _image_labels(parts, {r.image_id for r in feedback if r.image_id}, options))
    return MonitoringReport(run=run, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                            models=models, overall=overall, groupings=groupings, drift=drift_doc,
                            concordance=agreement, validation=validation_view, notes=tuple(notes))


def _empty(n_hist: int, n_psi: int) -> dict[str, Any]:
    return {"images": 0, "scored": 0, "rejected": 0, "out_of_scope": 0, "positive": 0, "reasons": {}, "psum": 0.0,
            "hist": [0] * n_hist, "psi": [0] * n_psi}


def _grouping_source(name: str, names: Sequence[str],
                     cubes: dict[str, dict[str, list]]) -> tuple[str | None, str | None]:
    if name == "day":
        if "study_date" in names and any(d != UNKNOWN for d in cubes["day"]["day"]):
            return "study_date (DICOM StudyDate)", None
        if "scored_at" in names:
            return ("scoring date (scored_at; the part file's time where a row has none)",
                    "Grouped by scoring date: the run has no DICOM StudyDate.")
        return ("scoring date (the part files' modification time)",
                "Grouped by scoring date (each part file's modification time): the run has no DICOM StudyDate.")
    if name == "body_part":
        return "body_part (the classifier's; the layout's where the model is one all-parts classifier)", None
    if not ("manufacturer" in names or "manufacturer_model" in names):
        return None, "Equipment unavailable: the run has no manufacturer / manufacturer_model columns " \
                     "(scored before they were recorded)."
    if all(e == UNKNOWN for e in cubes["equipment"]["equipment"]):
        return None, "Equipment unavailable: no image of the run has a DICOM Manufacturer or ManufacturerModelName " \
                     "(not DICOM, or not recorded)."
    return "manufacturer / manufacturer_model (DICOM)", None

