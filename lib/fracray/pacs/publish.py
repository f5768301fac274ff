"""Send a scoring run's results back to the PACS the images came from.

For every study of a score_archive run over a ``dicomweb://`` input: a Structured Report and,
per scored image, a Secondary Capture overlay (``fracray.pacs.results``), stored by STOW-RS into
the same study. The UIDs are deterministic, so publishing a run again replaces the same
instances instead of adding copies. Nothing about the patient is logged: studies are counted,
not named.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Callable

from .. import dicomweb, storage
from ..data.manifest import read_table
from ..imaging.regions import findings_from_rows
from ..scoring.archive import read_image_results
from ..storage import StorageOptions
from .results import StudyFinding, overlay_secondary_capture, structured_report

__all__ = ["PublishSummary", "publish_scores"]


@dataclasses.dataclass
class PublishSummary:
    studies: int = 0            # studies whose SR (and overlays) were stored
    reports: int = 0
    overlays: int = 0
    skipped: int = 0            # studies with no scored image, or not from a DICOMweb source


def _to_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def publish_scores(scores: str, pacs: str | None = None, *, options: StorageOptions | None = None,
                   overlays: bool = True, log: Callable[[str], None] = print) -> PublishSummary:
    """Publish the results of the score_archive run in ``scores`` to ``pacs`` (a DICOMweb service
    URI; default: the service the run's images came from)."""
    import pydicom

    from ..imaging.decode import decode_image  # Pillow and the DICOM decoders: only when publishing

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
    for study, rows in sorted(by_study.items()):
        scored = [r for r in rows if r["status"] == "ok"]
        if not scored:
            summary.skipped += 1
            continue
        target = pacs or dicomweb.parse(scored[0]["image_uri"]).uri_base
        sources, pixels = [], {}
        for row in scored:
            data = storage.read_bytes(row["image_uri"], options)
            sources.append(pydicom.dcmread(io.BytesIO(data)))
            pixels[str(sources[-1].SOPInstanceUID)] = decode_image(data).pixels
        verdict = study_rows[study]  # the run's own study result (one study rule, in scoring)
        name, _, version = scored[0]["classifier"].partition("@")
        finding = StudyFinding(
            fracture_probability=float(verdict["fracture_probability"]), threshold=float(verdict["threshold"]),
            label=int(verdict["label"]),
            model_name=name, model_version=version or "unknown",
            regions={str(ds.SOPInstanceUID): findings_from_rows(row["findings"]) or []
                     for ds, row in zip(sources, scored)})
        instances = [_to_bytes(structured_report(sources, finding))]
        if overlays:
            instances += [_to_bytes(overlay_secondary_capture(ds, pixels[str(ds.SOPInstanceUID)], finding))
                          for ds in sources]
        dicomweb.store_instances(target, instances)
        summary.studies += 1
        summary.reports += 1
        summary.overlays += len(instances) - 1
    log(f"Published {summary.reports} report(s) and {summary.overlays} overlay(s) for {summary.studies} "
        f"study(ies); {summary.skipped} skipped (nothing scored)")
    return summary
