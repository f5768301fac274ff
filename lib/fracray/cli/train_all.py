"""``fracray train`` / ``train_all.py``: arguments (and a YAML recipe) -> one
:class:`fracray.jobs.train.TrainAllConfig`, then :func:`fracray.jobs.train.run_train_all`.

On a cluster: ``ray job submit --working-dir . -- python pipelines/train_all.py
--dataset mura --data s3://bucket/mura --output s3://bucket/runs/r1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from .. import storage
from ..data.adapters import ADAPTERS, HARDWARE_LABELLED_LAYOUTS
from ..jobs.train import TrainAllConfig, run_train_all
from ..storage import StorageOptions
from ..training.defaults import DATASET_TRAINING_DEFAULTS, EMBEDDED_TRAINING_DEFAULTS
from ..training.orchestrate import TrainingSettings
from ..training.config import TrainConfig
from .common import add_storage_arguments, add_verbose_argument

__all__ = ["main", "build_parser", "parse_config", "config_from_args"]


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


# An option left unset (None) on the command line and in --config takes the training default
# for its case: the embedded default's or, with --dataset, the real-data one (training.defaults).
def _default_note(dest: str) -> str:
    data = DATASET_TRAINING_DEFAULTS[dest]
    return (f" (default: {EMBEDDED_TRAINING_DEFAULTS[dest]} on the embedded synthetic default, "
            f"{'--epochs' if data is None else data} with --dataset)")


def _weights_arg(value: str) -> bool | str:
    return True if value == "imagenet" else False if value in ("none", "random", "scratch") else value


def build_parser(prog: str = "train_all.py") -> argparse.ArgumentParser:
    """Each option's dest is the name of the config field it sets (TrainConfig for every
    per-model option, TrainingSettings for how runs are laid out, TrainAllConfig for the
    job): :func:`parse_config` routes them by name, and a test checks that every option
    lands in a field and from there in the trained bundle."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "The main job. With no arguments: generate a small synthetic MURA-layout dataset and run everything end "
            "to end on local Ray: index -> Ray Data decode + preprocessing -> Ray Train fine-tuning of the bone-type "
            "router and the per-bone fracture models (in parallel where resources allow) -> evaluation of the "
            "router -> classifier graph -> report, plots and the model index for serving/scoring. With "
            "--dataset/--data: the same on your collection, locally or on a cluster via `ray job submit`."
        ),
        epilog="Example: train_all.py --config pipelines/recipes/fracatlas_cpu.yaml --dataset fracatlas "
               "--data ../shared/data/fracatlas --output runs/fracatlas",
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file whose keys are these options, with - or _ "
                        "(e.g. pipelines/recipes/fracatlas_cpu.yaml); flags on the command line win")
    parser.add_argument("--dataset", choices=sorted(ADAPTERS), help="layout of --data (default: synthetic MURA)")
    parser.add_argument("--data", help="URI of the collection (local path or s3://...)")
    parser.add_argument("--output", default="runs/latest", help="output URI (default: %(default)s)")
    parser.add_argument("--batch-size", dest="stream_batch_size", type=int, default=256,
                        help="images per Ray Data batch in the data-stage pass (default: %(default)s)")
    parser.add_argument("--synthetic-patients-per-part", type=int, default=None,
                        help="size of the embedded synthetic dataset (patients per body part; default: "
                             f"{TrainAllConfig.synthetic_patients_per_part}, about 315 images); refused with --dataset")
    parser.add_argument("--body-parts", type=_csv, default=(),
                        help="comma-separated body parts to keep (default: all); also limits the synthetic set")
    parser.add_argument("--verify", action="store_true", help="decode every image while indexing")
    pre = parser.add_argument_group("preprocessing (the model's own input size and normalisation unless set)")
    pre.add_argument("--image-size", type=int, default=None, help="fracture models' input side in pixels "
                     "(default: the backbone's own, e.g. 224; the router always uses its backbone's own)")
    pre.add_argument("--normalization", choices=["imagenet", "per_image", "none"], default=None,
                     help="imagenet (the backbone's statistics; default), per_image standardisation, or none")
    pre.add_argument("--enhancement", default="none",
                     choices=["none", "sobel", "prewitt", "roberts", "canny", "laplacian_sharpen"])
    pre.add_argument("--sharpen-factor", type=float, default=1.5, help="Laplacian sharpening factor (paper: 1.5, 3.0)")
    train = parser.add_argument_group("training")
    train.add_argument("--skip-training", action="store_true", help="stop after the data stage")
    train.add_argument("--model", default="efficientnet_lite0", help="backbone of the per-bone fracture models")
    train.add_argument("--router-model", default="efficientnet_lite0", help="backbone of the bone-type router")
    train.add_argument("--weights", dest="pretrained", type=_weights_arg, default=True,
                       help="imagenet (offline where they ship, else timm's hub; default), none (from scratch), or a "
                            "URI of a weight file (safetensors / state dict)")
    train.add_argument("--strategy", default=None,
                       help="full, classifier_only, last60 (DenseNet121 paper), last20_bn_frozen (EfficientNet-B0 "
                            "paper) or lastN" + _default_note("strategy"))
    train.add_argument("--router-strategy", default=None, help="as --strategy, for the router"
                       + _default_note("router_strategy"))
    train.add_argument("--router-epochs", type=int, default=None,
                       help="epochs of the bone-type router" + _default_note("router_epochs"))
    train.add_argument("--head", choices=["linear", "dense3"], default="linear")
    train.add_argument("--bam", action="store_true", help="insert BAM attention at the backbone's bottlenecks")
    train.add_argument("--epochs", type=int, default=None, help="epochs" + _default_note("epochs"))
    train.add_argument("--train-batch-size", dest="batch_size", type=int, default=None,
                       help="images per training batch" + _default_note("batch_size"))
    train.add_argument("--lr", type=float, default=None, help="Adam learning rate" + _default_note("lr"))
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--loss", choices=["weighted_ce", "ce", "focal"], default="weighted_ce")
    train.add_argument("--early-stopping-patience", type=int, default=3)
    train.add_argument("--num-workers", type=int, default=1, help="Ray Train workers per model (DDP)")
    train.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=False, help="one GPU per training worker (AMP, channels_last)")
    train.add_argument("--no-augment", dest="augment", action="store_false", help="no flip + affine augmentation")
    train.add_argument("--robust-augment", action=argparse.BooleanOptionalAction, default=False,
                       help="also train on what archives hold: quarter turns, upside-down and inverted films, gamma "
                            "and contrast, JPEG re-compression, downscaled copies, a canvas with burnt-in text")
    train.add_argument("--precision", choices=["auto", "bf16", "float16", "float32"], default="auto",
                       help="training precision: auto = float16 autocast on CUDA, bfloat16 autocast on CPUs with "
                            "native bf16 (avx512_bf16/AMX), float32 elsewhere; weights stay float32 (default: auto)")
    train.add_argument("--seed", type=int, default=0,
                       help="model initialisation, per-epoch sampling, calibration slice and the synthetic data")
    train.add_argument("--single-model", action=argparse.BooleanOptionalAction, default=False,
                       help="one fracture model for all body parts instead of the router + per-bone models")
    train.add_argument("--exclude-hardware", action=argparse.BooleanOptionalAction, default=False,
                       help="train and evaluate on the hardware-free subset (MURA humerus paper); needs hardware "
                            "labels: --dataset fracatlas, or a manifest with a `hardware` column")
    train.add_argument("--compare-backbones", type=_csv, default=(),
                       help="comma-separated backbones to compare (FracAtlas paper), each with and without "
                            "ImageNet weights where weights exist")
    train.add_argument("--max-concurrent", type=int, default=None, help="cap on models trained at once")
    train.add_argument("--cpu-threads", type=int, default=None,
                       help="threads per CPU training worker (default: the cluster's CPUs shared among the "
                            "workers training at once)")
    loc = parser.add_argument_group("localisation, sampling, calibration")
    loc.add_argument("--localization", action=argparse.BooleanOptionalAction, default=False,
                     help="add a fracture-map branch trained from the dataset's fracture outlines/boxes (FracAtlas); "
                          "models then return findings (boxes with scores) and heatmaps")
    loc.add_argument("--localization-head", choices=["map", "detector"], default="map",
                     help="with --localization: map (a fracture map at stride 16; boxes by region growing) or detector "
                          "(FCOS-style boxes at stride 8 trained from the release's boxes, fused with the classifier; "
                          "default: %(default)s)")
    loc.add_argument("--map-loss-weight", type=float, default=1.0, help="weight of the fracture-map or detector loss")
    loc.add_argument("--map-pos-weight", type=float, default=10.0,
                     help="weight of fracture cells against background cells in the map loss")
    loc.add_argument("--negatives-per-positive", type=float, default=None,
                     help="per epoch: every fractured image and about this many non-fractured ones per fractured "
                          "one, drawn afresh each epoch (default: all images every epoch)")
    loc.add_argument("--balance-positives", action=argparse.BooleanOptionalAction, default=False,
                     help="fracture models: add augmented copies of the fractured training images until they match "
                          "the others (MURA humerus paper; the calibration slice and validation keep the real mix); "
                          "refused with --negatives-per-positive")
    loc.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=False, help="average each image's prediction with its mirror image")
    loc.add_argument("--calibration-fraction", type=float, default=0.1,
                     help="share of training studies held out to fit temperature, threshold and operating points "
                          "(0: fit them on the validation split)")
    loc.add_argument("--threshold-target", choices=["youden", "sensitivity", "specificity"], default="youden")
    loc.add_argument("--threshold-value", type=float, default=None, help="e.g. 0.9 with --threshold-target")
    add_storage_arguments(parser)
    add_verbose_argument(parser)
    return parser


