"""The review application (ASGI, FastAPI): worklist, study view, feedback, monitoring, export.

``fracray review RUN`` serves it with uvicorn on the host and port given (nothing else is bound);
:func:`build_review_app` deploys the same application on Ray Serve beside the service
(``serve run fracray.review.app:build_review_app run=s3://...``).

Auth as the service: when ``$FRACRAY_API_TOKEN`` (``auth_token_env``) is set, every path but /healthz, /login
and /static needs ``Authorization: Bearer <token>`` or the cookie the login form (or ``?token=`` once)
sets. Logs: one line per request with its id, status and time; never a path, study, file or name
(patient data stays in the pages).
"""

from __future__ import annotations

import datetime as _dt
import hmac
import io
import json
import logging
import os
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from .. import storage
from ..imaging.decode import ImageRejected, decode_image
from ..storage import StorageOptions
from .export import feedback_manifest
from .feedback import FeedbackRecord, FeedbackStore, open_store
from .worklist import RunError, ScoringRun, WorklistQuery

from .monitoring import monitoring_report
from .monitoring_plots import render_plots

__all__ = ["ReviewArgs", "ReviewState", "create_app", "build_review_app", "LOGGER_NAME"]

LOGGER_NAME = "fracray.review"
WEB = Path(__file__).parent / "web"
COOKIE = "fracray_review_token"
MAX_IMAGE_SIDE = 1024
log = logging.getLogger(LOGGER_NAME)


