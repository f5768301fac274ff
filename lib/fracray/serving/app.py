"""The Ray Serve application: HTTP ingress -> body-part router -> bone-specific classifiers.

    Ingress (FastAPI, /docs)        bounds and decodes uploads, auth, JSON errors, Grad-CAM PNGs
      -> BodyPartRouter             the 7-class router, dynamic batching (@serve.batch)
      -> FractureClassifiers        every bone's model, Serve model multiplexing (model id =
                                    body part), dynamic batching across requests; findings
                                    (boxes from the fracture map) and overlay PNGs are made here

Built by ``build_app(args)`` from a model index URI; ``serve run serving/config.yaml``
and ``serve deploy serving/config.yaml`` use the same builder. The deployments
wrap the same ``BundleModel`` as batch scoring, so the two cannot disagree.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import importlib
import logging
import os
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from .. import storage
from ..artifacts.bundle import read_bundle_meta
from ..artifacts.describe import describe_bundle, parse_threshold, resolve_threshold
from ..artifacts.index import check_operating_point, read_model_index
from ..imaging.instances import UNREADABLE_REASONS, refusal
from ..metrics.study import STUDY_RULE, study_decision
from ..storage import StorageOptions

# The predictor and Grad-CAM (torch) and the imaging modules (OpenCV) are imported where the
# replicas use them: building the application needs neither.

__all__ = ["ServeArgs", "LAYOUTS", "build_app", "app_builder", "Ingress", "BodyPartRouter", "FractureClassifiers",
           "HTTP_STATUS_FOR_REJECT", "ACCEPTED_CONTENT_TYPES", "OPEN_PATHS", "DOCS_PATHS"]

logger = logging.getLogger("ray.serve")

# Why an upload was refused -> the HTTP status that says so.
HTTP_STATUS_FOR_REJECT = {
    "empty_file": 400, "truncated": 400, "corrupt": 400, "too_small": 400, "read_error": 400,
    "not_an_image": 415, "unsupported_format": 415, "unsupported_dicom": 415,
    "decompression_bomb": 413,
    "out_of_scope": 422,  # decodes, but is not a limb radiograph (imaging.scope): no probability is given
}

# The one Content-Type rule: a raw body (or a multipart file part) is an image, DICOM or plain
# bytes, or says nothing; the format itself is always read from the bytes. Anything else
# (text/plain, application/json, ...) is 415 unsupported_media_type.
ACCEPTED_CONTENT_TYPES = ("image/*", "application/dicom", "application/octet-stream")
OPEN_PATHS = ("/healthz",)  # liveness: no token, no model facts
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")  # open only with public_docs


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
    # What runs the models in the replicas (inference.engine): auto = ONNX Runtime on CPU, PyTorch on
    # CUDA; torch or onnxruntime to choose. FRACRAY_ENGINE in a replica's environment still wins.
    engine: str = "auto"
    # At which precision: exact (float32) or fast (OpenVINO INT8 or bf16 on CPU, only for fracture bundles
    # whose bundle.json records a passed validation: build_app refuses the others before deploying).
    # FRACRAY_PRECISION in a replica's environment still wins.
    precision: str = "exact"
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
                     "num_gpus", "replicas", mode="before")
    @classmethod
    def _none_word(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
            return None
        return value

    @field_validator("engine", "precision", "layout")
    @classmethod
    def _one_of(cls, value: str, info) -> str:
        from ..inference.engine import ENGINES, PRECISIONS  # names only; the engines load in the replicas

        allowed = {"engine": ENGINES, "precision": PRECISIONS, "layout": LAYOUTS}[info.field_name]
        if value not in allowed:
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


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- model deployments

HEATMAP_SIDE = 512  # pixels a side of the heatmaps and overlay PNGs the API returns

# Two replicas of everything by default: a replica that dies (kill -9, OOM) costs a retry, not
# an outage, while Serve starts its replacement. ServeArgs.min_replicas=1 where memory is short.
AUTOSCALING = {
    "BodyPartRouter": {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 16},
    "FractureClassifiers": {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 8,
                            "target_ongoing_requests": 16},
    "Ingress": {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 32},
}

@serve.deployment(
    name="BodyPartRouter",
    max_ongoing_requests=32,
    autoscaling_config=AUTOSCALING["BodyPartRouter"],
    ray_actor_options={"num_cpus": 0.2},
    health_check_period_s=10,
)
class BodyPartRouter:
    """The bone-type router (or, for a single-model index, its one body part)."""

    def __init__(self, args: ServeArgs):
        from ..inference.predictor import BundleModel

        self.args = args
        options = args.storage_options
        index = read_model_index(args.models, options)
        self.body_parts = sorted(index.classifiers)
        self.model = (BundleModel(index.router, options, _device(), engine=args.engine, precision=args.precision)
                      if index.router else None)
        self.route.set_max_batch_size(args.max_batch_size)
        self.route.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def route(self, images: list) -> list[tuple[str, float | None, int]]:
        """(body part, probability, size of the batch it ran in) per image (each a ModelInput
        prepared by the ingress for this router: the full-size pixels stay there)."""
        from ..inference.predictor import route_decoded

        return [(part, prob, len(images)) for part, prob in route_decoded(self.model, self.body_parts, images)]

    def ready(self) -> dict[str, Any]:
        return {"router": self.model.name if self.model else None}


@serve.deployment(
    name="FractureClassifiers",
    max_ongoing_requests=32,
    autoscaling_config=AUTOSCALING["FractureClassifiers"],
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
)
class FractureClassifiers:
    """Every body part's fracture model, loaded on demand per replica (Serve model
    multiplexing routes a body part's requests to replicas that hold its model)."""

    def __init__(self, args: ServeArgs):
        self.args = args
        self.index = read_model_index(args.models, args.storage_options)
        self.classify.set_max_batch_size(args.max_batch_size)
        self.classify.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    def _load(self, body_part: str):
        """``body_part``'s fracture model, read from its bundle (blocking)."""
        from ..inference.predictor import BundleModel, UnknownBodyPart

        if body_part not in self.index.classifiers:
            raise UnknownBodyPart(body_part, sorted(self.index.classifiers))
        return BundleModel(self.index.classifiers[body_part], self.args.storage_options, _device(),
                           engine=self.args.engine, precision=self.args.precision)

    @serve.multiplexed(max_num_models_per_replica=8)
    async def get_model(self, body_part: str):
        return await asyncio.to_thread(self._load, body_part)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def classify(self, images: list, body_parts: list[str]) -> list[tuple[float, str, int, list[dict], str]]:
        """(P(fracture), the model's name, the batch size, findings, the engine) for each image,
        grouped by body part. Findings ({box, score, peak} in the image's own pixels) are made
        here from the fracture map, so only those few numbers travel back, never the map."""
        from ..inference.engine import engine_label

        out: list[tuple[float, str, int, list[dict], str] | None] = [None] * len(images)
        for part in sorted(set(body_parts)):
            members = [i for i, p in enumerate(body_parts) if p == part]
            model = await self.get_model(part)
            probs, maps = model.predict([images[i] for i in members])
            for k, (i, p) in enumerate(zip(members, probs[:, 1])):
                found = model.findings(maps[k], images[i]) if maps is not None else []
                out[i] = (float(p), model.name, len(members), found, engine_label(model.engine))
        return out

    async def heat(self, image, body_part: str, gradcam: bool = False) -> dict[str, Any]:
        """A heatmap to draw over the radiograph (at most 512 px a side; the ingress draws it):
        the model's fracture map (else Grad-CAM), or Grad-CAM of the fracture class."""
        from ..inference.gradcam import heatmap_peak

        model = await self.get_model(body_part)
        if gradcam:
            heat, kind = model.gradcam(image, max_side=HEATMAP_SIDE), "Grad-CAM"
        else:  # on this replica's event loop, like classify: one model call at a time
            heat, kind = model.heatmap(image, max_side=HEATMAP_SIDE), "fracture map" if model.localizes else "Grad-CAM"
        px, py = heatmap_peak(heat)
        return {"heat": heat.astype(np.float16), "heatmap": kind, "peak_xy": [px, py]}

    async def load(self, body_part: str) -> str:
        return (await self.get_model(body_part)).name


