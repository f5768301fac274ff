"""The Serve application, started for real on the local Ray and called over HTTP."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from conftest import REPO, SERVE_TEST_TOKEN, SERVE_TEST_TOKEN_ENV, _free_port, served, wait_ready
from conftest import radiograph_bytes as _image
from fracray.data.synthetic import render_radiograph
from fracray.inference.predictor import FracturePredictor
from conftest import dicom_bytes



@pytest.fixture(scope="module")
def service(serve_url, localizing_index):
    """The application with a bearer token, a 2 MB upload limit and a 4-Mpixel decode limit, on
    untrained models: a router, a plain humerus model and a wrist model with a fracture map."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {SERVE_TEST_TOKEN}"
    with served(serve_url, {"models": localizing_index, "max_upload_mb": 2, "max_pixels": 4_000_000,
                            "auth_token_env": SERVE_TEST_TOKEN_ENV, "max_study_images": 4}, "fracray",
                headers=session.headers) as url:
        yield url, session


def test_health_readiness_models_and_openapi(service):
    url, session = service
    assert requests.get(f"{url}/healthz").json() == {"status": "ok"}  # open: load balancers probe it
    ready = session.get(f"{url}/readyz").json()
    assert ready["status"] == "ready" and set(ready["classifiers"]) == {"humerus", "wrist"}
    models = session.get(f"{url}/v1/models").json()
    assert set(models["classifiers"]) == {"humerus", "wrist"} and models["engine"] == "auto"
    assert models["router"]["classes"] == ["humerus", "wrist"]
    assert models["classifiers"]["wrist"]["operating_points"]["sensitivity>=0.90"]["threshold"] == 0.3
    openapi = session.get(f"{url}/openapi.json").json()
    assert {"/v1/classify", "/v1/classify/study", "/v1/models", "/healthz", "/readyz"} <= set(openapi["paths"])
    assert session.get(f"{url}/docs").status_code == 200


