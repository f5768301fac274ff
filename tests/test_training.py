"""Bundles, and Ray Train fine-tuning for real (local Ray, CPU workers), including recovery
from a training worker killed mid-run."""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from fracray.data import adapters
from fracray.data.manifest import filter_rows
from fracray.artifacts.bundle import BundleMeta, load_bundle, read_bundle_meta, save_bundle
from fracray.models.registry import create_model
from fracray.training.config import TrainConfig
from fracray.training.trainer import train_classifier


def test_bundle_round_trip_without_pickle(tmp_path):
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", num_classes=2, head="dense3", strategy="last20_bn_frozen").eval()
    meta = BundleMeta(task="fracture", model={}, preprocess=model.preprocess_config().to_dict(),
                      classes=["normal", "abnormal"], threshold=0.37, metrics={"valid": {"auroc": 0.9}})
    save_bundle(str(tmp_path / "b"), model, meta)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["bundle.json", "model.safetensors"]
    loaded, meta2 = load_bundle(str(tmp_path / "b"))
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(loaded(x), model(x))
    assert meta2.threshold == 0.37 and meta2.model["head"] == "dense3" and meta2.intended_use
    assert meta2.preprocess_config() == model.preprocess_config()
    assert meta2.code_version.startswith("fracray ")
    raw = json.loads((tmp_path / "b" / "bundle.json").read_text())
    raw["format"] = "something-else"
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="unsupported bundle format"):
        read_bundle_meta(str(tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match="No model bundle"):
        read_bundle_meta(str(tmp_path / "nothing"))


def test_train_step_trains_exactly_the_trainable_layers():
    from fracray.imaging.preprocess import finalize
    from fracray.training.step import TrainStep, model_input, place_model

    torch.manual_seed(0)
    device = torch.device("cpu")
    model = place_model(create_model("efficientnet_lite0", pretrained=False, strategy="classifier_only"), device)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    step = TrainStep(model, optimizer, device=device, precision="float32")
    assert step.amp is False and step.precision == "float32"  # bf16 on CPUs: tests/test_detection.py
    cfg = model.preprocess_config()
    images = np.random.default_rng(0).random((4, 1, *cfg.image_size), dtype=np.float32).astype(np.float16)
    x = model_input(images, cfg, device)
    assert x.shape == (4, 3, *cfg.image_size) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), finalize(images, cfg), rtol=1e-6, atol=1e-6)
    y = torch.tensor([0, 1, 0, 1])
    def eval_loss():  # without dropout's noise
        model.eval()
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        model.train()
        return float(loss)

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start_loss = eval_loss()
    losses = [float(step(x, y)) for _ in range(10)]
    assert all(np.isfinite(losses)) and eval_loss() < start_loss  # it fits a fixed batch
    after = model.state_dict()
    changed = {k for k in before if k.endswith(("weight", "bias")) and not torch.equal(before[k], after[k])}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable and trainable and all("classifier" in k or "head" in k for k in trainable)


def test_training_benchmark_runs_both_sides_with_the_same_step(ray_local, tmp_path):
    from fracray import storage
    from fracray.benchmarks.training import measure
    from fracray.data.synthetic import generate_fracatlas

    generate_fracatlas(str(tmp_path), n_images=8, seed=3, large_images=False)
    uris = storage.list_files(str(tmp_path / "FracAtlas" / "images"))
    lines = []
    row = measure("efficientnet_lite0", uris, batch_size=2, steps=2, repeats=2, device=torch.device("cpu"),
                  image_size=96, head="detector", log=lines.append)
    from fracray.training.precision import resolve_training_precision

    assert len(lines) == 2 and row["precision"] == resolve_training_precision("auto", "cpu") and row["repeats"] == 2
    assert row["float32_nchw_images_per_s"] > 0 and row["default_images_per_s"] > 0 and row["pipeline_images_per_s"] > 0
    assert row["default_speedup"] == pytest.approx(row["default_images_per_s"] / row["float32_nchw_images_per_s"])
    assert row["pipeline_speedup"] == pytest.approx(row["pipeline_images_per_s"] / row["float32_nchw_images_per_s"])
    assert row["image_size"] == 96 and row["head"] == "detector"
    lo, hi = row["pipeline_speedup_range"]
    assert lo <= hi and row["ratio_min"] <= row["ratio_max"]


