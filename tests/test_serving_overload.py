"""Overload, layouts and single-model indexes: each test its own application on the session's Serve."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import radiograph_bytes as _image
from conftest import served



@pytest.mark.slow
def test_overload_returns_503_with_retry_after_then_recovers(serve_url, untrained_index):
    """An ingress that takes one request at a time and queues one more."""
    with served(serve_url, {"models": untrained_index, "max_ongoing_requests": 1, "max_queued_requests": 1}, "small") as url:
        data = _image(seed=8)
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: requests.post(f"{url}/v1/classify", params={"gradcam": "true"},
                                                              data=data, timeout=120), range(12)))
        codes = [r.status_code for r in responses]
        assert 503 in codes and 200 in codes, codes
        assert all(r.headers.get("Retry-After") == "1" for r in responses if r.status_code == 503)
        # Serve's own backpressure answer, rewritten by the proxy guard into the one JSON error body.
        assert all(r.json()["error"] in ("unavailable", "overloaded") and r.json()["detail"]
                   for r in responses if r.status_code == 503)
        assert requests.post(f"{url}/v1/classify", data=data, timeout=60).status_code == 200


def test_a_single_model_index_serves_without_a_router(serve_url, localizing_single_index):
    """No router in the index: every image goes to the one classifier, with the same numbers as
    the batch predictor (the router replica gets the model-sized input, never the full image)."""
    from fracray.inference.predictor import FracturePredictor

    # The service's own operating point (a named one of the bundle) labels every request that names none.
    with served(serve_url, {"models": localizing_single_index, "min_replicas": 1, "engine": "torch",
                 "operating_point": "sensitivity>=0.90"}, "single") as url:
        data = _image(seed=12)
        expected = FracturePredictor(localizing_single_index).predict_bytes([data])[0]
        got = requests.post(f"{url}/v1/classify", data=data, timeout=120).json()
        assert got["body_part"] == "all" and got["router"] is None and got["body_part_probability"] is None
        assert got["operating_point"] == "sensitivity>=0.90" and got["threshold"] == 0.3 != expected["threshold"]
        assert got["label"] == int(got["fracture_probability"] >= 0.3)
        asked = requests.post(f"{url}/v1/classify", data=data, params={"operating_point": "default"}, timeout=120)
        assert asked.json()["threshold"] == expected["threshold"] and asked.json()["operating_point"] == "default"
        assert requests.get(f"{url}/v1/models", timeout=30).json()["operating_point"] == "sensitivity>=0.90"
        # engine="torch" reaches the replicas: eager PyTorch ran (the predictor here: ONNX Runtime, within 1e-5)
        assert got["engine"] == "torch-float32" and expected["engine"] == "onnxruntime-float32"
        assert requests.get(f"{url}/v1/models", timeout=30).json()["engine"] == "torch"
        assert got["fracture_probability"] == pytest.approx(expected["fracture_probability"], abs=1e-5)
        assert [f["score"] for f in got["findings"]] == pytest.approx([f["score"] for f in expected["findings"]],
                                                                      abs=2e-4)


def test_the_fused_layout_runs_the_models_in_the_ingress_with_the_same_answers(serve_url, untrained_index):
    """layout=fused: one deployment (the ingress holds the router and the classifiers), the
    same answers as the batch predictor, overlays included; a bad layout is refused."""
    from ray import serve

    from fracray.inference.predictor import FracturePredictor
    from fracray.serving.args import ServeArgs

    with pytest.raises(ValueError, match="layout must be one of graph, fused. Got 'star'"):
        ServeArgs.parse({"models": untrained_index, "layout": "star"})
    with served(serve_url, {"models": untrained_index, "min_replicas": 1, "layout": "fused"}, "fused") as url:
        assert set(serve.status().applications["fused"].deployments) == {"Ingress"}
        assert requests.get(f"{url}/v1/models", timeout=30).json()["layout"] == "fused"
        predictor = FracturePredictor(untrained_index)
        for seed in (13, 14):
            data = _image(seed=seed)
            expected = predictor.predict_bytes([data])[0]
            got = requests.post(f"{url}/v1/classify", data=data, params={"overlay": "true"}, timeout=120).json()
            assert got["body_part"] == expected["body_part"] and got["engine"] == expected["engine"]
            assert got["body_part_probability"] == pytest.approx(expected["body_part_probability"], abs=1e-5)
            assert got["fracture_probability"] == pytest.approx(expected["fracture_probability"], abs=1e-5)
            assert got["classifier"] == expected["classifier"] and got["overlay"]["png_base64"]


def test_a_service_operating_point_the_models_lack_is_refused_before_deploying(localizing_single_index):
    from fracray.serving.app import build_app
    from fracray.serving.args import ServeArgs

    with pytest.raises(ValueError, match="operating_point 'high_specificity' for the 'all' model: Unknown operating"):
        build_app({"models": localizing_single_index, "operating_point": "high_specificity"})
    with pytest.raises(ValueError, match=r"A threshold must be a number in \[0, 1\]. Got '1.5'"):
        ServeArgs.parse({"models": localizing_single_index, "operating_point": "1.5"})
    assert build_app({"models": localizing_single_index, "operating_point": "0.25"}) is not None


def test_an_index_without_a_router_starts_no_router_replicas(serve_url, localizing_single_index):
    """A single-model index: Serve runs the Ingress and the classifiers only, and still answers."""
    from ray import serve

    with served(serve_url, {"models": localizing_single_index, "min_replicas": 1}, "single") as url:
        assert set(serve.status().applications["single"].deployments) == {"Ingress", "FractureClassifiers"}
        r = requests.post(f"{url}/v1/classify", data=_image(seed=3), timeout=120)
        assert r.status_code == 200 and r.json()["body_part"] == "all" and r.json()["router"] is None, r.text


def test_detector_boxes_over_http_are_the_predictors(serve_url, detector_single_index):
    """A box-detector bundle served over HTTP (graph layout, one replica each): the same findings,
    box for box, and the same fused P(fracture) as the batch predictor that scoring and evaluation
    use (tests/test_explain.py holds evaluation and scoring to the predictor)."""
    from fracray.inference.predictor import FracturePredictor

    images = [_image(seed=11), _image("humerus", 1000, 700, fmt="PNG", seed=12)]
    local = FracturePredictor(detector_single_index).predict_bytes(images)
    assert any(r["findings"] for r in local), "the untrained detector's raised class bias should give boxes"
    with served(serve_url, {"models": detector_single_index, "min_replicas": 1}, "detector") as url:
        for data, expected in zip(images, local):
            r = requests.post(f"{url}/v1/classify", data=data, timeout=120)
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["fracture_probability"] == pytest.approx(expected["fracture_probability"], abs=1e-5)
            assert [f["box"] for f in got["findings"]] == [f["box"] for f in expected["findings"]]
            assert [f["score"] for f in got["findings"]] == pytest.approx(
                [f["score"] for f in expected["findings"]], abs=1e-4)
