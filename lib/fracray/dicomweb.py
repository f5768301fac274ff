"""DICOMweb (QIDO-RS search, WADO-RS retrieval, STOW-RS storage) as a storage scheme.

URIs name a DICOMweb service and what is in it; ``dicomweb://`` is HTTP, ``dicomwebs://`` HTTPS:

    dicomweb://pacs:8042/dicom-web?StudyDate=20260101-20261231&ModalitiesInStudy=CR%5CDX   a query (QIDO-RS)
    dicomweb://pacs:8042/dicom-web/studies/<study>                                       one study
    dicomweb://pacs:8042/dicom-web/studies/<study>/series/<series>/instances/<sop>       one image (WADO-RS)

so that ``storage.read_bytes`` and ``storage.list_files`` (and with them Ray Data and
score_archive) read a PACS like any other archive. Credentials come from the environment,
never from URIs or logs: ``FRACRAY_DICOMWEB_TOKEN`` (bearer), or ``FRACRAY_DICOMWEB_USER`` and
``FRACRAY_DICOMWEB_PASSWORD`` (basic). Connection failures and 5xx answers are retried with
back-off, then raised as ``DicomWebError`` saying which service did not answer.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from typing import Iterable
from urllib.parse import parse_qsl, urlencode, urlparse

__all__ = ["DicomWebError", "DicomWebUnavailable", "DicomWebRefused", "DicomWebLocation", "SCHEMES", "is_dicomweb", "parse", "list_instances", "read_instance",
           "store_instances", "instance_uri"]

SCHEMES = ("dicomweb", "dicomwebs")
_MARKERS = ("studies", "series", "instances")
RETRIES = 4          # attempts for a request that fails to connect or gets a 5xx
BACKOFF_S = 0.5      # doubled after each failed attempt
TIMEOUT_S = 60.0


class DicomWebError(OSError):
    """The DICOMweb service refused, failed or did not answer (after retries)."""


class DicomWebUnavailable(DicomWebError):
    """The service did not answer, or answered 5xx, on every try: the PACS is down, not the data bad."""


class DicomWebRefused(DicomWebError):
    """The service refused what was asked or sent (a 4xx other than credentials, time-outs and rate
    limits, or instances in STOW-RS's Failed SOP Sequence): asking again will not help."""


# 4xx answers that say nothing against the request itself: credentials, time-outs, rate limits.
_NOT_A_REFUSAL = (401, 403, 407, 408, 429)


@dataclasses.dataclass(frozen=True)
class DicomWebLocation:
    base: str                     # http(s)://host:port/root (the service root)
    uri_base: str                 # dicomweb(s)://host:port/root
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    query: tuple[tuple[str, str], ...] = ()


def is_dicomweb(uri: str) -> bool:
    return urlparse(uri).scheme.lower() in SCHEMES


def parse(uri: str) -> DicomWebLocation:
    parsed = urlparse(uri)
    if parsed.scheme.lower() not in SCHEMES:
        raise ValueError(f"Not a DICOMweb URI (dicomweb:// or dicomwebs://). Got {uri!r}")
    if parsed.username or parsed.password:
        raise ValueError("Put DICOMweb credentials in FRACRAY_DICOMWEB_TOKEN or FRACRAY_DICOMWEB_USER/"
                         "FRACRAY_DICOMWEB_PASSWORD, never in the URI")
    parts = [p for p in parsed.path.split("/") if p]
    root = parts
    found: dict[str, str] = {}
    for i, part in enumerate(parts):
        if part in _MARKERS:
            root = parts[:i]
            rest = parts[i:]
            if len(rest) % 2:
                raise ValueError(f"A DICOMweb path names studies/<uid>[/series/<uid>[/instances/<uid>]]. Got {uri!r}")
            found = dict(zip(rest[::2], rest[1::2]))
            break
    http = "https" if parsed.scheme.lower() == "dicomwebs" else "http"
    root_path = "/" + "/".join(root) if root else ""
    return DicomWebLocation(base=f"{http}://{parsed.netloc}{root_path}",
                            uri_base=f"{parsed.scheme.lower()}://{parsed.netloc}{root_path}",
                            study=found.get("studies"), series=found.get("series"), instance=found.get("instances"),
                            query=tuple(parse_qsl(parsed.query, keep_blank_values=True)))


def instance_uri(location: DicomWebLocation, study: str, series: str, instance: str) -> str:
    return f"{location.uri_base}/studies/{study}/series/{series}/instances/{instance}"


def _session():
    import requests

    session = requests.Session()
    token = os.environ.get("FRACRAY_DICOMWEB_TOKEN")
    user, password = os.environ.get("FRACRAY_DICOMWEB_USER"), os.environ.get("FRACRAY_DICOMWEB_PASSWORD")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, password or "")
    return session


