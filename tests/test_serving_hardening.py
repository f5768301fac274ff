"""Hostile but fair clients against a real Serve (its own instance, after test_serving's):
limits enforced while streaming, one JSON error body for every status, authentication
before parsing, consistent rules, memory per process, and killed replicas."""

from __future__ import annotations

import http.client
import io
import os
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import SERVE_TEST_TOKEN, SERVE_TEST_TOKEN_ENV, served
from conftest import radiograph_bytes as _image

APP = "hardening"
AUTH = {"Authorization": f"Bearer {SERVE_TEST_TOKEN}"}


def _broken_model_index(localizing_index: str, root: Path) -> str:
    """localizing_index plus an "elbow" classifier whose weights file is garbage: its
    bundle.json reads, so the service starts; the model fails when a request needs it."""
    from fracray.artifacts.index import ModelIndex, read_model_index, write_model_index

    base = read_model_index(localizing_index)
    elbow = root / "fracture_elbow"
    shutil.copytree(base.classifiers["humerus"], elbow)
    for weights in elbow.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    index = root / "model_index.json"
    write_model_index(str(index), ModelIndex(router=base.router, classifiers={**base.classifiers, "elbow": str(elbow)},
                                             dataset="untrained", created=base.created))
    return str(index)


@pytest.fixture(scope="module")
def hardened(serve_url, localizing_index, tmp_path_factory):
    """Token, 2 MB uploads, 4 images per study, a 120-Mpixel decode limit (so a 9999 x 9999
    PNG is decoded), two replicas of each deployment (the default)."""
    index = _broken_model_index(localizing_index, tmp_path_factory.mktemp("broken"))
    with served(serve_url, {"models": index, "max_upload_mb": 2, "max_pixels": 120_000_000,
                            "auth_token_env": SERVE_TEST_TOKEN_ENV, "max_study_images": 4}, APP,
                ready=False) as url:
        # Not /readyz: with a broken elbow model the service never reports ready (see the auth test).
        deadline = time.time() + 240
        while True:
            try:
                if requests.post(f"{url}/v1/classify", params={"body_part": "wrist"}, data=_image(seed=0),
                                 headers=AUTH, timeout=60).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "service did not come up"
            time.sleep(0.5)
        yield url


def _post(url, path="/v1/classify", **kw):
    kw.setdefault("timeout", 120)
    headers = {**AUTH, **kw.pop("headers", {})}
    return requests.post(f"{url}{path}", headers=headers, **kw)


def _read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the guard's answers close it):
    the head and the body may arrive in separate segments."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return data
        if not chunk:
            return data
        data += chunk


def _is_error(r, status, reason):
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == reason and body["detail"], body
    return body


# ----------------------------------------------------------------------------- auth and one error body

def test_what_is_open_and_auth_comes_before_parsing(hardened):
    url = hardened
    assert requests.get(f"{url}/healthz").json() == {"status": "ok"}  # liveness: open
    for path in ("/readyz", "/v1/models", "/openapi.json", "/docs"):  # model facts and docs: token only
        _is_error(requests.get(f"{url}{path}"), 401, "unauthorized")
    # With the token: readiness, in the one error body when not ready (the elbow model cannot load).
    _is_error(requests.get(f"{url}/readyz", headers=AUTH), 503, "not_ready")
    # A bad query without a token: 401, not FastAPI's 422 (nothing is parsed before auth) ...
    _is_error(requests.post(f"{url}/v1/classify", params={"gradcam": "maybe"}, data=b"x"), 401, "unauthorized")
    # ... and with the token, the 422 in the service's error body, not FastAPI's {"detail": [...]}.
    body = _is_error(_post(url, params={"gradcam": "maybe"}, data=_image(seed=1)), 422, "invalid_parameter")
    assert "gradcam" in body["detail"]
    _is_error(_post(url, path="/v1/nothing", data=b"x"), 404, "not_found")


def test_non_ascii_and_odd_authorization_values_are_401_not_500(hardened):
    url = hardened
    for value in ("Bearer tökén".encode("utf-8"), b"Bearer \xff\xfe", "Bearer ".encode() + SERVE_TEST_TOKEN.encode()
                  + "é".encode("utf-8"), b"Basic abc", b"Bearer", b""):
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        conn.putrequest("GET", "/v1/models")
        conn.putheader(b"Authorization", value)
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 401, (value, response.status, response.read()[:200])
        conn.close()


# ----------------------------------------------------------------------------- one rule each

