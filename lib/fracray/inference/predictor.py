"""One predictor: bytes -> decode -> router (bone type) -> that bone's fracture model.

Evaluation uses it through Ray Data (``map_batches`` with an actor pool); serving
and bulk scoring build on the same class, so they cannot disagree. Preprocessing
comes from each model's bundle, never re-declared here.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import torch

from .. import storage
from ..imaging.decode import ImageRejected, RejectReason
from ..imaging.preprocess import decode_for, finalize, preprocess_base
from ..storage import StorageOptions
from ..training.bundle import load_bundle

__all__ = ["ModelIndex", "FracturePredictor", "write_model_index", "read_model_index", "MODEL_INDEX_FORMAT"]

MODEL_INDEX_FORMAT = "fracray-model-index/1"


@dataclasses.dataclass
class ModelIndex:
    """Which bundles make up the router -> classifier graph."""

    router: str | None
    classifiers: dict[str, str]
    dataset: str = ""
    created: str = ""
    format: str = MODEL_INDEX_FORMAT


def write_model_index(uri: str, index: ModelIndex, options: StorageOptions | None = None) -> None:
    storage.write_bytes(uri, json.dumps(dataclasses.asdict(index), indent=2).encode(), options)


def read_model_index(uri: str, options: StorageOptions | None = None) -> ModelIndex:
    if not uri.endswith(".json"):
        uri = storage.join(uri, "model_index.json")
    raw = json.loads(storage.read_bytes(uri, options))
    if raw.get("format") != MODEL_INDEX_FORMAT:
        raise ValueError(f"{uri}: not a fracray model index (format {raw.get('format')!r})")
    return ModelIndex(**raw)


class FracturePredictor:
    """Loads the router and per-bone bundles named by a model index.

    ``predict_bytes(list_of_bytes, body_parts=None)`` returns one dict per image with
    the body part and its probability, the fracture probability, the label at the
    model's operating threshold, the threshold and the model names - or a status
    with the reject reason. A client-supplied body part skips the router.
    """

    def __init__(self, index_uri: str, storage_options: StorageOptions | None = None, device: str | None = None):
        self.options = storage_options
        self.index = read_model_index(index_uri, storage_options)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.router, self.router_meta = (load_bundle(self.index.router, storage_options, device=str(self.device))
                                         if self.index.router else (None, None))
        self.classifiers = {}
        for part, uri in self.index.classifiers.items():
            self.classifiers[part] = load_bundle(uri, storage_options, device=str(self.device))
        if not self.classifiers:
            raise ValueError("The model index names no fracture classifiers")

    @property
    def body_parts(self) -> list[str]:
        return sorted(self.classifiers)

    def _inputs(self, decoded: list, meta) -> torch.Tensor:
        config = meta.preprocess_config()
        base = np.stack([preprocess_base(d, config)[None] for d in decoded])
        return finalize(torch.from_numpy(base).to(self.device), config)

    @torch.no_grad()
    def predict_decoded(self, decoded: list, body_parts: list[str | None] | None = None) -> list[dict[str, Any]]:
        n = len(decoded)
        body_parts = list(body_parts or [None] * n)
        results: list[dict[str, Any]] = [{} for _ in range(n)]
        need_router = [i for i in range(n) if not body_parts[i]]
        if need_router:
            if self.router is None:
                if len(self.classifiers) != 1:
                    raise ValueError("No router in the model index: pass the body part")
                for i in need_router:
                    body_parts[i] = self.body_parts[0]
            else:
                probs = self.router(self._inputs([decoded[i] for i in need_router], self.router_meta)).softmax(-1)
                classes = self.router_meta.classes
                for i, p in zip(need_router, probs.cpu().numpy()):
                    k = int(p.argmax())
                    body_parts[i] = classes[k]
                    results[i]["body_part_probability"] = float(p[k])
        for part in set(body_parts):
            if part not in self.classifiers:
                raise KeyError(part)
            members = [i for i in range(n) if body_parts[i] == part]
            model, meta = self.classifiers[part]
            probs = model(self._inputs([decoded[i] for i in members], meta)).softmax(-1)[:, 1].cpu().numpy()
            for i, p in zip(members, probs):
                results[i].update({
                    "body_part": part, "fracture_probability": float(p), "label": int(p >= meta.threshold),
                    "threshold": meta.threshold,
                    "classifier": f"{meta.model['name']}@{meta.created}",
                    "router": f"{self.router_meta.model['name']}@{self.router_meta.created}" if self.router_meta else None,
                })
                results[i].setdefault("body_part_probability", None)
        return results

    def predict_bytes(self, payloads: list[bytes], body_parts: list[str | None] | None = None,
                      names: list[str] | None = None) -> list[dict[str, Any]]:
        """Bad images get ``status`` = reject reason; the rest ``status`` = "ok"."""
        config = (self.router_meta or next(iter(self.classifiers.values()))[1]).preprocess_config()
        decoded, keep, out = [], [], []
        for i, data in enumerate(payloads):
            name = names[i] if names else ""
            try:
                decoded.append(decode_for(data, config, is_dicom_name=name.lower().endswith((".dcm", ".dicom"))))
                keep.append(i)
                out.append({"status": "ok", "error": ""})
            except ImageRejected as exc:
                out.append({"status": exc.reason.value, "error": exc.detail})
        if keep:
            parts = [body_parts[i] for i in keep] if body_parts else None
            for i, result in zip(keep, self.predict_decoded(decoded, parts)):
                out[i].update(result)
        return out

    # Ray Data: ds.map_batches(FracturePredictor, fn_constructor_kwargs=..., batch_format="pyarrow")
    def __call__(self, batch) -> dict[str, np.ndarray]:
        uris = batch["image_uri"].to_pylist()
        payloads, errors = [], {}
        for i, uri in enumerate(uris):
            try:
                payloads.append(storage.read_bytes(uri, self.options))
            except storage.StorageError as exc:
                payloads.append(b"")
                errors[i] = str(exc)
        results = self.predict_bytes(payloads, names=uris)
        for i, msg in errors.items():
            results[i] = {"status": RejectReason.READ_ERROR.value, "error": msg}
        columns = {"image_uri": np.asarray(uris, dtype=object)}
        for key, typ in (("status", str), ("error", str), ("body_part", str)):
            columns[key] = np.asarray([str(r.get(key) or "") for r in results], dtype=object)
        for key in ("body_part_probability", "fracture_probability", "threshold"):
            columns[key] = np.asarray([np.nan if r.get(key) is None else r[key] for r in results], dtype=np.float64)
        columns["label"] = np.asarray([r.get("label", -1) for r in results], dtype=np.int8)
        for key in ("study_id", "image_label", "split"):
            if key in batch.column_names:
                columns["true_" + key if key != "study_id" else key] = np.asarray(batch[key].to_pylist(), dtype=object)
        if "body_part" in batch.column_names:
            columns["true_body_part"] = np.asarray(batch["body_part"].to_pylist(), dtype=object)
        return columns
