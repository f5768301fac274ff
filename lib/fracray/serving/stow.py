"""STOW-RS (DICOMweb, PS3.18) as a way in: the instances of a multipart/related body, which of
them are classified (the DICOM node's rule, ``imaging.instances.refusal``), each study scored on
its own, and the answer (the standard STOW-RS response data set, or fracray's JSON)."""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from fastapi.responses import JSONResponse
from starlette.requests import Request

from ..imaging.instances import UNREADABLE_REASONS, refusal
from .errors import Rejected

__all__ = ["read_instances", "stow_answer", "stow_response", "failure_reason", "SERVICE_BUSY"]

logger = logging.getLogger("ray.serve")

# Errors that are about the service, not a study (overload, a model replica dead twice): a STOW-RS
# request that meets one is answered 503 + Retry-After as a whole (nothing is stored: a retry is safe).
SERVICE_BUSY = ("overloaded", "replica_unavailable")
# The error names whose STOW-RS FailureReason is 0x0110 Processing failure (the service failed on
# the instance); every other refused image is 0xC000 Cannot understand (unreadable, out of scope).
PROCESSING_FAILURES = ("model_error", "processing_failed")


def failure_reason(error: str) -> int:
    return 0x0110 if error in PROCESSING_FAILURES else 0xC000


def _uid(ds, keyword: str) -> str | None:
    """A UID of a STOW-RS instance for its report, or None where absent or unreadable."""
    try:
        value = str(ds.get(keyword, "") or "").strip()
    except Exception:
        return None
    return value or None


def stow_response(referenced: list[dict], failed: list[dict]) -> dict[str, Any]:
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


async def read_instances(request, body_of: Callable[[Request], Awaitable[bytes]],
                         max_instances: int) -> tuple[list[tuple[bytes, dict]], list[dict]]:
    """The instances of a STOW-RS body (read by ``body_of``, at most ``max_instances``) that can be
    classified, with their header facts, and the ones refused, each with its reason: the rule is
    the DICOM node's (``imaging.instances.refusal``), so both ways in classify the same instances."""
    import email.parser
    import io

    import pydicom

    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    params = {k.strip().lower(): v.strip().strip('"').lower()
              for k, _, v in (p.partition("=") for p in content_type.split(";")[1:])}
    if media != "multipart/related" or params.get("type", "application/dicom") != "application/dicom":
        raise Rejected(415, "unsupported_media_type", f"STOW-RS takes multipart/related; "
                        f"type=\"application/dicom\". Got Content-Type {content_type!r}")
    body = await body_of(request)
    message = email.parser.BytesParser().parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    parts = message.get_payload() if message.is_multipart() else None
    if not parts:
        raise Rejected(400, "bad_multipart", "The multipart/related body has no parts (check its boundary)")
    if len(parts) > max_instances:
        raise Rejected(413, "too_many_files", f"At most {max_instances} instance(s) per request; "
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


async def stow_answer(request, instances: list[tuple[bytes, dict]], failed: list[dict],
                      score_study: Callable[[list[tuple[str, bytes]]], Awaitable[dict[str, Any]]], request_id: str):
    """Each study of ``instances`` scored (``score_study``) on its own: one study's failure is
    its own, the rest go on; then the answer in the form the request's Accept asks for."""
    by_study: dict[str, list[tuple[str, bytes, dict]]] = {}
    for data, header in instances:
        by_study.setdefault(header["study"], []).append((f"{header['sop']}.dcm", data, header))
    studies, referenced = [], []
    for study_uid, items in by_study.items():
        try:
            answer = await score_study([(n, d) for n, d, _ in items])
        except Rejected as exc:
            if exc.reason in SERVICE_BUSY:  # the service, not the study: the client retries it all
                raise
            failed += [{**h, "reason": failure_reason(exc.reason), "error": exc.reason,
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
                failed.append({**header, "reason": failure_reason(image["error"]),
                               "error": image["error"], "detail": image["detail"]})
            else:
                referenced.append(header)
        studies.append({"study_instance_uid": study_uid, **answer})
    if "application/dicom+json" in request.headers.get("accept", ""):
        status = 200 if not failed else 202 if referenced else 409
        return JSONResponse(stow_response(referenced, failed), status_code=status,
                            media_type="application/dicom+json")
    return {"studies": studies,
            "failed": [{"sop_instance_uid": f.get("sop"), "sop_class_uid": f.get("sop_class"),
                        "error": f["error"], "detail": f["detail"]} for f in failed]}