@pytest.fixture(scope="module")
def small_mura(tmp_path_factory):
    from fracray.data.synthetic import generate_mura

    root = tmp_path_factory.mktemp("train-mura")
    # Two validation patients per part, one of them fractured: both classes in each split (one
    # validation patient per part would round its positives to none).
    generate_mura(str(root), patients_per_part=4, seed=21, max_side=192, valid_fraction=0.5)
    manifest = adapters.index_mura(str(root)).manifest
    return filter_rows(manifest, split="train"), filter_rows(manifest, split="valid")


def test_cpu_threads_share_the_cluster_among_concurrent_workers(ray_local):
    from fracray.training.orchestrate import TrainingSettings, cpu_threads_per_worker

    assert cpu_threads_per_worker(TrainingSettings(), concurrent_runs=1) == 2  # ray_local: 2 CPUs
    assert cpu_threads_per_worker(TrainingSettings(), concurrent_runs=2) == 1
    assert cpu_threads_per_worker(TrainingSettings(fracture=TrainConfig(num_workers=2)), concurrent_runs=4) == 1
    assert cpu_threads_per_worker(TrainingSettings(cpu_threads=3), concurrent_runs=2) == 3
    assert cpu_threads_per_worker(TrainingSettings(fracture=TrainConfig(use_gpu=True)), concurrent_runs=1) is None
    with pytest.raises(ValueError, match="cpu_threads"):
        TrainingSettings(cpu_threads=0)


def test_a_small_cpu_cluster_trains_two_runs_at_once_sharing_its_cpus(ray_local):
    """On 2 CPUs a run's whole-CPU needs (a worker + one for its data stream) fit once; two runs
    share them instead, each worker reserving half a CPU so one stays free for the data streams;
    --max-concurrent 1 (TrainingSettings.max_concurrent) restores one at a time."""
    from fracray.training.orchestrate import TrainingSettings, max_concurrent_runs, worker_cpu_share

    settings = TrainingSettings()
    assert max_concurrent_runs(settings, requested=8) == 2
    assert max_concurrent_runs(settings, requested=1) == 1
    assert worker_cpu_share(settings, 2) == 0.5 and worker_cpu_share(settings, 1) is None
    ddp = TrainingSettings(fracture=TrainConfig(num_workers=2))
    assert max_concurrent_runs(ddp, requested=8) == 2 and worker_cpu_share(ddp, 2) == 0.25
    one = TrainingSettings(max_concurrent=1)
    assert max_concurrent_runs(one, requested=8) == 1 and worker_cpu_share(one, 1) is None
    gpu = TrainingSettings(fracture=TrainConfig(use_gpu=True))
    assert worker_cpu_share(gpu, 2) is None


