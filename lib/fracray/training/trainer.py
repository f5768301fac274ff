"""One classifier trained end to end: the manifest held out for calibration, the Ray Data streams,
a Ray Train run of the worker loop (``loop.py``: DDP over N workers, GPUs when asked; checkpoints
every epoch, a killed worker restarts the group from the last one), then, driver-side, the best
epoch's model calibrated (temperature, a detector's fusion and box scores), its operating points
chosen and measured on validation, and the self-describing bundle written (``artifacts/bundle.py``).
Its options: ``config.py``; its losses: ``losses.py``; its predictions over a manifest: ``predict.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from .. import storage
from ..artifacts.bundle import BundleMeta, save_bundle
from ..data.manifest import split_by_study
from ..data.pipeline import StreamConfig, balance_positives, build_image_dataset
from ..imaging.findings import FindingsConfig, localization_metrics
from ..imaging.preprocess import AugmentConfig
from ..metrics import classification as M
from ..metrics.calibration import (calibrate, expected_calibration_error, operating_points, reliability_bins,
                                   softmax)
from ..metrics.fusion import (fit_box_calibration, fit_fusion, fracture_ece, fused_probability, fusion_ablation,
                              top_scores)
from ..metrics.study import study_level
from ..storage import StorageOptions
from .config import TrainConfig
from .loop import train_loop_per_worker
from .predict import predict_manifest

__all__ = ["TrainResult", "train_classifier"]


@dataclasses.dataclass
class TrainResult:
    bundle_uri: str
    meta: BundleMeta
    history: list[dict[str, Any]]
    seconds: float
    valid_predictions: dict[str, list]


def _class_weights(labels: list[int], n_classes: int) -> list[float]:
    """Inverse-frequency weights normalised to mean 1 (absent classes get weight 1)."""
    counts = Counter(labels)
    raw = [len(labels) / (n_classes * counts[c]) if counts.get(c) else 1.0 for c in range(n_classes)]
    mean = sum(raw) / n_classes
    return [w / mean for w in raw]


def _manifest_labels(manifest: pa.Table, config: TrainConfig) -> list[int]:
    """The class index of every image of ``manifest`` that has one."""
    labels = config.labels(manifest["image_label"].to_pylist(), manifest["body_part"].to_pylist())
    return [int(v) for v in labels if v >= 0]


def train_classifier(config: TrainConfig, train: pa.Table, valid: pa.Table, *, output_uri: str, name: str,
                     storage_options: StorageOptions | None = None, data_info: dict | None = None,
                     run_config: dict | None = None, log=print) -> TrainResult:
    """Train one classifier with Ray Train and write its bundle to ``output_uri/name``.

    ``run_config``: the whole job's resolved settings, recorded in the bundle beside this
    model's own :class:`TrainConfig` so a bundle tells everything it was trained with."""
    import ray.train
    from ray.train.torch import TorchTrainer

    started = time.time()
    if train.num_rows == 0 or valid.num_rows == 0:
        raise ValueError(f"{name}: needs training and validation images (got {train.num_rows} and {valid.num_rows})")
    if config.localization:
        # A localisation head learns only where the data says where fractures are (MURA's layout gives
        # image labels only): refuse rather than train a head that only ever learned "nothing here".
        boxes = train["boxes"].to_pylist() if "boxes" in train.column_names else [None] * train.num_rows
        outlines = (train["outlines"].to_pylist() if "outlines" in train.column_names and
                    config.localization_head == "map" else [None] * train.num_rows)
        if not any(b or o for b, o in zip(boxes, outlines)):
            what = "boxes" if config.localization_head == "detector" else "boxes or outlines"
            raise ValueError(f"{name}: --localization ({config.localization_head}) trains from fracture {what}, and none "
                             f"of the {train.num_rows} training images has any (MURA's layout gives image labels "
                             f"only): train without --localization, or index a dataset with boxes (FracAtlas)")
    preprocess = config.preprocess()
    calibration_set = None
    if config.calibration_fraction > 0:
        fit, calibration_set = split_by_study(train, config.calibration_fraction, seed=config.seed)
        # A calibration slice needs both classes (and the training part some images) to be of use.
        if fit.num_rows and len(set(_manifest_labels(calibration_set, config))) >= 2:
            train = fit
        else:
            calibration_set = None
    positive_copies = 0
    if config.balance_positives:  # after the calibration slice is held out: it keeps the real class mix
        balanced = balance_positives(train, seed=config.seed)
        positive_copies, train = balanced.num_rows - train.num_rows, balanced
    # Train in a seeded random order: a manifest lists its images grouped (MURA: by body part, then
    # patient and study), and a stream in that order would feed the router one body part per batch.
    train = train.take(np.random.default_rng(config.seed).permutation(train.num_rows))
    labels = _manifest_labels(train, config)
    counts = Counter(labels)
    negative_keep = 1.0
    if config.negatives_per_positive and config.task == "fracture" and counts.get(0) and counts.get(1):
        negative_keep = min(1.0, config.negatives_per_positive * counts[1] / counts[0])
        # Class weights follow the distribution the model actually sees per epoch.
        labels = [1] * counts[1] + [0] * max(1, round(counts[0] * negative_keep))
    weights = _class_weights(labels, len(config.classes))
    detector = config.localization and config.localization_head == "detector"
    augment = (AugmentConfig.robust() if config.robust_augment else AugmentConfig()) if config.augment else None
    stream_train = StreamConfig(batch_size=config.batch_size, augment=augment, seed=None,
                                masks=config.localization and not detector, boxes=detector)
    datasets = {
        "train": build_image_dataset(train, preprocess, storage_options=storage_options, stream=stream_train),
        "valid": build_image_dataset(valid, preprocess, storage_options=storage_options,
                                     stream=StreamConfig(batch_size=config.batch_size, boxes=detector)),
    }
    for ds in datasets.values():
        # Ray Train reports per-epoch metrics; per-epoch data progress bars from every run would drown them.
        ds.context.enable_progress_bars = False
    options = (storage_options or StorageOptions()).resolved()
    run_root = storage.join(output_uri, "ray_train")
    fs, path = storage.resolve(run_root, options)
    if not storage.is_remote(run_root):
        os.makedirs(path, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": config.to_dict(), "preprocess": preprocess.to_dict(), "class_weights": weights,
                           "name": name, "negative_keep": negative_keep},
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                               resources_per_worker={"CPU": config.cpus_per_worker}),
        datasets=datasets,
        # One worker needs no split: it reads the streams itself. A split puts a Ray Data coordinator
        # actor (a process of its own, importing the pipeline) per stream and run between them.
        dataset_config=ray.train.DataConfig(datasets_to_split="all" if config.num_workers > 1 else []),
        run_config=ray.train.RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_selection",
                                                         checkpoint_score_order="max"),
        ),
    )
    log(f"[{name}] training {config.model} ({config.strategy}) on {train.num_rows} images, "
        f"validating on {valid.num_rows}, {config.num_workers} worker(s){' with GPU' if config.use_gpu else ''}")
    result = trainer.fit()
    latest = result.checkpoint
    best = result.get_best_checkpoint("val_selection", "max") if result.best_checkpoints else latest
    if best is None:
        raise RuntimeError(f"{name}: training produced no checkpoint")
    from safetensors.torch import load_file

    from ..models.registry import create_model

    with best.as_directory() as ckpt_dir:
        state = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    # The best weights may be from an earlier epoch; the latest checkpoint holds the whole history.
    with latest.as_directory() as latest_dir, open(os.path.join(latest_dir, "history.json")) as f:
        history = json.load(f)["history"]
    model = create_model(config.model, pretrained=False, num_classes=len(config.classes), strategy=config.strategy,
                         head=config.head, bam=config.bam, localization=config.localization,
                         localization_head=config.localization_head)
    model.load_state_dict(state)
    model.weights = "imagenet" if config.pretrained is True else str(config.pretrained or "random")
    model.eval()

    # Calibration, thresholds and operating points on the calibration slice (or, without one, on
    # validation); every reported figure on the validation split.
    predict = lambda table: predict_manifest(model, table, preprocess, storage_options=storage_options,  # noqa: E731
                                             batch_size=config.batch_size, tta_flip=config.tta_flip)
    preds = predict(valid)
    cal_preds = predict(calibration_set) if calibration_set is not None else preds
    logits = np.asarray(preds["logits"], dtype=np.float64).reshape(-1, len(config.classes))
    cal_logits = np.asarray(cal_preds["logits"], dtype=np.float64).reshape(-1, len(config.classes))
    y, cal_y = (config.labels(p["image_label"], p["body_part"]) for p in (preds, cal_preds))
    keep, cal_keep = y >= 0, cal_y >= 0
    calibration = calibrate(cal_logits[cal_keep], cal_y[cal_keep])
    temperature = calibration["temperature"]
    probs, cal_probs = softmax(logits, temperature), softmax(cal_logits, temperature)
    fusion = box_calibration = None
    if detector:
        # P(fracture) from the classifier and the top detection together (a logistic fit on the
        # calibration slice), and each box's score as P(a fracture there, IoU >= 0.3).
        top, cal_top = top_scores(preds), top_scores(cal_preds)
        fusion = fit_fusion(cal_logits[cal_keep], cal_top[cal_keep], cal_y[cal_keep])
        if fusion is not None:
            p_valid = fused_probability(fusion, logits, top)
            p_cal = fused_probability(fusion, cal_logits, cal_top)
            probs, cal_probs = np.stack([1 - p_valid, p_valid], 1), np.stack([1 - p_cal, p_cal], 1)
        box_calibration = fit_box_calibration(cal_preds, calibration_set if calibration_set is not None else valid,
                                              preprocess)
    calibration["fitted_on"] = "calibration_slice" if calibration_set is not None else "valid"
    calibration["valid"] = {
        "n": int(keep.sum()),
        "ece_before": expected_calibration_error(softmax(logits[keep]), y[keep]),
        "ece_after": expected_calibration_error(probs[keep], y[keep]),
        "reliability_before": reliability_bins(softmax(logits[keep]), y[keep]),
        "reliability_after": reliability_bins(probs[keep], y[keep])}
    if config.task == "fracture":
        p, cal_p = probs[:, 1], cal_probs[:, 1]
        threshold = M.choose_threshold(cal_y, cal_p, target=config.threshold_target, value=config.threshold_value)
        metrics = {"valid": M.binary_metrics(y, p, threshold),
                   "valid_study": study_level(preds["study_id"], y, p, threshold),
                   "valid_operating_points": [M.sensitivity_at_specificity(y, p, s) for s in (0.8, 0.9, 0.95)]}
        rule = config.threshold_target + (f">={config.threshold_value}" if config.threshold_value else "")
        points = operating_points(cal_y, cal_p, evaluate=(y, p))
        if config.localization:
            metrics["valid_localization"] = localization_metrics(preds, valid, preprocess,
                                                                 box_calibration=box_calibration)
        if detector:
            metrics["valid_ablation"] = fusion_ablation(y, logits, temperature, top, p)
        metrics["valid_fracture_ece"] = fracture_ece(y[keep], p[keep])
    else:
        threshold, rule, points = 0.0, "argmax", {}
        metrics = {"valid": M.multiclass_metrics(y[keep], probs[keep], config.classes)}
    metrics["rejected"] = preds["rejected"]
    seconds = time.time() - started
    meta = BundleMeta(task=config.task, model={}, preprocess=preprocess.to_dict(), classes=list(config.classes),
                      threshold=threshold, threshold_rule=rule, operating_points=points, temperature=temperature,
                      calibration=calibration, metrics=metrics,
                      data=dict(data_info or {}, train_images=train.num_rows, valid_images=valid.num_rows,
                                calibration_images=calibration_set.num_rows if calibration_set is not None else 0,
                                localization=_annotated(train) if config.localization else None),
                      training={"config": config.to_dict(), "run": run_config or {}, "epochs_run": len(history),
                                "seconds": round(seconds, 1), "history": history,
                                "negative_keep": negative_keep, "positive_copies": positive_copies},
                      inference={"tta_flip": config.tta_flip,
                                 "findings": dataclasses.asdict(FindingsConfig()) if config.localization else None,
                                 "fusion": fusion, "box_calibration": box_calibration})
    bundle_uri = save_bundle(storage.join(output_uri, name), model, meta, storage_options)
    valid_predictions = {k: preds[k] for k in ("image_uri", "study_id", "image_label", "body_part")}
    valid_predictions["probs"] = probs.tolist()
    return TrainResult(bundle_uri, meta, history, seconds, valid_predictions)


def _annotated(table: pa.Table) -> dict[str, int]:
    """What localisation data the model was trained with: images with outlines, with boxes only."""
    outlines = table["outlines"].to_pylist() if "outlines" in table.column_names else [None] * table.num_rows
    boxes = table["boxes"].to_pylist() if "boxes" in table.column_names else [None] * table.num_rows
    labels = table["image_label"].to_pylist()
    return {"images_with_outlines": sum(1 for o in outlines if o),
            "images_with_boxes_only": sum(1 for o, b in zip(outlines, boxes) if b and not o),
            "positives_without_regions": sum(1 for o, b, y in zip(outlines, boxes, labels) if y == 1 and not o and not b)}
