"""The review application (fracray review): worklist queries, the feedback stores (SQLite, a real
PostgreSQL), the manifest export train_all reads, the app over real HTTP (auth, bad input, no patient
data in the log) and the pages in a real headless Chromium (Debian's chromium + chromium-driver):
worklist -> study -> feedback -> restart -> still there. Screenshots go to $FRACRAY_REVIEW_SCREENSHOTS
(default: a temporary folder)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from conftest import _free_port, joining_session_ray, REPO
from review_support import make_run

from fracray.review.feedback import FeedbackRecord, open_store
from fracray.review.worklist import RunError, ScoringRun, WorklistQuery

TOKEN = "review-test-token"
UTC = dt.timezone.utc
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _wait(predicate, timeout=30.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - not yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class App:
    """`fracray review RUN` in a subprocess, restartable; its log kept for the no-patient-data check."""

    def __init__(self, run: Path, feedback: str | None = None, token: str | None = TOKEN):
        self.run, self.feedback, self.token = run, feedback, token
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.logs: list[str] = []

    def start(self) -> "App":
        env = dict(os.environ)
        env.pop("FRACRAY_API_TOKEN", None)
        if self.token:
            env["FRACRAY_API_TOKEN"] = self.token
        cmd = [sys.executable, "-m", "fracray.cli.main", "review", str(self.run), "--port", str(self.port)]
        if self.feedback:
            cmd += ["--feedback", self.feedback]
        self.log_file = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=REPO)
        _wait(lambda: requests.get(self.url + "/healthz", timeout=1).ok or self.proc.poll() is not None,
              what="the review app")
        assert self.proc.poll() is None, Path(self.log_file.name).read_text()
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        if self.proc:
            self.logs.append(Path(self.log_file.name).read_text())
        self.proc = None

    def restart(self) -> "App":
        self.stop()
        return self.start()

    def get(self, path, **kw):
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return requests.get(self.url + path, headers=headers, timeout=30, **kw)

    def post(self, path, json):
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return requests.post(self.url + path, headers=headers, json=json, timeout=30)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("review"), studies=12, missing_image="patient010/study1")


@pytest.fixture(scope="module")
def app(run_dir):
    a = App(run_dir).start()
    yield a
    a.stop()


# ----------------------------------------------------------------------------- worklist queries

def test_worklist_flagged_first_by_probability_filters_and_pages(run_dir):
    run = ScoringRun(str(run_dir))
    first = run.worklist(WorklistQuery(page_size=5))
    assert first["total"] == 12 and first["pages"] == 3
    probs = [s["probability"] for s in first["studies"]]
    assert probs == sorted(probs, reverse=True) and all(s["flagged"] for s in first["studies"])
    everything = [s for p in (1, 2, 3) for s in run.worklist(WorklistQuery(page=p, page_size=5))["studies"]]
    assert len({s["study_id"] for s in everything}) == 12
    flags = [s["flagged"] for s in everything]
    assert flags == sorted(flags, reverse=True)  # flagged first
    # another operating point flags fewer
    strict = run.worklist(WorklistQuery(operating_point="0.9", label="flagged"))
    assert 0 < strict["total"] < run.worklist(WorklistQuery(label="flagged"))["total"]
    assert {s["body_part"] for s in run.worklist(WorklistQuery(body_part="hand"))["studies"]} == {"hand"}
    dated = run.worklist(WorklistQuery(date_from="2026-01-03", date_to="2026-01-05"))
    assert dated["total"] == 3 and all("2026-01-03" <= s["study_date"] <= "2026-01-05" for s in dated["studies"])
    reviewed = run.worklist(WorklistQuery(reviewed="yes"), {"patient003/study1"})
    assert [s["study_id"] for s in reviewed["studies"]] == ["patient003/study1"] and reviewed["studies"][0]["reviewed"]
    assert run.worklist(WorklistQuery(reviewed="no"), {"patient003/study1"})["total"] == 11
    nb = run.neighbours(first["studies"][1]["study_id"], WorklistQuery())
    assert (nb["previous"], nb["next"], nb["position"]) == (first["studies"][0]["study_id"],
                                                            first["studies"][2]["study_id"], 2)
    with pytest.raises(ValueError, match="Unknown operating point"):
        run.worklist(WorklistQuery(operating_point="sensitivity_0.99"))
    run.close()


def test_an_older_run_without_dates_reads_and_says_the_filter_is_unavailable(tmp_path):
    run = ScoringRun(str(make_run(tmp_path, studies=3, with_dates=False)))
    assert "date" in run.unavailable and "study_date" in run.unavailable["date"]
    assert run.worklist(WorklistQuery())["total"] == 3
    with pytest.raises(ValueError, match="date filter is unavailable"):
        run.worklist(WorklistQuery(date_from="2026-01-01"))


def test_not_a_scoring_output_and_a_corrupt_part_get_clear_messages(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=r"not a scoring output: images/part-\*\.parquet.*missing.*--output folder"):
        ScoringRun(str(tmp_path / "empty"))
    with pytest.raises(RunError, match="does not exist"):
        ScoringRun(str(tmp_path / "nowhere"))
    run = make_run(tmp_path / "corrupt", studies=3)
    (run / "images" / "part-000000.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(RunError, match="part-000000.parquet is not a readable Parquet file"):
        ScoringRun(str(run))
    other = tmp_path / "other" / "images"
    other.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), other / "part-000000.parquet")
    with pytest.raises(RunError, match="not a scoring part file: it lacks"):
        ScoringRun(str(other.parent))


def test_cli_refuses_what_is_not_a_run_and_exposure_without_a_token(tmp_path, run_dir):
    from fracray.cli.review import main

    assert main([str(tmp_path)]) == 2
    env = os.environ.pop("FRACRAY_API_TOKEN", None)
    try:
        assert main([str(run_dir), "--host", "0.0.0.0", "--feedback", str(tmp_path / "f.sqlite")]) == 2
    finally:
        if env is not None:
            os.environ["FRACRAY_API_TOKEN"] = env


# ----------------------------------------------------------------------------- feedback, export

def test_feedback_record_rules():
    now = dt.datetime.now(UTC)
    with pytest.raises(ValueError, match="verdict"):
        FeedbackRecord("s", None, None, "maybe", None, "Dr A", now)
    with pytest.raises(ValueError, match="reviewer"):
        FeedbackRecord("s", None, None, "agree", None, " ", now)
    with pytest.raises(ValueError, match="missed fracture needs"):
        FeedbackRecord("s", "u", None, "missed", None, "Dr A", now)
    with pytest.raises(ValueError, match="x1 > x0"):
        FeedbackRecord("s", "u", None, "missed", (5, 5, 1, 9), "Dr A", now)
    assert FeedbackRecord("s", "u", 1, "agree", None, "Dr A", now).scope == "finding"


def _store_round_trip(target: str, run: str) -> None:
    store = open_store(target, run)
    now = dt.datetime.now(UTC)
    a = store.add(FeedbackRecord("st1", None, None, "agree", None, "Dr A", now))
    store.add(FeedbackRecord("st1", "u1", None, "missed", (1, 2, 30, 40), "Dr B", now))
    store.add(FeedbackRecord("st2", "u2", 0, "disagree", None, "Dr A", now))
    open_store(target, run + "-other").add(FeedbackRecord("st9", None, None, "agree", None, "Dr C", now))
    store.close()
    again = open_store(target, run)  # reopened: persisted
    got = again.records("st1")
    assert [r.verdict for _, r in got] == ["agree", "missed"] and got[1][1].box == (1.0, 2.0, 30.0, 40.0)
    assert got[0][1].created_at == now
    assert again.reviewed_study_ids() == {"st1", "st2"}
    assert again.delete(a) and not again.delete(a)
    assert len(again.all()) == 2
    again.close()


def test_sqlite_store(tmp_path):
    _store_round_trip(str(tmp_path / "fb" / "feedback.sqlite"), "/runs/a")


PG_RESTART: dict = {}  # the throwaway cluster's restart, by URL


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A throwaway PostgreSQL cluster from Debian's packages (initdb + pg_ctl as the postgres user)."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL 15 server not installed (apt-get install postgresql-15; scripts/install_review_tools.sh)")
    root = Path(tempfile.mkdtemp(prefix="fracray-pg-"))
    data, port = root / "data", _free_port()
    as_user = []
    if os.geteuid() == 0:
        try:
            import pwd
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(as_user + [str(PG_BIN / "initdb"), "-D", str(data), "-U", "fracray", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run(as_user + [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                              f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True,
                   capture_output=True)
    url = f"postgresql://fracray@127.0.0.1:{port}/postgres"
    PG_RESTART[url] = lambda: subprocess.run(as_user + [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"),
                                                        "-w", "-m", "fast", "restart"], check=True, capture_output=True)
    try:
        yield url
    finally:
        subprocess.run(as_user + [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_postgresql_store(postgres):
    _store_round_trip(postgres, "/runs/pg")


def test_postgresql_restarted_under_the_app_is_reconnected(postgres):
    """The database restarts while the store is open: reads go on, on a new connection; a write
    that met the dead connection is refused with what to do (not silently repeated), the next lands."""
    store = open_store(postgres, "/runs/pg-restart")
    try:
        now = dt.datetime.now(UTC)
        store.add(FeedbackRecord("s1", None, None, "agree", None, "Dr A", now))
        PG_RESTART[postgres]()
        assert [r.study_id for r in store.all()] == ["s1"]  # a read: reconnected and answered
        PG_RESTART[postgres]()
        with pytest.raises(ConnectionError, match="send the verdict again"):
            store.add(FeedbackRecord("s2", None, None, "agree", None, "Dr A", now))
        store.add(FeedbackRecord("s2", None, None, "agree", None, "Dr A", now))
        assert [r.study_id for r in store.all()] == ["s1", "s2"]
    finally:
        store.close()


def test_postgresql_unreachable_is_a_clear_error():
    with pytest.raises(ConnectionError, match="Cannot connect to the feedback database") as info:
        open_store(f"postgresql://fracray:secret@127.0.0.1:{_free_port()}/x", "/r")
    assert "secret" not in str(info.value)


def test_export_is_a_manifest_train_all_reads(run_dir, tmp_path):
    from fracray.data.adapters import index_manifest_file
    from fracray.review.export import export_manifest

    run = ScoringRun(str(run_dir))
    study = run.study("patient002/study1")  # flagged? no: low probability; has findings
    img0, img1 = (i["image_uri"] for i in study["images"])
    now = dt.datetime.now(UTC)
    records = [
        FeedbackRecord("patient002/study1", img0, 0, "agree", None, "Dr A", now),           # finding -> box, 1
        FeedbackRecord("patient002/study1", img1, None, "missed", (10, 20, 60, 80), "Dr A", now),
        FeedbackRecord("patient000/study1", None, None, "agree", None, "Dr B", now),        # normal study: 0s
        FeedbackRecord("patient011/study1", None, None, "disagree", None, "Dr B", now),     # flagged -> normal
        FeedbackRecord("patient005/study1", None, None, "agree", None, "Dr B", now),        # then changed:
        FeedbackRecord("patient005/study1", None, None, "disagree", None, "Dr B", now + dt.timedelta(seconds=1)),
    ]
    out = tmp_path / "feedback.parquet"
    counts = export_manifest(run, records, str(out))
    result = index_manifest_file(str(out))  # train_all --dataset manifest --data FILE reads it with this
    rows = {r["image_uri"]: r for r in result.manifest.to_pylist()}
    assert counts["images"] == len(rows) == 6 and counts["fractured"] == 2
    assert rows[img0]["image_label"] == 1 and len(rows[img0]["boxes"]) == 1
    box = rows[img1]["boxes"][0]
    assert abs(box["x_center"] - 35 / 320) < 1e-6 and abs(box["height"] - 60 / 256) < 1e-6
    assert all(r["image_label"] == 0 for r in rows.values() if r["study_id"] != "patient002/study1")
    assert {r["study_id"] for r in rows.values()} == {"patient002/study1", "patient000/study1", "patient011/study1"}
    assert rows[img0]["dataset"] == "review" and "finding 0 agreed by Dr A" in rows[img0]["label_note"]


def test_serve_builder_validates_its_arguments():
    from pydantic import ValidationError

    from fracray.review.app import ReviewArgs, build_review_app

    with pytest.raises(ValidationError):
        build_review_app({"feedback": "x.sqlite"})          # run is required
    with pytest.raises(ValidationError):
        build_review_app({"run": "s3://b/scores", "colour": "blue"})  # unknown argument
    with pytest.raises(ValidationError):
        ReviewArgs(run="s3://b/scores", max_image_side=10)
    assert ReviewArgs.model_validate({"run": "s3://b/scores", "anonymous": "true"}).anonymous is True
    # In a Serve replica (require_token) the app is not built without its token: it shows patient images.
    from fracray.review.app import create_app

    with pytest.raises(RuntimeError, match="FRACRAY_UNSET_TOKEN is not set"):
        create_app({"run": "scores/", "auth_token_env": "FRACRAY_UNSET_TOKEN"}, require_token=True)


def test_dicom_headers_give_date_and_equipment(tmp_path):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from fracray.scoring.dicom_headers import dicom_headers

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate, ds.Manufacturer, ds.ManufacturerModelName = "20260214", "ACME Medical", "DR-9000"
    path = tmp_path / "a.dcm"
    ds.save_as(path, enforce_file_format=True)
    batch = pa.table({"image_uri": [str(path), str(tmp_path / "b.png"), str(tmp_path / "gone.dcm")],
                      "sop_instance_uid": [ds.SOPInstanceUID, None, "1.2.3"]})
    out = dicom_headers(batch).to_pylist()
    assert (out[0]["study_date"], out[0]["manufacturer"], out[0]["manufacturer_model"]) == \
        (dt.date(2026, 2, 14), "ACME Medical", "DR-9000")
    assert out[1]["study_date"] is None and out[2]["manufacturer"] is None  # not DICOM; unreadable


# ----------------------------------------------------------------------------- the app over HTTP

def test_api_auth_bad_input_and_a_log_without_patient_data(app):
    assert requests.get(app.url + "/healthz", timeout=5).ok
    assert requests.get(app.url + "/api/worklist", timeout=5).status_code == 401
    wrong = requests.get(app.url + "/api/worklist", headers={"Authorization": "Bearer nope"}, timeout=5)
    assert wrong.status_code == 401 and "bearer token" in wrong.json()["error"]
    page = requests.get(app.url + "/", timeout=5, allow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].endswith("/login")
    once = requests.get(app.url + f"/?token={TOKEN}&label=flagged", timeout=5, allow_redirects=False)
    assert once.status_code == 303 and once.headers["location"] == "/?label=flagged"
    assert requests.get(app.url + "/api/run", cookies=once.cookies, timeout=5).ok  # the cookie signs in
    ok = app.get("/api/worklist?page_size=3")
    assert ok.ok and ok.json()["total"] == 12 and ok.headers["X-Request-Id"]
    assert app.get("/api/worklist?label=bogus").status_code == 400
    assert app.get("/api/worklist?op=nope").status_code == 400
    assert app.get("/api/study?id=nope").status_code == 404
    # a file that is in no study of the run is never read
    assert app.get("/api/image", params={"study": "patient001/study1", "uri": "/etc/passwd"}).status_code == 404
    missing = app.get("/api/image", params={"study": "patient010/study1",
                                            "uri": str(app.run.parent / "archive/patient010/study1/image0.png")})
    assert missing.status_code == 404 and "cannot be read now" in missing.json()["error"]
    good = app.get("/api/image", params={"study": "patient010/study1",
                                         "uri": str(app.run.parent / "archive/patient010/study1/image1.png")})
    assert good.ok and good.headers["content-type"] == "image/jpeg"
    bad = app.post("/api/feedback", {"study_id": "patient001/study1", "verdict": "agree"})
    assert bad.status_code == 400 and "reviewer" in bad.json()["error"]
    assert app.post("/api/feedback", {"study_id": "patient001/study1", "verdict": "agree", "reviewer": "X",
                                      "image_id": "/etc/passwd"}).status_code == 404
    assert requests.post(app.url + "/api/feedback", data=b"{not json", timeout=5,
                         headers={"Authorization": f"Bearer {TOKEN}",
                                  "Content-Type": "application/json"}).status_code == 400
    monitoring = app.get("/api/monitoring")
    assert monitoring.status_code == 200, monitoring.text
    assert monitoring.json()["report"]["overall"]["images"] > 0 and monitoring.json()["plots"]
    assert app.get("/healthz").ok  # still up
    log = Path(app.log_file.name).read_text()
    assert "request " in log
    for secret in ("patient", "archive", "image0", "/etc/passwd", TOKEN):
        assert secret not in log.split("Reviewing")[-1].split("\n", 1)[-1], secret


# ----------------------------------------------------------------------------- the browser

@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Chromium not installed (apt-get install chromium chromium-driver; "
                    "scripts/install_review_tools.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--disable-gpu", "--no-first-run"):
        options.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=options)
    yield b
    b.quit()


@pytest.fixture(scope="module")
def shots():
    folder = Path(os.environ.get("FRACRAY_REVIEW_SCREENSHOTS") or tempfile.mkdtemp(prefix="fracray-review-shots-"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _until(browser, condition, timeout=20, what="page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda b: condition(b), message=what)


def _browse_and_review(browser, app, shots, tag):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    css = By.CSS_SELECTOR
    browser.delete_all_cookies()
    browser.get(app.url + "/")
    _until(browser, lambda b: b.find_elements(css, "#token"), what="the sign-in form")
    browser.find_element(css, "#token").send_keys(TOKEN)
    browser.find_element(css, "#sign-in").click()
    _until(browser, lambda b: len(b.find_elements(css, "#worklist tbody tr.flagged")) > 0, what="the worklist")
    browser.save_screenshot(str(shots / f"{tag}-1-worklist.png"))
    rows = browser.find_elements(css, "#worklist tbody tr")
    assert len(rows) == 12 and rows[0].get_attribute("data-study") == "patient011/study1"
    # open the fourth study with the keyboard: j j j j Enter (patient008 has findings)
    body = browser.find_element(css, "body")
    for _ in range(4):
        body.send_keys("j")
    body.send_keys("\n")
    _until(browser, lambda b: b.find_elements(css, "#study-id"), what="the study view")
    assert browser.find_element(css, "#study-id").text == "patient008/study1"
    _until(browser, lambda b: b.execute_script(
        "return [...document.querySelectorAll('.viewer img')].every(i => i.complete && i.naturalWidth > 0)"),
        what="the images")
    assert len(browser.find_elements(css, "rect.finding")) == 4  # 2 findings on each of 2 images
    assert "FLAGGED" in browser.find_element(css, "#flag").text
    reviewer = browser.find_element(css, "#reviewer")
    reviewer.clear()
    reviewer.send_keys(f"Dr {tag}")
    browser.find_element(css, "#study-agree").click()
    _until(browser, lambda b: "Saved: agree" in b.find_element(css, "#saved").text, what="saved")
    browser.find_elements(css, ".finding-disagree")[1].click()
    _until(browser, lambda b: "finding 2" in b.find_element(css, "#saved").text, what="finding saved")
    # draw a missed fracture: drag across the first image
    browser.find_elements(css, ".draw-missed")[0].click()
    svg = browser.find_elements(css, ".viewer svg")[0]
    ActionChains(browser).move_to_element_with_offset(svg, -60, -40).click_and_hold() \
        .move_by_offset(80, 50).release().perform()
    _until(browser, lambda b: len(b.find_elements(css, "#feedback-list li.feedback-item")) == 3, what="the missed box")
    assert browser.find_elements(css, "rect.missed")
    browser.save_screenshot(str(shots / f"{tag}-2-study-with-feedback.png"))
    # keyboard to the next study
    browser.find_element(css, "body").send_keys("n")
    _until(browser, lambda b: b.find_elements(css, "#study-id")
           and b.find_element(css, "#study-id").text == "patient007/study1", what="the next study")
    # the missing image of patient010 says so, the page stays usable
    browser.get(app.url + "/study?id=patient010%2Fstudy1")
    _until(browser, lambda b: b.find_elements(css, ".image-error"), what="the missing-image message")
    assert "cannot be read now" in browser.find_element(css, ".image-error").text
    browser.save_screenshot(str(shots / f"{tag}-3-missing-image.png"))

    # restart the app: the feedback is still there
    app.restart()
    browser.get(app.url + "/study?id=patient008%2Fstudy1")
    _until(browser, lambda b: len(b.find_elements(css, "#feedback-list li.feedback-item")) == 3,
           what="the feedback after a restart")
    items = [i.text for i in browser.find_elements(css, "#feedback-list li.feedback-item")]
    assert any("agree with the study" in t and f"Dr {tag}" in t for t in items)
    assert any("missed fracture" in t for t in items) and browser.find_elements(css, "rect.missed")
    browser.get(app.url + "/?reviewed=yes")
    _until(browser, lambda b: b.find_elements(css, "#count") and "match" in b.find_element(css, "#count").text,
           what="reviewed filter")
    assert [r.get_attribute("data-study") for r in browser.find_elements(css, "#worklist tbody tr")] == \
        ["patient008/study1"]
    browser.save_screenshot(str(shots / f"{tag}-4-reviewed-after-restart.png"))
    browser.get(app.url + "/monitoring")
    _until(browser, lambda b: b.find_element(css, "#loading").get_attribute("hidden") is not None, what="monitoring")
    # The summary first (alarm status, counts, drift, the reviewers' concordance), then the plots.
    summary = browser.find_element(css, "#summary").text
    report = app.get("/api/monitoring").json()["report"]
    assert "Summary" in summary and f"{report['overall']['images']}: {report['overall']['scored']} scored" in summary
    assert ("No alarm." in summary) == (not report["alarms"]) and "PSI" in summary
    assert "reviewed studies decided" in summary  # the feedback recorded above reaches the concordance
    assert browser.find_elements(css, "#plots img")
    browser.save_screenshot(str(shots / f"{tag}-5-monitoring.png"))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "api/image" not in e["message"]]
    assert not errors, errors


def test_browser_sqlite(browser, app, shots):
    _browse_and_review(browser, app, shots, "sqlite")
    assert (app.run / "review" / "feedback.sqlite").exists()


def test_browser_postgresql(browser, postgres, run_dir, shots):
    app = App(run_dir, feedback=postgres).start()
    try:
        _browse_and_review(browser, app, shots, "postgresql")
    finally:
        app.stop()


def test_browser_bad_run_folder_and_corrupt_part(browser, tmp_path, shots):
    """A run whose part file went corrupt after the app opened: the page says so, the app stays up."""
    run = make_run(tmp_path, studies=3)
    app = App(run, token=None).start()
    try:
        (run / "images" / "part-000000.parquet").write_bytes(b"PAR1 garbage")
        from selenium.webdriver.common.by import By

        browser.get(app.url + "/study?id=patient000%2Fstudy1")
        _until(browser, lambda b: b.find_element(By.ID, "error").is_displayed(), what="the error")
        assert "cannot be read" in browser.find_element(By.ID, "error").text
        browser.save_screenshot(str(shots / "corrupt-part.png"))
        assert requests.get(app.url + "/healthz", timeout=5).ok
    finally:
        app.stop()


@pytest.mark.slow
def test_the_exported_feedback_trains(run_dir, tmp_path, ray_local):
    """The feedback loop closed: reviewers' verdicts on every study of a run, exported, then
    `fracray train --dataset manifest --data FILE` trains a model on it (one small epoch; the
    command as a user runs it on a cluster, here the session's Ray)."""
    import json

    from fracray.review.export import export_manifest

    run = ScoringRun(str(run_dir))
    now = dt.datetime.now(UTC)
    studies = [f"patient{k:03d}/study1" for k in range(12)]
    records = [FeedbackRecord(study, None, None, "agree", None, "Dr A", now) for study in studies]
    manifest = tmp_path / "feedback.parquet"
    counts = export_manifest(run, records, str(manifest))
    assert counts["images"] == 24 and 0 < counts["fractured"] < 24
    env = joining_session_ray(ray_local)
    done = subprocess.run([str(Path(sys.executable).parent / "fracray"), "train", "--dataset", "manifest", "--data",
                           str(manifest), "--output", str(tmp_path / "retrain"), "--single-model", "--epochs", "1",
                           "--image-size", "64", "--train-batch-size", "4"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "24 images have no split; training on them" in done.stdout + done.stderr
    index = json.loads((tmp_path / "retrain" / "model_index.json").read_text())
    bundle = json.loads((tmp_path / "retrain" / index["classifiers"]["all"] / "bundle.json").read_text())
    assert bundle["data"]["dataset"] == "manifest"
    assert bundle["data"]["train_images"] + bundle["data"].get("calibration_images", 0) + \
        bundle["data"]["valid_images"] == 24


@pytest.mark.slow
def test_the_review_app_runs_beside_the_service_on_serve(serve_url, run_dir):
    """`serve run fracray.review.app:build_review_app run=... feedback=...` as a deployment on the
    session's Serve, under its own route prefix: the app is built in the replica, reads the token
    from the replica's environment and refuses requests without it."""
    from ray import serve

    from conftest import SERVE_TEST_TOKEN, SERVE_TEST_TOKEN_ENV
    from fracray.review.app import build_review_app

    with pytest.raises(ValueError, match="feedback=postgresql"):
        build_review_app({"run": "s3://bucket/scores"})  # the default store would live in the replica
    app = build_review_app({"run": str(run_dir), "feedback": str(run_dir.parent / "serve-feedback.sqlite"),
                            "auth_token_env": SERVE_TEST_TOKEN_ENV, "route_prefix": "/review"})
    serve.run(app, name="review", route_prefix="/review", blocking=False)
    try:
        auth = {"Authorization": f"Bearer {SERVE_TEST_TOKEN}"}
        _wait(lambda: requests.get(f"{serve_url}/review/healthz", timeout=5).ok, 120, "the review deployment")
        assert requests.get(f"{serve_url}/review/api/run", timeout=30).status_code == 401
        run = requests.get(f"{serve_url}/review/api/run", headers=auth, timeout=60)
        assert run.status_code == 200 and run.json()["auth"] is True, run.text
        page = requests.get(f"{serve_url}/review/api/worklist", headers=auth, timeout=60).json()
        assert page["total"] == 12 and page["studies"][0]["flagged"]
    finally:
        serve.delete("review")


def test_export_and_concordance_read_the_feedback_alike(run_dir, tmp_path):
    """One truth rule (review.truth) for the manifest and the concordance: a finding agreed with,
    then disagreed with, decides nothing in either; a missed fracture drawn in a study whose latest
    verdict calls it normal makes both the image and the study fractured in both."""
    from fracray.review.concordance import study_truths
    from fracray.review.export import feedback_manifest

    run = ScoringRun(str(run_dir))
    now = dt.datetime.now(UTC)
    later = now + dt.timedelta(seconds=1)
    s8 = run.study("patient008/study1")  # flagged, with findings
    s2 = run.study("patient002/study1")  # not flagged, with findings
    a8 = s8["images"][0]["image_uri"]
    a2, b2 = (i["image_uri"] for i in s2["images"])
    records = [
        FeedbackRecord("patient008/study1", a8, 0, "agree", None, "Dr A", now),
        FeedbackRecord("patient008/study1", a8, 0, "disagree", None, "Dr B", later),   # changed: no box, no label
        FeedbackRecord("patient002/study1", None, None, "agree", None, "Dr A", now),   # "normal" ...
        FeedbackRecord("patient002/study1", a2, None, "missed", (10, 20, 60, 80), "Dr B", later),  # ... but a fracture
    ]
    rows = {r["image_uri"]: r for r in feedback_manifest(run, records).to_pylist()}
    assert a8 not in rows
    assert rows[a2]["image_label"] == 1 and rows[a2]["study_label"] == 1 and len(rows[a2]["boxes"]) == 1
    assert b2 not in rows  # a fractured study says nothing of its other images
    truths = study_truths(records, {"patient008/study1": 1, "patient002/study1": 0})
    assert truths["patient008/study1"]["truth"] is None and truths["patient002/study1"]["truth"] == 1


def test_a_study_is_read_from_its_own_part_files_only(tmp_path):
    """Opening a study reads the part files of its chunks, not every part of the run (a million
    images are ~4,000 parts): with another part gone bad after opening, the study still opens."""
    run = ScoringRun(str(make_run(tmp_path, studies=12)))  # 4 studies per part file
    (tmp_path / "run" / "images" / "part-000000.parquet").write_bytes(b"PAR1 garbage")
    study = run.study("patient009/study1")
    assert [i["study_id"] for i in study["images"]] == ["patient009/study1"] * 2
    assert run.image_row("patient009/study1", study["images"][0]["image_uri"])["status"] == "ok"
    assert run.images_of(["patient005/study1", "patient010/study1"]).num_rows == 4
    with pytest.raises(RunError, match="cannot be read"):
        run.study("patient000/study1")  # its own part is the bad one
    run.close()


def test_a_run_in_s3_opens_where_it_lies(s3_bucket, tmp_path):
    """RUN as s3:// (the local S3 server): the worklist, a study and the export's rows, read through
    the storage layer (the endpoint from the storage options, as every command takes it)."""
    from conftest import upload_tree
    from fracray.storage import StorageOptions

    client, bucket, endpoint = s3_bucket
    local = make_run(tmp_path, studies=12)
    assert upload_tree(client, local, bucket, "runs/scores") > 3
    run = ScoringRun(f"s3://{bucket}/runs/scores", StorageOptions(endpoint_url=endpoint))
    page = run.worklist(WorklistQuery())
    assert page["total"] == 12 and page["studies"][0]["flagged"]
    assert len(run.study("patient008/study1")["images"]) == 2
    assert run.images_of(["patient001/study1"]).num_rows == 2
    run.close()
