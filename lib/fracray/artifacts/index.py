"""The model index: which bundles make up the router -> classifier graph, and where they are.

``model_index.json`` names the router and each body part's fracture bundle. Bundles inside
the index's folder are stored relative to it, so a run folder can be moved or copied to S3
whole; :func:`read_model_index` hands back absolute paths or URIs, so the index can be given
to Ray workers anywhere. :func:`check_model_index` reads every bundle's metadata up front.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from typing import Any

from .. import storage
from ..storage import StorageOptions
from .bundle import META_FILE as BUNDLE_META_FILE, read_bundle_meta
from .describe import parse_threshold, resolve_threshold

__all__ = ["ModelIndex", "read_model_index", "write_model_index", "check_model_index", "check_operating_point",
           "resolve_bundle_path",
           "model_index_file", "MissingBundle", "MODEL_INDEX_FORMAT", "MODEL_INDEX_FILE",
           "VALIDATION_DISTRIBUTION_FILE", "validation_distribution_file"]

MODEL_INDEX_FORMAT = "fracray-model-index/1"
MODEL_INDEX_FILE = "model_index.json"
# Beside the index: the models' P(fracture) on their validation images (metrics.drift), the
# reference of the monitoring's drift statistic. Written by `fracray evaluate --output` and
# copied here by `fracray ship-model --evaluation`.
VALIDATION_DISTRIBUTION_FILE = "validation_distribution.json"


@dataclasses.dataclass
class ModelIndex:
    """Which bundles make up the router -> classifier graph."""

    router: str | None
    classifiers: dict[str, str]
    dataset: str = ""
    created: str = ""
    format: str = MODEL_INDEX_FORMAT


def model_index_file(uri: str) -> str:
    """The index file a ``--models`` value names (the file, or the folder holding model_index.json),
    local paths made absolute: the base that relative bundle paths in it resolve against."""
    uri = storage.normalize(uri)
    return uri if uri.endswith(".json") else storage.join(uri, MODEL_INDEX_FILE)


def validation_distribution_file(uri: str) -> str:
    """Where the validation distribution of the models a ``--models`` value names lies: beside
    its model_index.json."""
    return storage.join(_folder(model_index_file(uri)), VALIDATION_DISTRIBUTION_FILE)


def _folder(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if storage.is_remote(uri) else os.path.dirname(uri)


def _stored_path(bundle: str | None, folder: str) -> str | None:
    """A bundle under the index's folder as a path relative to it (so the run folder can be moved
    or copied to S3 whole); any other bundle as an absolute path or URI."""
    if bundle is None:
        return None
    bundle = storage.normalize(bundle)  # a cwd-relative path is what made old indexes break elsewhere
    if storage.is_remote(folder) or storage.is_remote(bundle):
        prefix = folder.rstrip("/") + "/"
        return bundle[len(prefix):].strip("/") if bundle.startswith(prefix) else bundle
    inside = os.path.commonpath([bundle, folder]) == folder and bundle != folder
    return os.path.relpath(bundle, folder).replace(os.sep, "/") if inside else bundle


def _under(folder: str, relative: str) -> str:
    """``folder`` + a relative path, with ``..`` and ``.`` folded (also in s3:// URIs)."""
    if not storage.is_remote(folder):
        return os.path.normpath(os.path.join(folder, relative))
    scheme, rest = folder.split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, relative))}"


def _has_bundle(uri: str, options: StorageOptions | None) -> bool:
    try:
        return storage.exists(storage.join(uri, BUNDLE_META_FILE), options)
    except storage.StorageError:
        return False


def resolve_bundle_path(path: str | None, folder: str, options: StorageOptions | None = None) -> str | None:
    """Where a bundle named in an index lives. Absolute paths and URIs are used as they are; a
    relative path is relative to the index's folder. Indexes written before that rule hold
    paths relative to the directory train_all ran in ("runs/latest/models/router"): such a
    path is used only when the index-relative one has no bundle and it has one - as given
    (the same working directory), or with its leading folders that repeat the index's own
    folder dropped (the run folder read from anywhere)."""
    if not path or storage.is_remote(path) or path.startswith("file://") or os.path.isabs(path):
        return storage.normalize(path) if path else path
    primary = _under(folder, path)
    parts = [p for p in posixpath.normpath(path.replace(os.sep, "/")).split("/") if p not in ("", ".")]
    folder_parts = [p for p in folder.replace(os.sep, "/").split("/") if p]
    legacy = []
    if not storage.is_remote(folder):
        try:  # a Ray worker's working directory may be gone (a finished job's runtime env)
            legacy.append(os.path.join(os.getcwd(), path))
        except FileNotFoundError:
            pass
    for k in range(min(len(parts) - 1, len(folder_parts)), 0, -1):
        if parts[:k] == folder_parts[-k:]:
            legacy.append(_under(folder, "/".join(parts[k:])))
            break
    # Stat the index-relative place only when an old-style reading has a bundle (one request on S3).
    found = [c for c in legacy if c != primary and _has_bundle(c, options)]
    if found and not _has_bundle(primary, options):
        return found[0]
    return primary


