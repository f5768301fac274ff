"""Results as DICOM: the Structured Report (TID 1500) and the overlay Secondary Capture, read
back with highdicom and checked with dcmtk's dsrdump/dcmdump where installed."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import pytest

from conftest import dicom_check, wrapped_study
from fracray.data.synthetic import render_radiograph
from fracray.pacs.results import (TYPE2_PATIENT_STUDY, StudyFinding, overlay_secondary_capture, series_laterality,
                                  structured_report)


def dx_source(rows: int = 480, cols: int = 360, *, study_uid: str | None = None, seed: int = 0):
    """A DX image with realistic patient, study and series modules (the product's own wrapper)."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    from fracray.pacs.wrap import StudyIdentity, wrap_radiograph

    study = StudyIdentity(patient_id="P-0001", patient_name="Doe^Jane", study_uid=study_uid or generate_uid(),
                          accession="ACC1", patient_birth_date="19700101", patient_sex="F")
    pixels = render_radiograph(np.random.default_rng(seed), "wrist", rows, cols, fracture=True).pixels
    data = wrap_radiograph(pixels.astype(np.uint16) * 16, study, series_uid=generate_uid(), body_part="WRIST")
    return pydicom.dcmread(io.BytesIO(data))


def _finding(source, label=1, regions=True) -> StudyFinding:
    boxes = {str(source.SOPInstanceUID): [{"box": [40, 60, 140, 200], "score": 0.77},
                                          {"box": [200, 300, 260, 380], "score": 0.55}]} if regions else {}
    return StudyFinding(fracture_probability=0.83 if label else 0.12, threshold=0.41, label=label,
                        model_name="fracture_wrist:efficientnet_lite0", model_version="2026-11-24T10:00:00+00:00",
                        operating_point="high_sensitivity", regions=boxes)


def test_structured_report_reads_back_with_every_fact(tmp_path):
    import highdicom as hd

    source = dx_source()
    sr = structured_report([source], _finding(source))
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    back = hd.sr.srread(path)
    # In the patient's study, a new series; the patient and study modules copied.
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.SeriesInstanceUID != source.SeriesInstanceUID
    assert (back.PatientID, str(back.PatientName), back.AccessionNumber) == ("P-0001", "Doe^Jane", "ACC1")
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    study_groups = back.content.get_image_measurement_groups()
    assert len(study_groups) == 1
    values = {m.name.meaning: m.value for m in study_groups[0].get_measurements()}
    assert values == {"Fracture probability": pytest.approx(0.83), "Decision threshold": pytest.approx(0.41)}
    regions = back.content.get_planar_roi_measurement_groups()
    assert len(regions) == 2
    outline = np.asarray(regions[0].roi.GraphicData, float).reshape(-1, 2)
    assert outline.tolist() == [[40, 60], [140, 60], [140, 200], [40, 200], [40, 60]]
    assert regions[0].roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert [m.value for m in regions[0].get_measurements()] == [pytest.approx(0.77)]
    assert "not for diagnosis alone" in back.SeriesDescription
    # Evidence: the source image is referenced, so the PACS links the report to it.
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # The model (name, version) as the observing device and as the algorithm of every measurement,
    # with the operating point its decision was taken at.
    texts = _text_items(back)
    assert texts["Device Observer Model Name"] == {"fracture_wrist:efficientnet_lite0"}
    assert texts["Algorithm Name"] == {"fracture_wrist:efficientnet_lite0"}
    assert texts["Algorithm Version"] == {"2026-11-24T10:00:00+00:00"}
    assert texts["Algorithm Parameters"] == {"operating point high_sensitivity"}


def _text_items(dataset) -> dict[str, set[str]]:
    """Every TEXT/UIDREF content item of an SR, by concept name (walked through every level)."""
    found: dict[str, set[str]] = {}

    def walk(items):
        for item in items:
            if item.ValueType in ("TEXT", "UIDREF"):
                value = item.TextValue if item.ValueType == "TEXT" else item.UID
                found.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, set()).add(str(value))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(dataset.ContentSequence)
    return found


