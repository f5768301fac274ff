"""Synthetic radiograph-like images in the MURA v1.1 and FracAtlas layouts.

Real MURA cannot be redistributed, and tests, demos and benchmarks need data in
exactly the released layouts. The generator draws plausible radiographs: body
part specific bones (cortex brighter than the medullary canal, epiphyses at the
joints), soft tissue, detector blur and noise, optional metal hardware, and
fractures as a lucent line through a bone whose distal fragment is displaced and
angulated (with the rest of its finger, for a phalanx). A broken bone keeps its
epiphyses: only the break tells. ``subtlety`` (0 = obvious, 1 = nearly invisible)
sets the contrast, width, displacement and angulation of the fracture, sized to
the bone, so that even the subtle ones stay visible at a model's 224 px input and
a model has to learn them, not look them up.

Deterministic: the same seed writes byte-identical files.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import io
import math
from typing import Iterable

import cv2
import numpy as np
from PIL import Image

from .. import storage
from ..storage import StorageOptions
from .manifest import MURA_BODY_PARTS

__all__ = ["Bone", "RenderedImage", "render_radiograph", "generate_mura", "generate_fracatlas", "encode_image",
           "BODY_PART_BONES"]


@dataclasses.dataclass(frozen=True)
class Bone:
    """A bone as a capsule from (x0, y0) to (x1, y1) in unit canvas coordinates."""

    x0: float
    y0: float
    x1: float
    y1: float
    width: float
    fracturable: bool = True


def _chain(points: list[tuple[float, float]], width: float) -> list[Bone]:
    return [Bone(*a, *b, width) for a, b in zip(points, points[1:])]


def _hand_bones(spread: float = 1.0) -> list[Bone]:
    bones = [Bone(0.42, 0.95, 0.44, 0.80, 0.10, False), Bone(0.58, 0.95, 0.57, 0.80, 0.08, False)]
    # The hand fills the frame as in a hand radiograph: its rays are spread and wide enough
    # that a phalanx's fracture is still a few pixels across at a model's 224 px input.
    for i, angle in enumerate((-32, -14, 0, 12, 24)):
        a = math.radians(angle * spread)
        base = (0.30 + 0.10 * i, 0.74)
        lengths = (0.22, 0.14, 0.09, 0.07) if i else (0.17, 0.11, 0.08)
        pts, (x, y) = [base], base
        for seg in lengths:
            x, y = x + seg * math.sin(a), y - seg * math.cos(a)
            pts.append((x, y))
        bones += _chain(pts, 0.06 if i else 0.065)
    return bones


BODY_PART_BONES: dict[str, list[Bone]] = {
    "humerus": [Bone(0.50, 0.06, 0.52, 0.94, 0.14)],
    "forearm": [Bone(0.41, 0.04, 0.38, 0.96, 0.08), Bone(0.60, 0.04, 0.63, 0.96, 0.07)],
    "elbow": [Bone(0.50, 0.00, 0.50, 0.50, 0.14), Bone(0.44, 0.52, 0.32, 1.00, 0.08),
              Bone(0.57, 0.50, 0.62, 1.00, 0.07)],
    "wrist": [Bone(0.40, 0.00, 0.42, 0.45, 0.11), Bone(0.62, 0.00, 0.60, 0.45, 0.08)]
             + [Bone(0.36 + 0.07 * i, 0.55, 0.38 + 0.07 * i, 0.62, 0.06, False) for i in range(4)]
             + [Bone(0.34 + 0.08 * i, 0.72, 0.30 + 0.10 * i, 1.0, 0.05) for i in range(4)],
    "hand": _hand_bones(),
    "finger": _chain([(0.50, 1.00), (0.50, 0.62), (0.51, 0.36), (0.52, 0.16)], 0.10)
              + _chain([(0.20, 1.00), (0.16, 0.62)], 0.08),
    "shoulder": [Bone(0.55, 0.40, 0.60, 1.00, 0.16), Bone(0.10, 0.18, 0.70, 0.12, 0.06),
                 Bone(0.25, 0.25, 0.45, 0.55, 0.10, False)],
    "leg": [Bone(0.44, 0.00, 0.46, 1.00, 0.13), Bone(0.64, 0.05, 0.66, 0.98, 0.06)],
    "hip": [Bone(0.55, 0.35, 0.66, 1.00, 0.15), Bone(0.15, 0.30, 0.50, 0.32, 0.18, False),
            Bone(0.48, 0.34, 0.56, 0.42, 0.09)],
}
BODY_PART_BONES["mixed"] = BODY_PART_BONES["leg"][:1] + _hand_bones(0.6)[2:8]


@dataclasses.dataclass
class RenderedImage:
    pixels: np.ndarray                                         # HxW uint8
    fracture_box: tuple[float, float, float, float] | None     # YOLO (xc, yc, w, h), normalised
    hardware: bool
    # The fracture's outline as a flat (x0, y0, x1, y1, ...) polygon normalised to [0, 1] (as
    # FracAtlas's COCO polygons divided by the image size): the band around the lucent line.
    fracture_outline: tuple[float, ...] | None = None


def _capsule(canvas: np.ndarray, p0, p1, radius: float, value: float) -> None:
    thickness = max(1, int(round(2 * radius)))
    cv2.line(canvas, p0, p1, value, thickness, lineType=cv2.LINE_AA)
    for p in (p0, p1):
        cv2.circle(canvas, p, max(1, int(round(radius))), value, -1, lineType=cv2.LINE_AA)


def render_radiograph(rng: np.random.Generator, body_part: str, height: int, width: int, *,
                      fracture: bool, subtlety: float = 0.5, hardware: bool = False) -> RenderedImage:
    """Draw one radiograph-like image. Drawing happens at <= 512 px and is upscaled,
    so large images cost little more than small ones; noise is added at full size."""
    if body_part not in BODY_PART_BONES:
        raise ValueError(f"Unknown body part {body_part!r}; expected one of {sorted(BODY_PART_BONES)}")
    if not 0.0 <= subtlety <= 1.0:
        raise ValueError(f"subtlety must be in [0, 1]. Got {subtlety}")
    scale = min(1.0, 512.0 / max(height, width))
    h, w = max(32, int(round(height * scale))), max(32, int(round(width * scale)))
    unit = min(h, w)
    canvas = np.full((h, w), 0.04 + 0.03 * rng.random(), np.float32)

    # Jitter the whole layout: position, rotation and size differ per image.
    angle = rng.uniform(-12, 12)
    zoom = rng.uniform(0.85, 1.1)
    cx, cy = w / 2 + rng.uniform(-0.05, 0.05) * w, h / 2 + rng.uniform(-0.05, 0.05) * h
    rot = cv2.getRotationMatrix2D((0.5, 0.5), angle, 1.0)

    def to_px(x: float, y: float) -> tuple[int, int]:
        u, v = rot @ np.array([x, y, 1.0])
        return int(round(cx + (u - 0.5) * w * zoom)), int(round(cy + (v - 0.5) * h * zoom))

    bones = BODY_PART_BONES[body_part]
    # Soft tissue envelope around every bone.
    tissue = np.zeros_like(canvas)
    for b in bones:
        _capsule(tissue, to_px(b.x0, b.y0), to_px(b.x1, b.y1), b.width * unit * zoom * 1.6, 1.0)
    tissue = cv2.GaussianBlur(tissue, (0, 0), unit * 0.03)
    canvas += tissue * (0.18 + 0.06 * rng.random())

    candidates = [i for i, b in enumerate(bones) if b.fracturable]
    # Long bones break more often than short ones (and show it more): pick by length x width.
    bulk = np.array([math.hypot(bones[i].x1 - bones[i].x0, bones[i].y1 - bones[i].y0) * bones[i].width
                     for i in candidates])
    broken = int(rng.choice(candidates, p=bulk / bulk.sum())) if fracture else -1
    # The bones distal to the broken one in its chain (a finger's phalanges) move with its distal fragment.
    distal: set[int] = set()
    if broken >= 0:
        for j in range(broken + 1, len(bones)):
            if (bones[j].x0, bones[j].y0) != (bones[j - 1].x1, bones[j - 1].y1):
                break
            distal.add(j)
    box = outline = None
    fragment = None  # how the broken bone's distal fragment moved, once it is drawn
    for i, b in enumerate(bones):
        radius = b.width * unit * zoom / 2 * rng.uniform(0.9, 1.1)
        p0, p1 = np.array(to_px(b.x0, b.y0), float), np.array(to_px(b.x1, b.y1), float)
        if i in distal and fragment is not None:
            p0, p1 = _moved(p0, fragment), _moved(p1, fragment)
        bone = np.zeros_like(canvas)
        if i == broken:
            # A complete break: a lucent gap through both cortices, the distal fragment displaced
            # sideways and angulated. Sizes follow the bone (its radius), so a finger's fracture
            # is as visible relative to the finger as a femur's to the femur and survives the
            # downscaling to a model's 224 px input; subtlety shrinks all three.
            visible = 1.0 - subtlety
            t = rng.uniform(0.3, 0.7)
            split = p0 + t * (p1 - p0)
            axis = (p1 - p0) / (np.linalg.norm(p1 - p0) + 1e-6)
            normal = np.array([-axis[1], axis[0]])
            # Thin bones (phalanges) get at least a model-visible break, a few pixels at 224 px.
            size = max(radius, unit * 0.035)
            shift = (normal * size * (0.3 + 0.9 * visible) * rng.choice([-1, 1])
                     + axis * size * rng.uniform(0.1, 0.3))
            # A broken phalanx angulates the rest of its finger (the bones in ``distal``) with it.
            low = 10 if distal else 4
            bend = math.radians(rng.uniform(low, 2 * low + 16 * visible) * rng.choice([-1, 1]))
            turn = np.array([[math.cos(bend), -math.sin(bend)], [math.sin(bend), math.cos(bend)]])
            fragment = (split, shift, turn)
            end = _moved(p1, fragment)
            _draw_bone(bone, p0, split, radius)
            _draw_bone(bone, split + shift, end, radius)
            for p in (p0, end):  # the joints keep their epiphyses: only the break tells
                cv2.circle(bone, tuple(int(v) for v in p), int(radius * 1.25), 0.5, -1, cv2.LINE_AA)
            # A lucent line across the bone, oblique by up to 35 degrees.
            tilt = math.radians(rng.uniform(-35, 35))
            across = normal * math.cos(tilt) + axis * math.sin(tilt)
            a, c = split - across * radius * 1.2, split + across * radius * 1.2
            gap = np.zeros_like(canvas)
            line_w = max(2, int(round(size * (0.3 + 0.5 * visible))))
            cv2.line(gap, tuple(int(v) for v in a), tuple(int(v) for v in c), 1.0, line_w, cv2.LINE_AA)
            bone *= 1.0 - gap * (0.95 - 0.55 * subtlety)
            xs, ys = [a[0], c[0], split[0] + shift[0]], [a[1], c[1], split[1] + shift[1]]
            pad = radius * 0.4 + line_w / 2
            x0, x1 = max(0, min(xs) - pad), min(w, max(xs) + pad)
            y0, y1 = max(0, min(ys) - pad), min(h, max(ys) + pad)
            box = ((x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h)
            band = np.array([-across[1], across[0]]) * pad  # inside the box: |band| <= pad per axis
            outline = tuple(float(v) for p in (a - band, c - band, c + band, a + band)
                            for v in (min(max(p[0], 0.0), w) / w, min(max(p[1], 0.0), h) / h))
        else:
            _draw_bone(bone, p0, p1, radius)
            for p in (p0, p1):  # epiphyses: wider ends at the joints
                cv2.circle(bone, tuple(int(v) for v in p), int(radius * 1.25), 0.5, -1, cv2.LINE_AA)
        canvas = np.maximum(canvas, canvas * 0.3 + bone)

    if hardware:
        b = bones[candidates[int(rng.integers(len(candidates)))]]
        p0, p1 = np.array(to_px(b.x0, b.y0), float), np.array(to_px(b.x1, b.y1), float)
        q0, q1 = p0 + 0.25 * (p1 - p0), p0 + 0.7 * (p1 - p0)
        plate_w = max(2, int(b.width * unit * zoom * 0.25))
        cv2.line(canvas, tuple(int(v) for v in q0), tuple(int(v) for v in q1), 0.97, plate_w, cv2.LINE_AA)
        for s in np.linspace(0.05, 0.95, 4):
            q = q0 + s * (q1 - q0)
            cv2.circle(canvas, tuple(int(v) for v in q), plate_w, 1.0, -1, cv2.LINE_AA)

    canvas = cv2.GaussianBlur(canvas, (0, 0), 0.6 + rng.random() * 0.6)
    if (h, w) != (height, width):
        canvas = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_LINEAR)
    noise_sigma = 0.015 + 0.02 * rng.random()
    canvas = canvas + rng.normal(0.0, noise_sigma, canvas.shape).astype(np.float32)
    pixels = np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return RenderedImage(pixels, box, hardware, outline)


def _moved(p: np.ndarray, fragment: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Where a point of a broken bone's distal fragment went: turned about the break, then shifted."""
    split, shift, turn = fragment
    return split + shift + turn @ (p - split)


