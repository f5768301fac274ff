"""Training throughput, side by side in one run on the same machine: the step as the product
trained before (float32, NCHW), the step as it trains now (training.precision: bf16 autocast +
channels_last on CPUs with native bf16), and the whole loop (Ray Data -> finalize -> step), with
the product's heads (classifier + detector) at 384 px. Target: the loop >= 2x the old step.

On a CUDA machine it also records densenet121 at 224 with AMP and projects the time to
train all eight MURA models (router + 7 bones) on one 8-GPU node.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import TYPE_CHECKING

import numpy as np

from .. import storage
from ..data.manifest import make_manifest
from ..data.pipeline import MAX_BOXES, StreamConfig, build_image_dataset
from ..data.synthetic import generate_fracatlas
from ..imaging.preprocess import AugmentConfig, PreprocessConfig
from ..raycluster import connect
from ..training.config import TrainConfig
from .preprocess import machine_description

# torch, the model registry and the training step are imported where they are used: `--help`
# answers in a fraction of a second instead of the ~4 s that importing them takes.
if TYPE_CHECKING:
    import torch

    from ..training.step import TrainStep

MURA_TRAIN_IMAGES = 36_808  # MURA v1.1 training images (router sees all, the 7 bone models split them)


def _make_step(name: str, device: torch.device, *, precision: str, channels_last: bool, head: str,
               image_size: int | None) -> tuple[TrainStep, PreprocessConfig, bool]:
    """The product's step for ``name`` with ``head`` ("linear": the classifier alone; "detector" or
    "map": with that localisation head and its loss, as train_all trains it)."""
    import torch

    from ..models.registry import create_model
    from ..training.losses import make_loss
    from ..training.step import TrainStep, place_model

    localization = head in ("detector", "map")
    model = create_model(name, localization=localization, localization_head=head if localization else "map")
    model = place_model(model, device, channels_last=channels_last).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tc = TrainConfig(model=name, localization=localization, localization_head=head if localization else "map",
                     image_size=image_size, precision=precision)
    step = TrainStep(model, optimizer, device=device, precision=precision, loss_fn=make_loss(tc, [1.0, 1.0], device))
    return step, tc.preprocess(), channels_last


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _targets(head: str, device: torch.device, batch: dict | None, n: int, cfg: PreprocessConfig,
             labels: torch.Tensor):
    """What the loss takes: labels, or with a localisation head (labels, regions, known)."""
    import torch

    if head == "linear":
        return labels, {}
    if head == "detector":
        if batch is None:
            boxes = torch.zeros(n, MAX_BOXES, 4, device=device)
            h, w = cfg.image_size
            boxes[:, 0] = torch.tensor([w * 0.3, h * 0.3, w * 0.4, h * 0.45], device=device)
        else:
            boxes = torch.from_numpy(np.asarray(batch["boxes_px"])).to(device)
        return (labels, boxes, torch.ones(n, dtype=torch.bool, device=device)), {"with_map": True}
    masks = torch.zeros(n, 1, *cfg.image_size, device=device)
    return (labels, masks, torch.ones(n, dtype=torch.bool, device=device)), {"with_map": True}


def synthetic_rate(step: TrainStep, cfg: PreprocessConfig, batch_size: int, steps: int,
                   channels_last: bool = True, head: str = "linear") -> float:
    """The training step alone, fed the same compact images the stream ships (float16, one
    channel), so both sides include the same on-device finalisation."""
    import torch

    from ..training.step import model_input

    device = step.device
    images = np.random.default_rng(0).random((batch_size, 1, *cfg.image_size), dtype=np.float32).astype(np.float16)
    y = torch.randint(0, 2, (batch_size,), device=device)
    target, kwargs = _targets(head, device, None, batch_size, cfg, y)
    step(model_input(images, cfg, device, channels_last), target, **kwargs)  # warm-up (allocator, autotuning)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(model_input(images, cfg, device, channels_last), target, **kwargs)
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def pipeline_rate(step: TrainStep, cfg: PreprocessConfig, uris: list[str], batch_size: int, steps: int,
                  robust: bool = True, head: str = "linear") -> float:
    """Ray Data read + decode + preprocessing + augmentation (as train_all: the robust set) -> the same step."""
    import torch

    from ..training.step import model_input

    device = step.device
    needed = (steps + 2) * batch_size
    manifest = make_manifest({"image_uri": uris[i % len(uris)], "dataset": "bench", "image_label": i % 2}
                             for i in range(needed))
    ds = build_image_dataset(manifest, cfg, stream=StreamConfig(
        batch_size=batch_size, augment=AugmentConfig.robust() if robust else AugmentConfig(), seed=None,
        boxes=head == "detector", masks=head == "map"))
    ds.context.enable_progress_bars = False
    done, start = 0, None
    for i, batch in enumerate(ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=4)):
        y = torch.from_numpy(batch["image_label"].astype(np.int64)).to(device)
        target, kwargs = _targets(head, device, batch, len(y), cfg, y)
        step(model_input(batch["image"], cfg, device), target, **kwargs)
        if i == 1:  # the first batches include start-up (workers, first tasks): time from here
            _sync(device)
            start = time.perf_counter()
        elif i > 1:
            done += len(y)
    _sync(device)
    return done / (time.perf_counter() - start)


def measure(name: str, uris: list[str], *, batch_size: int, steps: int, repeats: int, device: torch.device,
            image_size: int | None = 384, head: str = "detector", log=print) -> dict:
    """Three measurements in one run, alternated ``repeats`` times (machine noise hits all alike),
    medians kept: the step as the product trained before (float32, NCHW), the step as it trains
    now (precision auto, channels_last), and the whole Ray Data -> step loop at the new default.
    Ratios are against the old step; the per-repeat ratios show the spread."""
    old, cfg, _ = _make_step(name, device, precision="float32", channels_last=False, head=head, image_size=image_size)
    new, _, _ = _make_step(name, device, precision="auto", channels_last=True, head=head, image_size=image_size)
    rates: dict[str, list[float]] = {"float32_nchw": [], "default": [], "pipeline": []}
    for r in range(repeats):
        rates["float32_nchw"].append(synthetic_rate(old, cfg, batch_size, steps, channels_last=False, head=head))
        rates["default"].append(synthetic_rate(new, cfg, batch_size, steps, head=head))
        rates["pipeline"].append(pipeline_rate(new, cfg, uris, batch_size, steps, head=head))
        log(f"[{name} {head} {cfg.image_size[0]} px] repeat {r + 1}/{repeats}: float32 NCHW step "
            f"{rates['float32_nchw'][-1]:.1f} img/s, {new.precision} channels_last step {rates['default'][-1]:.1f}, "
            f"Ray Data -> step {rates['pipeline'][-1]:.1f}")
    med = {k: float(np.median(v)) for k, v in rates.items()}
    per = lambda k: [a / b for a, b in zip(rates[k], rates["float32_nchw"])]  # noqa: E731
    return {"model": name, "head": head, "image_size": cfg.image_size[0], "device": str(device),
            "precision": new.precision, "batch_size": batch_size, "repeats": repeats,
            "float32_nchw_images_per_s": med["float32_nchw"], "default_images_per_s": med["default"],
            "pipeline_images_per_s": med["pipeline"],
            "default_speedup": med["default"] / med["float32_nchw"],
            "pipeline_speedup": med["pipeline"] / med["float32_nchw"],
            "pipeline_vs_step": med["pipeline"] / med["default"],
            "pipeline_speedup_range": [min(per("pipeline")), max(per("pipeline"))],
            # The names the first version of this benchmark used (the new default's step and loop).
            "synthetic_images_per_s": med["default"], "ratio": med["pipeline"] / med["default"],
            "ratio_min": min(p / d for p, d in zip(rates["pipeline"], rates["default"])),
            "ratio_max": max(p / d for p, d in zip(rates["pipeline"], rates["default"]))}


def main(argv: list[str] | None = None, *, prog: str = "bench_training.py") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Training images/s side by side in one run: the step as it trained before (float32, NCHW), "
                    "the step as it trains now (bf16 autocast + channels_last on CPUs with native bf16, float16 "
                    "on CUDA, float32 elsewhere), and the whole Ray Data -> step loop, with the product's heads "
                    "(classifier + detector) at 384 px by default; ratios against the old step (target >= 2x).")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--image-size", type=int, default=384, help="input side in pixels (default: %(default)s)")
    parser.add_argument("--head", choices=["detector", "map", "linear"], default="detector",
                        help="the model's heads: detector (the shipped recipe), map, or linear (classifier alone)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating synthetic / Ray Data measurements; medians are reported")
    parser.add_argument("--data", default=None, help="folder of JPEG/PNG images (default: synthetic radiographs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, args.repeats, args.image_size) < 1:
        parser.error(f"--batch-size, --steps, --repeats and --image-size must be >= 1. Got {args.batch_size}, "
                     f"{args.steps}, {args.repeats}, {args.image_size}")
    import torch

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
                            device=device, image_size=args.image_size, head=args.head))
    print(f"\nMachine: {machine_description()}\n")
    print("| model + heads | px | batch | float32 NCHW step (img/s) | default step (img/s) | Ray Data -> default step "
          "(img/s) | default / old | loop / old (per-repeat range) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} + {r['head']} | {r['image_size']} | {r['batch_size']} | "
              f"{r['float32_nchw_images_per_s']:.1f} | {r['default_images_per_s']:.1f} ({r['precision']}, "
              f"channels_last) | {r['pipeline_images_per_s']:.1f} | {r['default_speedup']:.2f}x | "
              f"{r['pipeline_speedup']:.2f}x ({r['pipeline_speedup_range'][0]:.2f}-"
              f"{r['pipeline_speedup_range'][1]:.2f}) |")
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
