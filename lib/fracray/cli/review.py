"""``fracray review RUN``: a scoring run in the browser (worklist, study view, feedback, monitoring);
``--export FILE`` writes the reviewers' feedback as a labelled manifest for ``train_all`` and exits."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from .. import storage
from ..review.app import LOGGER_NAME, ReviewArgs, ReviewState, create_app
from ..review.export import export_manifest
from ..review.feedback import default_store_path
from ..review.worklist import RUN_HELP, RunError
from .common import add_storage_arguments, storage_options_from_args

__all__ = ["main", "build_parser"]


def build_parser(prog: str = "review.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Review a scoring run in the browser: a worklist of studies (flagged first, by fracture "
                    "probability at an operating point; filters by body part, label, date, reviewed), each study's "
                    "images with the findings drawn over them, and reviewers' feedback (agree / disagree / missed "
                    "fracture, per study and per finding), stored in SQLite beside the run or in PostgreSQL. "
                    "With $FRACRAY_API_TOKEN set the pages ask for it (sign-in form, or ?token= once).",
        epilog=f"RUN: {RUN_HELP}. Example: {prog} scores/ --port 8600, then open http://127.0.0.1:8600/. "
               f"The feedback loop: {prog} scores/ --export feedback.parquet; "
               f"fracray train --dataset manifest --data feedback.parquet ...")
    parser.add_argument("run", metavar="RUN", help="the scoring output folder (local or s3://)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the one address to listen on (default: %(default)s; another needs a token)")
    parser.add_argument("--port", type=int, default=8600, help="port (default: %(default)s)")
    parser.add_argument("--feedback", default=None,
                        help="where feedback is stored: a SQLite file or a postgresql:// URL (default: "
                             "RUN/review/feedback.sqlite for a local RUN, ./fracray-review-feedback.sqlite for s3://)")
    parser.add_argument("--export", metavar="FILE", default=None,
                        help="write the feedback as a labelled manifest (Parquet, local or s3://) that "
                             "`fracray train --dataset manifest --data FILE` reads, and exit")
    parser.add_argument("--auth-token-env", "--token-env", dest="auth_token_env", default="FRACRAY_API_TOKEN",
                        help="environment variable holding the bearer token (default: %(default)s)")
    add_storage_arguments(parser)
    return parser


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None, *, prog: str = "review.py") -> int:
    args = build_parser(prog).parse_args(argv)
    options = storage_options_from_args(args)
    review_args = ReviewArgs(run=args.run, feedback=args.feedback, auth_token_env=args.auth_token_env,
                             endpoint_url=options.endpoint_url, region=options.region, anonymous=options.anonymous)
    state = ReviewState(review_args)
    try:
        state.open()
    except (RunError, ConnectionError, storage.StorageError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.export:
        counts = export_manifest(state.run, state.store.all(), storage.normalize(args.export), state.run.options)
        print(f"Wrote {counts['images']} labelled images ({counts['fractured']} fractured, {counts['normal']} normal, "
              f"{counts['boxes']} boxes) from {counts['records']} feedback records to {counts['output']}")
        state.close()
        return 0
    token = os.environ.get(args.auth_token_env, "")
    if not token and not _loopback(args.host):
        print(f"{prog}: refusing to listen on {args.host} without a token: set ${args.auth_token_env} (or use "
              f"--host 127.0.0.1)", file=sys.stderr)
        return 2
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger(LOGGER_NAME).setLevel(logging.INFO)
    run = state.run
    print(f"Reviewing {run.uri}: {run.study_count} studies"
          + ("" if run.complete else " (no summary.json: an unfinished run)")
          + f"; feedback in {state.store.describe() if args.feedback else default_store_path(run.uri)}")
    if run.unavailable:
        for what, why in run.unavailable.items():
            print(f"  {what} filter unavailable: {why}")
    print(f"Open http://{args.host}:{args.port}/" + (f" (sign in with ${args.auth_token_env})" if token else
                                                    " (no token set: anyone on this machine can open it)"))
    app = create_app(review_args, state)
    try:
        uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning",
                    server_header=False)
    finally:
        state.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
