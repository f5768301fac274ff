"""The one manifest schema every dataset adapter produces.

A manifest is a pyarrow table (stored as Parquet): one row per image, whatever
the source layout. Training, evaluation, scoring and the Ray Data pipeline read
only manifests, never a dataset's own layout.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage

__all__ = [
    "MANIFEST_SCHEMA", "REJECT_SCHEMA", "BOX_TYPE", "LABEL_UNKNOWN",
    "MURA_BODY_PARTS", "FRACATLAS_BODY_PARTS",
    "IndexResult", "make_manifest", "make_rejects", "write_manifest", "read_manifest", "summarize", "split_by_study",
    "require_hardware_labels",
]

LABEL_UNKNOWN = -1

MURA_BODY_PARTS = ("elbow", "finger", "forearm", "hand", "humerus", "shoulder", "wrist")
FRACATLAS_BODY_PARTS = ("hand", "leg", "hip", "shoulder", "mixed")

BOX_TYPE = pa.struct([
    ("class_id", pa.int16()),
    ("x_center", pa.float32()),   # YOLO format: normalised to [0, 1]
    ("y_center", pa.float32()),
    ("width", pa.float32()),
    ("height", pa.float32()),
])

MANIFEST_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),         # train / valid / test / unassigned
    pa.field("body_part", pa.string(), nullable=False),     # lower case, "unknown" if not known
    pa.field("patient_id", pa.string()),
    pa.field("study_id", pa.string()),
    pa.field("image_label", pa.int8(), nullable=False),     # 1 abnormal/fractured, 0 normal, -1 unknown
    pa.field("study_label", pa.int8(), nullable=False),     # -1 where the source has none
    pa.field("view_frontal", pa.bool_()),
    pa.field("view_lateral", pa.bool_()),
    pa.field("view_oblique", pa.bool_()),
    pa.field("hardware", pa.bool_()),
    pa.field("multiscan", pa.bool_()),
    pa.field("fracture_count", pa.int16()),
    pa.field("boxes", pa.list_(BOX_TYPE)),
    # Fracture outlines (FracAtlas COCO polygons): each a flat [x0, y0, x1, y1, ...] list
    # normalised to [0, 1] like the boxes. Null where the source has none (MURA).
    pa.field("outlines", pa.list_(pa.list_(pa.float32()))),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("mode", pa.string()),
    pa.field("label_note", pa.string()),                    # why a label was decided as it was
])

REJECT_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string(), nullable=False),
])

_DEFAULTS: dict[str, Any] = {
    "split": "unassigned", "body_part": "unknown", "image_label": LABEL_UNKNOWN, "study_label": LABEL_UNKNOWN,
}


def make_manifest(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Build a manifest table from dict rows; missing optional columns are null."""
    rows = list(rows)
    columns = {}
    for field in MANIFEST_SCHEMA:
        default = _DEFAULTS.get(field.name)
        columns[field.name] = [row.get(field.name, default) if row.get(field.name) is not None else default
                               for row in rows]
    try:
        return pa.table(columns, schema=MANIFEST_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"Manifest rows do not fit the manifest schema: {exc}") from exc


def make_rejects(rows: Iterable[tuple[str, str, str]]) -> pa.Table:
    rows = list(rows)
    return pa.table({"uri": [r[0] for r in rows], "reason": [r[1] for r in rows], "detail": [r[2] for r in rows]},
                    schema=REJECT_SCHEMA)


@dataclasses.dataclass
class IndexResult:
    """What an adapter found: the manifest, the files it refused, and notes on labels."""

    manifest: pa.Table
    rejects: pa.Table = dataclasses.field(default_factory=lambda: make_rejects([]))
    notes: list[str] = dataclasses.field(default_factory=list)
    label_disagreements: int = 0


def write_table(table: pa.Table, uri: str, options: storage.StorageOptions | None = None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(uri, buf.getvalue(), options)


def read_table(uri: str, options: storage.StorageOptions | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri, options)))


