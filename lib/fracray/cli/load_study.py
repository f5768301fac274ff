"""``fracray load-study`` / ``load_study.py``: radiographs (JPEG, PNG) -> one DX or CR study of
DICOM objects as a modality writes them, stored into a PACS by STOW-RS or written as files. For
trying the hospital integration on a test PACS (Orthanc) with real images; never for patient data
(the patient module is a made-up demo identity)."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np

from .. import dicomweb, storage
from ..imaging.decode import ImageRejected, decode_image
from ..pacs.wrap import TRANSFER_SYNTAXES, StudyIdentity, wrap_radiograph
from .common import add_storage_arguments, storage_options_from_args

__all__ = ["build_parser", "main"]


def build_parser(prog: str = "load_study.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="Example: load_study.py ../shared/data/fracatlas/FracAtlas/images/Fractured/IMG0000019.jpg "
               "--body-part HAND --transfer-syntax jpeg-ls --pacs dicomweb://127.0.0.1:8042/dicom-web\n"
               "Then: score_archive.py --input 'dicomweb://127.0.0.1:8042/dicom-web?ModalitiesInStudy=DX' ...",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files or URIs (JPEG, PNG, TIFF ...): one instance each")
    parser.add_argument("--pacs", default=None, help="DICOMweb service to store the study into, e.g. "
                        "dicomweb://127.0.0.1:8042/dicom-web (credentials: FRACRAY_DICOMWEB_TOKEN or _USER/_PASSWORD)")
    parser.add_argument("--output", default=None, help="also (or instead) write the .dcm files into this folder")
    parser.add_argument("--modality", choices=["DX", "CR"], default="DX")
    parser.add_argument("--body-part", default=None, help="BodyPartExamined, e.g. HAND, WRIST, LEG (default: none)")
    parser.add_argument("--transfer-syntax", choices=sorted(TRANSFER_SYNTAXES), default="explicit",
                        help="encoding of the pixel data (default: %(default)s, uncompressed)")
    parser.add_argument("--monochrome1", action="store_true", help="store inverted (MONOCHROME1), as many CR do")
    parser.add_argument("--patient-id", default=None, help="demo patient ID (default: derived from the images)")
    parser.add_argument("--study-date", default="20261124", help="StudyDate, YYYYMMDD (default: %(default)s)")
    add_storage_arguments(parser)
    return parser


def _pixels(decoded) -> np.ndarray:
    if decoded.pixels.dtype == np.uint8:
        return decoded.pixels
    bits = 16 if decoded.bit_depth > 8 else 8  # float in [0, 1] from a deeper source
    scale = (1 << bits) - 1
    return np.clip(np.rint(decoded.pixels * scale), 0, scale).astype(np.uint16 if bits == 16 else np.uint8)


def main(argv: list[str] | None = None, *, prog: str = "load_study.py") -> int:
    from pydicom.uid import generate_uid

    args = build_parser(prog).parse_args(argv)
    if args.pacs is None and args.output is None:
        print("error: give --pacs (store by STOW-RS) and/or --output (write files)", file=sys.stderr)
        return 2
    if args.pacs is not None and not dicomweb.is_dicomweb(args.pacs):
        print(f"error: --pacs must be a dicomweb:// or dicomwebs:// URI. Got {args.pacs!r}", file=sys.stderr)
        return 2
    if not (len(args.study_date) == 8 and args.study_date.isdigit()):
        print(f"error: --study-date must be YYYYMMDD. Got {args.study_date!r}", file=sys.stderr)
        return 2
    options = storage_options_from_args(args)
    # One deterministic study per set of images: loading the same images again replaces them.
    key = hashlib.sha256("\n".join(sorted(args.images)).encode()).hexdigest()
    study = StudyIdentity(patient_id=args.patient_id or f"DEMO-{key[:8].upper()}", patient_name="DEMO^FRACRAY",
                          study_uid=generate_uid(entropy_srcs=[key, "study"]), accession=f"D{key[:12].upper()}",
                          study_date=args.study_date)
    series_uid = generate_uid(entropy_srcs=[key, "series"])
    files: list[tuple[str, bytes]] = []
    try:
        for number, uri in enumerate(args.images, start=1):
            try:
                decoded = decode_image(storage.read_bytes(uri, options), name=uri)
            except ImageRejected as exc:
                print(f"error: {uri}: {exc.reason.value}: {exc.detail}", file=sys.stderr)
                return 2
            files.append((f"IM{number:04d}.dcm", wrap_radiograph(
                _pixels(decoded), study, series_uid=series_uid, instance_number=number, modality=args.modality,
                body_part=args.body_part, monochrome1=args.monochrome1, transfer_syntax=args.transfer_syntax,
                sop_uid=generate_uid(entropy_srcs=[key, uri]))))
        if args.output:
            os.makedirs(args.output, exist_ok=True)
            for name, data in files:
                with open(os.path.join(args.output, name), "wb") as f:
                    f.write(data)
        if args.pacs:
            dicomweb.store_instances(args.pacs, [data for _, data in files])
    except (FileNotFoundError, ValueError, storage.StorageError, dicomweb.DicomWebError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    where = " and ".join(w for w in (args.pacs and "the PACS", args.output) if w)
    print(f"Stored a {args.modality} study of {len(files)} image(s) ({args.transfer_syntax}) in {where}: "
          f"StudyInstanceUID {study.study_uid}")
    return 0
