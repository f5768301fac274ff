"""train_all's training stage: the router, the per-bone fracture models in parallel,
the optional backbone comparison, evaluation of the composed graph and the report.

Each model is one Ray Train run (TorchTrainer). The runs are launched from Ray
tasks so several share the cluster at once; how many run together follows the
cluster's free CPUs/GPUs, leaving CPUs for the Ray Data preprocessing that feeds
them (on a 2-CPU laptop that means one at a time).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
from collections import Counter
from typing import Any, Callable

import pyarrow as pa

from .. import storage
from ..data.manifest import filter_rows, split_by_study
from ..storage import StorageOptions
from .evaluation import localization_report, pointing_game, score_manifest, summarize_predictions
from .trainer import TrainConfig, train_classifier

__all__ = ["TrainingSettings", "run_training_stage", "max_concurrent_runs", "cpu_threads_per_worker"]


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """How train_all trains. ``fracture`` is the fracture models' :class:`TrainConfig`, the one
    place every per-model option lives (preprocessing overrides included); the router's run is
    derived from it (its own backbone/strategy, linear head, the backbone's own input size,
    no fracture map). The rest says which runs there are and how they share the cluster."""

    fracture: TrainConfig = TrainConfig(epochs=3, batch_size=16, max_failures=1)
    router_model: str = "efficientnet_lite0"
    router_strategy: str = "full"
    exclude_hardware: bool = False
    min_images_per_part: int = 4
    single_model: bool = False      # one fracture model for all body parts, no router
    compare_backbones: tuple[str, ...] = ()
    max_concurrent: int | None = None
    cpu_threads: int | None = None  # per CPU training worker; None: the cluster's CPUs shared among them

    def __post_init__(self):
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 (or None to share the cluster's CPUs). Got {self.cpu_threads}")
        object.__setattr__(self, "compare_backbones", tuple(self.compare_backbones))

    @property
    def use_gpu(self) -> bool:
        return self.fracture.use_gpu

    @property
    def num_workers(self) -> int:
        return self.fracture.num_workers

    def router_config(self, classes: tuple[str, ...]) -> TrainConfig:
        return dataclasses.replace(self.fracture, model=self.router_model, strategy=self.router_strategy,
                                   task="body_part", classes=tuple(classes), head="linear", bam=False,
                                   image_size=None, localization=False, negatives_per_positive=None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def max_concurrent_runs(settings: TrainingSettings, requested: int) -> int:
    import ray

    resources = ray.cluster_resources()
    cpus = resources.get("CPU", 1)
    per_run_cpu = settings.num_workers * (0 if settings.use_gpu else 1) + 1  # + one CPU for its data stream
    limit = max(1, int(cpus // per_run_cpu))
    if settings.use_gpu:
        limit = min(limit, max(1, int(resources.get("GPU", 0) // settings.num_workers)))
    if settings.max_concurrent:
        limit = min(limit, settings.max_concurrent)
    return max(1, min(limit, requested))


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


def _train_remote(config: TrainConfig, train: pa.Table, valid: pa.Table, output_uri: str, name: str,
                  options: StorageOptions | None, data_info: dict, run_config: dict) -> dict[str, Any]:
    result = train_classifier(config, train, valid, output_uri=output_uri, name=name, storage_options=options,
                              data_info=data_info, run_config=run_config, log=lambda *_: None)
    return {"name": name, "bundle": result.bundle_uri, "seconds": round(result.seconds, 1),
            "history": result.history, "metrics": result.meta.metrics, "threshold": result.meta.threshold,
            "model": result.meta.model, "size": _model_size(result.bundle_uri, options),
            "calibration": result.meta.calibration}


def _run_all(jobs: list[dict[str, Any]], settings: TrainingSettings, log: Callable) -> dict[str, dict]:
    """Run train jobs as Ray tasks, at most max_concurrent_runs at once, as results come back."""
    import ray

    remote = ray.remote(num_cpus=0)(_train_remote)
    limit = max_concurrent_runs(settings, len(jobs))
    threads = cpu_threads_per_worker(settings, limit)
    log(f"Training {len(jobs)} models, {limit} at a time on this cluster "
        f"({ray.cluster_resources().get('CPU', 0):.0f} CPUs, {ray.cluster_resources().get('GPU', 0):.0f} GPUs)"
        + (f", {threads} CPU threads per training worker" if threads else ""))
    pending, results, queue = {}, {}, list(jobs)
    while queue or pending:
        while queue and len(pending) < limit:
            job = queue.pop(0)
            config = job["config"] if threads is None else dataclasses.replace(job["config"], cpu_threads=threads)
            ref = remote.remote(config, job["train"], job["valid"], job["output"], job["name"],
                                job["options"], job["data_info"], job["run_config"])
            pending[ref] = job["name"]
            log(f"  started {job['name']} ({job['config'].model}, {job['train'].num_rows} training images)")
        done, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(done[0])
        try:
            results[name] = ray.get(done[0])
        except Exception as exc:  # one bone's failure must not lose the others
            cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps the original exception
            results[name] = {"name": name, "error": f"{type(cause).__name__}: {str(cause).splitlines()[-1][:500]}"}
            log(f"  FAILED {name}: {results[name]['error']}")
            continue
        valid = results[name]["metrics"]["valid"]
        score = valid.get("auroc") if valid.get("auroc") is not None else valid.get("accuracy")
        log(f"  finished {name} in {results[name]['seconds']}s (validation "
            f"{'AUROC' if valid.get('auroc') is not None else 'accuracy'} {score if score is None else round(score, 3)})")
    return results


def run_training_stage(manifest: pa.Table, settings: TrainingSettings, *, output_uri: str, dataset: str,
                       storage_options: StorageOptions | None = None, log: Callable = print,
                       run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    from ..inference.predictor import ModelIndex, write_model_index
    from ..reports.training_plots import write_training_plots

    started = time.time()
    if settings.exclude_hardware:
        manifest = filter_rows(manifest, exclude_hardware=True)
    train, valid = filter_rows(manifest, split="train"), filter_rows(manifest, split="valid")
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

    classifiers = {p: results[f"fracture_{p}"]["bundle"] for p in parts if "bundle" in results[f"fracture_{p}"]}
    router = results.get("router", {}).get("bundle")
    if not classifiers:
        raise RuntimeError("Every fracture model failed to train: " +
                           "; ".join(f"{k}: {v.get('error')}" for k, v in results.items()))
    index_uri = storage.join(output_uri, "model_index.json")
    write_model_index(index_uri, ModelIndex(router=router, classifiers=classifiers, dataset=dataset,
                                            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
                      storage_options)
    log(f"Model index: {index_uri}")

    log(f"Evaluating router -> classifier on the {eval_split} split ({evaluation.num_rows} images) ...")
    preds = score_manifest(evaluation, index_uri, storage_options=storage_options)
    summary = summarize_predictions(preds)
    summary["pointing_game"] = pointing_game(evaluation, index_uri, storage_options=storage_options)
    summary["localization"] = localization_report(evaluation, preds, index_uri, output_uri=output_uri,
                                                  storage_options=storage_options)
    comparison = {name: {"valid": r.get("metrics", {}).get("valid"), "seconds": r.get("seconds"),
                         "size": r.get("size"), "error": r.get("error")}
                  for name, r in results.items() if name.startswith("compare_")}
    report = {"dataset": dataset, "evaluated_split": eval_split, "body_parts": parts, "skipped_body_parts": skipped,
              "model_index": index_uri, "evaluation": summary, "comparison": comparison,
              "models": {name: {k: r.get(k) for k in ("bundle", "seconds", "threshold", "size", "error", "model",
                                                       "calibration")}
                         | {"valid": r.get("metrics", {}).get("valid")} for name, r in results.items()},
              "histories": {name: r.get("history") for name, r in results.items()},
              "seconds": round(time.time() - started, 1)}
    report["plots"] = write_training_plots(report, output_uri, storage_options)
    storage.write_bytes(storage.join(output_uri, "report.json"), json.dumps(report, indent=2, default=str).encode(),
                        storage_options)
    storage.write_bytes(storage.join(output_uri, "report.md"), format_report(report).encode(), storage_options)
    return report


def _fmt(v, digits=3):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _localization_lines(loc: dict[str, Any] | None, plots: dict[str, str]) -> list[str]:
    """Lesion-level figures and the example overlays, for the report."""
    if not loc:
        return []
    lines = []
    lesions = loc.get("lesions")
    if lesions:
        lines += ["", f"Lesion level (models with a fracture map; {lesions['lesions']} fractures in {lesions['images']} "
                      f"images, findings from score {lesions['min_score']} up): lesion sensitivity "
                      f"{_fmt(lesions['lesion_sensitivity_at_0.5_fp'])} at 0.5 and "
                      f"{_fmt(lesions['lesion_sensitivity_at_1_fp'])} at 1 false-positive finding per image"
                      + (" (FROC: froc.png)" if "froc" in plots else "") + "."]
        if lesions.get("per_body_part"):
            lines += ["", "| body part | fractures | images | sensitivity at 0.5 FP/image | at 1 FP/image |",
                      "|---|---|---|---|---|"]
            for part, m in lesions["per_body_part"].items():
                lines.append(f"| {part} | {m['lesions']} | {m['images']} | {_fmt(m['lesion_sensitivity_at_0.5_fp'])} | "
                             f"{_fmt(m['lesion_sensitivity_at_1_fp'])} |")
    elif loc.get("models_with_fracture_map"):
        lines += ["", "Lesion level: no evaluated image has fracture boxes to score the findings against."]
    if loc.get("examples"):
        lines += ["", "Examples at the operating threshold (heatmap; fracture boxes green, findings magenta with "
                      "their scores):", ""]
        for ex in loc["examples"]:
            lines.append(f"- {ex['kind'].upper()} examples/{ex['png'].rsplit('/', 1)[-1]}: "
                         f"P(fracture) {_fmt(ex['fracture_probability'])} "
                         f"(threshold {_fmt(ex['threshold'])}), {ex['findings']} finding(s), "
                         f"{ex['fracture_boxes']} fracture box(es), {ex['heatmap']}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    ev = report["evaluation"]
    lines = [f"# fracray training report: {report['dataset']}", "",
             f"Evaluated on the {report['evaluated_split']} split through router -> per-bone classifier: "
             f"{ev['scored']} images scored, rejected: {ev['rejected'] or 'none'}"
             + (f"; router accuracy {_fmt(ev.get('router_accuracy'))}" if ev.get("router_accuracy") is not None else ""),
             "", "| body part | TP | FN | FP | TN | accuracy | precision | sensitivity | specificity | F1 | AUROC | "
             "study kappa |", "|" + "---|" * 12]
    rows = list(ev["per_body_part"].items()) + ([("all", ev["overall"])] if ev["overall"] else [])
    for part, m in rows:
        lines.append(f"| {part} | {m['tp']} | {m['fn']} | {m['fp']} | {m['tn']} | {_fmt(m['accuracy'])} | "
                     f"{_fmt(m['precision'])} | {_fmt(m['sensitivity'])} | {_fmt(m['specificity'])} | {_fmt(m['f1'])} | "
                     f"{_fmt(m['auroc'])} | {_fmt(m.get('study_kappa'))} |")
    game = ev.get("pointing_game")
    if game:
        heatmap = game.get("method", "Grad-CAM peak").split(" peak")[0]
        lines += ["", f"{heatmap} pointing game ({game['overall']['images']} fractured images with boxes): the heatmap "
                      f"peak falls inside a fracture box for {_fmt(game['overall']['hit_rate'])} of them "
                      f"(image-centre baseline {_fmt(game['overall']['center_baseline'])})."]
    lines += _localization_lines(ev.get("localization"), report.get("plots") or {})
    if "calibration" in report.get("plots", {}):
        lines += ["", "Calibration (reliability before and after temperature scaling): calibration.png"]
    lines += ["", "| model | backbone | seconds | weights MB | validation AUROC / accuracy | threshold | temperature | "
              "ECE on validation, before -> after |", "|---|---|---|---|---|---|---|---|"]
    for name, m in sorted(report["models"].items()):
        if m.get("error"):
            lines.append(f"| {name} | failed: {m['error'][:80]} | | | | | | |")
            continue
        valid = m.get("valid") or {}
        score = valid.get("auroc") if valid.get("auroc") is not None else valid.get("accuracy")
        cal = m.get("calibration") or {}
        cal = dict(cal.get("valid") or cal, temperature=cal.get("temperature"))  # validation, not the fitting slice
        lines.append(f"| {name} | {(m.get('model') or {}).get('name')} | {m['seconds']} | "
                     f"{(m.get('size') or {}).get('weights_mb')} | {_fmt(score)} | {_fmt(m.get('threshold'))} | "
                     f"{_fmt(cal.get('temperature'))} | {_fmt(cal.get('ece_before'))} -> {_fmt(cal.get('ece_after'))} |")
    return "\n".join(lines) + "\n"
