"""``fracray``: one console command for every job, ``fracray <command> [options]``.

Each command is the same as its ``pipelines/*.py`` entry point (which ``ray job submit``
runs) and takes the same options; ``fracray <command> --help`` lists them.
"""

from __future__ import annotations

import importlib
import sys

from .. import __version__

__all__ = ["COMMANDS", "BENCHMARKS", "main"]

# command -> (module with main(argv, prog=...), one line of help). Modules are imported only
# for the command that runs, so `fracray --help` and light commands never load torch or Ray.
COMMANDS: dict[str, tuple[str, str]] = {
    "index": ("fracray.cli.index_dataset", "index a collection (MURA, FracAtlas, folders, CSV) into a manifest"),
    "train": ("fracray.cli.train_all", "the main job: data stage, router + per-bone models, evaluation, report"),
    "evaluate": ("fracray.cli.evaluate", "a labelled dataset through a model index: metrics, FROC, examples"),
    "score": ("fracray.cli.score_archive", "bulk-score an archive (folder, s3://, dicomweb://) into Parquet"),
    "serve": ("fracray.cli.serve", "the HTTP service on Ray Serve, until Ctrl-C"),
    "review": ("fracray.cli.review", "a scoring run in the browser: worklist, study view, feedback, monitoring"),
    "publish": ("fracray.cli.publish_results", "a scoring run's results into the PACS as DICOM SR + overlays"),
    "listen": ("fracray.cli.listen", "a DICOM node: classify studies a PACS sends by C-STORE, SR + overlays back"),
    "load-study": ("fracray.cli.load_study", "radiographs -> a demo DX/CR DICOM study in a test PACS (Orthanc)"),
    "check-scope": ("fracray.cli.check_scope", "measure the out-of-scope check on photos, CT/MR/US, blanks"),
    "shift-eval": ("fracray.cli.shift_eval", "AUROC on rotated, inverted, re-compressed, downscaled copies vs clean"),
    "monitor": ("fracray.cli.monitor", "a scoring run's monitoring: rates by day, body part, equipment; drift alarm; "
                                       "concordance with reviewers (PNGs + JSON)"),
    "ship-model": ("fracray.cli.ship_model", "a trained bundle -> the shipped model folder (float16) with its card"),
    "ablation-table": ("fracray.cli.ablation_table", "the ablation table from train runs' bundles"),
    "validate-fast-mode": ("fracray.cli.validate_fast_mode", "measure the fast CPU precision (OpenVINO bf16) against "
                                                             "exact; record it in the bundles"),
    "bench": ("", "benchmarks, a product feature for measuring your own hardware: preprocess, training, "
                  "scoring, serving, engine"),
}
BENCHMARKS: dict[str, tuple[str, str]] = {
    "preprocess": ("fracray.benchmarks.preprocess", "decode + preprocessing: Ray Data against one process"),
    "training": ("fracray.benchmarks.training", "training images/s per backbone, CPU or GPU"),
    "scoring": ("fracray.benchmarks.scoring", "score_archive against a plain single-process loop"),
    "serving": ("fracray.benchmarks.serving", "the HTTP service's latency and throughput against in-process"),
    "engine": ("fracray.benchmarks.engine", "model only: eager PyTorch against ONNX Runtime, vs the CPU's peak"),
    "review": ("fracray.benchmarks.review", "the review app's worklist pages and monitoring on 1M scoring rows vs pandas"),
}


def _usage(table: dict[str, tuple[str, str]], prog: str) -> str:
    width = max(map(len, table))
    lines = [f"usage: {prog} <command> [options]   ({prog} <command> --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in table.items()]
    return "\n".join(lines)


def _dispatch(table: dict[str, tuple[str, str]], argv: list[str], prog: str) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(table, prog))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in table:
        print(f"{prog}: unknown command {name!r}; choose one of: {', '.join(table)}", file=sys.stderr)
        return 2
    if table is COMMANDS and name == "bench":
        return _dispatch(BENCHMARKS, rest, f"{prog} bench")
    module = importlib.import_module(table[name][0])
    return module.main(rest, prog=f"{prog} {name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--version"]:
        print(f"fracray {__version__}")
        return 0
    return _dispatch(COMMANDS, argv, "fracray")


if __name__ == "__main__":
    sys.exit(main())
