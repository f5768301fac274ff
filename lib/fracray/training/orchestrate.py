"""train_all's training runs: the router, the per-bone fracture models in parallel and the
optional backbone comparison, and the model index that names them.

Each model is one Ray Train run (TorchTrainer). The runs are launched from Ray
tasks so several share the cluster at once; how many run together follows the
cluster's free CPUs/GPUs, leaving CPUs for the Ray Data preprocessing that feeds
them (on a 2-CPU laptop: two runs sharing the CPUs, one thread each).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections import Counter
from typing import Any, Callable

import pyarrow as pa

from .. import storage
from ..artifacts.index import ModelIndex, write_model_index
from ..data.manifest import filter_rows, require_hardware_labels, split_by_study
from ..storage import StorageOptions
from .defaults import DATASET_TRAINING_DEFAULTS
from .progress import new_lines, open_board
from .config import TrainConfig

__all__ = ["TrainingSettings", "ModelRun", "TrainedModels", "train_models", "max_concurrent_runs",
           "cpu_threads_per_worker", "worker_cpu_share"]


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """How train_all trains. ``fracture`` is the fracture models' :class:`TrainConfig`, the one
    place every per-model option lives (preprocessing overrides included); the router's run is
    derived from it (its own backbone, strategy and epochs, linear head, the backbone's own input size,
    no fracture map). The rest says which runs there are and how they share the cluster."""

    # Epochs, batch size, lr, strategies: training.defaults (a job picks its case: jobs.train.training_defaults).
    fracture: TrainConfig = TrainConfig(max_failures=1)
    router_model: str = "efficientnet_lite0"
    router_strategy: str = DATASET_TRAINING_DEFAULTS["router_strategy"]
    # None: the fracture models' epochs (telling body parts apart takes fewer)
    router_epochs: int | None = DATASET_TRAINING_DEFAULTS["router_epochs"]
    exclude_hardware: bool = False
    min_images_per_part: int = 4
    single_model: bool = False      # one fracture model for all body parts, no router
    compare_backbones: tuple[str, ...] = ()
    max_concurrent: int | None = None
    cpu_threads: int | None = None  # per CPU training worker; None: the cluster's CPUs shared among them

    def __post_init__(self):
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 (or None to share the cluster's CPUs). Got {self.cpu_threads}")
        if self.router_epochs is not None and self.router_epochs < 1:
            raise ValueError(f"router_epochs must be >= 1 (or None: the fracture models' epochs). "
                             f"Got {self.router_epochs}")
        object.__setattr__(self, "compare_backbones", tuple(self.compare_backbones))

    @property
    def use_gpu(self) -> bool:
        return self.fracture.use_gpu

    @property
    def num_workers(self) -> int:
        return self.fracture.num_workers

    def router_config(self, classes: tuple[str, ...]) -> TrainConfig:
        return dataclasses.replace(self.fracture, model=self.router_model, strategy=self.router_strategy,
                                   epochs=self.router_epochs or self.fracture.epochs, task="body_part",
                                   classes=tuple(classes), head="linear", bam=False, image_size=None,
                                   localization=False, negatives_per_positive=None, balance_positives=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def max_concurrent_runs(settings: TrainingSettings, requested: int) -> int:
    """How many runs train at once: as many as the cluster's whole CPUs (or GPUs) hold, each
    worker plus one CPU for its data stream; on a CPU cluster too small for two such runs, two
    that share it (:func:`worker_cpu_share`). ``settings.max_concurrent`` caps either."""
    import ray

    resources = ray.cluster_resources()
    cpus = resources.get("CPU", 1)
    per_run_cpu = settings.num_workers * (0 if settings.use_gpu else 1) + 1  # + one CPU for its data stream
    limit = max(1, int(cpus // per_run_cpu))
    if settings.use_gpu:
        limit = min(limit, max(1, int(resources.get("GPU", 0) // settings.num_workers)))
    elif limit == 1 and cpus >= 2 and _single_node():
        # A run is not busy all the time: Ray Train's start, each epoch's data stream and the
        # calibration pass leave its CPUs idle, for most of a small run's time (the embedded
        # default: ~25 s of ~35 s per model). Two runs that share the CPUs fill that time;
        # compute-bound runs lose nothing (the same work, one thread each instead of two).
        # One machine only: on several small nodes the half-CPU workers could leave no node
        # with the whole CPU a data task needs.
        limit = 2
    if settings.max_concurrent:
        limit = min(limit, settings.max_concurrent)
    return max(1, min(limit, requested))


def _single_node() -> bool:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive")) == 1


def worker_cpu_share(settings: TrainingSettings, concurrent_runs: int) -> float | None:
    """The CPUs each training worker reserves when ``concurrent_runs`` runs share a CPU cluster
    that cannot give each worker a whole CPU beside one for the data streams (None: the
    TrainConfig's own ``cpus_per_worker``). One CPU always stays free for the data streams, so
    no run's preprocessing waits on the other's training."""
    import ray

    if settings.use_gpu or concurrent_runs < 2:
        return None
    cpus = ray.cluster_resources().get("CPU", 1)
    workers = concurrent_runs * settings.num_workers
    if workers * settings.fracture.cpus_per_worker + 1 <= cpus:
        return None
    return max(0.01, (cpus - 1) / workers)


def cpu_threads_per_worker(settings: TrainingSettings, concurrent_runs: int) -> int | None:
    """Intra-op threads for each CPU training worker: the cluster's CPUs divided among the
    workers that train at once. Each run also reserves a CPU for its data stream, which
    small images leave mostly idle; without this the workers would run one thread per
    reserved CPU and that core would idle (on a 2-core laptop: half the machine)."""
    import ray

    if settings.use_gpu:
        return None
    if settings.cpu_threads:
        return settings.cpu_threads
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, cpus // max(1, concurrent_runs * settings.num_workers))


def _model_size(bundle_uri: str, options: StorageOptions | None) -> dict[str, Any]:
    fs, path = storage.resolve(storage.join(bundle_uri, "model.safetensors"), options)
    size = fs.get_file_info(path).size
    return {"weights_mb": round(size / 2 ** 20, 2)}


@dataclasses.dataclass(frozen=True)
class ModelRun:
    """One model's training run as the report sees it: its bundle and figures, or its error."""

    name: str
    bundle: str | None = None
    seconds: float | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)   # the bundle's metrics
    threshold: float | None = None
    model: dict[str, Any] = dataclasses.field(default_factory=dict)     # the bundle's model description
    size: dict[str, Any] = dataclasses.field(default_factory=dict)      # parameters, weights_mb
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None

    @property
    def valid(self) -> dict[str, Any] | None:
        """Validation metrics of the trained model (None for a failed run)."""
        return self.metrics.get("valid")

    @property
    def comparison(self) -> bool:
        """A run of the backbone comparison (FracAtlas paper), not a model of the index."""
        return self.name.startswith("compare_")

    def to_dict(self) -> dict[str, Any]:
        """The report's per-model entry (report.json ``models``)."""
        return {"bundle": self.bundle, "seconds": self.seconds, "threshold": self.threshold, "size": self.size,
                "error": self.error, "model": self.model, "calibration": self.calibration, "valid": self.valid}


