"""Training throughput: the full loop (Ray Data -> finalize -> model step) against the same
model step on synthetic tensors, in one run, on the same machine. Target ratio >= 0.9:
the input pipeline never starves the model.

On a CUDA machine it also records densenet121 at 224 with AMP and projects the time to
train all eight MURA models (router + 7 bones) on one 8-GPU node.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from .. import storage
from ..data.manifest import make_manifest
from ..data.pipeline import StreamConfig, build_image_dataset
from ..data.synthetic import generate_fracatlas
from ..imaging.preprocess import AugmentConfig, PreprocessConfig
from ..models.registry import create_model
from ..raycluster import connect
from ..training.step import TrainStep, model_input, place_model
from .preprocess import machine_description

MURA_TRAIN_IMAGES = 36_808  # MURA v1.1 training images (router sees all, the 7 bone models split them)


def _make_step(name: str, device: torch.device, amp: bool) -> tuple[TrainStep, PreprocessConfig]:
    model = place_model(create_model(name), device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return TrainStep(model, optimizer, device=device, amp=amp), model.preprocess_config()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_rate(step: TrainStep, cfg: PreprocessConfig, batch_size: int, steps: int) -> float:
    """The training step alone, fed the same compact images the stream ships (float16, one
    channel), so both sides include the same on-device finalisation."""
    device = step.device
    images = np.random.default_rng(0).random((batch_size, 1, *cfg.image_size), dtype=np.float32).astype(np.float16)
    y = torch.randint(0, 2, (batch_size,), device=device)
    step(model_input(images, cfg, device), y)  # warm-up (allocator, cuDNN autotuning)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(model_input(images, cfg, device), y)
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def pipeline_rate(step: TrainStep, cfg: PreprocessConfig, uris: list[str], batch_size: int, steps: int) -> float:
    """Ray Data read + decode + preprocessing + augmentation -> the same step."""
    device = step.device
    needed = (steps + 2) * batch_size
    manifest = make_manifest({"image_uri": uris[i % len(uris)], "dataset": "bench", "image_label": i % 2}
                             for i in range(needed))
    ds = build_image_dataset(manifest, cfg, stream=StreamConfig(batch_size=batch_size, augment=AugmentConfig(),
                                                                seed=None))
    ds.context.enable_progress_bars = False
    done, start = 0, None
    for i, batch in enumerate(ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=4)):
        y = torch.from_numpy(batch["image_label"].astype(np.int64)).to(device)
        step(model_input(batch["image"], cfg, device), y)
        if i == 1:  # the first batches include start-up (workers, first tasks): time from here
            _sync(device)
            start = time.perf_counter()
        elif i > 1:
            done += len(y)
    _sync(device)
    return done / (time.perf_counter() - start)


def measure(name: str, uris: list[str], *, batch_size: int, steps: int, repeats: int, device: torch.device,
            amp: bool, log=print) -> dict:
    """Alternate the two measurements ``repeats`` times (machine noise hits both alike) and
    keep the medians; the spread of the per-pair ratios shows how noisy the run was."""
    step, cfg = _make_step(name, device, amp)
    synthetic, full = [], []
    for r in range(repeats):
        synthetic.append(synthetic_rate(step, cfg, batch_size, steps))
        full.append(pipeline_rate(step, cfg, uris, batch_size, steps))
        log(f"[{name}] repeat {r + 1}/{repeats}: synthetic {synthetic[-1]:.1f} img/s, "
            f"Ray Data {full[-1]:.1f} img/s, ratio {full[-1] / synthetic[-1]:.2f}")
    pair_ratios = [f / s for f, s in zip(full, synthetic)]
    return {"model": name, "device": str(device), "amp": step.amp, "batch_size": batch_size, "repeats": repeats,
            "synthetic_images_per_s": float(np.median(synthetic)), "pipeline_images_per_s": float(np.median(full)),
            "ratio": float(np.median(full) / np.median(synthetic)),
            "ratio_min": min(pair_ratios), "ratio_max": max(pair_ratios)}


def main(argv: list[str] | None = None, *, prog: str = "bench_training.py") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Images/s of the full training loop (Ray Data -> model step) vs the same model step on "
                    "synthetic tensors, side by side, with the ratio (target >= 0.9).")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating synthetic / Ray Data measurements; medians are reported")
    parser.add_argument("--data", default=None, help="folder of JPEG/PNG images (default: synthetic radiographs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, args.repeats) < 1:
        parser.error(f"--batch-size, --steps and --repeats must be >= 1. Got {args.batch_size}, {args.steps}, "
                     f"{args.repeats}")
    connect(include_dashboard=False, log_to_driver=False)
    if args.data:
        uris = [u for u in storage.list_files(args.data) if u.lower().endswith((".jpg", ".jpeg", ".png"))]
    else:
        tmp = tempfile.mkdtemp(prefix="fracray-bench-train-")
        generate_fracatlas(tmp, n_images=64, seed=0, large_images=False)
        uris = storage.list_files(os.path.join(tmp, "FracAtlas", "images"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    models = [args.model] + (["densenet121"] if device.type == "cuda" and args.model != "densenet121" else [])
    for name in models:
        rows.append(measure(name, uris, batch_size=args.batch_size, steps=args.steps, repeats=args.repeats,
                            device=device, amp=True))  # as training: TrainStep uses AMP where it applies (CUDA)
    print(f"\nMachine: {machine_description()}\n")
    print("| model | device | AMP | batch | model step on synthetic tensors (img/s) | Ray Data -> model step (img/s) "
          "| ratio (median) | per-repeat ratios |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['amp']} | {r['batch_size']} | {r['synthetic_images_per_s']:.1f} "
              f"| {r['pipeline_images_per_s']:.1f} | {r['ratio']:.2f} | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} |")
    if device.type == "cuda":
        dn = next(r for r in rows if r["model"] == "densenet121")
        # Router over all MURA training images + 7 bone models over the same images split by bone,
        # 10 epochs each, on 8 GPUs (data-parallel, ~linear at this scale).
        seconds = 2 * MURA_TRAIN_IMAGES * 10 / (dn["pipeline_images_per_s"] * 8)
        print(f"\nProjected: all eight MURA models (router + 7 bones), 10 epochs, densenet121 at 224 with AMP "
              f"on one 8-GPU node: {seconds / 60:.1f} min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