def test_too_many_files_is_always_413(hardened):
    url = hardened
    image = _image(seed=2, h=300, w=240)
    for n in (5, 6, 33):  # max_study_images = 4: one over and far over get the same answer
        files = [("files", (f"{i}.jpg", image, "image/jpeg")) for i in range(n)]
        _is_error(_post(url, "/v1/classify/study", files=files), 413, "too_many_files")
    two = [("file", ("a.jpg", image, "image/jpeg")), ("file", ("b.jpg", image, "image/jpeg"))]
    _is_error(_post(url, files=two), 413, "too_many_files")


@pytest.mark.parametrize("value", ["1e-400", "nan", "inf", "-0.1", "1.5", "2e308"])
def test_thresholds_that_are_not_a_number_in_0_1_are_refused(hardened, value):
    body = _is_error(_post(hardened, params={"operating_point": value}, data=_image(seed=3)), 422,
                     "bad_operating_point")
    assert value in body["detail"]


def test_threshold_zero_and_tiny_are_what_they_say(hardened):
    assert _post(hardened, params={"operating_point": "0"}, data=_image(seed=3)).json()["threshold"] == 0.0
    assert _post(hardened, params={"operating_point": "1e-300"}, data=_image(seed=3)).json()["threshold"] == 1e-300


def test_content_type_rule(hardened):
    url = hardened
    jpeg = _image(seed=4)
    _is_error(_post(url, data=jpeg, headers={"content-type": "text/plain"}), 415, "unsupported_media_type")
    _is_error(_post(url, data=jpeg, headers={"content-type": "application/json"}), 415, "unsupported_media_type")
    _is_error(_post(url, files={"file": ("a.jpg", jpeg, "text/plain")}), 415, "unsupported_media_type")
    for ok in ("image/jpeg", "image/png", "application/octet-stream", "application/dicom; charset=binary"):
        r = _post(url, data=jpeg, headers={"content-type": ok})  # the format is read from the bytes
        assert r.status_code == 200, (ok, r.text[:200])
    assert _post(url, data=jpeg).status_code == 200  # no Content-Type at all


# ----------------------------------------------------------------------------- failures stay per image

def test_a_model_that_fails_is_a_json_503_and_the_service_keeps_serving(hardened):
    url = hardened
    body = _is_error(_post(url, params={"body_part": "elbow"}, data=_image(seed=5)), 503, "model_error")
    assert "request id" in body["detail"]
    files = [("files", (f"{i}.jpg", _image(seed=6 + i), "image/jpeg")) for i in range(2)]
    _is_error(_post(url, "/v1/classify/study", params={"body_part": "elbow"}, files=files), 503, "model_error")
    assert _post(url, params={"body_part": "wrist"}, data=_image(seed=5)).status_code == 200


# ----------------------------------------------------------------------------- limits while streaming

def _replica_pids() -> dict[str, list[int]]:
    """Live process ids of this Serve's proxy and replicas, by kind (GCS's actor table: the
    test Ray runs without the dashboard that ray.util.state needs)."""
    import ray

    pids: dict[str, list[int]] = {}
    for actor in ray._private.state.actors().values():
        name = actor["ActorClassName"]
        if actor["State"] == "ALIVE" and (name == "ProxyActor" or name.startswith(f"ServeReplica:{APP}:")):
            pids.setdefault(name.rsplit(":", 1)[-1], []).append(actor["Pid"])
    return pids


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _peak_growth(action) -> dict[str, float]:
    """Largest peak-RSS growth (MB) per kind of process while ``action`` runs."""
    pids = _replica_pids()
    flat = [(kind, pid) for kind, ps in pids.items() for pid in ps]
    before = {}
    for kind, pid in flat:
        _reset_peak(pid)
        before[pid] = _rss_mb(pid)
    action()
    growth: dict[str, float] = {}
    for kind, pid in flat:
        growth[kind] = max(growth.get(kind, 0.0), _peak_mb(pid) - before[pid])
    return growth


def test_a_chunked_200_mb_upload_is_refused_while_streaming(hardened):
    """No Content-Length: the proxy's guard counts while reading and answers 413 at its limit
    (4 MB in the tests), so neither the proxy nor the ingress ever holds the 200 MB."""
    host, port = hardened.removeprefix("http://").split(":")
    outcome = {}

    def upload():
        sock = socket.create_connection((host, int(port)), timeout=60)
        sock.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SERVE_TEST_TOKEN}\r\n"
                     f"Transfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
        chunk = os.urandom(1024 * 1024)
        sent = 0
        try:
            for _ in range(200):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += 1
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed: expected
            pass
        outcome["sent_mb"] = sent
        sock.settimeout(30)
        outcome["response"] = _read_response(sock)
        sock.close()

    growth = _peak_growth(upload)
    head = outcome["response"].split(b"\r\n", 1)[0]
    assert b" 413 " in head, outcome["response"][:300]
    assert b"upload_too_large" in outcome["response"]
    assert outcome["sent_mb"] < 200, "the whole upload was read before the answer"
    assert growth["ProxyActor"] < 40 and growth["Ingress"] < 40, growth


