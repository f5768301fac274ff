"""The out-of-scope check (``fracray.imaging.scope``) measured on inputs that are not limb
radiographs and on radiographs that must stay in scope (``fracray check-scope``).

The out-of-scope set is assembled at run time from what ships in installed packages,
so it needs no download:

- scikit-image's sample images (``skimage/data``: astronaut, coffee, chelsea, camera, ...);
- every file of pydicom's test corpus (``pydicom/data/test_files``), grouped by its
  DICOM Modality (CT, MR, US, NM, ...; files without pixels or unreadable ones are
  refused by the decoder and counted as such);
- synthetic non-radiographs: blank images, noise, colour and grey gradients, text.

The in-scope set: the FracAtlas valid split (``fracatlas``, through the project's
adapter) and the synthetic radiographs of ``fracray.data.synthetic`` (the embedded
default data), in every format the generators write plus DICOM.

Every input goes through the predictor's own decode (``decode_for``) and then
``assess_scope``; a decoder reject counts as refused (``decode:<reason>``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .. import storage
from ..data import adapters

# The imaging modules and the synthetic data (OpenCV, Pillow) are imported by the functions
# that use them, so importing this module (the command's --help) stays light.

__all__ = ["ScopeCheckConfig", "ScopeCheckResult", "run_scope_check", "Sample", "skimage_samples",
           "pydicom_samples", "synthetic_non_radiographs", "dicom_out_of_scope_headers", "synthetic_radiographs",
           "fracatlas_samples", "assess_samples", "summarize", "format_table", "IN_SCOPE_GROUPS"]

IN_SCOPE_GROUPS = ("FracAtlas valid radiographs", "synthetic radiographs")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff", ".bmp")


@dataclasses.dataclass(frozen=True)
class Sample:
    group: str
    name: str
    data: bytes


# ----------------------------------------------------------------------------- the out-of-scope set

def skimage_samples() -> list[Sample]:
    """Every image file that ships inside the installed scikit-image (no pooch download)."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    return [Sample("photos and sample images (scikit-image)", p.name, p.read_bytes())
            for p in sorted(folder.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES]