def write_model_index(uri: str, index: ModelIndex, options: StorageOptions | None = None) -> None:
    """Bundles inside the index's folder are stored relative to it (see :func:`resolve_bundle_path`)."""
    folder = _folder(model_index_file(uri))
    stored = dataclasses.replace(index, router=_stored_path(index.router, folder),
                                 classifiers={p: _stored_path(b, folder) for p, b in index.classifiers.items()})
    storage.write_bytes(uri, json.dumps(dataclasses.asdict(stored), indent=2).encode(), options)


def _read_raw_index(uri: str, options: StorageOptions | None) -> tuple[str, dict[str, Any]]:
    uri = model_index_file(uri)
    raw = json.loads(storage.read_bytes(uri, options))
    if raw.get("format") != MODEL_INDEX_FORMAT:
        raise ValueError(f"{uri}: not a fracray model index (format {raw.get('format')!r})")
    return uri, raw


def read_model_index(uri: str, options: StorageOptions | None = None) -> ModelIndex:
    """The index with every bundle as an absolute path or URI (relative ones resolved against
    the index's own folder, local or s3://), so it can be handed to Ray workers anywhere."""
    return _resolved_index(*_read_raw_index(uri, options), options)


def _resolved_index(uri: str, raw: dict[str, Any], options: StorageOptions | None) -> ModelIndex:
    folder = _folder(uri)
    fields = {f.name for f in dataclasses.fields(ModelIndex)}
    index = ModelIndex(**{k: v for k, v in raw.items() if k in fields})
    index.router = resolve_bundle_path(index.router, folder, options)
    index.classifiers = {p: resolve_bundle_path(b, folder, options) for p, b in index.classifiers.items()}
    return index


class MissingBundle(FileNotFoundError):
    """A model index names a bundle that is not there."""


def check_model_index(uri: str, options: StorageOptions | None = None) -> ModelIndex:
    """Read the index and every bundle's metadata: commands call this before starting Ray or
    writing anything, so a moved or half-copied run fails at once with what is missing, not
    inside a Ray actor minutes later."""
    file, raw = _read_raw_index(uri, options)
    index = _resolved_index(file, raw, options)
    named = {"router": (raw.get("router"), index.router)} if index.router else {}
    named |= {f"{part} classifier": (raw["classifiers"][part], b) for part, b in index.classifiers.items()}
    if not index.classifiers:
        raise ValueError(f"Model index {file} names no fracture classifiers; retrain or fix the index")
    for role, (stored, bundle) in named.items():
        try:
            read_bundle_meta(bundle, options)
        except FileNotFoundError as exc:
            how = f" (stored as {stored!r}, resolved against the index's folder)" if stored != bundle else ""
            raise MissingBundle(f"Model index {file} names the {role} bundle {bundle}{how}, but no "
                                f"{BUNDLE_META_FILE} is readable there ({exc.__cause__ or exc}). Copy the whole "
                                f"run folder (model_index.json with its models/), or fix the path in the index"
                                ) from None
    return index


def check_operating_point(uri: str, operating_point: str | float | None, options: StorageOptions | None = None) -> None:
    """An operating point every fracture model of the index has: serving, scoring and evaluation
    call this where they start, so an unknown name fails once with what the models offer, not in
    every request or actor. The models' own threshold (None, "", "default") and numbers need no
    model to check (a number outside [0, 1] is refused here too)."""
    if operating_point in (None, "", "default") or parse_threshold(str(operating_point)) is not None:
        return
    for part, bundle in read_model_index(uri, options).classifiers.items():
        try:
            resolve_threshold(read_bundle_meta(bundle, options), operating_point)
        except ValueError as exc:
            raise ValueError(f"operating_point {operating_point!r} for the {part!r} model: {exc}") from None
