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
import torch.nn.functional as F

from ..data.manifest import make_manifest
from ..data.pipeline import StreamConfig, build_image_dataset
from ..imaging.preprocess import AugmentConfig, finalize, to_tensor
from ..models.registry import create_model
from .preprocess import machine_description

MURA_TRAIN_IMAGES = 36_808  # MURA v1.1 training images (router sees all, the 7 bone models split them)


def _model_step(model, optimizer, x, y, amp: bool):
    with torch.autocast(device_type=x.device.type, dtype=torch.float16, enabled=amp):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def synthetic_rate(name: str, batch_size: int, steps: int, device: torch.device, amp: bool) -> float:
    model = create_model(name).to(device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cfg = model.preprocess_config()
    x = torch.randn(batch_size, 3, *cfg.image_size, device=device)
    y = torch.randint(0, 2, (batch_size,), device=device)
    _model_step(model, optimizer, x, y, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        _model_step(model, optimizer, x, y, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def pipeline_rate(name: str, uris: list[str], batch_size: int, steps: int, device: torch.device, amp: bool) -> float:
    model = create_model(name).to(device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cfg = model.preprocess_config()
    needed = (steps + 2) * batch_size
    manifest = make_manifest({"image_uri": uris[i % len(uris)], "dataset": "bench", "image_label": i % 2}
                             for i in range(needed))
    ds = build_image_dataset(manifest, cfg, stream=StreamConfig(batch_size=batch_size, augment=AugmentConfig(),
                                                                seed=None))
    ds.context.enable_progress_bars = False
    done, start = 0, None
    for i, batch in enumerate(ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=4)):
        x = finalize(to_tensor(batch["image"]).to(device, non_blocking=True), cfg)
        y = torch.from_numpy(batch["image_label"].astype(np.int64)).to(device)
        _model_step(model, optimizer, x, y, amp)
        if i == 1:  # the first batches include start-up (workers, first tasks): time from here
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        elif i > 1:
            done += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_training.py",
        description="Images/s of the full training loop (Ray Data -> model step) vs the same model step on "
                    "synthetic tensors, side by side, with the ratio (target >= 0.9).")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data", default=None, help="folder of JPEG/PNG images (default: synthetic radiographs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import ray

    from .. import storage
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    if args.data:
        uris = [u for u in storage.list_files(args.data) if u.lower().endswith((".jpg", ".jpeg", ".png"))]
    else:
        from ..data.synthetic import generate_fracatlas
        tmp = tempfile.mkdtemp(prefix="fracray-bench-train-")
        generate_fracatlas(tmp, n_images=64, seed=0, large_images=False)
        uris = storage.list_files(os.path.join(tmp, "FracAtlas", "images"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    rows = []
    models = [args.model] + (["densenet121"] if device.type == "cuda" and args.model != "densenet121" else [])
    for name in models:
        synthetic = synthetic_rate(name, args.batch_size, args.steps, device, amp)
        full = pipeline_rate(name, uris, args.batch_size, args.steps, device, amp)
        rows.append({"model": name, "device": str(device), "amp": amp, "batch_size": args.batch_size,
                     "synthetic_images_per_s": synthetic, "pipeline_images_per_s": full, "ratio": full / synthetic})
    print(f"\nMachine: {machine_description()}\n")
    print("| model | device | AMP | batch | model step on synthetic tensors (img/s) | Ray Data -> model step (img/s) "
          "| ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['amp']} | {r['batch_size']} | {r['synthetic_images_per_s']:.1f} "
              f"| {r['pipeline_images_per_s']:.1f} | {r['ratio']:.2f} |")
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
