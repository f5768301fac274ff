"""``train_all``: the product's main job.

With no arguments it runs the embedded default: it writes a small synthetic
MURA-layout dataset, indexes it, streams every image through Ray Data decoding +
preprocessing (accounting for each one), then trains the bone-type router and the
per-bone fracture models with Ray Train (in parallel where the cluster has room),
evaluates the composed router -> classifier graph and writes the report and the
model index that serving and scoring read.

On a cluster: ``ray job submit --working-dir . -- python pipelines/train_all.py
--dataset mura --data s3://bucket/mura --output s3://bucket/runs/r1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import pyarrow as pa

from .. import storage
from ..data.adapters import ADAPTERS
from ..data.pipeline import StreamConfig, StreamTally, build_image_dataset, iter_model_batches
from ..imaging.preprocess import PreprocessConfig
from ..storage import StorageOptions
from .common import add_storage_arguments, storage_options_from_args
from ..training.orchestrate import TrainingSettings, run_training_stage
from .index_dataset import IndexConfig, run_index

__all__ = ["TrainAllConfig", "run_train_all", "main", "build_parser"]


@dataclasses.dataclass(frozen=True)
class TrainAllConfig:
    dataset: str | None = None          # None: the embedded synthetic MURA default
    data: str | None = None
    output: str = "runs/latest"
    storage: StorageOptions = StorageOptions()
    image_size: int = 224
    normalization: str = "imagenet"
    enhancement: str = "none"
    batch_size: int = 256
    synthetic_patients_per_part: int = 6
    body_parts: tuple[str, ...] = ()
    seed: int = 0
    verify: bool = False
    train: bool = True
    training: TrainingSettings = TrainingSettings()


def _init_ray() -> None:
    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit`) connects to the cluster; otherwise a local Ray starts.
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def run_train_all(config: TrainAllConfig, *, log=print) -> dict[str, Any]:
    started = time.time()
    dataset, data = config.dataset, config.data
    if dataset is None:
        from ..data.synthetic import generate_mura

        data = storage.join(config.output, "synthetic-mura")
        log(f"No --data given: writing the embedded default, a synthetic MURA-layout dataset, to {data}")
        from ..data.manifest import MURA_BODY_PARTS

        parts = config.body_parts or MURA_BODY_PARTS
        counts = generate_mura(data, patients_per_part=config.synthetic_patients_per_part, seed=config.seed,
                               body_parts=tuple(parts), options=config.storage)
        log(f"  {counts['images']} images in {counts['studies']} studies ({len(parts)} body parts)")
        dataset = "mura"
    elif data is None:
        raise ValueError("--dataset needs --data (the collection's URI)")

    index_summary = run_index(IndexConfig(dataset=dataset, data=data, output=storage.join(config.output, "index"),
                                          storage=config.storage, verify=config.verify), log=log)
    from ..data.manifest import read_manifest

    manifest = read_manifest(index_summary["outputs"]["manifest"], config.storage)
    if config.body_parts and config.dataset is not None:
        import pyarrow.compute as pc
        manifest = manifest.filter(pc.is_in(manifest["body_part"], pa.array(list(config.body_parts))))

    preprocess = PreprocessConfig(image_size=(config.image_size, config.image_size),
                                  normalization=config.normalization, enhancement=config.enhancement)
    _init_ray()
    log(f"\nStreaming {manifest.num_rows} images through decode + preprocessing with Ray Data ...")
    ds = build_image_dataset(manifest, preprocess, storage_options=config.storage,
                             stream=StreamConfig(batch_size=config.batch_size))
    tally = StreamTally()
    stream_start = time.time()
    batches = 0
    shape = None
    for batch in iter_model_batches(ds, batch_size=config.batch_size, tally=tally, preprocess=preprocess):
        batches += 1
        shape = tuple(batch["image"].shape[1:])
    seconds = time.time() - stream_start
    if tally.rows != manifest.num_rows:
        raise RuntimeError(f"Stream accounted for {tally.rows} of {manifest.num_rows} images")
    summary = {
        "dataset": dataset, "data": data, "index": index_summary["outputs"],
        "preprocess": preprocess.to_dict(), "stream": tally.as_dict(), "model_input_shape": shape,
        "batches": batches, "stream_seconds": round(seconds, 2),
        "images_per_second": round(tally.rows / seconds, 1) if seconds else None,
        "rejects": [{"uri": u, "reason": r, "detail": d} for u, r, d in tally.reject_examples],
        "seconds": round(time.time() - started, 2),
        "stages_completed": ["generate" if config.dataset is None else None, "index", "preprocess"],
    }
    summary["stages_completed"] = [s for s in summary["stages_completed"] if s]
    out_uri = storage.join(config.output, "data_stage.json")
    storage.write_bytes(out_uri, json.dumps(summary, indent=2, default=list).encode(), config.storage)
    log(f"\nPreprocessed {tally.ok} of {tally.rows} images into model inputs of shape {shape} "
        f"({summary['images_per_second']} images/s); rejected: {dict(tally.rejected) or 'none'}")
    for uri, reason, detail in tally.reject_examples[:5]:
        log(f"  rejected {uri}: {reason}: {detail}")
    log(f"Every image accounted for: {tally.ok} ok + {sum(tally.rejected.values())} rejected = {tally.rows}")
    log(f"Data report: {out_uri}")
    if not config.train:
        return summary
    log("\nTraining ...")
    report = run_training_stage(manifest, config.training, output_uri=config.output, dataset=dataset,
                                storage_options=config.storage, log=log)
    from ..training.orchestrate import format_report

    log("\n" + format_report(report))
    log(f"Report: {storage.join(config.output, 'report.md')} (and report.json, "
        + ", ".join(report["plots"]) + " as PNG)")
    log(f"Model index for serving and scoring: {report['model_index']}")
    summary["training"] = {"model_index": report["model_index"], "seconds": report["seconds"]}
    summary["stages_completed"].append("train")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_all.py",
        description=(
            "The main job. With no arguments: generate a small synthetic MURA-layout dataset and run everything end "
            "to end on local Ray: index -> Ray Data decode + preprocessing -> Ray Train fine-tuning of the bone-type "
            "router and the per-bone fracture models (in parallel where resources allow) -> evaluation of the "
            "router -> classifier graph -> report, plots and the model index for serving/scoring. With "
            "--dataset/--data: the same on your collection, locally or on a cluster via `ray job submit`."
        ),
        epilog="Example: train_all.py --dataset fracatlas --data ../shared/data/fracatlas --output runs/fracatlas",
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file whose keys are these options (flags win)")
    parser.add_argument("--dataset", choices=sorted(ADAPTERS), help="layout of --data (default: synthetic MURA)")
    parser.add_argument("--data", help="URI of the collection (local path or s3://...)")
    parser.add_argument("--output", default="runs/latest", help="output URI (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224, help="model input side in pixels")
    parser.add_argument("--normalization", choices=["imagenet", "per_image", "none"], default="imagenet")
    parser.add_argument("--enhancement", default="none",
                        choices=["none", "sobel", "prewitt", "roberts", "canny", "laplacian_sharpen"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--synthetic-patients-per-part", type=int, default=6,
                        help="size of the embedded synthetic dataset (patients per body part)")
    parser.add_argument("--body-parts", default="",
                        help="comma-separated body parts to keep (default: all); also limits the synthetic set")
    train = parser.add_argument_group("training")
    train.add_argument("--skip-training", action="store_true", help="stop after the data stage")
    train.add_argument("--model", default="efficientnet_lite0", help="backbone of the per-bone fracture models")
    train.add_argument("--router-model", default="efficientnet_lite0", help="backbone of the bone-type router")
    train.add_argument("--weights", default="imagenet",
                       help="imagenet (offline where they ship, else timm's hub), none (from scratch), or a URI of "
                            "a weight file (safetensors / state dict)")
    train.add_argument("--strategy", default="full",
                       help="full, classifier_only, last60 (DenseNet121 paper), last20_bn_frozen (EfficientNet-B0 "
                            "paper) or lastN")
    train.add_argument("--router-strategy", default="full")
    train.add_argument("--head", choices=["linear", "dense3"], default="linear")
    train.add_argument("--bam", action="store_true", help="insert BAM attention at the backbone's bottlenecks")
    train.add_argument("--epochs", type=int, default=2)
    train.add_argument("--train-batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default %(default)s)")
    train.add_argument("--loss", choices=["weighted_ce", "ce", "focal"], default="weighted_ce")
    train.add_argument("--num-workers", type=int, default=1, help="Ray Train workers per model (DDP)")
    train.add_argument("--use-gpu", action="store_true", help="one GPU per training worker (AMP, channels_last)")
    train.add_argument("--no-augment", action="store_true")
    train.add_argument("--single-model", action="store_true",
                       help="one fracture model for all body parts instead of the router + per-bone models")
    train.add_argument("--exclude-hardware", action="store_true",
                       help="train and evaluate on the hardware-free subset (MURA humerus paper)")
    train.add_argument("--compare-backbones", default="",
                       help="comma-separated backbones to compare (FracAtlas paper), each with and without "
                            "ImageNet weights where weights exist")
    train.add_argument("--max-concurrent", type=int, default=None, help="cap on models trained at once")
    train.add_argument("--cpu-threads", type=int, default=None,
                       help="threads per CPU training worker (default: the cluster's CPUs shared among the "
                            "workers training at once)")
    train.add_argument("--threshold-target", choices=["youden", "sensitivity", "specificity"], default="youden")
    train.add_argument("--threshold-value", type=float, default=None, help="e.g. 0.9 with --threshold-target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verify", action="store_true", help="decode every image while indexing")
    add_storage_arguments(parser)
    return parser


def parse_config(argv: list[str] | None) -> TrainAllConfig:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        import yaml

        with open(pre.config) as f:
            values = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        unknown = {k.replace("-", "_") for k in values} - known
        if unknown:
            parser.error(f"unknown keys in {pre.config}: {sorted(unknown)}")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})
    args = parser.parse_args(argv)
    return TrainAllConfig(
        dataset=args.dataset, data=args.data, output=args.output, storage=storage_options_from_args(args),
        image_size=args.image_size, normalization=args.normalization, enhancement=args.enhancement,
        batch_size=args.batch_size, synthetic_patients_per_part=args.synthetic_patients_per_part, seed=args.seed,
        verify=args.verify, body_parts=tuple(p for p in args.body_parts.split(",") if p), train=not args.skip_training,
        training=TrainingSettings(
            model=args.model, router_model=args.router_model, pretrained=_weights_arg(args.weights),
            strategy=args.strategy, router_strategy=args.router_strategy, head=args.head, bam=args.bam,
            epochs=args.epochs, batch_size=args.train_batch_size, lr=args.lr, loss=args.loss,
            num_workers=args.num_workers, use_gpu=args.use_gpu, augment=not args.no_augment,
            exclude_hardware=args.exclude_hardware, single_model=args.single_model,
            compare_backbones=tuple(b for b in args.compare_backbones.split(",") if b),
            max_concurrent=args.max_concurrent, cpu_threads=args.cpu_threads, threshold_target=args.threshold_target,
            threshold_value=args.threshold_value),
    )


def _weights_arg(value: str) -> bool | str:
    return True if value == "imagenet" else False if value in ("none", "random", "scratch") else value


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    try:
        run_train_all(config)
    except (FileNotFoundError, ValueError, RuntimeError, storage.StorageError) as exc:  # WeightsError: ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
