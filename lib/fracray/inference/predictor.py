"""One predictor: bytes -> decode -> router (bone type) -> that bone's fracture model.

Evaluation uses it through Ray Data (``map_batches`` with an actor pool); serving
and bulk scoring build on the same class, so they cannot disagree. Preprocessing
comes from each model's bundle, never re-declared here.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .. import storage
from ..artifacts.bundle import BundleMeta, load_bundle, read_bundle_meta
from ..artifacts.describe import bundle_name, describe_bundle, resolve_threshold
from ..artifacts.index import read_model_index
from ..imaging.decode import ImageRejected, RejectReason
from ..imaging.findings import FindingsConfig, detection_findings, image_findings, map_to_image
from ..imaging.preprocess import ModelInput, decode_for, finalize, prepare_input, preprocess_base, shared_decode_config
from ..imaging.regions import FINDINGS_TYPE, findings_to_rows
from ..imaging.scope import OUT_OF_SCOPE, assess_scope
from ..metrics.fusion import fused_probability
from ..models.detection import dense_detections
from ..storage import StorageOptions
from .engines.base import InferenceEngine, engine_label
from .engines.choice import FAST_GRAPH_FILE, requested, resolve_precision
from .engines.export import local_graph, weights_digest
from .engines.factory import make_engine
from .engines.fast_gate import FAST_MODE_KEY, FastModeRefused, check_fast_mode, fast_mode_command
from .gradcam import gradcam_for_image

__all__ = ["FracturePredictor", "BundleModel", "Detections", "image_result", "route_decoded", "UnknownBodyPart", "check_precision"]

CPU_MICRO_BATCH = 1
# Which engine runs predict() and at which precision, when BundleModel is not told: the one rule of
# inference.engines.choice ($FRACRAY_ENGINE / $FRACRAY_PRECISION where set, else auto and exact).
# "fast" is OpenVINO (INT8 or bf16) on CPU, for a bundle whose bundle.json records a passed
# validation (fracray validate-fast-mode).


class Detections:
    """A detector's answer for one image: boxes in model-input pixels (K x 4) with raw scores,
    best first, and the score map (h x w, for heatmaps)."""

    __slots__ = ("boxes", "scores", "score_map")

    def __init__(self, boxes: np.ndarray, scores: np.ndarray, score_map: np.ndarray):
        self.boxes, self.scores, self.score_map = boxes, scores, score_map

    @property
    def top(self) -> float:
        return float(self.scores.max()) if len(self.scores) else 0.0


class BundleModel:
    """One bundle, ready to use: its model, its preprocessing and its temperature.

    The unit both the predictor (batch scoring, evaluation) and the Serve
    deployments wrap, so an image gets the same numbers whichever path it takes.
    """

    def __init__(self, uri: str, storage_options: StorageOptions | None = None, device: str | torch.device = "cpu",
                 engine: str | None = None, precision: str | None = None, *, for_validation: bool = False,
                 fast_graph: str | None = None):
        self.uri = uri
        self.storage_options = storage_options
        self.device = torch.device(device)
        self.model, self.meta = load_bundle(uri, storage_options, device=str(self.device))
        self.config = self.meta.preprocess_config()
        self.name = bundle_name(uri, self.meta)
        self.tta_flip = bool(self.meta.inference.get("tta_flip", False))
        self.findings_config = FindingsConfig.from_dict(self.meta.inference.get("findings"))
        # A detector's bundle: P(fracture) fuses the classifier with the top box (metrics.fusion),
        # and box scores are calibrated (imaging.findings.calibrate_box_score).
        self.fusion = self.meta.inference.get("fusion")
        self.box_calibration = self.meta.inference.get("box_calibration")
        # What runs predict() ("auto" | "torch" | "onnxruntime") and at which precision ("exact" |
        # "fast"), as given, else as $FRACRAY_ENGINE / $FRACRAY_PRECISION say: engine_label(self.engine)
        # says which did. Grad-CAM always runs self.model (it needs gradients). for_validation: the
        # fast-mode validation's own use (fracray.evaluation.fast_mode): what is asked here, whatever
        # the environment says, and "fast" without a validation record: at bf16, or on the INT8
        # graph ``fast_graph`` it has just made (elsewhere fast runs the kind the record validated).
        environment = not for_validation
        self.precision = resolve_precision(precision, self.device, engine,
                                           environment=environment)
        if self.precision == "fast" and self.meta.task != "fracture":
            self.precision = "exact"  # a router: the fast-mode gate is defined on fracture classifiers only
        check = self.precision == "fast" and not for_validation
        if check:  # refused before anything is compiled
            self._check_fast_mode()
            fast_graph = self._validated_graph()
        input_shape = (self.config.channels, *self.config.image_size)
        self.engine: InferenceEngine = make_engine(self.model, input_shape, engine=engine,
                                                   device=self.device, model_spec=self.meta.model,
                                                   precision=self.precision, environment=environment,
                                                   fast_graph=fast_graph if self.precision == "fast" else None)
        if check:  # and what was validated is what runs here (precision, OpenVINO version)
            self._check_fast_mode(self.engine)

    @functools.cached_property
    def weights_sha256(self) -> str:
        """The digest of the weights (:func:`~fracray.inference.engines.export.weights_digest`) that a
        fast-mode validation is tied to."""
        return weights_digest(self.model)

    def _validated_graph(self) -> str | None:
        """The INT8 graph a passed int8 validation recorded (read from the bundle, a local copy
        in the engine cache), or None for bf16."""
        record = self.meta.inference.get(FAST_MODE_KEY) or {}
        if record.get("precision") != "int8":
            return None
        uri = storage.join(self.uri, str(record.get("graph") or FAST_GRAPH_FILE))
        try:
            data = storage.read_bytes(uri, self.storage_options)
        except storage.StorageUnavailable:
            raise
        except storage.StorageError as exc:
            raise FastModeRefused(f"Fast precision refused for bundle {self.uri}: its validated INT8 graph {uri} "
                                  f"cannot be read ({exc}); validate again or run it exact") from exc
        return str(local_graph(data))

    def _check_fast_mode(self, engine: InferenceEngine | None = None) -> None:
        _check_bundle_fast_mode(self.uri, self.meta, weights_sha256=self.weights_sha256, engine=engine)

    def inputs(self, decoded: list) -> torch.Tensor:
        """Decoded images or :class:`ModelInput`s (prepared for this model's config) -> a batch."""
        base = np.stack([self._base(d)[None] for d in decoded])
        return finalize(torch.from_numpy(base).to(self.device), self.config)

    def prepare(self, decoded) -> ModelInput:
        """What this model needs of a decoded image (see ModelInput): made where the image
        is decoded, so the full-size pixels need not travel to the model."""
        return prepare_input(decoded, self.config)

    def _base(self, item) -> np.ndarray:
        if isinstance(item, ModelInput):
            if item.config != self.config:
                raise ValueError(f"{self.name}: input prepared for another preprocessing ({item.config}); "
                                 f"this model's is {self.config}. Was the model index changed under a running service?")
            return item.base
        return preprocess_base(item, self.config)

    @property
    def localizes(self) -> bool:
        return bool(getattr(self.model, "localizes", False))

    @property
    def detects(self) -> bool:
        return bool(getattr(self.model, "detects", False))

    @torch.no_grad()
    def predict(self, decoded: list) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """(N x classes calibrated probabilities (softmax(logits / temperature), or for a detector
        the fusion of classifier and top box), per-image fracture-map probabilities over the model
        input or a detector's :class:`Detections`, or None for a model without either).
        Test-time flip averaging when the bundle says so. Runs on ``self.engine`` (ONNX
        Runtime on CPU, eager PyTorch on CUDA: see inference.engines)."""
        if not decoded:
            return np.zeros((0, len(self.meta.classes)), dtype=np.float64), ([] if self.localizes else None)
        # On CPU these CNNs are compute-bound at batch 1 and bigger batches only fall out of
        # cache (EfficientNet-Lite0, 1 thread: 19-20 images/s one at a time, 15 in fours on
        # the build machine), so the CPU runs image by image; a GPU takes the whole batch.
        step = len(decoded) if self.device.type == "cuda" else CPU_MICRO_BATCH
        out, maps = [], []
        for start in range(0, len(decoded), step):
            logits, map_logits = self.engine.infer(self.inputs(decoded[start:start + step]), tta_flip=self.tta_flip)
            probs = (logits.float() / float(self.meta.temperature)).softmax(-1).cpu().numpy().astype(np.float64)
            if map_logits is not None and self.detects:
                found = [Detections(*dense_detections(d)) for d in map_logits]
                maps += found
                if self.fusion:
                    p = fused_probability(self.fusion, logits.float().cpu().numpy(), np.asarray([f.top for f in found]))
                    probs = np.stack([1 - p, p], axis=1)
            elif map_logits is not None:
                maps += list(torch.sigmoid(map_logits.float()).cpu().numpy())
            out.append(probs)
        return np.concatenate(out), (maps if self.localizes else None)

    def probabilities(self, decoded: list) -> np.ndarray:
        """N x classes calibrated probabilities."""
        return self.predict(decoded)[0]

    def findings(self, map_probs, decoded) -> list[dict[str, Any]]:
        """The fracture map (or a detector's :class:`Detections`) of one image -> findings
        ({box, score, peak}) in the image's own pixels."""
        if isinstance(map_probs, Detections):
            found = detection_findings(map_probs.boxes, map_probs.scores, (decoded.height, decoded.width), self.config,
                                       self.findings_config, box_calibration=self.box_calibration)
        else:
            found, _ = image_findings(map_probs, (decoded.height, decoded.width), self.config, self.findings_config)
        return [f.to_dict() for f in found]

    def heatmap(self, decoded, max_side: int | None = None) -> np.ndarray:
        """Where the model sees a fracture, over the decoded image (values in [0, 1]): the
        fracture map for a model that has one, else Grad-CAM. ``max_side``: at most this many
        pixels a side (same aspect), for drawing; default the decoded grid's size."""
        if not self.localizes:
            return self.gradcam(decoded, max_side=max_side)
        import cv2

        _, maps = self.predict([decoded])
        grid = maps[0].score_map if isinstance(maps[0], Detections) else maps[0]
        heat, _ = map_to_image(grid, decoded.shape, self.config, max_side=max_side)
        h, w = decoded.shape
        if max_side is not None:
            return heat
        return heat if heat.shape == (h, w) else cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)

    def threshold_for(self, operating_point: str | float | None) -> float:
        """The bundle's threshold, a named operating point from validation, or a number in [0, 1]."""
        return resolve_threshold(self.meta, operating_point)

    def gradcam(self, decoded, target_class: int = 1, max_side: int | None = None) -> np.ndarray:
        """Grad-CAM heatmap in the decoded image's own pixel grid (values in [0, 1]), or at
        most ``max_side`` pixels a side."""
        return gradcam_for_image(self.model, self.inputs([decoded]), decoded.shape, self.config,
                                 target_class=target_class, max_side=max_side)

    def describe(self) -> dict[str, Any]:
        return describe_bundle(self.uri, self.meta)



