"""The fast precision's gate: a bundle's fracture probabilities, exact against fast, on labelled data.

The fast precision (OpenVINO, INT8 or bf16: :mod:`fracray.inference.engines`) does not give eager
PyTorch's numbers, so a bundle may run it only after this check. For INT8 the check first makes
the quantised graph: ONNX Runtime's static quantisation, its activation ranges calibrated on a
slice of the bundle's *training* split (never the images it is then measured on); the graph is
written into the bundle beside the record. Then the labelled images of the
bundle's body part in one split (FracAtlas valid) are scored in one process, without Ray, by
the bundle at exact (float32) and at fast precision, decoded and preprocessed once with the
bundle's own config (the functions :class:`~fracray.inference.predictor.BundleModel` uses),
images that scoring rejects (unreadable, not a limb radiograph) left out as it leaves them out;
fast passes where AUROC changes by at most :data:`MAX_DELTA_AUROC` and sensitivity at the
bundle's own threshold by at most :data:`MAX_DELTA_SENSITIVITY`. The outcome, passed or not,
is written into the bundle's ``bundle.json`` (``inference.fast_mode``), everything else in it
kept; ``BundleModel(precision="fast")`` reads it there. ``fracray validate-fast-mode`` runs it.
The predictor (torch, OpenVINO) is imported only where the bundles are scored.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..artifacts.bundle import (FAST_MODE_KEY, FAST_MODE_MAX_DELTA_AUROC, FAST_MODE_MAX_DELTA_SENSITIVITY,
                                FAST_MODE_NOT_FOR_VALIDATION, META_FILE, read_bundle_meta)
from ..artifacts.index import check_model_index
from ..data import adapters
from ..data.manifest import filter_rows
from ..inference.engines.choice import FAST_GRAPH_FILE, FAST_KINDS
from ..inference.engines.int8 import quantize_int8
from ..metrics.classification import binary_metrics
from ..storage import StorageOptions

__all__ = ["MAX_DELTA_AUROC", "MAX_DELTA_SENSITIVITY", "ALL_PARTS", "DEFAULT_KIND", "CALIBRATION_IMAGES",
           "FastModeCheck", "passes_gate", "calibration_rows",
           "validate_fast_mode", "validate_bundle", "bundle_images", "write_record", "cpu_description", "format_check"]

# The gate (artifacts.bundle, where the record's rules live; inference.engines.fast_gate enforces it):
# |AUROC(fast) - AUROC(exact)| and |sensitivity(fast) - sensitivity(exact)| at the bundle's own
# threshold, at most these.
MAX_DELTA_AUROC = FAST_MODE_MAX_DELTA_AUROC
MAX_DELTA_SENSITIVITY = FAST_MODE_MAX_DELTA_SENSITIVITY
# The model index's name for one classifier of every body part (train_all --single-model).
ALL_PARTS = "all"
# Images decoded and scored at a time (bounded memory, whatever the split's size).
CHUNK = 32
# What validate-fast-mode measures unless told: INT8 (the faster kind on the CPUs measured, see
# docs/inference-engine.md's table), calibrated on this many training images of the bundle's body part.
DEFAULT_KIND = "int8"
CALIBRATION_IMAGES = 128


@dataclasses.dataclass(frozen=True)
class FastModeCheck:
    """One bundle's validation: ``record`` is what ``bundle.json`` gets under
    ``inference.fast_mode``; ``written`` the file it was written to (None: not written)."""

    bundle: str
    name: str
    body_part: str
    record: dict[str, Any]
    written: str | None = None

    @property
    def passed(self) -> bool:
        return self.record.get("passed") is True


def passes_gate(delta_auroc: float, delta_sensitivity: float) -> bool:
    """Fast against exact: AUROC and sensitivity at the bundle's threshold moved by at most
    :data:`MAX_DELTA_AUROC` and :data:`MAX_DELTA_SENSITIVITY`, either way."""
    return abs(delta_auroc) <= MAX_DELTA_AUROC and abs(delta_sensitivity) <= MAX_DELTA_SENSITIVITY


def bundle_images(manifest: pa.Table, body_part: str) -> pa.Table:
    """The labelled (0/1) rows a classifier for ``body_part`` is measured on: every body part
    for :data:`ALL_PARTS`, else that part's."""
    labelled = manifest.filter(pc.is_in(manifest["image_label"], pa.array([0, 1], manifest["image_label"].type)))
    return labelled if body_part == ALL_PARTS else filter_rows(labelled, body_part=body_part)


