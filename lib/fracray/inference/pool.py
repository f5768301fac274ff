"""The one Ray Data actor pool over a predictor, for evaluation and bulk scoring.

Each actor loads the bundles once (its constructor) and is then fed batches; the pool's size
and each actor's CPUs/GPUs follow the cluster unless the caller says otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["ActorPlan", "plan_actors", "map_predictor"]


@dataclasses.dataclass(frozen=True)
class ActorPlan:
    actors: int
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0


def plan_actors(concurrency: int | None = None, gpus_per_actor: float | None = None) -> ActorPlan:
    """How many predictor actors, and their GPUs, from the cluster's resources: one per GPU
    where there are GPUs, else one per CPU (each CPU actor reads, decodes and runs the model,
    so one per CPU keeps every core busy). ``concurrency`` and ``gpus_per_actor`` override."""
    import ray

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    gpus_per_actor = gpus_per_actor if gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if concurrency:
        actors = concurrency
    elif gpus_per_actor > 0:
        actors = max(1, int(gpus // gpus_per_actor))
    else:
        actors = max(1, int(resources.get("CPU", 1)))
    return ActorPlan(actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=1.0)


def map_predictor(ds: Any, actor_class: type, constructor_kwargs: dict[str, Any], *, batch_size: int,
                  plan: ActorPlan = ActorPlan(actors=1)) -> Any:
    """``ds`` (a Ray Dataset of manifest rows) through a pool of ``actor_class`` actors, in
    Arrow batches so nested columns (findings) stay lists; returns the lazy dataset."""
    import ray

    ds = ds.map_batches(actor_class, fn_constructor_kwargs=constructor_kwargs, batch_size=batch_size,
                        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=plan.actors),
                        num_gpus=plan.gpus_per_actor or None, num_cpus=plan.cpus_per_actor)
    return ds