def test_classify_agrees_with_the_batch_predictor(service, localizing_index):
    url, session = service
    images = [_image("wrist", seed=1), _image("humerus", 1200, 800, fmt="PNG", seed=2)]
    local = FracturePredictor(localizing_index).predict_bytes(images)
    for data, expected in zip(images, local):
        r = session.post(f"{url}/v1/classify", data=data, headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["body_part"] == expected["body_part"]
        assert got["fracture_probability"] == pytest.approx(expected["fracture_probability"], abs=1e-5)
        assert got["body_part_probability"] == pytest.approx(expected["body_part_probability"], abs=1e-5)
        assert got["label"] == expected["label"] and got["threshold"] == expected["threshold"]
        assert got["classifier"] == expected["classifier"] and got["router"] == expected["router"]
        assert got["engine"] == expected["engine"] == "onnxruntime-float32"  # the CPU default, named in the answer
        # Scores only: on these flat backgrounds the untrained map has exact ties that the thread
        # counts may break either way (test_findings_in_the_uploads_pixels_and_overlay: exact boxes).
        assert [f["score"] for f in got["findings"]] == pytest.approx([f["score"] for f in expected["findings"]],
                                                                      abs=2e-4)
        assert got["classifier"].startswith(f"fracture_{got['body_part']}:efficientnet_lite0@")
        assert set(got["timings_ms"]) == {"decode", "route", "classify", "total"}


def test_multipart_body_part_operating_point_and_gradcam(service):
    url, session = service
    data = _image("wrist", seed=3)
    r = session.post(f"{url}/v1/classify", params={"body_part": "Humerus", "gradcam": "true"},
                     files={"file": ("x.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["body_part"] == "humerus" and got["body_part_probability"] is None and got["router"] is None
    heatmap = Image.open(io.BytesIO(base64.b64decode(got["gradcam"]["png_base64"])))
    assert heatmap.format == "PNG" and heatmap.mode == "RGB" and max(heatmap.size) <= 512
    assert all(0 <= v <= 1 for v in got["gradcam"]["peak_xy"])

    named = session.post(f"{url}/v1/classify", params={"operating_point": "sensitivity>=0.90"}, data=data).json()
    assert named["threshold"] == 0.3 and named["label"] == int(named["fracture_probability"] >= 0.3)
    numeric = session.post(f"{url}/v1/classify", params={"operating_point": "0.99"}, data=data).json()
    assert numeric["threshold"] == 0.99 and numeric["label"] == int(numeric["fracture_probability"] >= 0.99)
    bad = session.post(f"{url}/v1/classify", params={"operating_point": "best"}, data=data)
    assert bad.status_code == 422 and bad.json()["error"] == "bad_operating_point"


def test_models_show_localization_facts(service):
    from conftest import LOCALIZING_DATA, LOCALIZING_TRAINING, LOCALIZING_VALIDATION

    url, session = service
    models = session.get(f"{url}/v1/models").json()
    wrist, humerus = models["classifiers"]["wrist"]["localization"], models["classifiers"]["humerus"]["localization"]
    assert wrist["localizes"] is True and wrist["heatmap"] == "fracture map"
    assert wrist["data"] == LOCALIZING_DATA
    assert wrist["validation"] == {k: v for k, v in LOCALIZING_VALIDATION.items() if k != "froc"}
    assert wrist["findings"] == {"min_score": 0.5, "region_level": 0.8, "max_findings": 3}
    # What it was trained on and with (the per-epoch history stays in bundle.json).
    assert models["classifiers"]["wrist"]["data"] == {"dataset": "synthetic", "train_images": 8, "valid_images": 10}
    assert models["classifiers"]["wrist"]["training"] == {k: v for k, v in LOCALIZING_TRAINING.items()
                                                          if k != "history"}
    assert humerus == {"localizes": False, "heatmap": "Grad-CAM", "data": None, "findings": None, "validation": None}
    assert models["classifiers"]["wrist"]["tta_flip"] is False
    assert models["classifiers"]["wrist"]["operating_points"]["sensitivity>=0.90"]["threshold"] == 0.3
    openapi = session.get(f"{url}/openapi.json").json()
    params = {p["name"]: p for p in openapi["paths"]["/v1/classify"]["post"]["parameters"]}
    assert {"body_part", "operating_point", "gradcam", "overlay"} <= set(params)
    assert "findings" in params["overlay"]["description"] and params["overlay"]["schema"]["default"] is False
    assert "findings" in openapi["paths"]["/v1/classify"]["post"]["description"]
    study = {p["name"] for p in openapi["paths"]["/v1/classify/study"]["post"]["parameters"]}
    assert "overlay" in study


def test_findings_in_the_uploads_pixels_and_overlay(service, localizing_index):
    """A wide JPEG (decoded at reduced size for the model): findings in its own pixels, the
    same as the batch predictor's; overlay=true draws them on the radiograph."""
    url, session = service
    # Film grain: a flat background would give the untrained map exact ties between cells,
    # which thread counts (a replica's vs this process's) may break either way.
    pixels = render_radiograph(np.random.default_rng(21), "wrist", 420, 1000, fracture=True).pixels
    pixels = np.clip(pixels + np.random.default_rng(22).normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=92)
    data = buf.getvalue()
    expected = FracturePredictor(localizing_index).predict_bytes([data], body_parts=["wrist"])[0]
    assert expected["findings"], "the fracture-map model should find something (its map bias is raised)"
    r = session.post(f"{url}/v1/classify", params={"body_part": "wrist", "overlay": "true"}, data=data)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["findings"] == expected["findings"]
    assert got["image"]["width"] == 1000 and got["image"]["height"] == 420
    for finding in got["findings"]:
        x0, y0, x1, y1 = finding["box"]
        assert 0 <= x0 < x1 <= 1000 and 0 <= y0 < y1 <= 420 and 0.5 <= finding["score"] <= 1
        assert x0 <= finding["peak"][0] < x1 and y0 <= finding["peak"][1] < y1
    assert [f["score"] for f in got["findings"]] == sorted((f["score"] for f in got["findings"]), reverse=True)
    overlay = got["overlay"]
    assert overlay["heatmap"] == "fracture map" and overlay["findings"] == len(got["findings"])
    png = Image.open(io.BytesIO(base64.b64decode(overlay["png_base64"])))
    assert png.format == "PNG" and png.mode == "RGB" and max(png.size) <= 512
    assert png.size[0] / png.size[1] == pytest.approx(1000 / 420, rel=0.02)
    assert "gradcam" not in got
    # A model without a fracture map: no findings, the overlay falls back on Grad-CAM; gradcam still works.
    plain = session.post(f"{url}/v1/classify", params={"body_part": "humerus", "overlay": "true", "gradcam": "true"},
                         data=data).json()
    assert plain["findings"] == [] and plain["overlay"]["heatmap"] == "Grad-CAM" and plain["overlay"]["findings"] == 0
    assert Image.open(io.BytesIO(base64.b64decode(plain["gradcam"]["png_base64"]))).format == "PNG"
    # Per image in a study, too.
    study = session.post(f"{url}/v1/classify/study", params={"body_part": "wrist"},
                         files=[("files", ("a.jpg", data, "image/jpeg"))]).json()
    assert study["images"][0]["findings"] == expected["findings"] and "overlay" not in study["images"][0]


def test_dicom_upload(service):
    url, session = service
    pixels = render_radiograph(np.random.default_rng(5), "wrist", 512, 400, fracture=False).pixels
    dicom = dicom_bytes(pixels.astype(np.uint16) * 16, body_part="WRIST")
    r = session.post(f"{url}/v1/classify", data=dicom, headers={"content-type": "application/dicom"})
    assert r.status_code == 200, r.text
    assert r.json()["image"]["format"] == "DICOM"


def test_study_mean_probability_and_a_bad_image_in_it(service):
    url, session = service
    files = [("files", (f"{i}.jpg", _image("wrist", seed=10 + i), "image/jpeg")) for i in range(3)]
    files.append(("files", ("broken.jpg", _image("wrist", seed=20)[:2000], "image/jpeg")))
    r = session.post(f"{url}/v1/classify/study", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    scored = [i for i in body["images"] if "fracture_probability" in i]
    assert len(body["images"]) == 4 and len(scored) == 3
    assert [i["error"] for i in body["images"] if "error" in i] == ["truncated"]
    assert body["study"]["fracture_probability"] == pytest.approx(np.mean([i["fracture_probability"] for i in scored]))
    assert body["study"]["label"] == int(body["study"]["fracture_probability"] >= body["study"]["threshold"])
    too_many = session.post(f"{url}/v1/classify/study", files=files + files)
    assert too_many.status_code == 413 and too_many.json()["error"] == "too_many_files"
    none_readable = session.post(f"{url}/v1/classify/study", files=[("files", ("a.png", b"nope", "image/png"))])
    assert none_readable.status_code == 400 and none_readable.json()["error"] == "no_readable_image"


@pytest.mark.parametrize("payload,status,reason", [
    (b"", 400, "empty_file"),
    (b"just some text, not an image", 415, "not_an_image"),
    ("truncated", 400, "truncated"),
    ("too_many_pixels", 413, "decompression_bomb"),
    ("too_many_bytes", 413, "upload_too_large"),
])
def test_bad_inputs_get_clear_json_errors_and_the_service_keeps_serving(service, payload, status, reason):
    url, session = service
    if payload == "truncated":
        payload = _image("wrist", seed=4)[:3000]
    elif payload == "too_many_pixels":  # 2500 x 2000 = 5 Mpixel > the 4 Mpixel limit of this deployment
        buf = io.BytesIO()
        Image.new("L", (2000, 2500), 128).save(buf, "PNG")
        payload = buf.getvalue()
    elif payload == "too_many_bytes":
        payload = os.urandom(3 * 1024 * 1024)
    r = session.post(f"{url}/v1/classify", data=payload)
    assert r.status_code == status, r.text
    assert r.json()["error"] == reason and r.json()["detail"]
    assert session.post(f"{url}/v1/classify", data=_image("wrist", seed=6)).status_code == 200


def test_unknown_body_part_is_422(service):
    url, session = service
    r = session.post(f"{url}/v1/classify", params={"body_part": "knee"}, data=_image())
    assert r.status_code == 422 and r.json()["error"] == "unknown_body_part" and "wrist" in r.json()["detail"]


def test_bearer_token_is_required_when_configured(service):
    url, _ = service
    data = _image(seed=7)
    missing = requests.post(f"{url}/v1/classify", data=data)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = requests.post(f"{url}/v1/classify", data=data, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
    assert requests.get(f"{url}/v1/models").status_code == 401


def test_concurrent_burst_is_batched_and_every_request_answered(service):
    url, session = service
    images = [_image("wrist" if i % 2 else "humerus", 600, 500, seed=100 + i) for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda d: session.post(f"{url}/v1/classify", data=d, timeout=120), images))
    assert [r.status_code for r in responses] == [200] * 24
    batches = [r.json()["batch"]["classify"] for r in responses]
    assert max(batches) > 1, f"no request was batched with another: {batches}"


def _deployments(config: dict) -> dict[str, dict]:
    return {d["name"]: d for d in config["applications"][0]["deployments"]}


def test_config_yaml_matches_serve_build_of_the_code(tmp_path):
    """serving/config.yaml was written with `serve build`; it must not drift from the code."""
    from ray.serve.schema import ServeDeploySchema

    built_path = tmp_path / "built.yaml"
    subprocess.run([str(Path(sys.executable).parent / "serve"), "build", "serving.graph:app", "-o", str(built_path)],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    built = yaml.safe_load(built_path.read_text())
    ours = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(ours)
    app = ours["applications"][0]
    assert app["import_path"] == "fracray.serving.app:build_app"
    from fracray.serving.args import ServeArgs
    ServeArgs.parse(app["args"])  # every arg is one the builder knows
    # No deployments section: the builder sets each deployment's options from the args (one place),
    # so a single-model index (no BodyPartRouter) and the fused layout deploy from the same file.
    assert set(_deployments(built)) == {"Ingress", "BodyPartRouter", "FractureClassifiers"}
    assert "deployments" not in app
    for key in ("proxy_location", "grpc_options", "logging_config"):
        assert ours[key] == built[key], key
    assert ours["http_options"]["port"] == built["http_options"]["port"] == 8000


@pytest.mark.slow
def test_serve_run_config_yaml(tmp_path, untrained_index):
    """`serve run serving/config.yaml` (its own local Ray), pointed at a model index."""
    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    port = _free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["applications"][0]["args"]["models"] = untrained_index
    config["applications"][0]["args"]["min_replicas"] = 1  # as the file says for a small laptop
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=240)
        r = requests.post(f"{url}/v1/classify", data=_image(seed=9), timeout=60)
        assert r.status_code == 200 and r.json()["body_part"] in ("wrist", "humerus")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_pipelines_serve_one_command_start(tmp_path, untrained_index):
    """`python pipelines/serve.py --models ... --port ...` serves until SIGTERM, then stops cleanly."""
    port = _free_port()
    # Not the test session's proxy-guard settings: serve.py must set them for the Ray it starts.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k != "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
           and not k.startswith("FRACRAY_MAX_") and k != "FRACRAY_BODY_TIMEOUT_S"}
    proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "serve.py"), "--models", untrained_index,
                             "--port", str(port), "--max-upload-mb", "1", "--engine", "torch", "--layout", "fused", "--operating-point", "0.25"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=240)
        answer = requests.post(f"{url}/v1/classify", data=_image(seed=11), timeout=60)
        assert answer.status_code == 200 and answer.json()["engine"] == "torch-float32"  # --engine reached the replicas
        assert answer.json()["threshold"] == 0.25 and answer.json()["operating_point"] == "0.25"  # --operating-point
        assert requests.get(f"{url}/v1/models", timeout=30).json()["layout"] == "fused"  # --layout reached the app
        # --max-upload-mb reaches Serve's proxy: the guard (not the ingress) refuses 2 MB.
        big = requests.post(f"{url}/v1/classify", data=os.urandom(2 * 1024 * 1024), timeout=60)
        assert big.status_code == 413 and "FRACRAY_MAX_BODY_MB" in big.json()["detail"], big.text
        os.kill(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output[-2000:]
        assert "API docs" in output and f"{url}/docs" in output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_out_of_scope_uploads_get_422_with_a_reason_and_studies_score_the_rest(service):
    """A colour photo and a chest DICOM are not limb radiographs: no probability, a reason;
    in a study they are listed and the radiographs scored (real HTTP against the running app)."""
    from skimage import data as skdata

    url, session = service
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buf, "JPEG", quality=90)
    photo = buf.getvalue()
    r = session.post(f"{url}/v1/classify", data=photo, headers={"content-type": "image/jpeg"})
    assert r.status_code == 422 and r.json()["error"] == "out_of_scope", r.text
    assert r.json()["detail"].startswith("colour_photo") and "fracture_probability" not in r.json()
    pixels = render_radiograph(np.random.default_rng(3), "wrist", 600, 500, fracture=False).pixels
    chest = dicom_bytes(pixels, body_part="CHEST")
    r = session.post(f"{url}/v1/classify", data=chest, headers={"content-type": "application/dicom"})
    assert r.status_code == 422 and r.json()["detail"].startswith("dicom_body_part:chest"), r.text
    files = [("files", ("wrist.jpg", _image("wrist", seed=31), "image/jpeg")),
             ("files", ("photo.jpg", photo, "image/jpeg"))]
    r = session.post(f"{url}/v1/classify/study", files=files)
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert "fracture_probability" in images[0] and images[1]["error"] == "out_of_scope"
    only_photos = session.post(f"{url}/v1/classify/study", files=[files[1], files[1]])
    assert only_photos.status_code == 422 and only_photos.json()["error"] == "out_of_scope"


def _stow_body(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = "fracray-test-boundary"
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_stow_rs_classifies_each_study_and_refuses_what_is_not_an_image(service):
    """STOW-RS on the ingress: instances grouped by StudyInstanceUID, each study classified; an SR,
    an RT plan, an ECG, a multi-frame object and bytes that are not DICOM are refused with their STOW failure reasons
    while the rest are scored; the standard DICOM JSON answer with Accept: application/dicom+json."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from fracray.data.synthetic import render_radiograph
    from fracray.pacs.wrap import StudyIdentity, wrap_radiograph

    url, session = service

    def study(n: int, seed: int) -> tuple[str, list[bytes]]:
        identity = StudyIdentity(patient_id=f"P{seed}", patient_name="Stow^Test", study_uid=generate_uid(),
                                 accession=f"A{seed}")
        series = generate_uid()
        return identity.study_uid, [
            wrap_radiograph(render_radiograph(np.random.default_rng(seed + i), "wrist", 400, 320, fracture=i == 0).pixels, identity,
                            series_uid=series, instance_number=i + 1, body_part="WRIST") for i in range(n)]

    (uid_a, study_a), (uid_b, study_b) = study(2, 1), study(1, 5)
    sr = open(get_testdata_file("test-SR.dcm"), "rb").read()
    body, content_type = _stow_body(study_a + study_b + [sr])
    r = session.post(f"{url}/dicomweb/studies", data=body, headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text
    answer = r.json()
    by_uid = {s["study_instance_uid"]: s for s in answer["studies"]}
    assert set(by_uid) == {uid_a, uid_b}
    assert by_uid[uid_a]["study"]["scored"] == 2 and by_uid[uid_b]["study"]["scored"] == 1
    assert all(img["image"]["sop_instance_uid"] and "fracture_probability" in img
               for s in answer["studies"] for img in s["images"])
    assert [(f["error"], f["detail"]) for f in answer["failed"]] == [("unsupported_sop_class",
                                                                      "Comprehensive SR Storage is not a radiograph")]
    # An RT plan and an ECG (pydicom's own test objects): no pixels either, refused one by one
    # while the radiograph beside them is scored.
    rt_ecg = [open(get_testdata_file(name), "rb").read() for name in ("rtplan.dcm", "waveform_ecg.dcm")]
    body, content_type = _stow_body(study_b + rt_ecg)
    r = session.post(f"{url}/dicomweb/studies", data=body, headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text
    assert [s["study"]["scored"] for s in r.json()["studies"]] == [1]
    assert [(f["error"], f["detail"]) for f in r.json()["failed"]] == [
        ("unsupported_sop_class", "RT Plan Storage is not a radiograph"),
        ("unsupported_sop_class", "12-lead ECG Waveform Storage is not a radiograph")]

    multiframe = open(get_testdata_file("SC_rgb_rle_2frame.dcm"), "rb").read()
    body, content_type = _stow_body([study_a[0], multiframe, b"not dicom at all"])
    r = session.post(f"{url}/dicomweb/studies", data=body,
                     headers={"Content-Type": content_type, "Accept": "application/dicom+json"})
    assert r.status_code == 202 and r.headers["content-type"].startswith("application/dicom+json"), r.text
    answer = r.json()
    assert len(answer["00081199"]["Value"]) == 1
    assert sorted(f["00081197"]["Value"][0] for f in answer["00081198"]["Value"]) == [0x0122, 0xC000]

    refused = session.post(f"{url}/dicomweb/studies", data=b"x", headers={"Content-Type": "image/png"})
    assert refused.status_code == 415 and refused.json()["error"] == "unsupported_media_type"
    body, content_type = _stow_body(study_a * 3)
    too_many = session.post(f"{url}/dicomweb/studies", data=body, headers={"Content-Type": content_type})
    assert too_many.status_code == 413 and too_many.json()["error"] == "too_many_files"


def test_stow_rs_refuses_exactly_what_the_dicom_node_skips(service):
    """The same instances through STOW-RS over HTTP and the DICOM node's rule (skip_reason): the
    same ones are refused, with the same reason; the rest are classified. Before, STOW-RS
    classified CT and MR images, fracray's own results and instances without a study UID."""
    import pydicom

    from fracray.pacs.listener import skip_reason
    from conftest import instance_zoo

    url, session = service
    zoo = instance_zoo()
    skipped = {}
    for name, data in zoo.items():
        ds = pydicom.dcmread(io.BytesIO(data), defer_size=1024, force=True)
        skipped[str(ds.SOPInstanceUID)] = skip_reason(str(ds.SOPClassUID), ds)
    for group in (list(zoo.values())[:4], list(zoo.values())[4:8], list(zoo.values())[8:]):  # 4 per request at most
        body, content_type = _stow_body(group)
        r = session.post(f"{url}/dicomweb/studies", data=body, headers={"Content-Type": content_type})
        assert r.status_code == 200, r.text
        answer = r.json()
        refused = {f["sop_instance_uid"]: f["detail"] for f in answer["failed"]
                   if f["error"] in ("unsupported_sop_class", "not_dicom")}
        # Classified or refused for what the models made of them (out of scope, ...): not by the rule.
        attempted = {img["image"]["sop_instance_uid"] for s in answer["studies"] for img in s["images"]} | {
            f["sop_instance_uid"] for f in answer["failed"] if f["error"] not in ("unsupported_sop_class", "not_dicom")}
        group_uids = {str(pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True, force=True).SOPInstanceUID)
                      for d in group}
        assert refused == {uid: skipped[uid] for uid in group_uids if skipped[uid]}, (refused, skipped)
        assert attempted == {uid for uid in group_uids if not skipped[uid]}