def pydicom_samples() -> list[Sample]:
    """Every file of pydicom's own test corpus, grouped by its Modality tag."""
    import warnings

    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        modality = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(str(path), force=True, stop_before_pixels=True)
            modality = str(ds.get("Modality", "") or "").strip().upper() or None
        except Exception:  # not DICOM at all (json, dumps, ICC profiles, gzip): still part of the corpus
            pass
        out.append(Sample(f"DICOM {modality}" if modality else "DICOM corpus, no Modality (or not DICOM)",
                          str(path.relative_to(folder)), path.read_bytes()))
    return out


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def synthetic_non_radiographs(seed: int = 0) -> list[Sample]:
    """Blank images, noise, gradients and text: what a confused client might upload."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    group = "synthetic non-radiographs"
    out = []
    for value in (0, 128, 255):
        for size, fmt in (((512, 512), "PNG"), ((454, 373), "JPEG")):
            out.append(Sample(group, f"blank_{value}_{size[0]}x{size[1]}.{fmt.lower()}",
                              _encode(np.full(size, value, np.uint8), fmt)))
    out.append(Sample(group, "blank_rgb_red.png", _encode(np.full((300, 400, 3), (200, 30, 30), np.uint8))))
    out.append(Sample(group, "nearly_blank_grey_noise2.png",
                      _encode(np.clip(128 + rng.normal(0, 2, (400, 400)), 0, 255).astype(np.uint8))))
    out.append(Sample(group, "uniform_noise_grey.jpg",
                      _encode(rng.integers(0, 256, (400, 320), dtype=np.uint8), "JPEG")))
    out.append(Sample(group, "uniform_noise_grey.png", _encode(rng.integers(0, 256, (384, 384), dtype=np.uint8))))
    out.append(Sample(group, "gaussian_noise_grey.png",
                      _encode(np.clip(128 + rng.normal(0, 40, (512, 400)), 0, 255).astype(np.uint8))))
    out.append(Sample(group, "uniform_noise_rgb.png", _encode(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))))
    y, x = np.mgrid[0:360, 0:480].astype(np.float32)
    rainbow = np.stack([x / 479 * 255, y / 359 * 255, (1 - x / 479) * 255], -1).astype(np.uint8)
    out.append(Sample(group, "colour_gradient.png", _encode(rainbow)))
    out.append(Sample(group, "colour_gradient.jpg", _encode(rainbow, "JPEG")))
    out.append(Sample(group, "grey_gradient_horizontal.png", _encode((x / 479 * 255).astype(np.uint8))))
    out.append(Sample(group, "grey_gradient_radial.png",
                      _encode((255 * np.hypot(x - 240, y - 180) / 300).clip(0, 255).astype(np.uint8))))
    for name, (ink, paper) in {"text_black_on_white": (0, 255), "text_white_on_black": (255, 0)}.items():
        img = Image.new("L", (600, 400), paper)
        draw = ImageDraw.Draw(img)
        for row in range(14):
            draw.text((20, 10 + 27 * row), "Patient report: no acute fracture. Follow up in 2 weeks. " * 2, fill=ink)
        out.append(Sample(group, f"{name}.png", _encode(np.asarray(img))))
    img = Image.new("RGB", (640, 480), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 640, 60), fill=(30, 90, 200))
    for row in range(12):
        draw.text((20, 80 + 30 * row), "Discharge summary - radiology department", fill=(20, 20, 20))
    out.append(Sample(group, "screenshot_like_document.png", _encode(np.asarray(img))))
    check = ((x // 40 + y // 40) % 2 * 255).astype(np.uint8)
    out.append(Sample(group, "checkerboard.png", _encode(check)))
    return out


def dicom_out_of_scope_headers(seed: int = 0) -> list[Sample]:
    """Radiograph pixels under headers that put them out of scope: DX/CR of the chest, abdomen,
    skull, spine (BodyPartExamined), and MG / RF / CT modalities. pydicom's corpus has none."""
    from ..data.synthetic import render_radiograph

    rng = np.random.default_rng(seed + 2)
    pixels = render_radiograph(rng, "humerus", 400, 320, fracture=False).pixels.astype(np.uint16) * 16
    group = "DICOM radiograph pixels, out-of-scope header"
    out = [Sample(group, f"dx_{part.lower().replace(' ', '_')}.dcm", _dicom(pixels, body_part=part))
           for part in ("CHEST", "ABDOMEN", "SKULL", "LSPINE", "WHOLE BODY")]
    out += [Sample(group, f"{m.lower()}_modality.dcm", _dicom(pixels, modality=m)) for m in ("MG", "RF", "CT")]
    return out


# ----------------------------------------------------------------------------- the in-scope set

def _dicom(pixels: np.ndarray, *, modality: str = "DX", body_part: str | None = None,
           photometric: str = "MONOCHROME2") -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    if body_part:
        ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def synthetic_radiographs(seed: int = 0, workdir: str | None = None) -> list[Sample]:
    """The product's own synthetic radiographs: the embedded default's MURA-layout generator and
    the FracAtlas-layout one (every size and mode they write), plus each body part as grey and
    RGB JPEG/PNG, 16-bit PNG and DX/CR DICOM (MONOCHROME1 and 2)."""
    from PIL import Image

    from ..data.synthetic import BODY_PART_BONES, generate_fracatlas, generate_mura, render_radiograph

    group = "synthetic radiographs"
    out = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        generate_mura(os.path.join(tmp, "mura"), patients_per_part=2, seed=seed, stray_files=False)
        generate_fracatlas(os.path.join(tmp, "fracatlas"), n_images=40, seed=seed, large_images=True)
        for path in sorted(Path(tmp).rglob("*")):
            if path.suffix.lower() in (".png", ".jpg"):
                out.append(Sample(group, str(path.relative_to(tmp)), path.read_bytes()))
    rng = np.random.default_rng(seed + 1)
    for i, part in enumerate(sorted(BODY_PART_BONES)):
        h, w = (512, 416) if i % 2 else (454, 373)
        pixels = render_radiograph(rng, part, h, w, fracture=bool(i % 3 == 0), hardware=i % 4 == 1).pixels
        out.append(Sample(group, f"{part}_grey.jpg", _encode(pixels, "JPEG")))
        out.append(Sample(group, f"{part}_rgb.jpg", _encode(np.repeat(pixels[..., None], 3, -1), "JPEG")))
        out.append(Sample(group, f"{part}_rgb.png", _encode(np.repeat(pixels[..., None], 3, -1))))
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint16) * 257).save(buf, "PNG")
        out.append(Sample(group, f"{part}_16bit.png", buf.getvalue()))
        out.append(Sample(group, f"{part}_dx.dcm", _dicom(pixels.astype(np.uint16) * 16, body_part=part.upper())))
        out.append(Sample(group, f"{part}_cr_mono1.dcm",
                          _dicom(4095 - pixels.astype(np.uint16) * 16, modality="CR", photometric="MONOCHROME1")))
    return out


