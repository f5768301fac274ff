"""The model deployments: BodyPartRouter (the 7-class router, dynamic batching) and
FractureClassifiers (every bone's model, Serve model multiplexing by body part, dynamic batching
across requests; findings and heatmaps are made here). Both wrap the same ``BundleModel`` as
batch scoring, so the two cannot disagree."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from ray import serve

from ..artifacts.index import read_model_index
from .args import ServeArgs
from .autoscaling import AUTOSCALING

# The predictor and Grad-CAM (torch) are imported where the replicas use them: building the
# application needs neither.

__all__ = ["BodyPartRouter", "FractureClassifiers", "HEATMAP_SIDE", "device"]


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


HEATMAP_SIDE = 512  # pixels a side of the heatmaps and overlay PNGs the API returns


@serve.deployment(
    name="BodyPartRouter",
    max_ongoing_requests=32,
    autoscaling_config=AUTOSCALING["BodyPartRouter"],
    ray_actor_options={"num_cpus": 0.2},
    health_check_period_s=10,
)
class BodyPartRouter:
    """The bone-type router (or, for a single-model index, its one body part)."""

    def __init__(self, args: ServeArgs):
        from ..inference.predictor import BundleModel

        self.args = args
        options = args.storage_options
        index = read_model_index(args.models, options)
        self.body_parts = sorted(index.classifiers)
        self.model = (BundleModel(index.router, options, device(), engine=args.engine, precision=args.precision)
                      if index.router else None)
        self.route.set_max_batch_size(args.max_batch_size)
        self.route.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def route(self, images: list) -> list[tuple[str, float | None, int]]:
        """(body part, probability, size of the batch it ran in) per image (each a ModelInput
        prepared by the ingress for this router: the full-size pixels stay there)."""
        from ..inference.predictor import route_decoded

        return [(part, prob, len(images)) for part, prob in route_decoded(self.model, self.body_parts, images)]

    def ready(self) -> dict[str, Any]:
        return {"router": self.model.name if self.model else None}


@serve.deployment(
    name="FractureClassifiers",
    max_ongoing_requests=32,
    autoscaling_config=AUTOSCALING["FractureClassifiers"],
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
)
class FractureClassifiers:
    """Every body part's fracture model, loaded on demand per replica (Serve model
    multiplexing routes a body part's requests to replicas that hold its model)."""

    def __init__(self, args: ServeArgs):
        self.args = args
        self.index = read_model_index(args.models, args.storage_options)
        self.classify.set_max_batch_size(args.max_batch_size)
        self.classify.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    def _load(self, body_part: str):
        """``body_part``'s fracture model, read from its bundle (blocking)."""
        from ..inference.predictor import BundleModel, UnknownBodyPart

        if body_part not in self.index.classifiers:
            raise UnknownBodyPart(body_part, sorted(self.index.classifiers))
        return BundleModel(self.index.classifiers[body_part], self.args.storage_options, device(),
                           engine=self.args.engine, precision=self.args.precision)

    @serve.multiplexed(max_num_models_per_replica=8)
    async def get_model(self, body_part: str):
        return await asyncio.to_thread(self._load, body_part)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def classify(self, images: list, body_parts: list[str]) -> list[tuple[float, str, int, list[dict], str]]:
        """(P(fracture), the model's name, the batch size, findings, the engine) for each image,
        grouped by body part. Findings ({box, score, peak} in the image's own pixels) are made
        here from the fracture map, so only those few numbers travel back, never the map."""
        from ..inference.engines.base import engine_label

        out: list[tuple[float, str, int, list[dict], str] | None] = [None] * len(images)
        for part in sorted(set(body_parts)):
            members = [i for i, p in enumerate(body_parts) if p == part]
            model = await self.get_model(part)
            probs, maps = model.predict([images[i] for i in members])
            for k, (i, p) in enumerate(zip(members, probs[:, 1])):
                found = model.findings(maps[k], images[i]) if maps is not None else []
                out[i] = (float(p), model.name, len(members), found, engine_label(model.engine))
        return out

    async def heat(self, image, body_part: str, gradcam: bool = False) -> dict[str, Any]:
        """A heatmap to draw over the radiograph (at most 512 px a side; the ingress draws it):
        the model's fracture map (else Grad-CAM), or Grad-CAM of the fracture class."""
        from ..inference.gradcam import heatmap_peak

        model = await self.get_model(body_part)
        if gradcam:
            heat, kind = model.gradcam(image, max_side=HEATMAP_SIDE), "Grad-CAM"
        else:  # on this replica's event loop, like classify: one model call at a time
            heat, kind = model.heatmap(image, max_side=HEATMAP_SIDE), "fracture map" if model.localizes else "Grad-CAM"
        px, py = heatmap_peak(heat)
        return {"heat": heat.astype(np.float16), "heatmap": kind, "peak_xy": [px, py]}

    async def load(self, body_part: str) -> str:
        return (await self.get_model(body_part)).name