def route_decoded(router: "BundleModel | None", body_parts: list[str], decoded: list) -> list[tuple[str, float | None]]:
    """(body part, probability) per image from the router; with no router and one
    classifier, that classifier's part (probability None)."""
    if router is None:
        if len(body_parts) != 1:
            raise ValueError("No router in the model index: pass the body part")
        return [(body_parts[0], None)] * len(decoded)
    probs = router.probabilities(decoded)
    classes = router.meta.classes
    return [(classes[int(p.argmax())], float(p.max())) for p in probs]




def image_result(part: str, part_probability: float | None, fracture_probability: float, threshold: float,
                 classifier: str, router: str | None, findings: list[dict[str, Any]] | None = None, *,
                 engine: str | None = None) -> dict[str, Any]:
    """The per-image answer, identical for batch scoring and the HTTP API. ``findings``:
    suspected fracture regions ({box: [x0, y0, x1, y1] in the image's pixels, score, peak}),
    best first; empty for a model without a fracture map. ``engine``: what computed the
    fracture probability (``onnxruntime-float32``, ``torch-float32``; see inference.engines)."""
    return {"body_part": part, "body_part_probability": part_probability,
            "fracture_probability": float(fracture_probability), "label": int(fracture_probability >= threshold),
            "threshold": float(threshold), "classifier": classifier,
            "router": router if part_probability is not None else None, "findings": list(findings or []),
            "engine": engine}


