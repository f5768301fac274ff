"""Which DICOM instances are classified: one rule for every way in.

The DICOM node (``fracray.pacs.listener``, C-STORE) and the service's STOW-RS endpoint
(``fracray.serving.app``) both ask :func:`refusal` of each instance they receive; an instance
it refuses is acknowledged (C-STORE) or listed as failed (STOW-RS) and never classified.

Classified: single-frame CR, DX (for presentation and for processing) and Secondary Capture
images (digitised films) that carry pixel data and their StudyInstanceUID and SOPInstanceUID,
and that are not fracray's own results sent back. Everything else is refused with a reason
that names the SOP class, never a header value that identifies someone.

pydicom is imported only to name a SOP class: this module is light enough for any layer above.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["RADIOGRAPH_SOP_CLASSES", "OWN_MANUFACTURER", "Refusal", "refusal", "sop_class_name",
           "UNREADABLE_REASONS"]

# What is classified: the projection radiograph storage classes (and digitised films as SC).
RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",                   # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",    # Secondary Capture Image Storage (digitised films)
}
# The Manufacturer fracray writes into its results (SR, overlay SCs): such an instance routed
# back is not classified again.
OWN_MANUFACTURER = "fracray"
# Refusals that mean the instance cannot be understood (rather than: it is not something fracray
# classifies). STOW-RS reports these with FailureReason 0xC000, the others with 0x0122.
UNREADABLE_REASONS = ("missing_uids", "invalid_number_of_frames", "unreadable_header")


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why an instance is not classified. reason: a stable name (not_a_radiograph, own_result,
    multi_frame, invalid_number_of_frames, no_pixel_data, missing_uids, unreadable_header);
    detail: a sentence naming the SOP class."""

    reason: str
    detail: str


def sop_class_name(sop_class: str) -> str:
    """The SOP class's name where pydicom knows it, else "SOP class <uid>"."""
    from pydicom import uid as dicom_uid

    try:
        name = dicom_uid.UID(sop_class).name
    except Exception:  # not a UID string at all
        name = sop_class
    return name if name and name != sop_class else f"SOP class {sop_class or '(none)'}"


def refusal(ds: Any, sop_class: str | None = None) -> Refusal | None:
    """None if ``ds`` (a pydicom Dataset, pixels unread is fine) is classified, else why not.

    ``sop_class``: the SOP class the instance arrived as (a C-STORE's presentation context);
    None: the data set's own SOPClassUID (STOW-RS). A header element that does not parse is a
    refusal (unreadable_header), never an exception."""
    try:
        return _refusal(ds, sop_class)
    except Exception as exc:  # a header element that does not parse
        name = sop_class_name(str(sop_class)) if sop_class else "an instance"
        return Refusal("unreadable_header", f"{name} with an unreadable header ({type(exc).__name__})")


def _refusal(ds: Any, sop_class: str | None) -> Refusal | None:
    if sop_class is None:
        sop_class = str(ds.get("SOPClassUID", "") or "").strip()
        if not sop_class:  # bytes that parse as nothing much (pydicom's force=True): not understood
            return Refusal("missing_uids", "an instance without a SOPClassUID (is it DICOM?)")
    name = sop_class_name(sop_class)
    if sop_class not in RADIOGRAPH_SOP_CLASSES:
        return Refusal("not_a_radiograph", f"{name} is not a radiograph")
    if str(ds.get("Manufacturer", "")).strip().lower() == OWN_MANUFACTURER:
        return Refusal("own_result", f"a {OWN_MANUFACTURER} result ({name}), not classified again")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return Refusal("invalid_number_of_frames", f"{name} with an invalid NumberOfFrames")
    if frames > 1:
        return Refusal("multi_frame", f"multi-frame {name} ({frames} frames)")
    if "PixelData" not in ds:
        return Refusal("no_pixel_data", f"{name} without pixel data")
    if not str(ds.get("StudyInstanceUID", "") or "").strip() or not str(ds.get("SOPInstanceUID", "") or "").strip():
        return Refusal("missing_uids", f"{name} without a StudyInstanceUID or SOPInstanceUID")
    return None
