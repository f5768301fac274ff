"""Decoding radiographs from bytes: JPEG, PNG (8/16 bit), other Pillow formats, DICOM.

Every image is reduced to one luminance channel (ITU-R 601 luma, as Pillow's
``L``): radiographs are grayscale, and the colour JPEGs in public sets (FracAtlas,
MURA) carry grayscale content in three channels. The model's channel count is
restored at the end of preprocessing. How colourful the source was is kept
(``DecodedImage.colourfulness``), with the DICOM Modality, for the scope check
(fracray.imaging.scope: photographs are not radiographs).

Decoded pixels are either ``uint8`` (8-bit sources, kept as integers so resizing
stays cheap) or ``float32`` in [0, 1] (16-bit PNG and DICOM: rescaled linearly
over their full range, never clipped, except where a DICOM VOI window says so).

Bad input raises :class:`ImageRejected` with a machine-readable reason and a
sentence a person can act on; callers turn that into a reject row.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import math
import struct
import warnings
from typing import Callable

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

__all__ = [
    "DICOM_SUFFIXES",
    "RejectReason",
    "ImageRejected",
    "DecodedImage",
    "decode_image",
    "sniff_format",
    "DEFAULT_MAX_PIXELS",
]

# 2304x2880 (the largest FracAtlas/MURA images) is 6.6 MP; 100 MP leaves room for
# large-detector CR/DR while refusing crafted decompression bombs.
DEFAULT_MAX_PIXELS = 100_000_000

# Never decode partial data as if it were the image: a truncated radiograph can
# hide exactly the region with the fracture.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class RejectReason(str, enum.Enum):
    EMPTY_FILE = "empty_file"
    TRUNCATED = "truncated"
    NOT_AN_IMAGE = "not_an_image"
    CORRUPT = "corrupt"
    DECOMPRESSION_BOMB = "decompression_bomb"
    UNSUPPORTED_DICOM = "unsupported_dicom"
    UNSUPPORTED_FORMAT = "unsupported_format"
    READ_ERROR = "read_error"
    TOO_SMALL = "too_small"


class ImageRejected(Exception):
    """An input that cannot be turned into pixels; ``reason`` is a :class:`RejectReason`."""

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class DecodedImage:
    pixels: np.ndarray            # HxW, uint8 or float32 in [0, 1]
    width: int                    # of the stored image, before any DCT-domain downscale
    height: int
    source_format: str            # JPEG, PNG, DICOM, ...
    source_mode: str              # Pillow mode or DICOM photometric interpretation
    bit_depth: int
    body_part: str | None = None  # DICOM BodyPartExamined, when present
    modality: str | None = None   # DICOM Modality (CR, DX, CT, MR, US, ...), when present
    # How colourful the source was before the luma conversion (Hasler & Suesstrunk 2003, on
    # 0-255 values; 0 for grayscale sources, single digits for grey content in colour files,
    # tens for photographs). See fracray.imaging.scope.
    colourfulness: float = 0.0
    sop_instance_uid: str | None = None  # DICOM SOPInstanceUID: joins a result back to the PACS archive

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the decoded grid (smaller than the stored image after a draft decode)."""
        return tuple(int(v) for v in self.pixels.shape[:2])

    def as_float(self) -> np.ndarray:
        """Pixels as float32 in [0, 1]."""
        if self.pixels.dtype == np.uint8:
            return self.pixels.astype(np.float32) * np.float32(1.0 / 255.0)
        return self.pixels.astype(np.float32, copy=False)


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"RIFF", "WEBP"),
)