class UnknownBodyPart(KeyError):
    def __init__(self, part: str, known: list[str]):
        super().__init__(part)
        self.part, self.known = part, known

    def __str__(self) -> str:
        return f"No fracture model for body part {self.part!r}; known: {self.known}"


def _check_bundle_fast_mode(uri: str, meta: BundleMeta, **given) -> None:
    """check_fast_mode for one bundle, naming the command that validates it on the data its
    training recorded."""
    run = (meta.training or {}).get("run") or {}
    command = fast_mode_command(uri, meta.data.get("dataset") or run.get("dataset"), run.get("data"))
    check_fast_mode(meta.inference.get(FAST_MODE_KEY), bundle=uri, command=command, **given)


def check_precision(index_uri: str, storage_options: StorageOptions | None = None, *, engine: str | None = None,
                    precision: str | None = None, device: str | torch.device = "cpu") -> str:
    """The precision a model index's classifiers will run at ("exact" | "fast";
    as given, else as ``$FRACRAY_PRECISION`` says, as in BundleModel), checked where a job starts, before
    any actor or replica loads a model: fast is refused (:class:`~fracray.inference.engines.fast_gate.FastModeRefused`,
    a ValueError with the command that validates) for a fracture bundle whose bundle.json records
    no passed validation, and (ValueError) where it cannot run (CUDA, an engine asked for by name,
    no openvino). Each BundleModel checks again against the weights and the OpenVINO it loads."""
    requested("engine", engine)  # an unknown name: refused here, not in every actor
    name = requested("precision", precision)
    if name != "fast":
        return name
    resolve_precision(name, device, engine)
    for uri in read_model_index(index_uri, storage_options).classifiers.values():
        meta = read_bundle_meta(uri, storage_options)
        if meta.task == "fracture":  # a router runs exact (BundleModel)
            _check_bundle_fast_mode(uri, meta)
    return name