def _train_remote(config: TrainConfig, train: pa.Table, valid: pa.Table, output_uri: str, name: str,
                  options: StorageOptions | None, data_info: dict, run_config: dict) -> ModelRun:
    from .trainer import train_classifier  # torch and timm: here, so that `fracray train --help` is instant

    result = train_classifier(config, train, valid, output_uri=output_uri, name=name, storage_options=options,
                              data_info=data_info, run_config=run_config, log=lambda *_: None)
    return ModelRun(name=name, bundle=result.bundle_uri, seconds=round(result.seconds, 1), history=result.history,
                    metrics=result.meta.metrics, threshold=result.meta.threshold, model=result.meta.model,
                    size=_model_size(result.bundle_uri, options), calibration=result.meta.calibration or {})


def _run_all(jobs: list[dict[str, Any]], settings: TrainingSettings, log: Callable) -> dict[str, ModelRun]:
    """Run train jobs as Ray tasks, at most max_concurrent_runs at once, as results come back."""
    import ray

    remote = ray.remote(num_cpus=0)(_train_remote)
    limit = max_concurrent_runs(settings, len(jobs))
    threads = cpu_threads_per_worker(settings, limit)
    share = worker_cpu_share(settings, limit)
    log(f"Training {len(jobs)} models, {limit} at a time on this cluster "
        f"({ray.cluster_resources().get('CPU', 0):.0f} CPUs, {ray.cluster_resources().get('GPU', 0):.0f} GPUs)"
        + (f", {threads} CPU threads per training worker" if threads else "")
        + (f", sharing the CPUs ({share:g} reserved per worker, one for the data streams)" if share else ""))
    pending, results, queue = {}, {}, list(jobs)
    board, shown = open_board(), 0
    while queue or pending:
        while queue and len(pending) < limit:
            job = queue.pop(0)
            config = job["config"] if threads is None else dataclasses.replace(job["config"], cpu_threads=threads)
            if share is not None:
                config = dataclasses.replace(config, cpus_per_worker=share)
            ref = remote.remote(config, job["train"], job["valid"], job["output"], job["name"],
                                job["options"], job["data_info"], job["run_config"])
            pending[ref] = job["name"]
            log(f"  started {job['name']} ({job['config'].model}, {job['train'].num_rows} training images)")
        done, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
        lines = new_lines(board, shown)
        shown += len(lines)
        for line in lines:
            log(f"    {line}")
        if not done:
            continue
        name = pending.pop(done[0])
        try:
            results[name] = ray.get(done[0])
        except Exception as exc:  # one bone's failure must not lose the others
            cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps the original exception
            results[name] = ModelRun(name, error=f"{type(cause).__name__}: {str(cause).splitlines()[-1][:500]}")
            log(f"  FAILED {name}: {results[name].error}")
            continue
        valid = results[name].valid or {}
        score = valid.get("auroc") if valid.get("auroc") is not None else valid.get("accuracy")
        log(f"  finished {name} in {results[name].seconds}s (validation "
            f"{'AUROC' if valid.get('auroc') is not None else 'accuracy'} {score if score is None else round(score, 3)})")
    for line in new_lines(board, shown):  # posted just before the last run returned
        log(f"    {line}")
    ray.kill(board)
    return results


