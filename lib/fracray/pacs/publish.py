"""Send a scoring run's results back to the PACS the images came from.

For every study of a score_archive run over a ``dicomweb://`` input: a Structured Report and,
per scored image, a Secondary Capture overlay (``fracray.pacs.results``), stored by STOW-RS into
the same study. The UIDs are deterministic, so publishing a run again replaces the same
instances instead of adding copies. Nothing about the patient is logged: studies are counted,
and named by a key (a hash of the StudyInstanceUID), never by their UID.

Each study is on its own: one whose results cannot be built (its images no longer in the PACS,
unreadable) or that the PACS refuses (STOW-RS 4xx, Failed SOP Sequence) is reported with its
reason and written to ``<scores>/publish_failures.json`` (study UID, key, reason), and the others
are published. A PACS that does not answer (after dicomweb's retries) stops the run: every study
after it would fail the same way. A rerun publishes what is missing: a study whose SR and
overlays the PACS already holds is skipped (``force`` publishes it again), so after a failure,
fix the cause and run the same command again.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
from typing import Callable

from .. import dicomweb, storage
from ..data.manifest import read_table
from ..imaging.regions import findings_from_rows
from ..scoring.archive import read_image_results
from ..storage import StorageOptions
from .privacy import scrub, study_key
from .results import StudyFinding, overlay_secondary_capture, result_uid, structured_report

__all__ = ["PublishSummary", "publish_scores", "FAILURES_FILE"]

FAILURES_FILE = "publish_failures.json"


@dataclasses.dataclass
class PublishSummary:
    studies: int = 0            # studies whose SR (and overlays) were stored
    reports: int = 0
    overlays: int = 0
    skipped: int = 0            # studies with no scored image, or not from a DICOMweb source
    already: int = 0            # studies whose results the PACS holds already (not sent again)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # study key -> why it was not published


def _to_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _key(study_uid: str) -> str:
    return study_key(study_uid)


class _StudyFailed(Exception):
    """This study cannot be published as it is (the message is written to be logged)."""


def _held(target: str, study: str) -> set[str]:
    """SOP Instance UIDs the PACS holds in the study (QIDO-RS)."""
    try:
        return {uri.rsplit("/", 1)[1] for uri in dicomweb.list_instances(f"{target}/studies/{study}")}
    except dicomweb.DicomWebRefused:  # 404: the PACS holds nothing of it (or no longer)
        return set()


def _publish_study(study: str, scored: list[dict], verdict: dict, target: str, options, overlays: bool,
                   force: bool) -> tuple[int, int] | None:
    """Store one study's results; (reports, overlays) stored, or None when the PACS holds them all
    already. Raises _StudyFailed for what is wrong with this study, DicomWebUnavailable when the
    PACS does not answer."""
    import pydicom

    from ..imaging.decode import decode_image  # Pillow and the DICOM decoders: only when publishing

    name, _, version = scored[0]["classifier"].partition("@")
    sops = [dicomweb.parse(row["image_uri"]).instance for row in scored]
    wanted = {result_uid(study, name, "sr")} | ({result_uid(study, name, f"sc:{sop}") for sop in sops}
                                                 if overlays else set())
    if not force and wanted <= _held(target, study):
        return None
    sources, pixels = [], {}
    for row in scored:
        try:
            data = storage.read_bytes(row["image_uri"], options)
        except (storage.StorageError, dicomweb.DicomWebError, OSError) as exc:
            cause = exc.__cause__ if isinstance(exc, storage.StorageError) and exc.__cause__ else exc
            if isinstance(cause, dicomweb.DicomWebUnavailable):
                raise cause from exc
            # The DICOMweb message names the service and its answer; the URI (UIDs) is left out.
            why = str(cause) if isinstance(cause, dicomweb.DicomWebError) else type(cause).__name__
            raise _StudyFailed(f"a scored image could not be read back from the PACS ({why})") from exc
        try:
            sources.append(pydicom.dcmread(io.BytesIO(data)))
            pixels[str(sources[-1].SOPInstanceUID)] = decode_image(data).pixels
        except Exception as exc:
            raise _StudyFailed(f"a scored image could not be read ({type(exc).__name__})") from exc
    try:
        finding = StudyFinding(
            fracture_probability=float(verdict["fracture_probability"]), threshold=float(verdict["threshold"]),
            label=int(verdict["label"]), model_name=name, model_version=version or "unknown",
            regions={str(ds.SOPInstanceUID): findings_from_rows(row["findings"]) or []
                     for ds, row in zip(sources, scored)})
        instances = [_to_bytes(structured_report(sources, finding))]
        if overlays:
            instances += [_to_bytes(overlay_secondary_capture(ds, pixels[str(ds.SOPInstanceUID)], finding))
                          for ds in sources]
    except Exception as exc:  # these images and this verdict do not make valid results
        raise _StudyFailed(f"its results could not be built ({type(exc).__name__}: {scrub(str(exc), sources)})") \
            from exc
    try:
        dicomweb.store_instances(target, instances)
    except dicomweb.DicomWebRefused as exc:
        raise _StudyFailed(f"the PACS refused the results: {exc}") from exc
    return 1, len(instances) - 1


def publish_scores(scores: str, pacs: str | None = None, *, options: StorageOptions | None = None,
                   overlays: bool = True, force: bool = False, log: Callable[[str], None] = print) -> PublishSummary:
    """Publish the results of the score_archive run in ``scores`` to ``pacs`` (a DICOMweb service
    URI; default: the service the run's images came from). Studies whose results the PACS holds
    already are skipped unless ``force``. Studies that fail are in ``summary.failed`` and in
    ``<scores>/publish_failures.json``; the others are published. Raises DicomWebUnavailable
    (after writing what it has) when the PACS stops answering."""
    images = read_image_results(scores, options).to_pylist()
    by_study: dict[str, list[dict]] = {}
    for row in images:
        if dicomweb.is_dicomweb(row["image_uri"]):
            by_study.setdefault(dicomweb.parse(row["image_uri"]).study, []).append(row)
    if not by_study:
        raise ValueError(f"No image of the run in {scores} came from a DICOMweb source (score_archive --input "
                         f"dicomweb://...); nothing to publish")
    study_rows = {r["study_id"]: r for r in read_table(storage.join(scores, "studies.parquet"), options).to_pylist()}
    summary = PublishSummary()
    failures: dict[str, dict] = {}
    try:
        for study, rows in sorted(by_study.items()):
            scored = [r for r in rows if r["status"] == "ok"]
            if not scored:
                summary.skipped += 1
                continue
            target = pacs or dicomweb.parse(scored[0]["image_uri"]).uri_base
            key = _key(study)
            try:
                if study not in study_rows:
                    raise _StudyFailed("the run has no study row for it (studies.parquet)")
                stored = _publish_study(study, scored, study_rows[study], target, options, overlays, force)
            except _StudyFailed as exc:
                summary.failed[key] = str(exc)
                failures[key] = {"study_instance_uid": study, "reason": str(exc)}
                log(f"study {key}: not published: {exc}")
                continue
            if stored is None:
                summary.already += 1
                continue
            summary.studies += 1
            summary.reports += stored[0]
            summary.overlays += stored[1]
    finally:
        _write_failures(scores, options, failures, log)
        log(f"Published {summary.reports} report(s) and {summary.overlays} overlay(s) for {summary.studies} "
            f"study(ies); {summary.already} already in the PACS; {summary.skipped} skipped (nothing scored); "
            f"{len(summary.failed)} failed" + (f" (see {storage.join(scores, FAILURES_FILE)}; fix the cause and "
                                               f"run again: it publishes what is missing)" if summary.failed else ""))
    return summary


def _write_failures(scores: str, options, failures: dict[str, dict], log) -> None:
    """``<scores>/publish_failures.json``: this run's failures (empty when none), for a person."""
    record = {"written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "failed": failures}
    try:
        storage.write_bytes(storage.join(scores, FAILURES_FILE), json.dumps(record, indent=1).encode(), options)
    except (OSError, storage.StorageError) as exc:
        log(f"could not write {FAILURES_FILE} into {scores} ({type(exc).__name__})")
