"""Where the DICOM node's results go: STOW-RS into a DICOMweb service (``dicomweb[s]://``) or
C-STORE to a PACS's AE (``dimse[s]://``, ``fracray.pacs.dimse``)."""

from __future__ import annotations

import dataclasses
import io

from .. import dicomweb
from .dimse import DimseDestination, TlsFiles, is_dimse, send_instances

__all__ = ["DicomWebDestination", "Destination", "parse_destination", "send_results"]


@dataclasses.dataclass(frozen=True)
class DicomWebDestination:
    """Results stored by STOW-RS into a DICOMweb service (``dicomweb://`` HTTP, ``dicomwebs://``
    HTTPS; credentials from FRACRAY_DICOMWEB_TOKEN or FRACRAY_DICOMWEB_USER/PASSWORD)."""

    uri: str

    def __post_init__(self):
        loc = dicomweb.parse(self.uri)  # ValueError for another scheme or credentials in the URI
        if loc.study or loc.query:
            raise ValueError(f"A DICOMweb destination is the service's root (e.g. dicomweb://pacs:8042/dicom-web), "
                             f"not a study or a query. Got {self.uri!r}")

    def describe(self) -> str:
        return dicomweb.parse(self.uri).uri_base


Destination = DicomWebDestination | DimseDestination


def parse_destination(text: str, *, calling_ae: str = "FRACRAY", tls_files: TlsFiles | None = None) -> Destination:
    """``dicomweb[s]://host:port/root`` (STOW-RS) or ``dimse[s]://CALLED_AE@host:port`` (C-STORE)."""
    if dicomweb.is_dicomweb(text):
        if tls_files is not None:
            raise ValueError(f"TLS files are for a dimses:// destination; a dicomwebs:// one verifies with the "
                             f"system's CAs (or REQUESTS_CA_BUNDLE). Got {text!r}")
        return DicomWebDestination(text)
    if is_dimse(text):
        return DimseDestination.parse(text, calling_ae=calling_ae, tls_files=tls_files)
    raise ValueError(f"Results go to dicomweb[s]://host:port/root (STOW-RS) or dimse[s]://CALLED_AE@host:port "
                     f"(C-STORE). Got {text!r}")


def send_results(destination: Destination, instances: list) -> None:
    """Store the data sets in the destination. Raises dicomweb.DicomWebError / DimseError (their
    *Refused subclasses when the PACS refuses them)."""
    if isinstance(destination, DicomWebDestination):
        files = []
        for ds in instances:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            files.append(buf.getvalue())
        dicomweb.store_instances(destination.uri, files)
    else:
        send_instances(destination, instances)
