"""The ``serve`` job: the HTTP service (ingress -> body-part router -> bone classifiers) on
Ray Serve, started locally or on the cluster this process joins."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from .. import storage
from ..artifacts.index import check_model_index
from ..artifacts.shipped import MODELS_ENV, shipped_model_index
from ..raycluster import connect
from ..serving.args import ServeArgs
from ..serving.proxy_guard import configure_environment

__all__ = ["ServeJobConfig", "ServeHandle", "DEFAULT_MODELS", "default_service_models", "serve_args", "start_service"]

# Without --models: $FRACRAY_MODELS, else the shipped FracAtlas model (artifacts.shipped), else (an
# installation without models/) the embedded default's index, trained first if it is missing.
TRAINED_DEFAULT = "runs/latest/model_index.json"
DEFAULT_MODELS = "$FRACRAY_MODELS, else the shipped models/fracatlas, else " + TRAINED_DEFAULT


def default_service_models() -> str:
    """What a service without --models serves (see DEFAULT_MODELS)."""
    return os.environ.get(MODELS_ENV) or shipped_model_index() or TRAINED_DEFAULT


@dataclasses.dataclass(frozen=True)
class ServeJobConfig:
    """The service as ``fracray serve`` starts it: the application's own arguments (ServeArgs, the
    names serving/config.yaml and ``serve run`` use) and where it listens. ``args.models`` not
    given (not in ``args.model_fields_set``): DEFAULT_MODELS, the shipped model where it is installed."""

    args: ServeArgs = ServeArgs()
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535. Got {self.port}")


@dataclasses.dataclass(frozen=True)
class ServeHandle:
    models: str
    url: str
    protected: bool                          # a bearer token is required


def serve_args(config: ServeJobConfig) -> ServeArgs:
    """The application's arguments for this job: ``config.args`` with its models resolved."""
    if "models" in config.args.model_fields_set:
        return config.args
    return config.args.model_copy(update={"models": default_service_models()})


def start_service(config: ServeJobConfig, *, log: Callable[[str], None] = print,
                  on_connected: Callable[[], None] | None = None) -> ServeHandle:
    """Check the models, start Ray Serve with the application and return once it is deployed
    (``serve.shutdown()`` stops it). ``on_connected`` runs once Ray is connected, before the
    deployments start (the CLI installs its SIGTERM handler there: Ray installs its own on connect)."""
    from ray import serve

    from ..serving.app import build_app  # Ray Serve and FastAPI: only where a service starts

    args = serve_args(config)
    models = args.models
    if "models" not in config.args.model_fields_set and models == TRAINED_DEFAULT and not storage.exists(storage.normalize(models)):
        log(f"No model index at {models}: training the embedded default first (a few minutes) ...")
        from .train import TrainAllConfig, run_train_all  # OpenCV, and torch as it trains: only when it trains

        run_train_all(TrainAllConfig(), log=log)
    check_model_index(models, args.storage_options)
    application = build_app(args)
    # Serve's proxy runs the request limits only if Ray starts with them in its environment
    # (a Ray that is joined keeps its own: cluster nodes set it, see cluster/Dockerfile).
    configure_environment(max_body_mb=max(args.max_upload_mb, float(os.environ.get("FRACRAY_MAX_BODY_MB", 0))))
    connect()
    if on_connected is not None:
        on_connected()
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(application, name="fracray", route_prefix="/", blocking=False)
    return ServeHandle(models=models, url=f"http://{config.host}:{config.port}",
                       protected=bool(os.environ.get(args.auth_token_env)))
