"""The application's arguments (:class:`ServeArgs`): what serving/config.yaml's ``args:``, ``serve run
fracray.serving.app:build_app key=value ...`` and ``fracray serve`` give the builder."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..artifacts.describe import parse_threshold
from ..inference.engines.choice import ENGINES, PRECISIONS
from ..storage import StorageOptions

__all__ = ["ServeArgs", "LAYOUTS"]

LAYOUTS = ("graph", "fused")


# Optional arguments a command line can set to "none" (``serve run ... max_pixels=none``).
_NONE_WORDS = ("", "none", "null")


class ServeArgs(BaseModel):
    """The application's arguments (the ``args:`` of serving/config.yaml, or ``key=value`` pairs
    after ``serve run fracray.serving.app:build_app``).

    A pydantic model, annotated on the builder: Serve validates the arguments it is given with it,
    so a command line's strings become the fields' types (``max_upload_mb=2`` a float,
    ``anonymous=false`` False, ``max_pixels=none`` None) and a value that is not one is refused at
    start with a message that names the field."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False)

    models: str = "runs/latest/model_index.json"
    max_upload_mb: float = Field(64.0, gt=0)    # per request; DICOM studies run large
    max_pixels: int | None = None        # default: the models' own decode limit (bomb guard)
    max_study_images: int = Field(32, ge=1)
    max_batch_size: int = Field(16, ge=1)       # dynamic batching; 1 turns it off
    batch_wait_timeout_s: float = 0.01
    auth_token_env: str = "FRACRAY_API_TOKEN"  # bearer token required when this variable is set
    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    # The front door's admission limits: requests in flight and queued per Ingress replica (503 +
    # Retry-After beyond them). They apply to the Ingress only, by design: the model deployments are
    # reached only through it, and their own limits are set per deployment in serving/config.yaml's
    # `deployments:` section (Serve's config), which these arguments do not touch.
    max_ongoing_requests: int | None = None
    max_queued_requests: int | None = None
    num_gpus: float | None = None        # per model replica; default 0 (config.yaml: 1 on GPU workers)
    replicas: int | None = None          # a fixed replica count per deployment instead of autoscaling (benchmarks)
    # Replicas each deployment keeps at least: 2, so that a killed replica never stops the service
    # (requests that hit it are retried on the other); 1 halves the memory on a small laptop.
    min_replicas: int = Field(2, ge=1)
    check_scope: bool = True             # refuse photos, CT/MR/US, chest films, blank images (422 out_of_scope)
    public_docs: bool = False            # with a token set: /docs and /openapi.json open too (else token only)
    # What runs the models in the replicas (inference.engines.choice): torch or onnxruntime, as given;
    # auto: FRACRAY_ENGINE in a replica's environment, else ONNX Runtime on CPU, PyTorch on CUDA.
    engine: str = "auto"
    # At which precision: exact (float32) or fast (OpenVINO INT8 or bf16 on CPU, only for fracture bundles
    # whose bundle.json records a passed validation: build_app refuses the others before deploying);
    # None: FRACRAY_PRECISION in a replica's environment, else exact.
    precision: str | None = None
    # How the models are laid out (LAYOUTS): "graph", the router and the classifiers as deployments of
    # their own that scale apart (clusters, GPUs); "fused", both inside each ingress replica, so a
    # request crosses one process instead of three (small CPU machines, where each hop costs more
    # than it spreads: see docs/benchmarks.md, Serving).
    layout: str = "graph"
    # The operating point a request that names none is labelled at: "default" (each model's own
    # threshold), a named point of the models ("high_sensitivity", "high_specificity",
    # "sensitivity>=0.95", ...) or a number in [0, 1]. A request's operating_point still wins.
    operating_point: str = "default"

    @model_validator(mode="before")
    @classmethod
    def _known_arguments(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"Unknown application arguments {unknown}; known: {sorted(cls.model_fields)}")
        return data

    @field_validator("max_pixels", "endpoint_url", "region", "max_ongoing_requests", "max_queued_requests",
                     "num_gpus", "replicas", "precision", mode="before")
    @classmethod
    def _none_word(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
            return None
        return value

    @field_validator("engine", "precision", "layout")
    @classmethod
    def _one_of(cls, value: str | None, info) -> str | None:
        allowed = {"engine": ENGINES, "precision": PRECISIONS, "layout": LAYOUTS}[info.field_name]
        if value is not None and value not in allowed:
            raise ValueError(f"{info.field_name} must be one of {', '.join(allowed)}. Got {value!r}")
        return value

    @field_validator("operating_point")
    @classmethod
    def _operating_point(cls, value: str) -> str:
        parse_threshold(value)  # a number outside [0, 1] fails here; names at build_app (they need the models)
        return value

    @classmethod
    def parse(cls, args: "ServeArgs | dict[str, Any] | None") -> "ServeArgs":
        """``args`` as ServeArgs: a dict (strings or typed values) is validated, a ServeArgs kept."""
        if isinstance(args, cls):
            return args
        return cls.model_validate(dict(args or {}))

    @property
    def storage_options(self) -> StorageOptions:
        return StorageOptions(endpoint_url=self.endpoint_url, region=self.region, anonymous=self.anonymous).resolved()