@dataclasses.dataclass
class TrainedModels:
    """What :func:`train_models` trained: the model index it wrote, each run (or its error),
    and the split the composed graph is to be evaluated on."""

    index_uri: str
    body_parts: list[str]
    skipped_body_parts: list[str]
    runs: dict[str, ModelRun]
    evaluation: pa.Table
    evaluated_split: str


def train_models(manifest: pa.Table, settings: TrainingSettings, *, output_uri: str, dataset: str,
                 storage_options: StorageOptions | None = None, log: Callable = print,
                 run_config: dict[str, Any] | None = None) -> TrainedModels:
    """The router and every body part's fracture model (and any backbone comparison), trained
    in parallel runs under ``output_uri/models``; writes ``output_uri/model_index.json``."""
    if settings.exclude_hardware:
        require_hardware_labels(manifest, dataset)  # a manifest without hardware labels is refused, not kept whole
        manifest = filter_rows(manifest, exclude_hardware=True)
    train, valid = filter_rows(manifest, split="train"), filter_rows(manifest, split="valid")
    unassigned = filter_rows(manifest, split="unassigned")
    if unassigned.num_rows:
        # A manifest that names no split (a CSV of labels, the review app's export) trains: its
        # images join the training split, and validation is held out of them by study below.
        log(f"note: {unassigned.num_rows} images have no split; training on them")
        train = pa.concat_tables([train, unassigned.cast(train.schema)]) if train.num_rows else unassigned
    if valid.num_rows == 0:
        train, valid = split_by_study(train, 0.2)
        log(f"note: no validation split; holding out {valid.num_rows} training images (20% of studies) to validate")
    test = filter_rows(manifest, split="test")
    # A test split is used only with both classes (FracAtlas's shared copy holds out its fractured test images).
    labelled_test = test.num_rows and {0, 1} <= set(test["image_label"].to_pylist())
    evaluation = test if labelled_test else valid
    eval_split = "test" if labelled_test else "valid"
    counts = Counter(train["body_part"].to_pylist())
    parts = sorted(p for p, n in counts.items() if p not in ("unknown", "mixed") and n >= settings.min_images_per_part)
    skipped = sorted(set(counts) - set(parts))
    if settings.single_model:
        parts, skipped = ["all"], []
    if not parts:
        raise ValueError(f"No body part has {settings.min_images_per_part}+ training images; counts: {dict(counts)}")
    models_uri = storage.join(output_uri, "models")
    data_info = {"dataset": dataset, "manifest_rows": manifest.num_rows}

    def config(**kw) -> TrainConfig:
        return dataclasses.replace(settings.fracture, **kw)

    jobs = []
    if len(parts) > 1 and not settings.single_model:
        keep = lambda t: t.filter(pa.compute.is_in(t["body_part"], pa.array(parts)))  # noqa: E731
        jobs.append({"name": "router", "config": settings.router_config(tuple(parts)),
                     "train": keep(train), "valid": keep(valid)})
    for part in parts:
        if part == "all":
            jobs.append({"name": "fracture_all", "config": config(classes=("normal", "abnormal")),
                         "train": train, "valid": valid})
            continue
        part_train, part_valid = filter_rows(train, body_part=part), filter_rows(valid, body_part=part)
        if part_valid.num_rows == 0:
            log(f"note: {part} has no validation images; validating its model on all parts' validation images")
            part_valid = valid
        jobs.append({"name": f"fracture_{part}", "config": config(classes=("normal", "abnormal")),
                     "train": part_train, "valid": part_valid})
    for backbone in settings.compare_backbones:
        for weights in (True, False):
            jobs.append({"name": f"compare_{backbone}_{'imagenet' if weights else 'scratch'}",
                         "config": config(model=backbone, pretrained=weights, classes=("normal", "abnormal"),
                                          localization=False),
                         "train": train, "valid": valid, "comparison": True})
    for job in jobs:
        job.update(output=models_uri, options=storage_options, data_info=dict(data_info, body_part=job["name"]),
                   run_config=run_config or {"training": settings.to_dict()})
    results = _run_all(jobs, settings, log)

    classifiers = {p: results[f"fracture_{p}"].bundle for p in parts if results[f"fracture_{p}"].bundle}
    router = results["router"].bundle if "router" in results else None
    if not classifiers:
        raise RuntimeError("Every fracture model failed to train: " +
                           "; ".join(f"{k}: {v.error}" for k, v in results.items()))
    index_uri = storage.join(output_uri, "model_index.json")
    write_model_index(index_uri, ModelIndex(router=router, classifiers=classifiers, dataset=dataset,
                                            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
                      storage_options)
    log(f"Model index: {index_uri}")
    return TrainedModels(index_uri=index_uri, body_parts=parts, skipped_body_parts=skipped, runs=results,
                         evaluation=evaluation, evaluated_split=eval_split)