def _part_of_bundle(meta) -> str:
    """The body part a bundle was trained for, from its training record ("fracture_wrist"), else all."""
    name = str((meta.data or {}).get("body_part") or "")
    return name[len("fracture_"):] if name.startswith("fracture_") else ALL_PARTS


def calibration_rows(manifest: pa.Table, body_part: str, n: int, seed: int = 0) -> pa.Table:
    """Up to ``n`` labelled rows of ``body_part`` from ``manifest`` (the calibration split), the
    same share of fractured images as the split has, drawn with ``seed``."""
    rows = bundle_images(manifest, body_part)
    if rows.num_rows <= n:
        return rows
    labels = np.asarray(rows["image_label"].to_pylist())
    rng = np.random.default_rng(seed)
    chosen = []
    for value in (0, 1):
        members = np.flatnonzero(labels == value)
        take = int(round(n * len(members) / len(labels)))
        chosen += rng.choice(members, size=min(take, len(members)), replace=False).tolist()
    return rows.take(pa.array(sorted(chosen), pa.int64()))


def cpu_description() -> str:
    """The CPU the validation ran on: its model name, CPU count and the bf16 features the
    runtime can use (bf16 results can differ between CPUs that compute them differently)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: what the platform module knows
        pass
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    model = model or platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} CPUs, bf16: {', '.join(bf16) if bf16 else 'none'}"


def write_record(bundle: str, record: dict[str, Any], options: StorageOptions | None = None) -> str:
    """``record`` into the bundle's bundle.json as ``inference.fast_mode``, everything else in
    the file as it was; returns the file's URI."""
    uri = storage.join(bundle, META_FILE)
    raw = json.loads(storage.read_bytes(uri, options))
    raw.setdefault("inference", {})[FAST_MODE_KEY] = record
    storage.write_bytes(uri, json.dumps(raw, indent=2).encode(), options)
    return uri


def _prepared(model, uris: list[str], options: StorageOptions, labels: list | None = None):
    """Decode and prepare ``uris`` for ``model`` as scoring does: (inputs, their labels, how many
    were rejected). Images scoring rejects (unreadable, not a limb radiograph) are left out."""
    from ..imaging.decode import ImageRejected
    from ..imaging.preprocess import decode_for
    from ..imaging.scope import assess_scope

    prepared, kept, rejected = [], [], 0
    for i, uri in enumerate(uris):
        try:
            decoded = decode_for(storage.read_bytes(uri, options), model.config, name=uri)
        except storage.StorageUnavailable:
            raise  # the service is down, not the image bad
        except (ImageRejected, storage.StorageError):
            rejected += 1  # counted in the record; scoring rejects it the same way
            continue
        if not assess_scope(decoded).in_scope:  # scoring does not score it either
            rejected += 1
            continue
        prepared.append(model.prepare(decoded))
        kept.append(None if labels is None else int(labels[i]))
    return prepared, kept, rejected


