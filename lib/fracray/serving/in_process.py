"""The "fused" layout: the router and the classifiers inside each ingress replica, called with a
deployment handle's calling convention, so the ingress's code is the same for both layouts."""

from __future__ import annotations

import asyncio
import inspect
import types
from typing import Any

from .args import ServeArgs
from .deployments import FractureClassifiers

__all__ = ["FusedClassifiers", "InProcess"]


class FusedClassifiers(FractureClassifiers.func_or_class):
    """The classifiers inside an ingress replica (layout "fused"): every body part's model
    loaded once on first use, without Serve's multiplexing (which is for a deployment of its own)."""

    def __init__(self, args: ServeArgs):
        super().__init__(args)
        self._models: dict[str, Any] = {}
        self._loading = asyncio.Lock()

    async def get_model(self, body_part: str):
        async with self._loading:
            if body_part not in self._models:
                self._models[body_part] = await asyncio.to_thread(self._load, body_part)
        return self._models[body_part]


class InProcess:
    """A model object called in this process with a deployment handle's calling convention
    (``target.method.remote(...)`` is awaited; ``options(...)`` changes nothing): the ingress
    code is the same for both layouts."""

    def __init__(self, target):
        self._target = target

    def options(self, **_):
        return self

    def __getattr__(self, name: str):
        method = getattr(self._target, name)

        async def call(*args, **kwargs):
            result = method(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return types.SimpleNamespace(remote=call)