_STORAGE_DESTS = {"endpoint_url", "region", "anonymous"}
_JOB_ONLY_DESTS = {"config", "help"}


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """YAML keys are option names (``train-batch-size``, ``train_batch_size``) or dests; values
    given as strings go through the option's own type, so YAML and flags mean the same."""
    import yaml

    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        parser.error(f"{path} must hold a mapping of option: value. Got {type(values).__name__}")
    by_flag = {opt.lstrip("-").replace("-", "_"): a for a in parser._actions for opt in a.option_strings}
    by_dest = {a.dest: a for a in parser._actions}
    out, unknown = {}, []
    for key, value in values.items():
        k = str(key).replace("-", "_")
        action = by_flag.get(k) or by_dest.get(k)
        if action is None or action.dest in _JOB_ONLY_DESTS:
            unknown.append(key)
            continue
        if isinstance(value, str) and action.type is not None:
            value = action.type(value)
        elif isinstance(value, list) and action.type is _csv:
            value = tuple(str(v).strip() for v in value)  # body-parts: [wrist, hand] as "wrist,hand"
        elif k != action.dest and (isinstance(action, argparse._StoreFalseAction) or
                                   (isinstance(action, argparse.BooleanOptionalAction) and k.startswith("no_"))):
            value = not value  # no_augment: true -> augment = False; no_localization: true -> localization = False
        if action.choices is not None and value is not None and value not in action.choices:
            parser.error(f"{path}: {key}: invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")
        out[action.dest] = value
    if unknown:
        parser.error(f"unknown keys in {path}: {sorted(map(str, unknown))}")
    return out


