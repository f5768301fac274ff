"""train_all options that used to be accepted and do nothing (issue 24), each followed to its
effect or to its refusal: --exclude-hardware where no image has a hardware label,
--synthetic-patients-per-part beside --dataset, and --balance-positives (the MURA humerus
paper's class balance by augmented positives), which no job used to call."""

from __future__ import annotations

import collections
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fracray.cli.train_all import main, parse_config
from fracray.data.adapters import index_manifest_file
from fracray.data.manifest import make_manifest
from fracray.jobs import train as train_job
from fracray.reports.ablation import _recipe
from fracray.training import orchestrate
from fracray.training.orchestrate import TrainingSettings, train_models
from fracray.training.config import TrainConfig


class _Stop(Exception):
    """Raised by a stand-in at the point the option's effect is visible, before any Ray work."""


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2  # the parser's error, as for a bad flag
    return capsys.readouterr().err


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"job{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(text)
    return str(path)


REAL = ["--dataset", "mura", "--data", "/tmp/somewhere"]


# ----------------------------------------------------------------------------- --exclude-hardware

def test_exclude_hardware_is_refused_for_layouts_without_hardware_labels(tmp_path, capsys):
    err = _refused(REAL + ["--exclude-hardware"], capsys)
    assert "--exclude-hardware" in err and "--dataset mura" in err and "no hardware labels" in err
    assert "--dataset fracatlas" in err and "`hardware` column" in err  # ... and what to do instead
    err = _refused(["--exclude-hardware"], capsys)  # the embedded default is MURA-layout too
    assert "embedded synthetic default" in err
    for dataset in ("folder", "tree"):
        assert f"--dataset {dataset}" in _refused(["--dataset", dataset, "--data", "x", "--exclude-hardware"], capsys)
    assert "--dataset mura" in _refused(REAL + ["--config", _yaml(tmp_path, "exclude-hardware: true\n")], capsys)
    # Where hardware can be labelled it is accepted (and --no-exclude-hardware is accepted anywhere).
    for dataset in ("fracatlas", "manifest"):
        assert parse_config(["--dataset", dataset, "--data", "x", "--exclude-hardware"]).training.exclude_hardware
    assert parse_config(REAL + ["--no-exclude-hardware"]).training.exclude_hardware is False


def _png(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(len(str(path))).integers(0, 255, (64, 64), np.uint8)).save(path)
    return path.name


