"""Inference engines behind :class:`~fracray.inference.predictor.BundleModel`: what runs a
bundle's network forward, chosen per device and precision.

- ``torch``: the model itself (``model.infer``): eager PyTorch, on CPU or CUDA. Grad-CAM and
  anything else that needs gradients always uses it.
- ``onnxruntime``: on CPU, the network exported once to ONNX (TorchScript-based exporter,
  float32) and run by ONNX Runtime. Same outputs as eager PyTorch (within 1e-4 on
  probabilities and fracture maps: tests/test_engine.py), about twice as fast per core.
- ``auto`` (the default): onnxruntime on CPU where it is installed, torch on CUDA.
- ``openvino`` (not chosen by name: it is the "fast" precision below): the bundle's INT8 graph,
  or the cached ONNX export at bf16, compiled by OpenVINO's CPU plugin.

Two precisions:

- ``exact`` (the default): float32, one of the engines above; outputs equal to eager PyTorch.
- ``fast``: OpenVINO on CPU, in the kind the bundle's validation chose (:data:`FAST_KINDS`):
  ``int8``, the export quantised by ONNX Runtime's static post-training quantisation (QDQ,
  per-channel weights) on a calibration slice of the training images, a graph stored in the
  bundle (``fast_int8.onnx``, its sha256 in the record); or ``bf16``, the cached export with
  ``INFERENCE_PRECISION_HINT`` bf16 (on a CPU without bf16 the plugin runs float32 and the
  engine says so in its precision). Its outputs are *not* equal to eager PyTorch, so it is
  allowed per bundle only where the bundle's ``bundle.json`` records a
  passed validation (``inference.fast_mode``, written by ``fracray validate-fast-mode``:
  ΔAUROC <= 0.005 and Δsensitivity at the bundle's threshold <= 0.01 on FracAtlas valid,
  see :mod:`fracray.evaluation.fast_mode`) for these weights, that kind and this OpenVINO version;
  elsewhere it is refused with the command that validates it. Not offered on CUDA. A router
  (a body-part bundle) runs exact in fast mode: the gate is defined on fracture classifiers.

``FRACRAY_ENGINE`` (auto, torch, onnxruntime) and ``FRACRAY_PRECISION`` (exact, fast), when
set, decide for the whole process, over what the code asks: Serve replicas and scoring actors
inherit them from their environment.

The export is cached on local disk, keyed by a hash of the weights, the model's description,
its input shape and the export settings (``$FRACRAY_ENGINE_CACHE``, default
``~/.cache/fracray/engines/<key>/model.onnx``). It is written under a lock, to a temporary
file renamed into place, so replicas and actors starting together on one machine export once
and never read half a file. Each runtime checks its own reading of the file once, at float32
against eager PyTorch within 1e-4 on a fixed input, before it uses it (a stamp
``verified-<runtime>-<version>.json`` beside the file records it): a graph a runtime reads
wrongly is never used.

Threads: each runtime gets one intra-op thread per CPU that Ray reserved for the calling
actor or replica (rounded, at least 1), else ``torch.get_num_threads()``; ONNX Runtime's
worker threads do not spin between runs and OpenVINO's are not pinned to cores, so actors
sharing a machine do not steal each other's cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

# Where a bundle records its fast-mode validation (bundle.json's inference[FAST_MODE_KEY]) and the
# gate it must have passed: the bundle format's rules (artifacts.bundle).
from ..artifacts.bundle import FAST_MODE_KEY
from ..models.detection import flip_dense_back
from ..artifacts.bundle import FAST_MODE_MAX_DELTA_AUROC as MAX_DELTA_AUROC
from ..artifacts.bundle import FAST_MODE_MAX_DELTA_SENSITIVITY as MAX_DELTA_SENSITIVITY
from ..artifacts.bundle import FAST_MODE_NOT_FOR_VALIDATION as NOT_FOR_VALIDATION

__all__ = ["ENGINES", "ENGINE_ENV", "CACHE_ENV", "PRECISIONS", "PRECISION_ENV", "DEFAULT_PRECISION",
           "InferenceEngine", "TorchEngine", "OnnxRuntimeEngine", "OpenVinoEngine", "ExportSettings",
           "CachedExport", "cached_export", "requested_engine", "resolve_engine", "requested_precision",
           "resolve_precision", "make_engine", "onnxruntime_available", "openvino_available", "openvino_version",
           "cache_root", "cache_key", "weights_digest", "default_threads", "ExportMismatch", "engine_label",
           "FAST_ENGINE", "FAST_PRECISION", "FAST_KINDS", "FAST_GRAPH_FILE", "FAST_MODE_KEY", "FastModeRefused",
           "check_fast_mode", "fast_mode_command", "quantize_int8", "float_front", "FLOAT_FRONT_STRIDE", "local_graph"]

ENGINES = ("auto", "torch", "onnxruntime")
ENGINE_ENV = "FRACRAY_ENGINE"
CACHE_ENV = "FRACRAY_ENGINE_CACHE"
PRECISIONS = ("exact", "fast")
PRECISION_ENV = "FRACRAY_PRECISION"
DEFAULT_PRECISION = "exact"
# What "fast" is: the engine and the precision it asks the runtime for (what a validation records).
FAST_ENGINE = "openvino"
FAST_PRECISION = "bf16"
# The kinds of fast a validation can choose (the record's "precision"): int8 runs the bundle's
# quantised graph, FAST_GRAPH_FILE beside its weights; bf16 the float export at bf16.
FAST_KINDS = ("int8", FAST_PRECISION)
FAST_GRAPH_FILE = "fast_int8.onnx"
MODEL_FILE = "model.onnx"
INFO_FILE = "engine.json"
# Bump when what goes into the exported graph changes (the wrapper below, its outputs).
EXPORT_FORMAT = "fracray-onnx/1"
# Exported probabilities and maps must match eager PyTorch this closely on the check input.
EXPORT_TOLERANCE = 1e-4


class ExportMismatch(RuntimeError):
    """The exported graph's outputs differ from eager PyTorch's: the export is not used."""


class FastModeRefused(ValueError):
    """A bundle asked to run in fast precision without a passed validation of it."""


class InferenceEngine(Protocol):
    """Runs a bundle's network forward. ``infer`` is ``FractureClassifier.infer``'s contract:
    a float32 N x C x H x W batch -> (N x classes logits, N x h x w fracture-map logits or None),
    with test-time flip averaging when ``tta_flip``."""

    name: str
    precision: str

    def infer(self, x: torch.Tensor, *, tta_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def describe(self) -> dict[str, Any]: ...


def engine_label(engine: InferenceEngine) -> str:
    """How answers and scoring output name the engine that computed them: ``<engine>-<precision>``."""
    return f"{engine.name}-{engine.precision}"


class TorchEngine:
    """Eager PyTorch: the model's own ``infer`` (today's path; CPU or CUDA)."""

    name = "torch"
    precision = "float32"

    def __init__(self, model: nn.Module):
        self.model = model

    def infer(self, x: torch.Tensor, *, tta_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model.infer(x, tta_flip=tta_flip)

    def describe(self) -> dict[str, Any]:
        device = next(self.model.parameters()).device
        return {"engine": self.name, "precision": self.precision, "device": str(device),
                "threads": torch.get_num_threads() if device.type == "cpu" else None}


# ----------------------------------------------------------------------------- choosing


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_version() -> str | None:
    """The installed OpenVINO's release ("2026.4.1"), or None without it (what a validation records)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openvino")
    except PackageNotFoundError:
        return None


