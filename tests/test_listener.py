"""The DICOM node, with real parts only: a pynetdicom modality (or Orthanc itself) C-STOREs a
study to the listener, the listener classifies it through a real Ray Serve service, and the SR
and overlays go back into a real Orthanc by STOW-RS or by C-STORE; unsupported objects are
acknowledged and skipped; nothing piles up when the study comes again; a restarted listener
finishes what its spool holds; TLS both ways; the command line."""

from __future__ import annotations

import dataclasses
import io
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

from conftest import REPO, SERVE_TEST_TOKEN, SERVE_TEST_TOKEN_ENV, _free_port, radiographs

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
def service(ray_local, localizing_single_index):
    """The Serve application on the fracture-map model, with a bearer token and at most 2 images
    per study request (so that a 3-image study goes in two requests); one replica each."""
    from ray import serve

    from fracray.serving.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": localizing_single_index, "auth_token_env": SERVE_TEST_TOKEN_ENV,
                         "max_study_images": 2, "min_replicas": 1}), name="fracray", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {SERVE_TEST_TOKEN}"}
    deadline, last = time.time() + 240, None
    while time.time() < deadline:
        try:
            last = requests.get(f"{url}/readyz", headers=headers, timeout=60)
            if last.status_code == 200:
                break
        except requests.RequestException as exc:
            last = exc
        time.sleep(1)
    else:
        raise AssertionError(f"service not ready: {getattr(last, 'text', last)}")
    previous = os.environ.get(SERVE_TEST_TOKEN_ENV)
    os.environ[SERVE_TEST_TOKEN_ENV] = SERVE_TEST_TOKEN  # the listener reads the token here
    yield url
    if previous is None:
        os.environ.pop(SERVE_TEST_TOKEN_ENV, None)
    else:
        os.environ[SERVE_TEST_TOKEN_ENV] = previous
    serve.shutdown()


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
    from fracray.pacs.listener import Listener, ListenerConfig, study_key

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
    from fracray.pacs.listener import Listener, ListenerConfig, study_key

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
    from fracray.pacs.listener import Listener, ListenerConfig, study_key

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
    from fracray.pacs.listener import DicomWebDestination, ListenerConfig, parse_destination

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
