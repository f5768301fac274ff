"""The ``evaluate`` job: a labelled dataset through the router -> classifier graph of a model index."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import pyarrow as pa

from .. import storage
from ..artifacts.index import check_model_index, check_operating_point
from ..data import adapters
from ..artifacts.index import VALIDATION_DISTRIBUTION_FILE
from ..data.manifest import filter_rows, write_table
from ..evaluation.graph import evaluate_graph
from ..imaging.regions import FINDINGS_TYPE
from ..inference.engines.choice import requested
from ..metrics.drift import validation_distribution
from ..raycluster import connect
from ..reports.training_plots import write_training_plots
from ..storage import StorageOptions

__all__ = ["EvaluateConfig", "EvaluationResult", "run_evaluate"]


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    models: str                              # model index URI (model_index.json or its folder)
    dataset: str                             # layout of ``data``
    data: str
    split: str | None = "valid"              # None or "all": every image
    output: str | None = None                # folder for evaluation.json, predictions.parquet, plots
    storage: StorageOptions = StorageOptions()
    pointing_tolerance: float = 0.0
    operating_point: str | float | None = None
    engine: str = "auto"                     # what runs the models (inference.engines.choice: auto = $FRACRAY_ENGINE, else auto)
    precision: str | None = None             # exact | fast (a validated bundle only); None: $FRACRAY_PRECISION, else exact

    def __post_init__(self):
        if self.dataset not in adapters.ADAPTERS:
            raise ValueError(f"Unknown dataset layout {self.dataset!r}; choose one of {sorted(adapters.ADAPTERS)}")
        if not self.pointing_tolerance >= 0.0:
            raise ValueError(f"pointing_tolerance must be >= 0. Got {self.pointing_tolerance}")


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """``summary``: the metrics document (evaluation.json); ``predictions``: one row per image;
    ``plots``: name -> URI of the plots written (with an output folder)."""

    summary: dict[str, Any]
    predictions: dict[str, list]
    plots: dict[str, str]


def evaluation_distribution(preds: dict[str, list], config: EvaluateConfig) -> dict[str, Any]:
    """The validation distribution (metrics.drift) of the scored images' P(fracture), per the
    dataset's own body part where it names one."""
    n = len(preds.get("image_uri", []))
    ok = [i for i in range(n) if preds["status"][i] == "ok" and preds["fracture_probability"][i] is not None]
    parts = preds.get("true_body_part") or preds.get("body_part") or [None] * n
    return validation_distribution([float(preds["fracture_probability"][i]) for i in ok], [parts[i] for i in ok],
                                   source={"models": config.models, "dataset": config.dataset, "data": config.data,
                                           "split": config.split or "all", "images": n, "scored": len(ok),
                                           "engines": sorted({e for e in preds.get("engine", []) if e}),
                                           "body_part": "the dataset's (true_body_part)"
                                           if preds.get("true_body_part") else "the router's"})


def run_evaluate(config: EvaluateConfig, *, log: Callable[[str], None] = print) -> EvaluationResult:
    options = config.storage
    check_model_index(config.models, options)  # every bundle, before Ray starts or anything is written
    manifest = adapters.index_dataset(config.dataset, config.data, options).manifest
    split = config.split
    if split and split != "all":
        manifest = filter_rows(manifest, split=split)
    if manifest.num_rows == 0:
        raise ValueError(f"No images in split {split!r} of {config.data}")
    check_operating_point(config.models, config.operating_point, options)  # before any work starts
    from ..inference.predictor import check_precision  # torch: only once the job runs

    check_precision(config.models, options, engine=config.engine, precision=config.precision)
    connect()
    log(f"Evaluating {manifest.num_rows} images of {config.data} ({split or 'all'}) with {config.models} ...")
    preds, summary = evaluate_graph(manifest, config.models, storage_options=options, output_uri=config.output,
                                    operating_point=config.operating_point,
                                    pointing_tolerance=config.pointing_tolerance, engine=config.engine,
                                    precision=config.precision)
    summary.update(models=config.models, dataset=config.dataset, data=config.data, split=split or "all",
                   operating_point=config.operating_point or "default",
                   # What was asked, and what computed the probabilities (each prediction's "engine").
                   engine=requested("engine", config.engine), precision=requested("precision", config.precision),
                   engines=sorted({e for e in preds.get("engine", []) if e}))
    plots: dict[str, str] = {}
    if config.output:
        plots = write_training_plots(summary, config.output, options)
        summary["plots"] = plots
        storage.write_bytes(storage.join(config.output, "evaluation.json"),
                            json.dumps(summary, indent=2).encode(), options)
        types = {"findings": FINDINGS_TYPE, "width": pa.int32(), "height": pa.int32()}  # typed even when all empty
        write_table(pa.table({k: pa.array(v, types.get(k)) for k, v in preds.items()}),
                    storage.join(config.output, "predictions.parquet"), options)
        # The models' own P(fracture) on these images: the monitoring's drift reference once
        # `fracray ship-model --evaluation` puts it beside the model index.
        storage.write_bytes(storage.join(config.output, VALIDATION_DISTRIBUTION_FILE),
                            json.dumps(evaluation_distribution(preds, config), indent=2).encode(), options)
    return EvaluationResult(summary, preds, plots)