def parse_config(argv: list[str] | None, prog: str = "train_all.py") -> TrainAllConfig:
    parser = build_parser(prog)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_yaml_defaults(parser, pre.config))
    args = vars(parser.parse_args(argv))
    try:
        return config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))


def _refuse_options_without_effect(args: dict[str, Any]) -> None:
    """Options that the rest of the job would accept and ignore. A value other than None
    (the parser's default) for --synthetic-patients-per-part was given, on the command line or
    in --config."""
    dataset = args.get("dataset")
    if dataset is not None and args.get("synthetic_patients_per_part") is not None:
        raise ValueError(f"--synthetic-patients-per-part sizes the embedded synthetic dataset, which --dataset "
                         f"{dataset} replaces: drop --synthetic-patients-per-part (or --dataset/--data to train on "
                         f"the synthetic set)")
    if args.get("exclude_hardware") and dataset not in HARDWARE_LABELLED_LAYOUTS:
        what = ("the embedded synthetic default (MURA layout)" if dataset is None else f"--dataset {dataset}")
        raise ValueError(f"--exclude-hardware trains on the images without metal hardware, and {what} has no "
                         f"hardware labels (MURA's release does not label hardware; FracAtlas's does), so it would "
                         f"keep every image: drop --exclude-hardware, use --dataset fracatlas, or index the "
                         f"collection as --dataset manifest with a boolean `hardware` column")


def config_from_args(args: dict[str, Any]) -> TrainAllConfig:
    """Route every parsed option to the config field of the same name."""
    _refuse_options_without_effect(args)
    if args.get("synthetic_patients_per_part") is None:  # not given: TrainAllConfig's default
        args = {k: v for k, v in args.items() if k != "synthetic_patients_per_part"}
    defaults = EMBEDDED_TRAINING_DEFAULTS if args.get("dataset") is None else DATASET_TRAINING_DEFAULTS
    args = {**args, **{k: v for k, v in defaults.items() if args.get(k) is None}}
    fields = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    train_fields, settings_fields, job_fields = fields(TrainConfig), fields(TrainingSettings), fields(TrainAllConfig)
    leftover = set(args) - train_fields - settings_fields - job_fields - _STORAGE_DESTS - _JOB_ONLY_DESTS
    if leftover:  # a new option without a field would be accepted and do nothing
        raise RuntimeError(f"train_all options without a config field: {sorted(leftover)}")
    # A name both classes have (cpu_threads) is TrainingSettings', which sets it per run.
    fracture = dataclasses.replace(TrainingSettings().fracture,
                                   **{k: v for k, v in args.items() if k in train_fields - settings_fields})
    settings = TrainingSettings(fracture=fracture, **{k: v for k, v in args.items()
                                                      if k in settings_fields and k != "fracture"})
    storage_options = StorageOptions.from_env(args.get("endpoint_url"), args.get("region"), args.get("anonymous", False))
    return TrainAllConfig(storage=storage_options, training=settings,
                          **{k: v for k, v in args.items() if k in job_fields and k not in ("storage", "training")})


def main(argv: list[str] | None = None, *, prog: str = "train_all.py") -> int:
    config = parse_config(argv, prog)
    try:
        run_train_all(config)
    except (FileNotFoundError, ValueError, RuntimeError, ConnectionError,
            storage.StorageError) as exc:  # WeightsError: ValueError
        import traceback

        # Where it was raised, so an unexpected error can be reported usefully (the message alone may not say).
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        print(f"error: {exc}" + (f" (raised at {where.filename}:{where.lineno} in {where.name})" if where else ""),
              file=sys.stderr)
        return 2
    return 0
