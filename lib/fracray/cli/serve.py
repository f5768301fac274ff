"""``serve``: run the HTTP service locally in one command.

``python pipelines/serve.py`` serves runs/latest (training the embedded default
first if there is no model index yet); ``--models s3://.../model_index.json``
serves any trained run. For clusters use ``serve deploy serving/config.yaml``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from .. import storage
from ..artifacts.index import check_model_index
from ..raycluster import connect
from ..serving.app import ServeArgs, build_app
from ..serving.proxy_guard import configure_environment
from ..storage import StorageOptions
from .common import add_storage_arguments

__all__ = ["main", "build_parser"]

DEFAULT_MODELS = "runs/latest/model_index.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serve.py",
        description="Start Ray Serve locally with the fracray application (ingress -> body-part router -> "
                    "bone-specific classifiers) and keep it running until Ctrl-C. API docs at /docs.",
        epilog="Example: serve.py --models runs/latest/model_index.json --port 8000, then\n"
               "  curl -X POST --data-binary @wrist.png -H 'content-type: image/png' "
               "http://127.0.0.1:8000/v1/classify",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", default=None,
                        help=f"model index URI (default: {DEFAULT_MODELS}; trained with the embedded default first "
                             f"if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="dynamic batch size; 1 disables batching")
    parser.add_argument("--max-upload-mb", type=float, default=64.0, help="request size limit (default: %(default)s)")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per model replica (default: 0)")
    parser.add_argument("--token-env", default="FRACRAY_API_TOKEN",
                        help="environment variable holding a bearer token to require (default: %(default)s; "
                             "unset = open)")
    add_storage_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ray import serve

    models = args.models or DEFAULT_MODELS
    try:
        if args.models is None and not storage.exists(storage.normalize(models)):
            print(f"No model index at {models}: training the embedded default first (a few minutes) ...")
            from .train_all import TrainAllConfig, run_train_all  # torch, Ray Train: only when it trains

            run_train_all(TrainAllConfig())
        check_model_index(models, StorageOptions.from_env(args.endpoint_url, args.region, args.anonymous))
        serve_args = ServeArgs(models=models, max_batch_size=args.max_batch_size, max_upload_mb=args.max_upload_mb,
                               num_gpus=args.num_gpus, auth_token_env=args.token_env, endpoint_url=args.endpoint_url,
                               region=args.region, anonymous=args.anonymous)
        application = build_app(serve_args)
        # Serve's proxy runs the request limits only if Ray starts with them in its environment
        # (a Ray that is joined keeps its own: cluster nodes set it, see cluster/Dockerfile).
        configure_environment(max_body_mb=max(args.max_upload_mb, float(os.environ.get("FRACRAY_MAX_BODY_MB", 0))))
        connect()
    except (FileNotFoundError, ValueError, ConnectionError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application, name="fracray", route_prefix="/", blocking=False)
    url = f"http://{args.host}:{args.port}"
    protected = " (bearer token required)" if os.environ.get(args.token_env) else ""
    print(f"fracray is serving {models}{protected}\n"
          f"  API docs:  {url}/docs\n  models:    {url}/v1/models\n  classify:  POST {url}/v1/classify\n"
          f"Ctrl-C to stop.", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    return 0
