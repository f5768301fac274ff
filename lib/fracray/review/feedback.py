"""Reviewers' feedback on a scoring run: one :class:`FeedbackRecord` per verdict.

A verdict is about a whole study (``image_id`` and ``finding`` None), about one finding of one
image (``finding`` is the index into that image row's ``findings`` list), or a missed fracture
the reviewer drew (``verdict == "missed"``, ``box`` in the image's pixels).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re
import sqlite3
import threading
from pathlib import Path
from typing import Sequence

from .. import storage

__all__ = ["VERDICTS", "FeedbackRecord", "FeedbackStore", "open_store", "default_store_path", "read_feedback"]

VERDICTS: tuple[str, ...] = ("agree", "disagree", "missed")


@dataclasses.dataclass(frozen=True)
class FeedbackRecord:
    """One reviewer's verdict.

    study_id:   the scoring run's ``study_id``
    image_id:   the image row's ``image_uri`` (None for a verdict on the whole study)
    finding:    index into that image's ``findings`` (None for a study or image verdict, and for "missed")
    verdict:    "agree" | "disagree" | "missed"
    box:        (x0, y0, x1, y1) in the image's pixels for "missed", else None
    reviewer:   the reviewer's name
    created_at: when it was recorded (timezone-aware UTC)
    """

    study_id: str
    image_id: str | None
    finding: int | None
    verdict: str
    box: tuple[float, float, float, float] | None
    reviewer: str
    created_at: _dt.datetime

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, not {self.verdict!r}")
        if not self.study_id:
            raise ValueError("study_id is empty")
        if not str(self.reviewer).strip():
            raise ValueError("reviewer is empty: feedback needs the reviewer's name")
        if self.finding is not None and self.image_id is None:
            raise ValueError("a finding's verdict needs the image_id it belongs to")
        if self.verdict == "missed":
            if self.box is None or self.image_id is None:
                raise ValueError("a missed fracture needs the image_id and the box drawn on it")
            box = tuple(float(v) for v in self.box)
            if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
                raise ValueError(f"box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, not {self.box!r}")
            object.__setattr__(self, "box", box)
        elif self.box is not None:
            raise ValueError("only a 'missed' verdict carries a box")

    @property
    def scope(self) -> str:
        """"study", "image", "finding" or "missed": what the verdict is about."""
        if self.verdict == "missed":
            return "missed"
        if self.finding is not None:
            return "finding"
        return "image" if self.image_id is not None else "study"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["box"] = list(self.box) if self.box is not None else None
        d["created_at"] = self.created_at.isoformat()
        return d


# ----------------------------------------------------------------------------- stores

_COLUMNS = ("run", "study_id", "image_id", "finding", "verdict", "box_x0", "box_y0", "box_x1", "box_y1",
            "reviewer", "created_at")


def default_store_path(run: str) -> str:
    """Where feedback goes without --feedback: beside a local run (RUN/review/feedback.sqlite); for an
    s3:// run, ./fracray-review-feedback.sqlite in the working folder."""
    if storage.is_remote(run):
        return "fracray-review-feedback.sqlite"
    return str(Path(storage.normalize(run)) / "review" / "feedback.sqlite")


