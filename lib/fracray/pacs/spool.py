"""The DICOM node's spool: received instances on disk until their study is classified, which
studies are due, and what happens when one fails (``fracray.pacs.failures``).

    spool/<study key>/<hash of the SOP Instance UID>.dcm     as received (written .part, then renamed)
    spool/.failed/<study key>/                                the dead letter: the images and failure.json

- A study is due when none of its instances has arrived for ``idle_s`` and its back-off, if
  any, has passed.
- Classified and stored: the study's folder is removed (unless more of it arrived meanwhile:
  then it is kept, and classified again whole). Refused by the service: dropped, nothing failed.
- A transient failure (``TransientFailure``, the destinations' errors, a local OSError) keeps the
  study and retries it after ``retry_backoff_s``, doubled each time up to ``max_backoff_s``;
  after ``max_attempts`` it is dead-lettered. A permanent one (``PermanentFailure``, or a bug of
  ours) is dead-lettered at once.
- ``list_failed`` shows the dead letter; ``replay_failed`` moves studies back into the spool.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .failures import PermanentFailure, StudyRefused, TransientFailure
from .privacy import scrub

if TYPE_CHECKING:
    from .listener import ListenerStats

__all__ = ["Spool", "list_failed", "replay_failed", "FAILURE_FILE"]

logger = logging.getLogger(__name__)

_FAILED = ".failed"
_PART = ".part"
FAILURE_FILE = "failure.json"


def _instance_file(sop_uid: str) -> str:
    return hashlib.sha256(sop_uid.encode()).hexdigest()[:24] + ".dcm"


def _snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.dcm")}


class Spool:
    """One listener's spool folder and the schedule of its studies (one listener per spool).

    ``logged_errors``: transient error types whose message is written to be logged (the
    destinations'); another OSError is logged by its type only."""

    def __init__(self, root: str | os.PathLike, stats: "ListenerStats", *, idle_s: float, max_attempts: int,
                 retry_backoff_s: float, max_backoff_s: float,
                 logged_errors: tuple[type[BaseException], ...] = ()):
        self.root = Path(root)
        self.stats = stats
        self.idle_s = idle_s
        self.max_attempts = max_attempts
        self.retry_backoff_s = retry_backoff_s
        self.max_backoff_s = max_backoff_s
        self.logged_errors = logged_errors
        self._lock = threading.Lock()           # spool writes vs. a study's clean-up
        self._attempts: Counter[str] = Counter()
        self._next_try: dict[str, float] = {}
        self._receiving: set[str] = set()
        # Per study: what its processing keeps between attempts (the results built, so a retry
        # only sends them again); dropped when the study leaves the spool.
        self.kept: dict[str, Any] = {}

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in self.root.glob(f"*/*{_PART}"):  # writes cut short by a crash; the sender got no success
            stale.unlink(missing_ok=True)

    def write(self, key: str, sop_uid: str, data: bytes) -> bool:
        """Spool one instance durably (fsync, then rename); True when it is the first of its study
        since the study was last taken up. Raises OSError (spool full or not writable)."""
        folder = self.root / key
        target = folder / _instance_file(sop_uid)
        with self._lock:
            folder.mkdir(exist_ok=True, mode=0o700)
            part = target.with_suffix(_PART)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, target)
            first = key not in self._receiving
            self._receiving.add(key)
            self._next_try.pop(key, None)  # new images: classify when the study is idle again
        return first

    def pending(self) -> list[str]:
        """Keys of the studies in the spool (not yet classified, or waiting for a retry)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def due(self) -> list[str]:
        """The studies to classify now, the longest idle first."""
        now, due = time.time(), []
        for key in self.pending():
            files = list((self.root / key).glob("*.dcm"))
            if not files:
                continue
            try:
                last = max(f.stat().st_mtime for f in files)
            except FileNotFoundError:  # being cleaned up
                continue
            if now - last >= self.idle_s and time.monotonic() >= self._next_try.get(key, 0.0):
                due.append((last, key))
        return [key for _, key in sorted(due)]

    def process(self, key: str, work: Callable[[Path, dict[str, int]], str]) -> None:
        """Run ``work(folder, snapshot)`` on one study (snapshot: its files as of now, name ->
        mtime) and act on how it ends: clean up, retry later or dead-letter. ``work`` returns a
        summary to log."""
        folder = self.root / key
        snapshot = _snapshot(folder)
        with self._lock:
            self._receiving.discard(key)
        try:
            summary = work(folder, snapshot)
        except StudyRefused as exc:
            self.stats.refused += 1
            logger.warning("study %s: %s; no result written, study dropped from the spool", key, exc)
            self._clean_up(key, snapshot)
        except PermanentFailure as exc:
            self.stats.failures += 1
            self.stats.permanent += 1
            self._dead_letter(key, "permanent", str(exc), exc)
        except Exception as exc:
            self.stats.failures += 1
            if not isinstance(exc, (TransientFailure, *self.logged_errors, OSError)):
                # A bug of ours, not the service's or the PACS's: trying again changes nothing.
                self.stats.permanent += 1
                self._dead_letter(key, "permanent", f"an internal error ({type(exc).__name__}: "
                                  f"{scrub(str(exc), [])})", exc)
                return
            self._attempts[key] += 1
            attempt = self._attempts[key]
            # Our own messages (hosts, statuses) are logged as they are; an OSError's text is not
            # (a path in the spool names a study only by its key, but be safe): its type is.
            why = str(exc) if isinstance(exc, (TransientFailure, *self.logged_errors)) else \
                f"{type(exc).__name__} (a local I/O error)"
            if attempt >= self.max_attempts:
                self.stats.given_up += 1
                self._dead_letter(key, "transient", f"{attempt} attempts failed; the last: {why}", exc)
                return
            delay = min(self.max_backoff_s, self.retry_backoff_s * 2 ** (attempt - 1))
            self._next_try[key] = time.monotonic() + delay
            logger.warning("study %s: attempt %d of %d failed: %s; kept in the spool, retrying in %.3g s", key,
                           attempt, self.max_attempts, why, delay)
        else:
            # The spool first, then the count: whoever sees the study counted done (a test, a
            # supervisor) also sees it gone from the spool.
            self._clean_up(key, snapshot)
            self.stats.studies += 1
            logger.info("study %s: %s", key, summary)

    def _dead_letter(self, key: str, kind: str, reason: str, exc: BaseException) -> None:
        """Move the study's spool to spool/.failed/<key>/ with failure.json; log it once."""
        folder = self.root / key
        moved = self.root / _FAILED / key
        attempts = self._attempts.pop(key, 0) or 1
        self._next_try.pop(key, None)
        self.kept.pop(key, None)
        record = {"study": key, "kind": kind, "reason": reason, "attempts": attempts,
                  "failed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "replay": f"listen.py --spool {self.root} --replay {key}",
                  "traceback": "".join(traceback.format_exception(exc))}
        with self._lock:
            moved.parent.mkdir(exist_ok=True, mode=0o700)
            if moved.exists():  # dead-lettered before: keep what it had, add what came since
                for f in folder.glob("*.dcm"):
                    os.replace(f, moved / f.name)
                shutil.rmtree(folder, ignore_errors=True)
            else:
                os.replace(folder, moved)
            fd = os.open(moved / FAILURE_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1)
        what = "permanent failure, not retried" if kind == "permanent" else "gave up"
        logger.error("study %s: %s: %s; dead-lettered to %s (replay: listen.py --spool %s --replay %s)", key, what,
                     reason, moved, self.root, key)

    def _clean_up(self, key: str, snapshot: dict[str, int]) -> None:
        folder = self.root / key
        self._attempts.pop(key, None)
        self._next_try.pop(key, None)
        self.kept.pop(key, None)
        with self._lock:
            now = _snapshot(folder) if folder.is_dir() else {}
            if now == snapshot:
                shutil.rmtree(folder, ignore_errors=True)
                return
        # More of the study arrived meanwhile: keep it all, so that the next round classifies
        # the whole study and its results replace these.
        logger.info("study %s: %d more instance(s) arrived while it was classified; it will be classified again "
                    "with them", key, len(set(now) - set(snapshot)) or len(now))


