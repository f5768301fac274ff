"""``train_all``: the product's main job.

With no arguments it runs the embedded default: it writes a small synthetic
MURA-layout dataset, indexes it, and streams every image through Ray Data
decoding + preprocessing, accounting for each one. (Model training joins this
same command in the training release; today the job ends after the data stage.)

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

from .. import storage
from ..data.adapters import ADAPTERS
from ..data.pipeline import StreamConfig, StreamTally, build_image_dataset, iter_model_batches
from ..imaging.preprocess import PreprocessConfig
from ..storage import StorageOptions
from .common import add_storage_arguments, storage_options_from_args
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
    seed: int = 0
    verify: bool = False


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
        counts = generate_mura(data, patients_per_part=config.synthetic_patients_per_part, seed=config.seed,
                               options=config.storage)
        log(f"  {counts['images']} images in {counts['studies']} studies (7 body parts)")
        dataset = "mura"
    elif data is None:
        raise ValueError("--dataset needs --data (the collection's URI)")

    index_summary = run_index(IndexConfig(dataset=dataset, data=data, output=storage.join(config.output, "index"),
                                          storage=config.storage, verify=config.verify), log=log)
    from ..data.manifest import read_manifest

    manifest = read_manifest(index_summary["outputs"]["manifest"], config.storage)

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
    log(f"Report: {out_uri}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_all.py",
        description=(
            "The main job. With no arguments: generate a small synthetic MURA-layout dataset and run the pipeline "
            "end to end (index -> Ray Data decode + preprocessing) on local Ray. With --dataset/--data: the same "
            "on your collection, locally or on a cluster via `ray job submit`."
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
        verify=args.verify,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    try:
        run_train_all(config)
    except (FileNotFoundError, ValueError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
