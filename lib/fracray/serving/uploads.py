"""What a classify request's body holds: the Content-Type rule, the size limit while the body is
read, and the images of a raw body or a multipart form."""

from __future__ import annotations

from typing import Awaitable, Callable

from starlette.requests import Request

from .errors import Rejected

__all__ = ["ACCEPTED_CONTENT_TYPES", "content_type_accepted", "read_body", "image_uploads"]

# The one Content-Type rule: a raw body (or a multipart file part) is an image, DICOM or plain
# bytes, or says nothing; the format itself is always read from the bytes. Anything else
# (text/plain, application/json, ...) is 415 unsupported_media_type.
ACCEPTED_CONTENT_TYPES = ("image/*", "application/dicom", "application/octet-stream")


def content_type_accepted(content_type: str | None) -> bool:
    """The Content-Type rule (ACCEPTED_CONTENT_TYPES), for a raw body or a multipart file part."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return kind in ("", "application/dicom", "application/octet-stream") or kind.startswith("image/")


async def read_body(request, max_bytes: int) -> bytes:
    """The request's body, refused (413 upload_too_large) as soon as it passes ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise Rejected(413, "upload_too_large", f"Upload of {int(declared)} bytes exceeds the limit of "
                                                f"{max_bytes} bytes (max_upload_mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise Rejected(413, "upload_too_large", f"Upload exceeds the limit of {max_bytes} bytes "
                                                    f"(max_upload_mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_uploads(request, body_of: Callable[[Request], Awaitable[bytes]],
                        max_files: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each image: the raw body, or every file of a multipart form
    (``body_of``: reads the body within the service's limit)."""
    content_type = request.headers.get("content-type", "")
    is_form = content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"
    if not is_form and not content_type_accepted(content_type):
        raise Rejected(415, "unsupported_media_type", f"Content-Type {content_type!r} is not an image: send "
                       f"{', '.join(ACCEPTED_CONTENT_TYPES)}, multipart/form-data, or no Content-Type")
    body = await body_of(request)
    if not is_form:
        return [("upload.dcm" if "dicom" in content_type else "upload", body)]

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:  # one more file than allowed, so that "too many" is told apart from a broken form
        form = await Request(request.scope, replay).form(max_files=max_files + 1, max_fields=100)
    except Exception as exc:  # malformed multipart bodies raise several starlette/multipart errors
        if "too many files" in str(exc).lower():
            raise Rejected(413, "too_many_files", f"At most {max_files} image(s) per request") from exc
        raise Rejected(400, "bad_multipart", f"Could not parse the multipart form: {exc}") from exc
    parts = [(key, f) for key, f in form.multi_items() if hasattr(f, "read")]
    if not parts:
        raise Rejected(400, "no_file", "The multipart form has no file part; send the image as 'file'")
    if len(parts) > max_files:
        raise Rejected(413, "too_many_files", f"At most {max_files} image(s) per request; got {len(parts)}"
                       + (". Use /v1/classify/study for several" if max_files == 1 else ""))
    for key, f in parts:
        if not content_type_accepted(f.content_type):
            raise Rejected(415, "unsupported_media_type", f"File part {f.filename or key!r} has Content-Type "
                           f"{f.content_type!r}: send {', '.join(ACCEPTED_CONTENT_TYPES)} or none")
    return [(f.filename or key, await f.read()) for key, f in parts]
