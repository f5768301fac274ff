"""DICOM's own network protocol (DIMSE) for sending results: C-STORE to a PACS's AE, with optional TLS.

A destination is written ``dimse://CALLED_AE@host:port`` (plain TCP) or
``dimses://CALLED_AE@host:port`` (TLS, DICOM PS3.15 B.1 "Basic TLS Secure Transport"): the
called AE title is the PACS's, the calling AE title ours (``--send-ae``, default FRACRAY),
and the PACS must know it (a hospital PACS usually accepts stores only from AE titles it has
been told about, at the host they come from).

Errors say which AE and host refused and what status came back; they never name an instance
(its UIDs, let alone its patient).
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import Sequence
from urllib.parse import urlparse

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import build_context

__all__ = ["DimseError", "DimseUnavailable", "DimseRefused", "TlsFiles", "DimseDestination", "SCHEMES", "is_dimse", "check_ae_title", "server_context",
           "client_context", "send_instances"]

SCHEMES = ("dimse", "dimses")
DEFAULT_CALLING_AE = "FRACRAY"


class DimseError(OSError):
    """The DICOM peer could not be reached, refused the association, or refused an instance."""


class DimseUnavailable(DimseError):
    """The peer could not be reached, did not answer, ran out of resources (0xA7xx) or refused or
    dropped the association: worth trying again later (also a configuration to fix: AE titles)."""


class DimseRefused(DimseError):
    """The peer answered instances with a failure status that sending them again will not change
    (SOP class not supported, data set does not match it, cannot understand, not authorised)."""


def check_ae_title(value: str, what: str = "AE title") -> str:
    """An AE title as DICOM allows it (PS3.5 6.2, AE): 1 to 16 characters of printable ASCII
    without backslash, not only spaces. Returns it stripped of surrounding spaces."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be 1 to 16 characters (printable ASCII, no backslash). Got {value!r}")
    stripped = value.strip()
    if len(stripped) > 16 or "\\" in stripped or not all(32 <= ord(c) < 127 for c in stripped):
        raise ValueError(f"{what} must be 1 to 16 characters (printable ASCII, no backslash). Got {value!r}")
    return stripped


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS connection.

    As a server (the listener): ``cert`` and ``key`` are required; with ``ca``, callers must
    present a certificate that CA signed (mutual TLS). As a client (sending results):
    ``ca`` verifies the PACS (default: the system's CAs); ``cert`` and ``key`` are ours,
    for a PACS that requires client certificates."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError(f"A TLS certificate and its private key go together: give both or neither. "
                             f"Got cert={self.cert!r}, key={self.key!r}")
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"TLS {name} file not found. Got {path!r}")


