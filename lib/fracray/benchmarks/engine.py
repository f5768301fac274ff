"""Model-only CPU inference benchmark: eager PyTorch against the ONNX Runtime engine
(float32, "exact") and the OpenVINO engine in both fast kinds (INT8 on the quantised graph,
bf16 on the float one), batch 1, a fixed number of threads (default one), in one run.

For each model and input size: median and spread (10th-90th percentile) of ms/image over N
timed runs (the engines interleaved, so a busy machine slows both alike), images/s per core,
the model's FLOPs (counted once with torch's FlopCounterMode, multiply-add = 2 FLOPs) and the
GFLOP/s each engine achieves, against the CPU's float32 peak measured by a matmul
microbenchmark in the same run on the same threads. Ratios are against eager PyTorch.

The ONNX Runtime and OpenVINO numbers go through :class:`fracray.inference.engines.onnxruntime_engine.OnnxRuntimeEngine`
and :class:`~fracray.inference.engines.openvino_engine.OpenVinoEngine`, the classes BundleModel uses (their
export cache in a temporary folder unless told otherwise). The INT8 graph is quantised by
:func:`~fracray.inference.engines.int8.quantize_int8`, as validate-fast-mode does, calibrated here on
smooth random images (the timing does not depend on the ranges). The fast rows' GFLOP/s is set
against the float32 matmul peak too: bf16 and INT8 units can exceed it, which is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..inference.engines.choice import onnxruntime_available, openvino_available
from ..inference.engines.int8 import quantize_int8
from .preprocess import machine_description

# torch, the engines and the model registry are imported where they are used: `--help` answers
# in a fraction of a second instead of the ~4 s that importing them takes.
if TYPE_CHECKING:
    import torch

__all__ = ["main", "run", "matmul_peak", "count_flops", "format_table", "threading_check", "format_threading"]


def matmul_peak(n: int = 1024, repeats: int = 12) -> dict[str, float]:
    """float32 n x n x n matmul on torch's current threads: best and median GFLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    for _ in range(2):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    flops = 2.0 * n ** 3
    return {"n": n, "best_gflops": flops / min(times) / 1e9, "median_gflops": flops / float(np.median(times)) / 1e9}


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward (torch's FlopCounterMode: convolutions and matmuls, MAC = 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.forward_with_map(x)
    return float(counter.get_total_flops())


def _calibration_inputs(size: int, n: int = 8):
    """Smooth random images in the normalised range (what a calibration slice looks like to the
    quantiser, as far as timing goes)."""
    import torch

    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        low = torch.nn.functional.interpolate(torch.rand(1, 1, 8, 8, generator=g), size=(size, size),
                                              mode="bilinear", align_corners=False)
        image = (0.8 * low + 0.2 * torch.rand(1, 1, size, size, generator=g)).expand(1, 3, size, size)
        yield ((image - 0.45) / 0.226).numpy()


def _time_interleaved(fns: dict[str, Callable[[], Any]], runs: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _stats(seconds: list[float], flops: float, threads: int, peak: float) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    median = float(np.median(ms))
    gflops = flops / (median / 1e3) / 1e9
    return {"ms_median": median, "ms_p10": float(np.percentile(ms, 10)), "ms_p90": float(np.percentile(ms, 90)),
            "images_per_s_per_core": 1000.0 / median / threads, "gflops": gflops, "peak_fraction": gflops / peak}


def _threading_worker(name: str, size: int, fracture_map: bool, cache: str, threads: int, seconds: float,
                      barrier, results) -> None:
    """One scoring process: the exact engine with ``threads`` threads, images counted for
    ``seconds`` once every process is ready."""
    import torch

    from ..inference.engines.onnxruntime_engine import OnnxRuntimeEngine
    from ..models.registry import create_model

    torch.manual_seed(0)  # the weights, hence the export's cache key, of the parent's model
    torch.set_num_threads(threads)
    model = create_model(name, pretrained=False, localization=fracture_map).eval()
    engine = OnnxRuntimeEngine(model, (3, size, size), cache_dir=cache, threads=threads,
                               model_spec={"name": name, "localization": fracture_map})
    x = torch.randn(1, 3, size, size)
    engine.infer(x)
    barrier.wait()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.infer(x)
        count += 1
    results.put((count, time.perf_counter() - start))


def _collect(workers, results, deadline: float) -> list[tuple[int, float]]:
    """Each worker's (count, seconds); a worker that dies first is an error, not a wait until
    the deadline (the others are stopped)."""
    import queue

    counts: list[tuple[int, float]] = []
    while len(counts) < len(workers):
        try:
            counts.append(results.get(timeout=1))
        except queue.Empty:
            failed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                for w in workers:
                    w.kill()
                raise RuntimeError(f"threading benchmark: a worker process failed (exit codes {failed}) or "
                                   f"timed out; run it again with --threading 0 to see the model alone")
    for w in workers:
        w.join()
    return counts


def threading_check(*, model: str, size: int, seconds: float, cache_dir: str, fracture_map: bool = False,
                    cpus: int | None = None, log=print) -> list[dict[str, Any]]:
    """Aggregate images/s of the exact engine when ``cpus`` processes score at once (as scoring
    actors and Serve replicas do, one CPU each), with one runtime thread per process (what the
    engine sets: one per reserved CPU) against ``cpus`` threads per process (each runtime using
    every core, as its default would: oversubscribed), and one process with ``cpus`` threads."""
    import multiprocessing

    cpus = cpus or os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")  # fresh runtimes, no forked thread pools
    rows = []
    for label, processes, threads in (("one thread per reserved CPU (the engine)", cpus, 1),
                                      ("every process on every core (oversubscribed)", cpus, cpus),
                                      ("one process, every core", 1, cpus)):
        log(f"threading: {processes} process(es) x {threads} thread(s), {seconds:.0f} s ...")
        barrier, results = context.Barrier(processes), context.Queue()
        workers = [context.Process(target=_threading_worker,
                                   args=(model, size, fracture_map, cache_dir, threads, seconds, barrier, results))
                   for _ in range(processes)]
        for w in workers:
            w.start()
        counts = _collect(workers, results, deadline=time.monotonic() + 600 + seconds)
        rows.append({"setting": label, "processes": processes, "threads_per_process": threads,
                     "images_per_s": sum(c / t for c, t in counts)})
    for row in rows:
        row["vs_engine"] = row["images_per_s"] / rows[0]["images_per_s"]
    return rows


def format_threading(rows: list[dict[str, Any]], model: str, size: int) -> str:
    lines = [f"Threading: {model} at {size}, exact engine, processes scoring at once (images/s, all together)",
             f"{'setting':<48}{'processes':>10}{'threads each':>14}{'images/s':>10}{'vs engine':>11}"]
    for r in rows:
        lines.append(f"{r['setting']:<48}{r['processes']:>10}{r['threads_per_process']:>14}"
                     f"{r['images_per_s']:>10.1f}{r['vs_engine']:>10.2f}x")
    return "\n".join(lines)


def run(*, models: list[str], sizes: list[int], runs: int = 30, warmup: int = 5, threads: int = 1,
        fracture_map: bool = False, cache_dir: str | None = None, fast: bool = True, threading_seconds: float = 0,
        log=print) -> dict[str, Any]:
    """``fast``: also time the fast precision (OpenVINO INT8 and bf16), where openvino is installed;
    ``threading_seconds`` > 0: also :func:`threading_check` on the first model and size, that long
    per setting."""
    import torch

    from ..inference.engines.onnxruntime_engine import OnnxRuntimeEngine
    from ..inference.engines.openvino_engine import OpenVinoEngine
    from ..models.registry import create_model

    if not onnxruntime_available():
        raise SystemExit("onnxruntime is not installed: pip install the project (it is a dependency)")
    fast = fast and openvino_available()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    peak = matmul_peak()
    log(f"matmul float32 peak, {threads} thread(s): {peak['best_gflops']:.1f} GFLOP/s "
        f"(median {peak['median_gflops']:.1f})")
    cache = cache_dir or tempfile.mkdtemp(prefix="fracray-bench-engine-")
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = create_model(name, pretrained=False, localization=fracture_map).eval()
        for size in sizes:
            x = torch.randn(1, 3, size, size)
            flops = count_flops(model, x)
            start = time.perf_counter()
            ort = OnnxRuntimeEngine(model, (3, size, size), cache_dir=cache, threads=threads,
                                    model_spec={"name": name, "localization": fracture_map})
            engines: dict[str, Callable[[], Any]] = {"onnxruntime exact": lambda: ort.infer(x)}
            if fast:
                ov = OpenVinoEngine(model, (3, size, size), cache_dir=cache, threads=threads,
                                    model_spec={"name": name, "localization": fracture_map})
                engines[f"openvino fast ({ov.precision})"] = lambda: ov.infer(x)
                graph = os.path.join(cache, f"{name}-{size}-int8.onnx")
                quantize_int8(ort.path, lambda: _calibration_inputs(size), graph)
                ov8 = OpenVinoEngine(model, (3, size, size), cache_dir=cache, threads=threads, graph=graph)
                engines[f"openvino fast ({ov8.precision})"] = lambda: ov8.infer(x)
            log(f"{name} {size}: {flops / 1e9:.2f} GFLOP/image; {len(engines)} engine(s) ready in "
                f"{time.perf_counter() - start:.1f} s; timing {runs} runs ...")

            def eager():
                with torch.no_grad():
                    return model.forward_with_map(x)

            times = _time_interleaved({"eager torch": eager, **engines}, runs, warmup)
            results = {engine: _stats(t, flops, threads, peak["best_gflops"]) for engine, t in times.items()}
            base = results["eager torch"]["ms_median"]
            for engine, r in results.items():
                r["speedup_vs_eager"] = base / r["ms_median"]
                rows.append({"model": name, "size": size, "engine": engine, "gflop_per_image": flops / 1e9, **r})
    threading_rows = (threading_check(model=models[0], size=sizes[0], seconds=threading_seconds, cache_dir=cache,
                                      fracture_map=fracture_map, log=log) if threading_seconds > 0 else None)
    return {"machine": machine_description(), "processor": platform.processor(), "threads": threads, "batch": 1,
            "threading": threading_rows,
            "runs": runs, "fracture_map": fracture_map, "matmul_peak": peak, "rows": rows,
            "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
            "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
            "openvino": __import__("openvino").__version__ if fast else None}


def format_table(result: dict[str, Any]) -> str:
    peak = result["matmul_peak"]
    lines = [f"{result['machine']}; {result['threads']} thread(s), batch 1, {result['runs']} timed runs "
             f"(median, p10-p90); torch {result['torch']}, onnxruntime {result['onnxruntime']}"
             + (f", openvino {result['openvino']}" if result.get("openvino") else "")
             + ("; with the fracture map" if result["fracture_map"] else ""),
             f"float32 matmul peak ({peak['n']}^3, same threads): {peak['best_gflops']:.1f} GFLOP/s",
             "load average (1, 5, 15 min) before: " + ", ".join(f"{v:.1f}" for v in result["load_average_before"])
             + "; after: " + ", ".join(f"{v:.1f}" for v in result["load_average_after"]),
             "",
             f"{'model':<20}{'size':>5}  {'engine':<24}{'ms/image':>9}  {'p10-p90':>13}  {'img/s/core':>10}"
             f"  {'GFLOP':>6}  {'GFLOP/s':>8}  {'% peak':>6}  {'vs eager':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['model']:<20}{r['size']:>5}  {r['engine']:<24}{r['ms_median']:>9.2f}  "
                     f"{r['ms_p10']:>6.1f}-{r['ms_p90']:<6.1f}  {r['images_per_s_per_core']:>10.1f}  "
                     f"{r['gflop_per_image']:>6.2f}  {r['gflops']:>8.1f}  {100 * r['peak_fraction']:>5.1f}%  "
                     f"{r['speedup_vs_eager']:>7.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str = "bench_engine.py") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Model-only CPU inference: eager PyTorch vs the ONNX Runtime engine (float32, exact) and "
                    "the OpenVINO engine (fast: INT8 on the quantised graph, and bf16), batch 1, "
                    "ms/image, images/s per core and achieved GFLOP/s against a float32 matmul peak measured "
                    "in the same run.")
    parser.add_argument("--models", default="efficientnet_lite0",
                        help="comma-separated backbones of fracray.models.registry (default: %(default)s; an "
                             "unknown name is refused with the list)")
    parser.add_argument("--sizes", default="224,384", help="square input sizes (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per engine (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="threads for every engine and the matmul "
                                                               "(default: %(default)s)")
    parser.add_argument("--fracture-map", action="store_true",
                        help="include the fracture-map branch (the localising models' extra head)")
    parser.add_argument("--no-fast", dest="fast", action="store_false",
                        help="leave out the fast precision (OpenVINO INT8 and bf16; timed by default where "
                             "installed)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the ONNX export goes (default: a new temporary folder)")
    parser.add_argument("--threading", type=float, default=0, metavar="SECONDS",
                        help="also measure oversubscription: as many processes as CPUs scoring at once with the "
                             "exact engine, one thread each (what actors and replicas run) against every process "
                             "on every core, and one process on every core; SECONDS per setting, on the first "
                             "model and size (default: 0, not measured)")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    from ..models.registry import list_models

    unknown = sorted(set(models) - set(list_models()))
    if unknown:
        parser.error(f"unknown models {unknown}; registered: {list_models()}")
    if args.runs < 1 or args.threads < 1:
        parser.error("--runs and --threads must be >= 1")
    if args.threading < 0:
        parser.error(f"--threading must be >= 0 seconds. Got {args.threading}")
    result = run(models=models, sizes=[int(s) for s in args.sizes.split(",")], runs=args.runs, warmup=args.warmup,
                 threads=args.threads, fracture_map=args.fracture_map, cache_dir=args.cache_dir, fast=args.fast,
                 threading_seconds=args.threading)
    print(format_table(result))
    if result["threading"]:
        print()
        print(format_threading(result["threading"], models[0], int(args.sizes.split(",")[0])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
