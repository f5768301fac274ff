"""How many replicas of each deployment, and what each reserves: the autoscaling defaults, and
the deployment options that the application's arguments (replicas, min_replicas, num_gpus, the
Ingress's admission limits, the layout) make of them."""

from __future__ import annotations

from typing import Any

from .args import ServeArgs

__all__ = ["AUTOSCALING", "deployment_options"]

# Two replicas of everything by default: a replica that dies (kill -9, OOM) costs a retry, not
# an outage, while Serve starts its replacement. ServeArgs.min_replicas=1 where memory is short.
AUTOSCALING = {
    "BodyPartRouter": {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 16},
    "FractureClassifiers": {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 8,
                            "target_ongoing_requests": 16},
    "Ingress": {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 32},
}


def deployment_options(args: ServeArgs) -> dict[str, dict[str, Any]]:
    """Each deployment's ``.options(...)`` for ``args``, by deployment name."""
    model_options: dict[str, Any] = {}
    if args.num_gpus is not None:
        model_options["ray_actor_options"] = {"num_cpus": 0.5, "num_gpus": args.num_gpus}
    ingress_options: dict[str, Any] = {}
    if args.max_ongoing_requests is not None:
        ingress_options["max_ongoing_requests"] = args.max_ongoing_requests
    if args.max_queued_requests is not None:
        ingress_options["max_queued_requests"] = args.max_queued_requests
    router_options, classifier_options = dict(model_options), dict(model_options)
    if args.num_gpus is not None:
        router_options["ray_actor_options"] = {"num_cpus": 0.2, "num_gpus": args.num_gpus}
    options = {"BodyPartRouter": router_options, "FractureClassifiers": classifier_options, "Ingress": ingress_options}
    if args.replicas is not None:
        for each in options.values():
            each.update(num_replicas=args.replicas, autoscaling_config=None)
    elif args.min_replicas != ServeArgs.model_fields["min_replicas"].default:
        for name, each in options.items():
            scaling = dict(AUTOSCALING[name], min_replicas=args.min_replicas, initial_replicas=args.min_replicas)
            scaling["max_replicas"] = max(scaling["max_replicas"], args.min_replicas)
            each["autoscaling_config"] = scaling
    if args.layout == "fused":
        # One deployment: each ingress replica holds the models, so it reserves what a model
        # replica would (a whole CPU: the engine runs one thread per reserved CPU), and a GPU if asked.
        ingress_options["ray_actor_options"] = {"num_cpus": 1, **({"num_gpus": args.num_gpus} if args.num_gpus else {})}
    return options