def fracatlas_samples(uri: str, split: str = "valid", limit: int | None = None) -> list[Sample]:
    """The images of one split of FracAtlas, through the project's adapter."""
    manifest = adapters.index_dataset("fracatlas", uri).manifest.to_pylist()
    rows = [r for r in manifest if r["split"] == split][:limit]
    return [Sample("FracAtlas valid radiographs" if split == "valid" else f"FracAtlas {split} radiographs",
                   r["image_uri"].rsplit("/", 1)[-1], storage.read_bytes(r["image_uri"])) for r in rows]


# ----------------------------------------------------------------------------- measurement

def assess_samples(samples: list[Sample], config=None) -> Iterator[dict[str, Any]]:
    """Decode each sample as the predictor does and assess it: one row per sample."""
    from ..imaging.decode import ImageRejected
    from ..imaging.preprocess import PreprocessConfig, decode_for
    from ..imaging.scope import ScopeConfig, assess_scope

    config = config or ScopeConfig()
    decode_config = PreprocessConfig()
    for s in samples:
        started = time.perf_counter()
        try:
            decoded = decode_for(s.data, decode_config, name=s.name)
        except ImageRejected as exc:
            yield {"group": s.group, "name": s.name, "refused": True, "reason": f"decode:{exc.reason.value}",
                   "detail": exc.detail, "ms": 1000 * (time.perf_counter() - started)}
            continue
        decoded_at = time.perf_counter()
        verdict = assess_scope(decoded, config)
        yield {"group": s.group, "name": s.name, "refused": not verdict.in_scope, "reason": verdict.reason,
               "detail": verdict.detail, "scope_ms": 1000 * (time.perf_counter() - decoded_at),
               "ms": 1000 * (time.perf_counter() - started)}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group: how many images, how many the decoder rejected, how many the scope
    check refused (by reason), how many passed as in scope."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    order = sorted(groups, key=lambda g: (g in IN_SCOPE_GROUPS, IN_SCOPE_GROUPS.index(g) if g in IN_SCOPE_GROUPS
                                          else 0, g))
    table = []
    for g in order:
        members = groups[g]
        in_scope = g in IN_SCOPE_GROUPS
        refused = [r for r in members if r["refused"]]
        decode = [r for r in refused if r["reason"].startswith("decode:")]
        scope = [r for r in refused if not r["reason"].startswith("decode:")]
        scope_ms = [r["scope_ms"] for r in members if "scope_ms" in r]
        table.append({
            "group": g, "should_be": "in scope" if in_scope else "out of scope",
            "images": len(members), "refused": len(refused),
            "decoder_rejects": len(decode), "out_of_scope": len(scope),
            "passed_as_in_scope": len(members) - len(refused),
            "wrongly_refused": len(scope) if in_scope else None,
            "by_reason": dict(sorted(Counter(r["reason"] for r in scope).items())),
            "decoder_reasons": dict(sorted(Counter(r["reason"][len("decode:"):] for r in decode).items())),
            "passed": [] if in_scope else [r["name"] for r in members if not r["refused"]],
            "wrongly_refused_images": [f"{r['name']} ({r['reason']}: {r['detail']})" for r in scope]
            if in_scope else [],
            "scope_ms_median": round(float(np.median(scope_ms)), 3) if scope_ms else None,
        })
    return table


