"""Inference engines behind :class:`~fracray.inference.predictor.BundleModel`: what runs a
bundle's network forward, chosen per device.

- ``torch``: the model itself (``model.infer``): eager PyTorch, on CPU or CUDA. Grad-CAM and
  anything else that needs gradients always uses it.
- ``onnxruntime``: on CPU, the network exported once to ONNX (TorchScript-based exporter,
  float32) and run by ONNX Runtime. Same outputs as eager PyTorch (within 1e-4 on
  probabilities and fracture maps: tests/test_engine.py), about twice as fast per core.
- ``auto`` (the default): onnxruntime on CPU where it is installed, torch on CUDA.

``FRACRAY_ENGINE`` (one of the names above), when set, decides for the whole process, over
what the code asks: Serve replicas and scoring actors inherit it from their environment.

The export is cached on local disk, keyed by a hash of the weights, the model's description,
its input shape and the export settings (``$FRACRAY_ENGINE_CACHE``, default
``~/.cache/fracray/engines/<key>/model.onnx``). It is written under a lock, to a temporary
file renamed into place, so replicas and actors starting together on one machine export once
and never read half a file. Only float32 ("exact") is offered: a faster precision mode (bf16
or INT8) needs the accuracy check on FracAtlas valid that the issue asks for, not built yet.

Threads: ONNX Runtime gets one intra-op thread per CPU that Ray reserved for the calling
actor or replica (rounded, at least 1), else ``torch.get_num_threads()``, and one inter-op
thread; its worker threads do not spin between runs, so actors sharing a machine do not
steal each other's cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

__all__ = ["ENGINES", "ENGINE_ENV", "CACHE_ENV", "InferenceEngine", "TorchEngine", "OnnxRuntimeEngine",
           "ExportSettings", "requested_engine", "resolve_engine", "make_engine", "onnxruntime_available",
           "cache_root", "cache_key", "weights_digest", "default_threads", "ExportMismatch", "engine_label"]

ENGINES = ("auto", "torch", "onnxruntime")
ENGINE_ENV = "FRACRAY_ENGINE"
CACHE_ENV = "FRACRAY_ENGINE_CACHE"
MODEL_FILE = "model.onnx"
INFO_FILE = "engine.json"
# Bump when what goes into the exported graph changes (the wrapper below, its outputs).
EXPORT_FORMAT = "fracray-onnx/1"
# Exported probabilities and maps must match eager PyTorch this closely on the check input.
EXPORT_TOLERANCE = 1e-4


class ExportMismatch(RuntimeError):
    """The exported graph's outputs differ from eager PyTorch's: the export is not used."""


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


def requested_engine(engine: str | None = None) -> str:
    """The engine asked for: ``$FRACRAY_ENGINE`` when set (it decides for the whole process),
    else ``engine``, else "auto". Raises ValueError naming the choices for anything else."""
    env = os.environ.get(ENGINE_ENV, "").strip()
    name = (env or engine or "auto").strip().lower()
    if name not in ENGINES:
        source = f"${ENGINE_ENV}" if env else "engine"
        raise ValueError(f"Unknown inference engine {name!r} ({source}); choose one of {', '.join(ENGINES)}")
    return name


def resolve_engine(engine: str | None, device: str | torch.device) -> str:
    """"torch" or "onnxruntime" for this device (see :func:`requested_engine`): auto means
    onnxruntime on CPU where it is installed, torch elsewhere."""
    name = requested_engine(engine)
    device = torch.device(device)
    if name == "auto":
        return "onnxruntime" if device.type == "cpu" and onnxruntime_available() else "torch"
    if name == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(f"The onnxruntime engine runs on CPU only; this model is on {device} (use torch)")
        if not onnxruntime_available():
            raise ValueError("The onnxruntime engine needs the onnxruntime package (pip install onnxruntime)")
    return name


def make_engine(model: nn.Module, input_shape: tuple[int, int, int], *, engine: str | None = None,
                device: str | torch.device = "cpu", model_spec: dict[str, Any] | None = None,
                cache_dir: str | os.PathLike | None = None, threads: int | None = None) -> InferenceEngine:
    """The engine for a loaded model whose input is ``input_shape`` (C, H, W). ``model_spec``:
    what identifies the model beyond its weights (the bundle's model description), part of the
    cache key. With "auto", a model that does not export faithfully runs on torch (a warning
    says why); asked for by name, onnxruntime raises instead."""
    name = resolve_engine(engine, device)
    if name == "torch":
        return TorchEngine(model)
    try:
        return OnnxRuntimeEngine(model, input_shape, model_spec=model_spec, cache_dir=cache_dir, threads=threads)
    except Exception as exc:
        if requested_engine(engine) != "auto":
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

    opset: int = 17
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


class OnnxRuntimeEngine:
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
        self.key = cache_key(model, self.input_shape, settings, model_spec)
        self.folder = cache_root(cache_dir) / self.key
        self.path = self.folder / MODEL_FILE
        self.exported = False  # True when this object made the file (a cache miss)
        self.localizes = bool(getattr(model, "localizes", False))
        if not self.path.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            with _locked(self.folder):
                if not self.path.exists():  # another process may have made it while we waited
                    self._export(model)
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

    def _export(self, model: nn.Module) -> None:
        start = time.perf_counter()

        def write(tmp: str) -> None:
            export_onnx(model, self.input_shape, tmp, self.settings)
            self._verify(model, tmp)

        _write_atomic(self.path, write)
        info = {"format": EXPORT_FORMAT, "key": self.key, "input_shape": list(self.input_shape),
                "export": self.settings.to_dict(), "torch": torch.__version__,
                "export_seconds": round(time.perf_counter() - start, 3)}
        _write_atomic(self.folder / INFO_FILE, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
        self.exported = True

    def _verify(self, model: nn.Module, path: str) -> None:
        """The exported graph against eager PyTorch on one fixed input, before it is published."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        x = _check_input(self.input_shape)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        was_training = model.training
        with torch.no_grad():
            expected = _Exported(model.eval())(x)
        model.train(was_training)
        logits, maps = expected if isinstance(expected, tuple) else (expected, None)
        diffs = {"probabilities": float((torch.from_numpy(got[0]).softmax(-1) - logits.softmax(-1)).abs().max())}
        if maps is not None:
            diffs["map"] = float((torch.sigmoid(torch.from_numpy(got[1])) - torch.sigmoid(maps)).abs().max())
        if not max(diffs.values()) <= EXPORT_TOLERANCE:
            raise ExportMismatch(f"exported graph differs from eager PyTorch by {diffs} (> {EXPORT_TOLERANCE})")

    def _run(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.session.run(self.output_names, {self.input_name: x})
        return torch.from_numpy(out[0]), (torch.from_numpy(out[1]) if len(out) > 1 else None)

    def infer(self, x: torch.Tensor, *, tta_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``FractureClassifier.infer``: the same averaging, in the same order, on the
        runtime's outputs."""
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        logits, maps = self._run(array)
        if tta_flip:
            logits_f, maps_f = self._run(np.ascontiguousarray(array[..., ::-1]))
            logits = (logits + logits_f) / 2
            maps = None if maps is None else (maps + torch.flip(maps_f, dims=[-1])) / 2
        return logits, maps

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "precision": self.precision, "device": "cpu", "threads": self.threads,
                "onnx": str(self.path), "cache_key": self.key}