def list_failed(spool: str | os.PathLike) -> list[dict]:
    """The dead-lettered studies of a spool: each one's failure.json (study key, kind, reason,
    attempts, time) without the traceback, plus how many images it holds; oldest first."""
    folder = Path(spool) / _FAILED
    found = []
    for study in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not study.is_dir():
            continue
        try:
            record = json.loads((study / FAILURE_FILE).read_text())
        except (OSError, ValueError):
            record = {"study": study.name, "kind": "unknown", "reason": f"no readable {FAILURE_FILE}"}
        record.pop("traceback", None)
        record["images"] = len(list(study.glob("*.dcm")))
        found.append(record)
    return sorted(found, key=lambda r: str(r.get("failed_at", "")))


def replay_failed(spool: str | os.PathLike, keys: list[str] | None = None) -> list[str]:
    """Move dead-lettered studies (``keys``, or all of them) back into the spool, where a running
    listener, or the next one started, classifies them again; their failure.json is kept as
    ``spool/.failed/<key>.replayed.json``. Returns the keys moved. Raises ValueError for a key
    that is not in the dead letter."""
    root = Path(spool)
    failed = root / _FAILED
    present = sorted(p.name for p in failed.iterdir() if p.is_dir()) if failed.is_dir() else []
    wanted = present if keys is None else list(keys)
    unknown = sorted(set(wanted) - set(present))
    if unknown:
        raise ValueError(f"Not in the dead letter ({failed}): {', '.join(unknown)}. There: "
                         f"{', '.join(present) or 'nothing'}")
    for key in wanted:
        source, target = failed / key, root / key
        record = source / FAILURE_FILE
        if record.exists():
            os.replace(record, failed / f"{key}.replayed.json")
        target.mkdir(exist_ok=True, mode=0o700)
        for f in source.glob("*.dcm"):
            os.replace(f, target / f.name)
        shutil.rmtree(source, ignore_errors=True)
        logger.info("study %s: moved from the dead letter back into the spool", key)
    return wanted
