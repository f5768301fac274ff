"""Radiograph pixels -> a DX or CR DICOM object as a modality writes it: patient, study, series
and equipment modules, BodyPartExamined, MONOCHROME1 or 2, compressed or not. For loading a
test PACS with real images (FracAtlas JPEGs) and for the tests."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import numpy as np

__all__ = ["StudyIdentity", "wrap_radiograph", "TRANSFER_SYNTAXES", "OMITTABLE"]

# What ``omit`` may leave out: the Type 2 patient and study attributes and the orientation.
OMITTABLE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
             "ReferringPhysicianName", "StudyID", "AccessionNumber", "PatientOrientation")

# Name -> transfer syntax UID (pydicom encodes each with the handlers that are dependencies).
TRANSFER_SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",        # Explicit VR Little Endian (uncompressed)
    "rle": "1.2.840.10008.1.2.5",             # RLE Lossless
    "jpeg-ls": "1.2.840.10008.1.2.4.80",      # JPEG-LS Lossless
    "jpeg2000": "1.2.840.10008.1.2.4.90",     # JPEG 2000 Lossless
}
_SOP_CLASS = {"DX": "1.2.840.10008.5.1.4.1.1.1.1",   # Digital X-Ray Image Storage - For Presentation
              "CR": "1.2.840.10008.5.1.4.1.1.1"}     # Computed Radiography Image Storage


@dataclasses.dataclass(frozen=True)
class StudyIdentity:
    patient_id: str
    patient_name: str
    study_uid: str
    accession: str
    study_date: str = "20261124"
    patient_birth_date: str = ""
    patient_sex: str = "O"


def wrap_radiograph(pixels: np.ndarray, study: StudyIdentity, *, series_uid: str, instance_number: int = 1,
                    modality: str = "DX", body_part: str | None = None, monochrome1: bool = False,
                    transfer_syntax: str = "explicit", sop_uid: str | None = None, laterality: str | None = None,
                    omit: Sequence[str] = ()) -> bytes:
    """A Part 10 DICOM file (bytes) holding ``pixels`` (2-D uint8 or uint16) as a radiograph.

    laterality: "R" or "L": the series' Laterality and, for DX, the Image Laterality.
    omit: Type 2 attributes to leave out, as many modality exports and anonymised archives do
    (any of :data:`OMITTABLE`, e.g. ``TYPE2_PATIENT_STUDY``: no PatientBirthDate, StudyID,
    ReferringPhysicianName, ...)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if modality not in _SOP_CLASS:
        raise ValueError(f"modality must be one of {sorted(_SOP_CLASS)}. Got {modality!r}")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}. Got {transfer_syntax!r}")
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"pixels must be a 2-D uint8 or uint16 image. Got {pixels.dtype} {pixels.shape}")
    unknown = sorted(set(omit) - set(OMITTABLE))
    if unknown:
        raise ValueError(f"omit takes Type 2 attributes ({', '.join(OMITTABLE)}). Got {unknown}")
    if laterality not in (None, "R", "L"):
        raise ValueError(f"laterality must be 'R', 'L' or None. Got {laterality!r}")
    bits = 8 if pixels.dtype == np.uint8 else 16
    stored = pixels if not monochrome1 else (np.iinfo(pixels.dtype).max - pixels).astype(pixels.dtype)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = study.patient_name, study.patient_id
    ds.PatientBirthDate, ds.PatientSex = study.patient_birth_date, study.patient_sex
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study.study_uid, study.study_date, "090000"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = study.accession, study.accession[:16], ""
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, 1, instance_number
    ds.Modality, ds.Manufacturer, ds.ConversionType = modality, "fracray test modality", "WSD"
    if body_part:
        ds.BodyPartExamined = body_part.upper()
    ds.PatientOrientation = ["L", "F"]
    if modality == "DX":
        ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if laterality:
        ds.Laterality = laterality
        if modality == "DX":
            ds.ImageLaterality = laterality
    for keyword in omit:
        if keyword in ds:
            del ds[keyword]
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    if transfer_syntax != "explicit":
        # Lossless: the same instance, so its UID stays (pydicom would otherwise make a new one).
        ds.compress(TRANSFER_SYNTAXES[transfer_syntax], generate_instance_uid=False)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
