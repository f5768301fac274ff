"""A real PACS (Orthanc with DICOMweb, on 127.0.0.1, its own storage folder): load a study by
STOW-RS, score it through a dicomweb:// query with score_archive (QIDO-RS, WADO-RS through Ray
Data), publish the SR and overlays back into the same study, and publish again without
duplicates. Real FracAtlas radiographs when ../shared is there, else synthetic ones."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import REPO, _free_port, radiographs

pytestmark = pytest.mark.skipif(
    shutil.which("Orthanc") is None or not Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so").exists(),
    reason="Orthanc with DICOMweb is not installed: bash scripts/install_pacs_tools.sh "
           "(apt-get install orthanc orthanc-dicomweb)")

FRACATLAS = REPO.parent / "shared" / "data" / "fracatlas" / "FracAtlas" / "images" / "Fractured"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orthanc")
    http, dicom = _free_port(), _free_port()
    started = subprocess.run(["bash", str(REPO / "scripts" / "orthanc.sh"), "start", str(folder), str(http),
                              str(dicom)], capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    yield {"uri": f"dicomweb://127.0.0.1:{http}/dicom-web", "rest": f"http://127.0.0.1:{http}", "folder": folder,
           "http": http, "dicom": dicom}
    subprocess.run(["bash", str(REPO / "scripts" / "orthanc.sh"), "stop", str(folder)], timeout=60)


@pytest.fixture(scope="module")
def loaded_study(orthanc):
    """One study of three images, each in another transfer syntax, MONOCHROME1 and 2, stored by STOW-RS."""
    from pydicom.uid import generate_uid

    from fracray import dicomweb
    from fracray.pacs.wrap import StudyIdentity, wrap_radiograph

    study = StudyIdentity(patient_id="FA-0001", patient_name="Atlas^Frac", study_uid=generate_uid(),
                          accession="ACC-0001", study_date="20261124")
    series = generate_uid()
    files = [wrap_radiograph(pixels, study, series_uid=series, instance_number=i + 1, modality=("DX", "CR")[i % 2],
                             body_part="HAND", monochrome1=(i == 1), transfer_syntax=ts)
             for i, (pixels, ts) in enumerate(zip(radiographs(3), ["jpeg-ls", "jpeg2000", "rle"]))]
    dicomweb.store_instances(orthanc["uri"], files)
    return study


def _instances_in_study(orthanc, study_uid: str) -> list[dict]:
    r = requests.get(f"{orthanc['rest']}/dicom-web/studies/{study_uid}/instances", timeout=30)
    r.raise_for_status()
    return r.json()


def test_query_and_retrieve_through_the_storage_layer(orthanc, loaded_study):
    from fracray import storage
    from fracray.imaging.decode import decode_image

    query = f"{orthanc['uri']}?StudyDate=20261124&ModalitiesInStudy=CR%5CDX"
    uris = storage.list_files(query)
    assert len(uris) == 3 and all(f"/studies/{loaded_study.study_uid}/" in u for u in uris)
    assert storage.list_files(f"{orthanc['uri']}?StudyDate=19990101") == []
    for uri in uris:
        image = decode_image(storage.read_bytes(uri))
        assert image.source_format == "DICOM" and image.body_part == "hand" and min(image.shape) >= 64


def test_credentials_are_refused_in_uris(orthanc):
    from fracray import dicomweb

    with pytest.raises(ValueError, match="FRACRAY_DICOMWEB"):
        dicomweb.parse(orthanc["uri"].replace("127.0.0.1", "user:secret@127.0.0.1"))


def test_score_a_pacs_query_then_publish_sr_and_overlays_into_the_study(orthanc, loaded_study, ray_local,
                                                                        localizing_single_index, tmp_path):
    import highdicom as hd
    import pydicom

    from fracray import storage
    from fracray.pacs.publish import publish_scores
    from fracray.scoring.archive import ScoreConfig, read_image_results, score_archive

    query = f"{orthanc['uri']}?StudyDate=20261124&ModalitiesInStudy=CR%5CDX"
    output = str(tmp_path / "scores")
    summary = score_archive(ScoreConfig(input=query, models=localizing_single_index, output=output, chunk_size=2,
                                        batch_size=2), log=lambda *_: None)
    assert summary.inputs == 3 and summary.scored == 3, summary
    rows = read_image_results(output).to_pylist()
    assert {r["study_id"] for r in rows} == {loaded_study.study_uid}  # one study per StudyInstanceUID
    assert all(r["image_uri"].startswith(orthanc["uri"] + "/studies/") for r in rows)  # joins back to the PACS
    assert all(r["sop_instance_uid"] == r["image_uri"].rsplit("/", 1)[1] for r in rows)  # from the header

    before = len(_instances_in_study(orthanc, loaded_study.study_uid))
    published = publish_scores(output, log=lambda *_: None)
    assert (published.studies, published.reports, published.overlays) == (1, 1, 3)
    after = _instances_in_study(orthanc, loaded_study.study_uid)
    assert len(after) == before + 4  # one SR and three overlays, in the same study
    sr_uris = [u for u in storage.list_files(f"{orthanc['uri']}/studies/{loaded_study.study_uid}")
               if u not in {r["image_uri"] for r in rows}]
    objects = [pydicom.dcmread(io.BytesIO(storage.read_bytes(u))) for u in sr_uris]
    reports = [o for o in objects if o.Modality == "SR"]
    assert len(reports) == 1 and reports[0].PatientID == "FA-0001"
    report = hd.sr.ComprehensiveSR.from_dataset(reports[0])
    groups = report.content.get_image_measurement_groups()
    values = {m.name.meaning: m.value for m in groups[0].get_measurements()}
    studies = {r["study_id"]: r for r in
               __import__("pyarrow.parquet", fromlist=["x"]).read_table(Path(output) / "studies.parquet").to_pylist()}
    assert values["Fracture probability"] == pytest.approx(studies[loaded_study.study_uid]["fracture_probability"],
                                                           abs=1e-6)
    overlays = [o for o in objects if o.Modality == "OT"]
    assert len(overlays) == 3 and all(o.BurnedInAnnotation == "YES" for o in overlays)

    # Publishing again replaces the same instances: nothing piles up.
    publish_scores(output, log=lambda *_: None)
    assert len(_instances_in_study(orthanc, loaded_study.study_uid)) == before + 4


def test_publish_results_cli(orthanc, loaded_study, ray_local, localizing_single_index, tmp_path):
    from fracray.scoring.archive import ScoreConfig, score_archive

    output = str(tmp_path / "scores")
    score_archive(ScoreConfig(input=f"{orthanc['uri']}/studies/{loaded_study.study_uid}",
                              models=localizing_single_index, output=output), log=lambda *_: None)
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "publish_results.py"), "--scores", output,
                           "--no-overlays", "--force"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Published 1 report(s) and 0 overlay(s) for 1 study(ies)" in done.stdout
    bad = subprocess.run([sys.executable, str(REPO / "pipelines" / "publish_results.py"), "--scores", output,
                          "--pacs", "http://example"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "dicomweb://" in bad.stderr


def test_publish_isolates_studies_without_type2_attributes_and_a_rerun_publishes_what_is_missing(
        orthanc, ray_local, localizing_single_index, tmp_path, capsys):
    """Two studies of real radiographs without the Type 2 patient/study attributes (only a
    StudyDate to query them by). One image of the first is deleted from the PACS after scoring:
    that study is reported with its reason and the other is published, with SR and overlays that
    pass dciodvfy. With the image back, a rerun publishes the missing study and skips the other.
    Before: publish_results died on the first study (AttributeError: no PatientBirthDate)."""
    import json

    import pydicom

    from conftest import dicom_check, wrapped_study
    from fracray import dicomweb
    from fracray.cli.publish_results import main as publish_main
    from fracray.pacs.privacy import study_key
    from fracray.pacs.publish import FAILURES_FILE, publish_scores
    from fracray.pacs.results import TYPE2_PATIENT_STUDY
    from fracray.scoring.archive import ScoreConfig, score_archive

    omit = tuple(k for k in TYPE2_PATIENT_STUDY if k != "StudyDate")
    studies = [wrapped_study(2, start=20 + 2 * k, patient=(f"T2-{k}", "Bare^Pat"), syntaxes=("jpeg-ls", "rle"),
                             omit=omit) for k in range(2)]
    for uid, files in studies:
        dicomweb.store_instances(orthanc["uri"], [_with_study_date(f, "20250317") for f in files])
    output = str(tmp_path / "scores")
    summary = score_archive(ScoreConfig(input=f"{orthanc['uri']}?StudyDate=20250317", models=localizing_single_index,
                                        output=output, chunk_size=2, batch_size=2), log=lambda *_: None)
    assert summary.scored == 4, summary
    (bad_uid, bad_files), (good_uid, _) = studies
    gone = pydicom.dcmread(io.BytesIO(bad_files[1]))
    orthanc_id = requests.post(f"{orthanc['rest']}/tools/lookup", data=str(gone.SOPInstanceUID),
                               timeout=30).json()[0]["ID"]
    requests.delete(f"{orthanc['rest']}/instances/{orthanc_id}", timeout=30).raise_for_status()

    lines: list[str] = []
    published = publish_scores(output, log=lines.append)
    assert (published.studies, published.reports, published.overlays) == (1, 1, 2), lines
    assert list(published.failed) == [study_key(bad_uid)]
    assert "could not be read back from the PACS" in published.failed[study_key(bad_uid)]
    assert f"study {study_key(bad_uid)}: not published: a scored image could not be read back" in "\n".join(lines)
    failures = json.loads((tmp_path / "scores" / FAILURES_FILE).read_text())["failed"]
    assert {v["study_instance_uid"] for v in failures.values()} == {bad_uid}
    results = [i for i in _instances_in_study(orthanc, good_uid) if _tag(i, "00080060") in ("SR", "OT")]
    assert sorted(_tag(i, "00080060") for i in results) == ["OT", "OT", "SR"]
    loc = dicomweb.parse(orthanc["uri"])
    for item in results:
        path = tmp_path / f"{_tag(item, '00080018')}.dcm"
        path.write_bytes(dicomweb.read_instance(dicomweb.instance_uri(loc, good_uid, _tag(item, "0020000E"),
                                                                      _tag(item, "00080018"))))
        dicom_check(path)

    dicomweb.store_instances(orthanc["uri"], [_with_study_date(bad_files[1], "20250317")])  # the image is back
    capsys.readouterr()
    assert publish_main(["--scores", output]) == 0
    out = capsys.readouterr().out
    assert "Published 1 report(s) and 2 overlay(s) for 1 study(ies); 1 already in the PACS" in out and \
        "0 failed" in out, out
    assert json.loads((tmp_path / "scores" / FAILURES_FILE).read_text())["failed"] == {}
    assert sorted(_tag(i, "00080060") for i in _instances_in_study(orthanc, bad_uid)) == ["CR", "DX", "OT", "OT",
                                                                                         "SR"]


def _with_study_date(data: bytes, date: str) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.StudyDate = date
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _tag(item: dict, tag: str) -> str:
    return str((item.get(tag) or {}).get("Value", [""])[0])


def test_a_pacs_that_is_down_is_a_clear_error_after_retries(tmp_path):
    from fracray import dicomweb, storage

    dead = f"dicomweb://127.0.0.1:{_free_port()}/dicom-web"
    with pytest.raises(storage.StorageError, match="did not answer after"):
        storage.list_files(f"{dead}?StudyDate=20261124")
    with pytest.raises(dicomweb.DicomWebError, match="did not answer"):
        dicomweb.store_instances(dead, [b"x"])


def _orthanc_sh(*args: str) -> None:
    done = subprocess.run(["bash", str(REPO / "scripts" / "orthanc.sh"), *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


class _PacsThatGoesAway:
    """A forwarding HTTP proxy in front of the real Orthanc that stops Orthanc (for real) just
    before the third instance retrieval: the outage lands at the same point on every machine,
    however far Ray Data has read ahead (stopping it from a driver-side hook raced the actor)."""

    def __init__(self, orthanc: dict, *, retrievals_before_outage: int):
        import http.server
        import threading

        self.retrievals, self.stopped, self.outages = 0, False, 0
        lock, upstream, proxy = threading.Lock(), orthanc["rest"], self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_):
                pass

            def _forward(self):
                if "/instances/" in self.path and self.command == "GET":
                    with lock:
                        proxy.retrievals += 1
                        if proxy.retrievals > retrievals_before_outage and not proxy.outages:
                            _orthanc_sh("stop", str(orthanc["folder"]))
                            proxy.stopped, proxy.outages = True, 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                try:
                    answer = requests.request(self.command, upstream + self.path, headers=headers, data=body,
                                              timeout=30)
                except requests.ConnectionError:
                    self.send_error(502, "the PACS behind the proxy is down")
                    return
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection", "content-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"dicomweb://127.0.0.1:{self.server.server_port}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_orthanc_stopped_mid_scoring_fails_clearly_and_the_rerun_resumes(orthanc, ray_local, localizing_single_index,
                                                                         tmp_path):
    """The PACS goes away after two images were read: the run stops with one clear error (after
    the DICOMweb retries) instead of rejecting what it could not reach; once the PACS is back,
    the same command scores the rest, nothing lost and nothing twice."""
    import pyarrow.compute as pc
    from pydicom.uid import generate_uid

    from fracray import dicomweb, storage
    from fracray.pacs.wrap import StudyIdentity, wrap_radiograph
    from fracray.scoring.archive import ScoreConfig, read_image_results, score_archive

    study = StudyIdentity(patient_id="FA-0002", patient_name="Outage^Test", study_uid=generate_uid(),
                          accession="ACC-0002", study_date="20261125")
    series = generate_uid()
    n = 8
    dicomweb.store_instances(orthanc["uri"], [
        wrap_radiograph(pixels, study, series_uid=series, instance_number=i + 1, body_part="WRIST")
        for i, pixels in enumerate(radiographs(n, start=3, body_part="wrist", size=(320, 256), fractured_every=2))])
    pacs = _PacsThatGoesAway(orthanc, retrievals_before_outage=2)
    config = ScoreConfig(input=f"{pacs.uri}?StudyDate=20261125", models=localizing_single_index,
                         output=str(tmp_path / "scores"), chunk_size=1, batch_size=1, concurrency=1)
    try:
        with pytest.raises(storage.StorageUnavailable,
                           match=r"did not answer after .* chunks written and kept; run the same command again"):
            score_archive(config, log=lambda *_: None)
        assert pacs.stopped
        _orthanc_sh("start", str(orthanc["folder"]), str(orthanc["http"]), str(orthanc["dicom"]))
        pacs.stopped = False  # one outage: the rerun goes through the same proxy to the restarted PACS
        parts = [u for u in storage.list_files(str(tmp_path / "scores" / "images")) if "/part-0" in u]
        assert len(parts) <= 2  # what was read before the outage may be kept; nothing written as a reject
        again = score_archive(config, log=lambda *_: None)
    finally:
        if pacs.stopped:
            subprocess.run(["bash", str(REPO / "scripts" / "orthanc.sh"), "start", str(orthanc["folder"]),
                            str(orthanc["http"]), str(orthanc["dicom"])], capture_output=True, timeout=60)
        pacs.close()
    assert again.resumed == bool(parts) and again.inputs == n and again.scored == n and again.rejected == {}
    assert again.scored_this_run == n - len(parts)
    rows = read_image_results(str(tmp_path / "scores"))
    assert rows.num_rows == n and len(pc.unique(rows["sop_instance_uid"])) == n


def test_load_study_cli_then_index_and_evaluate_through_dicomweb(orthanc, ray_local, localizing_single_index,
                                                                 tmp_path):
    """load_study.py wraps radiographs (real FracAtlas ones when ../shared is there) as a CR study
    (MONOCHROME1, JPEG 2000) in the PACS; loading again replaces it; index_dataset reads the PACS
    query as a layout and evaluate scores a labelled manifest of dicomweb:// instances."""
    import csv
    import json

    import pyarrow.parquet as pq
    from PIL import Image

    from fracray.jobs.evaluate import EvaluateConfig, run_evaluate

    if FRACATLAS.is_dir():
        images = sorted(FRACATLAS.glob("*.jpg"))[:2] + sorted((FRACATLAS.parent / "Non_fractured").glob("*.jpg"))[:2]
        labels = [1, 1, 0, 0]
    else:
        images, labels = [], []
        for i, pixels in enumerate(radiographs(4)):
            images.append(tmp_path / f"r{i}.png")
            Image.fromarray(pixels).save(images[-1])
            labels.append(1 - i // 2)
    command = [sys.executable, str(REPO / "pipelines" / "load_study.py"), *map(str, images), "--pacs", orthanc["uri"],
               "--modality", "CR", "--monochrome1", "--transfer-syntax", "jpeg2000", "--body-part", "HAND",
               "--study-date", "20261123"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    study_uid = first.stdout.strip().rsplit(" ", 1)[1]
    assert len(_instances_in_study(orthanc, study_uid)) == 4
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and len(_instances_in_study(orthanc, study_uid)) == 4  # replaced, not added

    query = f"{orthanc['uri']}?StudyDate=20261123"
    index = subprocess.run([sys.executable, str(REPO / "pipelines" / "index_dataset.py"), "--dataset", "tree",
                            "--data", query, "--output", str(tmp_path / "index"), "--no-pictures"],
                           capture_output=True, text=True, timeout=300)
    assert index.returncode == 0, index.stderr
    manifest = pq.read_table(tmp_path / "index" / "manifest.parquet").to_pylist()
    assert len(manifest) == 4 and {r["study_id"] for r in manifest} == {study_uid}
    assert json.loads((tmp_path / "index" / "summary.json").read_text())["images"] == 4
    assert {r["body_part"] for r in manifest} <= {"hand", "unknown", None}

    # evaluate: the PACS instances with their labels, as a CSV manifest.
    sop_of = {}
    from fracray import storage
    import pydicom

    for uri in storage.list_files(f"{orthanc['uri']}/studies/{study_uid}"):
        ds = pydicom.dcmread(io.BytesIO(storage.read_bytes(uri)), stop_before_pixels=True)
        sop_of[int(ds.InstanceNumber)] = uri
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_uri", "label", "study_id", "body_part"])
        for number, label in enumerate(labels, start=1):
            writer.writerow([sop_of[number], label, study_uid, "hand"])
    result = run_evaluate(EvaluateConfig(localizing_single_index, "manifest", str(tmp_path / "labels.csv"),
                                         split="all", output=str(tmp_path / "evaluation")), log=lambda *_: None)
    overall = result.summary["overall"]
    assert result.summary["scored"] == 4 and overall["n"] == 4 and overall["tp"] + overall["fn"] == 2
    assert (tmp_path / "evaluation" / "predictions.parquet").exists()
