"""The Ray Serve application's builder: HTTP ingress -> body-part router -> bone-specific classifiers.

    Ingress (ingress.py, FastAPI, /docs)   bounds and decodes uploads, auth, JSON errors, Grad-CAM PNGs
      -> BodyPartRouter (deployments.py)   the 7-class router, dynamic batching (@serve.batch)
      -> FractureClassifiers               every bone's model, Serve model multiplexing (model id =
                                           body part), dynamic batching across requests; findings
                                           (boxes from the fracture map) and overlay PNGs are made here

Built by ``build_app(args)`` (args.py: ServeArgs) from a model index URI; ``serve run
serving/config.yaml``, ``serve deploy serving/config.yaml`` and ``fracray serve`` use the same
builder. The deployments wrap the same ``BundleModel`` as batch scoring, so the two cannot disagree.
"""

from __future__ import annotations

from .. import storage
from ..artifacts.index import check_operating_point, read_model_index
from .args import ServeArgs
from .autoscaling import deployment_options
from .deployments import BodyPartRouter, FractureClassifiers
from .ingress import Ingress

__all__ = ["build_app"]


def build_app(args: ServeArgs = None):
    """The typed application builder: ``serve run fracray.serving.app:build_app models=...``
    or serving/config.yaml's ``import_path`` + ``args``. Serve validates the arguments with the
    annotated ServeArgs; a caller in Python may pass a dict (validated the same) or nothing."""
    args = ServeArgs.parse(args)
    if not storage.is_remote(args.models):
        args = args.model_copy(update={"models": storage.normalize(args.models)})  # replicas have other cwds
    from ..inference.predictor import check_precision

    # Fast precision for a bundle without a passed validation: refused here, not by every request
    # that reaches a replica (which loads its classifiers on demand and checks again).
    check_precision(args.models, args.storage_options, engine=args.engine, precision=args.precision,
                    device="cuda" if args.num_gpus else "cpu")
    check_operating_point(args.models, args.operating_point, args.storage_options)
    options = deployment_options(args)
    ingress = Ingress.options(**options["Ingress"])
    if args.layout == "fused":
        return ingress.bind(None, None, args)
    classifiers = FractureClassifiers.options(**options["FractureClassifiers"]).bind(args)
    if not _has_router(args):
        # Nothing to route with: the ingress names the one classifier itself (Ingress.__init__),
        # instead of replicas that would each load the index and hold a process for no model.
        return ingress.bind(None, classifiers, args)
    router = BodyPartRouter.options(**options["BodyPartRouter"]).bind(args)
    return ingress.bind(router, classifiers, args)


def _has_router(args: ServeArgs) -> bool:
    """Whether the model index names a router. An index that cannot be read yet (``serve build
    serving.graph:app`` with no model trained) keeps the full graph: its replicas then say why."""
    try:
        return read_model_index(args.models, args.storage_options).router is not None
    except (storage.StorageError, OSError):
        return True


# Serve converts a builder's arguments only when its parameter's annotation is the pydantic class
# itself (ray.serve._private.api.call_user_app_builder_with_args_if_necessary); this module's
# `from __future__ import annotations` leaves the string "ServeArgs" there, so set the class.
build_app.__annotations__["args"] = ServeArgs