def requested_engine(engine: str | None = None, *, environment: bool = True) -> str:
    """The engine asked for: ``$FRACRAY_ENGINE`` when set (it decides for the whole process;
    ``environment=False`` ignores it), else ``engine``, else "auto". Raises ValueError naming
    the choices for anything else."""
    env = os.environ.get(ENGINE_ENV, "").strip() if environment else ""
    name = (env or engine or "auto").strip().lower()
    if name not in ENGINES:
        source = f"${ENGINE_ENV}" if env else "engine"
        hint = f" (OpenVINO is the fast precision: {PRECISION_ENV}=fast)" if name == FAST_ENGINE else ""
        raise ValueError(f"Unknown inference engine {name!r} ({source}); choose one of {', '.join(ENGINES)}{hint}")
    return name


def resolve_engine(engine: str | None, device: str | torch.device, *, environment: bool = True) -> str:
    """"torch" or "onnxruntime" for this device (see :func:`requested_engine`): auto means
    onnxruntime on CPU where it is installed, torch elsewhere."""
    name = requested_engine(engine, environment=environment)
    device = torch.device(device)
    if name == "auto":
        return "onnxruntime" if device.type == "cpu" and onnxruntime_available() else "torch"
    if name == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(f"The onnxruntime engine runs on CPU only; this model is on {device} (use torch)")
        if not onnxruntime_available():
            raise ValueError("The onnxruntime engine needs the onnxruntime package (pip install onnxruntime)")
    return name


