"""The training defaults live in one place (fracray.training.defaults) and are what the job trains
with: `train_all.py` with no arguments gives the router and fracture runs the embedded default's
epochs and batch size, --dataset the real-data ones, --epochs / --train-batch-size win over both,
and --help prints the values that are used."""

from __future__ import annotations

import pytest

from fracray.cli.train_all import build_parser, parse_config
from fracray.data.manifest import make_manifest
from fracray.jobs.train import TrainAllConfig
from fracray.training import orchestrate
from fracray.training.defaults import DATASET_TRAINING_DEFAULTS, EMBEDDED_TRAINING_DEFAULTS
from fracray.training.orchestrate import TrainingSettings, train_models
from fracray.training.config import TrainConfig

# As docs/training.md states them: the embedded default trains up to 10 epochs of batch 8 at Adam
# 1e-3 on the last 60 layers, the router 2 epochs on its last 30; with a dataset, 2 epochs of batch
# 16 at Adam 1e-4, full fine-tuning (the router as many epochs).
EMBEDDED = {"epochs": 10, "batch_size": 8, "lr": 1e-3, "strategy": "last60"}
EMBEDDED_ROUTER = {"epochs": 2, "batch_size": 8, "strategy": "last30"}
DATASET = {"epochs": 2, "batch_size": 16, "lr": 1e-4, "strategy": "full"}
DATASET_ROUTER = {"epochs": 2, "batch_size": 16, "strategy": "full"}
REAL = ["--dataset", "mura", "--data", "/nowhere"]


class _Stop(Exception):
    pass


def _built(settings: TrainingSettings, monkeypatch) -> dict[str, TrainConfig]:
    """The TrainConfig of every run the job's training stage builds (router and per-bone), caught
    before any Ray work."""
    rows = [{"image_uri": f"{part}{i}.png", "dataset": "mura", "split": split, "body_part": part,
             "study_id": f"{part}{i}", "image_label": i % 2}
            for part in ("hand", "wrist") for split in ("train", "valid") for i in range(6)]

    def catch(jobs, settings, log):
        raise _Stop({job["name"]: job["config"] for job in jobs})

    monkeypatch.setattr(orchestrate, "_run_all", catch)
    with pytest.raises(_Stop) as stop:
        train_models(make_manifest(rows), settings, output_uri="/nowhere", dataset="mura", log=lambda *_: None)
    return stop.value.args[0]


def _values(config: TrainConfig, keys) -> dict:
    return {k: getattr(config, k) for k in keys}


def test_no_arguments_train_the_embedded_defaults_epochs_and_batch_size(monkeypatch):
    runs = _built(parse_config([]).training, monkeypatch)
    assert set(runs) == {"router", "fracture_hand", "fracture_wrist"}
    assert _values(runs["router"], EMBEDDED_ROUTER) == EMBEDDED_ROUTER
    for name in ("fracture_hand", "fracture_wrist"):
        assert _values(runs[name], EMBEDDED) == EMBEDDED
    # The library's default job (what `fracray serve` trains when it has no model) is the same.
    assert TrainAllConfig().training == parse_config([]).training
    assert {k: EMBEDDED_TRAINING_DEFAULTS[k] for k in EMBEDDED} == EMBEDDED


def test_a_dataset_trains_the_real_data_defaults_and_a_bare_trainconfig_is_them(monkeypatch):
    runs = _built(parse_config(REAL).training, monkeypatch)
    assert _values(runs["router"], DATASET_ROUTER) == DATASET_ROUTER
    assert _values(runs["fracture_hand"], DATASET) == DATASET
    assert {k: DATASET_TRAINING_DEFAULTS[k] for k in DATASET} == DATASET
    # One place: a TrainConfig or TrainingSettings built without these fields has the same values.
    assert _values(TrainConfig(), DATASET) == DATASET
    assert _values(TrainingSettings().fracture, DATASET) == DATASET
    assert TrainingSettings().router_strategy == DATASET_TRAINING_DEFAULTS["router_strategy"]


def test_epochs_and_batch_size_flags_reach_the_runs(monkeypatch):
    runs = _built(parse_config(["--epochs", "5", "--train-batch-size", "12"]).training, monkeypatch)
    assert (runs["fracture_hand"].epochs, runs["fracture_hand"].batch_size) == (5, 12)
    assert (runs["router"].epochs, runs["router"].batch_size) == (2, 12)  # the router keeps its own epochs
    runs = _built(parse_config(REAL + ["--epochs", "4"]).training, monkeypatch)
    assert runs["fracture_wrist"].epochs == runs["router"].epochs == 4  # with --dataset it follows --epochs
    assert runs["fracture_wrist"].batch_size == 16


def test_help_prints_the_defaults_that_are_used():
    text = " ".join(build_parser().format_help().split())
    embedded, real = parse_config([]).training, parse_config(REAL).training
    assert (f"epochs (default: {embedded.fracture.epochs} on the embedded synthetic default, "
            f"{real.fracture.epochs} with --dataset)") in text
    assert (f"images per training batch (default: {embedded.fracture.batch_size} on the embedded synthetic "
            f"default, {real.fracture.batch_size} with --dataset)") in text
    assert f"epochs of the bone-type router (default: {embedded.router_epochs} on the embedded" in text