def _draw_bone(canvas: np.ndarray, p0, p1, radius: float) -> None:
    a, b = tuple(int(v) for v in p0), tuple(int(v) for v in p1)
    _capsule(canvas, a, b, radius, 0.62)            # cortex
    _capsule(canvas, a, b, radius * 0.55, 0.45)     # medullary canal is less dense


def encode_image(pixels: np.ndarray, fmt: str, *, rgb: bool = False, quality: int = 92) -> bytes:
    img = Image.fromarray(pixels, "L")
    if rgb:
        img = img.convert("RGB")
    buf = io.BytesIO()
    if fmt.upper() in ("JPEG", "JPG"):
        img.save(buf, "JPEG", quality=quality)
    elif fmt.upper() == "PNG":
        img.save(buf, "PNG", compress_level=1)
    else:
        raise ValueError(f"Unsupported format {fmt!r}; expected JPEG or PNG")
    return buf.getvalue()


def _write_all(items: Iterable[tuple[str, bytes]], options: StorageOptions | None, workers: int = 8) -> int:
    items = list(items)
    with cf.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda kv: storage.write_bytes(kv[0], kv[1], options), items))
    return len(items)


# ----------------------------------------------------------------------------- MURA layout

def generate_mura(output_uri: str, *, patients_per_part: int = 6, seed: int = 0,
                  body_parts: tuple[str, ...] = MURA_BODY_PARTS, valid_fraction: float = 0.25,
                  positive_fraction: float = 0.4, subtlety_range: tuple[float, float] = (0.1, 0.6),
                  max_side: int = 512, stray_files: bool = True,
                  options: StorageOptions | None = None) -> dict[str, int]:
    """Write ``<output_uri>/MURA-v1.1/`` exactly as the MURA v1.1 release lays it out.

    Images are PNG, at most ``max_side`` px (512 in the release), grayscale or RGB;
    abnormal studies have a fracture in every image (and some hardware). Each body
    part's patients are split and labelled by plan: ``valid_fraction`` of them are
    validation patients and ``positive_fraction`` of each split's patients have an
    abnormal first study (both rounded), so that even a small set validates every
    body part on both classes.
    With ``stray_files`` a ``._image1.png`` AppleDouble file is added, as found in
    copies unpacked on macOS. Returns counts.
    """
    for part in body_parts:
        if part not in MURA_BODY_PARTS:
            raise ValueError(f"MURA has no body part {part!r}; expected one of {MURA_BODY_PARTS}")
    root = storage.join(output_uri, "MURA-v1.1")
    files: list[tuple[str, bytes]] = []
    paths = {"train": [], "valid": []}
    studies = {"train": [], "valid": []}
    counter = 0
    for part_index, part in enumerate(body_parts):
        # Stratified per body part: valid_fraction of its patients (rounded) are validation
        # patients, and in each split positive_fraction of the patients (rounded) have an
        # abnormal first study, so a small set still validates every part on both classes.
        plan = np.random.default_rng([seed, part_index])
        order = [int(v) for v in plan.permutation(patients_per_part)]
        n_valid = int(valid_fraction * patients_per_part + 0.5)
        if patients_per_part > 1:
            n_valid = min(n_valid, patients_per_part - 1)
        valid_patients = set(order[:n_valid])
        first_positive: set[int] = set()
        for group in (order[:n_valid], order[n_valid:]):
            first_positive.update(group[: int(positive_fraction * len(group) + 0.5)])
        for p in range(patients_per_part):
            rng = np.random.default_rng([seed, part_index, p])
            patient = f"patient{part_index * 10000 + p + 1:05d}"
            split = "valid" if p in valid_patients else "train"
            for s in range(1 + int(rng.random() < 0.3)):
                positive = p in first_positive if s == 0 else bool(rng.random() < positive_fraction)
                study = f"study{s + 1}_{'positive' if positive else 'negative'}"
                rel_study = f"MURA-v1.1/{split}/XR_{part.upper()}/{patient}/{study}/"
                studies[split].append((rel_study, int(positive)))
                for i in range(int(rng.integers(1, 4))):
                    counter += 1
                    long_side = int(rng.integers(max_side * 5 // 8, max_side + 1))
                    short_side = int(long_side * rng.uniform(0.7, 0.95))
                    hgt, wid = (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)
                    img = render_radiograph(rng, part, hgt, wid, fracture=positive,
                                            subtlety=float(rng.uniform(*subtlety_range)),
                                            hardware=positive and rng.random() < 0.15)
                    rel = f"{rel_study}image{i + 1}.png"
                    paths[split].append(rel)
                    files.append((storage.join(output_uri, rel),
                                  encode_image(img.pixels, "PNG", rgb=bool(rng.random() < 0.3))))
    if stray_files and paths["train"]:
        first = paths["train"][0]
        files.append((storage.join(output_uri, first.rsplit("/", 1)[0], "._" + first.rsplit("/", 1)[1]),
                      b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "))
    for split in ("train", "valid"):
        files.append((storage.join(root, f"{split}_image_paths.csv"),
                      "".join(f"{p}\n" for p in paths[split]).encode()))
        files.append((storage.join(root, f"{split}_labeled_studies.csv"),
                      "".join(f"{s},{label}\n" for s, label in studies[split]).encode()))
    _write_all(files, options)
    return {"images": counter, "train_images": len(paths["train"]), "valid_images": len(paths["valid"]),
            "studies": len(studies["train"]) + len(studies["valid"])}


# ----------------------------------------------------------------------------- FracAtlas layout

_FRACATLAS_PARTS = ("hand", "leg", "hip", "shoulder", "mixed")
_FRACATLAS_PART_WEIGHTS = (0.38, 0.45, 0.05, 0.04, 0.08)
_FRACATLAS_SIZES = (((454, 373), True), ((373, 454), True), ((2880, 2304), False), ((2140, 1760), True))
_FRACATLAS_SIZE_WEIGHTS = (0.62, 0.26, 0.09, 0.03)


def generate_fracatlas(output_uri: str, *, n_images: int = 120, seed: int = 0, fractured_fraction: float = 0.18,
                       subtlety_range: tuple[float, float] = (0.1, 0.6), large_images: bool = True,
                       truncated: int = 0, write_test_split: bool = False, coco_outlines: bool = True,
                       options: StorageOptions | None = None) -> dict[str, int]:
    """Write ``<output_uri>/FracAtlas/`` in the FracAtlas release's layout.

    Sizes and modes mix as in the release: mostly 454x373 / 373x454 RGB, some
    2304x2880 grayscale and 1760x2140 RGB (``large_images=False`` keeps only the
    small ones). ``truncated`` non-fractured JPEGs are cut short, as 59 are in the
    release. The fracture split files cover fractured images only; ``test.csv`` is
    written only when asked (the shared copy lacks it too). ``coco_outlines``: also
    ``Annotations/COCO JSON/COCO_fracture_masks.json`` with each fracture's outline in
    pixels, its polygon list stored as a JSON string as in the release.
    """
    import json

    root = storage.join(output_uri, "FracAtlas")
    files: list[tuple[str, bytes]] = []
    rows = ["image_id,hand,leg,hip,shoulder,mixed,hardware,multiscan,fractured,fracture_count,frontal,lateral,oblique"]
    fractured_ids: list[str] = []
    truncated_left = truncated
    coco: dict[str, list] = {"images": [], "annotations": [], "categories": [{"id": 0, "name": "fractured"}]}
    sizes = _FRACATLAS_SIZES if large_images else _FRACATLAS_SIZES[:2]
    weights = np.array(_FRACATLAS_SIZE_WEIGHTS[: len(sizes)])
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        image_id = f"IMG{i:07d}.jpg"
        fractured = bool(rng.random() < fractured_fraction)
        part = str(rng.choice(_FRACATLAS_PARTS, p=_FRACATLAS_PART_WEIGHTS))
        (hgt, wid), rgb = sizes[int(rng.choice(len(sizes), p=weights / weights.sum()))]
        hardware = bool(rng.random() < 0.08)
        img = render_radiograph(rng, part, hgt, wid, fracture=fractured,
                                subtlety=float(rng.uniform(*subtlety_range)), hardware=hardware)
        data = encode_image(img.pixels, "JPEG", rgb=rgb, quality=90)
        if not fractured and truncated_left > 0:
            data = data[: int(len(data) * 0.97)]
            truncated_left -= 1
        folder = "Fractured" if fractured else "Non_fractured"
        files.append((storage.join(root, "images", folder, image_id), data))
        label_txt = ""
        if fractured and img.fracture_box:
            label_txt = "0 " + " ".join(f"{v:.6f}" for v in img.fracture_box) + "\n"
            fractured_ids.append(image_id)
            polygon = img.fracture_outline
            if polygon is None:  # the box's corners
                xc, yc, bw, bh = img.fracture_box
                polygon = (xc - bw / 2, yc - bh / 2, xc + bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2,
                           xc - bw / 2, yc + bh / 2)
            pixels = [round(v * (wid if k % 2 == 0 else hgt), 3) for k, v in enumerate(polygon)]
            xs, ys = pixels[0::2], pixels[1::2]
            coco["images"].append({"id": len(coco["images"]) + 1, "width": wid, "height": hgt, "file_name": image_id})
            coco["annotations"].append({
                "id": len(coco["annotations"]), "iscrowd": 0, "image_id": len(coco["images"]), "category_id": 0,
                "segmentation": json.dumps([pixels]),  # the release's quirk: a JSON string, not a list
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                "area": float(cv2.contourArea(np.asarray(pixels, np.float32).reshape(-1, 2)))})
        files.append((storage.join(root, "Annotations", "YOLO", image_id.replace(".jpg", ".txt")), label_txt.encode()))
        flags = {p: int(p == part) for p in _FRACATLAS_PARTS}
        if part == "mixed":
            flags.update(hand=1, leg=1)
        views = rng.random(3) < (0.7, 0.4, 0.1)
        rows.append(f"{image_id},{flags['hand']},{flags['leg']},{flags['hip']},{flags['shoulder']},{flags['mixed']},"
                    f"{int(hardware)},{int(rng.random() < 0.2)},{int(fractured)},{int(fractured)},"
                    f"{int(views[0] or not views.any())},{int(views[1])},{int(views[2])}")
    files.append((storage.join(root, "dataset.csv"), ("\r\n".join(rows) + "\r\n").encode()))
    if coco_outlines:
        files.append((storage.join(root, "Annotations", "COCO JSON", "COCO_fracture_masks.json"),
                      json.dumps({"info": {"description": "fracray synthetic FracAtlas"}, **coco}).encode()))
    # The release splits fractured images ~ 80 / 10 / 10 (574 / 82 / 61).
    order = np.random.default_rng(seed).permutation(len(fractured_ids))
    n_train, n_valid = round(0.8 * len(order)), round(0.12 * len(order))
    splits = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid], "test": order[n_train + n_valid:]}
    for split, idx in splits.items():
        if split == "test" and not write_test_split:
            continue
        body = "image_id\r\n" + "".join(f"{fractured_ids[k]}\r\n" for k in sorted(idx))
        files.append((storage.join(root, "Utilities", "Fracture Split", f"{split}.csv"), body.encode()))
    _write_all(files, options)
    return {"images": n_images, "fractured": len(fractured_ids), "truncated": truncated - truncated_left}