def requested_precision(precision: str | None = None, *, environment: bool = True) -> str:
    """The precision asked for: ``$FRACRAY_PRECISION`` when set (it decides for the whole
    process; ``environment=False`` ignores it), else ``precision``, else "exact". Raises
    ValueError naming the choices for anything else."""
    env = os.environ.get(PRECISION_ENV, "").strip() if environment else ""
    name = (env or precision or DEFAULT_PRECISION).strip().lower()
    if name not in PRECISIONS:
        source = f"${PRECISION_ENV}" if env else "precision"
        raise ValueError(f"Unknown precision {name!r} ({source}); choose one of {', '.join(PRECISIONS)}")
    return name


def resolve_precision(precision: str | None, device: str | torch.device, engine: str | None = None, *,
                      environment: bool = True) -> str:
    """"exact" or "fast" (see :func:`requested_precision`). Fast runs on CPU only, on its own
    engine (OpenVINO): with CUDA, or with torch/onnxruntime asked for by name, it raises."""
    name = requested_precision(precision, environment=environment)
    if name == "fast":
        _check_fast_runs_here(device, engine, environment=environment)
    return name


def _check_fast_runs_here(device: str | torch.device, engine: str | None, *, environment: bool) -> None:
    device = torch.device(device)
    if device.type != "cpu":
        raise ValueError(f"The fast precision (OpenVINO, {' or '.join(FAST_KINDS)}) runs on CPU only; this model is on "
                         f"{device}: use the exact precision (unset ${PRECISION_ENV})")
    asked = requested_engine(engine, environment=environment)
    if asked != "auto":
        raise ValueError(f"The fast precision runs on the {FAST_ENGINE} engine, but engine {asked!r} was asked for "
                         f"(${ENGINE_ENV} or the code): use engine auto with precision fast, or precision exact")
    if not openvino_available():
        raise ValueError("The fast precision needs the openvino package (pip install the project: it is a "
                         "dependency)")


def fast_mode_command(bundle: str, dataset: str | None = None, data: str | None = None) -> str:
    """The command that validates ``bundle``'s fast mode (the data as the bundle's training
    recorded it, where it did)."""
    return (f"fracray validate-fast-mode --bundle {bundle} --dataset {dataset or 'fracatlas'} "
            f"--data {data or '<the FracAtlas folder>'} --split valid")