def test_the_same_study_and_model_give_the_same_instances():
    source = dx_source()
    first, again = structured_report([source], _finding(source)), structured_report([source], _finding(source))
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    other = dx_source()
    assert structured_report([other], _finding(other)).SOPInstanceUID != first.SOPInstanceUID
    sc1 = overlay_secondary_capture(source, source.pixel_array, _finding(source))
    sc2 = overlay_secondary_capture(source, source.pixel_array, _finding(source))
    assert sc1.SOPInstanceUID == sc2.SOPInstanceUID != first.SOPInstanceUID


def test_no_fracture_is_reported_as_absent():
    import highdicom as hd

    source = dx_source()
    sr = structured_report([source], _finding(source, label=0, regions=False))
    items = [i for i in sr.ContentSequence[-1].ContentSequence[0].ContentSequence
             if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeMeaning == "Finding"]
    assert items[0].ConceptCodeSequence[0].CodeValue == "373572006"  # clinical finding absent
    assert not hd.sr.ComprehensiveSR.from_dataset(sr).content.get_planar_roi_measurement_groups()


def test_overlay_secondary_capture_has_the_banner_and_boxes(tmp_path):
    source = dx_source()
    sc = overlay_secondary_capture(source, source.pixel_array, _finding(source))
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.BurnedInAnnotation == "YES" and sc.PatientID == "P-0001" and sc.Modality == "OT"
    rgb = sc.pixel_array
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.shape[1] == 360 and rgb.shape[0] > 480  # banner on top
    yellow = (rgb[..., 0] > 200) & (rgb[..., 1] > 200) & (rgb[..., 2] < 80)
    magenta = (rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] > 200)
    banner_rows = rgb.shape[0] - 480
    assert yellow[:banner_rows].sum() > 100 and yellow[banner_rows:].sum() == 0
    assert magenta[banner_rows:].sum() > 100  # the boxes, below the banner
    sc.save_as(tmp_path / "sc.dcm")


@pytest.mark.parametrize("problem", ["two_studies", "box_outside", "unknown_image", "bad_probability"])
def test_bad_results_are_refused_loudly(problem):
    source = dx_source()
    finding = _finding(source)
    with pytest.raises(ValueError):
        if problem == "two_studies":
            structured_report([source, dx_source()], finding)
        elif problem == "box_outside":
            structured_report([source], StudyFinding(0.5, 0.5, 1, "m", "v", regions={
                str(source.SOPInstanceUID): [{"box": [0, 0, 999, 10], "score": 0.5}]}))
        elif problem == "unknown_image":
            structured_report([source], StudyFinding(0.5, 0.5, 1, "m", "v", regions={"1.2.3": []}))
        else:
            StudyFinding(1.5, 0.5, 1, "m", "v")


@pytest.mark.skipif(shutil.which("dsrdump") is None,
                    reason="dcmtk is not installed: bash scripts/install_pacs_tools.sh (apt-get install dcmtk)")
