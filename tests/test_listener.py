"""The DICOM node, with real parts only: a pynetdicom modality (or Orthanc itself) C-STOREs a
study to the listener, the listener classifies it through a real Ray Serve service, and the SR
and overlays go back into a real Orthanc by STOW-RS or by C-STORE; unsupported objects are
acknowledged and skipped; nothing piles up when the study comes again; a restarted listener
finishes what its spool holds; TLS both ways; the command line."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import REPO, SERVE_TEST_TOKEN, SERVE_TEST_TOKEN_ENV, _free_port, radiographs, served

HAVE_ORTHANC = shutil.which("Orthanc") is not None and Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so").exists()
needs_orthanc = pytest.mark.skipif(not HAVE_ORTHANC, reason="Orthanc with DICOMweb is not installed: bash "
                                   "scripts/install_pacs_tools.sh (apt-get install orthanc orthanc-dicomweb)")
# What identifies the test patients: none of it may appear in any log line.
PATIENT_IDS = ("LST-0001", "LST-0002", "LST-0003")
PATIENT_NAMES = ("Listener^Ann", "Listener^Bob", "Listener^Cy")
UNSUPPORTED = ("test-SR.dcm", "rtplan.dcm", "waveform_ecg.dcm", "SC_rgb_rle_2frame.dcm", "MR_small.dcm")


# ----------------------------------------------------------------------------- parts

@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc on free ports: DICOMweb over HTTP and its DICOM port (AE ORTHANC, which accepts
    stores from any AE title: DicomAlwaysAllowStore is Orthanc's default)."""
    if not HAVE_ORTHANC:
        pytest.skip("Orthanc with DICOMweb is not installed")
    folder = tmp_path_factory.mktemp("orthanc")
    http, dicom = _free_port(), _free_port()
    started = subprocess.run(["bash", str(REPO / "scripts" / "orthanc.sh"), "start", str(folder), str(http),
                              str(dicom)], capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    yield {"uri": f"dicomweb://127.0.0.1:{http}/dicom-web", "rest": f"http://127.0.0.1:{http}", "dicom": dicom}
    subprocess.run(["bash", str(REPO / "scripts" / "orthanc.sh"), "stop", str(folder)], timeout=60)


@pytest.fixture(scope="module")
def service(serve_url, localizing_single_index):
    """The Serve application on the fracture-map model, with a bearer token and at most 2 images
    per study request (so that a 3-image study goes in two requests); one replica each."""
    headers = {"Authorization": f"Bearer {SERVE_TEST_TOKEN}"}
    with served(serve_url, {"models": localizing_single_index, "auth_token_env": SERVE_TEST_TOKEN_ENV,
                            "max_study_images": 2, "min_replicas": 1}, "fracray", headers=headers) as url:
        previous = os.environ.get(SERVE_TEST_TOKEN_ENV)
        os.environ[SERVE_TEST_TOKEN_ENV] = SERVE_TEST_TOKEN  # the listener reads the token here
        yield url
        if previous is None:
            os.environ.pop(SERVE_TEST_TOKEN_ENV, None)
        else:
            os.environ[SERVE_TEST_TOKEN_ENV] = previous


def make_study(n: int, k: int = 0, syntaxes=("jpeg-ls", "jpeg2000", "rle")) -> tuple[str, list[bytes]]:
    """A study of ``n`` hand radiographs (real FracAtlas ones where the shared data is there, else
    synthetic) as a modality writes them (DX and CR, MONOCHROME1 and 2, compressed), patient ``k``."""
    from pydicom.uid import generate_uid

    from fracray.pacs.wrap import StudyIdentity, wrap_radiograph

    study = StudyIdentity(patient_id=PATIENT_IDS[k], patient_name=PATIENT_NAMES[k], study_uid=generate_uid(),
                          accession=f"LACC-{k}")
    series = generate_uid()
    files = [wrap_radiograph(pixels, study, series_uid=series, instance_number=i + 1, modality=("DX", "CR")[i % 2], body_part="HAND",
                             monochrome1=(i == 1), transfer_syntax=syntaxes[i % len(syntaxes)])
             for i, pixels in enumerate(radiographs(n, start=10 + 10 * k))]
    return study.study_uid, files


def unsupported_objects(study_uid: str) -> list:
    """pydicom's SR, RT plan, ECG, 2-frame SC and MR test objects, moved into ``study_uid``."""
    import pydicom
    from pydicom.data import get_testdata_file

    objects = []
    for name in UNSUPPORTED:
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyInstanceUID = study_uid
        objects.append(ds)
    return objects


def c_store(port: int, datasets: list, *, called: str = "FRACRAY", calling: str = "MODALITY", tls_args=None) -> list:
    """A modality's C-STORE of every dataset in one association: the status of each."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)
    assert assoc.is_established, "the listener refused the association"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def datasets(files: list[bytes]) -> list:
    import pydicom

    return [pydicom.dcmread(io.BytesIO(f)) for f in files]


def instances_in(pacs, study_uid: str) -> list[dict]:
    r = requests.get(f"{pacs['rest']}/dicom-web/studies/{study_uid}/instances", timeout=30)
    if r.status_code == 404 or not r.content:
        return []
    r.raise_for_status()
    return r.json()


def _tag(item: dict, tag: str) -> str:
    return str((item.get(tag) or {}).get("Value", [""])[0])


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def listener_log(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("fracray", "pynetdicom")))


def assert_no_patient_data(text: str, *uids: str) -> None:
    for secret in PATIENT_IDS + PATIENT_NAMES + ("LACC-", "Test^S R", "Last^First") + uids:
        assert secret not in text, f"{secret!r} appears in the log"


def check_results(pacs, study_uid: str, source_uids: list[str], source_series: str) -> list[dict]:
    """The SR and one overlay per source are in the study, in new series, and the SR references
    every source image; returns the study's instances."""
    import highdicom as hd
    import pydicom

    from fracray import dicomweb

    found = instances_in(pacs, study_uid)
    by_modality: dict[str, list[dict]] = {}
    for item in found:
        by_modality.setdefault(_tag(item, "00080060"), []).append(item)
    reports, overlays = by_modality.get("SR", []), by_modality.get("OT", [])
    assert len(reports) == 1 and len(overlays) == len(source_uids), {m: len(v) for m, v in by_modality.items()}
    new_series = {_tag(i, "0020000E") for i in reports + overlays}
    assert source_series not in new_series and len(new_series) == 2  # one SR series, one overlay series
    sr = reports[0]
    data = dicomweb.read_instance(dicomweb.instance_uri(dicomweb.parse(pacs["uri"]), study_uid,
                                                        _tag(sr, "0020000E"), _tag(sr, "00080018")))
    report = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(io.BytesIO(data)))
    assert report.StudyInstanceUID == study_uid
    evidence = {str(ref.ReferencedSOPInstanceUID) for study in report.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence == set(source_uids)
    group = report.content.get_image_measurement_groups()[0]
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    assert 0.0 <= values["Fracture probability"] <= 1.0 and 0.0 < values["Decision threshold"] <= 1.0
    return found


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
@needs_orthanc
def test_a_study_by_c_store_is_classified_and_its_results_stored_by_stow_rs(pacs, service, tmp_path, caplog):
    from fracray import dicomweb
    from fracray.pacs.listener import Listener, ListenerConfig
    from fracray.pacs.privacy import study_key

    caplog.set_level(logging.INFO, logger="fracray")
    study_uid, files = make_study(3, 0)
    dicomweb.store_instances(pacs["uri"], files)  # the PACS holds the study it routes to the node
    sources = datasets(files)
    source_uids = [str(ds.SOPInstanceUID) for ds in sources]
    config = ListenerConfig(spool=str(tmp_path / "spool"), destination=pacs["uri"], port=0, service_url=service,
                            token_env=SERVE_TEST_TOKEN_ENV, study_idle_s=8, max_study_images=2)  # > a loaded C-STORE
    with Listener(config) as listener:
        statuses = c_store(listener.port, sources + unsupported_objects(study_uid))
        assert statuses == [0x0000] * (3 + len(UNSUPPORTED))  # every object acknowledged, none refused
        assert listener.pending() == [study_key(study_uid)] and listener.stats.received == 3
        log = listener_log(caplog)
        for reason in ("Comprehensive SR Storage is not a radiograph", "RT Plan Storage is not a radiograph",
                       "12-lead ECG Waveform Storage is not a radiograph",
                       "multi-frame Secondary Capture Image Storage (2 frames)",
                       "MR Image Storage is not a radiograph"):
            assert f"skipped an instance: {reason}" in log

        wait_for(lambda: listener.stats.studies == 1 or listener.stats.failures, 300, "the study's results")
        assert listener.stats.failures == 0, listener_log(caplog)
        assert listener.pending() == []  # the spool is cleared once the results are stored
        found = check_results(pacs, study_uid, source_uids, str(sources[0].SeriesInstanceUID))
        assert len(found) == 3 + 1 + 3
        assert "3 image(s) scored in 2 request(s)" in listener_log(caplog)  # the service takes at most 2

        # The same study once more (a PACS that routes it again): the results replace themselves.
        assert c_store(listener.port, sources) == [0x0000] * 3
        wait_for(lambda: listener.stats.studies == 2 or listener.stats.failures, 300, "the second round")
        assert listener.stats.failures == 0 and listener.pending() == []
        assert len(instances_in(pacs, study_uid)) == 3 + 1 + 3
    assert_no_patient_data(listener_log(caplog), study_uid, *source_uids)


@pytest.mark.slow
@needs_orthanc
def test_results_by_c_store_and_a_restarted_listener_finishes_its_spool(pacs, service, tmp_path, caplog):
    """Orthanc routes a study to the listener (C-STORE, as a PACS does); the listener stops before
    the study is complete; a new one on the same spool classifies it and sends the results to
    Orthanc's DICOM port by C-STORE."""
    from fracray import dicomweb
    from fracray.pacs.dimse import DimseDestination
    from fracray.pacs.listener import Listener, ListenerConfig
    from fracray.pacs.privacy import study_key

    caplog.set_level(logging.INFO, logger="fracray")
    study_uid, files = make_study(2, 1, syntaxes=("jpeg-ls", "explicit"))
    dicomweb.store_instances(pacs["uri"], files)
    sources = datasets(files)
    destination = DimseDestination(host="127.0.0.1", port=pacs["dicom"], called_ae="ORTHANC", calling_ae="FRACRAY")
    config = ListenerConfig(spool=str(tmp_path / "spool"), destination=destination, port=_free_port(),
                            service_url=service, token_env=SERVE_TEST_TOKEN_ENV, study_idle_s=600,
                            allowed_calling_aes=("ORTHANC",))
    with Listener(config) as first:
        # Tell Orthanc where the node is, then have it send the study there.
        r = requests.put(f"{pacs['rest']}/modalities/fracray", timeout=30,
                         json={"AET": "FRACRAY", "Host": "127.0.0.1", "Port": first.port})
        r.raise_for_status()
        orthanc_id = requests.post(f"{pacs['rest']}/tools/lookup", data=study_uid, timeout=30).json()[0]["ID"]
        sent = requests.post(f"{pacs['rest']}/modalities/fracray/store", timeout=120,
                             json={"Resources": [orthanc_id], "Synchronous": True})
        assert sent.status_code == 200, sent.text
        assert first.stats.received == 2 and first.pending() == [study_key(study_uid)]
    # Stopped with the study in its spool, unclassified; nothing of it reached the PACS.
    assert len(instances_in(pacs, study_uid)) == 2

    with Listener(dataclasses.replace(config, study_idle_s=1.0, port=0)) as second:
        wait_for(lambda: second.stats.studies == 1 or second.stats.failures, 300, "the spooled study's results")
        assert second.stats.failures == 0, listener_log(caplog)
        assert second.pending() == []
    found = check_results(pacs, study_uid, [str(ds.SOPInstanceUID) for ds in sources],
                          str(sources[0].SeriesInstanceUID))
    assert len(found) == 2 + 1 + 2
    assert "waiting in the spool" in listener_log(caplog)
    assert_no_patient_data(listener_log(caplog), study_uid)


# ----------------------------------------------------------------------------- failures, TLS, config

def test_a_service_that_is_down_keeps_the_study_and_retries_then_gives_up(tmp_path, caplog):
    from fracray.pacs.listener import Listener, ListenerConfig
    from fracray.pacs.privacy import study_key

    caplog.set_level(logging.INFO, logger="fracray")
    study_uid, files = make_study(2, 2)
    spool = tmp_path / "spool"
    config = ListenerConfig(spool=str(spool), destination="dicomweb://127.0.0.1:9/dicom-web", port=0,
                            service_url=f"http://127.0.0.1:{_free_port()}", study_idle_s=0.5, retry_backoff_s=0.5,
                            max_attempts=2, poll_s=0.1)
    with Listener(config) as listener:
        assert c_store(listener.port, datasets(files)) == [0x0000, 0x0000]
        wait_for(lambda: listener.stats.given_up == 1, 60, "the listener to give up")
    log = listener_log(caplog)
    key = study_key(study_uid)
    assert f"study {key}: attempt 1 of 2 failed: the service at 127.0.0.1:" in log and "retrying in" in log
    assert "gave up" in log
    assert len(list((spool / ".failed" / key).glob("*.dcm"))) == 2  # nothing lost
    assert listener.pending() == []
    assert_no_patient_data(log, study_uid)


def _self_signed(folder: Path) -> tuple[str, str]:
    cert, key = folder / "node.pem", folder / "node.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_tls_both_ways_with_client_certificates(tmp_path):
    """The listener with TLS that requires client certificates, and the C-STORE sender (the
    module the listener sends results with) as its client."""
    from fracray.pacs.dimse import DimseDestination, DimseError, TlsFiles, send_instances
    from fracray.pacs.listener import Listener, ListenerConfig

    cert, key = _self_signed(tmp_path)
    _, files = make_study(1, 2, syntaxes=("explicit",))
    config = ListenerConfig(spool=str(tmp_path / "spool"), destination="dicomweb://127.0.0.1:9/dicom-web", port=0,
                            tls=TlsFiles(cert=cert, key=key, ca=cert), study_idle_s=600)
    with Listener(config) as listener:
        good = DimseDestination(host="127.0.0.1", port=listener.port, called_ae="FRACRAY", calling_ae="SENDER",
                                tls=True, tls_files=TlsFiles(cert=cert, key=key, ca=cert), timeout_s=20)
        assert send_instances(good, datasets(files)) == 1
        assert listener.stats.received == 1 and len(listener.pending()) == 1
        for bad in (DimseDestination(host="127.0.0.1", port=listener.port, called_ae="FRACRAY", timeout_s=10),
                    DimseDestination(host="127.0.0.1", port=listener.port, called_ae="FRACRAY", tls=True,
                                     tls_files=TlsFiles(ca=cert), timeout_s=10)):  # plain TCP; no client cert
            with pytest.raises(DimseError, match=f"C-STORE to dimses?://FRACRAY@127.0.0.1:{listener.port}"):
                send_instances(bad, datasets(files))
        wrong_ae = DimseDestination(host="127.0.0.1", port=listener.port, called_ae="SOMEONE", tls=True,
                                    tls_files=TlsFiles(cert=cert, key=key, ca=cert), timeout_s=10)
        with pytest.raises(DimseError, match="association rejected"):
            send_instances(wrong_ae, datasets(files))
        assert listener.stats.received == 1


def test_config_is_checked_loudly(tmp_path):
    from fracray.pacs.dimse import DimseDestination, TlsFiles
    from fracray.pacs.destinations import DicomWebDestination, parse_destination
    from fracray.pacs.listener import ListenerConfig

    spool = str(tmp_path / "spool")
    dest = parse_destination("dimses://PACS@pacs.example.org:2762", calling_ae="NODE1")
    assert dest == DimseDestination(host="pacs.example.org", port=2762, called_ae="PACS", calling_ae="NODE1",
                                    tls=True)
    assert parse_destination("dicomweb://pacs:8042/dicom-web") == DicomWebDestination("dicomweb://pacs:8042/dicom-web")
    assert ListenerConfig(spool=spool, destination="dimse://PACS@h:104").destination.calling_ae == "FRACRAY"
    cases = [
        (dict(ae_title="A" * 17), "AE title must be 1 to 16"),
        (dict(ae_title="BAD\\AE"), "AE title must be 1 to 16"),
        (dict(ae_title="  "), "AE title must be 1 to 16"),
        (dict(port=70000), "port must be 0 to 65535 (0: any free port). Got 70000"),
        (dict(destination="http://pacs/dicom-web"), "Results go to dicomweb"),
        (dict(destination="dimse://pacs:104"), "dimse://CALLED_AE@host:port"),
        (dict(destination="dimse://PACS@pacs"), "needs a port"),
        (dict(destination="dicomweb://u:p@pacs/dicom-web"), "FRACRAY_DICOMWEB"),
        (dict(destination="dicomweb://pacs/dicom-web/studies/1.2.3"), "not a study or a query"),
        (dict(service_url="127.0.0.1:8000"), "service_url must be"),
        (dict(study_idle_s=0), "study_idle_s must be positive. Got 0"),
        (dict(max_study_images=0), "max_study_images and max_attempts must be at least 1"),
        (dict(spool="s3://bucket/spool"), "spool must be a local folder"),
        (dict(allowed_calling_aes=("OK", "x" * 20)), "allowed calling AE title"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            ListenerConfig(**{"spool": spool, "destination": "dicomweb://pacs:8042/dicom-web", **change})
    with pytest.raises(ValueError, match="give both or neither"):
        TlsFiles(cert=__file__)
    with pytest.raises(ValueError, match="TLS ca file not found"):
        TlsFiles(ca=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="use dimses://"):
        parse_destination("dimse://PACS@h:104", tls_files=TlsFiles(ca=__file__))


def test_the_command_line_runs_until_sigterm(tmp_path):
    from pynetdicom import AE

    help_text = subprocess.run([sys.executable, str(REPO / "pipelines" / "listen.py"), "--help"],
                               capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and "storescu -aet MODALITY -aec FRACRAY" in help_text.stdout
    bad = subprocess.run([sys.executable, str(REPO / "pipelines" / "listen.py"), "--spool", str(tmp_path),
                          "--send-to", "pacs:104"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: Results go to dicomweb")

    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "listen.py"), "--spool", str(tmp_path / "spool"),
                             "--port", str(port), "--ae-title", "NODE", "--send-to", "dimse://PACS@127.0.0.1:9"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        while line and "Listening as" not in line:
            line = proc.stdout.readline()
        assert f"Listening as NODE on 127.0.0.1:{port}" in line
        ae = AE(ae_title="ECHOER")
        ae.add_requested_context("1.2.840.10008.1.1")  # Verification: what a PACS admin tries first
        assoc = ae.associate("127.0.0.1", port, ae_title="NODE")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "DICOM listener NODE stopped" in out


# ----------------------------------------------------------------------------- failure classes

class _Stub:
    """A stand-in for the Serve service's POST /v1/classify/study (every image scored 0.8 at
    0.5, one box) and a DICOMweb STOW-RS endpoint that stores nothing: it answers 409 for a
    study whose UID is in ``refuse``, 503 while ``down`` > 0 (counting down), else 200. It
    counts what it is asked; it lets the failure paths be tested in seconds, without Ray."""

    def __init__(self):
        import http.server
        import threading

        stub = self
        self.classified = 0          # images the "service" scored
        self.classify_requests = 0
        self.stored: list[bytes] = []
        self.stow_requests = 0
        self.refuse: set[str] = set()
        self.down = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path.startswith("/v1/classify/study"):
                    stub.classify_requests += 1
                    names = re.findall(rb'filename="(\d+\.dcm)"', body)
                    stub.classified += len(names)
                    return self._answer(200, {"images": [
                        {"image": {"name": n.decode()}, "fracture_probability": 0.8, "threshold": 0.5,
                         "body_part": "hand", "classifier": "fracture_hand:stub@v1",
                         "findings": [{"box": [10, 10, 60, 60], "score": 0.9}]} for n in names]})
                if self.path.endswith("/studies"):
                    stub.stow_requests += 1
                    if stub.down > 0:
                        stub.down -= 1
                        return self._answer(503, {})
                    if any(uid.encode() in body for uid in stub.refuse):
                        return self._answer(409, {"00081198": {"vr": "SQ", "Value": [
                            {"00081197": {"vr": "US", "Value": [0xC000]}}]}})
                    stub.stored.append(body)
                    return self._answer(200, {})
                self._answer(404, {})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.pacs = f"dicomweb://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def stub():
    s = _Stub()
    yield s
    s.server.shutdown()


def _fast_config(tmp_path, destination: str, service_url: str, **changes):
    from fracray.pacs.listener import ListenerConfig

    return ListenerConfig(**{"spool": str(tmp_path / "spool"), "destination": destination, "port": 0,
                             "service_url": service_url, "study_idle_s": 0.5, "retry_backoff_s": 0.2,
                             "max_attempts": 20, "poll_s": 0.1, **changes})


@needs_orthanc
def test_studies_without_type2_attributes_get_their_results_in_orthanc(pacs, stub, tmp_path, caplog):
    """Real radiographs without PatientBirthDate, StudyID, ReferringPhysicianName or any other
    Type 2 patient/study attribute, C-STOREd to the listener; SR and overlays land in Orthanc
    and pass dciodvfy. Before: ComprehensiveSR raised AttributeError, retried 20 times."""
    import pydicom

    from conftest import dicom_check, wrapped_study
    from fracray import dicomweb
    from fracray.pacs.listener import Listener
    from fracray.pacs.results import TYPE2_PATIENT_STUDY

    caplog.set_level(logging.INFO, logger="fracray")
    study_uid, files = wrapped_study(2, start=40, syntaxes=("jpeg-ls", "explicit"), omit=TYPE2_PATIENT_STUDY)
    sources = datasets(files)
    with Listener(_fast_config(tmp_path, pacs["uri"], stub.url, max_attempts=3)) as listener:
        assert c_store(listener.port, sources) == [0x0000, 0x0000]
        wait_for(lambda: listener.stats.studies == 1 or listener.stats.failures, 60, "the study's results")
        assert listener.stats.failures == 0, listener_log(caplog)
    found = instances_in(pacs, study_uid)
    assert sorted(_tag(i, "00080060") for i in found) == ["OT", "OT", "SR"]  # the sources were not stored there
    loc = dicomweb.parse(pacs["uri"])
    for item in found:
        data = dicomweb.read_instance(dicomweb.instance_uri(loc, study_uid, _tag(item, "0020000E"),
                                                            _tag(item, "00080018")))
        path = tmp_path / f"{_tag(item, '00080018')}.dcm"
        path.write_bytes(data)
        dicom_check(path)
        ds = pydicom.dcmread(path)
        assert all(k in ds and not ds[k].value for k in TYPE2_PATIENT_STUDY)
    assert_no_patient_data(listener_log(caplog), study_uid)


def test_a_study_the_pacs_refuses_is_dead_lettered_once_and_the_others_go_through(stub, tmp_path, caplog):
    """The PACS refuses one study's results (STOW-RS 409, Failed SOP Sequence): logged once with
    the reason, moved to the dead letter at once, never retried; the other study is stored. Then
    the command line lists it and replays it, and once the PACS takes it, it is stored.
    Before: the refusal was retried max_attempts times, each time classifying the study again."""
    from fracray.pacs.listener import Listener
    from fracray.pacs.privacy import study_key
    from fracray.pacs.spool import list_failed

    caplog.set_level(logging.INFO, logger="fracray")
    bad_uid, bad = make_study(2, 0, syntaxes=("explicit",))
    good_uid, good = make_study(1, 1, syntaxes=("explicit",))
    stub.refuse.add(bad_uid)
    spool = tmp_path / "spool"
    config = _fast_config(tmp_path, stub.pacs, stub.url)
    with Listener(config) as listener:
        assert c_store(listener.port, datasets(bad) + datasets(good)) == [0x0000] * 3
        wait_for(lambda: listener.stats.studies == 1 and listener.stats.permanent == 1, 60, "both studies")
        time.sleep(1.0)  # time for a retry, were there one
        assert listener.stats.failures == 1 and listener.pending() == []
    assert stub.classified == 3 and len(stub.stored) == 1  # the bad study was classified once, not again
    key = study_key(bad_uid)
    log = listener_log(caplog)
    assert log.count(f"study {key}: permanent failure, not retried: the PACS refused the results: STOW-RS "
                     f"refused 1 instance(s) (failure reason 0xC000)") == 1
    assert f"study {key}: attempt" not in log
    record = json.loads((spool / ".failed" / key / "failure.json").read_text())
    assert record["kind"] == "permanent" and record["attempts"] == 1 and "refused" in record["reason"]
    assert len(list((spool / ".failed" / key).glob("*.dcm"))) == 2
    assert [r["study"] for r in list_failed(spool)] == [key]
    assert_no_patient_data(log, bad_uid, good_uid)

    listed = subprocess.run([sys.executable, str(REPO / "pipelines" / "listen.py"), "--spool", str(spool),
                             "--list-failed"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and key in listed.stdout and "2 image(s)" in listed.stdout, listed.stderr
    stub.refuse.clear()  # the cause is fixed
    replayed = subprocess.run([sys.executable, str(REPO / "pipelines" / "listen.py"), "--spool", str(spool),
                               "--replay", key], capture_output=True, text=True, timeout=60)
    assert replayed.returncode == 0 and key in replayed.stdout, replayed.stderr
    assert list_failed(spool) == [] and (spool / ".failed" / f"{key}.replayed.json").exists()
    with Listener(config) as listener:
        wait_for(lambda: listener.stats.studies == 1 or listener.stats.failures, 60, "the replayed study")
        assert listener.stats.failures == 0 and listener.pending() == []
    assert len(stub.stored) == 2 and bad_uid.encode() in stub.stored[1]


def test_a_pacs_that_is_down_is_retried_with_the_results_already_built(stub, tmp_path, caplog):
    """A 503 from the PACS is transient: retried with back-off until it takes the results, and
    the service is not asked again for each retry. Before: every retry classified the study again."""
    from fracray import dicomweb
    from fracray.pacs.listener import Listener
    from fracray.pacs.privacy import study_key

    caplog.set_level(logging.INFO, logger="fracray")
    study_uid, files = make_study(2, 2, syntaxes=("explicit",))
    stub.down = 2 * dicomweb.RETRIES  # two attempts fail, each after its own retries; the third stores
    with Listener(_fast_config(tmp_path, stub.pacs, stub.url)) as listener:
        assert c_store(listener.port, datasets(files)) == [0x0000, 0x0000]
        wait_for(lambda: listener.stats.studies == 1, 120, "the study's results")
    assert listener.stats.failures == 2 and listener.stats.permanent == 0 and listener.stats.given_up == 0
    assert stub.classify_requests == 1 and stub.classified == 2 and len(stub.stored) == 1
    log = listener_log(caplog)
    key = study_key(study_uid)
    assert f"study {key}: attempt 1 of 20 failed: STOW-RS storage: the DICOMweb service at" in log
    assert "retrying in" in log and f"study {key}: sending its results again" in log


# ----------------------------------------------------------------------------- hostile peers

def _echo(port: int, *, timeout: float = 10.0) -> bool:
    from pynetdicom import AE

    ae = AE(ae_title="ECHOER")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACRAY")
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()


def _reply(sock, timeout: float = 10.0) -> bytes:
    """What the listener answers before it closes the connection (b"" when it just closes)."""
    import socket

    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return data


def _server_log(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "fracray.pacs.server")


def test_twelve_idle_connections_do_not_lock_out_a_c_echo(tmp_path, caplog):
    """Twelve TCP connections that never send a byte; a C-ECHO (pynetdicom, then dcmtk's echoscu)
    is answered at once while they are open. Before: pynetdicom's 10 association slots were held
    by them for the 30 s ACSE timeout, and every association was refused."""
    import socket

    from fracray.pacs.listener import Listener

    caplog.set_level(logging.INFO, logger="fracray")
    config = _fast_config(tmp_path, "dicomweb://127.0.0.1:9/dicom-web", "http://127.0.0.1:9", study_idle_s=600)
    with Listener(config) as listener:
        idle = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(12)]
        try:
            time.sleep(0.5)
            started = time.monotonic()
            assert _echo(listener.port)
            assert time.monotonic() - started < 5
            if shutil.which("echoscu"):
                done = subprocess.run(["echoscu", "-aec", "FRACRAY", "-to", "10", "127.0.0.1", str(listener.port)],
                                      capture_output=True, text=True, timeout=30)
                assert done.returncode == 0, done.stdout + done.stderr
            log = _server_log(caplog)
            # The oldest idle ones were closed as new connections came over the per-peer cap.
            assert "refused: closed an idle connection from 127.0.0.1" in log and "max_idle_per_peer 4" in log
        finally:
            for s in idle:
                s.close()


def test_an_idle_connection_is_closed_after_the_acse_timeout(tmp_path, caplog):
    import socket

    from fracray.pacs.listener import Listener
    from fracray.pacs.server import ServerLimits

    caplog.set_level(logging.INFO, logger="fracray")
    config = _fast_config(tmp_path, "dicomweb://127.0.0.1:9/dicom-web", "http://127.0.0.1:9", study_idle_s=600,
                          limits=ServerLimits(acse_timeout_s=1.0, network_timeout_s=2.0))
    with Listener(config) as listener:
        with socket.create_connection(("127.0.0.1", listener.port)) as idle:
            started = time.monotonic()
            assert _reply(idle, timeout=10) == b""  # closed by the listener
            assert 0.8 < time.monotonic() - started < 5
        # A PDU that announces 100 bytes and sends 10: closed after the network timeout.
        with socket.create_connection(("127.0.0.1", listener.port)) as stalled:
            stalled.sendall(b"\x01\x00\x00\x00\x00\x64" + b"\x00" * 10)
            started = time.monotonic()
            _reply(stalled, timeout=10)
            assert time.monotonic() - started < 6
        assert _echo(listener.port)
    log = _server_log(caplog)
    assert "refused: 127.0.0.1 connected and sent no association request within 1 s (acse_timeout)" in log
    assert "refused: 127.0.0.1 stopped sending in the middle of a A-ASSOCIATE-RQ PDU" in log


def test_oversized_lengths_and_random_bytes_are_answered_with_an_abort(tmp_path, caplog):
    """A PDU that announces 0xFFFFFFFF bytes, one over the largest accepted, and random bytes:
    each gets an A-ABORT (or, for a short random PDU, a closed connection) at once, and a log
    line. Before: the 0xFFFFFFFF request got no reply at all (pynetdicom waited for 4 GiB)."""
    import socket

    import numpy as np

    from fracray.pacs.listener import Listener
    from fracray.pacs.server import ServerLimits

    caplog.set_level(logging.INFO, logger="fracray")
    limits = ServerLimits(max_pdu_bytes=64 * 1024, network_timeout_s=3.0)
    config = _fast_config(tmp_path, "dicomweb://127.0.0.1:9/dicom-web", "http://127.0.0.1:9", study_idle_s=600,
                          limits=limits)
    rng = np.random.default_rng(23)
    with Listener(config) as listener:
        cases = [b"\x01\x00\xff\xff\xff\xff", b"\x04\x00" + (64 * 1024 + 1).to_bytes(4, "big") + b"\x00" * 64]
        cases += [rng.integers(0, 256, size=int(n), dtype=np.uint8).tobytes() for n in rng.integers(1, 5000, 12)]
        for data in cases:
            with socket.create_connection(("127.0.0.1", listener.port)) as sock:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)  # nothing more comes
                started = time.monotonic()
                answer = _reply(sock)
                assert time.monotonic() - started < 5, data[:6]
                assert answer == b"" or answer[:1] in (b"\x07", b"\x03"), answer[:16]  # A-ABORT or A-ASSOCIATE-RJ
                if data[:1] not in b"\x01\x02\x03\x04\x05\x06\x07" or int.from_bytes(data[2:6], "big") > 64 * 1024:
                    assert answer[:1] == b"\x07" and len(answer) == 10  # refused with an A-ABORT PDU
        assert _echo(listener.port)
    log = _server_log(caplog)
    assert "refused: A-ASSOCIATE-RQ PDU of 4,294,967,295 bytes, over the largest accepted (65,536 bytes" in log
    assert "refused: P-DATA-TF PDU of 65,537 bytes" in log and "refused: not a DICOM PDU (first byte 0x" in log


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_a_tls_listener_is_not_stopped_by_connections_that_never_handshake(tmp_path, caplog):
    """Before: the TLS handshake ran in the thread that accepts connections, so one connection
    that sent nothing stopped every other (until the peer went away)."""
    import socket

    from fracray.pacs.dimse import DimseDestination, TlsFiles, send_instances
    from fracray.pacs.listener import Listener, ListenerConfig

    caplog.set_level(logging.INFO, logger="fracray")
    cert, key = _self_signed(tmp_path)
    _, files = make_study(1, 2, syntaxes=("explicit",))
    config = ListenerConfig(spool=str(tmp_path / "spool"), destination="dicomweb://127.0.0.1:9/dicom-web", port=0,
                            tls=TlsFiles(cert=cert, key=key, ca=cert), study_idle_s=600)
    with Listener(config) as listener:
        silent = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(2)]
        try:
            good = DimseDestination(host="127.0.0.1", port=listener.port, called_ae="FRACRAY", calling_ae="SENDER",
                                    tls=True, tls_files=TlsFiles(cert=cert, key=key, ca=cert), timeout_s=15)
            assert send_instances(good, datasets(files)) == 1
        finally:
            for s in silent:
                s.close()
