"""Is this a limb radiograph at all? Out-of-scope inputs get no fracture probability.

The models were trained on projection radiographs of the limbs (MURA's upper extremity,
FracAtlas's hand, leg, hip and shoulder). A photograph, a CT/MR/US/NM slice, a chest
film or a blank image would still get a probability from them, and that number would
mean nothing. ``assess_scope`` looks at what the decoder learnt (:class:`DecodedImage`)
and answers with a :class:`ScopeVerdict`; callers report ``out_of_scope`` with its
reason instead of scoring.

Checks, in order (the first that fires is the reason):

1. DICOM header, where there is one:
   ``dicom_modality:<MODALITY>``: a Modality other than projection radiography
   (CR, DX, RG, DR). "OT" (other) and an absent Modality decide nothing: the pixels do.
   ``dicom_body_part:<part>``: BodyPartExamined names a region outside the limbs
   (chest, abdomen, head, spine, breast, ...). An absent or unknown body part is not
   by itself a refusal.
2. Pixels (measured on the decoded luminance, and the colour of the source):
   ``colour_photo``: colourfulness (Hasler & Suesstrunk) above ``max_colourfulness``;
   radiographs stored as RGB carry grey (FracAtlas: 0.0 on every image).
   ``blank``: almost no variation at all.
   ``low_dynamic_range``: the 1st-99th percentile spread is tiny (a near-uniform image).
   ``few_grey_levels``: a handful of distinct levels or a very low histogram entropy:
   drawings, text, masks, phantoms.
   ``noise``: neighbouring pixels are uncorrelated (random noise, not anatomy).

Every threshold lives in :class:`ScopeConfig` with the measurement it came from
(pipelines/check_scope.py measures them: FracAtlas, the synthetic radiographs, and
the out-of-scope corpus from scikit-image, pydicom and synthetic non-radiographs).
What these checks do not catch: grey natural photographs and CT/MR slices exported
without their DICOM header (they look like grey images with real structure).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import cv2
import numpy as np

from .decode import DecodedImage

__all__ = ["ScopeVerdict", "ScopeConfig", "assess_scope", "scope_features", "OUT_OF_SCOPE"]

OUT_OF_SCOPE = "out_of_scope"  # the status / error code callers report

_MODALITY_NAMES = {
    "CT": "computed tomography", "MR": "magnetic resonance", "US": "ultrasound", "NM": "nuclear medicine",
    "PT": "PET", "MG": "mammography", "XA": "X-ray angiography", "RF": "fluoroscopy", "SR": "a structured report",
    "SEG": "a segmentation", "RTDOSE": "a radiotherapy dose", "RTIMAGE": "a radiotherapy portal image",
    "IO": "intra-oral dental X-ray", "PX": "panoramic dental X-ray", "ES": "endoscopy", "XC": "external camera photo",
    "OP": "ophthalmic photo", "SM": "slide microscopy", "ECG": "an ECG", "DOC": "a document",
}

# DICOM defined terms (PS3.16 CID 4031 and common variants) for regions outside the limbs.
_EXCLUDED_BODY_PARTS = frozenset({
    "CHEST", "THORAX", "LUNG", "HEART", "MEDIASTINUM", "RIB", "RIBS", "STERNUM", "BREAST",
    "ABDOMEN", "ABDOMENPELVIS", "CHESTABDOMEN", "CHESTABDPELVIS", "KIDNEY", "LIVER", "PANCREAS",
    "SPLEEN", "GALLBLADDER", "STOMACH", "BOWEL", "COLON", "RECTUM", "BLADDER", "PROSTATE", "UTERUS",
    "HEAD", "BRAIN", "SKULL", "HEADNECK", "NECK", "FACE", "JAW", "MANDIBLE", "MAXILLA", "TMJ", "SINUS",
    "ORBIT", "EYE", "EAR", "NOSE", "TEETH", "DENTAL", "THYROID",
    "SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "CTSPINE", "TLSPINE", "LSSPINE", "SACRUM", "COCCYX",
    "WHOLEBODY",
})


@dataclasses.dataclass(frozen=True)
class ScopeVerdict:
    in_scope: bool
    reason: str = ""   # "" when in scope; e.g. "dicom_modality:CT", "dicom_body_part:chest", "colour_photo"
    detail: str = ""   # one sentence a person can act on

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


IN_SCOPE = ScopeVerdict(True)


@dataclasses.dataclass(frozen=True)
class ScopeConfig:
    """Thresholds of :func:`assess_scope`. The measured values (FracAtlas: all 3,702 readable
    images of the copy in ../shared/data incl. the full-resolution sample; synthetic: the
    project's generators) are in the comments; each threshold keeps a wide margin to them.

    accepted_modalities: projection radiography. CR, DX, RG (film), and DR, which is not a
        DICOM term but what several vendors write. RF/XA (fluoroscopy, angiography), MG
        (mammography), IO/PX (dental), CT, MR, US, NM, PT ... are refused.
    undecided_modalities: a header that says nothing about content (OT "other", used by
        secondary captures and film scanners): the pixel checks decide, as without a header.
    excluded_body_parts: BodyPartExamined values (upper case, spaces/_/- removed) refused.
        Exact matches only: DICOM writes defined terms, and free text such as "NECK OF FEMUR"
        must not be caught by a partial match. Unknown or absent parts pass.
    max_colourfulness: refused above. FracAtlas 0.0 (max; its RGB files carry grey), synthetic
        0.0; scikit-image's photographs 35-110, colour ultrasound 50-140. 15 is the boundary
        between "not" and "slightly colourful" in Hasler & Suesstrunk's scale; small coloured
        annotations on a radiograph stay far below it.
    blank_max_std: std of the [0, 1] pixels at or below which the image is blank. FracAtlas min
        0.049, synthetic min 0.16; blank files 0.0, grey with +-2 levels of noise 0.008.
    min_dynamic_range: 99th minus 1st percentile of [0, 1] pixels, refused below. FracAtlas min
        0.275, synthetic min 0.61; near-uniform captures 0.005-0.05.
    min_grey_levels: distinct 8-bit levels, refused below. FracAtlas min 139, synthetic 177;
        masks, checkerboards, phantoms 2-8.
    min_entropy_bits: Shannon entropy of the 256-bin histogram, refused below. FracAtlas min
        2.26 (p1 3.5), synthetic min 4.6; text and documents 0.9-1.2, binary silhouettes 1.15.
    min_neighbour_correlation: correlation of horizontally adjacent pixels (on a copy at most
        ``analysis_side`` px, area-averaged), refused below. FracAtlas min 0.64 (median 0.98),
        synthetic min 0.95; random noise images 0.0-0.2.
    analysis_side: the pixel checks run on at most this many pixels per side (512 px for the
        histogram statistics, from a strided sample that keeps the exact grey levels).
    """

    accepted_modalities: frozenset[str] = frozenset({"CR", "DX", "RG", "DR"})
    undecided_modalities: frozenset[str] = frozenset({"OT"})
    excluded_body_parts: frozenset[str] = _EXCLUDED_BODY_PARTS
    max_colourfulness: float = 15.0
    blank_max_std: float = 0.01
    min_dynamic_range: float = 0.15
    min_grey_levels: int = 32
    min_entropy_bits: float = 1.5
    min_neighbour_correlation: float = 0.3
    analysis_side: int = 256

    def __post_init__(self):
        for name in ("accepted_modalities", "undecided_modalities", "excluded_body_parts"):
            object.__setattr__(self, name, frozenset(_norm(v) for v in getattr(self, name)))
        if self.analysis_side < 16:
            raise ValueError(f"analysis_side must be at least 16. Got {self.analysis_side}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("accepted_modalities", "undecided_modalities", "excluded_body_parts"):
            out[name] = sorted(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ScopeConfig":
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown scope settings {unknown}; known: {sorted(known)}")
        return cls(**data)


def _norm(value: str) -> str:
    return "".join(ch for ch in str(value).upper() if ch.isalnum())


def scope_features(decoded: DecodedImage, analysis_side: int = 256) -> dict[str, float]:
    """The pixel measurements the checks use (for reports and threshold studies)."""
    pixels = decoded.pixels
    h, w = pixels.shape[:2]
    # Histogram statistics on a strided sample (exact grey levels kept), at most 2 x analysis_side.
    step = max(1, math.ceil(max(h, w) / (2 * analysis_side)))
    grid = pixels[::step, ::step]
    levels8 = grid if grid.dtype == np.uint8 else np.rint(np.clip(grid, 0.0, 1.0) * 255.0).astype(np.uint8)
    hist = np.bincount(levels8.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    values = np.arange(256, dtype=np.float64) / 255.0
    mean = float((p * values).sum())
    std = math.sqrt(max(0.0, float((p * (values - mean) ** 2).sum())))
    cdf = np.cumsum(p)
    p1, p99 = (float(np.searchsorted(cdf, q) / 255.0) for q in (0.01, 0.99))
    nz = p[p > 0]
    # Neighbour correlation on an area-averaged copy: scale-independent, and blind to fine
    # detector noise that a strided sample would alias.
    scale = min(1.0, analysis_side / max(h, w))
    small = pixels if scale >= 1.0 else cv2.resize(
        pixels, (max(2, round(w * scale)), max(2, round(h * scale))), interpolation=cv2.INTER_AREA)
    small = small.astype(np.float32)  # the correlation is scale-free: uint8 and [0, 1] pixels alike
    small -= small.mean()
    a, b = small[:, :-1], small[:, 1:]
    energy = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    corr = float((a * b).sum()) / energy if energy > 0 else 1.0  # lag-1 autocorrelation; flat -> 1
    return {"colourfulness": float(decoded.colourfulness), "std": std, "dynamic_range": p99 - p1,
            "grey_levels": int((hist > 0).sum()), "entropy_bits": max(0.0, float(-(nz * np.log2(nz)).sum())),
            "neighbour_correlation": corr}


def assess_scope(decoded: DecodedImage, config: ScopeConfig = ScopeConfig()) -> ScopeVerdict:
    """In scope (a limb radiograph, as far as these checks can tell) or out of scope, with why."""
    verdict = _assess_header(decoded, config)
    if verdict is not None:
        return verdict
    if decoded.colourfulness > config.max_colourfulness:
        return ScopeVerdict(False, "colour_photo",
                            f"the image is in colour (colourfulness {decoded.colourfulness:.1f} > "
                            f"{config.max_colourfulness:g}): a photograph or a colour capture, not a radiograph")
    f = scope_features(decoded, config.analysis_side)
    if f["std"] <= config.blank_max_std:
        return ScopeVerdict(False, "blank", f"the image is blank (pixel std {f['std']:.4f} <= "
                                            f"{config.blank_max_std:g}): nothing to read")
    if f["dynamic_range"] < config.min_dynamic_range:
        return ScopeVerdict(False, "low_dynamic_range",
                            f"the image is nearly uniform (1st-99th percentile spread {f['dynamic_range']:.3f} < "
                            f"{config.min_dynamic_range:g} of the range); a radiograph spans far more")
    if f["grey_levels"] < config.min_grey_levels or f["entropy_bits"] < config.min_entropy_bits:
        return ScopeVerdict(False, "few_grey_levels",
                            f"the image has {f['grey_levels']} grey levels and {f['entropy_bits']:.2f} bits of "
                            f"histogram entropy (minimum {config.min_grey_levels} and {config.min_entropy_bits:g}): "
                            f"a drawing, text, mask or graphic, not a radiograph")
    if f["neighbour_correlation"] < config.min_neighbour_correlation:
        return ScopeVerdict(False, "noise",
                            f"neighbouring pixels are uncorrelated ({f['neighbour_correlation']:.2f} < "
                            f"{config.min_neighbour_correlation:g}): random noise, not anatomy")
    return IN_SCOPE


def _assess_header(decoded: DecodedImage, config: ScopeConfig) -> ScopeVerdict | None:
    modality = _norm(decoded.modality) if decoded.modality else ""
    if modality and modality not in config.accepted_modalities and modality not in config.undecided_modalities:
        what = _MODALITY_NAMES.get(modality)
        return ScopeVerdict(False, f"dicom_modality:{modality}",
                            f"the DICOM Modality is {modality}" + (f" ({what})" if what else "") +
                            f"; this service reads projection radiographs only "
                            f"({', '.join(sorted(config.accepted_modalities))})")
    if decoded.body_part and _norm(decoded.body_part) in config.excluded_body_parts:
        part = "_".join(decoded.body_part.lower().split())
        return ScopeVerdict(False, f"dicom_body_part:{part}",
                            f"the DICOM BodyPartExamined is {decoded.body_part.strip().upper()}; the fracture models "
                            f"cover the limbs (hand to shoulder, hip to foot), not this region")
    return None