def _manifest_csv(tmp_path: Path, *, hardware: bool) -> str:
    lines = ["path,label,split,body_part,study_id" + (",hardware" if hardware else "")]
    for i in range(8):
        name = _png(tmp_path / "images" / f"im{i}.png")
        lines.append(f"images/{name},{i % 2},{'train' if i < 6 else 'valid'},wrist,s{i}"
                     + (f",{'true' if i in (1, 2) else 'false'}" if hardware else ""))
    path = tmp_path / ("with_hardware.csv" if hardware else "labels.csv")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_exclude_hardware_on_a_manifest_without_hardware_labels_stops_before_the_data_stage(tmp_path, capsys,
                                                                                            monkeypatch):
    monkeypatch.setattr(train_job, "connect", lambda: (_ for _ in ()).throw(AssertionError("reached the data stage")))
    out = tmp_path / "run"
    code = main(["--dataset", "manifest", "--data", _manifest_csv(tmp_path, hardware=False), "--exclude-hardware",
                 "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--exclude-hardware" in err and "none of the 8 images (manifest layout) has one" in err
    assert not (out / "data_stage.json").exists()
    # The library refuses the same (a TrainingSettings built without the command line).
    mura = make_manifest([{"image_uri": f"m{i}.png", "dataset": "mura", "split": "train", "body_part": "wrist",
                           "image_label": i % 2} for i in range(8)])
    with pytest.raises(ValueError, match=r"none of the 8 images \(mura layout\) has one"):
        train_models(mura, TrainingSettings(exclude_hardware=True), output_uri=str(tmp_path / "lib"), dataset="mura")


def test_exclude_hardware_keeps_hardware_images_out_of_every_training_run(tmp_path, monkeypatch):
    """A manifest's `hardware` column is used: the flagged images reach no run's training or
    validation rows; without the flag they do."""
    manifest = index_manifest_file(_manifest_csv(tmp_path, hardware=True)).manifest
    assert manifest["hardware"].to_pylist() == [False, True, True] + [False] * 5
    flagged = {u for u, h in zip(manifest["image_uri"].to_pylist(), manifest["hardware"].to_pylist()) if h}

    def runs(exclude: bool) -> set[str]:
        def capture(jobs, settings, log):
            raise _Stop(jobs)

        monkeypatch.setattr(orchestrate, "_run_all", capture)
        with pytest.raises(_Stop) as stop:
            train_models(manifest, TrainingSettings(exclude_hardware=exclude), output_uri=str(tmp_path / "run"),
                         dataset="manifest", log=lambda *_: None)
        jobs = stop.value.args[0]
        assert jobs and all(job["train"].num_rows for job in jobs)
        return {u for job in jobs for part in ("train", "valid") for u in job[part]["image_uri"].to_pylist()}

    assert flagged <= runs(False)
    seen = runs(True)
    assert not seen & flagged and seen == set(manifest["image_uri"].to_pylist()) - flagged


# ----------------------------------------------------------------------------- --synthetic-patients-per-part

def test_synthetic_patients_per_part_is_refused_with_a_dataset(tmp_path, capsys):
    err = _refused(REAL + ["--synthetic-patients-per-part", "4"], capsys)
    assert "--synthetic-patients-per-part" in err and "--dataset mura" in err
    # A YAML key is as explicit as a flag.
    err = _refused(REAL + ["--config", _yaml(tmp_path, "synthetic-patients-per-part: 4\n")], capsys)
    assert "--synthetic-patients-per-part" in err
    err = _refused(["--config", _yaml(tmp_path, "dataset: fracatlas\ndata: x\nsynthetic_patients_per_part: 4\n")],
                   capsys)
    assert "--dataset fracatlas" in err
    # Not given: no refusal, and the job keeps its default (which nothing reads with --dataset).
    assert parse_config(REAL).synthetic_patients_per_part == train_job.TrainAllConfig.synthetic_patients_per_part


def test_synthetic_patients_per_part_sizes_the_embedded_default(tmp_path, monkeypatch):
    asked = []

    def generate(data, *, patients_per_part, **_):
        asked.append(patients_per_part)
        raise _Stop

    monkeypatch.setattr(train_job, "generate_mura", generate)
    for argv in (["--synthetic-patients-per-part", "5"],
                 ["--config", _yaml(tmp_path, "synthetic-patients-per-part: 6\n")], []):
        with pytest.raises(_Stop):
            train_job.run_train_all(parse_config(argv + ["--output", str(tmp_path / "run")]), log=lambda *_: None)
    assert asked == [5, 6, train_job.TrainAllConfig.synthetic_patients_per_part]


# ----------------------------------------------------------------------------- --balance-positives

def test_balance_positives_is_a_fracture_model_option_refused_with_negatives_per_positive(tmp_path, capsys):
    config = parse_config(["--balance-positives"])
    assert config.training.fracture.balance_positives is True
    assert config.training.router_config(("hand", "leg")).balance_positives is False  # the router's classes are parts
    assert config.to_dict()["training"]["fracture"]["balance_positives"] is True  # what a bundle's training.run holds
    assert parse_config([]).training.fracture.balance_positives is False
    err = _refused(["--balance-positives", "--negatives-per-positive", "1.5"], capsys)
    assert "--balance-positives" in err and "--negatives-per-positive" in err and "choose one" in err
    err = _refused(["--config", _yaml(tmp_path, "balance-positives: true\nnegatives-per-positive: 2\n")], capsys)
    assert "choose one" in err
    with pytest.raises(ValueError, match="not the body-part router"):
        TrainConfig(task="body_part", classes=("hand", "leg"), balance_positives=True)
    assert "augmented copies" in _recipe(config.training.fracture.to_dict(), {})


def _training_stream(monkeypatch, tmp_path: Path, argv: list[str]):
    """What train_classifier hands Ray Train for ``argv``'s fracture model: the training and
    validation tables and the workers' config, captured where the TorchTrainer would start."""
    from ray.train import torch as ray_torch

    from fracray.training import trainer

    streams = {}

    def dataset(table, preprocess, *, storage_options=None, stream=None):
        streams["train" if "train" not in streams else "valid"] = table
        return types.SimpleNamespace(context=types.SimpleNamespace())

    def torch_trainer(loop, *, train_loop_config, **_):
        raise _Stop(train_loop_config)

    monkeypatch.setattr(trainer, "build_image_dataset", dataset)
    monkeypatch.setattr(ray_torch, "TorchTrainer", torch_trainer)
    rows = [{"image_uri": f"{tmp_path}/{'p' if i < 8 else 'n'}{i}.png", "dataset": "t", "split": "train",
             "body_part": "wrist", "study_id": f"s{i}", "image_label": int(i < 8)} for i in range(48)]
    train = make_manifest(rows)
    valid = make_manifest([dict(r, image_uri=r["image_uri"] + ".v", split="valid") for r in rows[:4] + rows[-8:]])
    config = parse_config(argv + ["--dataset", "manifest", "--data", "x", "--calibration-fraction", "0.2"])
    with pytest.raises(_Stop) as stop:
        trainer.train_classifier(config.training.fracture, train, valid, output_uri=str(tmp_path / "models"),
                                 name="fracture_wrist", log=lambda *_: None)
    return streams, stop.value.args[0], train, valid


def test_balance_positives_balances_what_the_fracture_model_trains_on(tmp_path, monkeypatch):
    plain, plain_cfg, train, valid = _training_stream(monkeypatch, tmp_path, [])
    balanced, cfg, _, _ = _training_stream(monkeypatch, tmp_path, ["--balance-positives"])
    assert cfg["train"]["balance_positives"] is True and plain_cfg["train"]["balance_positives"] is False

    before = collections.Counter(plain["train"]["image_label"].to_pylist())
    after = collections.Counter(balanced["train"]["image_label"].to_pylist())
    assert before[1] < before[0] and after == {0: before[0], 1: before[0]}  # positives brought up to negatives
    assert "augment_copy" not in plain["train"].column_names
    rows = balanced["train"].to_pylist()
    copies = [r for r in rows if r["augment_copy"] > 0]  # each copy is augmented afresh by the stream
    assert len(copies) == before[0] - before[1] and all(r["image_label"] == 1 for r in copies)
    assert {r["image_uri"] for r in copies} <= {r["image_uri"] for r in rows if r["augment_copy"] == 0}
    # The copies come from the images that train: the calibration slice (held out of training)
    # and validation keep the real class mix.
    assert set(balanced["train"]["image_uri"].to_pylist()) == set(plain["train"]["image_uri"].to_pylist())
    assert balanced["valid"].equals(plain["valid"]) and balanced["valid"].equals(valid)
    # Class weights follow what the model sees: equal once balanced.
    assert cfg["class_weights"][0] == pytest.approx(cfg["class_weights"][1])
    assert plain_cfg["class_weights"][1] > plain_cfg["class_weights"][0]
