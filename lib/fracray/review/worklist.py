"""A scoring run (a ``score_archive`` output) as the reviewer's worklist, queried where it lies.

The image rows stay in their Parquet files (local folder or s3://, through :mod:`fracray.storage`'s
filesystem as a pyarrow dataset); DuckDB scans them with projection and filter push-down. Opening a
run makes one pass over the few columns a study needs (study, probability, threshold, body part, date)
and keeps **one row per study** in DuckDB's memory; every page, filter and count is a query on that
table, and a study's images are read from the Parquet files when it is opened. DuckDB cannot read
s3:// itself here (its httpfs extension would have to be downloaded), so pyarrow reads and DuckDB
queries.

Older runs lack columns added since (e.g. ``study_date``): they read as nulls and the filter that
needs them is reported unavailable (:attr:`ScoringRun.unavailable`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .. import storage
from ..artifacts.bundle import read_bundle_meta
from ..artifacts.describe import bundle_name, parse_threshold
from ..artifacts.index import read_model_index
from ..scoring.archive import IMAGE_RESULT_SCHEMA
from ..storage import StorageOptions

__all__ = ["RunError", "ScoringRun", "WorklistQuery", "RUN_HELP", "open_run"]

RUN_HELP = ("RUN should be the --output folder of `fracray score` (local or s3://): it holds images/part-*.parquet, "
            "studies.parquet and summary.json")
_PART = re.compile(r"/part-(\d{6}|rejects)\.parquet$")
# Columns the worklist and the study view read, and which filter each one makes possible.
_OPTIONAL = {"study_date": "date", "manufacturer": "equipment", "findings": "findings"}
SORTS = ("probability", "date", "study")


class RunError(ValueError):
    """The folder is not a scoring output, or a file in it cannot be read: the message says which and why."""


@dataclasses.dataclass(frozen=True)
class WorklistQuery:
    operating_point: str = "run"      # "run" (each image's own threshold), a named point, or a number in [0, 1]
    body_part: str | None = None
    label: str | None = None          # "flagged" | "not_flagged" | "not_scored"
    date_from: str | None = None      # YYYY-MM-DD, inclusive
    date_to: str | None = None
    reviewed: str | None = None       # "yes" | "no"
    sort: str = "probability"
    page: int = 1
    page_size: int = 50

    def __post_init__(self):
        if self.label not in (None, "flagged", "not_flagged", "not_scored"):
            raise ValueError(f"label must be flagged, not_flagged or not_scored, not {self.label!r}")
        if self.reviewed not in (None, "yes", "no"):
            raise ValueError(f"reviewed must be yes or no, not {self.reviewed!r}")
        if self.sort not in SORTS:
            raise ValueError(f"sort must be one of {SORTS}, not {self.sort!r}")
        if self.page < 1 or not 1 <= self.page_size <= 500:
            raise ValueError("page must be >= 1 and page_size in [1, 500]")
        for name in ("date_from", "date_to"):
            value = getattr(self, name)
            if value is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
                raise ValueError(f"{name} must be a date YYYY-MM-DD, not {value!r}")


def _not_a_run(uri: str, what: str) -> RunError:
    return RunError(f"{uri} is not a scoring output: {what}. {RUN_HELP}.")


class ScoringRun:
    """One scoring output, opened for queries. Thread-safe (one DuckDB connection, a lock)."""

    def __init__(self, uri: str, options: StorageOptions | None = None):
        self.uri = storage.normalize(uri)
        self.options = (options or StorageOptions()).resolved()
        self._lock = threading.Lock()
        if not storage.exists(self.uri, self.options):
            raise RunError(f"{self.uri} does not exist. {RUN_HELP}.")
        if not storage.is_dir(self.uri, self.options):
            raise _not_a_run(self.uri, "it is a file, not a folder")
        images = storage.join(self.uri, "images")
        parts = (sorted(u for u in storage.list_files(images, self.options) if _PART.search(u))
                 if storage.exists(images, self.options) else [])
        if not parts:
            missing = [n for n in ("images/part-*.parquet", "studies.parquet", "summary.json")
                       if n == "images/part-*.parquet" or not storage.exists(storage.join(self.uri, n), self.options)]
            raise _not_a_run(self.uri, f"{', '.join(missing)} missing")
        self.parts = parts
        self.summary = self._read_summary()
        self.complete = self.summary is not None
        # The columns the run's files hold: the last scored part's (and the rejects'): a run
        # written by one version has one schema; a resumed one across versions reads missing as null.
        self.columns = self._columns()
        self.unavailable = {why: f"this run's image rows have no {col} column (scored before it was recorded)"
                            for col, why in _OPTIONAL.items() if col not in self.columns}
        fs, _ = storage.resolve(self.uri, self.options)
        paths = [storage.resolve(p, self.options)[1] for p in parts]
        self.dataset = pads.dataset(paths, schema=IMAGE_RESULT_SCHEMA, format="parquet", filesystem=fs)
        self._fs = fs
        # Each part file holds one chunk (part-<chunk_id>.parquet): a study's rows are read from its
        # chunks' files only, not by scanning the ~4,000 parts of a million-image run.
        self._part_of_chunk = {int(_PART.search(u).group(1)): path for u, path in zip(parts, paths)
                               if _PART.search(u).group(1).isdigit()}
        self.models = self.summary.get("models") if self.summary else self._run_json().get("models")
        self._con = duckdb.connect()
        self._con.execute("SET threads TO 2")
        self._con.register("images", self.dataset)
        self._operating_points = self._read_operating_points()
        self._build_studies()

    # ------------------------------------------------------------------ opening
    def _read_summary(self) -> dict[str, Any] | None:
        uri = storage.join(self.uri, "summary.json")
        if not storage.exists(uri, self.options):
            return None
        try:
            return json.loads(storage.read_bytes(uri, self.options))
        except (ValueError, storage.StorageError) as exc:
            raise RunError(f"{uri} cannot be read as JSON ({exc}); it should be what `fracray score` wrote") from None

    def _run_json(self) -> dict[str, Any]:
        try:
            return json.loads(storage.read_bytes(storage.join(self.uri, "_work", "run.json"), self.options))
        except Exception:  # noqa: BLE001 - optional: only the model index's name comes from it
            return {}

    def _columns(self) -> set[str]:
        scored = [p for p in self.parts if not p.endswith("part-rejects.parquet")] or self.parts
        for uri in (scored[0], scored[-1]):
            try:
                fs, path = storage.resolve(uri, self.options)
                with fs.open_input_file(path) as handle:
                    names = set(pq.read_schema(handle).names)
            except Exception as exc:  # noqa: BLE001 - any reader error: the file is not Parquet
                raise RunError(f"{uri} is not a readable Parquet file ({type(exc).__name__}: {exc}). Rerun "
                               f"`fracray score` with the same --output to rewrite it (delete it first).") from None
            missing = {"image_uri", "study_id", "fracture_probability"} - names
            if missing:
                raise RunError(f"{uri} is not a scoring part file: it lacks {sorted(missing)}. {RUN_HELP}.")
        return names

    def _read_operating_points(self) -> dict[str, dict[str, float]]:
        """{operating point: {classifier name as in the rows: threshold}} from the run's model index,
        where it can be read; {} otherwise (then only "run" and numbers are offered)."""
        if not self.models:
            return {}
        try:
            index = read_model_index(self.models, self.options)
            points: dict[str, dict[str, float]] = {}
            for bundle in index.classifiers.values():
                meta = read_bundle_meta(bundle, self.options)
                name = bundle_name(bundle, meta)
                points.setdefault("default", {})[name] = float(meta.threshold)
                for point, spec in (meta.operating_points or {}).items():
                    points.setdefault(point, {})[name] = float(spec["threshold"])
            return points
        except Exception:  # noqa: BLE001 - the model index moved or is private: the run still reviews
            return {}

    @property
    def operating_points(self) -> list[str]:
        return ["run"] + sorted(self._operating_points)

    def _threshold_sql(self, operating_point: str) -> tuple[str, list]:
        """SQL for an image row's threshold at the operating point, and its parameters."""
        if operating_point in ("run", "", None):
            return "threshold", []
        value = parse_threshold(operating_point)
        if value is not None:
            return "?", [value]
        if operating_point not in self._operating_points:
            raise ValueError(f"Unknown operating point {operating_point!r}; this run offers {self.operating_points} "
                             f"or a number in [0, 1]")
        table = f"op_{re.sub(r'[^A-Za-z0-9_]', '_', operating_point)}"
        return f"COALESCE((SELECT t FROM {table} WHERE {table}.c = classifier), threshold)", []

    def _build_studies(self) -> None:
        for point, thresholds in self._operating_points.items():
            table = f"op_{re.sub(r'[^A-Za-z0-9_]', '_', point)}"
            self._con.execute(f"CREATE TEMP TABLE {table} (c VARCHAR, t DOUBLE)")
            if thresholds:
                self._con.executemany(f"INSERT INTO {table} VALUES (?, ?)", list(thresholds.items()))
        date = "MIN(study_date)" if "study_date" in self.columns else "CAST(NULL AS DATE)"
        try:
            # Per image: probability and its threshold at each offered point; per study: the study rule.
            point_cols = "".join(
                f", AVG(CASE WHEN status = 'ok' THEN {self._threshold_sql(p)[0]} END) AS thr_{i}"
                for i, p in enumerate(self.operating_points[1:]))
            self._con.execute(f"""
                CREATE TEMP TABLE studies AS
                SELECT study_id,
                       COUNT(*) AS images,
                       COUNT(*) FILTER (WHERE status = 'ok') AS scored,
                       MODE(body_part) FILTER (WHERE status = 'ok') AS body_part,
                       AVG(fracture_probability) FILTER (WHERE status = 'ok') AS probability,
                       MAX(fracture_probability) FILTER (WHERE status = 'ok') AS max_probability,
                       AVG(threshold) FILTER (WHERE status = 'ok') AS thr_run{point_cols},
                       {date} AS study_date,
                       ANY_VALUE(classifier) AS classifier,
                       MAX(known_label) AS known_label,
                       LIST(DISTINCT chunk_id) AS chunks
                FROM images WHERE study_id IS NOT NULL GROUP BY study_id""")
            self.study_count = self._con.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
            self.body_parts = [r[0] for r in self._con.execute(
                "SELECT DISTINCT body_part FROM studies WHERE body_part IS NOT NULL ORDER BY 1").fetchall()]
            self.rejected_files = self._con.execute(
                "SELECT COUNT(*) FROM images WHERE study_id IS NULL").fetchone()[0]
        except (duckdb.Error, pa.ArrowException, OSError) as exc:
            raise RunError(f"{self.uri}: the image rows cannot be read: {_short(exc)}. A part file may be corrupt: "
                           f"rerun `fracray score` with the same --output after deleting it.") from None

    # ------------------------------------------------------------------ queries
    def _threshold_column(self, operating_point: str) -> str:
        if operating_point in ("run", "", None):
            return "thr_run"
        if parse_threshold(operating_point) is not None:
            return "?"
        if operating_point not in self._operating_points:
            self._threshold_sql(operating_point)  # raises the clear error
        return f"thr_{self.operating_points[1:].index(operating_point)}"

    def _filtered(self, query: WorklistQuery) -> tuple[str, str, list]:
        """(SELECT of the filtered studies with their threshold and flag, ORDER BY, parameters).
        Call with the lock held, after :meth:`_set_reviewed`."""
        threshold = self._threshold_column(query.operating_point)
        thr = [parse_threshold(query.operating_point)] if threshold == "?" else []
        flagged = f"(probability IS NOT NULL AND probability >= {threshold})"
        where, params = ["TRUE"], []
        if query.body_part:
            where.append("body_part = ?")
            params.append(query.body_part)
        if query.label == "flagged":
            where.append(flagged)
            params += thr
        elif query.label == "not_flagged":
            where.append(f"(probability IS NOT NULL AND probability < {threshold})")
            params += thr
        elif query.label == "not_scored":
            where.append("probability IS NULL")
        if query.date_from or query.date_to:
            if "date" in self.unavailable:
                raise ValueError(f"The date filter is unavailable: {self.unavailable['date']}")
            for bound, op in ((query.date_from, ">="), (query.date_to, "<=")):
                if bound:
                    where.append(f"study_date {op} CAST(? AS DATE)")
                    params.append(bound)
        if query.reviewed == "yes":
            where.append("study_id IN (SELECT study_id FROM reviewed)")
        elif query.reviewed == "no":
            where.append("study_id NOT IN (SELECT study_id FROM reviewed)")
        order = {"probability": "probability DESC NULLS LAST", "date": "study_date DESC NULLS LAST",
                 "study": "study_id"}[query.sort]
        select = (f"SELECT study_id, images, scored, body_part, probability, max_probability, {threshold} AS threshold, "
                  f"{flagged} AS flagged, study_date, classifier, known_label, "
                  f"study_id IN (SELECT study_id FROM reviewed) AS reviewed FROM studies WHERE {' AND '.join(where)}")
        return select, f"flagged DESC, {order}, study_id", thr * 2 + params

    def _set_reviewed(self, reviewed_ids: set[str] | None) -> None:
        self._con.execute("CREATE OR REPLACE TEMP TABLE reviewed (study_id VARCHAR PRIMARY KEY)")
        if reviewed_ids:
            table = pa.table({"study_id": pa.array(sorted(reviewed_ids), pa.string())})
            self._con.register("reviewed_arrow", table)
            self._con.execute("INSERT INTO reviewed SELECT study_id FROM reviewed_arrow")
            self._con.unregister("reviewed_arrow")

    def worklist(self, query: WorklistQuery, reviewed_ids: set[str] | None = None) -> dict[str, Any]:
        """One page of studies: flagged first, then by probability (or date, study), with the total."""
        with self._lock:
            self._set_reviewed(reviewed_ids)
            select, order, params = self._filtered(query)
            total = self._con.execute(f"SELECT COUNT(*) FROM ({select})", params).fetchone()[0]
            cursor = self._con.execute(f"{select} ORDER BY {order} LIMIT ? OFFSET ?",
                                       params + [query.page_size, (query.page - 1) * query.page_size])
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        studies = [dict(zip(names, r)) for r in rows]
        for s in studies:
            s["study_date"] = s["study_date"].isoformat() if s["study_date"] is not None else None
        return {"total": total, "page": query.page, "page_size": query.page_size,
                "pages": max(1, -(-total // query.page_size)), "studies": studies}

    def neighbours(self, study_id: str, query: WorklistQuery, reviewed_ids: set[str] | None = None) -> dict:
        """The previous and next study in the worklist's order and filters (keyboard navigation)."""
        with self._lock:
            self._set_reviewed(reviewed_ids)
            select, order, params = self._filtered(query)
            row = self._con.execute(
                f"SELECT previous, next, position, total FROM (SELECT study_id, "
                f"LAG(study_id) OVER w AS previous, LEAD(study_id) OVER w AS next, ROW_NUMBER() OVER w AS position, "
                f"COUNT(*) OVER () AS total FROM ({select}) WINDOW w AS (ORDER BY {order})) WHERE study_id = ?",
                params + [study_id]).fetchone()
        if row is None:
            return {"previous": None, "next": None, "position": None, "total": None}
        return dict(zip(("previous", "next", "position", "total"), row))

    def _rows_of(self, study_ids: list[str], row_filter=None) -> pa.Table:
        """The image rows of these studies, read from the part files of their chunks only (every
        part where a row carries no chunk id, as an older run's may)."""
        with self._lock:
            found = self._con.execute(
                f"SELECT chunks FROM studies WHERE study_id IN ({', '.join('?' * len(study_ids))})",
                list(study_ids)).fetchall()
        chunks = {c for (row,) in found for c in (row or [None])}
        if chunks and None not in chunks and all(c in self._part_of_chunk for c in chunks):
            source = pads.dataset([self._part_of_chunk[c] for c in sorted(chunks)], schema=IMAGE_RESULT_SCHEMA,
                                  format="parquet", filesystem=self._fs)
        else:
            source = self.dataset
        wanted = pads.field("study_id").isin(study_ids)
        return source.to_table(filter=wanted if row_filter is None else wanted & row_filter)

    def study(self, study_id: str, operating_point: str = "run") -> dict[str, Any]:
        """A study's images (every column the study view shows) and its decision at the operating point."""
        threshold = self._threshold_column(operating_point)
        params_thr = [parse_threshold(operating_point)] if threshold == "?" else []
        with self._lock:
            head = self._con.execute(
                f"SELECT study_id, images, scored, body_part, probability, {threshold}, study_date, known_label "
                f"FROM studies WHERE study_id = ?", params_thr + [study_id]).fetchone()
        if head is None:
            raise KeyError(study_id)
        try:
            table = self._rows_of([study_id])
        except (pa.ArrowException, OSError) as exc:
            raise RunError(f"the image rows of study {study_id} cannot be read: {_short(exc)}") from None
        table = table.sort_by("image_uri")
        images = []
        for row in table.to_pylist():
            row.pop("chunk_id", None)
            if row.get("study_date") is not None:
                row["study_date"] = row["study_date"].isoformat()
            images.append(row)
        probability, thr = head[4], head[5]
        return {"study_id": head[0], "images": images, "image_count": head[1], "scored": head[2],
                "body_part": head[3], "probability": probability, "threshold": thr,
                "flagged": probability is not None and thr is not None and probability >= thr,
                "operating_point": operating_point or "run",
                "study_date": head[6].isoformat() if head[6] is not None else None, "known_label": head[7],
                "models": self.models}

    def image_row(self, study_id: str, image_uri: str) -> dict[str, Any] | None:
        """One image row of a study (None when the study has no such image)."""
        table = self._rows_of([study_id], pads.field("image_uri") == image_uri)
        return table.to_pylist()[0] if table.num_rows else None

    def images_of(self, study_ids: list[str]) -> pa.Table:
        """The image rows of these studies (the export's join)."""
        if not study_ids:
            return IMAGE_RESULT_SCHEMA.empty_table()
        return self._rows_of(list(study_ids))

    def describe(self) -> dict[str, Any]:
        return {"run": self.uri, "studies": self.study_count, "files": len(self.parts),
                "rejected_files": self.rejected_files, "complete": self.complete, "summary": self.summary,
                "models": self.models, "operating_points": self.operating_points, "body_parts": self.body_parts,
                "unavailable": self.unavailable}

    def close(self) -> None:
        self._con.close()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def open_run(uri: str, options: StorageOptions | None = None) -> ScoringRun:
    return ScoringRun(uri, options)
