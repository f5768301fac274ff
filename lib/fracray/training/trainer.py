"""Fine-tuning one classifier with Ray Train, fed by the Ray Data pipeline.

TorchTrainer runs ``train_loop_per_worker`` on N workers (DDP; GPUs when asked,
else CPUs). Each worker reads its shard of the preprocessed stream, finalises the
compact images on its device, and trains with Adam (1e-4 by default), a cosine
schedule, class-weighted cross-entropy or focal loss, AMP + channels_last on GPU.
Every epoch it validates, reports metrics to Ray and saves a checkpoint; it stops
early when the validation score stops improving. With ``max_failures`` > 0 a
killed worker restarts the group from the last checkpoint.

The result is a self-describing bundle (see ``artifacts/bundle.py``) with the operating
threshold chosen on validation data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from .. import storage
from ..artifacts.bundle import BundleMeta, save_bundle
from ..data.manifest import split_by_study
from ..data.pipeline import OK, StreamConfig, StreamTally, balance_positives, build_image_dataset, iter_model_batches
from ..imaging.findings import FindingsConfig, localization_metrics
from ..imaging.preprocess import AugmentConfig, PreprocessConfig, finalize, to_tensor
from ..imaging.regions import Finding, average_precision
from ..metrics import classification as M
from ..metrics.calibration import (calibrate, expected_calibration_error, operating_points, reliability_bins,
                                   softmax)
from ..metrics.fusion import (fit_box_calibration, fit_fusion, fracture_ece, fused_probability, fusion_ablation,
                              top_scores)
from ..metrics.study import study_level
from ..models.detection import decode_dense, dense_detections, detection_loss
from ..storage import StorageOptions
from .defaults import DATASET_TRAINING_DEFAULTS
from .precision import PRECISIONS
from .progress import post_progress
from .step import TrainStep, model_input, place_model

__all__ = ["TrainConfig", "TrainResult", "train_classifier", "predict_manifest", "make_loss"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One classifier's training run.

    task: "fracture" (binary, label = image_label) or "body_part" (label = the index
        of body_part in ``classes``: the router).
    threshold_target / threshold_value: operating point chosen on validation data
        ("youden", or "sensitivity"/"specificity" with a value such as 0.9).
    progress_file: a local file each worker appends JSON lines to (rank, pid, epoch):
        a heartbeat for monitoring, and how the fault-tolerance test finds a worker.
    cpu_threads: intra-op threads of a CPU training worker. None keeps Ray's default
        (one per reserved CPU). The data stream's reserved CPU is mostly idle when images
        are small, so train_all lets the workers' threads use the cores that would idle.
    """

    model: str = "efficientnet_lite0"
    pretrained: bool | str = True
    # epochs, batch_size, lr, strategy: the real-data defaults (training.defaults), the one place they live.
    strategy: str = DATASET_TRAINING_DEFAULTS["strategy"]
    head: str = "linear"
    bam: bool = False
    task: str = "fracture"
    classes: tuple[str, ...] = ("normal", "abnormal")
    epochs: int = DATASET_TRAINING_DEFAULTS["epochs"]
    batch_size: int = DATASET_TRAINING_DEFAULTS["batch_size"]
    lr: float = DATASET_TRAINING_DEFAULTS["lr"]
    weight_decay: float = 0.0
    loss: str = "weighted_ce"
    focal_gamma: float = 2.0
    lr_schedule: str = "cosine"
    early_stopping_patience: int = 3
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    amp: bool = True
    # Training precision (training.precision): auto = float16 on CUDA, bf16 on a CPU with native
    # bf16 (avx512_bf16 / AMX), else float32; float32 forces full precision anywhere.
    precision: str = "auto"
    augment: bool = True
    # Also train on what archives hold: quarter turns, inverted grey scale, gamma/contrast, JPEG
    # re-compression, downscaling, a canvas with burnt-in text (AugmentConfig.robust).
    robust_augment: bool = False
    # Preprocessing overrides on the model's own data config (resolve_preprocess merges them).
    image_size: int | None = None
    normalization: str | None = None
    enhancement: str = "none"
    sharpen_factor: float = 1.5
    # Localisation: a fracture-map branch trained from masks/boxes where the data has them.
    localization: bool = False
    # "map": the fracture map at stride 16 (region growing gives boxes); "detector": the FCOS-style
    # box detector at stride 8 (models.detection), trained from the release's boxes.
    localization_head: str = "map"
    map_loss_weight: float = 1.0      # weight of the map's or the detector's loss
    map_pos_weight: float = 10.0
    # Per-epoch sampling: every positive and about this many negatives per positive, drawn
    # afresh each epoch (None: every image every epoch).
    negatives_per_positive: float | None = None
    # Class balance by augmenting positives (MURA humerus paper): augmented copies of the fractured
    # training images until they match the others (data.pipeline.balance_positives).
    balance_positives: bool = False
    tta_flip: bool = False
    # Temperature, threshold and operating points are fitted on this share of the training
    # studies (held out of training), so validation figures are measured on images the
    # calibration never saw. 0: fit on the validation split itself (optimistic).
    calibration_fraction: float = 0.1
    threshold_target: str = "youden"
    threshold_value: float | None = None
    max_failures: int = 0
    seed: int = 0
    progress_file: str | None = None
    cpu_threads: int | None = None

    def __post_init__(self):
        if self.task not in ("fracture", "body_part"):
            raise ValueError(f"task must be fracture or body_part. Got {self.task!r}")
        if self.loss not in ("weighted_ce", "ce", "focal"):
            raise ValueError(f"loss must be weighted_ce, ce or focal. Got {self.loss!r}")
        if self.lr_schedule not in ("cosine", "none"):
            raise ValueError(f"lr_schedule must be cosine or none. Got {self.lr_schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ValueError("epochs, batch_size and num_workers must be >= 1")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 (or None for Ray's default). Got {self.cpu_threads}")
        if self.image_size is not None and self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 pixels (or None for the model's own). Got {self.image_size}")
        if not 0.0 <= self.calibration_fraction < 0.5:
            raise ValueError(f"calibration_fraction must be in [0, 0.5). Got {self.calibration_fraction}")
        if self.negatives_per_positive is not None and self.negatives_per_positive <= 0:
            raise ValueError(f"negatives_per_positive must be > 0 (or None for all). Got {self.negatives_per_positive}")
        if self.balance_positives and self.negatives_per_positive is not None:
            raise ValueError("balance_positives (--balance-positives: copies of positives up to the negatives' "
                             "count) and negatives_per_positive (--negatives-per-positive: fewer negatives per epoch) "
                             "are two ways to balance the classes that would undo each other: choose one")
        if self.balance_positives and self.task != "fracture":
            raise ValueError("balance_positives applies to fracture models, not the body-part router")
        if self.batch_size < 2 and (self.head == "dense3" or self.localization):
            raise ValueError(f"head dense3 and the fracture map have BatchNorm layers, which need batches of at least "
                             f"2 images to train. Got batch_size {self.batch_size}")
        if self.localization_head not in ("map", "detector"):
            raise ValueError(f"localization_head must be map or detector. Got {self.localization_head!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}. Got {self.precision!r}")
        if self.localization and self.task != "fracture":
            raise ValueError("localization applies to fracture models, not the body-part router")
        object.__setattr__(self, "classes", tuple(self.classes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def labels(self, image_labels, body_parts) -> np.ndarray:
        """Each image's class index in this run (the one label-to-index map): its image label
        (0 or 1) for a fracture model, the index of its body part in ``classes`` for the router;
        -1 where it has none (unlabelled, or a body part outside ``classes``)."""
        if self.task == "fracture":
            return np.asarray([int(v) if v in (0, 1) else -1 for v in image_labels], dtype=np.int64)
        index = {c: i for i, c in enumerate(self.classes)}
        return np.asarray([index.get(str(p), -1) for p in body_parts], dtype=np.int64)

    def preprocess(self) -> PreprocessConfig:
        """What this run's model sees: the model's data config merged with this run's overrides."""
        from ..models.registry import resolve_preprocess

        return resolve_preprocess(self.model, image_size=self.image_size, normalization=self.normalization,
                                  enhancement=self.enhancement, sharpen_factor=self.sharpen_factor)


@dataclasses.dataclass
class TrainResult:
    bundle_uri: str
    meta: BundleMeta
    history: list[dict[str, Any]]
    seconds: float
    valid_predictions: dict[str, list]


def _usable(batch: dict[str, np.ndarray], tc: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    labels = tc.labels(batch["image_label"], batch["body_part"])
    keep = (batch["status"] == OK) & (labels >= 0)
    return keep, labels


def _focal_loss(logits, target, weight, gamma: float):
    import torch.nn.functional as F

    log_p = F.log_softmax(logits.float(), dim=-1)
    ce = F.nll_loss(log_p, target, weight=weight, reduction="none")
    p_t = log_p.gather(1, target[:, None]).squeeze(1).exp()
    return ((1 - p_t) ** gamma * ce).mean()


def _log_progress(path: str | None, **event) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")


def _train_loop_per_worker(cfg: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch

    tc = TrainConfig(**cfg["train"])
    preprocess = PreprocessConfig.from_dict(cfg["preprocess"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed + rank)
    if device.type == "cpu" and tc.cpu_threads:
        torch.set_num_threads(min(tc.cpu_threads, len(os.sched_getaffinity(0))))

    from ..models.registry import create_model

    model = create_model(tc.model, pretrained=tc.pretrained, num_classes=len(tc.classes), strategy=tc.strategy,
                         head=tc.head, bam=tc.bam, localization=tc.localization,
                         localization_head=tc.localization_head)
    model = place_model(model, device)
    start_epoch, best_score, stale, history = 0, -math.inf, 0, []
    checkpoint = ray.train.get_checkpoint()
    resume_state = None
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            from safetensors.torch import load_file
            model.load_state_dict(load_file(os.path.join(ckpt_dir, "model.safetensors")))
            resume_state = torch.load(os.path.join(ckpt_dir, "train_state.pt"), map_location="cpu", weights_only=True)
            with open(os.path.join(ckpt_dir, "history.json")) as f:
                saved = json.load(f)
        start_epoch, best_score, stale, history = saved["epoch"] + 1, saved["best_score"], saved["stale"], saved["history"]
    model = ray.train.torch.prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=tc.epochs)
                 if tc.lr_schedule == "cosine" else None)
    if resume_state:
        optimizer.load_state_dict(resume_state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume_state["scheduler"])
    step = TrainStep(model, optimizer, device=device, amp=tc.amp, precision=tc.precision,
                     loss_fn=make_loss(tc, cfg["class_weights"], device))
    if resume_state and resume_state.get("scaler"):
        step.scaler.load_state_dict(resume_state["scaler"])
    _log_progress(tc.progress_file, rank=rank, pid=os.getpid(), event="start", epoch=start_epoch,
                  threads=torch.get_num_threads(), precision=step.precision)

    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    binary = tc.task == "fracture"
    detector = tc.localization and tc.localization_head == "detector"
    input_shape = None
    for epoch in range(start_epoch, tc.epochs):
        model.train()
        epoch_start, seen, loss_sum = time.time(), 0, 0.0
        # A fresh order each epoch within a window of rows (train_classifier shuffled the manifest once).
        for batch in train_shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy", prefetch_batches=2,
                                              local_shuffle_buffer_size=4 * tc.batch_size,
                                              local_shuffle_seed=tc.seed * 1009 + epoch * 31 + rank):
            keep, labels = _usable(batch, tc)
            if tc.negatives_per_positive and binary:
                keep &= _epoch_sample(batch["image_uri"], labels, epoch, tc.seed, cfg["negative_keep"])
            # A lone image left over by sampling or rejects cannot train BatchNorm (dense3 head,
            # the map head): skip it rather than fail the run (batch_size 1 is refused up front).
            if keep.sum() < (2 if tc.batch_size > 1 else 1):
                continue
            x = model_input(batch["image"][keep], preprocess, device)
            input_shape = input_shape or list(x.shape[1:])
            y = torch.from_numpy(labels[keep]).to(device)
            if tc.localization:
                known = torch.from_numpy(np.asarray(batch["mask_known"][keep], dtype=bool)).to(device)
                regions = (torch.from_numpy(np.asarray(batch["boxes_px"][keep])).to(device) if detector
                           else to_tensor(batch["mask"][keep]).to(device).float())
                loss = step(x, (y, regions, known), with_map=True)
            else:
                loss = step(x, y)
            seen += len(y)
            loss_sum += float(loss) * len(y)
        if scheduler is not None:
            scheduler.step()
        train_seconds = time.time() - epoch_start

        model.eval()
        probs, ys, studies, boxed = [], [], [], []
        with torch.no_grad():
            for batch in valid_shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy"):
                keep, labels = _usable(batch, tc)
                if not keep.any():
                    continue
                x = model_input(batch["image"][keep], preprocess, device)
                with step.autocast():
                    if detector:
                        logits, dense = model(x, with_map=True)
                        boxed += _validation_detections(dense.float().cpu(), batch["boxes_px"][keep],
                                                        batch["mask_known"][keep])
                    else:
                        logits = model(x)
                    probs.append(logits.float().softmax(-1).cpu().numpy())
                ys.append(labels[keep])
                studies += [str(s) for s in batch["study_id"][keep]]
        local = (np.concatenate(probs) if probs else np.zeros((0, len(tc.classes))),
                 np.concatenate(ys) if ys else np.zeros(0, np.int64), studies, boxed)
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, local)
            local = (np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered]),
                     sum((g[2] for g in gathered), []), sum((g[3] for g in gathered), []))
        v_probs, v_labels, _, v_boxed = local
        if binary:
            val = M.binary_metrics(v_labels, v_probs[:, 1] if len(v_probs) else [], 0.5)
            score = val["auroc"] if val["auroc"] is not None else (val["accuracy"] or 0.0)
            if detector:
                # Early stopping and the kept epoch follow boxes and ranking alike: (AP30 + AUROC) / 2.
                val["ap30"] = average_precision(v_boxed, min_iou=0.3)
                score = (score + (val["ap30"] or 0.0)) / 2
        else:
            val = M.multiclass_metrics(v_labels, v_probs, tc.classes) if len(v_probs) else {"accuracy": None}
            score = val["accuracy"] or 0.0
        improved = score > best_score
        best_score, stale = (score, 0) if improved else (best_score, stale + 1)
        # The kept model is the epoch with the best score, and of epochs with equal scores the one with
        # the lowest validation loss: a small validation set reaches AUROC (or accuracy) 1.0 early, at an
        # epoch whose barely separated probabilities would rank poorly beside other models' (a pooled AUROC).
        val_loss = (float(-np.log(np.clip(v_probs[np.arange(len(v_labels)), v_labels], 1e-7, 1.0)).mean())
                    if len(v_labels) else None)
        selection = float(score) - 1e-6 * min(val_loss if val_loss is not None else 0.0, 10.0)
        record = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_images": seen,
                  "images_per_second": seen * world / max(train_seconds, 1e-9),
                  "lr": optimizer.param_groups[0]["lr"], "val_score": float(score), "val_loss": val_loss,
                  "val_selection": selection,
                  "val_accuracy": val.get("accuracy"), "val_auroc": val.get("auroc"), "val_ap30": val.get("ap30"),
                  "val_sensitivity": val.get("sensitivity"), "val_specificity": val.get("specificity"),
                  "best_score": float(best_score), "input_shape": input_shape,
                  "precision": step.precision}  # what the step really ran at (training.precision)
        history.append(record)
        if rank == 0:
            # One progress line per epoch, through the logging that Ray Train sets up in its workers
            # (forwarded to the driver and the job log). Its patched print() would show it twice.
            # The same line goes to the driver's progress board (its console when Ray's logs are off).
            shown = ("AUROC", val.get("auroc")) if binary else ("accuracy", val.get("accuracy"))
            ap = f", AP30 {val['ap30']:.3f}" if val.get("ap30") is not None else ""
            line = (f"[{cfg['name']}] epoch {epoch + 1}/{tc.epochs}: train loss {record['train_loss']:.4f}, "
                    f"validation {shown[0]} {'n/a' if shown[1] is None else f'{shown[1]:.3f}'}{ap}, "
                    f"{record['images_per_second']:.1f} images/s, {train_seconds:.0f} s")
            logging.getLogger("fracray.train").info(line)
            post_progress(line)
        _log_progress(tc.progress_file, rank=rank, pid=os.getpid(), event="epoch_end", epoch=epoch)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                from safetensors.torch import save_file
                module = getattr(model, "module", model)
                save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                          os.path.join(tmp, "model.safetensors"))
                torch.save({"optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict() if scheduler else {},
                            "scaler": step.scaler.state_dict()},
                           os.path.join(tmp, "train_state.pt"))
                with open(os.path.join(tmp, "history.json"), "w") as f:
                    json.dump({"epoch": epoch, "best_score": best_score, "stale": stale, "history": history,
                               "improved": improved}, f)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({k: v for k, v in record.items() if v is not None}, checkpoint=ckpt)
        if stale >= tc.early_stopping_patience:
            break


