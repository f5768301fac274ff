"""Preprocessing throughput, side by side in one run on the same files.

(a) bare decode of the file bytes with Pillow (the library our path uses),
(b) the project's full decode + preprocessing path, one core,
(c) a naive baseline: PIL open, convert RGB, resize, to float, normalise, one core,
(d) the Ray Data pipeline end to end (storage read included) on all cores, delivering
    batches to the consumer in the compact single-channel form a training loop moves
    to its device, where the channel expansion + ImageNet affine (``finalize``) runs,
(d') the same with ``finalize`` run on the consumer's CPU too (a CPU-only trainer),
(e) on a CUDA machine: nvJPEG decode on the GPU (torchvision.io.decode_jpeg) + resize.

Ratios: b/a (target >= 0.87), b/c, d/(b x cores) (target >= 0.8), e/(b x cores).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import time
from typing import Callable

import numpy as np
from PIL import Image

from .. import storage
from ..data.manifest import make_manifest
from ..data.pipeline import StreamConfig, StreamTally, build_image_dataset, iter_model_batches
from ..data.synthetic import generate_fracatlas
from ..imaging.decode import ImageRejected
from ..imaging.preprocess import PreprocessConfig, preprocess_bytes
from ..inference.engines.choice import ENGINE_ENV
from ..raycluster import connect


@dataclasses.dataclass
class BenchResult:
    name: str
    images: int
    cpu_cores: int
    bare_decode: float
    full_path: float
    naive: float
    ray_pipeline: float | None
    ray_pipeline_cpu_finalize: float | None
    gpu_decode: float | None = None
    machine: str = ""

    @property
    def ratios(self) -> dict[str, float | None]:
        out = {"b/a": self.full_path / self.bare_decode, "b/c": self.full_path / self.naive}
        out["d/(b*cores)"] = self.ray_pipeline / (self.full_path * self.cpu_cores) if self.ray_pipeline else None
        out["d'/(b*cores)"] = (self.ray_pipeline_cpu_finalize / (self.full_path * self.cpu_cores)
                               if self.ray_pipeline_cpu_finalize else None)
        out["e/(b*cores)"] = self.gpu_decode / (self.full_path * self.cpu_cores) if self.gpu_decode else None
        return out


def _rate(fn: Callable[[bytes], object], payloads: list[bytes], min_seconds: float) -> float:
    """Images per second of ``fn`` over the payloads, repeating whole passes for at least min_seconds."""
    fn(payloads[0])  # warm caches / lazy imports
    done, start = 0, time.perf_counter()
    while True:
        for data in payloads:
            fn(data)
        done += len(payloads)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def _bare_decode(data: bytes) -> None:
    Image.open(io.BytesIO(data)).load()


def _naive(config: PreprocessConfig) -> Callable[[bytes], np.ndarray]:
    mean = np.asarray(config.mean, np.float32)
    std = np.asarray(config.std, np.float32)
    h, w = config.image_size

    def run(data: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((w, h), Image.BILINEAR)
        arr = np.asarray(img, np.float32) / 255.0
        return ((arr - mean) / std).transpose(2, 0, 1)

    return run


def _ray_rates(uris: list[str], config: PreprocessConfig, cores: int, batch_size: int, rows_per_block: int,
               min_images: int) -> tuple[float, float]:
    """Steady-state images/s: the file list is cycled to at least ``min_images`` so that
    the pipeline's fixed start-up (scheduling the first tasks) does not dominate."""
    import ray

    repeats = max(1, math.ceil(min_images / len(uris)))
    manifest = make_manifest({"image_uri": u, "dataset": "bench"} for u in uris * repeats)
    connect(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    stream = StreamConfig(batch_size=batch_size, rows_per_block=rows_per_block)
    # Warm-up pass: worker processes start and import once, as on a long-running cluster.
    for _ in iter_model_batches(build_image_dataset(manifest, config, stream=stream), batch_size=batch_size):
        pass
    rates = []
    for finalize_on_cpu in (False, True):
        tally = StreamTally()
        start = time.perf_counter()
        for _ in iter_model_batches(build_image_dataset(manifest, config, stream=stream), batch_size=batch_size,
                                    tally=tally, preprocess=config if finalize_on_cpu else None):
            pass
        rates.append(tally.rows / (time.perf_counter() - start))
    return rates[0], rates[1]


def _gpu_rate(payloads: list[bytes], config: PreprocessConfig, min_seconds: float) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in payloads if d[:3] == b"\xff\xd8\xff"]
    if not jpegs:
        return None
    h, w = config.image_size

    def run_all() -> None:
        for start in range(0, len(jpegs), 64):
            decoded = decode_jpeg(jpegs[start:start + 64], mode=ImageReadMode.GRAY, device="cuda")
            for img in decoded:
                F.interpolate(img[None].float(), size=(h, w), mode="area")
        torch.cuda.synchronize()

    run_all()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        run_all()
        done += len(jpegs)
    return done / (time.perf_counter() - start)


