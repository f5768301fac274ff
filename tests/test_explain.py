"""Grad-CAM for every registered backbone, the pointing game, temperature scaling and operating points."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from fracray.imaging.decode import decode_image
from fracray.imaging.preprocess import PreprocessConfig, finalize, letterbox_box, preprocess_base
from fracray.inference.gradcam import gradcam, gradcam_for_image, heatmap_peak, overlay_png, pointing_hit
from fracray.metrics.calibration import (calibrate, expected_calibration_error, fit_temperature, operating_points,
                                         softmax)
from fracray.models.registry import BACKBONES, create_model


class _Backbone(nn.Module):
    """forward_features = the image itself; forward_head = global average pooling."""

    def forward_features(self, x):
        return x[:, :1]

    def forward_head(self, x):
        return x.mean(dim=(2, 3))


class _Toy(nn.Module):
    """P(class 1) rises with brightness, so Grad-CAM must point at the bright spot."""

    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.head.bias.zero_()


def _spot_image(h, w, row, col) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (255 * np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * 6.0 ** 2))).astype(np.uint8)


def test_gradcam_points_at_the_evidence_through_the_letterbox():
    config = PreprocessConfig(image_size=(96, 96), normalization="none")
    pixels = _spot_image(100, 300, 30, 240)  # wide image: letterboxed top and bottom
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    decoded = decode_image(buf.getvalue())
    x = finalize(torch.from_numpy(preprocess_base(decoded, config)[None, None]), config)
    heat = gradcam_for_image(_Toy(), x, decoded.pixels.shape, config)
    assert heat.shape == (100, 300) and heat.max() == pytest.approx(1.0) and heat.min() >= 0
    px, py = heatmap_peak(heat)
    assert abs(px * 300 - 240) <= 6 and abs(py * 100 - 30) <= 6
    assert letterbox_box((100, 300), config) == (32, 0, 32, 96)
    png = overlay_png(decoded.pixels, heat, boxes=[{"x_center": 0.8, "y_center": 0.3, "width": 0.1, "height": 0.2}])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradcam_of_the_other_class_is_empty_where_evidence_is_against_it():
    x = torch.zeros(1, 3, 32, 32)
    x[..., 10, 10] = 1.0
    cam = gradcam(_Toy(), x, target_class=0)  # class 0 falls with brightness: no positive evidence
    assert float(cam.max()) == 0.0


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_gradcam_runs_on_every_registered_backbone(name):
    torch.manual_seed(0)
    model = create_model(name, pretrained=False, bam=name == "inception_v3")
    x = torch.randn(1, 3, 128, 128)
    cam = gradcam(model, x)
    assert cam.shape == (1, 128, 128) and torch.isfinite(cam).all()
    assert 0.0 <= float(cam.min()) and float(cam.max()) <= 1.0 + 1e-6
    assert all(p.grad is None for p in model.parameters()), "Grad-CAM must not leave gradients on the weights"


def test_pointing_hit_with_yolo_boxes():
    box = {"x_center": 0.5, "y_center": 0.5, "width": 0.2, "height": 0.1}
    assert pointing_hit((0.55, 0.52), [box])
    assert not pointing_hit((0.7, 0.5), [box])
    assert pointing_hit((0.7, 0.5), [box], tolerance=0.1)
    assert not pointing_hit((0.5, 0.5), [])


def test_temperature_scaling_recovers_an_overconfident_model():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 1.5, size=(4000, 2))
    labels = np.array([rng.random() < p for p in softmax(true_logits)[:, 1]], dtype=int)
    overconfident = 3.0 * true_logits
    assert fit_temperature(overconfident, labels) == pytest.approx(3.0, rel=0.15)
    report = calibrate(overconfident, labels)
    assert report["ece_after"] < report["ece_before"] / 2 and report["nll_after"] < report["nll_before"]
    # Scaling never changes the ranking, so AUROC and every operating point's sensitivity stay as they were.
    before = softmax(overconfident)[:, 1]
    after = softmax(overconfident, report["temperature"])[:, 1]
    assert (np.argsort(before, kind="stable") == np.argsort(after, kind="stable")).all()
    assert expected_calibration_error(softmax(true_logits), labels) < 0.05


def test_temperature_is_one_without_both_classes():
    assert fit_temperature(np.zeros((5, 2)), [1] * 5) == 1.0
    with pytest.raises(ValueError, match="one label per row"):
        fit_temperature(np.zeros((5, 2)), [1] * 4)


def test_operating_points_meet_their_targets():
    rng = np.random.default_rng(1)
    y = (rng.random(500) < 0.2).astype(int)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.15, 500), 0, 1)
    points = operating_points(y, p)
    assert {"youden", "sensitivity>=0.90", "sensitivity>=0.95", "specificity>=0.90", "specificity>=0.95",
            "high_sensitivity", "high_specificity"} == set(points)
    assert points["high_sensitivity"] == points["sensitivity>=0.95"]
    assert points["high_specificity"] == points["specificity>=0.95"]
    assert points["sensitivity>=0.95"]["sensitivity"] >= 0.95
    assert points["specificity>=0.90"]["specificity"] >= 0.90
    assert points["sensitivity>=0.95"]["threshold"] <= points["sensitivity>=0.90"]["threshold"]
    assert operating_points([0, 0], [0.1, 0.2]) == {}


def test_pointing_game_on_fracatlas_layout(ray_local, fracatlas_root, tmp_path):
    """End to end on the FracAtlas layout's YOLO boxes, through the composed graph."""
    from fracray.data.adapters import index_fracatlas
    from fracray.artifacts.scaffold import build_untrained_index
    from fracray.evaluation.graph import pointing_game

    manifest = index_fracatlas(str(fracatlas_root)).manifest
    with_boxes = sum(1 for b, y in zip(manifest["boxes"].to_pylist(), manifest["image_label"].to_pylist())
                     if b and y == 1)
    assert with_boxes > 0
    index = build_untrained_index(str(tmp_path / "models"), body_parts=("hand", "leg", "hip", "shoulder"))
    game = pointing_game(manifest, index)
    assert game["overall"]["images"] + game["not_scored"] == with_boxes
    assert 0.0 <= game["overall"]["hit_rate"] <= 1.0 and 0.0 <= game["overall"]["center_baseline"] <= 1.0
    assert sum(v["images"] for v in game["per_body_part"].values()) == game["overall"]["images"]
    assert game["method"].startswith("Grad-CAM") and game["heatmaps"] == {"Grad-CAM": game["overall"]["images"]}


