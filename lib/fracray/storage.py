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
import errno
import functools
import os
import stat
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
    "walk_files",
    "Listing",
    "printable_path",
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


@dataclasses.dataclass(frozen=True)
class Listing:
    """What a walk of a folder found: ``files``, one URI per real file (sorted), and ``rejects``,
    (URI, reason, detail) for every other entry that is not a folder (sorted by URI)."""

    files: list[str]
    rejects: list[tuple[str, str, str]]


def list_files(uri: str, options: StorageOptions | None = None, *, recursive: bool = True) -> list[str]:
    """All files under a directory URI, as URIs, sorted (deterministic order). For a DICOMweb
    URI (a query, a study, a series): every instance it names (QIDO-RS). A local folder is walked
    as :func:`walk_files` does (each real file once); what that refuses is left out here."""
    return walk_files(uri, options, recursive=recursive).files


def walk_files(uri: str, options: StorageOptions | None = None, *, recursive: bool = True) -> Listing:
    """Every file under a directory URI once, and every entry that is not one with a reason.

    A local folder is walked once: symbolic links are followed, at most once per real file or
    folder (the same ``(st_dev, st_ino)`` reached again, through a link or a hard link, is a
    ``duplicate_link``/``duplicate_file`` reject naming the path it is listed as; a file's own path
    is preferred to a link's); a link back into a folder that contains it is a ``symlink_loop``,
    as is a link that resolves to itself; a link to nothing is a ``dangling_symlink``; FIFOs,
    sockets and devices are ``special_file`` (never opened: reading a FIFO blocks); a file whose
    name is not UTF-8 is ``undecodable_name`` (URIs are UTF-8 strings everywhere after this: its
    reject shows the bytes as ``\\xNN``); a folder that cannot be read is ``unreadable``.
    Object stores and DICOMweb have no links or special files: their listing has no rejects."""
    if dicomweb.is_dicomweb(uri):
        try:
            return Listing(dicomweb.list_instances(uri), [])
        except dicomweb.DicomWebUnavailable as exc:
            raise StorageUnavailable(str(exc)) from exc
        except (dicomweb.DicomWebError, ValueError) as exc:
            raise StorageError(f"Could not list {uri}: {exc}") from exc
    fs, path = resolve(uri, options)
    if fs is _LOCAL:
        return _walk_local(uri, path, recursive)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except FileNotFoundError as exc:
        raise StorageError(f"Not found: {uri}") from exc
    except OSError as exc:
        raise StorageError(f"Could not list {uri}: {exc}") from exc
    return Listing(sorted(_to_uri(uri, info.path) for info in infos if info.type == pafs.FileType.File), [])


def printable_path(path: str) -> str:
    """``path`` as valid UTF-8: the bytes of a name that is not UTF-8 (held by Python as lone
    surrogates) written as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _special_kind(mode: int) -> str:
    return next((name for test, name in _SPECIAL_KINDS if test(mode)), f"not a regular file (mode {mode:o})")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk_local(uri: str, root: str, recursive: bool) -> Listing:
    """walk_files for a local folder (``root``: an absolute path)."""
    try:
        root_st = os.stat(root)
    except FileNotFoundError as exc:
        raise StorageError(f"Not found: {uri}") from exc
    except OSError as exc:
        raise StorageError(f"Could not list {uri}: {exc}") from exc
    if not stat.S_ISDIR(root_st.st_mode):
        raise StorageError(f"Could not list {uri}: not a directory")

    folders: dict[tuple[int, int], str] = {(root_st.st_dev, root_st.st_ino): root}  # walked, by identity
    found: dict[tuple[int, int], str] = {}  # real file -> the path it is listed as
    rejects: list[tuple[str, str, str]] = []

    def reject(path: str, reason: str, detail: str) -> None:
        rejects.append((printable_path(path), reason, detail))

    def scan(folder: str, files: list[tuple[str, tuple[int, int]]], links: list[str]) -> None:
        """Entries below ``folder`` without following links: folders walked, files and links collected."""
        pending = [folder]
        while pending:
            current = pending.pop()
            try:
                with os.scandir(current) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                if current == root:
                    raise StorageError(f"Could not list {uri}: {exc}") from exc
                reject(current, "unreadable", f"folder could not be read: {exc.strerror or exc}")
                continue
            for entry in entries:
                try:
                    if entry.is_symlink():
                        links.append(entry.path)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    reject(entry.path, "unreadable", f"could not stat: {exc.strerror or exc}")
                    continue
                key = (st.st_dev, st.st_ino)
                if stat.S_ISDIR(st.st_mode):
                    if not recursive:
                        continue
                    if key in folders:  # a bind mount of a folder already walked
                        reject(entry.path, "duplicate_folder", f"the same folder as {printable_path(folders[key])}; "
                                                               f"its files are listed from there")
                        continue
                    folders[key] = entry.path
                    pending.append(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    files.append((entry.path, key))
                else:
                    reject(entry.path, "special_file", f"{_special_kind(st.st_mode)}, not a regular file")

    def accept(files: list[tuple[str, tuple[int, int]]], how: str) -> None:
        for path, key in sorted(files):
            if key in found:
                reject(path, how, f"the same file as {printable_path(found[key])}, which is listed")
            else:
                found[key] = path

    real: list[tuple[str, tuple[int, int]]] = []
    links: list[str] = []
    scan(root, real, links)
    accept(real, "duplicate_file")  # hard links: the first path (in sorted order) is listed
    # Links, in rounds (those found through the links of one round make the next), each round in
    # sorted order: a file's own path wins over a link to it, and the listing does not depend on
    # the order the file system returns entries in.
    while links:
        reached: list[tuple[str, tuple[int, int]]] = []
        next_links: list[str] = []
        for link in sorted(links):
            try:
                target = os.readlink(link)
            except OSError:
                target = "?"
            try:
                st = os.stat(link)
            except FileNotFoundError:
                reject(link, "dangling_symlink", f"symbolic link to {printable_path(target)!r}, which does not exist")
                continue
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    reject(link, "symlink_loop", f"symbolic link to {printable_path(target)!r}: the links "
                                                 f"resolve to themselves (a loop)")
                else:
                    reject(link, "unreadable", f"symbolic link to {printable_path(target)!r} could not be "
                                               f"followed: {exc.strerror or exc}")
                continue
            key = (st.st_dev, st.st_ino)
            if stat.S_ISDIR(st.st_mode):
                if not recursive:
                    continue
                if key in folders:
                    real_target = os.path.realpath(link)
                    if _inside(os.path.realpath(os.path.dirname(link)), real_target):
                        reject(link, "symlink_loop", f"symbolic link to {printable_path(target)!r}, a folder that "
                                                     f"contains the link (a loop); not followed")
                    else:
                        reject(link, "duplicate_link", f"symbolic link to a folder already listed as "
                                                       f"{printable_path(folders[key])}; not followed")
                    continue
                folders[key] = link
                scan(link, reached, next_links)
            elif stat.S_ISREG(st.st_mode):
                reached.append((link, key))
            else:
                reject(link, "special_file", f"symbolic link to {_special_kind(st.st_mode)}, not a regular file")
        accept(reached, "duplicate_link")
        links = next_links

    files = []
    for path in found.values():
        if _is_utf8(path):
            files.append(path)
        else:
            reject(path, "undecodable_name", "the file's name is not UTF-8 (its bytes are shown as \\xNN); "
                                             "rename it to score it")
    return Listing(sorted(files), sorted(rejects))


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