@contextlib.contextmanager
def forced_engine(name: str | None):
    """FRACRAY_ENGINE (inference.engines.choice) for this process only while a measurement runs
    (what a predictor given no engine follows); None: unset, what the product does by default. Ray
    workers keep their own environment."""
    variable = ENGINE_ENV
    before = os.environ.pop(variable, None)
    if name is not None:
        os.environ[variable] = name
    try:
        yield
    finally:
        os.environ.pop(variable, None)
        if before is not None:
            os.environ[variable] = before


def _cpu_model() -> str:
    """The CPU's model name and whether it has native bf16 (avx512_bf16 / AMX), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.system()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.system())
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines() if line.startswith("flags")), set())
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({'native bf16: ' + ', '.join(native) if native else 'no native bf16'})"


def machine_description() -> str:
    desc = f"{platform.machine()}, {os.cpu_count()} CPU cores, {_cpu_model()}"
    try:
        import torch
        if torch.cuda.is_available():
            desc += f", GPU {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return desc


def run_benchmark(name: str, uris: list[str], *, config: PreprocessConfig, cores: int, min_seconds: float,
                  batch_size: int, rows_per_block: int = 256, ray_seconds: float = 10.0,
                  with_ray: bool = True, with_gpu: bool = True) -> BenchResult:
    payloads = []
    usable_uris = []
    for uri in uris:
        data = storage.read_bytes(uri)
        try:  # benchmark only files every path can decode (the truncated ones are rejected, not timed)
            preprocess_bytes(data, config)
            _bare_decode(data)
        except (ImageRejected, OSError):
            continue
        payloads.append(data)
        usable_uris.append(uri)
    if not payloads:
        raise ValueError(f"No decodable images in {name}")
    bare = _rate(_bare_decode, payloads, min_seconds)
    full = _rate(lambda d: preprocess_bytes(d, config), payloads, min_seconds)
    naive = _rate(_naive(config), payloads, min_seconds)
    # Enough images for about ``ray_seconds`` of ideal all-core work.
    min_images = int(full * cores * ray_seconds)
    ray_rate, ray_rate_cpu_finalize = (_ray_rates(usable_uris, config, cores, batch_size, rows_per_block, min_images)
                                       if with_ray else (None, None))
    gpu = _gpu_rate(payloads, config, min_seconds) if with_gpu else None
    return BenchResult(name, len(payloads), cores, bare, full, naive, ray_rate, ray_rate_cpu_finalize, gpu,
                       machine_description())


D_PRIME = "d'/(b*cores)"


def format_table(results: list[BenchResult]) -> str:
    head = ("| dataset | images | (a) bare decode /s/core | (b) full path /s/core | (c) naive /s/core | "
            "(d) Ray Data /s | (d') Ray Data + CPU finalize /s | b/a | b/c | d/(b x cores) | d'/(b x cores) | "
            "(e) GPU nvJPEG /s | e/(b x cores) |")
    lines = [head, "|" + "---|" * 13]
    for r in results:
        q = r.ratios
        fmt = lambda v, p=1: "n/a" if v is None else f"{v:.{p}f}"  # noqa: E731
        lines.append(f"| {r.name} | {r.images} | {r.bare_decode:.1f} | {r.full_path:.1f} | {r.naive:.1f} | "
                     f"{fmt(r.ray_pipeline)} | {fmt(r.ray_pipeline_cpu_finalize)} | {q['b/a']:.2f} | {q['b/c']:.2f} | "
                     f"{fmt(q['d/(b*cores)'], 2)} | {fmt(q[D_PRIME], 2)} | "
                     f"{fmt(r.gpu_decode)} | {fmt(q['e/(b*cores)'], 2)} |")
    return "\n".join(lines)


def _images_under(uri: str, limit: int | None) -> list[str]:
    files = [u for u in storage.list_files(uri) if u.lower().endswith((".jpg", ".jpeg", ".png"))]
    if limit:
        step = max(1, len(files) // limit)
        files = files[::step][:limit]
    return files


def main(argv: list[str] | None = None, *, prog: str = "bench_preprocess.py") -> int:
    default_shared = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "shared", "data")
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Images/s of bare decode, the full preprocessing path, a naive baseline and the Ray Data "
                    "pipeline, side by side on the same files, with their ratios.",
    )
    parser.add_argument("--data", action="append", metavar="NAME=URI",
                        help="a named folder of images to measure (repeatable). Default: the shared FracAtlas "
                             "full-resolution sample and FracAtlas set beside the checkout, else a synthetic set.")
    parser.add_argument("--image-size", type=int, default=224, help="model input side (default 224)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images per dataset")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores for the Ray pipeline")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="minimum timed seconds per single-core stage")
    parser.add_argument("--ray-seconds", type=float, default=10.0,
                        help="size the Ray stage's input (the file list, cycled) to about this many seconds of "
                             "ideal all-core work, so start-up does not dominate (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rows-per-block", type=int, default=256)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Data stage")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    datasets: list[tuple[str, str]] = []
    for item in args.data or []:
        name, _, uri = item.partition("=")
        if not uri:
            parser.error(f"--data wants NAME=URI. Got {item!r}")
        datasets.append((name, uri))
    if not datasets:
        shared = os.path.abspath(default_shared)
        for name, sub in (("fracatlas-fullres", "fracatlas-fullres/FracAtlas/images"),
                          ("fracatlas", "fracatlas/FracAtlas/images")):
            if os.path.isdir(os.path.join(shared, sub)):
                datasets.append((name, os.path.join(shared, sub)))
    if not datasets:
        import tempfile

        tmp = tempfile.mkdtemp(prefix="fracray-bench-")
        print(f"No shared FracAtlas data found; generating a synthetic FracAtlas-layout set in {tmp}")
        generate_fracatlas(tmp, n_images=200, seed=0)
        datasets.append(("synthetic-fracatlas", os.path.join(tmp, "FracAtlas", "images")))

    config = PreprocessConfig(image_size=(args.image_size, args.image_size))
    results = []
    for name, uri in datasets:
        uris = _images_under(uri, args.limit)
        print(f"[{name}] {len(uris)} files from {uri} ...", flush=True)
        results.append(run_benchmark(name, uris, config=config, cores=args.cores, min_seconds=args.min_seconds,
                                     batch_size=args.batch_size, rows_per_block=args.rows_per_block,
                                     ray_seconds=args.ray_seconds, with_ray=not args.no_ray))
    print(f"\nMachine: {results[0].machine}; input {args.image_size}x{args.image_size}, ImageNet normalisation\n")
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) | {"ratios": r.ratios} for r in results], f, indent=2)
    return 0
