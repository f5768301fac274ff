"""The ``train`` job (train_all): the product's main job.

With no dataset it runs the embedded default: it writes a small synthetic MURA-layout
dataset, indexes it, streams every image through Ray Data decoding + preprocessing
(accounting for each one), then trains the bone-type router and the per-bone fracture
models with Ray Train (in parallel where the cluster has room), evaluates the composed
router -> classifier graph and writes the report and the model index that serving and
scoring read.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import pyarrow as pa

from .. import storage
from ..data.manifest import MURA_BODY_PARTS, read_manifest, require_hardware_labels
from ..data.pipeline import StreamConfig, StreamTally, build_image_dataset, iter_model_batches
from ..data.synthetic import generate_mura
from ..evaluation.graph import evaluate_graph
from ..raycluster import connect
from ..reports.training_report import TrainingReport, format_report, write_training_report
from ..storage import StorageOptions
from ..training.defaults import DATASET_TRAINING_DEFAULTS, EMBEDDED_TRAINING_DEFAULTS
from ..training.orchestrate import TrainingSettings, train_models
from .index import IndexConfig, run_index

__all__ = ["TrainAllConfig", "DataStageSummary", "TrainAllResult", "run_train_all", "run_training_stage",
           "training_defaults"]


def training_defaults(dataset: str | None) -> TrainingSettings:
    """The training a job gets when it says nothing (training.defaults): the embedded default's
    (``dataset`` None) or the real-data fine-tuning."""
    values = EMBEDDED_TRAINING_DEFAULTS if dataset is None else DATASET_TRAINING_DEFAULTS
    base = TrainingSettings()
    fracture = dataclasses.replace(base.fracture, **{k: v for k, v in values.items() if not k.startswith("router_")})
    return dataclasses.replace(base, fracture=fracture,
                               **{k: v for k, v in values.items() if k.startswith("router_")})


@dataclasses.dataclass(frozen=True)
class TrainAllConfig:
    """The whole job. Every per-model option (preprocessing included) lives once, in
    ``training.fracture`` (a :class:`TrainConfig`); the data stage, the trainer and the
    bundle all read it from there."""

    dataset: str | None = None          # None: the embedded synthetic MURA default
    data: str | None = None
    output: str = "runs/latest"
    storage: StorageOptions = StorageOptions()
    stream_batch_size: int = 256        # images per Ray Data batch in the data-stage pass
    synthetic_patients_per_part: int = 16
    body_parts: tuple[str, ...] = ()
    verify: bool = False
    skip_training: bool = False
    training: TrainingSettings = dataclasses.field(default_factory=lambda: training_defaults(None))

    @property
    def seed(self) -> int:
        return self.training.fracture.seed

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("storage", None)  # endpoints only; credentials never enter a bundle
        return out


@dataclasses.dataclass(frozen=True)
class DataStageSummary:
    """The data stage: every image of the manifest through decode + preprocessing, accounted
    for (``data_stage.json`` holds :meth:`to_dict`)."""

    dataset: str
    data: str
    index: dict[str, str]                  # the index job's output files
    preprocess: dict[str, Any]
    stream: dict[str, Any]                 # rows, ok, rejected by reason
    model_input_shape: tuple[int, ...] | None
    batches: int
    stream_seconds: float
    images_per_second: float | None
    rejects: list[dict[str, str]]          # examples: uri, reason, detail
    seconds: float
    stages_completed: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TrainAllResult:
    data_stage: DataStageSummary
    training: TrainingReport | None        # None with skip_training

    @property
    def model_index(self) -> str | None:
        return self.training.model_index if self.training else None


def run_train_all(config: TrainAllConfig, *, log: Callable[[str], None] = print) -> TrainAllResult:
    started = time.time()
    dataset, data = config.dataset, config.data
    stages = []
    if dataset is None:
        data = storage.join(config.output, "synthetic-mura")
        log(f"No --data given: writing the embedded default, a synthetic MURA-layout dataset, to {data}")
        parts = config.body_parts or MURA_BODY_PARTS
        counts = generate_mura(data, patients_per_part=config.synthetic_patients_per_part, seed=config.seed,
                               body_parts=tuple(parts), options=config.storage)
        log(f"  {counts['images']} images in {counts['studies']} studies ({len(parts)} body parts)")
        dataset, stages = "mura", ["generate"]
    elif data is None:
        raise ValueError("--dataset needs --data (the collection's URI)")

    index = run_index(IndexConfig(dataset=dataset, data=data, output=storage.join(config.output, "index"),
                                  storage=config.storage, verify=config.verify), log=log)
    manifest = read_manifest(index.manifest, config.storage)
    if config.body_parts and config.dataset is not None:
        import pyarrow.compute as pc
        manifest = manifest.filter(pc.is_in(manifest["body_part"], pa.array(list(config.body_parts))))
    if config.training.exclude_hardware:
        require_hardware_labels(manifest, dataset)  # before the data stage, not after it

    preprocess = config.training.fracture.preprocess()
    connect()  # RAY_ADDRESS (set by `ray job submit`), a `ray start` cluster, or a new local Ray
    log(f"\nStreaming {manifest.num_rows} images through decode + preprocessing with Ray Data ...")
    ds = build_image_dataset(manifest, preprocess, storage_options=config.storage,
                             stream=StreamConfig(batch_size=config.stream_batch_size))
    tally = StreamTally()
    stream_start = time.time()
    batches = 0
    shape = None
    last_said = stream_start
    for batch in iter_model_batches(ds, batch_size=config.stream_batch_size, tally=tally, preprocess=preprocess):
        batches += 1
        shape = tuple(batch["image"].shape[1:])
        if time.time() - last_said >= 10:  # a line every 10 s on long streams
            last_said = time.time()
            log(f"  [data] {tally.rows}/{manifest.num_rows} images ({100 * tally.rows / max(manifest.num_rows, 1):.0f}%), "
                f"{tally.rows / (last_said - stream_start):.1f} images/s")
    seconds = time.time() - stream_start
    if tally.rows != manifest.num_rows:
        raise RuntimeError(f"Stream accounted for {tally.rows} of {manifest.num_rows} images")
    summary = DataStageSummary(
        dataset=dataset, data=data, index=index.outputs, preprocess=preprocess.to_dict(), stream=tally.as_dict(),
        model_input_shape=shape, batches=batches, stream_seconds=round(seconds, 2),
        images_per_second=round(tally.rows / seconds, 1) if seconds else None,
        rejects=[{"uri": u, "reason": r, "detail": d} for u, r, d in tally.reject_examples],
        seconds=round(time.time() - started, 2), stages_completed=stages + ["index", "preprocess"])
    out_uri = storage.join(config.output, "data_stage.json")
    storage.write_bytes(out_uri, json.dumps(summary.to_dict(), indent=2, default=list).encode(), config.storage)
    log(f"\nPreprocessed {tally.ok} of {tally.rows} images into model inputs of shape {shape} "
        f"({summary.images_per_second} images/s); rejected: {dict(tally.rejected) or 'none'}")
    for uri, reason, detail in tally.reject_examples[:5]:
        log(f"  rejected {uri}: {reason}: {detail}")
    log(f"Every image accounted for: {tally.ok} ok + {sum(tally.rejected.values())} rejected = {tally.rows}")
    log(f"Data report: {out_uri}")
    if config.skip_training:
        return TrainAllResult(summary, None)
    log("\nTraining ...")
    report = run_training_stage(manifest, config.training, output_uri=config.output, dataset=dataset,
                                storage_options=config.storage, log=log, run_config=config.to_dict())
    log("\n" + format_report(report))
    log(f"Report: {storage.join(config.output, 'report.md')} (and report.json, "
        + ", ".join(report.plots) + " as PNG)")
    log(f"Model index for serving and scoring: {report.model_index}")
    return TrainAllResult(summary, report)


def run_training_stage(manifest: pa.Table, settings: TrainingSettings, *, output_uri: str, dataset: str,
                       storage_options: StorageOptions | None = None, log: Callable[[str], None] = print,
                       run_config: dict[str, Any] | None = None) -> TrainingReport:
    """The training stage: the models (training), the composed graph on the held-out split
    (evaluation), and the report with its plots (reports)."""
    started = time.time()
    trained = train_models(manifest, settings, output_uri=output_uri, dataset=dataset,
                           storage_options=storage_options, log=log, run_config=run_config)
    log(f"Evaluating router -> classifier on the {trained.evaluated_split} split "
        f"({trained.evaluation.num_rows} images) ...")
    _, summary = evaluate_graph(trained.evaluation, trained.index_uri, storage_options=storage_options,
                                output_uri=output_uri)
    report = TrainingReport(dataset=dataset, evaluated_split=trained.evaluated_split, body_parts=trained.body_parts,
                            skipped_body_parts=trained.skipped_body_parts, model_index=trained.index_uri,
                            evaluation=summary, runs=trained.runs, seconds=round(time.time() - started, 1))
    write_training_report(report, output_uri, storage_options)
    return report
