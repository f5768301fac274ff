"""A study's result as DICOM a PACS files with the patient's study: a Structured Report and a
secondary-capture image.

- ``structured_report``: a Comprehensive SR holding a TID 1500 Measurement Report (highdicom):
  the study's finding (fracture or none), its probability, threshold and operating point, the
  model (name, version) as the observing device and algorithm, and per finding the region as
  an SCOORD polyline on the source image it was found in, with its score.
- ``overlay_secondary_capture``: the radiograph with the findings' boxes and scores burned in
  under a banner that says what it is ("AI RESULT - NOT FOR DIAGNOSIS ALONE").

Both go into the source study (StudyInstanceUID and the patient/study modules copied by
highdicom from the sources), each in a new series. Their UIDs are derived from the study, the
model and what they are, so that scoring the same study with the same model again writes the
same instances (a PACS replaces or ignores them) instead of piling up copies.

Sources often lack Type 2 attributes (modality exports and anonymised archives leave out
PatientBirthDate, StudyID, ReferringPhysicianName, ...). A derived object may leave those empty,
so they are written empty (``with_type2``) rather than refused; Type 2C Laterality of the
overlay's General Series is written where its condition holds (a paired or unknown body part):
the source's Laterality or Image Laterality (R or L) when it has one, else empty ("unknown").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..imaging.instances import OWN_MANUFACTURER

__all__ = ["StudyFinding", "result_uid", "structured_report", "overlay_secondary_capture", "BANNER",
           "FRACTURE", "NO_FRACTURE", "FRACTURE_PROBABILITY", "TYPE2_PATIENT_STUDY", "UNPAIRED_BODY_PARTS",
           "with_type2", "series_laterality"]

BANNER = "AI RESULT - NOT FOR DIAGNOSIS ALONE"
MANUFACTURER = OWN_MANUFACTURER  # what the listener and STOW-RS recognise and do not classify again

# Coded concepts. SNOMED CT for the finding; the probability, threshold and operating point have
# no standard code, so they are in a private coding scheme that says whose they are.
_SCHEME = "99FRACRAY"


def _code(value: str, scheme: str, meaning: str):
    from pydicom.sr.coding import Code

    return Code(value, scheme, meaning)


FRACTURE = ("72704001", "SCT", "Fracture")
NO_FRACTURE = ("373572006", "SCT", "Clinical finding absent")
FRACTURE_PROBABILITY = ("fracture-probability", _SCHEME, "Fracture probability")
_THRESHOLD = ("decision-threshold", _SCHEME, "Decision threshold")
_REGION_SCORE = ("region-score", _SCHEME, "Fracture map peak probability")
_PROCEDURE = ("363680008", "SCT", "Radiographic imaging procedure")
_NO_UNITS = ("1", "UCUM", "no units")


@dataclasses.dataclass(frozen=True)
class StudyFinding:
    """What the SR reports for one study (the HTTP study answer or score_archive's study row)."""

    fracture_probability: float
    threshold: float
    label: int
    model_name: str                   # e.g. "fracture_wrist:efficientnet_lite0"
    model_version: str                # the bundle's creation time
    operating_point: str = "default"
    # Per source SOPInstanceUID: that image's findings, each {"box": [x0, y0, x1, y1], "score"}
    # in the image's own pixels (x1, y1 exclusive).
    regions: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 <= self.fracture_probability <= 1.0 or not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"probability and threshold must be in [0, 1]. Got {self.fracture_probability}, "
                             f"{self.threshold}")


def result_uid(study_uid: str, model_name: str, what: str) -> str:
    """A UID that is the same whenever the same model reports on the same study (``what``: which
    object: "sr-series", "sr", "sc-series", "sc:<source SOP UID>")."""
    from pydicom.uid import generate_uid

    return generate_uid(prefix="2.25.", entropy_srcs=[study_uid, model_name, what])


# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1): a source
# may lack them; a derived object in the same study must have them, empty when unknown.
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")