def check_fast_mode(record: Any, *, bundle: str, command: str, weights_sha256: str | None = None,
                    engine: InferenceEngine | None = None) -> None:
    """Raise :class:`FastModeRefused` (a ValueError naming the bundle and ``command``) unless
    ``record`` (bundle.json's ``inference.fast_mode``) is a passed validation of these
    weights (``weights_sha256``) and, given the built ``engine``, of its engine, precision and
    OpenVINO version."""

    def refuse(why: str) -> None:
        raise FastModeRefused(f"Fast precision refused for bundle {bundle}: {why}. A bundle runs fast only after "
                              f"a passed validation of fast against exact on labelled data (AUROC and sensitivity "
                              f"at its threshold within the gate of `fracray validate-fast-mode --help`). "
                              f"Validate it with: {command}   (or run it exact: unset ${PRECISION_ENV})")

    if not record:
        refuse(f"its bundle.json records no fast-mode validation (inference.{FAST_MODE_KEY})")
    if not isinstance(record, dict):
        refuse(f"inference.{FAST_MODE_KEY} in its bundle.json is not a validation record")
    if record.get("passed") is not True:
        refuse(f"its fast-mode validation failed ({_record_summary(record)})")
    gate = (record.get("max_delta_auroc"), record.get("max_delta_sensitivity"))
    if not all(isinstance(v, (int, float)) for v in gate) or gate[0] > MAX_DELTA_AUROC \
            or gate[1] > MAX_DELTA_SENSITIVITY:
        refuse(f"it was validated against the gate |ΔAUROC| <= {gate[0]}, |Δsensitivity| <= {gate[1]}, not "
               f"this version's {MAX_DELTA_AUROC} and {MAX_DELTA_SENSITIVITY}")
    if record.get("split") in NOT_FOR_VALIDATION:
        refuse(f"it was measured on split {record.get('split')!r}, which holds images the model was trained on")
    if weights_sha256 is not None and record.get("weights_sha256") != weights_sha256:
        refuse("its weights are not the ones validated (weights_sha256 differs or is missing)")
    if engine is not None:
        if (record.get("engine"), record.get("precision")) != (engine.name, engine.precision):
            refuse(f"it was validated for {record.get('engine')}-{record.get('precision')}, and this machine "
                   f"runs {engine_label(engine)}")
        ran = engine.describe().get("openvino")
        if record.get("openvino") != ran:
            refuse(f"it was validated with OpenVINO {record.get('openvino')}, and {ran} is installed")
        if record.get("precision") == "int8" and engine.describe().get("graph_sha256") != record.get("graph_sha256"):
            refuse(f"its INT8 graph ({record.get('graph')}) is not the one validated (graph_sha256 differs)")


def _record_summary(record: dict[str, Any]) -> str:
    def num(key: str) -> str:
        value = record.get(key)
        return f"{value:+.5f}" if isinstance(value, (int, float)) else "?"

    return (f"ΔAUROC {num('delta_auroc')}, Δsensitivity {num('delta_sensitivity')} on {record.get('images', '?')} "
            f"images of {record.get('dataset', '?')} {record.get('split', '?')}, {record.get('validated_at', '?')}")


def make_engine(model: nn.Module, input_shape: tuple[int, int, int], *, engine: str | None = None,
                device: str | torch.device = "cpu", model_spec: dict[str, Any] | None = None,
                cache_dir: str | os.PathLike | None = None, threads: int | None = None,
                precision: str | None = None, environment: bool = True,
                fast_graph: str | os.PathLike | None = None) -> InferenceEngine:
    """The engine for a loaded model whose input is ``input_shape`` (C, H, W). ``model_spec``:
    what identifies the model beyond its weights (the bundle's model description), part of the
    cache key. With "auto", a model that does not export faithfully runs on torch (a warning
    says why); asked for by name, onnxruntime raises instead. ``precision``: "exact" or "fast"
    as given, for the caller has decided it (:func:`resolve_precision` reads
    ``$FRACRAY_PRECISION``; BundleModel calls it); "fast" is OpenVINO (bf16, or int8 on ``fast_graph``), never a fallback,
    and whether a bundle may run it is the caller's check (:func:`check_fast_mode`).
    ``environment=False``: ignore ``$FRACRAY_ENGINE`` (the fast-mode validation runs both).
    ``fast_graph``: in fast precision, a quantised (INT8) graph to run instead of the export at bf16."""
    if requested_precision(precision, environment=False) == "fast":
        _check_fast_runs_here(device, engine, environment=environment)
        return OpenVinoEngine(model, input_shape, model_spec=model_spec, cache_dir=cache_dir, threads=threads,
                              graph=fast_graph)
    name = resolve_engine(engine, device, environment=environment)
    if name == "torch":
        return TorchEngine(model)
    try:
        return OnnxRuntimeEngine(model, input_shape, model_spec=model_spec, cache_dir=cache_dir, threads=threads)
    except Exception as exc:
        if requested_engine(engine, environment=environment) != "auto":
            raise
        warnings.warn(f"ONNX Runtime engine unavailable for this model ({type(exc).__name__}: {exc}); "
                      f"running it on eager PyTorch", RuntimeWarning, stacklevel=2)
        return TorchEngine(model)


