"""Dataset adapters: a collection in its own layout -> one manifest.

Layouts: MURA v1.1 and FracAtlas exactly as released, class folders, a
user's manifest CSV/Parquet, and any plain folder tree of images (unlabelled). Each adapter accounts for every file it sees: a row
in the manifest, or a reject with a reason. Label conflicts between sources are
resolved by a stated rule and reported.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re
from typing import Callable

import numpy as np
import pyarrow as pa

from .. import dicomweb, storage
from ..storage import StorageOptions
from .manifest import MANIFEST_SCHEMA, IndexResult, LABEL_UNKNOWN, conform, make_manifest, make_rejects, read_table

__all__ = ["index_mura", "index_fracatlas", "index_folder", "index_manifest_file", "index_tree", "detect_layout",
           "ADAPTERS", "HARDWARE_LABELLED_LAYOUTS", "index_dataset",
           "fracatlas_split_for_nonfractured", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")
FRACATLAS_SPLIT_FRACTIONS = (0.80, 0.115, 0.085)  # FracAtlas paper: train / valid / test
DEFAULT_SPLIT_SEED = 42


def _read_text(uri: str, options: StorageOptions | None) -> str:
    return storage.read_bytes(uri, options).decode("utf-8-sig")


def _csv_rows(text: str) -> list[list[str]]:
    return [row for row in csv.reader(io.StringIO(text)) if row and any(cell.strip() for cell in row)]


def _is_stray(name: str) -> str | None:
    base = posixpath.basename(name)
    if base.startswith("._"):
        return "AppleDouble resource fork (macOS metadata), not an image"
    if base.startswith(".") or base in ("Thumbs.db", "desktop.ini"):
        return "hidden/system file, not an image"
    return None


# ----------------------------------------------------------------------------- MURA

_MURA_PATH = re.compile(
    r"^(?P<root>.*?MURA-v1\.1)/(?P<split>train|valid)/XR_(?P<part>[A-Z]+)/(?P<patient>patient\d+)/"
    r"(?P<study>study\d+)_(?P<suffix>positive|negative)/(?P<image>[^/]+)$"
)


def _mura_base(data_uri: str, options: StorageOptions | None) -> str:
    """The folder that contains ``MURA-v1.1`` (the CSV paths are relative to it)."""
    if storage.exists(storage.join(data_uri, "MURA-v1.1", "train_image_paths.csv"), options) or \
            storage.exists(storage.join(data_uri, "MURA-v1.1", "valid_image_paths.csv"), options):
        return data_uri
    if storage.exists(storage.join(data_uri, "train_image_paths.csv"), options) or \
            storage.exists(storage.join(data_uri, "valid_image_paths.csv"), options):
        # Pointed at MURA-v1.1 itself: CSV paths are relative to its parent.
        stripped = data_uri.rstrip("/")
        parent = stripped.rsplit("/", 1)[0] if "/" in stripped else "."
        return parent if storage.is_remote(data_uri) else os.path.dirname(os.path.abspath(stripped))
    raise FileNotFoundError(
        f"No MURA-v1.1/{{train,valid}}_image_paths.csv under {data_uri}. Point --data at the folder that "
        f"contains MURA-v1.1 (as unpacked from the release) or at MURA-v1.1 itself."
    )


def index_mura(data_uri: str, options: StorageOptions | None = None) -> IndexResult:
    data_uri = storage.normalize(data_uri)  # Ray workers have their own working directory
    base = _mura_base(data_uri, options)
    rows, rejects, notes = [], [], []
    disagreements = 0
    listed: set[str] = set()
    for split in ("train", "valid"):
        paths_uri = storage.join(base, "MURA-v1.1", f"{split}_image_paths.csv")
        studies_uri = storage.join(base, "MURA-v1.1", f"{split}_labeled_studies.csv")
        if not storage.exists(paths_uri, options):
            notes.append(f"{split}: no {split}_image_paths.csv; split skipped")
            continue
        study_labels: dict[str, int] = {}
        if storage.exists(studies_uri, options):
            for row in _csv_rows(_read_text(studies_uri, options)):
                if len(row) < 2 or row[1].strip() not in ("0", "1"):
                    notes.append(f"{split}_labeled_studies.csv: malformed line {row!r} ignored")
                    continue
                study_labels[row[0].strip().rstrip("/")] = int(row[1].strip())
        else:
            notes.append(f"{split}: no {split}_labeled_studies.csv; labels taken from study folder names")

        studies_with_images: set[str] = set()
        for (rel,) in (r[:1] for r in _csv_rows(_read_text(paths_uri, options))):
            rel = rel.strip()
            uri = storage.join(base, rel)
            listed.add(uri)
            stray = _is_stray(rel)
            if stray:
                rejects.append((uri, "stray_file", stray))
                continue
            m = _MURA_PATH.match(rel)
            if not m:
                rejects.append((uri, "unrecognised_path", f"path does not follow MURA's layout: {rel}"))
                continue
            study_dir = rel.rsplit("/", 1)[0]
            studies_with_images.add(study_dir)
            folder_label = 1 if m["suffix"] == "positive" else 0
            label, note = study_labels.get(study_dir), None
            if label is None:
                label = folder_label
                note = "study not in labeled_studies.csv; label from folder suffix"
            elif label != folder_label:
                disagreements += 1
                note = f"labeled_studies.csv says {label}, folder says {m['suffix']}; the CSV (official label) wins"
            rows.append({
                "image_uri": uri, "dataset": "mura", "split": split, "body_part": m["part"].lower(),
                "patient_id": m["patient"], "study_id": study_dir, "image_label": label, "study_label": label,
                "label_note": note,
            })
        orphan = set(study_labels) - studies_with_images
        if orphan:
            notes.append(f"{split}: {len(orphan)} labelled studies have no images listed (e.g. {sorted(orphan)[0]})")

    # Files on disk the CSVs do not list (resource forks, .DS_Store, extra images),
    # and listed files that are not on disk.
    existing: set[str] = set()
    refused: set[str] = set()  # by the walk (a link seen before, a FIFO, ...): a row each already
    for split in ("train", "valid"):
        split_dir = storage.join(base, "MURA-v1.1", split)
        if storage.exists(split_dir, options):
            listing = storage.walk_files(split_dir, options)
            existing.update(listing.files)
            rejects.extend(listing.rejects)
            refused.update(r[0] for r in listing.rejects)
    for uri in sorted(existing - listed):
        reason = _is_stray(uri)
        rejects.append((uri, "stray_file" if reason else "unlisted_file",
                        reason or "not listed in the split's image_paths.csv; not indexed"))
    kept = []
    for row in rows:
        if row["image_uri"] in existing:
            kept.append(row)
        elif row["image_uri"] not in refused:
            rejects.append((row["image_uri"], "missing_file", "listed in image_paths.csv but not found"))
    if disagreements:
        notes.append(f"{disagreements} images: labeled_studies.csv and folder suffix disagree; the CSV label was used")
    return IndexResult(make_manifest(kept), make_rejects(rejects), notes, disagreements)


# ----------------------------------------------------------------------------- FracAtlas

def _fracatlas_root(data_uri: str, options: StorageOptions | None) -> str:
    for candidate in (storage.join(data_uri, "FracAtlas"), data_uri):
        if storage.exists(storage.join(candidate, "dataset.csv"), options):
            return candidate
    raise FileNotFoundError(
        f"No FracAtlas/dataset.csv under {data_uri}. Point --data at the folder that contains FracAtlas "
        f"(as unpacked from the release) or at FracAtlas itself."
    )


def fracatlas_split_for_nonfractured(image_ids: list[str], seed: int = DEFAULT_SPLIT_SEED,
                                     fractions: tuple[float, float, float] = FRACATLAS_SPLIT_FRACTIONS) -> dict[str, str]:
    """Split images 80 / 11.5 / 8.5 (train / valid / test) as in the FracAtlas paper.

    A seeded permutation of the sorted ids, cut at exact counts: the same ids
    and seed always give the same split, whatever order the files were listed in.
    """
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"Split fractions must sum to 1. Got {fractions}")
    ids = sorted(image_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train = round(fractions[0] * len(ids))
    n_valid = round(fractions[1] * len(ids))
    out = {}
    for rank, idx in enumerate(order):
        out[ids[idx]] = "train" if rank < n_train else "valid" if rank < n_train + n_valid else "test"
    return out


def _flag(value: str) -> bool | None:
    value = (value or "").strip()
    return None if value == "" else value not in ("0", "0.0", "false", "False")


def index_fracatlas(data_uri: str, options: StorageOptions | None = None, *, split_seed: int = DEFAULT_SPLIT_SEED) -> IndexResult:
    data_uri = storage.normalize(data_uri)  # Ray workers have their own working directory
    root = _fracatlas_root(data_uri, options)
    rows_csv = _csv_rows(_read_text(storage.join(root, "dataset.csv"), options))
    header = [h.strip() for h in rows_csv[0]]
    required = {"image_id", "hand", "leg", "hip", "shoulder", "mixed", "hardware", "fractured"}
    if not required <= set(header):
        raise ValueError(f"FracAtlas dataset.csv lacks columns {sorted(required - set(header))}. Got {header}")
    records = [dict(zip(header, (c.strip() for c in r))) for r in rows_csv[1:]]

    notes: list[str] = []
    rejects: list[tuple[str, str, str]] = []
    # Split files cover fractured images only.
    split_of: dict[str, str] = {}
    for split in ("train", "valid", "test"):
        uri = storage.join(root, "Utilities", "Fracture Split", f"{split}.csv")
        if not storage.exists(uri, options):
            notes.append(f"Fracture Split/{split}.csv is missing: fractured images it would list are split by the seeded policy")
            continue
        for r in _csv_rows(_read_text(uri, options))[1:]:
            split_of[r[0].strip()] = split

    # Where each image actually lies.
    location: dict[str, tuple[str, int]] = {}
    for folder, folder_label in (("Fractured", 1), ("Non_fractured", 0)):
        folder_uri = storage.join(root, "images", folder)
        if not storage.exists(folder_uri, options):
            notes.append(f"images/{folder} is missing")
            continue
        listing = storage.walk_files(folder_uri, options)
        rejects.extend(listing.rejects)
        for uri in listing.files:
            name = posixpath.basename(uri)
            stray = _is_stray(name)
            if stray:
                rejects.append((uri, "stray_file", stray))
            elif name.lower().endswith(IMAGE_SUFFIXES):
                location[name] = (uri, folder_label)
            else:
                rejects.append((uri, "unrecognised_path", "not an image file name"))

    boxes_dir = storage.join(root, "Annotations", "YOLO")
    has_boxes = storage.exists(boxes_dir, options)
    box_files = set(storage.list_files(boxes_dir, options)) if has_boxes else set()
    outlines_of = _read_coco_outlines(storage.join(root, "Annotations", "COCO JSON"), options, notes)

    rows, disagreements, seen = [], 0, set()
    unsplit: list[str] = []
    for rec in records:
        image_id = rec["image_id"]
        if image_id not in location:
            continue  # listed in dataset.csv but not present: held out or not downloaded
        seen.add(image_id)
        uri, folder_label = location[image_id]
        csv_label = 1 if _flag(rec.get("fractured")) else 0
        count = int(float(rec["fracture_count"])) if rec.get("fracture_count", "") != "" else None
        votes = [folder_label, csv_label] + ([1 if count > 0 else 0] if count is not None else [])
        label = 1 if sum(votes) * 2 > len(votes) else 0
        note = None
        if len(set(votes)) > 1:
            disagreements += 1
            note = (f"folder={'Fractured' if folder_label else 'Non_fractured'}, dataset.csv fractured={csv_label}, "
                    f"fracture_count={count}: majority of the three gives label {label}")
        parts = [p for p in ("hand", "leg", "hip", "shoulder") if _flag(rec.get(p))]
        body_part = parts[0] if len(parts) == 1 and not _flag(rec.get("mixed")) else \
            "mixed" if parts or _flag(rec.get("mixed")) else "unknown"
        stem = image_id.rsplit(".", 1)[0]
        boxes = None
        box_uri = storage.join(boxes_dir, stem + ".txt")
        if box_uri in box_files:
            boxes = _parse_yolo(_read_text(box_uri, options), box_uri, notes)
        split = split_of.get(image_id)
        if label == 1 and split is None:
            unsplit.append(image_id)
        rows.append({
            "image_uri": uri, "dataset": "fracatlas", "split": split, "body_part": body_part,
            "patient_id": None, "study_id": stem, "image_label": label, "study_label": LABEL_UNKNOWN,
            "view_frontal": _flag(rec.get("frontal")), "view_lateral": _flag(rec.get("lateral")),
            "view_oblique": _flag(rec.get("oblique")), "hardware": _flag(rec.get("hardware")),
            "multiscan": _flag(rec.get("multiscan")), "fracture_count": count, "boxes": boxes,
            "outlines": outlines_of.get(image_id), "label_note": note,
        })
    for name, (uri, _) in sorted(location.items()):
        if name not in seen:
            rejects.append((uri, "unlisted_file", "image file has no row in dataset.csv; not indexed"))

    # Non-fractured images (and fractured ones no split file covers) get the paper's 80/11.5/8.5 split.
    policy_ids = [r["study_id"] for r in rows if r["split"] is None]
    policy = fracatlas_split_for_nonfractured(policy_ids, split_seed)
    for r in rows:
        if r["split"] is None:
            r["split"] = policy[r["study_id"]]
    if unsplit:
        notes.append(f"{len(unsplit)} fractured images are in no split file; split by the seeded 80/11.5/8.5 policy")
    if disagreements:
        notes.append(f"{disagreements} images: folder, dataset.csv 'fractured' and fracture_count disagree; "
                     f"the majority of the three was used")
    missing = len(records) - len(seen)
    if missing:
        notes.append(f"{missing} dataset.csv rows have no image file here (held out or not downloaded)")
    return IndexResult(make_manifest(rows), make_rejects(rejects), notes, disagreements)


def _read_coco_outlines(folder: str, options: StorageOptions | None, notes: list[str]) -> dict[str, list[list[float]]]:
    """file name -> fracture polygons normalised to [0, 1], from the release's COCO file(s).

    The release stores each polygon list as a JSON string; COCO tools write a plain
    list: both are read. A file that cannot be read is a note, not a failure (the
    boxes still localise the fracture)."""
    import json

    if not storage.exists(folder, options):
        return {}
    out: dict[str, list[list[float]]] = {}
    for uri in storage.list_files(folder, options):
        if not uri.lower().endswith(".json"):
            continue
        try:
            coco = json.loads(storage.read_bytes(uri, options))
            images = {im["id"]: im for im in coco["images"]}
            annotations = coco["annotations"]
        except (ValueError, KeyError, TypeError, storage.StorageError) as exc:
            notes.append(f"{uri}: not a readable COCO file ({type(exc).__name__}: {exc}); outlines not used")
            continue
        bad = 0
        for ann in annotations:
            image = images.get(ann.get("image_id"))
            segmentation = ann.get("segmentation")
            if isinstance(segmentation, str):
                try:
                    segmentation = json.loads(segmentation)
                except ValueError:
                    segmentation = None
            if not image or not isinstance(segmentation, list) or not image.get("width") or not image.get("height"):
                bad += 1
                continue
            w, h = float(image["width"]), float(image["height"])
            for polygon in segmentation:
                if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                    bad += 1
                    continue
                out.setdefault(image["file_name"], []).append(
                    [min(max(float(v) / (w if i % 2 == 0 else h), 0.0), 1.0) for i, v in enumerate(polygon)])
        if bad:
            notes.append(f"{uri}: {bad} annotations without a usable polygon were ignored")
    return out


def _parse_yolo(text: str, uri: str, notes: list[str]) -> list[dict]:
    boxes = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            cls, xc, yc, w, h = int(parts[0]), *map(float, parts[1:5])
        except (ValueError, IndexError):
            notes.append(f"{uri}: malformed YOLO line {line!r} ignored")
            continue
        boxes.append({"class_id": cls, "x_center": xc, "y_center": yc, "width": w, "height": h})
    return boxes


# ----------------------------------------------------------------------------- class folders

POSITIVE_NAMES = {"fractured", "fracture", "abnormal", "positive", "1", "yes"}
NEGATIVE_NAMES = {"not fractured", "not_fractured", "non_fractured", "nonfractured", "non-fractured",
                  "normal", "negative", "0", "no", "not-fractured"}
SPLIT_NAMES = {"train": "train", "training": "train", "valid": "valid", "val": "valid", "validation": "valid",
               "test": "test", "testing": "test"}


def _class_label(name: str, positive: set[str], negative: set[str]) -> int:
    key = name.strip().lower()
    if key in positive:
        return 1
    if key in negative:
        return 0
    raise ValueError(
        f"Class folder {name!r} is neither a positive ({sorted(positive)}) nor a negative ({sorted(negative)}) "
        f"class name. Rename it or pass --positive-class/--negative-class."
    )


def _files_under(data_uri: str, options: StorageOptions | None,
                 rejects: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """(URI, path relative to data_uri) of every file below it, each real file once; what the walk
    refuses (links seen before, loops, dangling links, FIFOs, names that are not UTF-8) is added to
    ``rejects`` with its reason. A tree with nothing in it at all is an error."""
    listing = storage.walk_files(data_uri, options)
    if not listing.files and not listing.rejects:
        raise FileNotFoundError(f"No files under {data_uri}")
    rejects.extend(listing.rejects)
    return [(uri, storage.relative_to(uri, data_uri)) for uri in listing.files]


def index_folder(data_uri: str, options: StorageOptions | None = None, *,
                 positive_classes: tuple[str, ...] = (), negative_classes: tuple[str, ...] = (),
                 split_seed: int = DEFAULT_SPLIT_SEED) -> IndexResult:
    """``<split>/<class>/*.png|jpg`` or ``<class>/*`` (then split 80/11.5/8.5 by seed)."""
    data_uri = storage.normalize(data_uri)
    positive = POSITIVE_NAMES | {c.lower() for c in positive_classes}
    negative = NEGATIVE_NAMES | {c.lower() for c in negative_classes}
    rows, rejects = [], []
    for uri, rel in _files_under(data_uri, options, rejects):
        parts = rel.split("/")
        stray = _is_stray(parts[-1])
        if stray:
            rejects.append((uri, "stray_file", stray))
            continue
        if not parts[-1].lower().endswith(IMAGE_SUFFIXES):
            rejects.append((uri, "unrecognised_path", f"not an image file name ({rel})"))
            continue
        if len(parts) >= 3 and parts[0].lower() in SPLIT_NAMES:
            split, cls = SPLIT_NAMES[parts[0].lower()], parts[1]
        elif len(parts) >= 2:
            split, cls = None, parts[0]
        else:
            rejects.append((uri, "unrecognised_path", "image lies outside any class folder"))
            continue
        label = _class_label(cls, positive, negative)
        stem = rel.rsplit(".", 1)[0]
        rows.append({"image_uri": uri, "dataset": "folder", "split": split, "study_id": stem,
                     "image_label": label, "label_note": f"class folder {cls!r}"})
    unsplit = [r["study_id"] for r in rows if r["split"] is None]
    notes = []
    if unsplit:
        policy = fracatlas_split_for_nonfractured(unsplit, split_seed)
        for r in rows:
            if r["split"] is None:
                r["split"] = policy[r["study_id"]]
        notes.append(f"{len(unsplit)} images had no split folder; split 80/11.5/8.5 with seed {split_seed}")
    return IndexResult(make_manifest(rows), make_rejects(rejects), notes)


# ----------------------------------------------------------------------------- user manifests

_URI_ALIASES = ("image_uri", "uri", "path", "image_path", "file", "filename")
_LABEL_ALIASES = ("image_label", "label", "fractured", "abnormal")


def index_manifest_file(data_uri: str, options: StorageOptions | None = None) -> IndexResult:
    """A user's CSV or Parquet listing images. Needs a URI/path column; relative paths
    are taken relative to the manifest's folder. Other manifest columns are optional."""
    data_uri = storage.normalize(data_uri)
    if data_uri.lower().endswith(".parquet"):
        table = read_table(data_uri, options)
    else:
        from pyarrow import csv as pacsv
        table = pacsv.read_csv(io.BytesIO(storage.read_bytes(data_uri, options)))
    names = {n.lower(): n for n in table.column_names}
    uri_col = next((names[a] for a in _URI_ALIASES if a in names), None)
    if uri_col is None:
        raise ValueError(f"Manifest {data_uri} needs an image column named one of {_URI_ALIASES}. Got {table.column_names}")
    renames = {uri_col: "image_uri"}
    label_col = next((names[a] for a in _LABEL_ALIASES if a in names), None)
    if label_col:
        renames[label_col] = "image_label"
    table = table.rename_columns([renames.get(c, c) for c in table.column_names])
    folder = data_uri.rsplit("/", 1)[0] if "/" in data_uri else "."
    uris = [u if (storage.is_remote(u) or u.startswith("/")) else storage.join(folder, u)
            for u in table["image_uri"].to_pylist()]
    table = table.set_column(table.column_names.index("image_uri"), "image_uri", pa.array(uris, pa.string()))
    if "image_label" in table.column_names and not pa.types.is_integer(table["image_label"].type):
        table = table.set_column(table.column_names.index("image_label"), "image_label",
                                 pa.array([_label_value(v) for v in table["image_label"].to_pylist()], pa.int8()))
    if "body_part" in table.column_names:
        table = table.set_column(table.column_names.index("body_part"), "body_part",
                                 pa.array([(v or "unknown").strip().lower() for v in table["body_part"].to_pylist()]))
    keep = [c for c in table.column_names if c in set(MANIFEST_SCHEMA.names)]
    ignored = sorted(set(table.column_names) - set(keep))
    manifest = conform(table.select(keep))
    notes = [f"columns not in the manifest schema were ignored: {ignored}"] if ignored else []
    return IndexResult(manifest, make_rejects([]), notes)


def _label_value(value) -> int:
    if value is None:
        return LABEL_UNKNOWN
    key = str(value).strip().lower()
    if key in POSITIVE_NAMES or key in ("true", "1.0"):
        return 1
    if key in NEGATIVE_NAMES or key in ("false", "0.0"):
        return 0
    if key in ("", "-1", "unknown", "nan"):
        return LABEL_UNKNOWN
    raise ValueError(f"Cannot read {value!r} as a label (expected 0/1, true/false or a class name)")


# ----------------------------------------------------------------------------- plain archives

def index_tree(data_uri: str, options: StorageOptions | None = None) -> IndexResult:
    """Any folder tree of radiographs, unlabelled (an archive to score).

    Image files by suffix, plus files with no suffix (DICOM exports often have none;
    the decoder decides). A study is the folder an image lies in (PACS exports keep
    one study per folder); images at the top level are their own study.
    """
    data_uri = storage.normalize(data_uri)
    rows, rejects = [], []
    for uri, rel in _files_under(data_uri, options, rejects):
        name = rel.rsplit("/", 1)[-1]
        stray = _is_stray(name)
        if stray:
            rejects.append((uri, "stray_file", stray))
        elif dicomweb.is_dicomweb(uri):
            rows.append({"image_uri": uri, "dataset": "dicomweb", "study_id": dicomweb.parse(uri).study,
                         "label_note": "unlabelled PACS query"})
        elif name.lower().endswith(IMAGE_SUFFIXES) or "." not in name:
            folder = rel.rsplit("/", 1)[0] if "/" in rel else rel.rsplit(".", 1)[0]
            rows.append({"image_uri": uri, "dataset": "tree", "study_id": folder, "label_note": "unlabelled archive"})
        else:
            rejects.append((uri, "unrecognised_path", f"not an image file name ({rel})"))
    return IndexResult(make_manifest(rows), make_rejects(rejects), [])


def detect_layout(data_uri: str, options: StorageOptions | None = None) -> str:
    """mura, fracatlas, manifest or tree, from what lies at ``data_uri``."""
    if data_uri.lower().endswith((".csv", ".parquet")):
        return "manifest"
    if dicomweb.is_dicomweb(data_uri):  # a PACS: its instances, one study per StudyInstanceUID
        return "tree"
    for layout, probe in (("mura", _mura_base), ("fracatlas", _fracatlas_root)):
        try:
            probe(data_uri, options)
            return layout
        except FileNotFoundError:
            pass
    return "tree"


ADAPTERS: dict[str, Callable[..., IndexResult]] = {
    "mura": index_mura,
    "fracatlas": index_fracatlas,
    "folder": index_folder,
    "manifest": index_manifest_file,
    "tree": index_tree,
}
# Layouts whose manifest can say which images show metal hardware (train_all --exclude-hardware):
# FracAtlas's release labels it, a user's manifest may have a `hardware` column; MURA's release,
# class folders and plain trees never do.
HARDWARE_LABELLED_LAYOUTS = ("fracatlas", "manifest")


def index_dataset(kind: str, data_uri: str, options: StorageOptions | None = None, **kwargs) -> IndexResult:
    if kind == "auto":
        kind = detect_layout(data_uri, options)
    try:
        adapter = ADAPTERS[kind]
    except KeyError:
        raise ValueError(f"Unknown dataset layout {kind!r}; expected one of {sorted(ADAPTERS)}") from None
    return adapter(data_uri, options, **kwargs)

