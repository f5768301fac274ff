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
import dataclasses
import hmac
import os
import time
from collections import Counter
from typing import Any

import numpy as np
from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse
from ray import serve
from starlette.requests import Request

from .. import storage
from ..storage import StorageOptions

__all__ = ["ServeArgs", "build_app", "app_builder", "Ingress", "BodyPartRouter", "FractureClassifiers",
           "HTTP_STATUS_FOR_REJECT"]

# Why an upload was refused -> the HTTP status that says so.
HTTP_STATUS_FOR_REJECT = {
    "empty_file": 400, "truncated": 400, "corrupt": 400, "too_small": 400, "read_error": 400,
    "not_an_image": 415, "unsupported_format": 415, "unsupported_dicom": 415,
    "decompression_bomb": 413,
    "out_of_scope": 422,  # decodes, but is not a limb radiograph (imaging.scope): no probability is given
}


@dataclasses.dataclass(frozen=True)
class ServeArgs:
    """The application's arguments (the ``args:`` of serving/config.yaml)."""

    models: str = "runs/latest/model_index.json"
    max_upload_mb: float = 64.0          # per request; DICOM studies run large
    max_pixels: int | None = None        # default: the models' own decode limit (bomb guard)
    max_study_images: int = 32
    max_batch_size: int = 16             # dynamic batching; 1 turns it off
    batch_wait_timeout_s: float = 0.01
    auth_token_env: str = "FRACRAY_API_TOKEN"  # bearer token required when this variable is set
    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    # Overrides of the deployments' options (serving/config.yaml sets them for clusters).
    max_ongoing_requests: int | None = None
    max_queued_requests: int | None = None
    num_gpus: float | None = None        # per model replica; default 0 (config.yaml: 1 on GPU workers)
    replicas: int | None = None          # a fixed replica count per deployment instead of autoscaling (benchmarks)
    check_scope: bool = True             # refuse photos, CT/MR/US, chest films, blank images (422 out_of_scope)

    @classmethod
    def parse(cls, args: "ServeArgs | dict[str, Any] | None") -> "ServeArgs":
        if isinstance(args, cls):
            return args
        args = dict(args or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"Unknown application arguments {unknown}; known: {sorted(known)}")
        parsed = cls(**args)
        if parsed.max_batch_size < 1 or parsed.max_upload_mb <= 0 or parsed.max_study_images < 1:
            raise ValueError(f"max_batch_size, max_upload_mb and max_study_images must be positive. Got {parsed}")
        return parsed

    @property
    def storage_options(self) -> StorageOptions:
        return StorageOptions(endpoint_url=self.endpoint_url, region=self.region, anonymous=self.anonymous).resolved()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- model deployments

