"""Which engine and precision run a bundle: the names, and the one rule that picks them.

Engines: ``torch`` (eager PyTorch, CPU or CUDA), ``onnxruntime`` (the cached ONNX export on CPU,
float32), ``auto`` (onnxruntime on CPU where it is installed, torch on CUDA). Precisions: ``exact``
(float32, equal to eager PyTorch) and ``fast`` (OpenVINO on CPU, the kind the bundle's validation
chose: :data:`FAST_KINDS`; see :mod:`.fast_gate`).

The rule (:func:`requested`): a value given by the caller (a flag, a config field, an argument)
wins; not given (None, or "auto"), ``$FRACRAY_ENGINE`` / ``$FRACRAY_PRECISION`` decide where set,
else the default. Serve replicas and scoring actors read the variables in their own environment,
so a service or a run given no engine or precision follows them there.

Nothing here imports torch: the CLI and the service's arguments use these names.
"""

from __future__ import annotations

import os

__all__ = ["ENGINES", "ENGINE_ENV", "DEFAULT_ENGINE", "PRECISIONS", "PRECISION_ENV", "DEFAULT_PRECISION",
           "FAST_ENGINE", "FAST_PRECISION", "FAST_KINDS", "FAST_GRAPH_FILE", "requested", "resolve_engine", "resolve_precision",
           "check_fast_runs_here", "onnxruntime_available", "openvino_available", "openvino_version"]

ENGINES = ("auto", "torch", "onnxruntime")
ENGINE_ENV = "FRACRAY_ENGINE"
DEFAULT_ENGINE = "auto"
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

# setting -> (its choices, its environment variable, its default)
_SETTINGS = {"engine": (ENGINES, ENGINE_ENV, DEFAULT_ENGINE), "precision": (PRECISIONS, PRECISION_ENV, DEFAULT_PRECISION)}
_NOT_GIVEN = ("", "auto")


def requested(setting: str, value: str | None = None, *, environment: bool = True) -> str:
    """What is asked for ``setting`` ("engine" or "precision"): ``value`` when given (not None,
    not "auto"), else its variable (``$FRACRAY_ENGINE``, ``$FRACRAY_PRECISION``) when set and
    ``environment``, else its default ("auto", "exact"). Raises ValueError naming the choices
    and where the wrong name came from."""
    choices, variable, default = _SETTINGS[setting]
    given = (value or "").strip().lower()
    source = setting
    if given in _NOT_GIVEN:
        given = os.environ.get(variable, "").strip().lower() if environment else ""
        source = f"${variable}"
        if given in _NOT_GIVEN:
            given, source = default, setting
    if given not in choices:
        hint = f" (OpenVINO is the fast precision: {PRECISION_ENV}=fast)" if given == FAST_ENGINE else ""
        raise ValueError(f"Unknown {'inference engine' if setting == 'engine' else setting} {given!r} ({source}); "
                         f"choose one of {', '.join(choices)}{hint}")
    return given


def _device_type(device) -> str:
    """"cpu" or "cuda" of a device name or torch.device (without importing torch)."""
    return getattr(device, "type", None) or str(device).split(":", 1)[0]


def resolve_engine(engine: str | None, device, *, environment: bool = True) -> str:
    """"torch" or "onnxruntime" for ``device`` (see :func:`requested`): auto means onnxruntime
    on CPU where it is installed, torch elsewhere."""
    name = requested("engine", engine, environment=environment)
    device = _device_type(device)
    if name == "auto":
        return "onnxruntime" if device == "cpu" and onnxruntime_available() else "torch"
    if name == "onnxruntime":
        if device != "cpu":
            raise ValueError(f"The onnxruntime engine runs on CPU only; this model is on {device} (use torch)")
        if not onnxruntime_available():
            raise ValueError("The onnxruntime engine needs the onnxruntime package (pip install onnxruntime)")
    return name


def resolve_precision(precision: str | None, device, engine: str | None = None, *,
                      environment: bool = True) -> str:
    """"exact" or "fast" (see :func:`requested`). Fast runs on CPU only, on its own engine
    (OpenVINO): with CUDA, or with torch/onnxruntime asked for, it raises."""
    name = requested("precision", precision, environment=environment)
    if name == "fast":
        check_fast_runs_here(device, engine, environment=environment)
    return name


def check_fast_runs_here(device, engine: str | None, *, environment: bool = True) -> None:
    """Raise ValueError where the fast precision cannot run: not on CPU, an engine asked for, no openvino."""
    device = _device_type(device)
    if device != "cpu":
        raise ValueError(f"The fast precision (OpenVINO, {' or '.join(FAST_KINDS)}) runs on CPU only; this model is on "
                         f"{device}: use the exact precision (--precision exact)")
    asked = requested("engine", engine, environment=environment)
    if asked != "auto":
        raise ValueError(f"The fast precision runs on the {FAST_ENGINE} engine, but engine {asked!r} was asked for "
                         f"(--engine or ${ENGINE_ENV}): use engine auto with precision fast, or precision exact")
    if not openvino_available():
        raise ValueError("The fast precision needs the openvino package (pip install the project: it is a "
                         "dependency)")


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
