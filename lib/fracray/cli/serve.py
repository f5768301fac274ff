"""``fracray serve`` / ``serve.py``: run the HTTP service locally in one command.

``python pipelines/serve.py`` serves runs/latest (training the embedded default
first if there is no model index yet); ``--models s3://.../model_index.json``
serves any trained run. For clusters use ``serve deploy serving/config.yaml``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .. import storage
from ..jobs.serve import DEFAULT_MODELS, ServeJobConfig, start_service
from ..serving.args import LAYOUTS, ServeArgs
from .common import add_engine_arguments, add_storage_arguments, add_verbose_argument, storage_options_from_args

__all__ = ["main", "build_parser", "config_from_args"]

_DEFAULTS = {name: field.default for name, field in ServeArgs.model_fields.items()}


def build_parser(prog: str = "serve.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Start Ray Serve locally with the fracray application (ingress -> body-part router -> "
                    "bone-specific classifiers) and keep it running until Ctrl-C. API docs at /docs.",
        epilog="Example: serve.py --models runs/latest/model_index.json --port 8000, then\n"
               "  curl -X POST --data-binary @wrist.png -H 'content-type: image/png' "
               "http://127.0.0.1:8000/v1/classify",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", default=None,
                        help=f"model index URI (default: {DEFAULT_MODELS}, trained with the embedded default "
                             f"first if that is missing)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    # Defaults are ServeArgs's (the application's arguments, which these flags fill).
    parser.add_argument("--max-batch-size", type=int, default=_DEFAULTS["max_batch_size"],
                        help="dynamic batch size; 1 disables batching (default: %(default)s)")
    parser.add_argument("--max-upload-mb", type=float, default=_DEFAULTS["max_upload_mb"],
                        help="request size limit (default: %(default)s)")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per model replica (default: 0)")
    parser.add_argument("--auth-token-env", "--token-env", dest="auth_token_env", default=_DEFAULTS["auth_token_env"],
                        help="environment variable holding a bearer token to require (default: %(default)s; "
                             "unset = open)")
    parser.add_argument("--layout", choices=LAYOUTS, default=_DEFAULTS["layout"],
                        help="graph (default): the router and the classifiers run as deployments of their own "
                             "that scale apart (clusters, GPUs); fused: both run inside each ingress replica, so a "
                             "request crosses one process instead of three (faster on a small CPU machine: see the "
                             "docs/benchmarks.md, Serving)")
    parser.add_argument("--operating-point", default=_DEFAULTS["operating_point"],
                        help="where a request that names no operating_point is labelled: default (each model's "
                             "own threshold), a named operating point of the models (high_sensitivity, "
                             "high_specificity, 'sensitivity>=0.95', ...; /v1/models lists them) or a number in "
                             "[0, 1] (default: %(default)s); refused at start when a model lacks it")
    add_engine_arguments(parser, where="the model replicas")
    add_storage_arguments(parser)
    add_verbose_argument(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> ServeJobConfig:
    options = storage_options_from_args(args)
    fields = {"models": args.models, "max_batch_size": args.max_batch_size, "max_upload_mb": args.max_upload_mb,
              "num_gpus": args.num_gpus, "auth_token_env": args.auth_token_env, "engine": args.engine,
              "precision": args.precision, "layout": args.layout, "operating_point": args.operating_point,
              "endpoint_url": options.endpoint_url, "region": options.region, "anonymous": options.anonymous}
    # Only what was given is set: models left unset means the job's DEFAULT_MODELS.
    app_args = ServeArgs.parse({name: value for name, value in fields.items() if value is not None})
    return ServeJobConfig(args=app_args, host=args.host, port=args.port)


def main(argv: list[str] | None = None, *, prog: str = "serve.py") -> int:
    args = build_parser(prog).parse_args(argv)
    from ray import serve

    # SIGTERM stops the service cleanly, also one that arrives while it is still starting (the
    # first replica can answer before the last is up): the start finishes, then it shuts down.
    # Installed once Ray is connected, which replaces the handler with its own.
    stop = threading.Event()
    try:
        handle = start_service(config_from_args(args),
                               on_connected=lambda: signal.signal(signal.SIGTERM, lambda *_: stop.set()))
    except (FileNotFoundError, ValueError, RuntimeError, ConnectionError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = handle.url
    print(f"fracray is serving {handle.models}{' (bearer token required)' if handle.protected else ''}\n"
          f"  API docs:  {url}/docs\n  models:    {url}/v1/models\n  classify:  POST {url}/v1/classify\n"
          f"Ctrl-C to stop.", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    return 0