def _quantize(exact, calibration: pa.Table, folder: str, options: StorageOptions,
              method: str, log: Callable[[str], None]) -> tuple[str, dict[str, Any]]:
    """The bundle's INT8 graph, calibrated on ``calibration``'s images (with their mirror
    images where the bundle averages flips): (its local path, what the record keeps)."""
    import onnxruntime

    from ..inference.engines.export import cached_export
    from ..inference.engines.onnxruntime_engine import onnxruntime_outputs as onnxruntime_reading

    export = cached_export(exact.model, (exact.config.channels, *exact.config.image_size),
                           runtime=f"onnxruntime-{onnxruntime.__version__}", run=onnxruntime_reading,
                           model_spec=exact.meta.model)
    uris = calibration["image_uri"].to_pylist()
    log(f"{exact.name}: INT8 quantisation, activation ranges from {len(uris)} training images ...")

    def batches():
        for start in range(0, len(uris), CHUNK):
            prepared, _, _ = _prepared(exact, uris[start:start + CHUNK], options)
            for item in prepared:
                x = exact.inputs([item]).numpy()
                yield x
                if exact.tta_flip:  # the engine also runs the mirror image
                    yield np.ascontiguousarray(x[..., ::-1])

    out = os.path.join(folder, "fast_int8.onnx")
    info = quantize_int8(export.path, batches, out, method=method)
    return out, info


def validate_bundle(bundle: str, images: pa.Table, *, body_part: str, dataset: str, data: str, split: str,
                    storage_options: StorageOptions | None = None, write: bool = True,
                    log: Callable[[str], None] = print, kind: str = DEFAULT_KIND,
                    calibration: pa.Table | None = None, calibration_split: str | None = None,
                    calibration_method: str = "minmax") -> FastModeCheck:
    """Score ``images`` (labelled manifest rows) with ``bundle`` exact and fast (``kind``: int8,
    quantised on ``calibration``'s images first, or bf16), compare, and (with ``write``) record
    the outcome in its bundle.json (and an INT8 graph beside it). Raises ValueError where
    nothing can be measured (no images, or one class only)."""
    import hashlib
    import tempfile

    from ..inference.predictor import BundleModel, engine_label

    if kind not in FAST_KINDS:
        raise ValueError(f"Unknown fast kind {kind!r}; choose one of {', '.join(FAST_KINDS)}")
    options = storage_options or StorageOptions()
    # Both modes whatever $FRACRAY_ENGINE / $FRACRAY_PRECISION say; fast without a record (that is made here).
    exact = BundleModel(bundle, options, "cpu", engine="auto", precision="exact", for_validation=True)
    if exact.meta.task != "fracture":
        raise ValueError(f"{bundle} is a {exact.meta.task!r} bundle; the fast-mode gate is for fracture classifiers")
    quantized: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fracray-fast-") as tmp:
        graph = None
        if kind == "int8":
            if calibration is None or calibration.num_rows == 0:
                raise ValueError(f"{bundle}: INT8 needs calibration images (labelled images of {body_part} in a "
                                 f"training split); none were given")
            graph, quantized = _quantize(exact, calibration, tmp, options, calibration_method, log)
            quantized.update(split=calibration_split, images=calibration.num_rows)
        fast = BundleModel(bundle, options, "cpu", engine="auto", precision="fast", for_validation=True,
                           fast_graph=graph)
        graph_bytes = open(graph, "rb").read() if graph else None
        uris, truth = images["image_uri"].to_pylist(), images["image_label"].to_pylist()
        log(f"{exact.name}: {len(uris)} labelled images ({body_part}, {dataset} {split}), exact "
            f"({engine_label(exact.engine)}) against fast ({engine_label(fast.engine)}) ...")
        labels: list[int] = []
        p_exact: list[float] = []
        p_fast: list[float] = []
        rejected = 0
        for start in range(0, len(uris), CHUNK):
            prepared, kept, dropped = _prepared(exact, uris[start:start + CHUNK], options,
                                                truth[start:start + CHUNK])
            rejected += dropped
            labels += kept
            if prepared:
                p_exact += exact.probabilities(prepared)[:, 1].tolist()
                p_fast += fast.probabilities(prepared)[:, 1].tolist()
        described = fast.engine.describe()
    threshold = float(exact.meta.threshold)
    m_exact, m_fast = binary_metrics(labels, p_exact, threshold), binary_metrics(labels, p_fast, threshold)
    if m_exact["auroc"] is None or m_fast["auroc"] is None:
        raise ValueError(f"{bundle}: the {len(labels)} usable labelled images of {body_part} in {dataset} {split} "
                         f"do not hold both classes; AUROC and sensitivity cannot be measured")
    delta_auroc = m_fast["auroc"] - m_exact["auroc"]
    delta_sensitivity = m_fast["sensitivity"] - m_exact["sensitivity"]
    passed = passes_gate(delta_auroc, delta_sensitivity)
    a, b = np.asarray(p_exact), np.asarray(p_fast)
    record = {
        "engine": fast.engine.name, "precision": fast.engine.precision, "openvino": described.get("openvino"),
        "passed": bool(passed),
        "auroc_exact": m_exact["auroc"], "auroc_fast": m_fast["auroc"], "delta_auroc": delta_auroc,
        "sensitivity_exact": m_exact["sensitivity"], "sensitivity_fast": m_fast["sensitivity"],
        "delta_sensitivity": delta_sensitivity,
        "specificity_exact": m_exact["specificity"], "specificity_fast": m_fast["specificity"],
        "max_delta_auroc": MAX_DELTA_AUROC, "max_delta_sensitivity": MAX_DELTA_SENSITIVITY,
        "threshold": threshold, "tta_flip": exact.tta_flip,
        "max_probability_difference": float(np.abs(a - b).max()),
        "labels_changed": int(np.sum((a >= threshold) != (b >= threshold))),
        "images": len(labels), "positives": int(sum(labels)), "rejected": rejected,
        "body_part": body_part, "dataset": dataset, "data": data, "split": split,
        "exact_engine": engine_label(exact.engine), "threads": described.get("threads"),
        "weights_sha256": fast.weights_sha256,
        "validated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_description(),
    }
    if graph_bytes is not None:  # the INT8 graph travels with the bundle; the record names it and its digest
        record.update(graph=FAST_GRAPH_FILE, graph_sha256=hashlib.sha256(graph_bytes).hexdigest(),
                      quantization=quantized)
        if write:
            storage.write_bytes(storage.join(bundle, FAST_GRAPH_FILE), graph_bytes, options)
    written = write_record(bundle, record, options) if write else None
    return FastModeCheck(bundle, exact.name, body_part, record, written)