class FeedbackStore:
    """Feedback of one scoring run in SQL: an embedded SQLite file, or PostgreSQL given a
    ``postgresql://`` URL. Many runs may share one database (rows carry the run's URI).
    Thread-safe: one connection behind a lock."""

    def __init__(self, target: str, run: str):
        # The run's one spelling (absolute, no trailing slash): the app opens "scores/", a job
        # `fracray monitor /data/scores`; both must find the same rows.
        self.run = storage.normalize(run).rstrip("/") or run
        self.target = target
        self.kind = "postgresql" if target.startswith(("postgresql://", "postgres://")) else "sqlite"
        self._lock = threading.Lock()
        if self.kind == "postgresql":
            try:
                import psycopg  # noqa: F401 - here for its clear message when missing
            except ImportError as exc:  # pragma: no cover - psycopg is a dependency
                raise RuntimeError("PostgreSQL feedback needs psycopg (pip install 'psycopg[binary]')") from exc
            self._con = self._connect_postgresql()
            self._mark = "%s"
            key = "BIGSERIAL PRIMARY KEY"
        else:
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._con = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
                self._con.execute("PRAGMA journal_mode=WAL")
            except sqlite3.Error as exc:
                raise ConnectionError(f"Cannot open the feedback file {path}: {exc}") from None
            self._mark = "?"
            key = "INTEGER PRIMARY KEY AUTOINCREMENT"
        with self._lock:
            self._con.execute(f"""CREATE TABLE IF NOT EXISTS fracray_feedback (
                id {key}, run TEXT NOT NULL, study_id TEXT NOT NULL, image_id TEXT, finding INTEGER,
                verdict TEXT NOT NULL, box_x0 DOUBLE PRECISION, box_y0 DOUBLE PRECISION, box_x1 DOUBLE PRECISION,
                box_y1 DOUBLE PRECISION, reviewer TEXT NOT NULL, created_at TEXT NOT NULL)""")
            self._con.execute("CREATE INDEX IF NOT EXISTS fracray_feedback_study ON fracray_feedback (run, study_id)")

    def describe(self) -> str:
        return "PostgreSQL" if self.kind == "postgresql" else f"SQLite ({self.target})"

    def _connect_postgresql(self):
        import psycopg

        try:
            return psycopg.connect(self.target, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise ConnectionError(f"Cannot connect to the feedback database: {_redact(str(exc))}") from None

    def _execute(self, sql: str, params: Sequence = ()):
        sql = sql.replace("?", self._mark)
        with self._lock:
            if self.kind != "postgresql":
                cursor = self._con.execute(sql, tuple(params))
                return cursor.fetchall() if cursor.description else None
            import psycopg

            if self._con.closed or self._con.broken:  # the database restarted, the network dropped
                self._con = self._connect_postgresql()
            try:
                cursor = self._con.execute(sql, tuple(params))
            except psycopg.OperationalError as exc:
                # A connection that went away since the last request: a read runs again on a new one;
                # a write is not repeated (it may have landed): the reviewer is told to send it again.
                self._con = self._connect_postgresql()
                if not sql.lstrip().upper().startswith("SELECT"):
                    raise ConnectionError(f"The feedback database connection was lost ({_redact(str(exc))[:200]}); "
                                          f"it is open again: send the verdict again") from None
                cursor = self._con.execute(sql, tuple(params))
            return cursor.fetchall() if cursor.description else None

    def add(self, record: FeedbackRecord) -> int:
        box = list(record.box) if record.box is not None else [None] * 4
        values = [self.run, record.study_id, record.image_id, record.finding, record.verdict, *box,
                  record.reviewer.strip(), record.created_at.astimezone(_dt.timezone.utc).isoformat()]
        sql = (f"INSERT INTO fracray_feedback ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
               " RETURNING id")
        return int(self._execute(sql, values)[0][0])

    def delete(self, feedback_id: int) -> bool:
        rows = self._execute("DELETE FROM fracray_feedback WHERE id = ? AND run = ? RETURNING id",
                             [feedback_id, self.run])
        return bool(rows)

    def records(self, study_id: str | None = None) -> list[tuple[int, FeedbackRecord]]:
        """(id, record) of this run, oldest first; one study's when ``study_id`` is given."""
        where, params = "run = ?", [self.run]
        if study_id is not None:
            where += " AND study_id = ?"
            params.append(study_id)
        rows = self._execute(f"SELECT id, {', '.join(_COLUMNS[1:])} FROM fracray_feedback WHERE {where} "
                             f"ORDER BY id", params)
        out = []
        for r in rows:
            box = tuple(r[5:9]) if r[5] is not None else None
            out.append((int(r[0]), FeedbackRecord(study_id=r[1], image_id=r[2], finding=r[3], verdict=r[4], box=box,
                                                  reviewer=r[9], created_at=_dt.datetime.fromisoformat(r[10]))))
        return out

    def all(self) -> list[FeedbackRecord]:
        return [r for _, r in self.records()]

    def reviewed_study_ids(self) -> set[str]:
        return {r[0] for r in self._execute("SELECT DISTINCT study_id FROM fracray_feedback WHERE run = ?", [self.run])}

    def close(self) -> None:
        with self._lock:
            self._con.close()


def _redact(text: str) -> str:
    """A database error without the password a URL may carry."""
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def open_store(target: str | None, run: str) -> FeedbackStore:
    """The feedback store: ``target`` a postgresql:// URL, a SQLite file path, or None (the default path)."""
    return FeedbackStore(target or default_store_path(run), run)


def read_feedback(target: str | None, run: str) -> list[FeedbackRecord]:
    """Every feedback record of a run, oldest first (``target`` as :func:`open_store`)."""
    store = open_store(target, run)
    try:
        return store.all()
    finally:
        store.close()