def test_huge_headers_are_refused_before_the_ingress(hardened):
    host, port = hardened.removeprefix("http://").split(":")
    big = b"a" * (1024 * 1024)  # 1 MB header value (the guard's limit is 16 KB)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("GET", "/v1/models")
    conn.putheader(b"Authorization", f"Bearer {SERVE_TEST_TOKEN}".encode())
    conn.putheader(b"X-Big", big)
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 431 and b"headers_too_large" in response.read()


def test_a_body_shorter_than_its_content_length_times_out(hardened):
    host, port = hardened.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    started = time.monotonic()
    sock.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SERVE_TEST_TOKEN}\r\n"
                 f"Content-Length: 100000\r\n\r\n".encode() + b"x" * 10)
    response = _read_response(sock)
    waited = time.monotonic() - started
    sock.close()
    assert b" 408 " in response.split(b"\r\n", 1)[0] and b"body_timeout" in response, response[:300]
    assert waited < 30, waited  # the tests' body timeout is 5 s; before the guard: minutes


def test_a_9999_px_16_bit_png_costs_the_model_replicas_little_memory(hardened):
    """190 KB on the wire, 9999 x 9999 x 16 bit decoded: the ingress decodes it; the router
    and classifier replicas get model-sized inputs (the fix), not ~400 MB of float32 each."""
    pixels = np.zeros((9999, 9999), np.uint16)
    pixels[2000:8000, 3000:7000] = 30000
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", optimize=True)
    data = buf.getvalue()
    assert len(data) < 2 * 1024 * 1024
    results = {}

    def classify():
        results["r"] = _post(hardened, data=data, headers={"content-type": "image/png"}, timeout=300)

    growth = _peak_growth(classify)
    r = results["r"]
    assert r.status_code in (200, 422), r.text[:300]  # 422 out_of_scope is fine: it was decoded and judged
    print(f"peak RSS growth per process (MB) for one 9999 x 9999 16-bit PNG: {growth}")
    assert growth["FractureClassifiers"] < 150 and growth["BodyPartRouter"] < 150, growth


# ----------------------------------------------------------------------------- killed replicas

def _running_replicas(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def _kill_under_load(deployment: str, clients: int, client, answered) -> int:
    """``clients`` threads run ``client(k)``, which loops until ``client.stop`` is set; once every
    client has had answers (``answered()`` counts them) one ``deployment`` replica is SIGKILLed,
    and the clients go on until 4 answers per client have come back after the kill (at least 3 s,
    while Serve notices the death and replaces the replica). Returns the victim's pid."""
    victim = _replica_pids()[deployment][0]

    def until(condition, timeout: float) -> None:
        deadline = time.time() + timeout
        while not condition() and time.time() < deadline:
            time.sleep(0.1)

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, k) for k in range(clients)]
        until(lambda: answered() >= 2 * clients, 60)  # load is flowing
        os.kill(victim, signal.SIGKILL)
        killed_at, before = time.time(), answered()
        until(lambda: answered() - before >= 4 * clients and time.time() - killed_at >= 3, 60)
        client.stop.set()
        for f in futures:
            f.result()
    return victim


def _healed(deployment: str, victim: int) -> bool:
    """Wait (up to 120 s) until ``deployment`` runs two replicas again, none of them the victim."""
    deadline = time.time() + 120
    while time.time() < deadline and (_running_replicas(deployment) < 2 or victim in _replica_pids()[deployment]):
        time.sleep(0.5)
    return _running_replicas(deployment) == 2 and victim not in _replica_pids()[deployment]


@pytest.mark.parametrize("deployment", ["FractureClassifiers", "BodyPartRouter"])
def test_a_killed_replica_under_load_costs_no_500_and_heals(hardened, deployment):
    url = hardened
    images = [_image("wrist", 500, 400, seed=200 + i) for i in range(4)]
    codes: list[int] = []

    def client(k: int):
        while not client.stop.is_set():
            r = _post(url, data=images[k % 4], params={"body_part": "wrist"} if deployment != "BodyPartRouter" else {})
            codes.append(r.status_code)
            if r.status_code == 503:
                assert r.headers.get("Retry-After") and r.json()["error"] in ("replica_unavailable", "overloaded")

    client.stop = threading.Event()
    victim = _kill_under_load(deployment, 6, client, lambda: len(codes))
    assert codes and 500 not in codes, codes
    assert codes.count(200) >= 0.8 * len(codes), codes  # retried on the other replica, not refused
    assert _healed(deployment, victim)
    assert _post(url, data=images[0]).status_code == 200