def validate_fast_mode(*, dataset: str, data: str, models: str | None = None, bundle: str | None = None,
                       body_part: str | None = None, split: str | None = "valid",
                       storage_options: StorageOptions | None = None, write: bool = True,
                       log: Callable[[str], None] = print, kind: str = DEFAULT_KIND,
                       calibration_split: str = "train", calibration_images: int = CALIBRATION_IMAGES,
                       calibration_method: str = "minmax") -> list[FastModeCheck]:
    """Every fracture classifier of the model index ``models`` (each on its body part's
    images; a router runs exact in fast mode and is not measured), or the one ``bundle`` (on
    ``body_part``'s images: default the part its training recorded, else all), on the
    labelled images of ``split`` (not "train" nor "all") of ``data`` (layout ``dataset``).
    ``kind``: int8 (each classifier quantised first, calibrated on up to ``calibration_images``
    of its body part's labelled images in ``calibration_split``, another split than ``split``)
    or bf16."""
    options = storage_options or StorageOptions()
    if (models is None) == (bundle is None):
        raise ValueError("give either a model index (models) or one bundle (bundle)")
    if dataset not in adapters.ADAPTERS:
        raise ValueError(f"Unknown dataset layout {dataset!r}; choose one of {sorted(adapters.ADAPTERS)}")
    if kind not in FAST_KINDS:
        raise ValueError(f"Unknown fast kind {kind!r}; choose one of {', '.join(FAST_KINDS)}")
    if (split or "all") in FAST_MODE_NOT_FOR_VALIDATION:
        raise ValueError(f"The fast-mode gate is measured on images the models were not trained on; split "
                         f"{split or 'all'!r} holds training images: choose valid (or test)")
    if kind == "int8" and (calibration_split in (split, "all", "", None) or calibration_images < 1):
        raise ValueError(f"INT8 is calibrated on images it is not measured on: calibration_split must be another "
                         f"split than {split!r} (train), with calibration_images >= 1. Got {calibration_split!r}, "
                         f"{calibration_images}")
    if models is not None:
        index = check_model_index(models, options)  # every bundle, before anything is scored
        targets = sorted(index.classifiers.items())
        if index.router:
            log(f"router {index.router}: not measured (in fast mode a router runs exact)")
    else:
        meta = read_bundle_meta(bundle, options)
        if meta.task != "fracture":
            raise ValueError(f"{bundle} is a {meta.task!r} bundle; the fast-mode gate is for fracture classifiers")
        targets = [(body_part or _part_of_bundle(meta), storage.normalize(bundle))]
    everything = adapters.index_dataset(dataset, data, options).manifest
    manifest = filter_rows(everything, split=split) if split and split != "all" else everything
    chosen = {part: bundle_images(manifest, part) for part, _ in targets}
    calibration = {part: (calibration_rows(filter_rows(everything, split=calibration_split), part, calibration_images)
                          if kind == "int8" else None) for part, _ in targets}
    for part, rows in chosen.items():  # all refused before any model is loaded
        if rows.num_rows == 0:
            raise ValueError(f"No labelled {part} images in split {split or 'all'} of {data} to validate the "
                             f"{part} classifier on")
        if kind == "int8" and calibration[part].num_rows == 0:
            raise ValueError(f"No labelled {part} images in split {calibration_split} of {data} to calibrate the "
                             f"{part} classifier's INT8 graph on (or validate --kind bf16)")
    return [validate_bundle(uri, chosen[part], body_part=part, dataset=dataset, data=data, split=split or "all",
                            storage_options=options, write=write, log=log, kind=kind,
                            calibration=calibration[part], calibration_split=calibration_split,
                            calibration_method=calibration_method)
            for part, uri in targets]


