"""train_all's options -> one config -> what the model sees -> the bundle; and the localisation
pieces: COCO outlines, masks aligned with the images, the fracture-map head on every backbone,
findings/FROC, the calibration slice and operating points measured elsewhere."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from fracray.cli.train_all import build_parser, config_from_args, parse_config
from fracray.jobs.train import TrainAllConfig
from fracray.training.defaults import DATASET_TRAINING_DEFAULTS, EMBEDDED_TRAINING_DEFAULTS
from fracray.data import adapters
from fracray.data.manifest import split_by_study
from fracray.data.pipeline import _row_rng, preprocess_batch
from fracray.data.synthetic import generate_fracatlas, render_radiograph
from fracray.imaging.preprocess import AugmentConfig, PreprocessConfig, augment_params, finalize
from fracray.imaging.regions import findings_from_heatmap, rasterize_regions
from fracray.metrics.calibration import operating_points
from fracray.metrics.classification import binary_metrics
from fracray.models.registry import create_model, list_models
from fracray.training.config import TrainConfig


# ----------------------------------------------------------------------------- 1. every option lands somewhere

# --verbose sets FRACRAY_VERBOSE, no config field (argparse.SUPPRESS): test_cli follows it to the console.
_SKIP_DESTS = {"help", "config", "endpoint_url", "region", "anonymous", argparse.SUPPRESS}
# Values that the config classes accept where the generic rule below would not do.
_VALUES = {"image_size": "160", "calibration_fraction": "0.25", "negatives_per_positive": "1.5",
           "threshold_value": "0.9", "pretrained": "none", "model": "resnet50", "router_model": "densenet121",
           "strategy": "full", "router_strategy": "classifier_only", "body_parts": "wrist,hand",
           "compare_backbones": "resnet50,vgg16", "data": "/tmp/somewhere", "output": "out/elsewhere",
           "max_concurrent": "3", "cpu_threads": "2", "sharpen_factor": "3.0"}
# Options refused where they could have no effect, given with what they need (and compared with
# the config of that alone): --exclude-hardware needs a layout with hardware labels.
_CONTEXT = {"exclude_hardware": ["--dataset", "fracatlas", "--data", "/tmp/somewhere"]}


def _non_default_argv(action: argparse.Action) -> list[str]:
    if isinstance(action, argparse.BooleanOptionalAction):
        return [next(o for o in action.option_strings if o.startswith("--no-") == bool(action.default))]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return [action.option_strings[0]]
    opt = action.option_strings[0]
    if action.dest in _VALUES:
        return [opt, _VALUES[action.dest]]
    if action.choices:
        return [opt, next(str(c) for c in action.choices if c != action.default)]
    if action.type is int:
        return [opt, str((action.default or 0) + 3)]
    if action.type is float:
        return [opt, str((action.default or 0.5) * 2)]
    raise AssertionError(f"no test value for option {opt} (dest {action.dest}): add one to _VALUES")


def _flat(config: TrainAllConfig) -> dict[tuple[str, str], object]:
    out = {("job", f.name): getattr(config, f.name) for f in dataclasses.fields(config)
           if f.name not in ("training", "storage")}
    out.update({("settings", f.name): getattr(config.training, f.name) for f in dataclasses.fields(config.training)
                if f.name != "fracture"})
    out.update({("fracture", f.name): getattr(config.training.fracture, f.name)
                for f in dataclasses.fields(config.training.fracture)})
    return out


def test_every_train_all_option_lands_in_exactly_one_config_field():
    parser = build_parser()
    baseline = _flat(parse_config([]))
    tested = set()
    for action in parser._actions:
        if action.dest in _SKIP_DESTS:
            continue
        context = _CONTEXT.get(action.dest, [])
        argv = context + _non_default_argv(action)
        config = parse_config(argv)
        expected = vars(parser.parse_args(argv))[action.dest]
        base = _flat(parse_config(context)) if context else baseline
        changed = {key for key, value in _flat(config).items() if value != base[key]}
        if action.dest == "dataset":  # ... which also selects the real-data training defaults
            changed -= {key for key in changed if key[1] in DATASET_TRAINING_DEFAULTS}
        assert len(changed) == 1, f"{argv} changed {sorted(changed)}; expected exactly one field named {action.dest}"
        (place, name), = changed
        assert name == action.dest, f"{argv} changed {place}.{name}, not a field named {action.dest}"
        assert _flat(config)[(place, name)] == expected, argv
        tested.add(action.dest)
    assert tested == {a.dest for a in parser._actions} - _SKIP_DESTS
    # The whole job's config is what a bundle records (training.run): plain JSON.
    json.dumps(parse_config(["--localization", "--compare-backbones", "resnet50"]).to_dict())


def test_an_option_without_a_config_field_is_an_error():
    args = vars(build_parser().parse_args([]))
    assert config_from_args(args) == parse_config([])
    with pytest.raises(RuntimeError, match="without a config field.*shiny_new_option"):
        config_from_args(dict(args, shiny_new_option=1))


def test_training_defaults_follow_the_data():
    """The embedded synthetic default trains to learn in minutes; --dataset keeps the conservative
    fine-tuning the README's real-data results were measured with; a flag wins in both."""
    embedded, real = parse_config([]), parse_config(["--dataset", "mura", "--data", "/tmp/somewhere"])
    for config, defaults in ((embedded, EMBEDDED_TRAINING_DEFAULTS), (real, DATASET_TRAINING_DEFAULTS)):
        values = {**dataclasses.asdict(config.training.fracture), **dataclasses.asdict(config.training)}
        assert {k: values[k] for k in defaults} == defaults
    assert (embedded.training.fracture.lr, real.training.fracture.lr) == (1e-3, 1e-4)
    assert real.training.router_config(("hand", "leg")).epochs == real.training.fracture.epochs == 2
    assert embedded.training.router_config(("hand", "leg")).epochs == 2 < embedded.training.fracture.epochs
    assert parse_config(["--lr", "1e-4"]).training.fracture.lr == 1e-4
    # The library's default job is the command line's (what `fracray serve` trains when it has no models).
    assert TrainAllConfig().training == embedded.training
    assert parse_config(["--dataset", "mura", "--data", "x", "--epochs", "4"]).training.fracture.epochs == 4


