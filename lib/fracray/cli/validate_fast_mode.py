"""``fracray validate-fast-mode`` / ``validate_fast_mode.py``: arguments -> :func:`fracray.evaluation.fast_mode.validate_fast_mode`."""

from __future__ import annotations

import argparse
import sys

from .. import storage
from ..data import adapters
from ..evaluation import fast_mode
from .common import add_storage_arguments, storage_options_from_args

__all__ = ["main", "build_parser"]


def build_parser(prog: str = "validate_fast_mode.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Measure the fast CPU precision (OpenVINO: INT8 by default, or bf16) against the exact one "
                    "(float32) for every fracture classifier of a model index (or one bundle), and record the outcome "
                    "in each bundle's bundle.json (inference.fast_mode), everything else in it kept. For INT8 each "
                    "classifier is first quantised (ONNX Runtime static quantisation, QDQ, per-channel INT8 weights) "
                    "with activation ranges from a calibration slice of the training split, and the graph is "
                    "written into the bundle (fast_int8.onnx). Each classifier scores the "
                    "labelled images of its body part in the split (all parts for a single-model index) twice, in "
                    "this process and without Ray, decoded and preprocessed with the bundle's own settings (flip "
                    "averaging and temperature included). Fast passes where AUROC changes by at most "
                    f"{fast_mode.MAX_DELTA_AUROC} and sensitivity at the bundle's own threshold by at most "
                    f"{fast_mode.MAX_DELTA_SENSITIVITY}; only then does --precision fast (FRACRAY_PRECISION=fast, "
                    "BundleModel(precision='fast')) run that bundle on OpenVINO, in the kind validated, and only "
                    "with the weights, the INT8 graph and the OpenVINO version validated. A router is not measured: in fast mode it runs exact. Prints a "
                    "table per bundle; exits 1 when any bundle fails (its record says passed: false and fast mode "
                    "stays refused for it), 2 on a usage or data error.",
        epilog=f"Example: {prog} --models runs/latest/model_index.json --dataset fracatlas "
               f"--data ../shared/data/fracatlas --split valid   (then: fracray serve ... --precision fast)",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--models", help="model index URI (model_index.json or its folder): every fracture classifier")
    which.add_argument("--bundle", help="one fracture classifier's bundle folder (URI)")
    parser.add_argument("--body-part", default=None,
                        help=f"with --bundle: the body part whose images it is measured on ('{fast_mode.ALL_PARTS}': "
                             f"every part; default: the part its training recorded, else {fast_mode.ALL_PARTS})")
    parser.add_argument("--dataset", required=True, choices=sorted(adapters.ADAPTERS),
                        help="layout of --data (the gate is defined on fracatlas)")
    parser.add_argument("--data", required=True, help="URI of the labelled collection")
    parser.add_argument("--split", default="valid",
                        help="split to measure on: one the models were not trained on (default: %(default)s; "
                             "train and all are refused)")
    parser.add_argument("--kind", choices=["int8", "bf16"], default=fast_mode.DEFAULT_KIND,
                        help="which fast precision to validate: int8 (quantised graph; default) or bf16 (the float "
                             "graph at bfloat16 where the CPU has it). The bundle records the kind; fast runs it")
    parser.add_argument("--calibration-split", default="train",
                        help="int8: the split whose images calibrate the activation ranges (default: %(default)s; "
                             "never the one measured)")
    parser.add_argument("--calibration-images", type=int, default=fast_mode.CALIBRATION_IMAGES,
                        help="int8: at most this many labelled images of the bundle's body part from the calibration "
                             "split, fractured and not in the split's proportion (default: %(default)s)")
    parser.add_argument("--calibration-method", choices=["minmax", "percentile", "entropy"], default="minmax",
                        help="int8: how ONNX Runtime turns the calibration activations into ranges "
                             "(default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="measure and print, but write nothing into the bundles")
    add_storage_arguments(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str = "validate_fast_mode.py") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.body_part and not args.bundle:
        print("error: --body-part goes with --bundle (a model index names each classifier's body part)",
              file=sys.stderr)
        return 2
    try:
        checks = fast_mode.validate_fast_mode(models=args.models, bundle=args.bundle, body_part=args.body_part,
                                              dataset=args.dataset, data=args.data, split=args.split,
                                              storage_options=storage_options_from_args(args),
                                              write=not args.dry_run, log=lambda line: print(line, file=sys.stderr),
                                              kind=args.kind, calibration_split=args.calibration_split,
                                              calibration_images=args.calibration_images,
                                              calibration_method=args.calibration_method)
    except (FileNotFoundError, ValueError, KeyError, ConnectionError, ImportError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for check in checks:
        print(fast_mode.format_check(check))
        print()
    failed = [c for c in checks if not c.passed]
    if failed:
        names = ", ".join(f"{c.name} (ΔAUROC {c.record['delta_auroc']:+.5f}, Δsensitivity "
                          f"{c.record['delta_sensitivity']:+.5f})" for c in failed)
        print(f"error: fast mode failed its gate (|ΔAUROC| <= {fast_mode.MAX_DELTA_AUROC}, |Δsensitivity| <= "
              f"{fast_mode.MAX_DELTA_SENSITIVITY}) for {len(failed)} of {len(checks)} bundle(s): {names}. They run "
              f"exact only; --precision fast refuses them.", file=sys.stderr)
        return 1
    print(f"fast mode validated for {len(checks)} bundle(s)" + (" (dry run: nothing recorded)" if args.dry_run else
                                                                  "; enable it with --precision fast (or FRACRAY_PRECISION=fast)"))
    return 0