@pytest.mark.slow
def test_killed_training_worker_resumes_and_writes_a_usable_bundle(ray_local, small_mura, tmp_path):
    """A real SIGKILL of the Ray Train worker process after its first checkpoint: the run
    restarts the worker group, resumes at epoch 1 from that checkpoint, finishes, and writes a
    bundle that carries its calibration, operating points and metrics (one run checks both)."""
    train, valid = small_mura
    progress = tmp_path / "progress.jsonl"
    config = TrainConfig(model="efficientnet_lite0", epochs=3, batch_size=16, max_failures=1,
                         early_stopping_patience=10, cpu_threads=2, progress_file=str(progress))
    outcome = {}

    def run():
        try:
            outcome["result"] = train_classifier(config, train, valid, output_uri=str(tmp_path), name="ft")
        except BaseException as exc:  # surfaced by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    checkpoints = tmp_path / "ray_train" / "ft"
    deadline = time.time() + 400
    victim = None
    while time.time() < deadline and victim is None:
        events = [json.loads(line) for line in progress.read_text().splitlines()] if progress.exists() else []
        done = [e for e in events if e["event"] == "epoch_end" and e["epoch"] == 0]
        if done and list(checkpoints.glob("checkpoint_*")):
            time.sleep(2)  # let the report register the checkpoint
            victim = done[0]["pid"]
        time.sleep(0.5)
    assert victim, "the first epoch never finished"
    ended = max(e["epoch"] for e in (json.loads(line) for line in progress.read_text().splitlines())
                if e["event"] == "epoch_end")
    os.kill(victim, signal.SIGKILL)
    thread.join(600)
    assert "error" not in outcome, outcome.get("error")
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 2 and starts[0]["pid"] == victim and starts[1]["pid"] != victim
    # Resumed after the last checkpointed epoch (the last one ended, or the one before if its
    # checkpoint was still being registered at the kill), not from scratch.
    assert 1 <= starts[1]["epoch"] in (ended, ended + 1), (starts, ended)
    result = outcome["result"]
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    # Ray would give a 1-CPU worker one thread; cpu_threads lets it use the idle core too.
    assert starts[0]["threads"] == starts[1]["threads"] == min(2, len(os.sched_getaffinity(0)))
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    meta = read_bundle_meta(result.bundle_uri)
    # A calibration slice of the training studies (default 10 %) is held out of training when it has both classes.
    assert meta.data["train_images"] + meta.data["calibration_images"] == train.num_rows
    assert sum(h["train_images"] for h in result.history) == 3 * meta.data["train_images"]
    assert meta.calibration["fitted_on"] == ("calibration_slice" if meta.data["calibration_images"] else "valid")
    valid_metrics = meta.metrics["valid"]
    assert valid_metrics["n"] == valid.num_rows
    assert {"tp", "fn", "fp", "tn", "auroc", "sensitivity", "specificity", "f1"} <= set(valid_metrics)
    assert "kappa" in meta.metrics["valid_study"]
    assert 0.0 <= meta.threshold <= 1.0 and meta.threshold_rule == "youden"
    # Calibrated on the calibration slice (or validation without one); the operating points were
    # chosen there on the calibrated probabilities and their figures measured on validation.
    assert meta.temperature > 0 and meta.calibration["temperature"] == meta.temperature
    # Temperature scaling minimises the NLL on the set it is fitted on (ECE may move either way
    # by a bin's worth on a few dozen images): the NLL is what it guarantees.
    assert meta.calibration["nll_after"] <= meta.calibration["nll_before"] + 1e-6
    assert meta.calibration["valid"]["n"] == valid.num_rows
    assert meta.operating_points["youden"]["threshold"] == pytest.approx(meta.threshold)
    sens95 = meta.operating_points["sensitivity>=0.95"]
    assert (sens95["chosen_on"] if meta.data["calibration_images"] else sens95)["sensitivity"] >= 0.95
    assert {"high_sensitivity", "high_specificity"} <= set(meta.operating_points)
    assert meta.preprocess["image_size"] == [224, 224] and meta.model["name"] == "efficientnet_lite0"
    assert meta.model["weights"].startswith("imagenet")
    model, _ = load_bundle(result.bundle_uri)
    probs = model.predict_proba(torch.zeros(1, 3, 224, 224))
    assert probs.shape == (1, 2)


@pytest.mark.slow
def test_ddp_over_two_cpu_workers_with_checkpoints_and_bundle_in_s3(ray_local, small_mura, s3_bucket, tmp_path):
    """Two Ray Train workers (DDP with gloo), each reading its own shard; validation
    predictions are gathered from both before metrics are computed. The run's checkpoints and
    its bundle go to S3 (the local S3 server) and the bundle loads back from there."""
    from fracray.storage import StorageOptions

    client, bucket, endpoint = s3_bucket
    train, valid = small_mura
    options = StorageOptions(endpoint_url=endpoint)
    progress = tmp_path / "progress.jsonl"
    # Half a CPU each leaves a CPU for the Ray Data tasks that feed them on a 2-CPU machine.
    config = TrainConfig(model="efficientnet_lite0", epochs=1, batch_size=8, num_workers=2, cpus_per_worker=0.5,
                         image_size=64, progress_file=str(progress))
    result = train_classifier(config, train, valid, output_uri=f"s3://{bucket}/runs/r1", name="fracture_all",
                              storage_options=options)
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    assert {e["rank"] for e in events} == {0, 1}
    assert len({e["pid"] for e in events}) == 2
    # Each worker trained on its shard; together they covered the training set once.
    assert result.history[0]["train_images"] * 2 >= train.num_rows - 1
    assert result.bundle_uri == f"s3://{bucket}/runs/r1/fracture_all"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/r1/")["Contents"]}
    assert {"runs/r1/fracture_all/model.safetensors", "runs/r1/fracture_all/bundle.json"} <= keys
    assert any(k.startswith("runs/r1/ray_train/fracture_all/checkpoint_") for k in keys)
    model, meta = load_bundle(result.bundle_uri, options)
    assert meta.metrics["valid"]["n"] == valid.num_rows


def test_training_benchmark_refuses_empty_measurements(capsys):
    from fracray.benchmarks.training import main

    for bad in (["--repeats", "0"], ["--image-size", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "--repeats and --image-size must be >= 1" in err and " 0" in err
