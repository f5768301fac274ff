"""A study: every image scored (each one's error listed, the rest kept), then the study's
decision by MURA's rule (metrics.study), for /v1/classify/study and STOW-RS."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from ..metrics.study import STUDY_RULE, study_decision
from .errors import Rejected

__all__ = ["score_study"]

logger = logging.getLogger("ray.serve")


async def score_study(uploads: list[tuple[str, bytes]], classify: Callable[[str, bytes], Awaitable[dict[str, Any]]],
                      request_id: str) -> dict[str, Any]:
    """Every image of one study (``classify(name, data)``: one image's result, or Rejected),
    then the study's decision; per-image errors listed, the rest scored."""
    outcomes = await asyncio.gather(*[classify(n, d) for n, d in uploads], return_exceptions=True)
    images = []
    for (name, _), outcome in zip(uploads, outcomes):
        if isinstance(outcome, Rejected):
            if not outcome.per_image:
                raise outcome  # not about this image (overload, a dead replica twice): fail the request
            images.append({"image": {"name": name}, "error": outcome.reason, "detail": outcome.detail})
        elif isinstance(outcome, BaseException):  # classify converts everything; kept as a guard
            logger.error("request %s: %s", request_id, type(outcome).__name__)
            images.append({"image": {"name": name}, "error": "processing_failed",
                           "detail": f"{type(outcome).__name__}; request id {request_id}"})
        else:
            images.append(outcome)
    scored = [r for r in images if "fracture_probability" in r]
    if not scored and all(r.get("error") == "out_of_scope" for r in images):
        raise Rejected(422, "out_of_scope", "None of the study's images is a limb radiograph: "
                        + "; ".join(f"{r['image']['name']}: {r['detail']}" for r in images))
    if not scored and any(r.get("error") == "model_error" for r in images):
        raise Rejected(503, "model_error", "No image of the study could be scored: "
                        + "; ".join(f"{r['image']['name']}: {r['detail']}" for r in images),
                        {"Retry-After": "5"})
    if not scored:
        raise Rejected(400, "no_readable_image", "None of the study's images could be scored: "
                        + "; ".join(f"{r['image']['name']}: {r['error']}" for r in images))
    decision = study_decision([r["fracture_probability"] for r in scored], [r["threshold"] for r in scored],
                              [r["body_part"] for r in scored])
    study = {"images": len(images), "scored": len(scored), **decision, "rule": STUDY_RULE}
    return {"study": study, "images": images}

