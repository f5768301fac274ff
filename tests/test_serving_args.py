"""The application's arguments (ServeArgs): what `serve run fracray.serving.app:build_app key=value ...`
passes is a string per key; Serve converts them with the pydantic model annotated on the builder.
Every field converts from a string or is refused with a message that names it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from pydantic import ValidationError

from fracray.serving.app import build_app
from fracray.serving.args import ServeArgs

# One command-line string per field, and what it must become.
AS_STRINGS = {
    "models": ("/data/model_index.json", "/data/model_index.json"),
    "max_upload_mb": ("2", 2.0),
    "max_pixels": ("4000000", 4_000_000),
    "max_study_images": ("8", 8),
    "max_batch_size": ("4", 4),
    "batch_wait_timeout_s": ("0.05", 0.05),
    "auth_token_env": ("MY_TOKEN", "MY_TOKEN"),
    "endpoint_url": ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    "region": ("eu-west-1", "eu-west-1"),
    "anonymous": ("false", False),
    "max_ongoing_requests": ("64", 64),
    "max_queued_requests": ("-1", -1),
    "num_gpus": ("0.5", 0.5),
    "replicas": ("1", 1),
    "min_replicas": ("1", 1),
    "check_scope": ("false", False),
    "public_docs": ("true", True),
    "engine": ("torch", "torch"),
    "precision": ("exact", "exact"),
    "layout": ("fused", "fused"),
    "operating_point": ("0.25", "0.25"),
}


def test_every_field_converts_from_a_command_line_string():
    assert set(AS_STRINGS) == set(ServeArgs.model_fields), "a field without a conversion test"
    args = ServeArgs.parse({name: text for name, (text, _) in AS_STRINGS.items()})
    for name, (_, expected) in AS_STRINGS.items():
        got = getattr(args, name)
        assert got == expected and type(got) is type(expected), (name, got)


@pytest.mark.parametrize("text, expected", [("false", False), ("False", False), ("0", False), ("no", False),
                                            ("true", True), ("TRUE", True), ("1", True), ("yes", True)])
def test_booleans_from_strings(text, expected):
    args = ServeArgs.parse({"anonymous": text, "check_scope": text, "public_docs": text})
    assert args.anonymous is expected and args.check_scope is expected and args.public_docs is expected
    # anonymous=false used to stay the string 'false', which storage took as true (S3 without credentials)
    assert args.storage_options.anonymous is expected


OPTIONAL = ["max_pixels", "endpoint_url", "region", "max_ongoing_requests", "max_queued_requests", "num_gpus", "replicas",
            "precision"]


@pytest.mark.parametrize("text", ["none", "None", "null", ""])
def test_optional_fields_take_none_from_a_string(text):
    assert set(OPTIONAL) == {n for n, f in ServeArgs.model_fields.items() if f.default is None}
    args = ServeArgs.parse({name: text for name in OPTIONAL})
    assert all(getattr(args, name) is None for name in OPTIONAL)


def test_numbers_from_yaml_reach_string_fields():
    """serving/config.yaml may write `operating_point: 0.25` (a YAML float) or a number for a name."""
    args = ServeArgs.parse({"operating_point": 0.25, "region": 1})
    assert args.operating_point == "0.25" and args.region == "1"


@pytest.mark.parametrize("name, value", [
    ("max_upload_mb", "big"), ("max_upload_mb", "0"), ("max_upload_mb", "-1"), ("max_upload_mb", "nan"),
    ("max_pixels", "2.5"), ("max_pixels", "lots"),
    ("max_study_images", "0"), ("max_study_images", "x"),
    ("max_batch_size", "0"), ("max_batch_size", "1.5"),
    ("batch_wait_timeout_s", "soon"),
    ("anonymous", "maybe"), ("check_scope", "2"), ("public_docs", "yes please"),
    ("max_ongoing_requests", "many"), ("max_queued_requests", "1e3x"),
    ("num_gpus", "one"), ("num_gpus", "inf"),
    ("replicas", "two"), ("min_replicas", "0"),
    ("engine", "tensorrt"), ("precision", "half"), ("layout", "star"), ("operating_point", "1.5"),
])
def test_a_bad_value_is_refused_naming_its_field(name, value):
    with pytest.raises(ValueError) as caught:
        ServeArgs.parse({name: value})
    assert isinstance(caught.value, ValidationError)
    errors = caught.value.errors()
    assert [e["loc"] for e in errors] == [(name,)], errors
    assert f"\n{name}\n" in str(caught.value)  # pydantic's message: the field's name on a line of its own


def test_unknown_arguments_and_the_old_messages():
    with pytest.raises(ValueError, match=r"Unknown application arguments \['max_upload'\]"):
        ServeArgs.parse({"max_upload": "2"})
    with pytest.raises(ValueError, match="layout must be one of graph, fused. Got 'star'"):
        ServeArgs.parse({"layout": "star"})
    with pytest.raises(ValueError, match="engine must be one of auto, torch, onnxruntime. Got 'x'"):
        ServeArgs.parse({"engine": "x"})


def test_defaults_python_callers_and_immutability():
    default = ServeArgs()
    assert ServeArgs.parse(None) == ServeArgs.parse({}) == default
    assert (default.max_upload_mb, default.max_pixels, default.min_replicas, default.anonymous) == (64.0, None, 2, False)
    typed = ServeArgs(models="m.json", max_upload_mb=2, num_gpus=1)  # keyword construction (jobs/serve.py)
    assert ServeArgs.parse(typed) is typed and typed.max_upload_mb == 2.0
    with pytest.raises(ValidationError):
        typed.max_upload_mb = 3  # frozen, as the dataclass was
    assert hash(typed) == hash(ServeArgs(models="m.json", max_upload_mb=2.0, num_gpus=1.0))


def test_serve_converts_the_builders_arguments(localizing_single_index):
    """What `serve run` does with `key=value` pairs (Ray's own function): the annotated model
    converts them, and a bad one stops the start naming the field."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as call_builder

    app = call_builder(build_app, {"models": localizing_single_index, "max_upload_mb": "2", "anonymous": "false",
                                   "layout": "fused", "min_replicas": "1", "max_pixels": "none"})
    args = app._bound_deployment.init_args[-1]  # the Ingress's ServeArgs
    assert isinstance(args, ServeArgs)
    assert (args.max_upload_mb, args.anonymous, args.layout, args.min_replicas, args.max_pixels) == (2.0, False, "fused",
                                                                                                     1, None)
    with pytest.raises(ValidationError, match="max_upload_mb"):
        call_builder(build_app, {"models": localizing_single_index, "max_upload_mb": "two"})


def _port_free(port: int) -> bool:
    """Nothing listens on ``port`` (connections in TIME_WAIT do not stop Serve's proxy, which reuses the address)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.slow
def test_serve_run_with_command_line_arguments(tmp_path, localizing_single_index):
    """`serve run fracray.serving.app:build_app models=... max_upload_mb=2` (its own local Ray) starts,
    and the ingress refuses a 3 MB upload with 413 while a 1.5 MB one gets past the size check."""
    from conftest import wait_ready

    port = 8000  # `serve run IMPORT_PATH` has no port option: Serve's default
    if not _port_free(port):
        pytest.skip(f"port {port} is in use")
    # No proxy guard (the ingress's own limit is the one under test), no token, not the test session's Ray.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "FRACRAY_BODY_TIMEOUT_S",
                        "FRACRAY_API_TOKEN") and not k.startswith("FRACRAY_MAX_")}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", "fracray.serving.app:build_app",
                                 f"models={localizing_single_index}", "max_upload_mb=2", "anonymous=false",
                                 "layout=fused", "min_replicas=1", "max_pixels=none", "check_scope=false"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve run exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                wait_ready(url, timeout=5)
                break
            except AssertionError:
                if time.time() > deadline:
                    raise
        models = requests.get(f"{url}/v1/models", timeout=60).json()
        assert models["layout"] == "fused"  # layout=fused reached the application
        big = requests.post(f"{url}/v1/classify", data=os.urandom(3 * 1024 * 1024),
                            headers={"content-type": "application/octet-stream"}, timeout=60)
        assert big.status_code == 413, big.text
        assert big.json()["error"] == "upload_too_large" and str(2 * 1024 * 1024) in big.json()["detail"]
        small = requests.post(f"{url}/v1/classify", data=os.urandom(3 * 512 * 1024),
                              headers={"content-type": "application/octet-stream"}, timeout=60)
        assert small.status_code != 413 and small.status_code < 500, small.text  # under the 2 MB: refused as no image
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group may be gone (serve run failed at start)
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _deployment_names(app) -> set[str]:
    """The deployments an application graph would start (walking the bound arguments)."""
    bound = app._bound_deployment
    names = {bound.name}
    for arg in (*bound.init_args, *bound.init_kwargs.values()):
        if hasattr(arg, "_bound_deployment"):
            names |= _deployment_names(arg)
    return names


def test_an_index_without_a_router_deploys_no_router(localizing_index, localizing_single_index):
    """No router in the model index: no BodyPartRouter replicas (each held a process and ~820 MB
    for nothing); the ingress names the one classifier itself. With a router: all three."""
    assert _deployment_names(build_app({"models": localizing_index})) == {"Ingress", "BodyPartRouter",
                                                                          "FractureClassifiers"}
    single = build_app({"models": localizing_single_index})
    assert _deployment_names(single) == {"Ingress", "FractureClassifiers"}
    assert single._bound_deployment.init_args[0] is None
    assert _deployment_names(build_app({"models": localizing_single_index, "layout": "fused"})) == {"Ingress"}
    # An index that cannot be read when the graph is declared (serve build, no model yet): the full graph.
    assert "BodyPartRouter" in _deployment_names(build_app({"models": "/nonexistent/model_index.json"}))