def _request(method: str, url: str, *, what: str, answers: tuple[int, ...] = (), **kwargs):
    """One DICOMweb request with retries on connection errors and 5xx; 4xx is not retried."""
    import requests

    delay, last = BACKOFF_S, None
    with _session() as session:
        for attempt in range(1, RETRIES + 1):
            try:
                response = session.request(method, url, timeout=TIMEOUT_S, **kwargs)
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}"  # not str(exc): it can carry the URL's query (patient data)
            else:
                if response.status_code < 500:
                    if response.status_code >= 400 and response.status_code not in answers:
                        kind = DicomWebError if response.status_code in _NOT_A_REFUSAL else DicomWebRefused
                        raise kind(f"{what}: the DICOMweb service answered {response.status_code} "
                                            f"{response.reason}" + (" (check FRACRAY_DICOMWEB_* credentials)"
                                                                    if response.status_code in (401, 403) else ""))
                    return response
                last = f"HTTP {response.status_code}"
            if attempt < RETRIES:
                time.sleep(delay)
                delay *= 2
    host = urlparse(url).netloc
    raise DicomWebUnavailable(f"{what}: the DICOMweb service at {host} did not answer after {RETRIES} tries ({last}); "
                        f"check that the PACS is up, then rerun (finished work is kept)")


def _uid(item: dict, tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def list_instances(uri: str) -> list[str]:
    """Every instance a DICOMweb URI names (a query, a study, a series), as instance URIs, sorted."""
    loc = parse(uri)
    if loc.instance:
        return [uri]
    if loc.study:
        studies = [loc.study]
    else:
        # DICOM writes a list of values with "\" (CR\DX); QIDO-RS with commas (PS3.18 8.3.4.1).
        query = [(key, value.replace("\\", ",")) for key, value in loc.query]
        found = _request("GET", f"{loc.base}/studies" + (f"?{urlencode(query)}" if query else ""),
                         what="QIDO-RS study search", headers={"Accept": "application/dicom+json"})
        studies = sorted(s for s in (_uid(item, "0020000D") for item in (found.json() if found.content else []))
                         if s)
    uris = []
    for study in studies:
        path = f"{loc.base}/studies/{study}" + (f"/series/{loc.series}" if loc.series else "") + "/instances"
        found = _request("GET", path, what="QIDO-RS instance search", headers={"Accept": "application/dicom+json"})
        for item in found.json() if found.content else []:
            series, sop = _uid(item, "0020000E"), _uid(item, "00080018")
            if series and sop:
                uris.append(instance_uri(loc, study, series, sop))
    return sorted(uris)


def _multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise DicomWebError(f"WADO-RS answer is not multipart (Content-Type {content_type!r})")
    parts = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        _, sep, payload = chunk.partition(b"\r\n\r\n")
        if sep:
            parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


def read_instance(uri: str) -> bytes:
    """One instance's DICOM file bytes (WADO-RS, in its stored transfer syntax)."""
    loc = parse(uri)
    if not (loc.study and loc.series and loc.instance):
        raise ValueError(f"Not a DICOMweb instance URI (…/studies/<uid>/series/<uid>/instances/<uid>). Got {uri!r}")
    url = f"{loc.base}/studies/{loc.study}/series/{loc.series}/instances/{loc.instance}"
    response = _request("GET", url, what="WADO-RS retrieval",
                        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    parts = _multipart_parts(response.content, response.headers.get("Content-Type", ""))
    if len(parts) != 1:
        raise DicomWebError(f"WADO-RS returned {len(parts)} objects for one instance")
    return parts[0]


def store_instances(uri: str, files: Iterable[bytes]) -> dict:
    """STOW-RS: store DICOM files (bytes, each a complete Part 10 file) in the service; returns
    the service's JSON answer. Raises DicomWebError if any instance was refused."""
    loc = parse(uri)
    boundary = f"fracray-{uuid.uuid4().hex}"
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n"
                    for f in files) + b"--" + boundary.encode() + b"--\r\n"
    # 409: none stored, with the reasons in the answer's Failed SOP Sequence (PS3.18 10.5.3).
    response = _request("POST", f"{loc.base}/studies", what="STOW-RS storage", data=body, answers=(409,),
                        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                                 "Accept": "application/dicom+json"})
    try:
        answer = response.json() if response.content else {}
    except ValueError:
        answer = {}
    failed = (answer.get("00081198") or {}).get("Value") or [] if isinstance(answer, dict) else []
    if response.status_code == 409 and not failed:
        raise DicomWebRefused("STOW-RS storage: the DICOMweb service answered 409 Conflict (nothing stored)")
    if failed:
        reasons = sorted({f"0x{int(v):04X}" for item in failed
                          for v in ((item.get("00081197") or {}).get("Value") or [])})  # FailureReason
        raise DicomWebRefused(f"STOW-RS refused {len(failed)} instance(s)"
                              + (f" (failure reason {', '.join(reasons)})" if reasons else ""))
    return answer