def make_loss(tc: TrainConfig, class_weights: list[float], device=None):
    """The training loss of a run: class-weighted cross-entropy (or plain, or focal) on the
    logits; with a fracture map, plus ``map_loss_weight`` x the map loss, and then it takes
    ((logits, maps), (labels, masks, mask_known))."""
    import torch
    import torch.nn.functional as F

    weight = torch.tensor(class_weights, dtype=torch.float32, device=device) if tc.loss != "ce" else None

    def classify(logits, y):
        if tc.loss == "focal":
            return _focal_loss(logits, y, weight, tc.focal_gamma)
        return F.cross_entropy(logits, y, weight=weight)

    if not tc.localization:
        return classify

    if tc.localization_head == "detector":

        def with_boxes(outputs, target):
            (logits, dense), (y, boxes, known) = outputs, target
            return classify(logits, y) + tc.map_loss_weight * detection_loss(dense, boxes, known)

        return with_boxes

    def with_map(outputs, target):
        (logits, maps), (y, mask, known) = outputs, target
        return classify(logits, y) + tc.map_loss_weight * _map_loss(maps, mask, known, tc.map_pos_weight)

    return with_map


def _validation_detections(dense, boxes_px, known) -> list:
    """Per image whose fractures' places are known: (findings in input pixels, true boxes):
    the in-training AP30 that early stopping follows."""

    out = []
    for i in np.flatnonzero(np.asarray(known, dtype=bool)):
        boxes, scores = decode_dense(dense[i], min_score=0.01, max_boxes=5)
        found = [Finding(tuple(float(v) for v in b), float(sc), (0, 0)) for b, sc in zip(boxes.tolist(), scores.tolist())]
        truths = [tuple(float(v) for v in b) for b in np.asarray(boxes_px[i]) if b[2] > b[0] and b[3] > b[1]]
        out.append((found, truths))
    return out