def format_check(check: FastModeCheck) -> str:
    """One bundle's outcome as a small table."""
    r = check.record

    def num(value: Any, signed: bool = False) -> str:
        return "-" if value is None else (f"{value:+.5f}" if signed else f"{value:.4f}")

    head = (f"{check.name}  ({check.body_part}: {r['images']} images, {r['positives']} fractured, of {r['dataset']} "
            f"{r['split']}; threshold {r['threshold']:.4f}; {r['rejected']} rejected)")
    width = max(len(r["exact_engine"]), len(f"{r['engine']}-{r['precision']}"), 10) + 2
    rows = [f"  {'':<12}{'exact':>{width}}{'fast':>{width}}{'change':>11}{'allowed':>10}",
            f"  {'':<12}{r['exact_engine']:>{width}}{r['engine'] + '-' + r['precision']:>{width}}",
            f"  {'AUROC':<12}{num(r['auroc_exact']):>{width}}{num(r['auroc_fast']):>{width}}"
            f"{num(r['delta_auroc'], True):>11}{'±' + format(r['max_delta_auroc'], 'g'):>10}",
            f"  {'sensitivity':<12}{num(r['sensitivity_exact']):>{width}}{num(r['sensitivity_fast']):>{width}}"
            f"{num(r['delta_sensitivity'], True):>11}{'±' + format(r['max_delta_sensitivity'], 'g'):>10}",
            f"  {'specificity':<12}{num(r['specificity_exact']):>{width}}{num(r['specificity_fast']):>{width}}",
            f"  largest probability difference {r['max_probability_difference']:.4f}; "
            f"{r['labels_changed']} of {r['images']} labels changed"]
    verdict = "PASSED: fast mode allowed" if check.passed else "FAILED: fast mode refused"
    where = f" (recorded in {check.written})" if check.written else " (not recorded: --dry-run)"
    return "\n".join([head, *rows, f"  {verdict}{where}"])
