"""The cached ONNX export that the ONNX Runtime and OpenVINO engines run.

The export is cached on local disk, keyed by a hash of the weights, the model's description,
its input shape and the export settings (``$FRACRAY_ENGINE_CACHE``, default
``~/.cache/fracray/engines/<key>/model.onnx``). It is written under a lock, to a temporary
file renamed into place, so replicas and actors starting together on one machine export once
and never read half a file. Each runtime checks its own reading of the file once, at float32
against eager PyTorch within 1e-4 on a fixed input, before it uses it (a stamp
``verified-<runtime>-<version>.json`` beside the file records it): a graph a runtime reads
wrongly is never used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .choice import FAST_GRAPH_FILE

__all__ = ["CACHE_ENV", "EXPORT_TOLERANCE", "ExportMismatch", "ExportSettings", "CachedExport", "GraphRunner",
           "cached_export", "export_onnx", "cache_root", "cache_key", "weights_digest", "local_graph"]

CACHE_ENV = "FRACRAY_ENGINE_CACHE"
MODEL_FILE = "model.onnx"
INFO_FILE = "engine.json"
# Bump when what goes into the exported graph changes (the wrapper below, its outputs).
EXPORT_FORMAT = "fracray-onnx/1"
# Exported probabilities and maps must match eager PyTorch this closely on the check input.
EXPORT_TOLERANCE = 1e-4


class ExportMismatch(RuntimeError):
    """The exported graph's outputs differ from eager PyTorch's: the export is not used."""


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """What decides the exported graph besides the weights; part of the cache key."""

    # 18, not 17: OpenVINO (2026.4) reads opset 17's ReduceLogSumExp (axes as an attribute, in the
    # fracture-map fusion) as a reduction over every axis and cannot convert the graph.
    opset: int = 18
    exporter: str = "torchscript"
    dynamic_batch: bool = True
    precision: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fracray" / "engines"
    return Path(root).expanduser()


def weights_digest(model: nn.Module) -> str:
    """sha256 over the model's state (names, dtypes, shapes and bytes, in order): the content
    of the bundle's weights file, without reading it a second time."""
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cache_key(model: nn.Module, input_shape: tuple[int, int, int], settings: ExportSettings,
              model_spec: dict[str, Any] | None = None) -> str:
    import timm

    material = {"format": EXPORT_FORMAT, "weights": weights_digest(model), "model": model_spec or {},
                "class": type(model).__qualname__, "input_shape": list(input_shape), "export": settings.to_dict(),
                "torch": torch.__version__, "timm": timm.__version__}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


class _Exported(nn.Module):
    """What is exported: the network's plain forward, (logits, map logits) or logits alone.
    Flip averaging runs outside the graph, as ``FractureClassifier.infer`` does it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.localizes = bool(getattr(model, "localizes", False))

    def forward(self, x: torch.Tensor):
        if hasattr(self.model, "forward_with_map"):
            logits, maps = self.model.forward_with_map(x)
            return (logits, maps) if maps is not None else logits
        return self.model(x)


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on ``folder``'s lock file (one exporter per machine at a time)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still keeps readers safe
        yield
        return
    with open(folder / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users' workers
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], path: str | os.PathLike,
                settings: ExportSettings = ExportSettings()) -> list[str]:
    """Export ``model`` (eval mode, CPU, float32) to ``path``; returns the output names.
    The model's train/eval mode is left as it was."""
    wrapper = _Exported(model)
    was_training = model.training
    model.eval()
    wrapper.eval()  # the exporter restores the wrapper's mode afterwards, and with it the model's
    outputs = ["logits", "map_logits"] if wrapper.localizes else ["logits"]
    example = torch.zeros((1, *input_shape), dtype=torch.float32)
    axes = {n: {0: "batch"} for n in ["image", *outputs]} if settings.dynamic_batch else None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
            torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=settings.opset,
                              input_names=["image"], output_names=outputs, dynamic_axes=axes,
                              do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL)
    finally:
        model.train(was_training)
    return outputs


def _check_input(input_shape: tuple[int, int, int]) -> torch.Tensor:
    """A fixed radiograph-like input (smooth structure plus texture, ImageNet-normalised range)."""
    g = torch.Generator().manual_seed(0)
    c, h, w = input_shape
    low = torch.nn.functional.interpolate(torch.rand(1, 1, 8, 8, generator=g), size=(h, w), mode="bilinear",
                                          align_corners=False)
    image = (0.8 * low + 0.2 * torch.rand(1, 1, h, w, generator=g)).expand(1, c, h, w)
    return (image - 0.45) / 0.226


