"""One storage layer for local paths, ``s3://`` and anything fsspec reaches.

Everything in the product addresses data by URI string. This module turns a URI
into a ``pyarrow.fs.FileSystem`` plus a path, so that our own reads/writes and
Ray Data (which takes the same pyarrow filesystems) agree on where bytes live.

S3 credentials, region and endpoint come from the standard AWS environment and
config files (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_REGION``,
``AWS_ENDPOINT_URL[_S3]``...); ``StorageOptions.endpoint_url`` overrides the
endpoint for S3-compatible stores (MinIO, Ceph, moto, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import uuid
import posixpath
from urllib.parse import urlparse

import pyarrow.fs as pafs

from . import dicomweb

__all__ = [
    "StorageOptions",
    "StorageError",
    "StorageUnavailable",
    "resolve",
    "join",
    "is_remote",
    "read_bytes",
    "read_prefix",
    "write_bytes",
    "exists",
    "list_files",
    "ensure_dir",
    "is_dir",
    "relative_to",
    "normalize",
]


class StorageError(RuntimeError):
    """A URI could not be read or written; the message says which and why."""


class StorageUnavailable(StorageError):
    """The service holding a URI (a PACS) did not answer after retries. Not a fault of the file:
    a job stops on it, keeping finished work, instead of rejecting every image it cannot reach."""


@dataclasses.dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Hashable: used as a per-process cache key.

    endpoint_url: S3-compatible endpoint, e.g. ``http://127.0.0.1:9000``. Defaults
        to ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` from the environment.
    region: S3 region; defaults to ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / config.
    anonymous: read public buckets without credentials.
    """

    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False

    @classmethod
    def from_env(cls, endpoint_url: str | None = None, region: str | None = None,
                 anonymous: bool = False) -> "StorageOptions":
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return cls(endpoint_url=endpoint or None, region=region or None, anonymous=anonymous)

    def resolved(self) -> "StorageOptions":
        """Fill unset fields from the environment (done once, in the driver, so
        that Ray workers on other nodes see the same settings)."""
        return StorageOptions.from_env(self.endpoint_url, self.region, self.anonymous)


def _scheme(uri: str) -> str:
    parsed = urlparse(uri)
    # Windows drive letters ("C:\\...") parse as a one-letter scheme.
    if len(parsed.scheme) <= 1:
        return "file"
    return parsed.scheme.lower()


def is_remote(uri: str) -> bool:
    return _scheme(uri) not in ("file", "local")


@functools.lru_cache(maxsize=32)
def _s3_filesystem(options: StorageOptions) -> pafs.FileSystem:
    kwargs: dict = {}
    if options.endpoint_url:
        parsed = urlparse(options.endpoint_url)
        if parsed.scheme in ("http", "https"):
            kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
            kwargs["scheme"] = parsed.scheme
        else:
            kwargs["endpoint_override"] = options.endpoint_url
    if options.region:
        kwargs["region"] = options.region
    if options.anonymous:
        kwargs["anonymous"] = True
    try:
        return pafs.S3FileSystem(**kwargs)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError with the cause
        raise StorageError(f"Could not configure S3 access ({kwargs}): {exc}") from exc


@functools.lru_cache(maxsize=32)
def _fsspec_filesystem(scheme: str) -> pafs.FileSystem:
    try:
        import fsspec
        fs = fsspec.filesystem(scheme)
    except Exception as exc:
        raise StorageError(
            f"No filesystem for scheme {scheme!r}: {exc}. Install the fsspec "
            f"implementation for it (e.g. gcsfs for gs://, adlfs for az://)."
        ) from exc
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


_LOCAL = pafs.LocalFileSystem()


def resolve(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a URI; the path is what that filesystem expects."""
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"Expected a non-empty URI string. Got {uri!r}")
    scheme = _scheme(uri)
    if scheme in ("file", "local"):
        return _LOCAL, normalize(uri)
    if scheme in ("s3", "s3a"):
        # Only S3 needs the environment read (per-image reads of local files skip it).
        options = (options or StorageOptions()).resolved()
        parsed = urlparse(uri)
        return _s3_filesystem(options), (parsed.netloc + parsed.path).rstrip("/") or parsed.netloc
    parsed = urlparse(uri)
    return _fsspec_filesystem(scheme), parsed.netloc + parsed.path


def normalize(uri: str) -> str:
    """Local paths become absolute (Ray workers do not share the driver's working
    directory, so a manifest must never hold a relative path); other URIs are unchanged."""
    if is_remote(uri):
        return uri
    path = urlparse(uri).path if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI (``/`` for remote URIs, os.path for local)."""
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *[p.strip("/") for p in parts])
    return os.path.join(base, *parts)