def test_overlay_draws_pixel_boxes_and_findings_in_the_original_frame():
    """Boxes in the original image's pixels land in the right place on a smaller decode."""
    from fracray.inference.gradcam import FINDING_COLOUR, TRUTH_COLOUR

    from PIL import Image

    pixels = np.full((200, 400), 60, np.uint8)  # as if a 800 x 400 upload was decoded at half size
    png = overlay_png(pixels, None, image_size=(800, 400), truth_boxes=[(80, 40, 240, 200)],
                      findings=[{"box": [400, 200, 720, 360], "score": 0.87, "peak": [500, 300]}])
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert image.shape == (200, 400, 3)
    assert tuple(image[60, 40]) == TRUTH_COLOUR and tuple(image[20, 80]) == TRUTH_COLOUR      # (40..120, 20..100)
    assert tuple(image[150, 200]) == FINDING_COLOUR and tuple(image[179, 359]) == FINDING_COLOUR  # (200..360, 100..180)
    assert np.abs(image[5, 5].astype(int) - 60).max() <= 1


@pytest.mark.parametrize("index_fixture", ["localizing_single_index", "detector_single_index"])
def test_evaluate_writes_froc_overlays_and_the_predictors_findings(ray_local, index_fixture, request, tmp_path):
    """evaluate.py on a FracAtlas-layout set with a fracture-map model and with a box detector:
    the pointing game on the map, AP30/AP50 and lesion sensitivity at 0.5 / 1 FP per image,
    froc.png and example overlays; its predictions carry the findings the predictor gives for
    the same image, and bulk scoring gives the same findings and probabilities."""
    localizing_single_index = request.getfixturevalue(index_fixture)
    detector = index_fixture == "detector_single_index"
    import json
    from pathlib import Path

    import pyarrow.parquet as pq
    from PIL import Image

    from fracray.jobs.evaluate import EvaluateConfig, run_evaluate
    from fracray.data.adapters import index_fracatlas
    from fracray.data.synthetic import generate_fracatlas
    from fracray.imaging.regions import findings_from_rows
    from fracray.inference.predictor import FracturePredictor

    data = tmp_path / "fracatlas"
    generate_fracatlas(str(data), n_images=14, seed=11, fractured_fraction=0.5, large_images=False,
                       coco_outlines=False)
    manifest = index_fracatlas(str(data)).manifest
    uris = manifest["image_uri"].to_pylist()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray actors: flat backgrounds give the untrained map ties
    try:
        local = FracturePredictor(localizing_single_index).predict_bytes([open(u, "rb").read() for u in uris],
                                                                          names=uris)
    finally:
        torch.set_num_threads(threads)
    probs = sorted(r["fracture_probability"] for r in local if r["status"] == "ok")
    threshold = (probs[len(probs) // 2 - 1] + probs[len(probs) // 2]) / 2  # half the images called positive

    out = tmp_path / "ev"
    summary = run_evaluate(EvaluateConfig(localizing_single_index, "fracatlas", str(data), split="all",
                                          output=str(out), operating_point=threshold)).summary
    assert summary["pointing_game"]["method"].startswith("Fracture-map")
    assert set(summary["pointing_game"]["heatmaps"]) == {"fracture map"}
    loc = summary["localization"]
    lesions = loc["lesions"]
    assert lesions["lesions"] > 0 and lesions["images"] >= lesions["lesions"] // 3
    assert 0 <= lesions["lesion_sensitivity_at_0.5_fp"] <= lesions["lesion_sensitivity_at_1_fp"] <= 1
    assert lesions["min_score"] == (0.3 if detector else 0.5)
    assert len(lesions["froc"]["fp_per_image"]) == len(lesions["froc"]["sensitivity"])
    assert 0 <= lesions["ap50"] <= lesions["ap30"] <= 1 and "AP at IoU 0.3 and 0.5" in lesions["method"]
    assert {"ap30", "ap50", "median_area_ratio"} <= set(lesions)
    with Image.open(out / "froc.png") as img:
        assert img.format == "PNG" and img.size[0] > 300
    assert summary["plots"]["froc"].endswith("froc.png")
    examples = loc["examples"]
    assert examples and {e["kind"] for e in examples} <= {"tp", "fp", "fn"} and len(examples) <= 9
    for ex in examples:
        with Image.open(ex["png"]) as img:
            assert img.format == "PNG" and img.mode == "RGB"
        assert ex["heatmap"] == "fracture map" and Path(ex["png"]).parent == out / "examples"
    assert json.loads((out / "evaluation.json").read_text())["localization"]["lesions"]["lesions"] == lesions["lesions"]
    # The same findings as the predictor gives for the same bytes.
    preds = pq.read_table(out / "predictions.parquet").to_pylist()
    by_uri = {r["image_uri"]: r for r in preds}
    compared = 0
    for uri, expected in zip(uris, local):
        if expected["status"] == "ok":
            assert findings_from_rows(by_uri[uri]["findings"]) == expected["findings"]
            compared += bool(expected["findings"])
    assert compared > 0
    # Bulk scoring of the same release: the same findings as the evaluation, image by image
    # (serving is held to the predictor the same way in test_serving).
    from fracray.scoring.archive import ScoreConfig, read_image_results, score_archive

    score_archive(ScoreConfig(input=str(data), models=localizing_single_index, output=str(tmp_path / "scores"),
                              layout="fracatlas", batch_size=4), log=lambda *_: None)
    scored_rows = {r["image_uri"]: r for r in read_image_results(str(tmp_path / "scores")).to_pylist()}
    assert set(scored_rows) == set(by_uri)
    for uri, row in by_uri.items():
        assert scored_rows[uri]["findings"] == row["findings"], uri
        assert scored_rows[uri]["fracture_probability"] == pytest.approx(row["fracture_probability"], abs=1e-6)
    # Calibration on the evaluated images: ECE of the probabilities as the predictor serves them, and
    # a reliability diagram of them.
    scored = [r for r in preds if r["status"] == "ok"]
    p = np.array([r["fracture_probability"] for r in scored])
    y = [int(r["true_image_label"]) for r in scored]
    assert summary["overall"]["ece"] == pytest.approx(expected_calibration_error(np.stack([1 - p, p], 1), y))
    assert sum(b["n"] for b in summary["overall"]["reliability"]) == len(scored) == summary["overall"]["n"]
    with Image.open(summary["plots"]["reliability"]) as img:
        assert img.format == "PNG" and img.size[0] > 300
