"""The HTTP ingress: the FastAPI application (/docs) and the Ingress deployment behind it, which
bounds and decodes uploads, checks the bearer token (auth.py), answers errors as JSON
(errors.py), asks the router and the classifiers (deployments.py; in-process in the "fused"
layout), and draws Grad-CAM and overlay PNGs."""

# No `from __future__ import annotations` here: Serve runs a by-value copy of the Ingress class, whose
# functions keep only the globals their bodies use, so FastAPI could not resolve an endpoint's
# annotation "Request" from a string (the parameter would become a required query field).
import asyncio
import base64
import logging
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from ..artifacts.bundle import read_bundle_meta
from ..artifacts.describe import describe_bundle, parse_threshold, resolve_threshold
from ..artifacts.index import read_model_index
from ..inference.engines.choice import requested
from .args import ServeArgs
from .auth import BearerAuth, BearerGate
from .autoscaling import AUTOSCALING
from .deployments import BodyPartRouter
from .errors import (HTTP_STATUS_FOR_REJECT, LastResortErrors, Rejected, error_response, http_error, replica_errors,
                     request_id_of, validation_error)
from .in_process import FusedClassifiers, InProcess
from .stow import read_instances, stow_answer
from .studies import score_study
from .uploads import ACCEPTED_CONTENT_TYPES, image_uploads, read_body

# The predictor and Grad-CAM (torch) and the imaging modules (OpenCV) are imported where the
# replicas use them: building the application needs neither.

__all__ = ["api", "Ingress"]

logger = logging.getLogger("ray.serve")

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

