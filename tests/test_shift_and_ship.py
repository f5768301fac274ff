"""The shift set (the same images as archives change them) and shipping a model with its card."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from fracray.evaluation.shift import VARIANTS, apply_variant


def _image() -> np.ndarray:
    img = np.zeros((120, 80), np.uint8)
    img[10:30, 5:25] = 200          # a bright block near the top-left corner
    return img


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_decodes_to_what_it_says(name):
    data, suffix = apply_variant(_image(), name)
    got = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    base = _image()
    expected_shape = {"rot90": (80, 120), "rot270": (80, 120), "downscale_0.35": (42, 28)}.get(name, base.shape)
    assert got.shape == expected_shape and suffix == (".jpg" if name == "jpeg_q30" else ".png")
    exact = {"clean": base, "rot90": np.rot90(base), "rot180": np.rot90(base, 2), "rot270": np.rot90(base, 3),
             "hflip": base[:, ::-1], "vflip": base[::-1], "invert": 255 - base}
    if name in exact:
        assert np.array_equal(got, exact[name])
    elif name == "jpeg_q30":
        assert 0 < np.abs(got.astype(int) - base).mean() < 20
    elif name == "canvas_text":
        assert got[:12].max() > 0 or got[-12:].max() > 0           # burnt-in text where the image is not
        assert got[10:30, 5:25].max() < 200                         # the image moved and shrank
    elif name.startswith(("gamma", "contrast")):
        assert not np.array_equal(got, base) and got.shape == base.shape
    with pytest.raises(ValueError, match="Unknown variant"):
        apply_variant(base, "sideways")


def test_shift_eval_scores_each_variant_on_the_same_images(detector_single_index, tmp_path, capsys):
    from fracray.cli.shift_eval import main
    from fracray.data.synthetic import generate_fracatlas

    generate_fracatlas(str(tmp_path / "fa"), n_images=10, seed=4, fractured_fraction=0.5, large_images=False,
                       truncated=1)
    out = tmp_path / "shift"
    assert main(["--models", detector_single_index, "--dataset", "fracatlas", "--data", str(tmp_path / "fa"),
                 "--split", "all", "--variants", "clean,rot90,invert", "--output", str(out)]) == 0
    doc = json.loads((out / "shift.json").read_text())
    assert list(doc["per_variant"]) == ["clean", "rot90", "invert"]
    n = doc["images"]
    assert 0 < n < 10                                    # the truncated file is left out of every variant alike
    assert all(v["n"] == n for v in doc["per_variant"].values())
    assert "| rot90 |" in (out / "shift.md").read_text() and "AUROC - clean" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--models", detector_single_index, "--dataset", "fracatlas", "--data", str(tmp_path / "fa"),
              "--variants", "clean,sideways"])
    assert exc.value.code == 2 and "sideways" in capsys.readouterr().err


def test_ship_model_writes_the_folder_and_a_card_from_the_bundles_record(detector_single_index, tmp_path):
    from fracray.artifacts.index import read_model_index
    from fracray.cli.ship_model import main

    bundle = read_model_index(detector_single_index).classifiers["all"]
    evaluation = tmp_path / "ev"
    evaluation.mkdir()
    (evaluation / "evaluation.json").write_text(json.dumps(
        {"overall": {"auroc": 0.91, "sensitivity": 0.8, "specificity": 0.9, "fracture_ece": 0.04},
         "localization": {"lesions": {"ap30": 0.5, "ap50": 0.3}}}))
    shift = tmp_path / "sh"
    shift.mkdir()
    (shift / "shift.json").write_text(json.dumps(
        {"images": 10, "per_variant": {"clean": {"n": 10, "auroc": 0.9}, "rot90": {"n": 10, "auroc": 0.88}}}))
    from fracray.metrics.drift import validation_distribution

    distribution = validation_distribution([0.01 * i for i in range(100)], source={"split": "valid"})
    (evaluation / "validation_distribution.json").write_text(json.dumps(distribution))
    out = tmp_path / "shipped"
    assert main(["--bundle", bundle, "--output", str(out), "--evaluation", str(evaluation), "--shift", str(shift),
                 "--command", "train_all.py --config recipe.yaml"]) == 0
    # The evaluation's validation distribution, the monitoring's drift reference, beside the index
    assert json.loads((out / "validation_distribution.json").read_text()) == distribution
    card = (out / "MODEL_CARD.md").read_text()
    assert "`validation_distribution.json`: P(fracture) on the 100 validation images" in card
    for needed in ("CC BY 4.0", "AUROC 0.910", "AP30 0.500", "| rot90 | 10 | 0.880 | -0.020 |",
                   "train_all.py --config recipe.yaml", "Intended use", "CPU cores"):
        assert needed in card, needed
    assert read_model_index(str(out)).classifiers["all"].endswith("models/fracture_all")
    assert main(["--bundle", str(tmp_path / "nothing"), "--output", str(tmp_path / "x")]) == 2
    # A distribution from another split is not a drift reference: refused, saying which split to use.
    (evaluation / "validation_distribution.json").write_text(json.dumps(
        validation_distribution([0.01 * i for i in range(100)], source={"split": "test"})))
    assert main(["--bundle", bundle, "--output", str(tmp_path / "y"), "--evaluation", str(evaluation)]) == 2