def _to_uri(template: str, fs_path: str) -> str:
    """Turn a filesystem path back into a URI of the same kind as ``template``."""
    scheme = _scheme(template)
    if scheme in ("file", "local"):
        return fs_path
    return f"{scheme}://{fs_path.lstrip('/')}"


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    if dicomweb.is_dicomweb(uri):  # a PACS instance: WADO-RS
        try:
            return dicomweb.read_instance(uri)
        except dicomweb.DicomWebUnavailable as exc:
            raise StorageUnavailable(str(exc)) from exc
        except (dicomweb.DicomWebError, ValueError) as exc:
            raise StorageError(f"Could not read {uri}: {exc}") from exc
    fs, path = resolve(uri, options)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise StorageError(f"Not found: {uri}") from exc
    except OSError as exc:
        raise StorageError(f"Could not read {uri}: {exc}") from exc


def read_prefix(uri: str, nbytes: int, options: StorageOptions | None = None) -> tuple[bytes, int]:
    """Read the first ``nbytes`` of a file (a ranged GET on S3). Returns (data, total size)."""
    fs, path = resolve(uri, options)
    try:
        with fs.open_input_file(path) as f:
            size = f.size()
            return f.read(min(nbytes, size)), size
    except FileNotFoundError as exc:
        raise StorageError(f"Not found: {uri}") from exc
    except OSError as exc:
        raise StorageError(f"Could not read {uri}: {exc}") from exc


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a whole object. Readers never see a partial file: local files are written
    beside the target and renamed over it; S3 objects appear only once complete."""
    fs, path = resolve(uri, options)
    try:
        if is_remote(uri):  # object stores have no folders; creating one leaves a marker object
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        fs.create_dir(os.path.dirname(path), recursive=True)
        partial = f"{path}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with fs.open_output_stream(partial) as f:
                f.write(data)
            fs.move(partial, path)
        finally:
            if fs.get_file_info(partial).type != pafs.FileType.NotFound:
                fs.delete_file(partial)
    except OSError as exc:
        raise StorageError(f"Could not write {uri}: {exc}") from exc


def ensure_dir(uri: str, options: StorageOptions | None = None) -> None:
    fs, path = resolve(uri, options)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as exc:
        raise StorageError(f"Could not create {uri}: {exc}") from exc


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    if dicomweb.is_dicomweb(uri):  # a query, study, series or instance exists if it names an instance
        return bool(list_files(uri, options))
    fs, path = resolve(uri, options)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise StorageError(f"Could not stat {uri}: {exc}") from exc


def is_dir(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = resolve(uri, options)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(uri: str, options: StorageOptions | None = None, *, recursive: bool = True) -> list[str]:
    """All files under a directory URI, as URIs, sorted (deterministic order). For a DICOMweb
    URI (a query, a study, a series): every instance it names (QIDO-RS)."""
    if dicomweb.is_dicomweb(uri):
        try:
            return dicomweb.list_instances(uri)
        except dicomweb.DicomWebUnavailable as exc:
            raise StorageUnavailable(str(exc)) from exc
        except (dicomweb.DicomWebError, ValueError) as exc:
            raise StorageError(f"Could not list {uri}: {exc}") from exc
    fs, path = resolve(uri, options)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except FileNotFoundError as exc:
        raise StorageError(f"Not found: {uri}") from exc
    except OSError as exc:
        raise StorageError(f"Could not list {uri}: {exc}") from exc
    return sorted(_to_uri(uri, info.path) for info in infos if info.type == pafs.FileType.File)


def relative_to(uri: str, root: str) -> str:
    """The part of ``uri`` below ``root``, with ``/`` separators."""
    if dicomweb.is_dicomweb(root):  # below the service root (a query URI is no prefix of its instances)
        base = dicomweb.parse(root).uri_base.rstrip("/") + "/"
        if not uri.startswith(base):
            raise ValueError(f"{uri} is not in the DICOMweb service {base}")
        return uri[len(base):]
    if is_remote(root):
        base = root.rstrip("/") + "/"
        if not uri.startswith(base):
            raise ValueError(f"{uri} is not under {root}")
        return uri[len(base):]
    return os.path.relpath(uri, root).replace(os.sep, "/")