def test_router_config_follows_the_router_options_and_the_backbones_own_input():
    config = parse_config(["--model", "resnet50", "--router-model", "densenet121", "--router-strategy", "last60",
                           "--image-size", "160", "--localization", "--head", "dense3", "--epochs", "7",
                           "--router-epochs", "4"])
    router = config.training.router_config(("hand", "leg"))
    assert (router.model, router.strategy, router.task, router.classes) == ("densenet121", "last60", "body_part",
                                                                           ("hand", "leg"))
    assert router.image_size is None and router.localization is False and router.head == "linear"
    assert router.epochs == 4 and config.training.fracture.epochs == 7 and router.preprocess().image_size == (224, 224)
    assert config.training.fracture.preprocess().image_size == (160, 160)


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"job{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_keys_give_the_same_config_as_flags(tmp_path):
    flags = ["--train-batch-size", "8", "--image-size", "160", "--no-augment", "--enhancement", "sobel",
             "--body-parts", "wrist,hand", "--weights", "none", "--localization", "--tta-flip",
             "--negatives-per-positive", "1.5", "--batch-size", "32", "--lr", "0.001", "--seed", "4"]
    # Option names with - or _, or dests; store_false options by their flag's name.
    as_yaml = ("train-batch-size: 8\nimage_size: 160\nno-augment: true\nenhancement: sobel\n"
               "body-parts: wrist,hand\nweights: none\nlocalization: true\ntta_flip: true\n"
               "negatives-per-positive: 1.5\nbatch-size: 32\nlr: 0.001\nseed: 4\n")
    assert parse_config(["--config", _yaml(tmp_path, as_yaml)]) == parse_config(flags)
    # The same keys in their other spellings: train_batch_size, augment (the dest), a YAML list.
    other = ("train_batch_size: 8\nimage-size: 160\naugment: false\nenhancement: sobel\n"
             "body_parts: [wrist, hand]\npretrained: false\nlocalization: true\ntta-flip: true\n"
             "negatives_per_positive: 1.5\nstream_batch_size: 32\nlr: 0.001\nseed: 4\n")
    assert parse_config(["--config", _yaml(tmp_path, other)]) == parse_config(flags)
    # A key that is an option's name ("batch_size" <- --batch-size) is that option, though another
    # option's dest has the same spelling (--train-batch-size's dest is batch_size).
    config = parse_config(["--config", _yaml(tmp_path, "batch_size: 24\n")])
    assert config == parse_config(["--batch-size", "24"]) and config.stream_batch_size == 24
    assert config.training.fracture.batch_size == EMBEDDED_TRAINING_DEFAULTS["batch_size"] != 24
    # no-<flag>: false turns the option back on; --no-X flags of boolean options read the same way.
    assert parse_config(["--config", _yaml(tmp_path, "no-augment: false\n")]).training.fracture.augment is True
    on = parse_config(["--config", _yaml(tmp_path, "localization: true\nsingle-model: true\n")])
    assert on.training.fracture.localization and on.training.single_model
    for key in ("localization", "single-model", "tta-flip", "use-gpu", "exclude-hardware"):
        action = next(a for a in build_parser()._actions if f"--{key}" in a.option_strings)
        if isinstance(action, argparse.BooleanOptionalAction):
            assert _flat(parse_config(["--config", _yaml(tmp_path, f"no-{key}: true\n")])) == \
                _flat(parse_config([f"--no-{key}"])), key


