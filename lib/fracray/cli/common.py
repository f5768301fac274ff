"""Pieces shared by the command-line entry points."""

from __future__ import annotations

import argparse
import os

from ..inference.engines.choice import ENGINE_ENV, ENGINES, PRECISION_ENV, PRECISIONS
from ..raycluster import VERBOSE_ENV
from ..storage import StorageOptions


class _Verbose(argparse.Action):
    """Sets FRACRAY_VERBOSE for everything the command starts; no config field of its own."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        os.environ[VERBOSE_ENV] = "1"


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action=_Verbose,
                        help=f"also show Ray's own logs (workers' output, Ray Data and Ray Train INFO lines) on the "
                             f"console; by default they stay in the Ray session's log files (or set {VERBOSE_ENV}=1)")


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "object storage",
        "s3:// URIs use the standard AWS environment and config files for credentials "
        "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles).",
    )
    group.add_argument("--endpoint-url", default=None,
                       help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (default: $AWS_ENDPOINT_URL_S3 or "
                            "$AWS_ENDPOINT_URL, else AWS)")
    group.add_argument("--region", default=None, help="S3 region (default: $AWS_REGION or the AWS config)")
    group.add_argument("--anonymous", action="store_true", help="read public buckets without credentials")


def storage_options_from_args(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions.from_env(args.endpoint_url, args.region, args.anonymous)


def add_engine_arguments(parser: argparse.ArgumentParser, *, where: str = "the predictor actors") -> None:
    group = parser.add_argument_group(
        "inference engine",
        f"What runs the models in {where} (fracray.inference.engines). A flag given wins; without it, "
        f"{ENGINE_ENV} and {PRECISION_ENV} in their environment decide where set. Every answer's \"engine\" "
        f"names what ran (onnxruntime-float32, torch-float32, openvino-int8, openvino-bf16).")
    group.add_argument("--engine", choices=ENGINES, default="auto",
                       help=f"auto (${ENGINE_ENV} where set, else ONNX Runtime on CPU, PyTorch on CUDA; default), "
                            f"torch (eager PyTorch) or onnxruntime")
    group.add_argument("--precision", choices=PRECISIONS, default=None,
                       help=f"exact (float32, equal to eager PyTorch within 1e-4; the default where ${PRECISION_ENV} "
                            f"is unset) or fast (OpenVINO INT8 or "
                            "bf16 on CPU, the kind the bundle validated: only for fracture models whose bundle records a passed `fracray validate-fast-mode`; "
                            "refused before anything starts otherwise)")
