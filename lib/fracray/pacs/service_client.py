"""The fracture service as the DICOM node calls it: a study's images through
``POST {service_url}/v1/classify/study`` in requests of at most ``max_study_images`` images and
``max_request_mb``, and the study's finding from the answers (the service's own study rule,
``metrics.study.study_decision``)."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections import Counter
from urllib.parse import urlparse

import requests

from ..metrics.study import study_decision
from .failures import TransientFailure
from .results import StudyFinding

__all__ = ["ServiceClient", "ServiceAnswers", "study_finding"]

_REFUSED_BY_SERVICE = (400, 415, 422)  # the images themselves (unreadable, out of scope): not worth a retry


@dataclasses.dataclass(frozen=True)
class ServiceAnswers:
    results: dict[int, dict]   # each scored image's answer, by its index in the items sent
    errors: Counter            # how many images were not scored, per reason
    requests: int              # requests made


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServiceClient:
    """The settings are ListenerConfig's (service_url, token_env, ...), where their defaults live."""

    url: str                        # the service's http(s):// address
    token_env: str                  # environment variable holding the bearer token (read per study)
    operating_point: str | None
    max_study_images: int
    max_request_mb: float
    timeout_s: float

    def chunks(self, items: list, errors: Counter) -> list[list[int]]:
        """Indexes of the images per request: at most max_study_images and max_request_mb each."""
        limit = int(self.max_request_mb * 1024 * 1024)
        chunks: list[list[int]] = []
        size = 0
        for i, (data, _) in enumerate(items):
            if len(data) > limit:
                errors["larger_than_max_request_mb"] += 1
                continue
            if not chunks or len(chunks[-1]) >= self.max_study_images or size + len(data) > limit:
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += len(data)
        return chunks

    def classify(self, items: list) -> ServiceAnswers:
        """``items``: (encoded instance, data set) pairs. Raises TransientFailure when the service
        does not answer, refuses the token or fails; images it refuses are counted, not raised."""
        token = os.environ.get(self.token_env)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        params = {"operating_point": self.operating_point} if self.operating_point else {}
        url = self.url.rstrip("/") + "/v1/classify/study"
        host = urlparse(url).netloc
        results: dict[int, dict] = {}
        errors: Counter = Counter()
        chunks = self.chunks(items, errors)
        for chunk in chunks:
            # Parts are named by their index: no UID travels in a name or comes back in an error.
            files = [("files", (f"{i}.dcm", items[i][0], "application/dicom")) for i in chunk]
            request_id = f"listener-{uuid.uuid4().hex[:12]}"
            try:
                response = requests.post(url, files=files, params=params, timeout=self.timeout_s,
                                         headers={**headers, "X-Request-Id": request_id})
            except requests.RequestException as exc:
                raise TransientFailure(f"the service at {host} did not answer ({type(exc).__name__})") from exc
            try:
                body = response.json()
            except ValueError:
                body = {}
            error = body.get("error") if isinstance(body, dict) else None
            if response.status_code in (401, 403):
                raise TransientFailure(f"the service at {host} refused the bearer token ({response.status_code} "
                                       f"{error}); set {self.token_env} to the service's token")
            if response.status_code in _REFUSED_BY_SERVICE and error:
                errors[error] += len(chunk)  # e.g. out_of_scope, no_readable_image: every image of the request
                continue
            if response.status_code != 200 or not isinstance(body, dict) or "images" not in body:
                hint = ("; lower max_study_images or max_request_mb to the service's"
                        if response.status_code == 413 else "")
                raise TransientFailure(f"the service at {host} answered {response.status_code} {error or ''}".rstrip()
                                       + f" (request id {request_id}){hint}")
            for answer in body["images"]:
                index = int(str(answer["image"]["name"]).split(".", 1)[0])
                if "fracture_probability" in answer:
                    results[index] = answer
                else:
                    errors[str(answer.get("error", "error"))] += 1
        return ServiceAnswers(results, errors, len(chunks))


def study_finding(scored: list, operating_point: str | None) -> StudyFinding:
    """The study's finding from its scored images, ``(data, data set, answer)`` each: the
    service's study rule over their probabilities, and each image's boxes clipped to it."""
    answers = [r for _, _, r in scored]
    decision = study_decision([r["fracture_probability"] for r in answers], [r["threshold"] for r in answers],
                              [r.get("body_part") for r in answers])
    models = sorted({str(r.get("classifier") or "unknown") for r in answers})
    names, versions = zip(*(m.partition("@")[::2] for m in models))
    regions = {}
    for _, ds, r in scored:
        cols, rows = int(ds.Columns), int(ds.Rows)
        boxes = []
        for f in r.get("findings") or []:
            x0, y0, x1, y1 = (float(v) for v in f["box"])
            x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(cols), x1), min(float(rows), y1)
            if x0 < x1 and y0 < y1:
                boxes.append({"box": [x0, y0, x1, y1], "score": float(f["score"])})
        if boxes:
            regions[str(ds.SOPInstanceUID)] = boxes
    return StudyFinding(fracture_probability=decision["fracture_probability"], threshold=decision["threshold"],
                        label=decision["label"], model_name="+".join(names),
                        model_version="+".join(v or "unknown" for v in versions),
                        operating_point=operating_point or "default", regions=regions)
