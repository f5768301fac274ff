"""Reading image headers only: width, height, mode (and DICOM body part) for a manifest.

A ranged read of the first bytes is enough for JPEG/PNG/DICOM headers, so probing a
million objects in S3 moves a few hundred MB, not the archive. Threads, not Ray:
the work is waiting on storage, and indexing should not need a cluster.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import warnings
from typing import Callable

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from .. import storage
import os

from ..imaging.decode import ImageRejected, RejectReason, decode_image, sniff_format
from ..storage import StorageOptions

__all__ = ["probe_header", "probe_manifest", "verify_images"]

PREFIX_BYTES = 256 * 1024


def _from_bytes(data: bytes):
    fmt = sniff_format(data)
    if fmt == "DICOM":
        import pydicom
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        if "Rows" not in ds:
            raise ValueError("DICOM header has no Rows/Columns")
        part = str(ds.get("BodyPartExamined", "") or "").strip().lower() or None
        return int(ds.Columns), int(ds.Rows), str(ds.get("PhotometricInterpretation", "")), part
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = Image.open(io.BytesIO(data))
    return img.size[0], img.size[1], img.mode, None


def probe_header(uri: str, options: StorageOptions | None = None):
    """Return (width, height, mode, body_part, reason, detail); reason is None when readable."""
    try:
        data, size = storage.read_prefix(uri, PREFIX_BYTES, options)
    except storage.StorageError as exc:
        return None, None, None, None, RejectReason.READ_ERROR.value, str(exc)
    if size == 0:
        return None, None, None, None, RejectReason.EMPTY_FILE.value, "the file is empty (0 bytes)"
    for attempt in range(2):
        try:
            w, h, mode, part = _from_bytes(data)
            return w, h, mode, part, None, None
        except (UnidentifiedImageError, ValueError, OSError, EOFError, SyntaxError, KeyError) as exc:
            if attempt == 0 and len(data) < size:
                data = storage.read_bytes(uri, options)  # header beyond the prefix (large EXIF, say)
                continue
            if isinstance(exc, UnidentifiedImageError):
                return None, None, None, None, RejectReason.NOT_AN_IMAGE.value, \
                    f"not a recognised image ({size:,} bytes, starts with {data[:8]!r})"
            return None, None, None, None, RejectReason.CORRUPT.value, f"unreadable header: {exc}"
    raise AssertionError("unreachable")


def probe_manifest(manifest: pa.Table, options: StorageOptions | None = None, *, workers: int = 32,
                   progress: Callable[[int, int], None] | None = None):
    """Fill width/height/mode (and unknown body parts from DICOM). Returns
    (manifest, rejects as (uri, reason, detail) tuples)."""
    uris = manifest["image_uri"].to_pylist()
    results = [None] * len(uris)
    with cf.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(probe_header, uri, options): i for i, uri in enumerate(uris)}
        for done, future in enumerate(cf.as_completed(futures), 1):
            results[futures[future]] = future.result()
            if progress and (done % 500 == 0 or done == len(uris)):
                progress(done, len(uris))
    widths = [r[0] for r in results]
    heights = [r[1] for r in results]
    modes = [r[2] for r in results]
    parts = manifest["body_part"].to_pylist()
    parts = [r[3] if (p == "unknown" and r[3]) else p for p, r in zip(parts, results)]
    rejects = [(uri, r[4], r[5]) for uri, r in zip(uris, results) if r[4]]
    for name, values, typ in (("width", widths, pa.int32()), ("height", heights, pa.int32()),
                              ("mode", modes, pa.string()), ("body_part", parts, pa.string())):
        manifest = manifest.set_column(manifest.column_names.index(name), manifest.schema.field(name),
                                       pa.array(values, typ))
    return manifest, rejects


def _verify_one(uri: str, options: StorageOptions | None):
    try:
        # A small DCT draft still walks the whole entropy-coded stream, so truncation is found.
        decode_image(storage.read_bytes(uri, options), draft_size=(64, 64),
                     name=uri)
    except storage.StorageError as exc:
        return uri, RejectReason.READ_ERROR.value, str(exc)
    except ImageRejected as exc:
        return uri, exc.reason.value, exc.detail
    return None


def verify_images(uris: list[str], options: StorageOptions | None = None, *, workers: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> list[tuple[str, str, str]]:
    """Fully decode every image (Pillow releases the GIL while decoding, so threads use
    every core) and return (uri, reason, detail) for each that fails: truncated and
    corrupt files are found only this way, not from headers."""
    rejects = []
    with cf.ThreadPoolExecutor(workers or os.cpu_count() or 2) as pool:
        for done, result in enumerate(pool.map(lambda u: _verify_one(u, options), uris), 1):
            if result:
                rejects.append(result)
            if progress and (done % 500 == 0 or done == len(uris)):
                progress(done, len(uris))
    return rejects