api.add_exception_handler(RequestValidationError, validation_error)
api.add_exception_handler(StarletteHTTPException, http_error)
# The last added runs first: the token before anything else, and any error a JSON body.
api.add_middleware(LastResortErrors)
api.add_middleware(BearerGate)


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
            router = InProcess(BodyPartRouter.func_or_class(args))
            classifiers = InProcess(FusedClassifiers(args))
        elif router is None:  # an index without a router (build_app deploys none): the one classifier's name
            router = InProcess(BodyPartRouter.func_or_class(args))
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
                       # Asked of the replicas (given, else this replica's $FRACRAY_ENGINE /
                       # $FRACRAY_PRECISION, which the app's replicas share); each answer's "engine" names what ran.
                       "engine": requested("engine", self.args.engine),
                       "precision": requested("precision", self.args.precision),
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
        # The bearer-token rule that the gate (auth.BearerGate) asks of this replica's ingress.
        self.auth = BearerAuth(args.auth_token_env, args.public_docs)
        self._handles: dict[str, Any] = {}
        self._ready = False
        self._warned_unguarded = False

    # --------------------------------------------------------------- helpers

    async def _read_body(self, request) -> bytes:
        if request.headers.get("x-fracray-proxy-guard") is None and not self._warned_unguarded:
            self._warned_unguarded = True  # limits still hold here, but only after the proxy buffered the body
            logger.warning("Serve's proxy runs without fracray's guard (set RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH="
                           "fracray.serving.proxy_guard:proxy_middlewares on every node before Ray starts)")
        return await read_body(request, self.max_bytes)

    async def _uploads(self, request, max_files: int) -> list[tuple[str, bytes]]:
        return await image_uploads(request, self._read_body, max_files)

    def _decode(self, name: str, data: bytes):
        from ..imaging.decode import ImageRejected
        from ..imaging.preprocess import decode_for

        try:
            decoded = decode_for(data, self.decode_config, name=name)
        except ImageRejected as exc:
            raise Rejected(HTTP_STATUS_FOR_REJECT.get(exc.reason.value, 400), exc.reason.value, exc.detail,
                            per_image=True) from exc
        except Exception as exc:  # a decoder bug on a hostile file: this image's error, not the service's
            raise Rejected(400, "undecodable", f"The decoder failed on this file ({type(exc).__name__}: "
                            f"{str(exc)[:200]}); check that it is a complete JPEG, PNG or DICOM radiograph",
                            per_image=True) from exc
        if self.args.check_scope:
            from ..imaging.scope import OUT_OF_SCOPE, assess_scope

            verdict = assess_scope(decoded)
            if not verdict.in_scope:  # detail: "<reason>: <sentence>", e.g. "dicom_modality:CT: the DICOM ..."
                raise Rejected(HTTP_STATUS_FOR_REJECT[OUT_OF_SCOPE], OUT_OF_SCOPE,
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
            raise Rejected(422, "bad_operating_point", str(exc)) from exc

    async def _call(self, make_call, what: str):
        """Await a downstream call. Overload there is 503 + Retry-After; a replica that died
        under the call (or was gone) gets the call once more, on whichever replica the handle
        picks now, then 503 + Retry-After."""
        from ray.serve.exceptions import BackPressureError

        for attempt in (1, 2):
            try:
                return await make_call()
            except BackPressureError as exc:
                raise Rejected(503, "overloaded", f"The models are at capacity ({exc}); retry shortly",
                                {"Retry-After": "1"}) from exc
            except replica_errors() as exc:
                logger.warning("%s: replica unavailable (%s), attempt %d", what, type(exc).__name__, attempt)
                if attempt == 2:
                    raise Rejected(503, "replica_unavailable", f"The {what} replica died or is restarting "
                                    f"({type(exc).__name__}); retry shortly", {"Retry-After": "2"}) from exc
                await asyncio.sleep(0.2)

    async def _classify_one(self, name: str, data: bytes, body_part: str | None, operating_point: str | None,
                            gradcam: bool, overlay: bool, request_id: str) -> dict[str, Any]:
        try:
            return await self._classify_checked(name, data, body_part, operating_point, gradcam, overlay)
        except Rejected:
            raise
        except Exception as exc:  # anything else that fails on this image: its error, logged with the id
            from ray.exceptions import RayTaskError

            logger.exception("request %s: %s on one image", request_id, type(exc).__name__)
            if isinstance(exc, RayTaskError):  # raised in a model replica (e.g. a model that cannot load)
                raise Rejected(503, "model_error", f"The model failed on this image ({type(exc).__name__}); "
                                f"request id {request_id} is in the service's log. Retry later or report it",
                                {"Retry-After": "5"}, per_image=True) from exc
            raise Rejected(422, "processing_failed", f"The service could not process this image "
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
            raise Rejected(422, "unknown_body_part", f"The router chose {body_part!r}, which has no fracture model; "
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
                raise Rejected(422, "unknown_body_part", f"No fracture model for body part {body_part!r}; "
                                                          f"known: {sorted(self.metas)}")
        if operating_point is not None:
            try:  # a number is checked here; a name against the chosen model's operating points
                parse_threshold(operating_point)
            except ValueError as exc:
                raise Rejected(422, "bad_operating_point", str(exc)) from exc
        return body_part

    @staticmethod
    def _error(exc: Rejected):
        return error_response(exc.status, exc.reason, exc.detail, exc.headers)

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
            return error_response(503, "not_ready", f"{type(exc).__name__}: {exc}", {"Retry-After": "2"})
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
                                            request_id_of(request))
        except Rejected as exc:
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
            return await self._score_study(uploads, body_part, operating_point, gradcam, overlay, request_id_of(request))
        except Rejected as exc:
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
            rid = request_id_of(request)
            return await stow_answer(request, instances, failed, lambda uploads: self._score_study(
                uploads, None, operating_point, False, False, rid), rid)
        except Rejected as exc:
            return self._error(exc)

    async def _stow_parts(self, request) -> tuple[list[tuple[bytes, dict]], list[dict]]:
        return await read_instances(request, self._read_body, self.args.max_study_images)

    async def _score_study(self, uploads: list[tuple[str, bytes]], body_part: str | None, operating_point: str | None,
                           gradcam: bool, overlay: bool, request_id: str) -> dict[str, Any]:
        """Every image of one study, then the study's decision (studies.score_study)."""
        return await score_study(uploads, lambda name, data: self._classify_one(
            name, data, body_part, operating_point, gradcam, overlay, request_id), request_id)