def test_yaml_unknown_keys_and_bad_values_are_errors_and_flags_win(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--config", _yaml(tmp_path, "learning_rat: 0.1\nepochs: 2\n")])
    assert exc.value.code == 2 and "unknown keys" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # a value a flag would refuse is refused in YAML too
        parse_config(["--config", _yaml(tmp_path, "normalization: zscore\n")])
    assert exc.value.code == 2 and "zscore" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--config", _yaml(tmp_path, "calibration-fraction: 0.7\n")])  # TrainConfig refuses it
    path = _yaml(tmp_path, "epochs: 7\nimage-size: 128\nlocalization: true\nbody-parts: wrist\n")
    config = parse_config(["--config", path, "--epochs", "9", "--no-localization", "--body-parts", "hand"])
    assert config.training.fracture.epochs == 9 and config.training.fracture.localization is False
    assert config.training.fracture.image_size == 128 and config.body_parts == ("hand",)


def test_the_recipes_parse_and_set_what_they_say():
    recipes = Path(__file__).resolve().parents[1] / "pipelines" / "recipes"
    cpu = parse_config(["--config", str(recipes / "fracatlas_cpu.yaml")])
    assert cpu.training.single_model and cpu.training.fracture.localization and cpu.training.fracture.tta_flip
    assert cpu.training.fracture.preprocess().image_size == (384, 384) and cpu.training.fracture.pretrained is True
    assert cpu.training.fracture.localization_head == "detector" and cpu.training.fracture.robust_augment
    assert cpu.training.fracture.precision == "auto" and cpu.training.fracture.epochs == 8
    gpu = parse_config(["--config", str(recipes / "fracatlas_gpu.yaml")])
    assert gpu.training.use_gpu and gpu.training.fracture.model == "efficientnetv2_b2"
    assert gpu.training.fracture.preprocess().image_size == (640, 640)


# ----------------------------------------------------------------------------- 2. what the model sees

def _write_png(path: Path, pixels: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return str(path)


def test_preprocessing_options_change_what_the_model_sees(tmp_path):
    config = TrainConfig(image_size=160, enhancement="laplacian_sharpen", normalization="per_image").preprocess()
    assert config.image_size == (160, 160) and config.enhancement == "laplacian_sharpen"
    assert config.normalization == "per_image"
    default = TrainConfig().preprocess()
    assert default.image_size == (224, 224) and default.enhancement == "none" and default.normalization == "imagenet"

    pixels = render_radiograph(np.random.default_rng(4), "hand", 454, 373, fracture=True).pixels
    rows = {"image_uri": [_write_png(tmp_path / "r.png", pixels)], "image_label": [1]}
    ours = preprocess_batch(rows, preprocess=config)
    theirs = preprocess_batch(rows, preprocess=default)
    same_size = preprocess_batch(rows, preprocess=TrainConfig(image_size=160).preprocess())
    assert ours["status"].tolist() == ["ok"] and ours["image"].shape == (1, 1, 160, 160)
    assert theirs["image"].shape == (1, 1, 224, 224)
    assert np.abs(ours["image"] - same_size["image"]).mean() > 0.01  # the sharpening is applied
    x = finalize(torch.from_numpy(ours["image"]), config)
    assert x.shape == (1, 3, 160, 160)
    assert abs(float(x.mean())) < 1e-3 and float(x.std()) == pytest.approx(1.0, abs=0.02)  # per-image standardised
    # --sharpen-factor reaches the sharpening: the paper's 3.0 differs from its 1.5.
    strong = TrainConfig(image_size=160, enhancement="laplacian_sharpen", sharpen_factor=3.0).preprocess()
    assert strong.sharpen_factor == 3.0
    mild = preprocess_batch(rows, preprocess=TrainConfig(image_size=160, enhancement="laplacian_sharpen").preprocess())
    assert np.abs(preprocess_batch(rows, preprocess=strong)["image"] - mild["image"]).mean() > 0.005


# ----------------------------------------------------------------------------- 3. the bundle records them

@pytest.fixture(scope="module")
def tiny_fracatlas(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-fracatlas")
    generate_fracatlas(str(root), n_images=40, seed=3, fractured_fraction=0.4, large_images=False)
    manifest = adapters.index_dataset("fracatlas", str(root)).manifest
    valid = manifest.filter(pc.equal(manifest["split"], "valid"))
    train = manifest.filter(pc.not_equal(manifest["split"], "valid"))
    return train, valid


def test_a_trained_bundle_records_the_options_it_was_trained_with(ray_local, tiny_fracatlas, tmp_path):
    from fracray.imaging.preprocess import decode_for
    from fracray.inference.predictor import BundleModel
    from fracray.artifacts.bundle import read_bundle_meta
    from fracray.training.trainer import train_classifier

    train, valid = tiny_fracatlas
    assert set(valid["image_label"].to_pylist()) == {0, 1}
    s = 96
    job = parse_config(["--dataset", "fracatlas", "--image-size", str(s), "--enhancement", "sobel", "--localization",
                        "--tta-flip", "--negatives-per-positive", "1.0", "--seed", "3", "--epochs", "1",
                        "--train-batch-size", "8", "--single-model"])
    fracture = job.training.fracture
    result = train_classifier(fracture, train, valid, output_uri=str(tmp_path / "models"), name="fracture_all",
                              run_config=job.to_dict(), log=lambda *_: None)
    raw = json.loads((Path(result.bundle_uri) / "bundle.json").read_text())

    assert raw["preprocess"]["image_size"] == [s, s] and raw["preprocess"]["enhancement"] == "sobel"
    asked = json.loads(json.dumps(fracture.to_dict()))
    assert raw["training"]["config"] == asked
    assert (asked["image_size"], asked["localization"], asked["tta_flip"], asked["negatives_per_positive"],
            asked["seed"], asked["epochs"]) == (s, True, True, 1.0, 3, 1)
    assert raw["training"]["run"] == json.loads(json.dumps(job.to_dict()))
    assert raw["training"]["history"][0]["input_shape"] == [3, s, s]
    assert raw["model"]["localization"] is True and raw["inference"]["tta_flip"] is True
    assert raw["inference"]["findings"]
    for name in ("high_sensitivity", "high_specificity"):
        assert {"threshold", "sensitivity", "specificity", "chosen_on"} <= set(raw["operating_points"][name])
    calibration_images = raw["data"]["calibration_images"]
    fit, held = split_by_study(train, fracture.calibration_fraction, seed=3)
    sliced = set(held["image_label"].to_pylist()) == {0, 1}
    assert raw["calibration"]["fitted_on"] == ("calibration_slice" if sliced else "valid")
    assert calibration_images == (held.num_rows if sliced else 0)
    assert raw["data"]["train_images"] + calibration_images == train.num_rows
    loc = raw["metrics"]["valid_localization"]
    assert {"pointing_game", "lesion_sensitivity_at_1_fp", "lesion_sensitivity_at_0.5_fp", "froc"} <= set(loc)
    assert loc["images"] == valid.num_rows and loc["lesions"] == sum(valid["image_label"].to_pylist())
    # Every fractured training image has an outline (synthetic FracAtlas writes the COCO file).
    assert raw["data"]["localization"] == {"images_with_outlines": sum((fit if sliced else train)["image_label"]
                                                                       .to_pylist()),
                                           "images_with_boxes_only": 0, "positives_without_regions": 0}

    model = BundleModel(result.bundle_uri)
    assert model.localizes and model.tta_flip and model.config == read_bundle_meta(result.bundle_uri).preprocess_config()
    decoded = [decode_for(Path(u).read_bytes(), model.config) for u in valid["image_uri"].to_pylist()[:3]]
    probs, maps = model.predict(decoded)
    assert probs.shape == (3, 2) and len(maps) == 3 and maps[0].shape == (s // 16, s // 16)
    for m, d in zip(maps, decoded):
        found = model.findings(m, d)
        assert isinstance(found, list)
        assert all({"box", "score", "peak"} == set(f) for f in found)
    heat = model.heatmap(decoded[0])
    assert heat.shape == decoded[0].pixels.shape[:2] and 0.0 <= heat.min() <= heat.max() <= 1.0

    # The ablation table reads its row from this bundle: the figures and the recipe as trained.
    from fracray.cli.ablation_table import main as ablation_main
    from fracray.reports.ablation import ablation_row

    row = ablation_row(str(tmp_path))
    assert row.auroc == raw["metrics"]["valid"]["auroc"] and row.pointing_game == loc["pointing_game"]
    assert row.lesion_sens_1fp == loc["lesion_sensitivity_at_1_fp"]
    assert row.ece_valid == raw["calibration"]["valid"]["ece_after"]
    for words in (f"@{s}px", "sobel", "fracture map", "1 neg/pos", "flip TTA", "1 epochs", "seed 3"):
        assert words in row.recipe, (words, row.recipe)
    assert ablation_main([str(tmp_path)]) == 0
    assert ablation_main([str(tmp_path / "nothing-here")]) == 2


def test_a_trained_detector_records_fusion_box_calibration_and_detection_metrics(ray_local, tiny_fracatlas,
                                                                                 tmp_path):
    """The detector recipe through Ray Train (bf16 where the CPU has it, robust augmentation): the
    bundle records the fusion and box calibration fitted on the calibration slice, AP30/AP50 and the
    ablation (classifier alone, detector alone, fused), and the history the in-training AP30 that
    early stopping follows; the predictor answers with boxes."""
    from fracray.imaging.preprocess import decode_for
    from fracray.inference.predictor import BundleModel, Detections
    from fracray.training.precision import resolve_training_precision
    from fracray.training.trainer import train_classifier

    train, valid = tiny_fracatlas
    job = parse_config(["--dataset", "fracatlas", "--image-size", "96", "--localization", "--localization-head",
                        "detector", "--robust-augment", "--tta-flip", "--epochs", "2", "--train-batch-size", "8",
                        "--single-model", "--calibration-fraction", "0.3", "--seed", "1"])
    fracture = job.training.fracture
    assert fracture.localization_head == "detector" and fracture.robust_augment and fracture.precision == "auto"
    result = train_classifier(fracture, train, valid, output_uri=str(tmp_path / "models"), name="fracture_all",
                              run_config=job.to_dict(), log=lambda *_: None)
    raw = json.loads((Path(result.bundle_uri) / "bundle.json").read_text())
    assert raw["model"]["localization_head"] == "detector"
    assert [h["val_ap30"] is not None for h in raw["training"]["history"]] == [True, True]
    loc = raw["metrics"]["valid_localization"]
    assert {"ap30", "ap50", "median_area_ratio", "lesion_sensitivity_at_1_fp", "pointing_game"} <= set(loc)
    assert 0.0 <= loc["ap50"] <= loc["ap30"] <= 1.0
    assert set(raw["metrics"]["valid_ablation"]) == {"classifier", "detector", "fused"}
    assert raw["metrics"]["valid_fracture_ece"]["bins"] == 10
    fusion = raw["inference"]["fusion"]
    assert fusion["features"] == ["classifier_logit", "top_box_logit"] and len(fusion["weights"]) == 2
    assert raw["calibration"]["fitted_on"] in ("calibration_slice", "valid")

    model = BundleModel(result.bundle_uri)
    assert model.detects and model.fusion == fusion
    decoded = [decode_for(Path(u).read_bytes(), model.config) for u in valid["image_uri"].to_pylist()[:3]]
    probs, found = model.predict(decoded)
    assert probs.shape == (3, 2) and all(isinstance(f, Detections) for f in found)
    assert found[0].score_map.shape == (96 // 8, 96 // 8)
    for f, d in zip(found, decoded):
        for finding in model.findings(f, d):
            x0, y0, x1, y1 = finding["box"]
            assert 0 <= x0 < x1 <= d.width and 0 <= y0 < y1 <= d.height and 0 <= finding["score"] <= 1
    assert model.heatmap(decoded[0]).shape == decoded[0].pixels.shape[:2]
    # The precision the run trained at is what --precision auto resolves to on this CPU.
    assert {h["precision"] for h in raw["training"]["history"]} == {resolve_training_precision("auto", "cpu")}


def test_localization_without_boxes_is_refused_before_training(tiny_fracatlas, tmp_path):
    from fracray.training.config import TrainConfig
    from fracray.training.trainer import train_classifier

    train, valid = tiny_fracatlas
    bare = train.drop_columns([c for c in ("boxes", "outlines") if c in train.column_names])
    for head in ("detector", "map"):
        with pytest.raises(ValueError, match="none of the .* training images has any"):
            train_classifier(TrainConfig(localization=True, localization_head=head), bare, valid,
                             output_uri=str(tmp_path), name="fracture_all", log=lambda *_: None)
    assert not any(tmp_path.iterdir())  # nothing written


# ----------------------------------------------------------------------------- 4. masks stay aligned

def _bright_square_rows(tmp_path: Path) -> tuple[dict, tuple[int, int, int, int]]:
    h, w = 200, 300
    x0, y0, x1, y1 = 200, 50, 230, 80
    pixels = np.full((h, w), 20, np.uint8)
    pixels[y0:y1, x0:x1] = 250
    box = {"class_id": 0, "x_center": (x0 + x1) / 2 / w, "y_center": (y0 + y1) / 2 / h,
           "width": (x1 - x0) / w, "height": (y1 - y0) / h}
    outline = [x0 / w, y0 / h, x1 / w, y0 / h, x1 / w, y1 / h, x0 / w, y1 / h]
    uri = _write_png(tmp_path / "square.png", pixels)
    plain = _write_png(tmp_path / "plain.png", np.full((h, w), 20, np.uint8))
    rows = {"image_uri": [uri, uri, plain, uri], "image_label": [1, 1, 0, 1],
            "boxes": [[box], None, None, None], "outlines": [None, [outline], None, None],
            "augment_copy": [0, 0, 0, 0]}
    return rows, (x0, y0, x1, y1)


def _centre_of_mass(plane: np.ndarray) -> np.ndarray:
    ys, xs = np.mgrid[0:plane.shape[0], 0:plane.shape[1]]
    total = plane.sum()
    return np.array([(xs * plane).sum() / total, (ys * plane).sum() / total])


def test_masks_follow_the_image_through_resize_flip_and_affine(tmp_path):
    rows, _ = _bright_square_rows(tmp_path)
    augment = AugmentConfig(hflip_prob=1.0, max_rotation_deg=20.0, scale_range=(0.9, 1.1), max_translate_frac=0.05)
    # A draw with a flip and a real rotation (the same generator preprocess_batch uses).
    seed = next(s for s in range(100) if abs(augment_params(_row_rng(rows["image_uri"][0], s, 0), augment)
                                              ["angle_deg"]) > 8)
    params = augment_params(_row_rng(rows["image_uri"][0], seed, 0), augment)
    assert params["flip"] and abs(params["angle_deg"]) > 8
    config = PreprocessConfig(image_size=(128, 128))
    out = preprocess_batch(rows, preprocess=config, augment=augment, seed=seed, masks=True)
    assert out["status"].tolist() == ["ok"] * 4 and out["mask"].shape == (4, 1, 128, 128)
    assert out["mask_known"].tolist() == [True, True, True, False]
    image = out["image"][0, 0]
    square = np.clip(image - 0.5, 0, None)  # the bright square only (background 20/255, letterbox 0)
    for i in (0, 1):  # from a box, and from an outline
        mask = out["mask"][i, 0]
        assert mask.max() > 0.9 and 0.5 * 30 * 30 * (128 / 300) ** 2 < mask.sum() < 2 * 30 * 30 * (128 / 300) ** 2
        np.testing.assert_allclose(_centre_of_mass(mask), _centre_of_mass(square), atol=2.0)
    assert _centre_of_mass(square)[0] < 64  # the square was on the right: the flip happened
    np.testing.assert_array_equal(out["image"][0], out["image"][1])
    assert out["mask"][2].max() == 0 and out["mask"][3].max() == 0  # negative: known empty; unknown: empty, unused
    # Without augmentation the mask sits where the square does too (letterbox only).
    still = preprocess_batch(rows, preprocess=config, masks=True)
    np.testing.assert_allclose(_centre_of_mass(still["mask"][0, 0]),
                               _centre_of_mass(np.clip(still["image"][0, 0] - 0.5, 0, None)), atol=1.0)
    assert "mask" not in preprocess_batch(rows, preprocess=config)


# ----------------------------------------------------------------------------- 5. regions

def test_rasterize_regions_fills_outlines_and_falls_back_to_boxes():
    square = [0.25, 0.25, 0.75, 0.25, 0.75, 0.75, 0.25, 0.75]
    triangle = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    box = {"class_id": 0, "x_center": 0.5, "y_center": 0.25, "width": 0.5, "height": 0.25}
    m = rasterize_regions((40, 80), outlines=[square])
    assert m.shape == (40, 80) and m.dtype == np.float32 and set(np.unique(m)) == {0.0, 1.0}
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (20, 60, 10, 30)
    tri = rasterize_regions((50, 50), outlines=[triangle])
    assert tri.sum() == pytest.approx(50 * 50 / 2, rel=0.1) and tri[2, 2] == 1 and tri[47, 47] == 0
    # Outlines win over boxes; boxes are used without outlines.
    assert np.array_equal(rasterize_regions((40, 80), outlines=[square], boxes=[box]), m)
    b = rasterize_regions((40, 80), boxes=[box])
    ys, xs = np.nonzero(b)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (20, 60, 5, 15) and b.sum() == 40 * 10
    # A hairline outline too thin to rasterise at this size falls back to its box.
    hair = [0.5, 0.5, 0.5001, 0.5, 0.5001, 0.5001]
    assert rasterize_regions((20, 20), outlines=[hair], boxes=[box]).sum() > 0
    assert rasterize_regions((20, 20)).sum() == 0


def test_findings_from_heatmap_finds_two_blobs_best_first_scaled():
    ys, xs = np.mgrid[0:64, 0:64]
    blob = lambda x, y, a, s=3.0: a * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * s * s))  # noqa: E731
    heat = (blob(15, 20, 0.9) + blob(45, 40, 0.6)).astype(np.float32)
    for min_score in (0.05, 0.2):
        found = findings_from_heatmap(heat, threshold=0.5, min_score=min_score, scale=(2.0, 3.0))
        assert len(found) == 2, found  # one finding per blob: a blob's tail is not another finding
        first, second = found
        assert first.score == pytest.approx(0.9, abs=1e-3) and second.score == pytest.approx(0.6, abs=1e-3)
        assert first.peak == (31, 61) and second.peak == (91, 121)  # (x + 0.5) * sx, (y + 0.5) * sy
        for f, (cx, cy) in ((first, (15, 20)), (second, (45, 40))):
            x0, y0, x1, y1 = f.box
            # Half maximum of a sigma-3 Gaussian: |d| <= 3.5 px, in heatmap pixels times the scale.
            assert x0 == pytest.approx((cx - 3) * 2, abs=2) and x1 == pytest.approx((cx + 4) * 2, abs=2)
            assert y0 == pytest.approx((cy - 3) * 3, abs=3) and y1 == pytest.approx((cy + 4) * 3, abs=3)
    assert findings_from_heatmap(heat, max_findings=1)[0].score == pytest.approx(0.9, abs=1e-3)
    assert findings_from_heatmap(np.zeros((8, 8)), min_score=0.05) == []
    with pytest.raises(ValueError):
        findings_from_heatmap(np.zeros(8))


# The rule for a hit (IoU, one match per fracture), FROC and AP: tests/test_detection.py.


# ----------------------------------------------------------------------------- 6. the map head on every backbone

@pytest.fixture
def one_thread():
    """Small CPU models: one intra-op thread is fastest, and on a busy machine two threads
    spin-wait for each other (30 s instead of 0.4 s for DenseNet-121 here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list_models())
def test_fracture_map_head_trains_on_every_backbone(name, one_thread):
    torch.manual_seed(0)
    model = create_model(name, pretrained=False, localization=True).train()
    assert model.localizes and model.describe()["localization"] is True
    x = torch.randn(2, 3, 96, 96)
    logits, maps = model(x, with_map=True)
    assert logits.shape == (2, 2) and maps.ndim == 3 and maps.shape[0] == 2 and min(maps.shape[1:]) >= 3
    (torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])) + maps.sigmoid().mean()).backward()
    grads = [p.grad for p in model.map_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert model.fusion_weight.grad is not None and model.fusion_weight.grad != 0
    model.eval()
    with torch.no_grad():
        plain = model(x)
        inferred, inferred_maps = model.infer(x)
        torch.testing.assert_close(plain, inferred)
        flipped, flipped_maps = model.infer(x, tta_flip=True)
    assert flipped.shape == (2, 2) and flipped_maps.shape == inferred_maps.shape


def test_map_head_stays_trainable_under_a_frozen_backbone_and_needs_a_binary_model(one_thread):
    model = create_model("efficientnet_lite0", pretrained=False, localization=True, strategy="classifier_only")
    assert all(p.requires_grad for p in model.map_head.parameters()) and model.fusion_weight.requires_grad
    assert not any(p.requires_grad for p in model.backbone.parameters() if p is not None
                   and not any(p is q for q in model.head.parameters()))
    with pytest.raises(ValueError, match="binary"):
        create_model("efficientnet_lite0", pretrained=False, localization=True, num_classes=3)
    plain = create_model("efficientnet_lite0", pretrained=False).eval()
    assert not plain.localizes and plain.infer(torch.randn(1, 3, 96, 96))[1] is None


# ----------------------------------------------------------------------------- 7. COCO outlines

def test_fracatlas_adapter_reads_the_coco_outlines(tmp_path):
    generate_fracatlas(str(tmp_path / "a"), n_images=30, seed=5, fractured_fraction=0.4, large_images=True)
    coco_path = tmp_path / "a" / "FracAtlas" / "Annotations" / "COCO JSON" / "COCO_fracture_masks.json"
    coco = json.loads(coco_path.read_text())
    assert coco["annotations"] and all(isinstance(a["segmentation"], str) for a in coco["annotations"])  # as released
    images = {im["id"]: im for im in coco["images"]}
    for ann in coco["annotations"][:5]:
        image = images[ann["image_id"]]
        with Image.open(next((tmp_path / "a").rglob(image["file_name"]))) as img:
            assert img.size == (image["width"], image["height"])
        polygon = json.loads(ann["segmentation"])[0]
        assert len(polygon) >= 6 and all(0 <= v <= image["width"] for v in polygon[0::2])

    manifest = adapters.index_dataset("fracatlas", str(tmp_path / "a")).manifest
    rows = manifest.to_pylist()
    fractured = [r for r in rows if r["image_label"] == 1]
    assert fractured and len(coco["annotations"]) == len(fractured)
    for r in rows:
        if r["image_label"] == 0:
            assert r["outlines"] is None
            continue
        assert r["outlines"] and all(len(p) >= 6 for p in r["outlines"])
        box = r["boxes"][0]
        xs, ys = r["outlines"][0][0::2], r["outlines"][0][1::2]
        # The outline lies inside its YOLO box (to float32 precision).
        assert box["x_center"] - box["width"] / 2 - 1e-4 <= min(xs) <= max(xs) <= box["x_center"] + box["width"] / 2 + 1e-4
        assert box["y_center"] - box["height"] / 2 - 1e-4 <= min(ys) <= max(ys) <= box["y_center"] + box["height"] / 2 + 1e-4
    # A plain-list segmentation (what COCO tools write) reads the same.
    for ann in coco["annotations"]:
        ann["segmentation"] = json.loads(ann["segmentation"])
    coco_path.write_text(json.dumps(coco))
    again = adapters.index_dataset("fracatlas", str(tmp_path / "a")).manifest
    assert again["outlines"].to_pylist() == manifest["outlines"].to_pylist()
    # Without the COCO file there are no outlines (the boxes still localise).
    generate_fracatlas(str(tmp_path / "b"), n_images=30, seed=5, fractured_fraction=0.4, large_images=True,
                       coco_outlines=False)
    bare = adapters.index_dataset("fracatlas", str(tmp_path / "b")).manifest
    assert not any(bare["outlines"].to_pylist()) and bare["boxes"].to_pylist() == manifest["boxes"].to_pylist()


@pytest.mark.shared_data
def test_real_fracatlas_outlines(shared_fracatlas):
    manifest = adapters.index_dataset("fracatlas", str(shared_fracatlas)).manifest
    rows = manifest.to_pylist()
    assert sum(1 for r in rows if r["image_label"] == 1 and r["outlines"]) == 656
    assert not any(r["outlines"] for r in rows if r["image_label"] == 0)
    assert all(0.0 <= v <= 1.0 for r in rows if r["outlines"] for p in r["outlines"] for v in p)


def test_seed_and_negatives_per_positive_decide_which_images_train_each_epoch():
    """--negatives-per-positive keeps every fractured image and that share of the others each
    epoch; --seed and the epoch decide which (the same on every worker, different each epoch)."""
    from fracray.training.loop import _epoch_sample

    uris = [f"/img/{i}.png" for i in range(4000)]
    labels = np.array([1] * 500 + [0] * 3500)
    keep = _epoch_sample(uris, labels, epoch=0, seed=0, negative_keep=0.25)
    assert keep[:500].all() and abs(keep[500:].mean() - 0.25) < 0.03
    assert np.array_equal(keep, _epoch_sample(uris, labels, epoch=0, seed=0, negative_keep=0.25))  # workers agree
    for other in (_epoch_sample(uris, labels, epoch=1, seed=0, negative_keep=0.25),
                  _epoch_sample(uris, labels, epoch=0, seed=1, negative_keep=0.25)):
        assert other[:500].all() and (other != keep).sum() > 500  # a fresh draw of the negatives
    assert _epoch_sample(uris, labels, epoch=0, seed=0, negative_keep=1.0).all()


# ----------------------------------------------------------------------------- 8. calibration slice, operating points

def test_split_by_study_never_splits_a_study_and_is_deterministic_per_seed():
    studies = [f"s{i // 3}" for i in range(600)] + [None] * 30
    table = pa.table({"image_uri": [f"/img/{i}.png" for i in range(630)], "study_id": studies,
                      "image_label": [i % 2 for i in range(630)]})
    rest, held = split_by_study(table, 0.2, seed=1)
    assert rest.num_rows + held.num_rows == table.num_rows
    assert sorted(rest["image_uri"].to_pylist() + held["image_uri"].to_pylist()) == sorted(table["image_uri"].to_pylist())
    named = lambda t: {s for s in t["study_id"].to_pylist() if s}  # noqa: E731
    assert not named(rest) & named(held) and named(held)
    assert 0.1 < len(named(held)) / 200 < 0.3
    assert 0 < sum(s is None for s in held["study_id"].to_pylist()) < 30  # images without a study: their own
    again_rest, again_held = split_by_study(table, 0.2, seed=1)
    assert again_held["image_uri"].to_pylist() == held["image_uri"].to_pylist() and again_rest.equals(rest)
    assert split_by_study(table, 0.2, seed=2)[1]["image_uri"].to_pylist() != held["image_uri"].to_pylist()
    assert split_by_study(table, 0.0, seed=1)[1].num_rows == 0
    with pytest.raises(ValueError):
        split_by_study(table, 1.0)


def test_operating_points_are_chosen_on_one_set_and_measured_on_another():
    rng = np.random.default_rng(0)
    y_cal = rng.integers(0, 2, 400)
    p_cal = np.clip(0.3 * y_cal + rng.random(400) * 0.7, 0, 1)
    y_val = rng.integers(0, 2, 300)
    p_val = np.clip(0.25 * y_val + rng.random(300) * 0.75, 0, 1)
    alone = operating_points(y_cal, p_cal)
    points = operating_points(y_cal, p_cal, evaluate=(y_val, p_val))
    assert set(points) == set(alone) >= {"youden", "sensitivity>=0.95", "high_sensitivity", "high_specificity"}
    for name, point in points.items():
        assert point["threshold"] == alone[name]["threshold"]
        measured = binary_metrics(y_val, p_val, point["threshold"])
        assert (point["sensitivity"], point["specificity"]) == (measured["sensitivity"], measured["specificity"])
        assert point["chosen_on"] == {"sensitivity": alone[name]["sensitivity"],
                                      "specificity": alone[name]["specificity"], "n": 400}
    assert points["high_sensitivity"]["threshold"] == points["sensitivity>=0.95"]["threshold"]
    assert points["high_specificity"]["threshold"] == points["specificity>=0.95"]["threshold"]
    assert points["high_sensitivity"]["chosen_on"]["sensitivity"] >= 0.95
    assert points["high_specificity"]["chosen_on"]["specificity"] >= 0.95
    assert "chosen_on" not in alone["youden"]


def test_loss_options_reach_the_loss():
    """--loss, the class weights, --localization, --map-loss-weight and --map-pos-weight each change
    the training loss the worker optimises (make_loss builds it from the TrainConfig)."""
    import torch
    import torch.nn.functional as F

    from fracray.training.config import TrainConfig
    from fracray.training.losses import make_loss

    torch.manual_seed(0)
    logits, y = torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 1, 0])
    maps = torch.randn(6, 4, 4)
    mask = torch.zeros(6, 1, 64, 64)
    mask[1, 0, 10:20, 10:20] = 1.0
    known = torch.tensor([True, True, True, False, True, True])
    weights = [0.6, 1.4]

    plain = make_loss(TrainConfig(loss="ce"), weights)(logits, y)
    assert torch.isclose(plain, F.cross_entropy(logits, y))
    weighted = make_loss(TrainConfig(loss="weighted_ce"), weights)(logits, y)
    assert torch.isclose(weighted, F.cross_entropy(logits, y, weight=torch.tensor(weights)))
    assert not torch.isclose(weighted, plain)
    focal = make_loss(TrainConfig(loss="focal"), weights)(logits, y)
    assert not torch.isclose(focal, weighted)

    def with_map(**kw):
        return make_loss(TrainConfig(localization=True, **kw), weights)((logits, maps), (y, mask, known))

    assert torch.isclose(with_map(map_loss_weight=0.0), weighted)
    one, two = with_map(map_loss_weight=1.0), with_map(map_loss_weight=2.0)
    assert torch.isclose(two - weighted, 2 * (one - weighted))
    assert not torch.isclose(with_map(map_pos_weight=1.0), with_map(map_pos_weight=30.0))
    # Only images whose fracture regions are known teach the map.
    nothing_known = make_loss(TrainConfig(localization=True), weights)(
        (logits, maps), (y, mask, torch.zeros(6, dtype=torch.bool)))
    assert torch.isclose(nothing_known, weighted)


def test_evaluate_operating_point_labels_at_that_point_and_refuses_unknown_names(ray_local, untrained_index,
                                                                                  fracatlas_root):
    """evaluate.py --operating-point: a threshold of 0 labels every scored image fractured; an unknown
    name is refused before any image is scored."""
    from fracray.cli.evaluate import main as evaluate_main
    from fracray.jobs.evaluate import EvaluateConfig, run_evaluate

    summary = run_evaluate(EvaluateConfig(untrained_index, "fracatlas", str(fracatlas_root), split="all",
                                          operating_point="0.0")).summary
    overall = summary["overall"]
    assert summary["operating_point"] == "0.0"
    assert overall["fn"] == 0 and overall["tn"] == 0 and overall["tp"] + overall["fp"] == overall["n"] > 0
    with pytest.raises(ValueError, match="Unknown operating point"):
        run_evaluate(EvaluateConfig(untrained_index, "fracatlas", str(fracatlas_root), split="all",
                                    operating_point="no_such_point"))
    assert evaluate_main(["--models", untrained_index, "--dataset", "fracatlas", "--data", str(fracatlas_root),
                          "--operating-point", "no_such_point"]) == 2


def test_batchnorm_heads_refuse_batches_of_one():
    with pytest.raises(ValueError, match="at least 2 images"):
        TrainConfig(head="dense3", batch_size=1)
    with pytest.raises(ValueError, match="at least 2 images"):
        TrainConfig(localization=True, batch_size=1)
    assert TrainConfig(head="dense3", batch_size=2).head == "dense3"