class ReviewArgs(BaseModel):
    """The application's arguments (``fracray review`` flags, or ``key=value`` after
    ``serve run fracray.review.app:build_review_app``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run: str = Field(min_length=1)                 # the score_archive output (local or s3://)
    feedback: str | None = None                    # SQLite file or postgresql:// URL; None: beside the run
    auth_token_env: str = "FRACRAY_API_TOKEN"           # bearer token required when this variable is set
    endpoint_url: str | None = None                # s3:// storage options, as the other commands
    region: str | None = None
    anonymous: bool = False
    max_image_side: int = Field(MAX_IMAGE_SIDE, ge=64, le=4096)  # the study view's image size
    route_prefix: str = ""                         # where the app is mounted (Serve: its route prefix)

    def storage_options(self) -> StorageOptions:
        return StorageOptions(endpoint_url=self.endpoint_url, region=self.region, anonymous=self.anonymous)


class ReviewState:
    """The open run and feedback store, opened on first use (so a Serve replica opens its own)."""

    def __init__(self, args: ReviewArgs):
        self.args = args
        self._lock = threading.Lock()
        self._run: ScoringRun | None = None
        self._store: FeedbackStore | None = None

    def open(self) -> "ReviewState":
        with self._lock:
            if self._run is None:
                self._run = ScoringRun(self.args.run, self.args.storage_options())
            if self._store is None:
                self._store = open_store(self.args.feedback, self._run.uri)
        return self

    @property
    def run(self) -> ScoringRun:
        return self.open()._run

    @property
    def store(self) -> FeedbackStore:
        return self.open()._store

    def close(self) -> None:
        with self._lock:
            if self._run is not None:
                self._run.close()
            if self._store is not None:
                self._store.close()
            self._run = self._store = None


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _query(params) -> WorklistQuery:
    def get(name):
        value = params.get(name)
        return value if value not in (None, "") else None

    try:
        return WorklistQuery(operating_point=get("op") or "run", body_part=get("body_part"), label=get("label"),
                             date_from=get("date_from"), date_to=get("date_to"), reviewed=get("reviewed"),
                             sort=get("sort") or "probability", page=int(get("page") or 1),
                             page_size=int(get("page_size") or 50))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


def _png(pixels, max_side: int) -> bytes:
    arr = pixels
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr)
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.convert("L" if img.mode not in ("L", "RGB") else img.mode).save(out, format="JPEG", quality=90)
    return out.getvalue()


def create_app(args: ReviewArgs | dict, state: ReviewState | None = None, *, require_token: bool = False) -> FastAPI:
    """The application. ``require_token``: refuse to build it when ``$auth_token_env`` is not set in
    this process (a Serve replica, reachable from the whole cluster: it shows patient images)."""
    args = args if isinstance(args, ReviewArgs) else ReviewArgs.model_validate(args)
    token = os.environ.get(args.auth_token_env, "") or ""
    if require_token and not token:
        raise RuntimeError(f"${args.auth_token_env} is not set in this replica's environment: on a cluster the review "
                           f"application shows patient images to whoever reaches it, so it requires a bearer token "
                           f"(set the variable on the cluster, or in the application's runtime_env env_vars)")
    state = state or ReviewState(args)
    app = FastAPI(title="fracray review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.review = state
    token_bytes = token.encode()
    prefix = args.route_prefix.rstrip("/")
    public = ("/healthz", "/login", "/static/")

    def authorised(request: Request) -> bool:
        if not token:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(supplied.strip().encode(), token_bytes):
            return True
        cookie = request.cookies.get(COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie.encode(), token_bytes)

    def set_cookie(response: Response) -> Response:
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    @app.middleware("http")
    async def request_id_and_auth(request: Request, call_next):
        rid = uuid.uuid4().hex[:12]
        started = time.perf_counter()
        path = request.url.path[len(prefix):] if prefix and request.url.path.startswith(prefix) else request.url.path
        try:
            supplied = request.query_params.get("token")
            if token and supplied is not None and request.method == "GET":
                # ?token= once: the cookie is set and the address loses the token.
                if hmac.compare_digest(supplied.encode(), token_bytes):
                    query = urllib.parse.urlencode([(k, v) for k, v in request.query_params.multi_items()
                                                    if k != "token"])
                    target = request.url.path + (f"?{query}" if query else "")
                    response = set_cookie(RedirectResponse(target, status_code=303))
                else:
                    response = RedirectResponse(f"{prefix}/login?error=1", status_code=303)
            elif not path.startswith(public) and path != "/healthz" and not authorised(request):
                if path.startswith("/api/"):
                    response = JSONResponse({"error": "Missing or wrong bearer token: send 'Authorization: Bearer "
                                                      "<token>' or sign in at /login", "request_id": rid},
                                            status_code=401, headers={"WWW-Authenticate": "Bearer"})
                else:
                    response = RedirectResponse(f"{prefix}/login", status_code=303)
            else:
                response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - nothing crashes the app; the type only in the log
            log.error("request %s failed: %s", rid, type(exc).__name__)
            response = JSONResponse({"error": f"Internal error ({type(exc).__name__}); request id {rid}",
                                     "request_id": rid}, status_code=500)
        response.headers["X-Request-Id"] = rid
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        log.info("request %s %s %d %.0fms", rid, request.method, response.status_code,
                 1000 * (time.perf_counter() - started))
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RunError)
    async def run_error(request: Request, exc: RunError):
        return JSONResponse({"error": str(exc)}, status_code=503)

    # ------------------------------------------------------------------ pages
    def page(name: str) -> HTMLResponse:
        html = (WEB / name).read_text().replace("{{prefix}}", prefix)
        return HTMLResponse(html)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/login")
    def login_page():
        return page("login.html")

    @app.post("/login")
    async def login(request: Request):
        form = await request.form()
        supplied = str(form.get("token", ""))
        if token and not hmac.compare_digest(supplied.encode(), token_bytes):
            return RedirectResponse(f"{prefix}/login?error=1", status_code=303)
        return set_cookie(RedirectResponse(f"{prefix}/", status_code=303))

    @app.get("/logout")
    def logout():
        response = RedirectResponse(f"{prefix}/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/")
    def worklist_page():
        return page("worklist.html")

    @app.get("/study")
    def study_page():
        return page("study.html")

    @app.get("/monitoring")
    def monitoring_page():
        return page("monitoring.html")

    @app.get("/static/{name}")
    def static(name: str):
        path = WEB / "static" / name
        if "/" in name or ".." in name or not path.is_file():
            return JSONResponse({"error": "no such file"}, status_code=404)
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ API
    @app.get("/api/run")
    def api_run():
        info = state.run.describe()
        info["feedback_store"] = state.store.describe()
        info["auth"] = bool(token)
        return info

    @app.get("/api/worklist")
    def api_worklist(request: Request):
        query = _query(request.query_params)
        try:
            return state.run.worklist(query, state.store.reviewed_study_ids())
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    @app.get("/api/study")
    def api_study(request: Request):
        study_id = request.query_params.get("id") or ""
        query = _query(request.query_params)
        try:
            study = state.run.study(study_id, query.operating_point)
        except KeyError:
            raise ApiError(404, f"No study {study_id!r} in this run") from None
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        study["neighbours"] = state.run.neighbours(study_id, query, state.store.reviewed_study_ids())
        study["feedback"] = [dict(r.to_dict(), id=i) for i, r in state.store.records(study_id)]
        return study

    @app.get("/api/image")
    def api_image(request: Request):
        study_id = request.query_params.get("study") or ""
        uri = request.query_params.get("uri") or ""
        row = state.run.image_row(study_id, uri)  # only files the run scored are ever read
        if row is None:
            raise ApiError(404, "This image is not in this study of the run")
        try:
            data = storage.read_bytes(uri, state.run.options)
        except storage.StorageError as exc:
            raise ApiError(404, f"The image file cannot be read now ({exc}); the scoring result stands, "
                                f"the file has moved or been removed since") from None
        try:
            decoded = decode_image(data, name=uri, allow_headerless_dicom=True)
        except ImageRejected as exc:
            raise ApiError(422, f"The image cannot be decoded: {exc}") from None
        return Response(_png(decoded.pixels, args.max_image_side), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300"})

    @app.post("/api/feedback")
    async def api_feedback(request: Request):
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            box = body.get("box")
            record = FeedbackRecord(
                study_id=str(body.get("study_id") or ""), image_id=body.get("image_id"),
                finding=int(body["finding"]) if body.get("finding") is not None else None,
                verdict=str(body.get("verdict") or ""), box=tuple(box) if box is not None else None,
                reviewer=str(body.get("reviewer") or ""), created_at=_dt.datetime.now(_dt.timezone.utc))
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"Feedback not recorded: {exc}") from None
        _check_target(record)
        feedback_id = state.store.add(record)
        return JSONResponse(dict(record.to_dict(), id=feedback_id), status_code=201)

    def _check_target(record: FeedbackRecord) -> None:
        try:
            study = state.run.study(record.study_id)
        except KeyError:
            raise ApiError(404, f"No study {record.study_id!r} in this run") from None
        if record.image_id is not None:
            image = next((i for i in study["images"] if i["image_uri"] == record.image_id), None)
            if image is None:
                raise ApiError(404, "This image is not in this study of the run")
            if record.finding is not None and not 0 <= record.finding < len(image["findings"] or []):
                raise ApiError(400, f"The image has no finding {record.finding}")

    @app.delete("/api/feedback/{feedback_id}")
    def api_feedback_delete(feedback_id: int):
        if not state.store.delete(feedback_id):
            raise ApiError(404, f"No feedback {feedback_id} in this run")
        return {"deleted": feedback_id}

    @app.get("/api/export")
    def api_export():
        table = feedback_manifest(state.run, state.store.all())
        out = io.BytesIO()
        pq.write_table(table, out)
        return Response(out.getvalue(), media_type="application/vnd.apache.parquet",
                        headers={"Content-Disposition": 'attachment; filename="review-manifest.parquet"'})

    cache: dict[str, Any] = {}
    cache_lock = threading.Lock()

    def monitoring_now() -> dict[str, Any]:
        """The report and its plots, computed once and reused for 2 minutes while the feedback is unchanged."""
        feedback = state.store.all()
        # The feedback's ids too: a removal and an addition keep the count but change the report.
        key = tuple(sorted(repr(r.to_dict()) for r in feedback))
        with cache_lock:
            if cache and cache["feedback"] == key and time.time() - cache["at"] < 120:
                return cache
            try:
                report = monitoring_report(state.run.uri, feedback, storage_options=state.run.options)
                raw = report.to_json()
                body = json.loads(raw) if isinstance(raw, str) else raw
                plots = {str(k).removesuffix(".png"): v for k, v in render_plots(report).items()}
            except Exception as exc:  # noqa: BLE001 - a run the monitoring cannot read: said on its page
                log.error("monitoring failed: %s", type(exc).__name__)
                raise ApiError(503, f"Monitoring unavailable: {type(exc).__name__}: {str(exc)[:300]}") from None
            cache.clear()
            cache.update(at=time.time(), feedback=key, body=body, plots=plots)
            return cache

    @app.get("/api/monitoring")
    def api_monitoring():
        got = monitoring_now()
        return {"available": True, "report": got["body"], "plots": sorted(got["plots"])}

    @app.get("/api/monitoring/plot/{name}")
    def api_monitoring_plot(name: str):
        plots = monitoring_now()["plots"]
        if name not in plots:
            raise ApiError(404, f"No plot {name!r}")
        return Response(plots[name], media_type="image/png")

    return app


def build_review_app(args: ReviewArgs):
    """Ray Serve builder: the review application as one Serve deployment (``serve run
    fracray.review.app:build_review_app run=s3://bucket/scores feedback=postgresql://...``), beside the
    service on the same cluster. The run and the store open in the replica, on first request."""
    from ray import serve

    args = args if isinstance(args, ReviewArgs) else ReviewArgs.model_validate(args)
    if args.feedback is None and storage.is_remote(args.run):
        raise ValueError("On Serve, give feedback=postgresql://... (or a SQLite path on storage every replica "
                         "shares): the default beside an s3:// run is the replica's own working folder, lost "
                         "when the replica restarts")

    # The app is built in the replica (Serve calls the builder there): the token is read from the
    # replica's environment, and the app's locks and open files are never pickled.
    @serve.deployment(name="FracrayReview", num_replicas=1, ray_actor_options={"num_cpus": 1})
    @serve.ingress(lambda: create_app(args, require_token=True))
    class FracrayReview:
        pass

    return FracrayReview.bind()



# Serve converts `key=value` arguments with the pydantic model only when the builder's annotation is
# the class itself; `from __future__ import annotations` leaves a string there.
build_review_app.__annotations__["args"] = ReviewArgs