class FracturePredictor:
    """Loads the router and per-bone bundles named by a model index.

    ``predict_bytes(list_of_bytes, body_parts=None)`` returns one dict per image with
    the body part and its probability, the fracture probability, the label at the
    model's operating threshold, the threshold and the model names - or a status
    with the reject reason. A client-supplied body part skips the router.
    """

    def __init__(self, index_uri: str, storage_options: StorageOptions | None = None, device: str | None = None,
                 *, use_known_body_part: bool = False, operating_point: str | float | None = None,
                 check_scope: bool = True, engine: str | None = None, precision: str | None = None):
        self.options = storage_options
        # Refuse what is not a limb radiograph (photos, CT/MR/US, chest films, blank images): imaging.scope.
        self.check_scope = check_scope
        # Batch path only: trust the body part the archive layout gives (e.g. MURA's XR_WRIST) over the router.
        self.use_known_body_part = use_known_body_part
        self.operating_point = operating_point
        self.index = read_model_index(index_uri, storage_options)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # engine / precision: BundleModel's (each answer's "engine" names what ran).
        self.router = (BundleModel(self.index.router, storage_options, self.device, engine, precision)
                       if self.index.router else None)
        self.classifiers = {part: BundleModel(uri, storage_options, self.device, engine, precision)
                            for part, uri in self.index.classifiers.items()}
        if not self.classifiers:
            raise ValueError("The model index names no fracture classifiers")

    @property
    def body_parts(self) -> list[str]:
        return sorted(self.classifiers)

    @property
    def decode_config(self):
        """One decode serves every model: see imaging.preprocess.shared_decode_config."""
        models = ([self.router] if self.router else []) + [self.classifiers[p] for p in self.body_parts]
        return shared_decode_config([m.config for m in models])

    def route(self, decoded: list) -> list[tuple[str, float]]:
        """(body part, probability) for each image, from the router."""
        return route_decoded(self.router, self.body_parts, decoded)

    def predict_decoded(self, decoded: list, body_parts: list[str | None] | None = None,
                        operating_point: str | float | None = None) -> list[dict[str, Any]]:
        n = len(decoded)
        parts = list(body_parts or [None] * n)
        part_probs: list[float | None] = [None] * n
        for part in parts:
            if part and part not in self.classifiers:
                raise UnknownBodyPart(part, self.body_parts)
        need_router = [i for i in range(n) if not parts[i]]
        if need_router:
            for i, (part, prob) in zip(need_router, self.route([decoded[i] for i in need_router])):
                parts[i], part_probs[i] = part, prob
        results: list[dict[str, Any]] = [{} for _ in range(n)]
        for part in set(parts):
            if part not in self.classifiers:  # the router knows a part no classifier was trained for
                raise UnknownBodyPart(part, self.body_parts)
            members = [i for i in range(n) if parts[i] == part]
            classifier = self.classifiers[part]
            threshold = classifier.threshold_for(operating_point)
            probs, maps = classifier.predict([decoded[i] for i in members])
            for k, (i, p) in enumerate(zip(members, probs[:, 1])):
                found = classifier.findings(maps[k], decoded[i]) if maps is not None else []
                results[i] = image_result(part, part_probs[i], p, threshold, classifier.name,
                                          self.router.name if self.router else None, found,
                                          engine=engine_label(classifier.engine))
                # The frame of the findings' boxes, as the HTTP answer's "image" gives it.
                results[i]["image"] = {"width": decoded[i].width, "height": decoded[i].height,
                                       "format": decoded[i].source_format}
                if decoded[i].sop_instance_uid:  # DICOM: what joins the result back to the archive
                    results[i]["image"]["sop_instance_uid"] = decoded[i].sop_instance_uid
        return results

    def predict_bytes(self, payloads: list[bytes], body_parts: list[str | None] | None = None,
                      names: list[str] | None = None, operating_point: str | float | None = None) -> list[dict[str, Any]]:
        """Bad images get ``status`` = reject reason, images that are not limb radiographs
        ``status`` = "out_of_scope" (with check_scope); the rest ``status`` = "ok"."""
        config = self.decode_config
        decoded, keep, out = [], [], []
        for i, data in enumerate(payloads):
            name = names[i] if names else ""
            try:
                image = decode_for(data, config, name=name)
            except ImageRejected as exc:
                out.append({"status": exc.reason.value, "error": exc.detail})
                continue
            verdict = assess_scope(image) if self.check_scope else None
            if verdict is not None and not verdict.in_scope:
                out.append({"status": OUT_OF_SCOPE, "error": f"{verdict.reason}: {verdict.detail}"})
                continue
            decoded.append(image)
            keep.append(i)
            out.append({"status": "ok", "error": ""})
        if keep:
            parts = [body_parts[i] for i in keep] if body_parts else None
            for i, result in zip(keep, self.predict_decoded(decoded, parts, operating_point)):
                out[i].update(result)
        return out

    # Ray Data: ds.map_batches(FracturePredictor, fn_constructor_kwargs=..., batch_format="pyarrow")
    def __call__(self, batch) -> dict[str, Any]:
        """One output row per input row: scored, or rejected with the reason. Columns are
        NumPy arrays, the nested ones (findings) typed Arrow arrays."""
        uris = batch["image_uri"].to_pylist()
        known = batch["body_part"].to_pylist() if "body_part" in batch.column_names else [None] * len(uris)
        parts = [p if self.use_known_body_part and p in self.classifiers else None for p in known]
        payloads, errors = [], {}
        for i, uri in enumerate(uris):
            try:
                payloads.append(storage.read_bytes(uri, self.options))
            except storage.StorageUnavailable:
                raise  # the service is down, not the image bad: the chunk fails and a rerun scores it
            except storage.StorageError as exc:
                payloads.append(b"")
                errors[i] = str(exc)
        results = self.predict_bytes(payloads, body_parts=parts, names=uris, operating_point=self.operating_point)
        for i, msg in errors.items():
            results[i] = {"status": RejectReason.READ_ERROR.value, "error": msg}
        columns = {"image_uri": np.asarray(uris, dtype=object)}
        for key in ("status", "error", "body_part", "classifier", "router", "engine"):
            columns[key] = np.asarray([str(r.get(key) or "") for r in results], dtype=object)
        for key in ("body_part_probability", "fracture_probability", "threshold"):
            columns[key] = np.asarray([np.nan if r.get(key) is None else r[key] for r in results], dtype=np.float64)
        columns["label"] = np.asarray([r.get("label", -1) for r in results], dtype=np.int8)
        # Findings in the image's pixels (an empty list: none, or a model without a fracture
        # map; null: not scored), and the image's size they refer to. Typed Arrow columns, so
        # a batch of nothing but empty lists or nulls keeps the same type.
        scored = [r.get("status") == "ok" and "fracture_probability" in r for r in results]
        columns["findings"] = pa.array([findings_to_rows(r.get("findings") or []) if ok else None
                                        for r, ok in zip(results, scored)], FINDINGS_TYPE)
        for key in ("width", "height"):
            columns[key] = pa.array([(r.get("image") or {}).get(key) if ok else None
                                     for r, ok in zip(results, scored)], pa.int32())
        columns["sop_instance_uid"] = pa.array([(r.get("image") or {}).get("sop_instance_uid") if ok else None
                                                for r, ok in zip(results, scored)], pa.string())
        for key in ("study_id", "image_label", "split"):
            if key in batch.column_names:
                columns["true_" + key if key != "study_id" else key] = np.asarray(batch[key].to_pylist(), dtype=object)
        if "body_part" in batch.column_names:
            columns["true_body_part"] = np.asarray(known, dtype=object)
        if "chunk_id" in batch.column_names:  # score_archive's unit of resumable work
            columns["chunk_id"] = np.asarray(batch["chunk_id"].to_pylist(), dtype=np.int64)
        return columns