def sniff_format(data: bytes) -> str | None:
    """Format from magic bytes (not the file name, which archives often get wrong)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "DICOM"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


# Groups a DICOM data set starts with: file meta (0002), identification (0008), or, in files
# that leave those out, patient (0010) / acquisition (0018) / study (0020) / image (0028).
_FIRST_GROUPS = (0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028)


def looks_like_raw_dicom(data: bytes) -> bool:
    """Does ``data`` start like a DICOM data set without the 128-byte preamble: a first tag in a
    standard group, little or big endian, followed by an explicit VR or a plausible implicit
    length? (The check ``sniff_format`` makes, for files that lack the "DICM" marker.)"""
    if len(data) < 16:
        return False
    for order in ("<", ">"):
        group, element = struct.unpack(order + "HH", data[:4])
        if group not in _FIRST_GROUPS or element > 0x0100:
            continue
        vr = data[4:6]
        if vr.isalpha() and vr.isupper():
            return True
        length = struct.unpack(order + "I", data[4:8])[0]
        if length < min(len(data), 1 << 16):
            return True
    return False


DICOM_SUFFIXES = (".dcm", ".dicom")


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 8,
    draft_size: tuple[int, int] | Callable[[int, int], tuple[int, int]] | None = None,
    allow_headerless_dicom: bool = False,
    name: str = "",
) -> DecodedImage:
    """Decode one image file's bytes to a single luminance channel.

    draft_size: (width, height) the caller will resize to, or a function of the
        stored (width, height) that returns it. JPEGs are then decoded
        with libjpeg's DCT-domain scaling at the smallest power-of-two reduction
        that is still at least this size on both sides: several times faster on
        full-resolution radiographs and a proper low-pass, not a subsample.
    allow_headerless_dicom: try DICOM for data without the 128-byte preamble
        (old ACR-NEMA style files).
    name: the file name or URI, if known: one ending in .dcm/.dicom (:data:`DICOM_SUFFIXES`)
        allows headerless DICOM. The one place this rule lives.
    """
    allow_headerless_dicom = allow_headerless_dicom or name.lower().endswith(DICOM_SUFFIXES)
    if not data:
        raise ImageRejected(RejectReason.EMPTY_FILE, "the file is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None and looks_like_raw_dicom(data):
        fmt = "DICOM"  # a data set written without the preamble and "DICM" (some exports do)
    if fmt == "DICOM" or (fmt is None and allow_headerless_dicom):
        return _decode_dicom(data, max_pixels=max_pixels, min_side=min_side)
    return _decode_pillow(data, max_pixels=max_pixels, min_side=min_side, draft_size=draft_size)


def _check_size(width: int, height: int, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:
        raise ImageRejected(
            RejectReason.DECOMPRESSION_BOMB,
            f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}; "
            f"raise max_pixels if this image is genuine",
        )
    if min(width, height) < min_side:
        raise ImageRejected(RejectReason.TOO_SMALL, f"{width}x{height} is smaller than {min_side} px on a side")


def _decode_pillow(data: bytes, *, max_pixels: int, min_side: int, draft_size) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below, before any pixel is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected(RejectReason.DECOMPRESSION_BOMB,
                            f"{exc} Raise max_pixels (and PIL.Image.MAX_IMAGE_PIXELS) if this image is genuine") from exc
    except UnidentifiedImageError as exc:
        fmt = sniff_format(data)
        if fmt is not None:
            raise ImageRejected(RejectReason.CORRUPT, f"starts like a {fmt} file but its header is unreadable") from exc
        raise ImageRejected(
            RejectReason.NOT_AN_IMAGE,
            f"not a recognised image ({len(data):,} bytes, starts with {data[:8]!r})",
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(RejectReason.CORRUPT, f"unreadable header: {exc}") from exc

    width, height = img.size
    source_mode = img.mode
    source_format = img.format or "unknown"
    _check_size(width, height, max_pixels, min_side)

    if source_format == "JPEG" and draft_size is not None and img.mode in ("L", "RGB"):
        # Decode straight to luma (skips colour conversion) at a reduced DCT scale.
        want = draft_size(width, height) if callable(draft_size) else draft_size
        img.draft("L", (max(1, int(want[0])), max(1, int(want[1]))))
    elif source_format == "JPEG" and img.mode == "RGB":
        img.draft("L", img.size)
    try:
        img.load()
    except OSError as exc:
        message = str(exc)
        if "truncated" in message or "premature end" in message.lower():
            raise ImageRejected(RejectReason.TRUNCATED, f"{source_format} data ends early: {message}") from exc
        raise ImageRejected(RejectReason.CORRUPT, f"{source_format} data is corrupt: {message}") from exc
    except (SyntaxError, ValueError, struct.error) as exc:
        raise ImageRejected(RejectReason.CORRUPT, f"{source_format} data is corrupt: {exc}") from exc

    if source_format == "JPEG" and source_mode == "RGB":  # decoded straight to luma above
        colour = _jpeg_colourfulness(data)
    else:
        colour = _pillow_colourfulness(img)
    pixels, bit_depth = _pillow_to_luminance(img)
    return DecodedImage(pixels=pixels, width=width, height=height, source_format=source_format,
                        source_mode=source_mode, bit_depth=bit_depth, colourfulness=colour)


def _jpeg_colourfulness(data: bytes) -> float:
    """Colourfulness of a colour JPEG whose pixels were decoded straight to luma: a second
    decode at 1/8 scale in the DCT domain (~0.3 ms for FracAtlas's 454 x 373 JPEGs)."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, struct.error):
        return 0.0  # cannot happen after the full decode succeeded; grey is the safe default
    return colourfulness(np.asarray(img.convert("RGB")))


_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_COLOUR_SAMPLES = 64  # colourfulness is measured on at most 64 x 64 pixels: ~0.1 ms


def _pillow_colourfulness(img: Image.Image) -> float:
    if img.mode in _GREY_MODES:
        return 0.0
    step = max(1, math.ceil(max(img.size) / _COLOUR_SAMPLES))
    small = img if step == 1 else img.resize((max(1, img.width // step), max(1, img.height // step)),
                                             Image.Resampling.NEAREST)
    return colourfulness(np.asarray(small.convert("RGB")))


def colourfulness(rgb: np.ndarray, top: float = 255.0) -> float:
    """Hasler & Suesstrunk's colourfulness M of an HxWx3 RGB array with values in [0, top],
    on a 0-255 scale: sqrt(var(R-G) + var((R+G)/2-B)) + 0.3 * sqrt(mean(R-G)^2 + mean((R+G)/2-B)^2).
    Grey (R=G=B) gives 0; the paper's "slightly colourful" begins near 15 and photographs
    typically measure 30-100. Larger arrays are subsampled to at most 64 x 64 pixels."""
    step = max(1, math.ceil(max(rgb.shape[:2]) / _COLOUR_SAMPLES))
    small = rgb[::step, ::step, :3].astype(np.float32) * np.float32(255.0 / top)
    rg = small[..., 0] - small[..., 1]
    yb = 0.5 * (small[..., 0] + small[..., 1]) - small[..., 2]
    spread = math.sqrt(float(rg.var()) + float(yb.var()))
    offset = math.sqrt(float(rg.mean()) ** 2 + float(yb.mean()) ** 2)
    return round(spread + 0.3 * offset, 3)


def _pillow_to_luminance(img: Image.Image) -> tuple[np.ndarray, int]:
    mode = img.mode
    if mode == "L":
        return np.asarray(img), 8
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        arr = np.asarray(img).astype(np.float32)
        return arr * np.float32(1.0 / 65535.0), 16
    if mode == "I":
        # 32-bit integer mode: Pillow's older representation of 16-bit grayscale PNG.
        arr = np.asarray(img)
        top = 65535.0 if arr.max(initial=0) <= 65535 and arr.min(initial=0) >= 0 else None
        if top is None:
            return _min_max(arr.astype(np.float64)), 32
        return arr.astype(np.float32) * np.float32(1.0 / top), 16
    if mode == "F":
        return _min_max(np.asarray(img).astype(np.float64)), 32
    if mode in ("LA", "La", "PA"):
        # Alpha carries no X-ray signal; keep luminance only.
        return np.asarray(img.convert("L")), 8
    # RGB, RGBA, CMYK, YCbCr, P, 1, ...: Pillow's luma conversion.
    return np.asarray(img.convert("L")), 8


def _min_max(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not math.isfinite(lo) or not math.isfinite(hi):
        raise ImageRejected(RejectReason.CORRUPT, "pixel data contains NaN or infinity")
    if hi <= lo:
        return np.zeros(arr.shape, np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


# ----------------------------------------------------------------------------- DICOM

def _infer_transfer_syntax(ds) -> None:
    """A data set read without file meta (a raw data set, or meta without (0002,0010)) is
    uncompressed in the encoding pydicom found while reading it: say so, so its pixels decode."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    implicit, little = ds.original_encoding
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _decode_dicom(data: bytes, *, max_pixels: int, min_side: int) -> DecodedImage:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError) as exc:
        raise ImageRejected(RejectReason.CORRUPT, f"unreadable DICOM: {exc}") from exc
    if "PixelData" in ds and "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        _infer_transfer_syntax(ds)
    if "PixelData" not in ds:
        if not hasattr(ds, "SOPClassUID") and not hasattr(ds, "Modality"):
            raise ImageRejected(RejectReason.NOT_AN_IMAGE, "neither an image nor a DICOM object")
        raise ImageRejected(RejectReason.UNSUPPORTED_DICOM, "the DICOM object has no pixel data (e.g. a report or structured document)")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if not rows or not cols:  # pixel data without the Image Pixel module: not a small image, a broken object
        missing = " and ".join(k for k, v in (("Rows", rows), ("Columns", cols)) if not v)
        raise ImageRejected(RejectReason.CORRUPT,
                            f"the DICOM object has pixel data ({len(ds.PixelData):,} bytes) but no {missing} (its "
                            f"Image Pixel module is missing), so its pixels cannot be laid out as an image")
    _check_size(cols, rows, max_pixels, min_side)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise ImageRejected(RejectReason.UNSUPPORTED_DICOM,
                            f"invalid NumberOfFrames {ds.get('NumberOfFrames')!r}") from exc
    if frames > 1:
        raise ImageRejected(RejectReason.UNSUPPORTED_DICOM, f"multi-frame DICOM ({frames} frames) is not a plain radiograph")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for missing codecs / bad data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        name = getattr(syntax, "name", str(syntax))
        raise ImageRejected(
            RejectReason.UNSUPPORTED_DICOM,
            f"cannot decode pixel data (transfer syntax {name}): {exc}. "
            f"Install the matching pydicom pixel handler (e.g. pylibjpeg) to read it",
        ) from exc

    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR"):
        # YBR_*: pydicom 3's pixel_array already returns RGB (as_rgb=True; the JPEG 2000
        # decoders undo YBR_RCT/ICT), so no further colour conversion here.
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut
            arr = apply_color_lut(arr, ds)
        # Palette LUT output spans its dtype; RGB/YBR samples span BitsStored.
        top = np.iinfo(arr.dtype).max if photometric == "PALETTE COLOR" and arr.dtype.kind == "u" \
            else 2 ** int(ds.get("BitsStored", 8)) - 1
        colour = colourfulness(arr, float(top))
        rgb = arr.astype(np.float64)
        arr = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        bit_depth = int(ds.get("BitsStored", 8))
        pixels = _min_max(arr)
    elif photometric in ("MONOCHROME1", "MONOCHROME2"):
        colour = 0.0
        bit_depth = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
        values = apply_modality_lut(arr, ds).astype(np.float64)
        pixels = _apply_voi(values, ds)
        if photometric == "MONOCHROME1":
            # MONOCHROME1: high values are dark. Invert so bone is bright, as in MONOCHROME2.
            pixels = np.float32(1.0) - pixels
    else:
        raise ImageRejected(RejectReason.UNSUPPORTED_DICOM, f"photometric interpretation {photometric} is not supported")

    body_part = ds.get("BodyPartExamined")
    modality = str(ds.get("Modality", "") or "").strip().upper() or None
    return DecodedImage(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32), width=cols, height=rows,
        source_format="DICOM", source_mode=photometric, bit_depth=bit_depth,
        body_part=(str(body_part).strip().lower() or None) if body_part else None,
        modality=modality, colourfulness=colour,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")).strip() or None,
    )


def _first(value):
    """DICOM multi-valued elements (several windows) -> the first one."""
    try:
        return float(value[0])
    except (TypeError, IndexError):
        return float(value)


def _apply_voi(values: np.ndarray, ds) -> np.ndarray:
    """VOI LUT or window (DICOM PS3.3 C.11.2) to [0, 1]; else the full range, unclipped."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        from pydicom.pixels import apply_voi_lut
        item = ds.VOILUTSequence[0]
        lut_bits = int(item.LUTDescriptor[2])
        # A LUT is indexed by integer modality values.
        out = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0, prefer_lut=True).astype(np.float64)
        return (out / float(2 ** lut_bits - 1)).astype(np.float32)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        if width < 1:
            raise ImageRejected(RejectReason.UNSUPPORTED_DICOM, f"invalid WindowWidth {width}")
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        if function == "SIGMOID":
            out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        elif function == "LINEAR_EXACT":
            out = np.clip((values - center) / width + 0.5, 0.0, 1.0)
        else:  # LINEAR, the standard's default
            out = np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
        return out.astype(np.float32)
    return _min_max(values)