def _raw_request(url: str, head: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(head)
    response = _read_response(sock)
    sock.close()
    return response


def _json_error_of(response: bytes, status: int, reason: str) -> dict:
    import json

    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0].split(b" ")[1] == str(status).encode(), response[:300]
    assert b"content-type: application/json" in head.lower(), head
    answer = json.loads(body)
    assert set(answer) == {"error", "detail"} and answer["error"] == reason and answer["detail"], answer
    return answer


def test_long_urls_and_bad_header_bytes_get_the_json_error_body(hardened):
    """A URL over the guard's limit (8 KB): 414 from the guard. What uvicorn's parser refuses before
    any app code (a URL of 64 KB or more, a control byte in a header, a bad header name): the same
    400 it always sent, now in the JSON error body (proxy_guard.json_parser_errors)."""
    auth = f"Authorization: Bearer {SERVE_TEST_TOKEN}\r\n".encode()
    for size in (20_000, 60_000):
        response = _raw_request(hardened, b"GET /v1/models?q=" + b"a" * size + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n")
        assert "FRACRAY_MAX_URL_KB" in _json_error_of(response, 414, "url_too_long")["detail"]
    for head in (b"GET /v1/" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
                 b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Odd: a\x01b\r\n\r\n",
                 b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Odd: a\x7fb\r\n\r\n",
                 b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n"):
        answer = _json_error_of(_raw_request(hardened, head), 400, "bad_request")
        assert "not valid HTTP/1.1" in answer["detail"], answer
    assert requests.get(f"{hardened}/v1/models", headers=AUTH, timeout=60).status_code == 200


def test_a_killed_ingress_replica_under_load_answers_json_and_no_500(hardened):
    """8 clients while an Ingress replica is SIGKILLed: Serve's proxy writes nothing for the
    requests that replica held (uvicorn then sent a bare 500 text); the guard sends them once more
    (it holds the body) and answers JSON whatever happens."""
    url = hardened
    images = [_image("wrist", 500, 400, seed=300 + i) for i in range(4)]
    answers: list[tuple[int, str]] = []

    def client(k: int):
        while not client.stop.is_set():
            r = _post(url, data=images[k % 4], params={"body_part": "wrist"})
            answers.append((r.status_code, r.headers.get("content-type", "")))
            if r.status_code != 200:
                assert set(r.json()) == {"error", "detail"}, r.text[:300]

    client.stop = threading.Event()
    victim = _kill_under_load("Ingress", 8, client, lambda: len(answers))
    assert answers and all(ct.startswith("application/json") for _, ct in answers), answers
    codes = [c for c, _ in answers]
    assert 500 not in codes, codes
    assert codes.count(200) >= 0.8 * len(codes), codes
    assert _healed("Ingress", victim)
    assert _post(url, data=images[0], params={"body_part": "wrist"}).status_code == 200


# ----------------------------------------------------------------------------- pydicom's corpus over HTTP

def test_every_pydicom_test_file_gets_an_answer_over_http(hardened):
    """Each of pydicom's real-world test files: a result or a JSON error with a named reason,
    never a 500, and the service keeps serving."""
    from conftest import MUST_DECODE, corpus_files

    known = {"ok", "empty_file", "corrupt", "truncated", "too_small", "not_an_image", "unsupported_format",
             "unsupported_dicom", "decompression_bomb", "out_of_scope", "upload_too_large", "undecodable"}
    answers = {}
    for path in corpus_files():
        r = _post(hardened, data=path.read_bytes(), headers={"content-type": "application/dicom"},
                  params={"body_part": "wrist"})
        assert r.status_code != 500 and r.headers["content-type"].startswith("application/json"), (path, r.text)
        answers[path.name] = "ok" if r.status_code == 200 else r.json()["error"]
    assert set(answers.values()) <= known, answers
    for name in MUST_DECODE.values():  # decoded: scored, or refused as not a limb radiograph (CT, MR, NM)
        assert answers[name] in ("ok", "out_of_scope"), (name, answers[name])
    assert _post(hardened, data=_image(seed=9)).status_code == 200