@serve.deployment(
    name="BodyPartRouter",
    max_ongoing_requests=32,
    autoscaling_config={"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16},
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
)
class BodyPartRouter:
    """The bone-type router (or, for a single-model index, its one body part)."""

    def __init__(self, args: ServeArgs):
        from ..inference.predictor import BundleModel, read_model_index

        self.args = args
        options = args.storage_options
        index = read_model_index(args.models, options)
        self.body_parts = sorted(index.classifiers)
        self.model = BundleModel(index.router, options, _device()) if index.router else None
        self.route.set_max_batch_size(args.max_batch_size)
        self.route.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def route(self, images: list) -> list[tuple[str, float | None, int]]:
        """(body part, probability, size of the batch it ran in) per image."""
        from ..inference.predictor import route_decoded

        return [(part, prob, len(images)) for part, prob in route_decoded(self.model, self.body_parts, images)]

    def ready(self) -> dict[str, Any]:
        return {"router": self.model.name if self.model else None}


@serve.deployment(
    name="FractureClassifiers",
    max_ongoing_requests=32,
    autoscaling_config={"min_replicas": 1, "initial_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 16},
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
)
class FractureClassifiers:
    """Every body part's fracture model, loaded on demand per replica (Serve model
    multiplexing routes a body part's requests to replicas that hold its model)."""

    def __init__(self, args: ServeArgs):
        from ..inference.predictor import read_model_index

        self.args = args
        self.index = read_model_index(args.models, args.storage_options)
        self.classify.set_max_batch_size(args.max_batch_size)
        self.classify.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    @serve.multiplexed(max_num_models_per_replica=8)
    async def get_model(self, body_part: str):
        from ..inference.predictor import BundleModel, UnknownBodyPart

        if body_part not in self.index.classifiers:
            raise UnknownBodyPart(body_part, sorted(self.index.classifiers))
        return await asyncio.to_thread(BundleModel, self.index.classifiers[body_part], self.args.storage_options,
                                       _device())

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def classify(self, images: list, body_parts: list[str]) -> list[tuple[float, str, int, list[dict]]]:
        """(P(fracture), the model's name, the batch size, findings) for each image, grouped by
        body part. Findings ({box, score, peak} in the image's own pixels) are made here from the
        fracture map, so only those few numbers travel back, never the map."""
        out: list[tuple[float, str, int, list[dict]] | None] = [None] * len(images)
        for part in sorted(set(body_parts)):
            members = [i for i, p in enumerate(body_parts) if p == part]
            model = await self.get_model(part)
            probs, maps = model.predict([images[i] for i in members])
            for k, (i, p) in enumerate(zip(members, probs[:, 1])):
                found = model.findings(maps[k], images[i]) if maps is not None else []
                out[i] = (float(p), model.name, len(members), found)
        return out

    async def explain(self, image, body_part: str) -> np.ndarray:
        """Grad-CAM of the fracture class, in the image's own pixel grid."""
        model = await self.get_model(body_part)
        return model.gradcam(image)

    async def overlay(self, image, body_part: str, findings: list[dict]) -> dict[str, Any]:
        """The radiograph with the model's heatmap (its fracture map, else Grad-CAM) blended in and
        the findings drawn with their scores, as PNG bytes (drawn here: the heatmap stays here)."""
        from ..inference.gradcam import heatmap_peak, overlay_png

        model = await self.get_model(body_part)
        heat = model.heatmap(image)  # on this replica's event loop, like classify: one model call at a time
        png = await asyncio.to_thread(overlay_png, image.pixels, heat, findings=findings,
                                      image_size=(image.width, image.height))
        px, py = heatmap_peak(heat)
        return {"png": png, "heatmap": "fracture map" if model.localizes else "Grad-CAM", "peak_xy": [px, py]}

    async def load(self, body_part: str) -> str:
        return (await self.get_model(body_part)).name


# ----------------------------------------------------------------------------- HTTP ingress

api = FastAPI(
    title="fracray",
    version="1",
    description="Fracture / abnormality detection on musculoskeletal radiographs: a body-part router and "
                "bone-specific classifiers. Decision support for qualified readers; not a diagnosis.",
)


# What the classify endpoints' query options and answers mean (the OpenAPI page at /docs shows these).
_RESULT_FIELDS = (
    "The answer: body_part (and body_part_probability when the router chose it), fracture_probability, label "
    "(1 at or above threshold), threshold, operating_point, classifier, router, and findings: the suspected "
    "fracture regions from the model's fracture map, best first, each {box: [x0, y0, x1, y1] in the uploaded "
    "image's own pixels (x1, y1 exclusive), score: the map's peak probability in the box, peak: [x, y] of that "
    "peak}; an empty list when none reaches the model's minimum score or the model has no fracture map (see "
    "/v1/models: localization.localizes). image gives the upload's width and height, the frame of the boxes.")


def _body_part_query():
    return Query(None, description="Skip the router and use this body part's fracture model (one of the "
                                   "classifiers in /v1/models), case-insensitive.")


def _operating_point_query():
    return Query(None, description="Label at a named operating point of the model (see /v1/models: "
                                   "operating_points) or at a threshold in [0, 1]; default: the model's own threshold.")


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
    def __init__(self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.reason, self.detail, self.headers = status, reason, detail, headers or {}


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=64,
    max_queued_requests=256,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
    autoscaling_config={"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32},
    ray_actor_options={"num_cpus": 0.25},
)
@serve.ingress(api)
class Ingress:
    def __init__(self, router, classifiers, args: ServeArgs):
        from ..inference.predictor import describe_bundle, read_model_index
        from ..training.bundle import read_bundle_meta

        self.router = router
        self.classifiers = classifiers
        self.args = args
        options = args.storage_options
        self.index = read_model_index(args.models, options)
        self.metas = {part: read_bundle_meta(uri, options) for part, uri in self.index.classifiers.items()}
        self.router_meta = read_bundle_meta(self.index.router, options) if self.index.router else None
        self.models = {"router": describe_bundle(self.index.router, self.router_meta) if self.router_meta else None,
                       "classifiers": {p: describe_bundle(self.index.classifiers[p], m) for p, m in self.metas.items()},
                       "dataset": self.index.dataset, "index_created": self.index.created}
        from ..imaging.preprocess import PreprocessConfig

        decode = (self.router_meta or next(iter(self.metas.values()))).preprocess_config()
        if args.max_pixels:
            decode = PreprocessConfig.from_dict({**decode.to_dict(), "max_pixels": args.max_pixels})
        self.decode_config = decode
        self.max_bytes = int(args.max_upload_mb * 1024 * 1024)
        self.token = os.environ.get(args.auth_token_env) or None
        self._handles: dict[str, Any] = {}

    # --------------------------------------------------------------- helpers

    def _check_auth(self, request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.strip(), self.token):
            raise _Rejected(401, "unauthorized", "Missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                            {"WWW-Authenticate": "Bearer"})

    async def _read_body(self, request) -> bytes:
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

    async def _uploads(self, request) -> list[tuple[str, bytes]]:
        """(file name, bytes) of each image: the raw body, or every file of a multipart form."""
        body = await self._read_body(request)
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            return [("upload.dcm" if "dicom" in content_type else "upload", body)]

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=self.args.max_study_images + 1,
                                                              max_fields=100)
        except Exception as exc:  # malformed multipart bodies raise several starlette/multipart errors
            raise _Rejected(400, "bad_multipart", f"Could not parse the multipart form: {exc}") from exc
        files = [(f.filename or key, await f.read()) for key, f in form.multi_items() if hasattr(f, "read")]
        if not files:
            raise _Rejected(400, "no_file", "The multipart form has no file part; send the image as 'file'")
        return files

    def _decode(self, name: str, data: bytes):
        from ..imaging.decode import ImageRejected
        from ..imaging.preprocess import decode_for

        try:
            decoded = decode_for(data, self.decode_config, name=name)
        except ImageRejected as exc:
            raise _Rejected(HTTP_STATUS_FOR_REJECT.get(exc.reason.value, 400), exc.reason.value, exc.detail) from exc
        if self.args.check_scope:
            from ..imaging.scope import OUT_OF_SCOPE, assess_scope

            verdict = assess_scope(decoded)
            if not verdict.in_scope:  # detail: "<reason>: <sentence>", e.g. "dicom_modality:CT: the DICOM ..."
                raise _Rejected(HTTP_STATUS_FOR_REJECT[OUT_OF_SCOPE], OUT_OF_SCOPE,
                                f"{verdict.reason}: {verdict.detail}")
        return decoded

    def _classifier_handle(self, body_part: str):
        """One handle per body part, made once: a handle's router state warms up with use."""
        if body_part not in self._handles:
            self._handles[body_part] = self.classifiers.options(multiplexed_model_id=body_part)
        return self._handles[body_part]

    def _threshold(self, part: str, operating_point: str | None) -> float:
        from ..inference.predictor import resolve_threshold

        try:
            return resolve_threshold(self.metas[part], operating_point)
        except ValueError as exc:
            raise _Rejected(422, "bad_operating_point", str(exc)) from exc

    async def _call(self, response):
        """Await a downstream call; overload there becomes a 503 with Retry-After."""
        from ray.serve.exceptions import BackPressureError

        try:
            return await response
        except BackPressureError as exc:
            raise _Rejected(503, "overloaded", f"The models are at capacity ({exc}); retry shortly",
                            {"Retry-After": "1"}) from exc

    async def _classify_one(self, name: str, data: bytes, body_part: str | None, operating_point: str | None,
                            gradcam: bool, overlay: bool = False) -> dict[str, Any]:
        from ..inference.predictor import image_result

        started = time.perf_counter()
        if body_part is not None:
            body_part = body_part.strip().lower()
            if body_part not in self.metas:
                raise _Rejected(422, "unknown_body_part", f"No fracture model for body part {body_part!r}; "
                                                          f"known: {sorted(self.metas)}")
        decoded = await asyncio.to_thread(self._decode, name, data)
        decoded_at = time.perf_counter()
        if body_part is None:
            body_part, part_probability, route_batch = await self._call(self.router.route.remote(decoded))
        else:
            part_probability, route_batch = None, None
        routed_at = time.perf_counter()
        if body_part not in self.metas:  # a router class without a trained classifier
            raise _Rejected(422, "unknown_body_part", f"The router chose {body_part!r}, which has no fracture model; "
                                                      f"pass body_part (one of {sorted(self.metas)})")
        threshold = self._threshold(body_part, operating_point)
        handle = self._classifier_handle(body_part)
        probability, classifier_name, classify_batch, findings = await self._call(
            handle.classify.remote(decoded, body_part))
        classified_at = time.perf_counter()
        result = image_result(body_part, part_probability, probability, threshold, classifier_name,
                              self.models["router"]["name"] if self.models["router"] else None, findings)
        result["operating_point"] = operating_point or "default"
        if overlay:
            drawn = await self._call(handle.overlay.remote(decoded, body_part, findings))
            result["overlay"] = {"png_base64": base64.b64encode(drawn["png"]).decode(), "heatmap": drawn["heatmap"],
                                 "peak_xy": drawn["peak_xy"], "findings": len(findings)}
        if gradcam:
            heatmap = await self._call(handle.explain.remote(decoded, body_part))
            from ..inference.gradcam import heatmap_peak, overlay_png

            png = await asyncio.to_thread(overlay_png, decoded.pixels, heatmap)
            peak = heatmap_peak(heatmap)
            result["gradcam"] = {"png_base64": base64.b64encode(png).decode(), "peak_xy": [peak[0], peak[1]],
                                 "target": "fracture class"}
        result["timings_ms"] = {"decode": round(1000 * (decoded_at - started), 2),
                                "route": round(1000 * (routed_at - decoded_at), 2),
                                "classify": round(1000 * (classified_at - routed_at), 2),
                                "total": round(1000 * (time.perf_counter() - started), 2)}
        result["batch"] = {"route": route_batch, "classify": classify_batch}  # images per model call
        result["image"] = {"name": name, "width": decoded.width, "height": decoded.height,
                           "format": decoded.source_format}
        return result

    @staticmethod
    def _error(exc: _Rejected):
        return JSONResponse({"error": exc.reason, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    # --------------------------------------------------------------- endpoints

    @api.get("/healthz", summary="Liveness: the ingress answers")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: the router and every classifier are loaded")
    async def readyz(self):
        try:
            router = await self.router.ready.remote()
            loaded = await asyncio.gather(*[self._classifier_handle(p).load.remote(p)
                                            for p in sorted(self.metas)])
        except Exception as exc:  # not ready for any reason: say why, with 503
            return JSONResponse({"status": "not_ready", "detail": f"{type(exc).__name__}: {exc}"}, status_code=503)
        return {"status": "ready", "router": router["router"], "classifiers": dict(zip(sorted(self.metas), loaded))}

    @api.get("/v1/models", summary="The router and classifiers this service runs")
    def list_models(self, request: Request):
        try:
            self._check_auth(request)
        except _Rejected as exc:
            return self._error(exc)
        return self.models

    @api.post("/v1/classify", summary="Classify one radiograph",
              description="Send the image as the raw request body (image/jpeg, image/png, application/dicom) or as "
                          "the 'file' part of a multipart form. body_part skips the router; operating_point is a "
                          "named operating point of the model (see /v1/models) or a threshold in [0, 1]; "
                          "gradcam=true adds a heatmap PNG (base64); overlay=true adds the radiograph with the "
                          "heatmap and the findings drawn (PNG, base64). " + _RESULT_FIELDS)
    async def classify(self, request: Request, body_part: str | None = _body_part_query(),
                       operating_point: str | None = _operating_point_query(), gradcam: bool = _gradcam_query(),
                       overlay: bool = _overlay_query()):
        try:
            self._check_auth(request)
            uploads = await self._uploads(request)
            if len(uploads) != 1:
                raise _Rejected(400, "too_many_files", f"/v1/classify takes one image; got {len(uploads)}. "
                                                       f"Use /v1/classify/study for several")
            name, data = uploads[0]
            return await self._classify_one(name, data, body_part, operating_point, gradcam, overlay)
        except _Rejected as exc:
            return self._error(exc)

    @api.post("/v1/classify/study", summary="Classify a study (several images of one examination)",
              description="Multipart form with one 'files' part per image. Returns each image's result and the "
                          "study's: mean fracture probability over its images (MURA's rule) against the mean "
                          "threshold. Images that cannot be read are listed with their reason and left out. "
                          "Each image's result has the fields of /v1/classify's: " + _RESULT_FIELDS)
    async def classify_study(self, request: Request, body_part: str | None = _body_part_query(),
                             operating_point: str | None = _operating_point_query(),
                             gradcam: bool = _gradcam_query(), overlay: bool = _overlay_query()):
        try:
            self._check_auth(request)
            uploads = await self._uploads(request)
            if len(uploads) > self.args.max_study_images:
                raise _Rejected(413, "too_many_files", f"A study may have at most {self.args.max_study_images} images")
            outcomes = await asyncio.gather(*[self._classify_one(n, d, body_part, operating_point, gradcam, overlay)
                                              for n, d in uploads], return_exceptions=True)
            images = []
            for (name, _), outcome in zip(uploads, outcomes):
                if isinstance(outcome, _Rejected):
                    if outcome.status in (401, 422, 503) and outcome.reason != "out_of_scope":
                        raise outcome  # not about this image: fail the request
                    images.append({"image": {"name": name}, "error": outcome.reason, "detail": outcome.detail})
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    images.append(outcome)
            scored = [r for r in images if "fracture_probability" in r]
            if not scored and all(r.get("error") == "out_of_scope" for r in images):
                raise _Rejected(422, "out_of_scope", "None of the study's images is a limb radiograph: "
                                + "; ".join(f"{r['image']['name']}: {r['detail']}" for r in images))
            if not scored:
                raise _Rejected(400, "no_readable_image", "None of the study's images could be read",)
            probability = float(np.mean([r["fracture_probability"] for r in scored]))
            threshold = float(np.mean([r["threshold"] for r in scored]))
            study = {"images": len(images), "scored": len(scored), "fracture_probability": probability,
                     "threshold": threshold, "label": int(probability >= threshold),
                     "body_part": Counter(r["body_part"] for r in scored).most_common(1)[0][0],
                     "rule": "mean probability over the study's images (MURA)"}
            return {"study": study, "images": images}
        except _Rejected as exc:
            return self._error(exc)


# ----------------------------------------------------------------------------- builder

def build_app(args: ServeArgs | dict[str, Any] | None = None):
    """The typed application builder: ``serve run fracray.serving.app:build_app models=...``
    or serving/config.yaml's ``import_path`` + ``args``."""
    args = ServeArgs.parse(args)
    if not storage.is_remote(args.models):
        args = dataclasses.replace(args, models=storage.normalize(args.models))  # replicas have other cwds
    model_options: dict[str, Any] = {}
    if args.num_gpus is not None:
        model_options["ray_actor_options"] = {"num_cpus": 0.5, "num_gpus": args.num_gpus}
    ingress_options: dict[str, Any] = {}
    if args.max_ongoing_requests is not None:
        ingress_options["max_ongoing_requests"] = args.max_ongoing_requests
    if args.max_queued_requests is not None:
        ingress_options["max_queued_requests"] = args.max_queued_requests
    if args.replicas is not None:
        fixed = {"num_replicas": args.replicas, "autoscaling_config": None}
        model_options.update(fixed)
        ingress_options.update(fixed)
    router = BodyPartRouter.options(**model_options).bind(args)
    classifiers = FractureClassifiers.options(**model_options).bind(args)
    return Ingress.options(**ingress_options).bind(router, classifiers, args)


app_builder = build_app