def test_dcmtk_reads_the_report_and_the_overlay(tmp_path):
    source = dx_source()
    structured_report([source], _finding(source)).save_as(tmp_path / "sr.dcm")
    overlay_secondary_capture(source, source.pixel_array, _finding(source)).save_as(tmp_path / "sc.dcm")
    dump = subprocess.run(["dsrdump", str(tmp_path / "sr.dcm")], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and "error" not in dump.stderr.lower(), dump.stderr
    assert "Imaging Measurement Report" in dump.stdout and '"Fracture probability")="0.83"' in dump.stdout
    assert '(72704001,SCT,"Fracture")' in dump.stdout
    header = subprocess.run(["dcmdump", "+P", "BurnedInAnnotation", str(tmp_path / "sc.dcm")], capture_output=True,
                            text=True, timeout=60)
    assert header.returncode == 0 and "YES" in header.stdout


def test_the_report_and_overlay_of_a_full_source_pass_dciodvfy(tmp_path):
    """Before: the overlay failed dciodvfy (Type 2C Laterality missing for the paired WRIST)."""
    source = dx_source()
    structured_report([source], _finding(source)).save_as(tmp_path / "sr.dcm")
    overlay_secondary_capture(source, source.pixel_array, _finding(source)).save_as(tmp_path / "sc.dcm")
    dicom_check(tmp_path / "sr.dcm", sr=True)
    dicom_check(tmp_path / "sc.dcm", sr=False)


def test_sources_without_type2_attributes_get_a_report_and_overlays(tmp_path):
    """Real radiographs as modality exports and anonymised archives write them: no
    PatientBirthDate, StudyID, ReferringPhysicianName (nor any other Type 2 patient/study
    attribute, nor PatientOrientation). Before: highdicom's ComprehensiveSR raised AttributeError.
    The derived objects carry them empty, pass dciodvfy, and the sources stay as they were."""
    import pydicom

    study_uid, files = wrapped_study(2, start=3, syntaxes=("jpeg-ls", "rle"), omit=TYPE2_PATIENT_STUDY + (
        "PatientOrientation",))
    sources = [pydicom.dcmread(io.BytesIO(f)) for f in files]
    assert not any(k in ds for ds in sources for k in TYPE2_PATIENT_STUDY)
    finding = StudyFinding(0.7, 0.5, 1, "fracture_hand:efficientnet_lite0", "v1", regions={
        str(sources[0].SOPInstanceUID): [{"box": [10, 10, 60, 80], "score": 0.9}]})
    sr = structured_report(sources, finding)
    sr.save_as(tmp_path / "sr.dcm")
    dicom_check(tmp_path / "sr.dcm", sr=True)
    back = pydicom.dcmread(tmp_path / "sr.dcm")
    assert back.StudyInstanceUID == study_uid
    assert all(k in back and not back[k].value for k in TYPE2_PATIENT_STUDY)  # present, empty
    for k, ds in enumerate(sources):
        sc = overlay_secondary_capture(ds, ds.pixel_array, finding)
        sc.save_as(tmp_path / f"sc{k}.dcm")
        dicom_check(tmp_path / f"sc{k}.dcm", sr=False)
        sc = pydicom.dcmread(tmp_path / f"sc{k}.dcm")
        assert all(key in sc and not sc[key].value for key in TYPE2_PATIENT_STUDY)
        # HAND is paired and the source says nothing of the side: Laterality present, empty (unknown).
        assert sc.Laterality == "" and sc.BodyPartExamined == "HAND" and not sc.PatientOrientation
    assert not any(k in ds for ds in sources for k in TYPE2_PATIENT_STUDY)  # the sources untouched


@pytest.mark.parametrize("body_part,laterality,expected", [("HAND", "R", "R"), ("WRIST", "L", "L"),
                                                          ("HAND", None, ""), ("CHEST", None, None)])
def test_overlay_laterality_follows_the_body_part_and_the_source(tmp_path, body_part, laterality, expected):
    """General Series Laterality (Type 2C): the source's side for a paired part, empty when the
    source does not say, absent for an unpaired part (dciodvfy errs on either mistake)."""
    import pydicom

    _, files = wrapped_study(1, start=5, body_part=body_part, laterality=laterality)
    source = pydicom.dcmread(io.BytesIO(files[0]))
    assert series_laterality(source) == expected
    sc = overlay_secondary_capture(source, source.pixel_array, _finding(source, regions=False))
    sc.save_as(tmp_path / "sc.dcm")
    dicom_check(tmp_path / "sc.dcm", sr=False)
    back = pydicom.dcmread(tmp_path / "sc.dcm")
    assert (back.get("Laterality") if "Laterality" in back else None) == expected
    assert list(back.PatientOrientation) == ["L", "F"]  # the source's, as it was written
