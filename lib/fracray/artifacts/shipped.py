"""The model the product ships: ``models/fracatlas/`` (a model index, its bundle with float16
weights, and MODEL_CARD.md), used by ``fracray serve``, ``score`` and ``evaluate`` when no
``--models`` is given, so a new user scores radiographs without training anything.

:func:`ship_bundle` makes such a folder from a trained bundle (``fracray ship-model``): float16
safetensors (half the bytes; the largest relative change of any weight is recorded in the
bundle, and a weight too large for float16 is refused) and a model index beside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .. import storage
from ..storage import StorageOptions
from .bundle import META_FILE, WEIGHTS_FILE, read_bundle_meta
from .index import MODEL_INDEX_FILE, VALIDATION_DISTRIBUTION_FILE, ModelIndex, write_model_index

__all__ = ["SHIPPED_MODELS", "shipped_model_index", "default_models", "ship_bundle", "MODELS_ENV"]

# <checkout>/models/fracatlas: the package lives in <checkout>/lib/fracray.
SHIPPED_MODELS = Path(__file__).resolve().parents[3] / "models" / "fracatlas"
MODELS_ENV = "FRACRAY_MODELS"


def shipped_model_index() -> str | None:
    """The shipped model index, or None where this installation has none (a wheel without the
    checkout's models/ folder)."""
    path = SHIPPED_MODELS / MODEL_INDEX_FILE
    return str(path) if path.is_file() else None


def default_models() -> str:
    """What ``--models`` means when it is not given: $FRACRAY_MODELS, else the shipped model."""
    if os.environ.get(MODELS_ENV):
        return os.environ[MODELS_ENV]
    shipped = shipped_model_index()
    if shipped is None:
        raise FileNotFoundError(f"No --models given and no shipped model at {SHIPPED_MODELS}: pass --models "
                                f"<model_index.json> (train one with `fracray train`), or set {MODELS_ENV}")
    return shipped


def ship_bundle(bundle_uri: str, output: str, *, part: str = "all", dataset: str = "fracatlas",
                options: StorageOptions | None = None,
                validation_distribution: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy a trained bundle into ``output``/models/<name> with float16 weights, and write
    ``output``/model_index.json naming it for ``part``. Returns what was written and the
    largest relative change of any weight (float16 rounding). ``validation_distribution``: the
    shipped files' P(fracture) on the validation images (``fracray evaluate --output`` writes
    it), written beside the index as the monitoring's drift reference."""
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

    meta = read_bundle_meta(bundle_uri, options)
    if meta.task != "fracture":
        raise ValueError(f"{bundle_uri} is a {meta.task!r} bundle; ship a fracture model")
    state = load_safetensors(storage.read_bytes(storage.join(bundle_uri, WEIGHTS_FILE), options))
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    overflow = [k for k, v in half.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if overflow:
        raise ValueError(f"{bundle_uri}: weights {overflow[:3]} do not fit in float16; ship it as trained")
    # float16 keeps ~3 significant digits: the largest change relative to each weight's size.
    worst = max((float(((half[k].float() - v.float()).abs() / v.float().abs().clamp(min=1e-3)).max())
                 for k, v in state.items() if v.is_floating_point() and v.numel()), default=0.0)
    name = bundle_uri.rstrip("/").rsplit("/", 1)[-1]
    target = storage.join(storage.join(output, "models"), name)
    storage.write_bytes(storage.join(target, WEIGHTS_FILE), save_safetensors(half), options)
    raw = json.loads(storage.read_bytes(storage.join(bundle_uri, META_FILE), options))
    raw.setdefault("inference", {})["weights_dtype"] = "float16"
    raw["inference"]["float16_max_relative_weight_change"] = worst
    storage.write_bytes(storage.join(target, META_FILE), json.dumps(raw, indent=2).encode(), options)
    write_model_index(storage.join(output, MODEL_INDEX_FILE),
                      ModelIndex(router=None, classifiers={part: target}, dataset=dataset, created=meta.created),
                      options)
    written = {"bundle": target, "index": storage.join(output, MODEL_INDEX_FILE), "max_relative_weight_change": worst,
               "bytes": sum(v.numel() * v.element_size() for v in half.values())}
    if validation_distribution is not None:
        written["validation_distribution"] = storage.join(output, VALIDATION_DISTRIBUTION_FILE)
        storage.write_bytes(written["validation_distribution"], json.dumps(validation_distribution, indent=2).encode(),
                            options)
    return written