# Reads an exported file at float32 and runs it on one input: (path, N x C x H x W) -> outputs.
GraphRunner = Callable[[str, np.ndarray], list[np.ndarray]]


def _verify(model: nn.Module, input_shape: tuple[int, int, int], path: str, run: GraphRunner) -> dict[str, float]:
    """A runtime's float32 reading of the exported graph against eager PyTorch on one fixed
    input; raises :class:`ExportMismatch` above :data:`EXPORT_TOLERANCE`, else the differences."""
    x = _check_input(input_shape)
    got = run(path, x.numpy())
    was_training = model.training
    with torch.no_grad():
        expected = _Exported(model.eval())(x)
    model.train(was_training)
    logits, maps = expected if isinstance(expected, tuple) else (expected, None)
    diffs = {"probabilities": float((torch.from_numpy(np.asarray(got[0])).softmax(-1) - logits.softmax(-1)).abs().max())}
    if maps is not None:
        diffs["map"] = float((torch.sigmoid(torch.from_numpy(np.asarray(got[1]))) - torch.sigmoid(maps)).abs().max())
    if not max(diffs.values()) <= EXPORT_TOLERANCE:
        raise ExportMismatch(f"exported graph differs from eager PyTorch by {diffs} (> {EXPORT_TOLERANCE})")
    return diffs


@dataclasses.dataclass(frozen=True)
class CachedExport:
    """The model's ONNX file in the cache: ``exported`` is True when this call wrote it."""

    key: str
    folder: Path
    path: Path
    exported: bool


def cached_export(model: nn.Module, input_shape: tuple[int, int, int], *, runtime: str, run: GraphRunner,
                  model_spec: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                  settings: ExportSettings = ExportSettings()) -> CachedExport:
    """The cached export of ``model`` (see the module's docs), made on a miss, and checked once
    for ``runtime`` (a name with its version, e.g. "onnxruntime-1.32.0"): ``run`` reads the file
    at float32 and must give eager PyTorch's outputs within 1e-4; then a stamp
    ``verified-<runtime>.json`` records it. A new export is checked before it is published; a
    file that ``runtime`` reads wrongly raises :class:`ExportMismatch` and is not used."""
    input_shape = tuple(int(v) for v in input_shape)
    key = cache_key(model, input_shape, settings, model_spec)
    folder = cache_root(cache_dir) / key
    path = folder / MODEL_FILE
    stamp = folder / f"verified-{runtime}.json"
    exported = False
    if not (path.exists() and stamp.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder):
            diffs = None
            if not path.exists():  # another process may have made it while we waited
                start = time.perf_counter()
                found: dict[str, dict[str, float]] = {}

                def write(tmp: str) -> None:
                    export_onnx(model, input_shape, tmp, settings)
                    found["diffs"] = _verify(model, input_shape, tmp, run)

                _write_atomic(path, write)
                diffs = found["diffs"]
                info = {"format": EXPORT_FORMAT, "key": key, "input_shape": list(input_shape),
                        "export": settings.to_dict(), "torch": torch.__version__, "verified_by": runtime,
                        "export_seconds": round(time.perf_counter() - start, 3)}
                _write_atomic(folder / INFO_FILE, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
                exported = True
            if not stamp.exists():
                diffs = diffs if diffs is not None else _verify(model, input_shape, str(path), run)
                note = {"runtime": runtime, "max_difference": diffs, "tolerance": EXPORT_TOLERANCE}
                _write_atomic(stamp, lambda tmp: Path(tmp).write_text(json.dumps(note, indent=2)))
    return CachedExport(key, folder, path, exported)

def local_graph(data: bytes, cache_dir: str | os.PathLike | None = None) -> Path:
    """A graph's bytes (read from a bundle, which may be on object storage) as a local file in
    the engine cache, keyed by their sha256, so that OpenVINO can read it; written once per
    machine, atomically."""
    digest = hashlib.sha256(data).hexdigest()
    folder = cache_root(cache_dir) / f"graph-{digest[:32]}"
    path = folder / FAST_GRAPH_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))
    return path