def _map_loss(maps, mask, known, pos_weight: float):
    """Per-cell binary cross-entropy of the fracture map against the mask, on images whose
    fracture regions are known (annotated positives, and negatives: known empty). A cell is
    positive when any part of a fracture falls in it (max-pooled mask)."""
    import torch
    import torch.nn.functional as F

    if not bool(known.any()):
        return maps.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) whole
    target = (F.adaptive_max_pool2d(mask.float(), maps.shape[-2:])[:, 0] > 0.25).float()
    return F.binary_cross_entropy_with_logits(
        maps[known], target[known], pos_weight=torch.tensor(pos_weight, device=maps.device))


def _epoch_sample(uris, labels: np.ndarray, epoch: int, seed: int, negative_keep: float) -> np.ndarray:
    """Which rows train this epoch: every positive, and each negative with probability
    ``negative_keep``, drawn per (seed, epoch, image) so workers agree and epochs differ."""
    import hashlib

    keep = labels != 0
    for i in np.flatnonzero(labels == 0):
        digest = hashlib.blake2b(f"{seed}|{epoch}|{uris[i]}".encode(), digest_size=8).digest()
        keep[i] = int.from_bytes(digest, "little") / 2 ** 64 < negative_keep
    return keep


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


def predict_manifest(model, manifest: pa.Table, preprocess: PreprocessConfig, *,
                     storage_options: StorageOptions | None = None, batch_size: int = 64,
                     tta_flip: bool = False) -> dict[str, list]:
    """Logits (and fracture-map probabilities, for a model with a map; a detector's boxes in
    input pixels and scores, with its score map) for every ok row of a manifest: driver-side,
    for calibration, thresholds and reports."""
    import torch

    out: dict[str, list] = {"image_uri": [], "study_id": [], "image_label": [], "body_part": [], "logits": [],
                            "maps": [], "source_size": []}
    tally = StreamTally()
    model.eval()
    with torch.no_grad():
        ds = build_image_dataset(manifest, preprocess, storage_options=storage_options,
                                 stream=StreamConfig(batch_size=batch_size))
        ds.context.enable_progress_bars = False
        for batch in iter_model_batches(ds, batch_size=batch_size, tally=tally):
            x = finalize(to_tensor(batch["image"]), preprocess)
            logits, maps = model.infer(x, tta_flip=tta_flip)
            out["logits"] += logits.float().numpy().tolist()
            if maps is not None and getattr(model, "detects", False):
                out.setdefault("detections", [])
                for dense in maps:
                    boxes, scores, score_map = dense_detections(dense)
                    out["detections"].append((boxes, scores))
                    out["maps"].append(score_map)
            elif maps is not None:
                out["maps"] += list(torch.sigmoid(maps.float()).numpy())
            out["source_size"] += list(zip(batch["source_height"].tolist(), batch["source_width"].tolist()))
            for key in ("image_uri", "study_id", "image_label", "body_part"):
                out[key] += [v.item() if hasattr(v, "item") else v for v in batch[key]]
    out["rejected"] = tally.as_dict()["rejected"]
    return out


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
        _train_loop_per_worker,
        train_loop_config={"train": config.to_dict(), "preprocess": preprocess.to_dict(), "class_weights": weights,
                           "name": name, "negative_keep": negative_keep},
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                               resources_per_worker={"CPU": config.cpus_per_worker}),
        datasets=datasets,
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
