"""The Ray Train loop one worker runs: its shard of the stream, per-epoch negative sampling,
the step, validation (AUROC, a detector's AP30), early stopping, checkpoints and progress lines."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np

from ..data.pipeline import OK
from ..imaging.preprocess import PreprocessConfig, to_tensor
from ..imaging.regions import Finding, average_precision
from ..metrics import classification as M
from ..models.detection import decode_dense
from .progress import post_progress
from .step import TrainStep, model_input, place_model
from .config import TrainConfig
from .losses import make_loss

__all__ = ["train_loop_per_worker"]


def _usable(batch: dict[str, np.ndarray], tc: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    labels = tc.labels(batch["image_label"], batch["body_part"])
    keep = (batch["status"] == OK) & (labels >= 0)
    return keep, labels


def _log_progress(path: str | None, **event) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
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


def _epoch_sample(uris, labels: np.ndarray, epoch: int, seed: int, negative_keep: float) -> np.ndarray:
    """Which rows train this epoch: every positive, and each negative with probability
    ``negative_keep``, drawn per (seed, epoch, image) so workers agree and epochs differ."""
    import hashlib

    keep = labels != 0
    for i in np.flatnonzero(labels == 0):
        digest = hashlib.blake2b(f"{seed}|{epoch}|{uris[i]}".encode(), digest_size=8).digest()
        keep[i] = int.from_bytes(digest, "little") / 2 ** 64 < negative_keep
    return keep