write_manifest = write_table


def read_manifest(uri: str, options: storage.StorageOptions | None = None) -> pa.Table:
    table = read_table(uri, options)
    return conform(table)


def conform(table: pa.Table) -> pa.Table:
    """Check a table against the manifest schema; add optional columns that are missing."""
    missing_required = [f.name for f in MANIFEST_SCHEMA if not f.nullable and f.name not in table.column_names
                        and f.name not in _DEFAULTS and f.name != "dataset"]
    if missing_required:
        raise ValueError(f"Manifest is missing required column(s) {missing_required}. Got {table.column_names}")
    columns = []
    for field in MANIFEST_SCHEMA:
        if field.name in table.column_names:
            try:
                columns.append(table[field.name].cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(f"Manifest column {field.name!r} cannot be read as {field.type}: {exc}") from exc
        else:
            default = _DEFAULTS.get(field.name, "manifest" if field.name == "dataset" else None)
            columns.append(pa.array([default] * table.num_rows, type=field.type))
    return pa.table(columns, schema=MANIFEST_SCHEMA)


def summarize(manifest: pa.Table) -> list[dict[str, Any]]:
    """Counts per split x body part x image label, sorted."""
    grouped = manifest.group_by(["split", "body_part", "image_label"]).aggregate([("image_uri", "count")])
    rows = grouped.to_pylist()
    for row in rows:
        row["images"] = row.pop("image_uri_count")
    return sorted(rows, key=lambda r: (r["split"], r["body_part"], r["image_label"]))


def require_hardware_labels(manifest: pa.Table, dataset: str | None = None) -> None:
    """Refuse the hardware-free subset where no image says whether it shows hardware: the
    selection would keep every image and the option would do nothing. FracAtlas's release
    labels hardware; MURA's does not, nor do class folders or plain trees."""
    if manifest.num_rows == 0 or manifest["hardware"].null_count < manifest.num_rows:
        return
    names = dataset or ", ".join(sorted({str(d) for d in manifest["dataset"].to_pylist() if d})) or "this"
    raise ValueError(f"--exclude-hardware (the hardware-free subset) needs hardware labels, and none of the "
                     f"{manifest.num_rows} images ({names} layout) has one (only FracAtlas's release labels "
                     f"metal hardware; MURA's does not): train without --exclude-hardware, or index the collection "
                     f"as --dataset manifest with a boolean `hardware` column")


def filter_rows(manifest: pa.Table, *, split: str | None = None, exclude_hardware: bool = False,
                body_part: str | None = None) -> pa.Table:
    """Common selections: one split, one body part, or the hardware-free subset
    (MURA humerus paper: images with metal implants removed; refused where no image has a
    hardware label, see :func:`require_hardware_labels`)."""
    if exclude_hardware:
        require_hardware_labels(manifest)
    mask = None
    for condition in (
        pc.equal(manifest["split"], split) if split is not None else None,
        pc.equal(manifest["body_part"], body_part) if body_part is not None else None,
        pc.invert(pc.fill_null(manifest["hardware"], False)) if exclude_hardware else None,
    ):
        if condition is not None:
            mask = condition if mask is None else pc.and_(mask, condition)
    return manifest if mask is None else manifest.filter(mask)


def split_by_study(table: pa.Table, fraction: float, *, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(rest, held out): about ``fraction`` of the studies held out, never one study on
    both sides (an image without a study is its own study); deterministic per seed."""
    import hashlib

    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1). Got {fraction}")
    studies = [s or u for s, u in zip(table["study_id"].to_pylist(), table["image_uri"].to_pylist())]
    held = [int(hashlib.md5(f"{seed}|{s}".encode()).hexdigest(), 16) % 10_000 < fraction * 10_000 for s in studies]
    mask = pa.array(held, type=pa.bool_())
    return table.filter(pc.invert(mask)), table.filter(mask)
