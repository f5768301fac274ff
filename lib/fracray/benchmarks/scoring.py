"""Bulk-scoring benchmark: score_archive against a plain single-process loop over the
same files with the same predictor on eager PyTorch (what the product ran before its
inference engine), in one run. Targets on the 2-core build machine (issue 13): score_archive
>= 3x the eager loop's images/s once its actors are up, >= 2.5x end to end on 2,000 images.

Both sides start from files on disk and a model index and end with every image
scored; score_archive's time includes indexing, actor start-up and writing Parquet
(a Ray cluster is already running, as under `ray job submit`). The loop is what a
script would do: read a file, predict, next; a batched loop (32 images per call) and
the same loop on the default engine (ONNX Runtime on CPU) are shown too, so the table
separates what the engine gains from what the actor pool gains.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import pyarrow.compute as pc

from ..artifacts.scaffold import build_untrained_index
from ..data.synthetic import render_radiograph
from ..raycluster import connect
from ..scoring.archive import ScoreConfig, read_image_results, score_archive
from .preprocess import forced_engine, machine_description

__all__ = ["main", "run"]

# Issue 13's targets against the eager loop, on the 2-core build machine with 2,000 images.
TARGET_STEADY = 3.0
TARGET_END_TO_END = 2.5


def _write_archive(root: str, n: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        part = ("wrist", "humerus")[i % 2]
        folder = os.path.join(root, f"patient{i // 4:05d}", "study1")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"image{i % 4}.jpg")
        Image.fromarray(render_radiograph(rng, part, size[0], size[1], fracture=bool(i % 3 == 0)).pixels).save(
            path, "JPEG", quality=92)
        paths.append(path)
    return paths


def plain_loop(index_uri: str, paths: list[str], batch: int, engine: str | None = None) -> tuple[float, str]:
    """images/s of read-predict-next over ``paths`` and the engine label that did it."""
    from ..inference.engines.base import engine_label
    from ..inference.predictor import FracturePredictor  # torch: imported by the run that measures it

    with forced_engine(engine):
        start = time.perf_counter()
        predictor = FracturePredictor(index_uri)
        rate = _loop(predictor, paths, batch, start)
    return rate, engine_label(next(iter(predictor.classifiers.values())).engine)


def _loop(predictor, paths: list[str], batch: int, start: float) -> float:
    for i in range(0, len(paths), batch):
        chunk = paths[i:i + batch]
        payloads = []
        for path in chunk:
            with open(path, "rb") as f:
                payloads.append(f.read())
        predictor.predict_bytes(payloads, names=chunk)
    return len(paths) / (time.perf_counter() - start)


def run(*, model: str, images: int, image_size: tuple[int, int], log=print) -> dict:
    import ray

    workdir = tempfile.mkdtemp(prefix="fracray-bench-scoring-")
    index = build_untrained_index(os.path.join(workdir, "models"), body_parts=("humerus", "wrist"), model=model)
    archive = os.path.join(workdir, "archive")
    paths = _write_archive(archive, images, image_size)
    log(f"{images} JPEGs of {image_size[0]}x{image_size[1]} in {archive}")
    log("plain loop on eager PyTorch, one image per call (the baseline) ...")
    loop_one, eager = plain_loop(index, paths, 1, engine="torch")
    log(f"  {loop_one:.1f} images/s ({eager})")
    log("plain loop on eager PyTorch, 32 images per call ...")
    loop_batched, _ = plain_loop(index, paths, 32, engine="torch")
    log(f"  {loop_batched:.1f} images/s")
    log("plain loop on the default engine, one image per call ...")
    loop_engine, engine = plain_loop(index, paths, 1)
    log(f"  {loop_engine:.1f} images/s ({engine})")
    # The actors take the engine from their environment: the product's default, as in a real run.
    connect(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    log("score_archive ...")
    start = time.perf_counter()
    chunk_times: list[float] = []
    config = ScoreConfig(input=archive, models=index, output=os.path.join(workdir, "scores"))
    summary = score_archive(config, log=lambda *_: None, on_chunk=lambda _: chunk_times.append(time.perf_counter()))
    ray_rate = summary.scored / (time.perf_counter() - start)
    actor_engines = sorted(e for e in pc.unique(read_image_results(config.output)["engine"]).to_pylist() if e)
    # Once the actors are up: images of every chunk after the first, over the time they took.
    per_chunk = summary.scored / max(len(chunk_times), 1)
    steady = (per_chunk * (len(chunk_times) - 1) / (chunk_times[-1] - chunk_times[0])
              if len(chunk_times) > 2 else None)
    log(f"  {ray_rate:.1f} images/s end to end, {steady or float('nan'):.1f} once the actors are up")
    resources = ray.cluster_resources()
    return {"machine": machine_description(), "model": model, "images": images, "image_size": list(image_size),
            "cluster": {"CPU": resources.get("CPU"), "GPU": resources.get("GPU", 0)},
            "baseline_engine": eager, "plain_loop_images_per_s": loop_one,
            "plain_loop_batched_images_per_s": loop_batched,
            "default_engine": engine, "plain_loop_engine_images_per_s": loop_engine,
            "score_archive_engines": actor_engines,
            "score_archive_images_per_s": ray_rate, "score_archive_steady_images_per_s": steady,
            "ratio_vs_plain_loop": ray_rate / loop_one,
            "steady_ratio_vs_plain_loop": (steady / loop_one) if steady else None,
            "ratio_vs_batched_loop": ray_rate / loop_batched,
            "target_ratio_end_to_end": TARGET_END_TO_END, "target_ratio_steady": TARGET_STEADY,
            "met_end_to_end": ray_rate / loop_one >= TARGET_END_TO_END,
            "met_steady": bool(steady and steady / loop_one >= TARGET_STEADY)}


def format_table(result: dict) -> str:
    base = result["plain_loop_images_per_s"]
    steady = result["score_archive_steady_images_per_s"] or float("nan")
    engines = ", ".join(result["score_archive_engines"]) or "-"
    return "\n".join([
        f"Scoring benchmark on {result['machine']} (Ray cluster: {result['cluster']['CPU']:g} CPU, "
        f"{result['cluster']['GPU']:g} GPU; {result['model']}; {result['images']} JPEGs of "
        f"{result['image_size'][0]}x{result['image_size'][1]})", "",
        "| path | engine | images/s | vs eager loop |", "|---|---|---|---|",
        f"| plain loop, 1 image per call (baseline) | {result['baseline_engine']} | {base:.1f} | 1.00 |",
        f"| plain loop, 32 images per call | {result['baseline_engine']} | "
        f"{result['plain_loop_batched_images_per_s']:.1f} | {result['plain_loop_batched_images_per_s'] / base:.2f} |",
        f"| plain loop, 1 image per call | {result['default_engine']} | "
        f"{result['plain_loop_engine_images_per_s']:.1f} | {result['plain_loop_engine_images_per_s'] / base:.2f} |",
        f"| score_archive (Ray Data, predictor actor pool), end to end | {engines} | "
        f"{result['score_archive_images_per_s']:.1f} | {result['ratio_vs_plain_loop']:.2f} |",
        f"| score_archive, once its actors are up | {engines} | {steady:.1f} | {steady / base:.2f} |",
        "",
        f"score_archive / eager loop: {steady / base:.2f} once the actors are up (target >= "
        f"{result['target_ratio_steady']}: {'met' if result['met_steady'] else 'NOT met'}), "
        f"{result['ratio_vs_plain_loop']:.2f} end to end (target >= {result['target_ratio_end_to_end']} on 2,000 "
        f"images: {'met' if result['met_end_to_end'] else 'NOT met'})",
    ])


def main(argv: list[str] | None = None, *, prog: str = "bench_scoring.py") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="images/s of score_archive (on the default inference engine) against a plain single-process "
                    "loop over the same files with the same predictor on eager PyTorch, in one run; prints the "
                    "table and the ratios against the targets (3x once the actors are up, 2.5x end to end).")
    parser.add_argument("--model", default="efficientnet_lite0", help="backbone of the router and classifiers")
    parser.add_argument("--images", type=int, default=400, help="synthetic JPEGs to score (default: %(default)s)")
    parser.add_argument("--image-size", default="512,416", help="height,width (MURA-like; default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    result = run(model=args.model, images=args.images, image_size=tuple(int(v) for v in args.image_size.split(",")))
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