class _FusedClassifiers(FractureClassifiers.func_or_class):
    """The classifiers inside an ingress replica (layout "fused"): every body part's model
    loaded once on first use, without Serve's multiplexing (which is for a deployment of its own)."""

    def __init__(self, args: ServeArgs):
        super().__init__(args)
        self._models: dict[str, Any] = {}
        self._loading = asyncio.Lock()

    async def get_model(self, body_part: str):
        async with self._loading:
            if body_part not in self._models:
                self._models[body_part] = await asyncio.to_thread(self._load, body_part)
        return self._models[body_part]


class _InProcess:
    """A model object called in this process with a deployment handle's calling convention
    (``target.method.remote(...)`` is awaited; ``options(...)`` changes nothing): the ingress
    code is the same for both layouts."""

    def __init__(self, target):
        self._target = target

    def options(self, **_):
        return self

    def __getattr__(self, name: str):
        import inspect
        import types

        method = getattr(self._target, name)

        async def call(*args, **kwargs):
            result = method(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return types.SimpleNamespace(remote=call)


# ----------------------------------------------------------------------------- HTTP ingress

api = FastAPI(
    title="fracray",
    version="1",
    description="Fracture / abnormality detection on musculoskeletal radiographs: a body-part router and "
                "bone-specific classifiers. Decision support for qualified readers; not a diagnosis.\n\n"
                "Every error, whatever its status, is a JSON body {error, detail}: error is a stable name (see "
                "docs/serving.md's error table), detail says what to do. With a bearer token configured, every path "
                "but /healthz needs 'Authorization: Bearer <token>' (and it is checked before anything else is "
                "read). Raw bodies (and multipart file parts) must be " + ", ".join(ACCEPTED_CONTENT_TYPES)
                + " or carry no Content-Type; the image format is read from the bytes.",
)


# What the classify endpoints' query options and answers mean (the OpenAPI page at /docs shows these).
_RESULT_FIELDS = (
    "The answer: body_part (and body_part_probability when the router chose it), fracture_probability, label "
    "(1 at or above threshold), threshold, operating_point, classifier, router, and findings: the suspected "
    "fracture regions from the model's fracture map, best first, each {box: [x0, y0, x1, y1] in the uploaded "
    "image's own pixels (x1, y1 exclusive), score: the map's peak probability in the box, peak: [x, y] of that "
    "peak}; an empty list when none reaches the model's minimum score or the model has no fracture map (see "
    "/v1/models: localization.localizes). image gives the upload's width and height, the frame of the boxes. "
    "engine names what computed the probability: onnxruntime-float32 (CPU), torch-float32 (eager PyTorch) or "
    "openvino-int8 or openvino-bf16 (the fast precision, in the kind the bundle was validated for).")


def _body_part_query():
    return Query(None, description="Skip the router and use this body part's fracture model (one of the "
                                   "classifiers in /v1/models), case-insensitive.")


def _operating_point_query():
    return Query(None, description="Label at a named operating point of the model (see /v1/models: "
                                   "operating_points) or at a threshold: a decimal number in [0, 1] that a double "
                                   "represents (1e-400 underflows and is refused); default: the model's own "
                                   "threshold.")


def _gradcam_query():
    return Query(False, description="Add gradcam: {png_base64, peak_xy, target}, a Grad-CAM heatmap of the fracture "
                                    "class blended over the radiograph (PNG, at most 512 px a side) and its peak "
                                    "(x, y as fractions of the width and height).")


def _overlay_query():
    return Query(False, description="Add overlay: {png_base64, heatmap, peak_xy, findings}, the radiograph with the "
                                    "model's heatmap blended in (its fracture map, or Grad-CAM for a model without "
                                    "one; heatmap says which) and the findings' boxes drawn with their scores "
                                    "(PNG, at most 512 px a side); findings is how many were drawn.")


class _Rejected(Exception):
    """An error answer. ``per_image``: about one image of a study (listed there, the rest scored),
    else about the whole request."""

    def __init__(self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None, *,
                 per_image: bool = False):
        super().__init__(detail)
        self.status, self.reason, self.detail, self.headers = status, reason, detail, headers or {}
        self.per_image = per_image


def _error_response(status: int, reason: str, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason, "detail": detail}, status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    # FastAPI's own 422 body is {"detail": [...]}; ours is the service's one error body.
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return _error_response(422, "invalid_parameter", problems or str(exc))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error_response(exc.status_code, reason, exc.detail, getattr(exc, "headers", None))


def content_type_accepted(content_type: str | None) -> bool:
    """The Content-Type rule (ACCEPTED_CONTENT_TYPES), for a raw body or a multipart file part."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return kind in ("", "application/dicom", "application/octet-stream") or kind.startswith("image/")


class _Gate:
    """Pure ASGI middleware in front of the ingress's routes: authentication before anything
    of the request is parsed (so a bad query with no token is 401, not 422), and a last-resort
    JSON error (with the request id, logged) for anything that escaped a handler."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ingress = _ACTIVE_INGRESS
        path = scope.get("path", "")
        if ingress is not None and ingress.token is not None and not ingress.is_open(path):
            headers = dict(scope.get("headers", ()))
            if not ingress.authorized(headers.get(b"authorization", b"")):
                response = _error_response(401, "unauthorized", "Missing or wrong bearer token: send "
                                           "'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # a handler bug: never a bare 500 page, always a JSON body
            request_id = _request_id(scope)
            logger.exception("request %s: unhandled %s", request_id, type(exc).__name__)
            if not started:
                await _error_response(500, "internal_error", f"The service failed on this request "
                                      f"({type(exc).__name__}); request id {request_id}")(scope, receive, send)


api.add_middleware(_Gate)
_ACTIVE_INGRESS: "Ingress | None" = None


# Errors that are about the service, not a study (overload, a model replica dead twice): a STOW-RS
# request that meets one is answered 503 + Retry-After as a whole (nothing is stored: a retry is safe).
_SERVICE_BUSY = ("overloaded", "replica_unavailable")
# The error names whose STOW-RS FailureReason is 0x0110 Processing failure (the service failed on
# the instance); every other refused image is 0xC000 Cannot understand (unreadable, out of scope).
_PROCESSING_FAILURES = ("model_error", "processing_failed")


def _stow_failure_reason(error: str) -> int:
    return 0x0110 if error in _PROCESSING_FAILURES else 0xC000


def _uid(ds, keyword: str) -> str | None:
    """A UID of a STOW-RS instance for its report, or None where absent or unreadable."""
    try:
        value = str(ds.get(keyword, "") or "").strip()
    except Exception:
        return None
    return value or None


def _stow_response(referenced: list[dict], failed: list[dict]) -> dict[str, Any]:
    """The STOW-RS response data set (PS3.18 10.5.3), in DICOM JSON."""
    def item(h: dict, reason: int | None = None) -> dict[str, Any]:
        out = {}
        if h.get("sop_class"):
            out["00081150"] = {"vr": "UI", "Value": [h["sop_class"]]}
        if h.get("sop"):
            out["00081155"] = {"vr": "UI", "Value": [h["sop"]]}
        if reason is not None:
            out["00081197"] = {"vr": "US", "Value": [reason]}
        return out

    answer: dict[str, Any] = {}
    if referenced:
        answer["00081199"] = {"vr": "SQ", "Value": [item(h) for h in referenced]}
    if failed:
        answer["00081198"] = {"vr": "SQ", "Value": [item(f, f["reason"]) for f in failed]}
    return answer


def _request_id(scope_or_request) -> str:
    headers = scope_or_request.headers if isinstance(scope_or_request, Request) else None
    if headers is not None:
        return headers.get("x-request-id", "-")
    for key, value in scope_or_request.get("headers", ()):
        if key == b"x-request-id":
            return value.decode("latin-1")
    return "-"


# Errors from a model replica that died (kill -9, OOM, node loss) or is gone: retried once on
# another replica, then 503 + Retry-After. Imported lazily: Ray's exception classes.
def _replica_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return RayActorError, ReplicaUnavailableError, DeploymentUnavailableError


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=64,
    max_queued_requests=256,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
    autoscaling_config=AUTOSCALING["Ingress"],
    ray_actor_options={"num_cpus": 0.2},
)
@serve.ingress(api)
class Ingress:
    def __init__(self, router, classifiers, args: ServeArgs):
        if args.layout == "fused":  # the models run here, in this replica's process
            router = _InProcess(BodyPartRouter.func_or_class(args))
            classifiers = _InProcess(_FusedClassifiers(args))
        elif router is None:  # an index without a router (build_app deploys none): the one classifier's name
            router = _InProcess(BodyPartRouter.func_or_class(args))
        self.router = router
        self.classifiers = classifiers
        self.args = args
        options = args.storage_options
        self.index = read_model_index(args.models, options)
        self.metas = {part: read_bundle_meta(uri, options) for part, uri in self.index.classifiers.items()}
        self.router_meta = read_bundle_meta(self.index.router, options) if self.index.router else None
        self.models = {"router": describe_bundle(self.index.router, self.router_meta) if self.router_meta else None,
                       "classifiers": {p: describe_bundle(self.index.classifiers[p], m) for p, m in self.metas.items()},
                       "dataset": self.index.dataset, "index_created": self.index.created,
                       # Asked of the replicas; each answer's "engine" names what ran.
                       "engine": self.args.engine, "precision": self.args.precision,
                       "layout": self.args.layout,
                       "operating_point": self.args.operating_point}  # what a request that names none gets
        from ..imaging.preprocess import PreprocessConfig, shared_decode_config

        decode = shared_decode_config([m.preprocess_config() for m in
                                       ([self.router_meta] if self.router_meta else []) + list(self.metas.values())])
        if args.max_pixels:
            decode = PreprocessConfig.from_dict({**decode.to_dict(), "max_pixels": args.max_pixels})
        self.decode_config = decode
        # Each model's own preprocessing: the ingress prepares every model's input (ModelInput),
        # so only model-sized arrays travel to the replicas.
        self.router_config = self.router_meta.preprocess_config() if self.router_meta else None
        self.part_configs = {part: meta.preprocess_config() for part, meta in self.metas.items()}
        self.max_bytes = int(args.max_upload_mb * 1024 * 1024)
        token = os.environ.get(args.auth_token_env) or None
        self.token = token.encode("utf-8") if token else None
        self.open_paths = OPEN_PATHS + (DOCS_PATHS if args.public_docs else ())
        self._handles: dict[str, Any] = {}
        self._ready = False
        self._warned_unguarded = False
        # The gate's authentication finds the ingress through the module (one Ingress per replica
        # process): Serve runs a copy of `api` and a by-value copy of this class, so neither app
        # state nor this function's globals are the ones the gate reads.
        importlib.import_module(__name__)._ACTIVE_INGRESS = self

    # --------------------------------------------------------------- helpers

    def is_open(self, path: str) -> bool:
        return path in self.open_paths

    def authorized(self, header: bytes) -> bool:
        """Bearer token check on the raw header bytes: any byte string compares (a non-ASCII
        value is simply wrong), in constant time."""
        scheme, _, supplied = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(supplied.strip(), self.token)

    async def _read_body(self, request) -> bytes:
        if request.headers.get("x-fracray-proxy-guard") is None and not self._warned_unguarded:
            self._warned_unguarded = True  # limits still hold here, but only after the proxy buffered the body
            logger.warning("Serve's proxy runs without fracray's guard (set RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH="
                           "fracray.serving.proxy_guard:proxy_middlewares on every node before Ray starts)")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise _Rejected(413, "upload_too_large", f"Upload of {int(declared)} bytes exceeds the limit of "
                                                     f"{self.max_bytes} bytes (max_upload_mb)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_bytes:
                raise _Rejected(413, "upload_too_large", f"Upload exceeds the limit of {self.max_bytes} bytes "
                                                         f"(max_upload_mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _uploads(self, request, max_files: int) -> list[tuple[str, bytes]]:
        """(file name, bytes) of each image: the raw body, or every file of a multipart form."""
        content_type = request.headers.get("content-type", "")
        is_form = content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"
        if not is_form and not content_type_accepted(content_type):
            raise _Rejected(415, "unsupported_media_type", f"Content-Type {content_type!r} is not an image: send "
                            f"{', '.join(ACCEPTED_CONTENT_TYPES)}, multipart/form-data, or no Content-Type")
        body = await self._read_body(request)
        if not is_form:
            return [("upload.dcm" if "dicom" in content_type else "upload", body)]

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:  # one more file than allowed, so that "too many" is told apart from a broken form
            form = await Request(request.scope, replay).form(max_files=max_files + 1, max_fields=100)
        except Exception as exc:  # malformed multipart bodies raise several starlette/multipart errors
            if "too many files" in str(exc).lower():
                raise _Rejected(413, "too_many_files", f"At most {max_files} image(s) per request") from exc
            raise _Rejected(400, "bad_multipart", f"Could not parse the multipart form: {exc}") from exc
        parts = [(key, f) for key, f in form.multi_items() if hasattr(f, "read")]
        if not parts:
            raise _Rejected(400, "no_file", "The multipart form has no file part; send the image as 'file'")
        if len(parts) > max_files:
            raise _Rejected(413, "too_many_files", f"At most {max_files} image(s) per request; got {len(parts)}"
                            + (". Use /v1/classify/study for several" if max_files == 1 else ""))
        for key, f in parts:
            if not content_type_accepted(f.content_type):
                raise _Rejected(415, "unsupported_media_type", f"File part {f.filename or key!r} has Content-Type "
                                f"{f.content_type!r}: send {', '.join(ACCEPTED_CONTENT_TYPES)} or none")
        return [(f.filename or key, await f.read()) for key, f in parts]

    def _decode(self, name: str, data: bytes):
        from ..imaging.decode import ImageRejected
        from ..imaging.preprocess import decode_for

        try:
            decoded = decode_for(data, self.decode_config, name=name)
        except ImageRejected as exc:
            raise _Rejected(HTTP_STATUS_FOR_REJECT.get(exc.reason.value, 400), exc.reason.value, exc.detail,
                            per_image=True) from exc
        except Exception as exc:  # a decoder bug on a hostile file: this image's error, not the service's
            raise _Rejected(400, "undecodable", f"The decoder failed on this file ({type(exc).__name__}: "
                            f"{str(exc)[:200]}); check that it is a complete JPEG, PNG or DICOM radiograph",
                            per_image=True) from exc
        if self.args.check_scope:
            from ..imaging.scope import OUT_OF_SCOPE, assess_scope

            verdict = assess_scope(decoded)
            if not verdict.in_scope:  # detail: "<reason>: <sentence>", e.g. "dicom_modality:CT: the DICOM ..."
                raise _Rejected(HTTP_STATUS_FOR_REJECT[OUT_OF_SCOPE], OUT_OF_SCOPE,
                                f"{verdict.reason}: {verdict.detail}", per_image=True)
        return decoded

    def _classifier_handle(self, body_part: str):
        """One handle per body part, made once: a handle's router state warms up with use."""
        if body_part not in self._handles:
            self._handles[body_part] = self.classifiers.options(multiplexed_model_id=body_part)
        return self._handles[body_part]

    def _threshold(self, part: str, operating_point: str | None) -> float:
        try:
            return resolve_threshold(self.metas[part], operating_point or self.args.operating_point)
        except ValueError as exc:
            raise _Rejected(422, "bad_operating_point", str(exc)) from exc

    async def _call(self, make_call, what: str):
        """Await a downstream call. Overload there is 503 + Retry-After; a replica that died
        under the call (or was gone) gets the call once more, on whichever replica the handle
        picks now, then 503 + Retry-After."""
        from ray.serve.exceptions import BackPressureError

        for attempt in (1, 2):
            try:
                return await make_call()
            except BackPressureError as exc:
                raise _Rejected(503, "overloaded", f"The models are at capacity ({exc}); retry shortly",
                                {"Retry-After": "1"}) from exc
            except _replica_errors() as exc:
                logger.warning("%s: replica unavailable (%s), attempt %d", what, type(exc).__name__, attempt)
                if attempt == 2:
                    raise _Rejected(503, "replica_unavailable", f"The {what} replica died or is restarting "
                                    f"({type(exc).__name__}); retry shortly", {"Retry-After": "2"}) from exc
                await asyncio.sleep(0.2)

    async def _classify_one(self, name: str, data: bytes, body_part: str | None, operating_point: str | None,
                            gradcam: bool, overlay: bool, request_id: str) -> dict[str, Any]:
        try:
            return await self._classify_checked(name, data, body_part, operating_point, gradcam, overlay)
        except _Rejected:
            raise
        except Exception as exc:  # anything else that fails on this image: its error, logged with the id
            from ray.exceptions import RayTaskError

            logger.exception("request %s: %s on one image", request_id, type(exc).__name__)
            if isinstance(exc, RayTaskError):  # raised in a model replica (e.g. a model that cannot load)
                raise _Rejected(503, "model_error", f"The model failed on this image ({type(exc).__name__}); "
                                f"request id {request_id} is in the service's log. Retry later or report it",
                                {"Retry-After": "5"}, per_image=True) from exc
            raise _Rejected(422, "processing_failed", f"The service could not process this image "
                            f"({type(exc).__name__}); request id {request_id} is in the service's log",
                            per_image=True) from exc

    async def _classify_checked(self, name: str, data: bytes, body_part: str | None, operating_point: str | None,
                                gradcam: bool, overlay: bool) -> dict[str, Any]:
        from ..imaging.preprocess import prepare_input
        from ..inference.gradcam import overlay_png
        from ..inference.predictor import image_result

        started = time.perf_counter()
        decoded = await asyncio.to_thread(self._decode, name, data)
        decoded_at = time.perf_counter()
        routed = None
        if body_part is None:
            # Without a router the replica only names the one classifier: it gets that model's input
            # (never the full image), which classification then reuses.
            config = self.router_config or next(iter(self.part_configs.values()))
            routed = await asyncio.to_thread(prepare_input, decoded, config)
            body_part, part_probability, route_batch = await self._call(lambda: self.router.route.remote(routed),
                                                                        "router")
        else:
            part_probability, route_batch = None, None
        routed_at = time.perf_counter()
        if body_part not in self.metas:  # a router class without a trained classifier
            raise _Rejected(422, "unknown_body_part", f"The router chose {body_part!r}, which has no fracture model; "
                                                      f"pass body_part (one of {sorted(self.metas)})", per_image=True)
        threshold = self._threshold(body_part, operating_point)
        handle = self._classifier_handle(body_part)
        config = self.part_configs[body_part]
        prepared = routed if routed is not None and routed.config == config else \
            await asyncio.to_thread(prepare_input, decoded, config)  # one preprocessing when the configs agree
        probability, classifier_name, classify_batch, findings, engine = await self._call(
            lambda: handle.classify.remote(prepared, body_part), "classifier")
        classified_at = time.perf_counter()
        result = image_result(body_part, part_probability, probability, threshold, classifier_name,
                              self.models["router"]["name"] if self.models["router"] else None, findings,
                              engine=engine)
        result["operating_point"] = operating_point or self.args.operating_point
        size = (decoded.width, decoded.height)
        if overlay:
            drawn = await self._call(lambda: handle.heat.remote(prepared, body_part), "classifier")
            png = await asyncio.to_thread(overlay_png, decoded.pixels, drawn["heat"].astype(np.float32),
                                          findings=findings, image_size=size)
            result["overlay"] = {"png_base64": base64.b64encode(png).decode(), "heatmap": drawn["heatmap"],
                                 "peak_xy": drawn["peak_xy"], "findings": len(findings)}
        if gradcam:
            drawn = await self._call(lambda: handle.heat.remote(prepared, body_part, True), "classifier")
            png = await asyncio.to_thread(overlay_png, decoded.pixels, drawn["heat"].astype(np.float32))
            result["gradcam"] = {"png_base64": base64.b64encode(png).decode(), "peak_xy": drawn["peak_xy"],
                                 "target": "fracture class"}
        result["timings_ms"] = {"decode": round(1000 * (decoded_at - started), 2),
                                "route": round(1000 * (routed_at - decoded_at), 2),
                                "classify": round(1000 * (classified_at - routed_at), 2),
                                "total": round(1000 * (time.perf_counter() - started), 2)}
        result["batch"] = {"route": route_batch, "classify": classify_batch}  # images per model call
        result["image"] = {"name": name, "width": decoded.width, "height": decoded.height,
                           "format": decoded.source_format}
        if decoded.sop_instance_uid:  # DICOM: joins the result back to the archive, as in scoring
            result["image"]["sop_instance_uid"] = decoded.sop_instance_uid
        return result

    def _check_request(self, body_part: str | None, operating_point: str | None) -> str | None:
        """Request-level options, checked once before any image is read."""
        if body_part is not None:
            body_part = body_part.strip().lower()
            if body_part not in self.metas:
                raise _Rejected(422, "unknown_body_part", f"No fracture model for body part {body_part!r}; "
                                                          f"known: {sorted(self.metas)}")
        if operating_point is not None:
            try:  # a number is checked here; a name against the chosen model's operating points
                parse_threshold(operating_point)
            except ValueError as exc:
                raise _Rejected(422, "bad_operating_point", str(exc)) from exc
        return body_part

    @staticmethod
    def _error(exc: _Rejected):
        return _error_response(exc.status, exc.reason, exc.detail, exc.headers)

    # --------------------------------------------------------------- endpoints

    @api.get("/healthz", summary="Liveness: the ingress answers (open, says nothing about the models)")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: the router and every classifier are loaded (token required when set)")
    async def readyz(self):
        try:
            router = await self.router.ready.remote()
            if not self._ready:  # load every classifier once; later probes do not make replicas load models
                self._loaded = dict(zip(sorted(self.metas), await asyncio.gather(
                    *[self._classifier_handle(p).load.remote(p) for p in sorted(self.metas)])))
                self._ready = True
        except Exception as exc:  # not ready for any reason: say why, with 503
            return _error_response(503, "not_ready", f"{type(exc).__name__}: {exc}", {"Retry-After": "2"})
        return {"status": "ready", "router": router["router"], "classifiers": self._loaded}

    @api.get("/v1/models", summary="The router and classifiers this service runs")
    def list_models(self):
        return self.models

    @api.post("/v1/classify", summary="Classify one radiograph",
              description="Send the image as the raw request body (image/jpeg, image/png, application/dicom, "
                          "application/octet-stream or no Content-Type) or as the 'file' part of a multipart form "
                          "(more than one file: 413 too_many_files). body_part skips the router; operating_point is "
                          "a named operating point of the model (see /v1/models) or a threshold in [0, 1]; "
                          "gradcam=true adds a heatmap PNG (base64); overlay=true adds the radiograph with the "
                          "heatmap and the findings drawn (PNG, base64). " + _RESULT_FIELDS)
    async def classify(self, request: Request, body_part: str | None = _body_part_query(),
                       operating_point: str | None = _operating_point_query(), gradcam: bool = _gradcam_query(),
                       overlay: bool = _overlay_query()):
        try:
            body_part = self._check_request(body_part, operating_point)
            (name, data), = await self._uploads(request, max_files=1)
            return await self._classify_one(name, data, body_part, operating_point, gradcam, overlay,
                                            _request_id(request))
        except _Rejected as exc:
            return self._error(exc)

    @api.post("/v1/classify/study", summary="Classify a study (several images of one examination)",
              description="Multipart form with one 'files' part per image (at most max_study_images, 32 by default; "
                          "more: 413 too_many_files). Returns each image's result and the study's: mean fracture "
                          "probability over its images (MURA's rule) against the mean threshold. An image that "
                          "cannot be read, is out of scope or fails is listed with its error and detail and left "
                          "out; the rest are scored. Each image's result has the fields of /v1/classify's: "
                          + _RESULT_FIELDS)
    async def classify_study(self, request: Request, body_part: str | None = _body_part_query(),
                             operating_point: str | None = _operating_point_query(),
                             gradcam: bool = _gradcam_query(), overlay: bool = _overlay_query()):
        try:
            body_part = self._check_request(body_part, operating_point)
            uploads = await self._uploads(request, max_files=self.args.max_study_images)
            return await self._score_study(uploads, body_part, operating_point, gradcam, overlay, _request_id(request))
        except _Rejected as exc:
            return self._error(exc)

    @api.post("/dicomweb/studies", summary="STOW-RS: classify the DICOM instances of one or more studies",
              description="DICOMweb STOW-RS (PS3.18): a multipart/related body with type=application/dicom, one "
                          "DICOM instance per part (at most max_study_images). Instances are grouped by "
                          "StudyInstanceUID and each study is classified as by /v1/classify/study. Which instances "
                          "are classified is the DICOM node's rule: single-frame CR, DX and Secondary Capture "
                          "images with pixel data, not fracray's own results; the others (SR, RT, ECG, CT, MR, "
                          "presentation states, multi-frame) are refused with FailureReason 0x0122 (SOP class not "
                          "supported), unreadable ones or ones without UIDs with 0xC000. Each study stands alone: one "
                          "whose images cannot be read is refused with 0xC000, one the service fails on with 0x0110 "
                          "(processing failure), and the other studies are still classified (only an overloaded "
                          "service answers the whole request 503). With Accept: application/dicom+json the answer is the standard "
                          "STOW-RS response (ReferencedSOPSequence, FailedSOPSequence; 200 all, 202 some, 409 none "
                          "accepted); otherwise JSON: {studies: [{study_instance_uid, study, images}], failed}. "
                          "Nothing is stored: results go back to the PACS through the DICOM node (fracray listen) "
                          "or fracray publish.")
    async def stow(self, request: Request, operating_point: str | None = _operating_point_query()):
        try:
            self._check_request(None, operating_point)
            instances, failed = await self._stow_parts(request)
            request_id = _request_id(request)
            by_study: dict[str, list[tuple[str, bytes, dict]]] = {}
            for data, header in instances:
                by_study.setdefault(header["study"], []).append((f"{header['sop']}.dcm", data, header))
            studies, referenced = [], []
            for study_uid, items in by_study.items():  # one study's failure is its own: the rest go on
                try:
                    answer = await self._score_study([(n, d) for n, d, _ in items], None, operating_point, False,
                                                     False, request_id)
                except _Rejected as exc:
                    if exc.reason in _SERVICE_BUSY:  # the service, not the study: the client retries it all
                        raise
                    failed += [{**h, "reason": _stow_failure_reason(exc.reason), "error": exc.reason,
                                "detail": exc.detail} for _, _, h in items]
                    continue
                except Exception as exc:  # a bug on this study's images: reported, logged with the id
                    logger.exception("request %s: STOW-RS study failed with %s", request_id, type(exc).__name__)
                    failed += [{**h, "reason": 0x0110, "error": "processing_failed",
                                "detail": f"The service failed on this study ({type(exc).__name__}); request id "
                                          f"{request_id} is in the service's log"} for _, _, h in items]
                    continue
                for (_, _, header), image in zip(items, answer["images"]):
                    image["image"]["sop_instance_uid"] = header["sop"]
                    if "error" in image:
                        failed.append({**header, "reason": _stow_failure_reason(image["error"]),
                                       "error": image["error"], "detail": image["detail"]})
                    else:
                        referenced.append(header)
                studies.append({"study_instance_uid": study_uid, **answer})
            if "application/dicom+json" in request.headers.get("accept", ""):
                status = 200 if not failed else 202 if referenced else 409
                return JSONResponse(_stow_response(referenced, failed), status_code=status,
                                    media_type="application/dicom+json")
            return {"studies": studies,
                    "failed": [{"sop_instance_uid": f.get("sop"), "sop_class_uid": f.get("sop_class"),
                                "error": f["error"], "detail": f["detail"]} for f in failed]}
        except _Rejected as exc:
            return self._error(exc)

    async def _stow_parts(self, request) -> tuple[list[tuple[bytes, dict]], list[dict]]:
        """The instances of a STOW-RS body that can be classified, with their header facts, and
        the ones refused, each with its reason: the rule is the DICOM node's
        (``imaging.instances.refusal``), so both ways in classify the same instances."""
        import email.parser
        import io

        import pydicom

        content_type = request.headers.get("content-type", "")
        media = content_type.split(";", 1)[0].strip().lower()
        params = {k.strip().lower(): v.strip().strip('"').lower()
                  for k, _, v in (p.partition("=") for p in content_type.split(";")[1:])}
        if media != "multipart/related" or params.get("type", "application/dicom") != "application/dicom":
            raise _Rejected(415, "unsupported_media_type", f"STOW-RS takes multipart/related; "
                            f"type=\"application/dicom\". Got Content-Type {content_type!r}")
        body = await self._read_body(request)
        message = email.parser.BytesParser().parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
        parts = message.get_payload() if message.is_multipart() else None
        if not parts:
            raise _Rejected(400, "bad_multipart", "The multipart/related body has no parts (check its boundary)")
        if len(parts) > self.args.max_study_images:
            raise _Rejected(413, "too_many_files", f"At most {self.args.max_study_images} instance(s) per request; "
                                                   f"got {len(parts)}")
        instances, failed = [], []
        for part in parts:
            data = part.get_payload(decode=True) or b""
            try:
                ds = pydicom.dcmread(io.BytesIO(data), defer_size=1024, force=True)  # pixels left unread
            except Exception as exc:  # not DICOM: refused, the others go on
                failed.append({"sop": None, "sop_class": None, "reason": 0xC000, "error": "not_dicom",
                               "detail": f"{type(exc).__name__}: not a DICOM instance"})
                continue
            header = {"study": _uid(ds, "StudyInstanceUID"), "sop": _uid(ds, "SOPInstanceUID"),
                      "sop_class": _uid(ds, "SOPClassUID")}
            refused = refusal(ds)  # the DICOM node's rule (imaging.instances), the same for both ways in
            if refused is not None:
                unreadable = refused.reason in UNREADABLE_REASONS
                failed.append({**header, "reason": 0xC000 if unreadable else 0x0122,
                               "error": "not_dicom" if unreadable else "unsupported_sop_class",
                               "detail": refused.detail})
                logger.info("STOW-RS: skipped one instance: %s", refused.detail)
                continue
            instances.append((data, header))
        return instances, failed

    async def _score_study(self, uploads: list[tuple[str, bytes]], body_part: str | None, operating_point: str | None,
                           gradcam: bool, overlay: bool, request_id: str) -> dict[str, Any]:
        """Every image of one study, then the study's decision; per-image errors listed, the rest scored."""
        outcomes = await asyncio.gather(*[self._classify_one(n, d, body_part, operating_point, gradcam, overlay,
                                                             request_id)
                                          for n, d in uploads], return_exceptions=True)
        images = []
        for (name, _), outcome in zip(uploads, outcomes):
            if isinstance(outcome, _Rejected):
                if not outcome.per_image:
                    raise outcome  # not about this image (overload, a dead replica twice): fail the request
                images.append({"image": {"name": name}, "error": outcome.reason, "detail": outcome.detail})
            elif isinstance(outcome, BaseException):  # _classify_one converts everything; kept as a guard
                logger.error("request %s: %s", request_id, type(outcome).__name__)
                images.append({"image": {"name": name}, "error": "processing_failed",
                               "detail": f"{type(outcome).__name__}; request id {request_id}"})
            else:
                images.append(outcome)
        scored = [r for r in images if "fracture_probability" in r]
        if not scored and all(r.get("error") == "out_of_scope" for r in images):
            raise _Rejected(422, "out_of_scope", "None of the study's images is a limb radiograph: "
                            + "; ".join(f"{r['image']['name']}: {r['detail']}" for r in images))
        if not scored and any(r.get("error") == "model_error" for r in images):
            raise _Rejected(503, "model_error", "No image of the study could be scored: "
                            + "; ".join(f"{r['image']['name']}: {r['detail']}" for r in images),
                            {"Retry-After": "5"})
        if not scored:
            raise _Rejected(400, "no_readable_image", "None of the study's images could be scored: "
                            + "; ".join(f"{r['image']['name']}: {r['error']}" for r in images))
        decision = study_decision([r["fracture_probability"] for r in scored], [r["threshold"] for r in scored],
                                  [r["body_part"] for r in scored])
        study = {"images": len(images), "scored": len(scored), **decision, "rule": STUDY_RULE}
        return {"study": study, "images": images}


# ----------------------------------------------------------------------------- builder

def build_app(args: ServeArgs = None):
    """The typed application builder: ``serve run fracray.serving.app:build_app models=...``
    or serving/config.yaml's ``import_path`` + ``args``. Serve validates the arguments with the
    annotated ServeArgs; a caller in Python may pass a dict (validated the same) or nothing."""
    args = ServeArgs.parse(args)
    if not storage.is_remote(args.models):
        args = args.model_copy(update={"models": storage.normalize(args.models)})  # replicas have other cwds
    from ..inference.predictor import check_precision

    # Fast precision for a bundle without a passed validation: refused here, not by every request
    # that reaches a replica (which loads its classifiers on demand and checks again).
    check_precision(args.models, args.storage_options, engine=args.engine, precision=args.precision,
                    device="cuda" if args.num_gpus else "cpu")
    check_operating_point(args.models, args.operating_point, args.storage_options)
    model_options: dict[str, Any] = {}
    if args.num_gpus is not None:
        model_options["ray_actor_options"] = {"num_cpus": 0.5, "num_gpus": args.num_gpus}
    ingress_options: dict[str, Any] = {}
    if args.max_ongoing_requests is not None:
        ingress_options["max_ongoing_requests"] = args.max_ongoing_requests
    if args.max_queued_requests is not None:
        ingress_options["max_queued_requests"] = args.max_queued_requests
    router_options, classifier_options = dict(model_options), dict(model_options)
    if args.num_gpus is not None:
        router_options["ray_actor_options"] = {"num_cpus": 0.2, "num_gpus": args.num_gpus}
    if args.replicas is not None:
        fixed = {"num_replicas": args.replicas, "autoscaling_config": None}
        for options in (router_options, classifier_options, ingress_options):
            options.update(fixed)
    elif args.min_replicas != ServeArgs.model_fields["min_replicas"].default:
        for deployment, options in ((BodyPartRouter, router_options), (FractureClassifiers, classifier_options),
                                    (Ingress, ingress_options)):
            scaling = dict(AUTOSCALING[deployment.name], min_replicas=args.min_replicas,
                           initial_replicas=args.min_replicas)
            scaling["max_replicas"] = max(scaling["max_replicas"], args.min_replicas)
            options["autoscaling_config"] = scaling
    if args.layout == "fused":
        # One deployment: each ingress replica holds the models, so it reserves what a model
        # replica would (a whole CPU: the engine runs one thread per reserved CPU), and a GPU if asked.
        ingress_options["ray_actor_options"] = {"num_cpus": 1, **({"num_gpus": args.num_gpus} if args.num_gpus else {})}
        return Ingress.options(**ingress_options).bind(None, None, args)
    classifiers = FractureClassifiers.options(**classifier_options).bind(args)
    if not _has_router(args):
        # Nothing to route with: the ingress names the one classifier itself (Ingress.__init__),
        # instead of replicas that would each load the index and hold a process for no model.
        return Ingress.options(**ingress_options).bind(None, classifiers, args)
    router = BodyPartRouter.options(**router_options).bind(args)
    return Ingress.options(**ingress_options).bind(router, classifiers, args)


def _has_router(args: ServeArgs) -> bool:
    """Whether the model index names a router. An index that cannot be read yet (``serve build
    serving.graph:app`` with no model trained) keeps the full graph: its replicas then say why."""
    try:
        return read_model_index(args.models, args.storage_options).router is not None
    except (storage.StorageError, OSError):
        return True


# Serve converts a builder's arguments only when its parameter's annotation is the pydantic class
# itself (ray.serve._private.api.call_user_app_builder_with_args_if_necessary); this module's
# `from __future__ import annotations` leaves the string "ServeArgs" there, so set the class.
build_app.__annotations__["args"] = ServeArgs

app_builder = build_app