def server_context(tls: TlsFiles) -> ssl.SSLContext:
    """The listener's TLS context: TLS 1.2 or newer, our certificate, and client certificates
    required when a CA is given."""
    if tls.cert is None:
        raise ValueError(f"A TLS listener needs a certificate and its key. Got {tls}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    if tls.ca is not None:
        context.load_verify_locations(cafile=tls.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: TlsFiles | None) -> ssl.SSLContext:
    """A TLS client context that verifies the peer (``tls.ca``, else the system's CAs) and its
    host name, TLS 1.2 or newer, with our certificate when given."""
    tls = tls or TlsFiles()
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert is not None:
        context.load_cert_chain(tls.cert, tls.key)
    return context


def is_dimse(uri: str) -> bool:
    return urlparse(uri).scheme.lower() in SCHEMES


@dataclasses.dataclass(frozen=True)
class DimseDestination:
    """Where C-STORE sends results: the PACS's host, port and AE title, ours, and TLS."""

    host: str
    port: int
    called_ae: str
    calling_ae: str = DEFAULT_CALLING_AE
    tls: bool = False
    tls_files: TlsFiles | None = None
    timeout_s: float = 60.0

    def __post_init__(self):
        if not self.host:
            raise ValueError(f"A C-STORE destination needs a host. Got {self.host!r}")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"A C-STORE destination port must be 1 to 65535. Got {self.port!r}")
        object.__setattr__(self, "called_ae", check_ae_title(self.called_ae, "The PACS's (called) AE title"))
        object.__setattr__(self, "calling_ae", check_ae_title(self.calling_ae, "Our (calling) AE title"))
        if self.tls_files is not None and not self.tls:
            raise ValueError(f"TLS files were given for a plain dimse:// destination; use dimses://. Got "
                             f"{self.tls_files}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive. Got {self.timeout_s}")

    @classmethod
    def parse(cls, uri: str, *, calling_ae: str = DEFAULT_CALLING_AE, tls_files: TlsFiles | None = None,
              timeout_s: float = 60.0) -> "DimseDestination":
        """``dimse://CALLED_AE@host:port`` or ``dimses://CALLED_AE@host:port`` (TLS)."""
        parsed = urlparse(uri)
        scheme = parsed.scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError(f"A C-STORE destination is dimse://CALLED_AE@host:port or dimses://... (TLS). Got {uri!r}")
        if not parsed.username or parsed.password or not parsed.hostname or parsed.path not in ("", "/"):
            raise ValueError(f"A C-STORE destination is {scheme}://CALLED_AE@host:port, e.g. "
                             f"{scheme}://PACS@pacs.hospital.org:104. Got {uri!r}")
        try:
            port = parsed.port
        except ValueError as exc:
            raise ValueError(f"A C-STORE destination needs a port 1 to 65535. Got {uri!r}") from exc
        if port is None:
            raise ValueError(f"A C-STORE destination needs a port, e.g. {scheme}://PACS@host:104. Got {uri!r}")
        return cls(host=parsed.hostname, port=port, called_ae=parsed.username, calling_ae=calling_ae,
                   tls=scheme == "dimses", tls_files=tls_files, timeout_s=timeout_s)

    def describe(self) -> str:
        return f"{'dimses' if self.tls else 'dimse'}://{self.called_ae}@{self.host}:{self.port}"


def send_instances(destination: DimseDestination, datasets: Sequence) -> int:
    """C-STORE every dataset (pydicom Datasets with file meta) in one association; returns how
    many were stored. Raises DimseError when the PACS cannot be reached, refuses the association
    or a presentation context, or answers any instance with a failure status (warnings count
    as stored: DICOM's "stored, with coercion")."""
    if not datasets:
        return 0
    ae = AE(ae_title=destination.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout_s
    ae.connection_timeout = destination.timeout_s
    proposed: dict[str, list[str]] = {}
    for ds in datasets:
        syntaxes = proposed.setdefault(str(ds.SOPClassUID), [])
        for syntax in (str(ds.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if syntax not in syntaxes:
                syntaxes.append(syntax)
    contexts = [build_context(sop_class, syntaxes) for sop_class, syntaxes in proposed.items()]
    where = f"C-STORE to {destination.describe()}"
    tls_args = (client_context(destination.tls_files), destination.host) if destination.tls else None
    try:
        assoc = ae.associate(destination.host, destination.port, contexts=contexts, ae_title=destination.called_ae,
                             tls_args=tls_args)
    except (OSError, ssl.SSLError) as exc:
        raise DimseUnavailable(f"{where}: could not connect ({type(exc).__name__})") from exc
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise DimseUnavailable(f"{where}: association {why}; check the PACS's AE title ({destination.called_ae}), that it "
                         f"knows ours ({destination.calling_ae}) at this host, the port"
                         + (" and the TLS certificates" if destination.tls else ""))
    stored, failures, transient = 0, [], False
    try:
        for ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except ValueError:  # no presentation context accepted for its SOP class: the PACS takes none
                failures.append("SOP class not accepted")
                continue
            except RuntimeError as exc:  # the association dropped
                failures.append(type(exc).__name__)
                transient = True
                continue
            code = getattr(status, "Status", None) if status else None
            if code is None:
                failures.append("no answer")
                transient = True
            elif code == 0x0000 or 0xB000 <= code <= 0xBFFF:  # success, or a warning (stored with coercion)
                stored += 1
            else:
                failures.append(f"status 0x{code:04X}")
                transient = transient or 0xA700 <= code <= 0xA7FF  # out of resources: later may do
    finally:
        if assoc.is_established:
            assoc.release()
    if failures:
        kind = DimseUnavailable if transient else DimseRefused
        raise kind(f"{where}: {len(failures)} of {len(datasets)} instance(s) not stored "
                   f"({', '.join(sorted(set(failures)))})")
    return stored
