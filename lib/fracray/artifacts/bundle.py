"""Self-describing model bundles: a folder (local or s3://) with

    model.safetensors   the weights (no pickle)
    bundle.json         how to rebuild and use the model: backbone, head, strategy,
                        preprocessing, classes, operating threshold, validation
                        metrics, data and code version, intended use

Serving and scoring read the preprocessing from here and never re-declare it. Reading a
bundle's metadata needs neither torch nor OpenCV; :func:`load_bundle` brings them in.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__, storage
from ..storage import StorageOptions

if TYPE_CHECKING:
    import torch

    from ..imaging.preprocess import PreprocessConfig

__all__ = ["BundleMeta", "save_bundle", "load_bundle", "read_bundle_meta", "BUNDLE_FORMAT", "META_FILE", "WEIGHTS_FILE",
           "code_version", "FAST_MODE_KEY", "FAST_MODE_MAX_DELTA_AUROC", "FAST_MODE_MAX_DELTA_SENSITIVITY",
           "FAST_MODE_NOT_FOR_VALIDATION"]

BUNDLE_FORMAT = "fracray-bundle/1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "bundle.json"
# A bundle's fast-precision validation (inference.engines' OpenVINO bf16 or INT8) is recorded in
# bundle.json as inference[FAST_MODE_KEY]. Its gate, the only place these numbers live
# (evaluation.fast_mode measures against it, inference.engines.fast_gate enforces it):
# |AUROC(fast) - AUROC(exact)| and |sensitivity(fast) - sensitivity(exact)| at the bundle's own
# threshold, at most these, on a split the model was not trained on. A record made against a
# looser gate, or on a split that holds training images, does not count.
FAST_MODE_KEY = "fast_mode"
FAST_MODE_MAX_DELTA_AUROC = 0.005
FAST_MODE_MAX_DELTA_SENSITIVITY = 0.01
FAST_MODE_NOT_FOR_VALIDATION = ("train", "all")

INTENDED_USE = ("Research and decision support: flags musculoskeletal radiographs likely to show a fracture or "
                "other abnormality for review by a qualified reader. Not a diagnosis; not cleared as a medical "
                "device. Validate on local data before any clinical use.")


@dataclasses.dataclass
class BundleMeta:
    task: str                        # "fracture" (binary) or "body_part" (the router)
    model: dict[str, Any]            # FractureClassifier.describe()
    preprocess: dict[str, Any]       # PreprocessConfig.to_dict()
    classes: list[str]
    threshold: float = 0.5           # operating threshold on P(classes[1]) for binary tasks
    threshold_rule: str = "0.5"
    # Named thresholds from validation data ("sensitivity>=0.95": {threshold, sensitivity, specificity}).
    operating_points: dict[str, Any] = dataclasses.field(default_factory=dict)
    temperature: float = 1.0         # probabilities are softmax(logits / temperature)
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    # How inference runs: test-time flip averaging, how fracture maps become findings.
    inference: dict[str, Any] = dataclasses.field(default_factory=dict)
    code_version: str = ""
    intended_use: str = INTENDED_USE
    created: str = ""
    format: str = BUNDLE_FORMAT

    def preprocess_config(self) -> PreprocessConfig:
        from ..imaging.preprocess import PreprocessConfig  # OpenCV: not needed to read metadata

        return PreprocessConfig.from_dict(self.preprocess)


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"fracray {__version__}" + (f" ({sha})" if sha else "")


def save_bundle(uri: str, model: torch.nn.Module, meta: BundleMeta,
                options: StorageOptions | None = None) -> str:
    from safetensors.torch import save as save_safetensors

    module = getattr(model, "module", model)  # unwrap DDP
    meta.model = module.describe()
    meta.code_version = meta.code_version or code_version()
    meta.created = meta.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), save_safetensors(state), options)
    storage.write_bytes(storage.join(uri, META_FILE), json.dumps(dataclasses.asdict(meta), indent=2).encode(), options)
    return uri


def read_bundle_meta(uri: str, options: StorageOptions | None = None) -> BundleMeta:
    try:
        raw = json.loads(storage.read_bytes(storage.join(uri, META_FILE), options))
    except storage.StorageError as exc:
        raise FileNotFoundError(f"No model bundle at {uri} ({META_FILE} missing): {exc}") from exc
    if raw.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{uri}: unsupported bundle format {raw.get('format')!r}; expected {BUNDLE_FORMAT}")
    return BundleMeta(**raw)


def load_bundle(uri: str, options: StorageOptions | None = None, *, device: str = "cpu"):
    """Rebuild the model described by the bundle and load its weights. Returns (model, meta)."""
    from safetensors.torch import load as load_safetensors

    from ..models.registry import create_model  # torch and timm: only where a model is rebuilt

    meta = read_bundle_meta(uri, options)
    spec = meta.model
    model = create_model(spec["name"], pretrained=False, num_classes=spec["num_classes"], head=spec["head"],
                         bam=spec["bam"], strategy=spec["strategy"], localization=spec.get("localization", False),
                         localization_head=spec.get("localization_head") or "map")
    state = load_safetensors(storage.read_bytes(storage.join(uri, WEIGHTS_FILE), options))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta
