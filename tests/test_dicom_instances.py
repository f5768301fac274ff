"""Which DICOM instances are classified: one rule (fracray.imaging.instances) for the DICOM node
(C-STORE) and the service's STOW-RS; and a STOW-RS request where one study fails still answers
for the others. The same instances over real HTTP: tests/test_serving.py."""

from __future__ import annotations

import asyncio
import io
import json
import types

import pytest

from conftest import instance_zoo


EXPECTED = {"dx": None, "cr": None, "own_result": "own_result", "no_pixels": "no_pixel_data",
            "bad_frames": "invalid_number_of_frames", "no_study_uid": "missing_uids",
            "test-SR.dcm": "not_a_radiograph", "rtplan.dcm": "not_a_radiograph", "waveform_ecg.dcm": "not_a_radiograph",
            "SC_rgb_rle_2frame.dcm": "multi_frame", "CT_small.dcm": "not_a_radiograph",
            "MR_small.dcm": "not_a_radiograph"}


def test_one_rule_decides_for_the_listener_and_stow():
    """The listener's skip_reason (with the SOP class of its presentation context) and the rule
    STOW-RS applies (the data set's own SOPClassUID) refuse the same instances, for the same reason."""
    import pydicom

    from fracray.imaging.instances import refusal
    from fracray.pacs.receiver import skip_reason

    for name, data in instance_zoo().items():
        ds = pydicom.dcmread(io.BytesIO(data), defer_size=1024, force=True)
        refused = refusal(ds)
        assert (refused.reason if refused else None) == EXPECTED[name], (name, refused)
        assert skip_reason(str(ds.SOPClassUID), ds) == (refused.detail if refused else None), name


class _BrokenElement:
    def get(self, key, default=None):
        raise ValueError("a header element that does not parse")

    def __contains__(self, key):
        raise ValueError("a header element that does not parse")


def test_an_unparseable_header_is_a_refusal_not_an_exception():
    from fracray.imaging.instances import refusal
    from fracray.pacs.receiver import skip_reason

    refused = refusal(_BrokenElement(), "1.2.840.10008.5.1.4.1.1.1")
    assert refused.reason == "unreadable_header" and "Computed Radiography" in refused.detail
    assert skip_reason("1.2.840.10008.5.1.4.1.1.1", _BrokenElement()) == refused.detail


# ----------------------------------------------------------------------------- STOW-RS isolation

# The ingress class is used without Serve (object.__new__): its wrapper's async __del__ is never awaited.
NO_DEL_WARNING = pytest.mark.filterwarnings("ignore:coroutine .*__del__.* was never awaited:RuntimeWarning")

def _stow_request(parts: list[bytes]):
    from starlette.requests import Request

    boundary = "zoo-boundary"
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts) + b"--" + boundary.encode() + b"--\r\n"
    headers = [(b"content-type", f'multipart/related; type="application/dicom"; boundary={boundary}'.encode()),
               (b"content-length", str(len(body)).encode()), (b"accept", b"application/json"),
               (b"x-request-id", b"req-1")]
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/dicomweb/studies", "headers": headers,
                    "query_string": b""}, receive)


def _ingress_with(score_study):
    """The ingress's STOW-RS code on an instance without models: ``score_study`` stands in for
    scoring a study (the models' part, tested over HTTP elsewhere)."""
    from fracray.serving.args import ServeArgs
    from fracray.serving.ingress import Ingress

    ingress = object.__new__(Ingress.func_or_class)
    ingress.args = ServeArgs(max_study_images=16)
    ingress.max_bytes = 64 * 1024 * 1024
    ingress._warned_unguarded = True
    ingress.metas = {"wrist": None}
    ingress._score_study = types.MethodType(score_study, ingress)
    return ingress


def _study(uid_seed: int, n: int) -> tuple[str, list[bytes]]:
    from conftest import wrapped_study

    return wrapped_study(n, start=uid_seed, body_part="WRIST")


@NO_DEL_WARNING
@pytest.mark.parametrize("failure", ["bug", "model_error"])
def test_one_study_that_fails_is_reported_and_the_others_are_answered(failure):
    """A study the service fails on (an exception, or every image's model failing: 503 model_error)
    is listed as failed with 0x0110 Processing failure; the other study is answered. Before: the
    whole request was a 500 or a 503."""
    from fracray.serving.errors import Rejected as _Rejected

    (good_uid, good), (bad_uid, bad) = _study(0, 2), _study(2, 1)

    async def score_study(self, uploads, body_part, operating_point, gradcam, overlay, request_id):
        import pydicom

        uids = {str(pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).StudyInstanceUID) for _, d in uploads}
        if uids == {bad_uid}:
            if failure == "bug":
                raise KeyError("something this study's images hit")
            raise _Rejected(503, "model_error", "No image of the study could be scored: the model failed",
                            {"Retry-After": "5"})
        return {"study": {"images": len(uploads), "scored": len(uploads)},
                "images": [{"image": {"name": n}, "fracture_probability": 0.5} for n, _ in uploads]}

    ingress = _ingress_with(score_study)
    answer = asyncio.run(ingress.stow(_stow_request(good + bad), None))
    assert isinstance(answer, dict), getattr(answer, "body", answer)
    assert [s["study_instance_uid"] for s in answer["studies"]] == [good_uid]
    assert len(answer["failed"]) == 1 and answer["failed"][0]["error"] == ("processing_failed" if failure == "bug"
                                                                            else "model_error")
    assert "req-1" in answer["failed"][0]["detail"] or failure == "model_error"

    dicom_json = asyncio.run(_with_accept(ingress, good + bad))
    assert dicom_json.status_code == 202
    body = json.loads(dicom_json.body)
    assert len(body["00081199"]["Value"]) == 2  # the good study's two instances
    assert [f["00081197"]["Value"][0] for f in body["00081198"]["Value"]] == [0x0110]


async def _with_accept(ingress, parts):
    request = _stow_request(parts)
    request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"accept"] + [
        (b"accept", b"application/dicom+json")]
    return await ingress.stow(request, None)


@NO_DEL_WARNING
def test_an_overloaded_service_still_answers_the_whole_request_503():
    """Overload is about the service, not a study: the client retries the request (nothing is stored)."""
    from fracray.serving.errors import Rejected as _Rejected

    async def score_study(self, *args):
        raise _Rejected(503, "overloaded", "The models are at capacity; retry shortly", {"Retry-After": "1"})

    _, study = _study(4, 1)
    answer = asyncio.run(_ingress_with(score_study).stow(_stow_request(study), None))
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