def format_table(table: list[dict[str, Any]], markdown: bool = False) -> str:
    header = ["group", "should be", "images", "decoder rejects", "out_of_scope", "passed as in scope",
              "out_of_scope by reason"]
    lines = []
    for row in table:
        wrong = row["should_be"] == "in scope"
        lines.append([row["group"], row["should_be"], str(row["images"]), str(row["decoder_rejects"]),
                      f"{row['out_of_scope']} (wrongly)" if wrong else str(row["out_of_scope"]),
                      str(row["passed_as_in_scope"]),
                      ", ".join(f"{k} {v}" for k, v in row["by_reason"].items()) or "-"])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(x[i]) for x in [header] + lines) for i in range(len(header) - 1)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths)) + "  " + cells[-1]  # noqa: E731
    return "\n".join([fmt(header)] + [fmt(line) for line in lines])


@dataclasses.dataclass(frozen=True)
class ScopeCheckConfig:
    fracatlas: str | None = None        # FracAtlas root; its valid split is the real in-scope set (None: left out)
    output: str | None = None           # folder for scope_check.json and scope_check.md
    limit: int | None = None            # at most this many FracAtlas images
    seed: int = 0                       # seed of the synthetic images


@dataclasses.dataclass(frozen=True)
class ScopeCheckResult:
    """``to_dict()`` is scope_check.json."""

    table: list[dict[str, Any]]         # one row per group (summarize)
    config: dict[str, Any]              # the ScopeConfig measured
    fracatlas: str | None
    out_of_scope_total: int
    out_of_scope_refused: int
    out_of_scope_refused_by_scope_check: int
    in_scope_total: int
    in_scope_wrongly_refused: int
    in_scope_decoder_rejects: int
    rows: list[dict[str, Any]]          # one per input (assess_samples)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format_table(self, markdown: bool = False) -> str:
        return format_table(self.table, markdown=markdown)


def run_scope_check(config: ScopeCheckConfig, *, log: Callable[[str], None] = print) -> ScopeCheckResult:
    seed = config.seed
    samples = skimage_samples() + pydicom_samples() + synthetic_non_radiographs(seed)
    samples += dicom_out_of_scope_headers(seed)
    samples += synthetic_radiographs(seed)
    if config.fracatlas:
        samples += fracatlas_samples(config.fracatlas, "valid", config.limit)
    else:
        log("no --fracatlas given: the FracAtlas row is left out")
    import warnings

    with warnings.catch_warnings():  # pydicom's corpus is made to provoke warnings
        warnings.simplefilter("ignore")
        rows = list(assess_samples(samples))
    table = summarize(rows)
    from ..imaging.scope import ScopeConfig

    out_rows = [r for r in table if r["should_be"] == "out of scope"]
    in_rows = [r for r in table if r["should_be"] == "in scope"]
    result = ScopeCheckResult(
        table=table, config=ScopeConfig().to_dict(), fracatlas=config.fracatlas,
        out_of_scope_total=sum(r["images"] for r in out_rows),
        out_of_scope_refused=sum(r["refused"] for r in out_rows),
        out_of_scope_refused_by_scope_check=sum(r["out_of_scope"] for r in out_rows),
        in_scope_total=sum(r["images"] for r in in_rows),
        in_scope_wrongly_refused=sum(r["out_of_scope"] for r in in_rows),
        in_scope_decoder_rejects=sum(r["decoder_rejects"] for r in in_rows),
        rows=rows)
    if config.output:
        os.makedirs(config.output, exist_ok=True)
        with open(os.path.join(config.output, "scope_check.json"), "w") as f:
            json.dump(result.to_dict(), f, indent=2)
        with open(os.path.join(config.output, "scope_check.md"), "w") as f:
            f.write(result.format_table(markdown=True) + "\n")
    return result