def default_threads() -> int:
    """Intra-op threads: the CPUs Ray reserved for this actor, replica or task (rounded, at
    least 1) when called inside one, else torch's thread count."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; elsewhere there is nothing to ask
    if ray is not None:
        try:
            if ray.is_initialized():
                context = ray.get_runtime_context()
                if context.worker.mode == ray.WORKER_MODE:
                    return max(1, round(float(context.get_assigned_resources().get("CPU", 0))))
        except Exception:  # a Ray without these APIs: fall back to torch's count
            pass
    return max(1, torch.get_num_threads())


# ----------------------------------------------------------------------------- the export and its cache


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


def _flip_averaged(run: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor | None]], x: torch.Tensor,
                   tta_flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """As ``FractureClassifier.infer``: the same averaging, in the same order, on a runtime's
    outputs (``run``: a float32 N x C x H x W array -> logits, map logits or None)."""
    array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
    logits, maps = run(array)
    if tta_flip:
        logits_f, maps_f = run(np.ascontiguousarray(array[..., ::-1]))
        logits = (logits + logits_f) / 2
        maps = None if maps is None else (maps + flip_dense_back(maps_f)) / 2
    return logits, maps


# ----------------------------------------------------------------------------- ONNX Runtime (exact)


def _onnxruntime_outputs(path: str, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


class _ExportedGraphEngine:
    """What the engines that run the cached export share: flip averaging exactly as
    ``FractureClassifier.infer`` does it, on the runtime's outputs (``_run``), and the
    description (``_describe_extra`` adds a runtime's own facts)."""

    name: str
    precision: str
    threads: int
    path: Path
    key: str

    def _run(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def infer(self, x: torch.Tensor, *, tta_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``FractureClassifier.infer``: the same averaging, in the same order, on the
        runtime's outputs."""
        return _flip_averaged(self._run, x, tta_flip)

    def _describe_extra(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "precision": self.precision, "device": "cpu", "threads": self.threads,
                "onnx": str(self.path), "cache_key": self.key, **self._describe_extra()}


class OnnxRuntimeEngine(_ExportedGraphEngine):
    """The network exported to ONNX (cached, see the module's docs) and run by ONNX Runtime
    on CPU, float32: outputs equal to eager PyTorch within 1e-4."""

    name = "onnxruntime"
    precision = "float32"

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], *,
                 model_spec: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                 threads: int | None = None, settings: ExportSettings = ExportSettings()):
        import onnxruntime as ort

        if next(model.parameters()).device.type != "cpu":
            raise ValueError("The onnxruntime engine runs on CPU only")
        self.input_shape = tuple(int(v) for v in input_shape)
        self.settings = settings
        self.localizes = bool(getattr(model, "localizes", False))
        export = cached_export(model, self.input_shape, runtime=f"onnxruntime-{ort.__version__}",
                               run=_onnxruntime_outputs, model_spec=model_spec, cache_dir=cache_dir, settings=settings)
        self.key, self.folder, self.path = export.key, export.folder, export.path
        self.exported = export.exported  # True when this object made the file (a cache miss)
        self.threads = int(threads) if threads else default_threads()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.session.run(self.output_names, {self.input_name: x})
        return torch.from_numpy(out[0]), (torch.from_numpy(out[1]) if len(out) > 1 else None)


# ----------------------------------------------------------------------------- OpenVINO (fast)


def _openvino_config(precision: str, threads: int) -> dict[str, Any]:
    """The CPU plugin's settings: ``threads`` inference threads for one request at a time,
    not pinned to cores (Ray actors sharing a machine would all pin to the same first ones)."""
    return {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}


def _openvino_outputs(path: str, x: np.ndarray) -> list[np.ndarray]:
    """OpenVINO's float32 reading of the file (the export check for this runtime)."""
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", _openvino_config("f32", 1))
    result = compiled.create_infer_request().infer({0: x})
    return [np.array(result[out]) for out in compiled.outputs]


def _type_name(value: Any) -> str:
    """An OpenVINO element type as its short name ("bf16", "f32")."""
    name = getattr(value, "get_type_name", None)
    return str(name() if callable(name) else value)


class OpenVinoEngine(_ExportedGraphEngine):
    """The fast precision: the same cached ONNX export as :class:`OnnxRuntimeEngine`,
    compiled by OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT`` bf16. ``precision``
    is what the compiled model reports (bf16 where the CPU has it, else f32). Not equal to
    eager PyTorch: a bundle runs it only after a passed validation (see the module's docs)."""

    name = FAST_ENGINE
    precision = FAST_PRECISION

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], *,
                 model_spec: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                 threads: int | None = None, settings: ExportSettings = ExportSettings(),
                 precision: str = FAST_PRECISION, graph: str | os.PathLike | None = None):
        import openvino as ov

        if next(model.parameters()).device.type != "cpu":
            raise ValueError("The openvino engine runs on CPU only")
        self.input_shape = tuple(int(v) for v in input_shape)
        self.settings = settings
        self.localizes = bool(getattr(model, "localizes", False))
        self.version = openvino_version() or ov.__version__
        self.graph_sha256 = None
        if graph is None:  # the float export (checked once against eager PyTorch), at ``precision``
            export = cached_export(model, self.input_shape, runtime=f"openvino-{self.version}",
                                   run=_openvino_outputs, model_spec=model_spec, cache_dir=cache_dir,
                                   settings=settings)
            self.key, self.folder, self.path = export.key, export.folder, export.path
            self.exported = export.exported
        else:  # a quantised graph: its INT8 operations run as quantised, the rest at float32
            self.path = Path(graph)
            self.graph_sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
            self.key, self.folder, self.exported = self.graph_sha256[:32], self.path.parent, False
            precision = "f32"
        self.threads = int(threads) if threads else default_threads()
        core = ov.Core()
        network = core.read_model(str(self.path))
        # Compiled for one image (static shapes are the CPU plugin's fast path, and the CPU
        # runs image by image: BundleModel.predict); a bigger batch runs as a loop.
        network.reshape([1, *self.input_shape])
        self.compiled = core.compile_model(network, "CPU", _openvino_config(precision, self.threads))
        self.precision = ("int8" if graph is not None
                          else _type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT")))
        self.outputs = list(self.compiled.outputs)
        # One request, one call at a time (a request is not thread-safe; with one stream,
        # parallel requests would only queue behind each other).
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def _run_one(self, x: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            result = self._request.infer({0: x})
            return [np.array(result[o], dtype=np.float32, copy=True) for o in self.outputs]  # it reuses its buffers

    def _run(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        if len(x) == 0:  # no images: outputs with no rows
            return tuple(None if t is None else t[:0] for t in self._run(np.zeros((1, *x.shape[1:]), np.float32)))
        out = [np.concatenate(parts) for parts in zip(*(self._run_one(x[i:i + 1]) for i in range(len(x))))]
        return torch.from_numpy(out[0]), (torch.from_numpy(out[1]) if len(out) > 1 else None)

    def _describe_extra(self) -> dict[str, Any]:
        return {"openvino": self.version, **({"graph_sha256": self.graph_sha256} if self.graph_sha256 else {})}


# ----------------------------------------------------------------------------- INT8 (fast)


# Quantised only where the feature maps are at most 1/FLOAT_FRONT_STRIDE of the input: the
# full-resolution front (the stem and the stages at stride 2 and 4, where a hairline fracture is a
# few pixels wide) stays float32. Measured on the 384 px FracAtlas bundle: INT8 everywhere moved
# probabilities by 0.07 on average (AUROC -0.006, gate failed), most of it from quantising the
# normalised image itself at the stem; with the front in float the mean change was 0.01.
FLOAT_FRONT_STRIDE = 8
# Calibration inputs run through the graph at a time: ORT keeps every activation of every input
# it has been given until it computes ranges (percentile calibration on 128 inputs at 384 px was
# killed for memory on a 24 GiB machine).
CALIBRATION_STRIDE_MAX = 16


def float_front(graph_path: str | os.PathLike, sample: np.ndarray, stride: int = FLOAT_FRONT_STRIDE) -> list[str]:
    """The nodes of the ONNX graph at ``graph_path`` whose outputs are feature maps taller than
    1/``stride`` of the input (``sample``, one N x C x H x W input): the high-resolution front
    that INT8 leaves in float. The sizes are measured by running the graph once on ``sample``
    with every node's output exposed (static shape inference cannot follow the 'same' padding
    that timm computes from the input's shape)."""
    import onnx
    import onnxruntime

    model = onnx.load(str(graph_path))
    graph = model.graph
    known = {o.name for o in graph.output}
    outputs = [out for node in graph.node for out in node.output if out and out not in known]
    graph.output.extend(onnx.ValueInfoProto(name=out) for out in outputs)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    shapes = {name: np.shape(value) for name, value in zip(names, session.run(names, {graph.input[0].name: sample}))}
    height = sample.shape[2]
    return [node.name for node in graph.node
            if any(len(shapes.get(out, ())) == 4 and shapes[out][2] * stride > height for out in node.output)]


def quantize_int8(float_graph: str | os.PathLike, calibration: Callable[[], Any], out_path: str | os.PathLike,
                  *, method: str = "minmax") -> dict[str, Any]:
    """ONNX Runtime's static post-training quantisation of ``float_graph`` (the cached float
    export) into ``out_path``: QDQ format, INT8 weights per output channel, UINT8 activations
    whose ranges come from running ``calibration()`` (an iterable of float32 N x C x H x W
    model inputs, as BundleModel prepares them) through the graph, a few inputs at a time;
    ``method``: "minmax", "percentile" or "entropy". The high-resolution front
    (:func:`float_front`) stays float32. Returns what a record keeps of it."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise ValueError(f"Unknown calibration method {method!r}; choose one of {', '.join(methods)}")
    # The inputs are small (an image each); the activations they make are not, hence the stride.
    inputs = [np.ascontiguousarray(x[i:i + 1], dtype=np.float32) for x in calibration() for i in range(len(x))]
    if not inputs:
        raise ValueError("No calibration images: INT8 quantisation needs model inputs to measure activation ranges")
    # ORT's strided calibration wants the count divisible by the stride: the largest divisor <= the cap.
    stride = max(d for d in range(1, min(CALIBRATION_STRIDE_MAX, len(inputs)) + 1) if len(inputs) % d == 0)

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self.position, self.end = 0, len(inputs)

        def __len__(self):
            return len(inputs)

        def set_range(self, start_index: int, end_index: int):
            self.position, self.end = start_index, end_index

        def get_next(self):
            if self.position >= min(self.end, len(inputs)):
                return None
            self.position += 1
            return {"image": inputs[self.position - 1]}

    with tempfile.TemporaryDirectory(prefix="fracray-int8-") as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        # ONNX shape inference and graph clean-up first, as ORT advises; not its symbolic shape
        # inference, which cannot follow the fracture-map fusion (and writes a temporary file to cwd).
        quant_pre_process(str(float_graph), prepared, skip_symbolic_shape=True)
        kept_float = float_front(prepared, inputs[0])
        quantize_static(prepared, str(out_path), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method], nodes_to_exclude=kept_float,
                        extra_options={"CalibStridedMinMax": stride})
    import onnxruntime

    return {"method": method, "per_channel": True, "format": "QDQ", "weights": "int8", "activations": "uint8",
            "float_front_stride": FLOAT_FRONT_STRIDE, "float_nodes": len(kept_float),
            "calibration_inputs": len(inputs), "onnxruntime": onnxruntime.__version__}


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
