"""A model index of untrained bundles, for load tests and benchmarks.

The compute per image is exactly that of trained models of the same backbone, so
serving and scoring throughput measured on it holds for real models; the
probabilities mean nothing and the bundles say so in their intended use.
"""

from __future__ import annotations

import datetime as _dt

from .. import storage
from ..data.manifest import MURA_BODY_PARTS
from ..storage import StorageOptions
from .bundle import BundleMeta, save_bundle
from .index import ModelIndex, write_model_index

__all__ = ["build_untrained_index"]

UNTRAINED_USE = "Untrained weights for load tests and benchmarks only. Outputs are meaningless."


def build_untrained_index(output_uri: str, *, body_parts: tuple[str, ...] = MURA_BODY_PARTS,
                          model: str = "efficientnet_lite0", router: bool = True, pretrained: bool = False,
                          seed: int = 0, options: StorageOptions | None = None) -> str:
    """Write one bundle per body part (and a router) plus model_index.json; returns the index URI."""
    import torch

    from ..models.registry import create_model  # torch and timm: only when bundles are made

    output_uri = storage.normalize(output_uri)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def bundle(name: str, task: str, classes: list[str], threshold: float) -> str:
        torch.manual_seed(seed + len(name))
        net = create_model(model, pretrained=pretrained, num_classes=len(classes))
        points = {"sensitivity>=0.90": {"threshold": 0.3, "sensitivity": None, "specificity": None}} \
            if task == "fracture" else {}
        meta = BundleMeta(task=task, model={}, preprocess=net.preprocess_config().to_dict(), classes=classes,
                          threshold=threshold, threshold_rule="fixed (untrained)", operating_points=points,
                          intended_use=UNTRAINED_USE, created=created)
        return save_bundle(storage.join(output_uri, name), net.eval(), meta, options)

    classifiers = {part: bundle(f"fracture_{part}", "fracture", ["normal", "abnormal"], 0.5) for part in body_parts}
    router_uri = bundle("router", "body_part", list(body_parts), 0.0) if router and len(body_parts) > 1 else None
    index_uri = storage.join(output_uri, "model_index.json")
    write_model_index(index_uri, ModelIndex(router=router_uri, classifiers=classifiers, dataset="untrained",
                                            created=created), options)
    return index_uri