# Body Part Examined terms of unpaired structures (PS3.16 Annex L, "Unpaired"): for these the
# General Series' Laterality (Type 2C) must be absent; for every other term, and for an absent
# BodyPartExamined, it must be present (with R or L, or empty when unknown). The list is the one
# dciodvfy (dicom3tools) applies, checked term by term against it.
UNPAIRED_BODY_PARTS = frozenset("""
    ABDOMEN ABDOMENPELVIS AORTA BACK BLADDER BRAIN CEREBELLUM CERVIX CHEST CHESTABDOMEN CHESTABDPELVIS
    CIRCLEOFWILLIS COCCYX COLON CSPINE CTSPINE DUODENUM ESOPHAGUS FACE GALLBLADDER HEAD HEADNECK HEART ILEUM
    ILIUM JAW JEJUNUM LARYNX LIVER LSPINE LSSPINE MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN
    NECKCHESTABDPELV NOSE PANCREAS PELVIS PENIS PHARYNX PROSTATE RECTUM SCALP SKULL SPINE SPLEEN SSPINE STERNUM
    STOMACH THYMUS THYROID TLSPINE TONGUE TRACHEA TSPINE URETER URETHRA UTERUS VAGINA VULVA WHOLEBODY""".split())


def with_type2(source):
    """The source's header (no pixel data, the source itself untouched) with every Type 2
    patient and study attribute present: copied where the source has it, empty where not."""
    from pydicom.dataset import Dataset

    header = Dataset({elem.tag: elem for elem in source if elem.keyword != "PixelData"})
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in header or header[keyword].value is None:
            setattr(header, keyword, "")
    return header


def series_laterality(source) -> str | None:
    """The overlay's General Series Laterality (Type 2C): None (absent) for an unpaired body
    part; otherwise the source's Laterality or Image Laterality when R or L, else "" (unknown)."""
    part = str(source.get("BodyPartExamined") or "").strip().upper()
    if part in UNPAIRED_BODY_PARTS:
        return None
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(source.get(keyword) or "").strip().upper()
        if value in ("R", "L"):
            return value
    return ""


def _patient_orientation(source) -> list[str] | str:
    """The source's Patient Orientation (row, column directions) when it has two values, else
    empty (Type 2C: unknown); the overlay keeps the source's directions."""
    value = source.get("PatientOrientation")
    values = [] if not value else [str(value)] if isinstance(value, str) else [str(v) for v in value]
    return values if len(values) == 2 and all(values) else ""


def _check_sources(sources: Sequence) -> str:
    if not sources:
        raise ValueError("A result needs at least one source image of the study")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"All source images must belong to one study. Got {sorted(studies)}")
    return studies.pop()


