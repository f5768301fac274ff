"""The model the product ships (models/fracatlas): what it holds, that serve/score/evaluate use it
without --models, and that it scores real radiographs (the FracAtlas copy in ../shared, when there)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fracray.artifacts.shipped import MODELS_ENV, SHIPPED_MODELS, default_models, ship_bundle, shipped_model_index

INDEX = SHIPPED_MODELS / "model_index.json"


def test_the_shipped_folder_describes_itself_and_fits_the_budget():
    assert shipped_model_index() == str(INDEX), f"the product ships {INDEX}"
    from safetensors import safe_open

    from fracray.artifacts.index import check_model_index

    index = check_model_index(str(INDEX))
    assert index.router is None and list(index.classifiers) == ["all"]
    raw = json.loads(INDEX.read_text())
    assert not raw["classifiers"]["all"].startswith("/"), "bundles are stored relative to the index"
    bundle = Path(index.classifiers["all"])
    total = sum(p.stat().st_size for p in SHIPPED_MODELS.rglob("*") if p.is_file())
    assert total <= 25 * 2 ** 20
    with safe_open(str(bundle / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert "F16" in dtypes and "F32" not in dtypes
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["model"]["localization_head"] == "detector"
    assert meta["inference"]["fusion"] and meta["inference"]["box_calibration"]
    assert {"ap30", "ap50"} <= set(meta["metrics"]["valid_localization"])
    card = (SHIPPED_MODELS / "MODEL_CARD.md").read_text()
    for needed in ("CC BY 4.0", "Abedeen", "AP30", "AUROC", "specificity 0.90", "ECE", "Intended use", "rot90"):
        assert needed in card, needed


def test_serve_score_and_evaluate_use_it_without_models(monkeypatch, tmp_path):
    from fracray.cli import evaluate, score_archive
    from fracray.jobs.serve import ServeJobConfig, default_service_models, serve_args

    monkeypatch.delenv(MODELS_ENV, raising=False)
    score = score_archive.config_from_args(score_archive.build_parser().parse_args(
        ["--input", str(tmp_path), "--output", str(tmp_path / "out")]))
    ev = evaluate.config_from_args(evaluate.build_parser().parse_args(
        ["--dataset", "fracatlas", "--data", str(tmp_path)]))
    assert score.models == ev.models == default_models() == str(INDEX) == default_service_models()
    assert serve_args(ServeJobConfig()).models == str(INDEX)
    # $FRACRAY_MODELS wins; an explicit --models wins over both.
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "mine.json"))
    assert default_models() == default_service_models() == str(tmp_path / "mine.json")
    score = score_archive.config_from_args(score_archive.build_parser().parse_args(
        ["--input", "x", "--output", "y", "--models", "z.json"]))
    assert score.models == "z.json"


def test_ship_bundle_halves_the_weights_and_keeps_the_answers(tmp_path):
    import cv2

    from conftest import write_detector_bundle
    from fracray.artifacts.index import ModelIndex, write_model_index
    from fracray.data.synthetic import render_radiograph
    from fracray.inference.predictor import FracturePredictor

    bundle = write_detector_bundle(str(tmp_path / "trained" / "fracture_all"))
    write_model_index(str(tmp_path / "trained" / "model_index.json"), ModelIndex(None, {"all": bundle}))
    written = ship_bundle(bundle, str(tmp_path / "shipped"))
    assert written["max_relative_weight_change"] < 1e-3 and Path(written["index"]).is_file()
    assert json.loads((Path(written["bundle"]) / "bundle.json").read_text())["inference"]["weights_dtype"] == "float16"
    image = render_radiograph(np.random.default_rng(0), "wrist", 300, 240, fracture=True).pixels
    data = cv2.imencode(".png", image)[1].tobytes()
    a = FracturePredictor(str(tmp_path / "trained" / "model_index.json"), check_scope=False).predict_bytes([data])[0]
    b = FracturePredictor(written["index"], check_scope=False).predict_bytes([data])[0]
    assert a["status"] == b["status"] == "ok"
    assert b["fracture_probability"] == pytest.approx(a["fracture_probability"], abs=5e-3)
    assert b["findings"] and [f["box"] for f in b["findings"]][:1] == [f["box"] for f in a["findings"]][:1]


def test_it_scores_real_fracatlas_radiographs(shared_fracatlas):
    """Real images of the release's valid split (never trained on): each is scored with findings
    in its own pixels, and the fractured ones score higher on average than the others."""
    import csv

    from fracray.inference.predictor import FracturePredictor

    root = shared_fracatlas / "FracAtlas"
    valid = {r["image_id"] for r in csv.DictReader(open(root / "Utilities" / "Fracture Split" / "valid.csv"))}
    fractured = sorted(p for p in (root / "images" / "Fractured").glob("*.jpg") if p.name in valid)[:8]
    normal = sorted((root / "images" / "Non_fractured").glob("*.jpg"))[:8]
    predictor = FracturePredictor(str(INDEX))
    results = predictor.predict_bytes([p.read_bytes() for p in fractured + normal],
                                      names=[str(p) for p in fractured + normal])
    ok = [r for r in results if r["status"] == "ok"]
    assert len(ok) >= 14
    for r in ok:
        assert 0.0 <= r["fracture_probability"] <= 1.0 and r["classifier"]
        for f in r["findings"]:
            x0, y0, x1, y1 = f["box"]
            assert 0 <= x0 < x1 <= r["image"]["width"] and 0 <= y0 < y1 <= r["image"]["height"]
    p_frac = [r["fracture_probability"] for r in results[:len(fractured)] if r["status"] == "ok"]
    p_norm = [r["fracture_probability"] for r in results[len(fractured):] if r["status"] == "ok"]
    assert np.mean(p_frac) > np.mean(p_norm)
