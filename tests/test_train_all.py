"""train_all end to end on its embedded default (the README's first command): router + per-bone
models with Ray Train, evaluation of the composed graph, report, plots, model index, and a
report that shows the system learning; then evaluate.py and the shared predictor on the result."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import joining_session_ray, REPO


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train-all")
    # The embedded default exactly as the README runs it. (--compare-backbones is followed on the
    # two-node cluster's small run in test_cluster.py: here its two runs on every part's images
    # cost more than the router and the seven fracture models together.)
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "train_all.py"), "--output", str(out / "run")],
        capture_output=True, text=True, timeout=2400, cwd=out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out / "run", proc.stdout, proc.stderr


@pytest.mark.slow
def test_train_all_trains_router_and_per_bone_models_and_reports(trained):
    run, stdout, stderr = trained
    index = json.loads((run / "model_index.json").read_text())
    assert index["format"] == "fracray-model-index/1"
    parts = ["elbow", "finger", "forearm", "hand", "humerus", "shoulder", "wrist"]
    assert sorted(index["classifiers"]) == parts and index["router"]
    for uri in [index["router"], *index["classifiers"].values()]:
        assert uri.startswith("models/"), uri  # relative to the index: the run folder can be moved whole
        meta = json.loads((run / uri / "bundle.json").read_text())
        assert meta["format"] == "fracray-bundle/1" and meta["preprocess"]["image_size"] == [224, 224]
        assert meta["training"]["history"] and meta["intended_use"]
    router_meta = json.loads((run / index["router"] / "bundle.json").read_text())
    assert router_meta["task"] == "body_part" and router_meta["classes"] == parts
    # The embedded default's own training (EMBEDDED_TRAINING_DEFAULTS), as the bundles record it,
    # and --router-epochs followed to the router's history.
    router_config = router_meta["training"]["config"]
    assert (router_config["strategy"], router_config["epochs"], router_config["lr"]) == ("last30", 2, 1e-3)
    assert len(router_meta["training"]["history"]) == 2
    for part in parts:
        config = json.loads((run / index["classifiers"][part] / "bundle.json").read_text())["training"]["config"]
        assert (config["strategy"], config["epochs"], config["batch_size"], config["lr"]) == ("last60", 10, 8, 1e-3)
        # Two runs at once share the 2 CPUs (training.orchestrate.worker_cpu_share): what each worker reserved.
        assert (config["cpus_per_worker"], config["cpu_threads"]) == (0.5, 1), config
    # The console shows the product's progress (one line per epoch of each model, from the
    # workers through the progress board), not Ray's own logs (they stay in the session's files).
    console = stdout + stderr
    assert "Training 8 models, 2 at a time on this cluster (2 CPUs, 0 GPUs)" in console, console[-3000:]
    assert "[router] epoch 2/2: train loss" in console, console[-3000:]
    for part in parts:
        assert f"[fracture_{part}] epoch 1/10: train loss" in console, console[-3000:]
    assert "Ray's own logs:" in console
    for noise in ("(TrainController pid=", "(RayTrainWorker pid=", "SplitCoordinator", "streaming_executor",
                  "DeprecationWarning"):
        assert noise not in console, noise
    report = json.loads((run / "report.json").read_text())
    per_part = report["evaluation"]["per_body_part"]
    assert set(per_part) == set(parts)
    for m in per_part.values():
        assert {"tp", "fn", "fp", "tn", "accuracy", "precision", "sensitivity", "f1", "auroc", "study_kappa"} <= set(m)
    assert report["evaluation"]["scored"] + sum(report["evaluation"]["rejected"].values()) == \
        report["evaluation"]["images"]
    # The first run shows the system learning (issue targets; measured over seeds 0-2 in the README).
    assert report["evaluation"]["router_accuracy"] >= 0.9, report["evaluation"]["router_accuracy"]
    assert report["evaluation"]["overall"]["auroc"] >= 0.85, report["evaluation"]["overall"]
    for name in ("router", *(f"fracture_{p}" for p in parts)):
        assert report["models"][name]["seconds"] > 0 and report["models"][name]["size"]["weights_mb"] > 1
        assert report["models"][name]["calibration"]["temperature"] > 0
    for png in ("training_curves.png", "confusion_matrices.png", "calibration.png"):
        with Image.open(run / png) as img:
            assert img.size[0] > 300
    assert "| body part | TP | FN | FP | TN |" in (run / "report.md").read_text()
    assert not report.get("comparison") and not (run / "backbone_comparison.png").exists()
    assert "Model index for serving and scoring" in stdout


@pytest.mark.slow
def test_evaluate_command_and_predictor_on_the_trained_models(trained, ray_local):
    run, _, _ = trained
    # On the session's Ray, as on a cluster (the embedded default above started a Ray of its own).
    env = joining_session_ray(ray_local)
    out = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "evaluate.py"), "--models", str(run / "model_index.json"),
         "--dataset", "mura", "--data", str(run / "synthetic-mura"), "--split", "all", "--output", str(run / "ev")],
        capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["images"] == summary["scored"] > 0 and summary["overall"]["n"] == summary["labelled"]
    assert (run / "ev" / "predictions.parquet").exists() and (run / "ev" / "confusion_matrices.png").exists()

    from fracray.inference.predictor import FracturePredictor

    predictor = FracturePredictor(str(run / "model_index.json"))
    good = next((run / "synthetic-mura").rglob("image1.png")).read_bytes()
    results = predictor.predict_bytes([good, b"", b"GIF89a-not-really", good], body_parts=[None, None, None, "wrist"])
    assert results[0]["status"] == "ok" and results[0]["body_part"] in ("elbow", "finger", "forearm", "hand", "humerus",
                                                                         "shoulder", "wrist")
    assert 0 <= results[0]["fracture_probability"] <= 1 and results[0]["label"] in (0, 1)
    assert results[0]["body_part_probability"] is not None
    assert results[1]["status"] == "empty_file" and results[2]["status"] in ("corrupt", "not_an_image")
    assert results[3]["body_part"] == "wrist" and results[3]["body_part_probability"] is None
    with pytest.raises(KeyError):
        predictor.predict_bytes([good], body_parts=["skull"])