def structured_report(sources: Sequence, finding: StudyFinding, *, series_number: int = 9901,
                      institution_name: str | None = None):
    """The Comprehensive SR (TID 1500) for a study, as a pydicom Dataset ready to store."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    study_uid = _check_sources(sources)
    sources = [with_type2(ds) for ds in sources]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid(study_uid, finding.model_name, "device"), name=MANUFACTURER,
        manufacturer_name=MANUFACTURER, model_name=finding.model_name[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    algorithm = hd.sr.AlgorithmIdentification(name=finding.model_name[:64], version=finding.model_version[:64],
                                              parameters=[f"operating point {finding.operating_point}"[:64]])
    verdict = FRACTURE if finding.label else NO_FRACTURE
    study_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(study_uid, finding.model_name, "study-group"),
                                                     identifier="study"),
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=_code(*verdict))],
        measurements=[hd.sr.Measurement(name=_code(*FRACTURE_PROBABILITY), value=float(finding.fracture_probability),
                                        unit=_code(*_NO_UNITS), algorithm_id=algorithm),
                      hd.sr.Measurement(name=_code(*_THRESHOLD), value=float(finding.threshold),
                                        unit=_code(*_NO_UNITS))],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources])
    groups = [study_group]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    for sop_uid, regions in finding.regions.items():
        if sop_uid not in by_uid:
            raise ValueError(f"Regions given for image {sop_uid}, which is not among the sources")
        source = by_uid[sop_uid]
        for k, region in enumerate(regions):
            x0, y0, x1, y1 = (float(v) for v in region["box"])
            if not (0 <= x0 < x1 <= int(source.Columns) and 0 <= y0 < y1 <= int(source.Rows)):
                raise ValueError(f"Box {region['box']} lies outside image {sop_uid} "
                                 f"({source.Columns} x {source.Rows})")
            # SCOORD image coordinates: (column, row), 0.0 at the top-left corner of the top-left
            # pixel, so an exclusive pixel box's corners are its edges.
            outline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=result_uid(study_uid, finding.model_name, f"region:{sop_uid}:{k}"),
                    identifier=f"fracture region {k + 1}"),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=outline,
                    source_image=hd.sr.SourceImageForRegion.from_source_image(source)),
                finding_type=_code(*FRACTURE), algorithm_id=algorithm,
                measurements=[hd.sr.Measurement(name=_code(*_REGION_SCORE), value=float(region["score"]),
                                                unit=_code(*_NO_UNITS))]))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=_code(*_PROCEDURE),
                                     imaging_measurements=groups)
    return hd.sr.ComprehensiveSR(
        evidence=list(sources), content=report[0],
        series_instance_uid=result_uid(study_uid, finding.model_name, "sr-series"), series_number=series_number,
        sop_instance_uid=result_uid(study_uid, finding.model_name, "sr"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, institution_name=institution_name,
        series_description=f"fracray {BANNER.lower()}"[:64])


def _burn_in(pixels: np.ndarray, width: int, height: int, regions: list[dict[str, Any]], lines: list[str],
             max_side: int) -> np.ndarray:
    """RGB uint8: the grey radiograph at most ``max_side`` a side, boxes and scores in magenta,
    and a black banner on top with the text lines in yellow."""
    import cv2

    grey = pixels.astype(np.float32)
    lo, hi = float(grey.min()), float(grey.max())
    grey = (grey - lo) / max(hi - lo, 1e-6)
    scale = min(1.0, max_side / max(grey.shape))
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    image = np.ascontiguousarray(np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2))
    sx, sy = size[0] / width, size[1] / height
    thick = max(1, round(max(size) / 400))
    font, font_scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, max(size) / 1400)
    for region in regions:
        x0, y0, x1, y1 = region["box"]
        p0, p1 = (int(x0 * sx), int(y0 * sy)), (max(int(x0 * sx) + 1, int(x1 * sx) - 1), max(int(y0 * sy) + 1,
                                                                                         int(y1 * sy) - 1))
        cv2.rectangle(image, p0, p1, (255, 0, 255), thick)
        cv2.putText(image, f"{float(region['score']):.2f}", (p0[0], max(12, p0[1] - 4)), font, font_scale,
                    (255, 0, 255), 1, cv2.LINE_AA)
    (_, text_h), base = cv2.getTextSize("Ag", font, font_scale, 1)
    band = (text_h + base + 6) * len(lines) + 6
    banner = np.zeros((band, size[0], 3), np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(banner, line, (6, 6 + (i + 1) * (text_h + base + 6) - base), font, font_scale, (255, 255, 0),
                    1, cv2.LINE_AA)
    return np.concatenate([banner, image], axis=0)


def overlay_secondary_capture(source, pixels: np.ndarray, finding: StudyFinding, *, series_number: int = 9902,
                              max_side: int = 1024):
    """A Secondary Capture (RGB) of one source image with the findings burned in under the
    banner, in the source's study, a new series. ``pixels``: the decoded source image (any
    size; its boxes are in the source's own Columns x Rows)."""
    import highdicom as hd

    study_uid = _check_sources([source])
    sop_uid = str(source.SOPInstanceUID)
    lines = [BANNER, f"{finding.model_name} {finding.model_version}"[:90],
             f"P(fracture) {finding.fracture_probability:.2f} at threshold {finding.threshold:.2f} "
             f"({finding.operating_point}): {'FRACTURE SUSPECTED' if finding.label else 'no fracture found'}"]
    rgb = _burn_in(pixels, int(source.Columns), int(source.Rows), finding.regions.get(sop_uid, []), lines,
                   max_side)
    header = with_type2(source)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header, pixel_array=rgb, photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8, coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result_uid(study_uid, finding.model_name, "sc-series"), series_number=series_number,
        sop_instance_uid=result_uid(study_uid, finding.model_name, f"sc:{sop_uid}"), instance_number=1,
        manufacturer=MANUFACTURER, patient_orientation=("L", "F"),
        series_description=f"fracray overlay - {BANNER.lower()}"[:64])
    image.BurnedInAnnotation = "YES"  # the banner and scores are in the pixels
    # highdicom needs an orientation for the patient coordinate system; the source's is the truth.
    image.PatientOrientation = _patient_orientation(source)
    if source.get("BodyPartExamined"):
        image.BodyPartExamined = source.BodyPartExamined
    laterality = series_laterality(source)
    if laterality is not None:
        image.Laterality = laterality
    return image
