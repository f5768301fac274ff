"""A DICOM node: a C-STORE SCP that a modality or PACS routes studies to, which classifies each
complete study through the Ray Serve service and sends the result back to the PACS.

    modality / PACS --C-STORE--> Listener --spool/<study>/--> (idle study_idle_s) -->
        POST {service_url}/v1/classify/study --> StudyFinding --> SR + overlay SCs
        --> STOW-RS (dicomweb[s]://...) or C-STORE (dimse[s]://AE@host:port) into the same study

- Accepted and classified: single-frame CR, DX (for presentation and for processing) and
  Secondary Capture images, in the uncompressed, JPEG, JPEG-LS, JPEG 2000 and RLE syntaxes.
- Accepted and skipped (success status, so the sender does not retry forever; one log line
  with the SOP class and the reason): every other storage SOP class (SR, RT, ECG, CT, ...),
  multi-frame images, images without pixel data, and fracray's own results routed back to it.
- Every accepted instance is written to ``spool/<study key>/`` before the sender gets its
  answer, so nothing is lost if the process dies; a restarted listener picks the spool up.
- A study is complete when none of its instances has arrived for ``study_idle_s``. It is sent
  in requests of at most ``max_study_images`` images (and ``max_request_mb``); the study's
  verdict is the service's rule (``metrics.study.study_decision``) over all its scored images.
- The results' UIDs are derived from the study and the model (``results.result_uid``), so a
  study classified again replaces its results instead of adding copies.
- After the results are stored the study's spool is removed. Failures are of two kinds:
  *transient* (the service or the PACS unreachable, overloaded, 5xx, out of resources, our
  credentials or AE title refused) keep the study and retry it with back-off (the results
  already built are kept, so a retry only sends them again); after ``max_attempts`` the study
  is dead-lettered. *Permanent* ones (the results cannot be built from these images, or the
  PACS refuses them: STOW-RS 4xx or Failed SOP Sequence, a C-STORE failure status) are logged
  once with the reason and the study dead-lettered at once, never retried.
- The dead letter is ``spool/.failed/<study key>/``: the images as received and ``failure.json``
  (kind, reason, attempts, time, and the traceback; it is patient data like the images, kept
  private). ``listen.py --spool S --list-failed`` shows it; ``listen.py --spool S --replay KEY``
  (or ``--replay all``) moves a study back into the spool, where a running listener, or the next
  one started, classifies it again (``replay_failed``).
- A study the service refuses outright (no image in scope or readable) is logged and dropped:
  there is nothing to report, and nothing failed.
- Hostile or broken peers (``fracray.pacs.server``): association, ACSE and network time-outs,
  a cap on idle connections per peer and in all, the largest PDU accepted, TLS handshakes off
  the accepting thread, and one log line per refusal.

Logs name a study by a key (a hash of its StudyInstanceUID), never by the UID, and never hold
patient names, IDs, accession numbers or other header values; pynetdicom's own logger (which
names UIDs at INFO) is set to WARNING when the listener starts.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
import traceback
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import pydicom
import requests
from pydicom import uid as dicom_uid
from pynetdicom import AE, AllStoragePresentationContexts, VerificationPresentationContexts, evt

from .. import dicomweb, storage
from ..imaging.instances import RADIOGRAPH_SOP_CLASSES, refusal
from ..metrics.study import study_decision
from .dimse import (DimseDestination, DimseError, DimseRefused, TlsFiles, check_ae_title, is_dimse, send_instances,
                    server_context)
from .privacy import scrub as _scrub
from .privacy import study_key
from .results import StudyFinding, overlay_secondary_capture, structured_report
from .server import ServerLimits, start_server

__all__ = ["ListenerConfig", "DicomWebDestination", "Listener", "RADIOGRAPH_SOP_CLASSES", "DECODABLE_SYNTAXES",
           "ServerLimits", "parse_destination", "study_key", "skip_reason", "list_failed", "replay_failed",
           "FAILURE_FILE"]

logger = logging.getLogger(__name__)

# What is classified (RADIOGRAPH_SOP_CLASSES) and which instances: imaging.instances, the rule
# the service's STOW-RS endpoint applies too.
# Transfer syntaxes that the service decodes (pydicom with pylibjpeg, openjpeg and rle); only
# these are accepted for the classes above, so a sender that could also send another syntax
# sends one of these.
DECODABLE_SYNTAXES = [
    dicom_uid.ExplicitVRLittleEndian, dicom_uid.ImplicitVRLittleEndian, dicom_uid.DeflatedExplicitVRLittleEndian,
    dicom_uid.ExplicitVRBigEndian,
    dicom_uid.JPEGBaseline8Bit, dicom_uid.JPEGExtended12Bit, dicom_uid.JPEGLossless, dicom_uid.JPEGLosslessSV1,
    dicom_uid.JPEGLSLossless, dicom_uid.JPEGLSNearLossless, dicom_uid.JPEG2000Lossless, dicom_uid.JPEG2000,
    dicom_uid.RLELossless,
]
_REFUSED_BY_SERVICE = (400, 415, 422)  # the images themselves (unreadable, out of scope): not worth a retry
_FAILED = ".failed"
_PART = ".part"
FAILURE_FILE = "failure.json"


def _instance_file(sop_uid: str) -> str:
    return hashlib.sha256(sop_uid.encode()).hexdigest()[:24] + ".dcm"


def _sop_class_name(sop_class: str) -> str:
    name = dicom_uid.UID(sop_class).name
    return name if name != sop_class else f"SOP class {sop_class}"


def skip_reason(sop_class: str, ds) -> str | None:
    """Why an instance is acknowledged but not classified, or None to classify it: the one rule
    (``imaging.instances.refusal``, which STOW-RS applies too). Says the SOP class and the reason,
    never anything from the header that identifies someone."""
    refused = refusal(ds, sop_class)
    return refused.detail if refused else None


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


@dataclasses.dataclass(frozen=True)
class ListenerConfig:
    """The DICOM node's settings (``fracray listen``'s arguments)."""

    spool: str                          # local folder for received instances (patient data: keep it private);
                                        # one listener per spool
    destination: Destination | str      # where results go; a string is parsed by parse_destination
    ae_title: str = "FRACRAY"           # ours: callers must address us by it; also the calling AE for C-STORE out
    host: str = "127.0.0.1"             # interface to listen on (0.0.0.0: every interface)
    port: int = 11112                   # DICOM's registered port; 0 picks a free one (Listener.port)
    allowed_calling_aes: tuple[str, ...] = ()  # when given, only these AE titles may send to us
    tls: TlsFiles | None = None         # the listener's TLS: cert + key (+ ca: client certificates required)
    service_url: str = "http://127.0.0.1:8000"
    token_env: str = "FRACRAY_API_TOKEN"  # environment variable holding the service's bearer token
    operating_point: str | None = None  # the service's operating_point (name or threshold); None: the model's
    overlays: bool = True               # an overlay SC per scored image besides the SR
    study_idle_s: float = 10.0          # a study is complete when nothing of it has arrived for this long
    max_study_images: int = 32          # images per request (the service's max_study_images)
    max_request_mb: float = 60.0        # bytes per request (below the service's max_upload_mb)
    service_timeout_s: float = 300.0
    retry_backoff_s: float = 5.0        # first retry after a failure; doubled each time
    max_backoff_s: float = 300.0
    max_attempts: int = 20              # transient failures, then the study is dead-lettered (spool/.failed/)
    poll_s: float = 0.5
    limits: ServerLimits = ServerLimits()  # time-outs, idle connections, largest PDU (fracray.pacs.server)

    def __post_init__(self):
        if not self.spool:
            raise ValueError(f"spool must be a folder. Got {self.spool!r}")
        if storage.is_remote(self.spool):
            raise ValueError(f"spool must be a local folder (it holds the received images until they are "
                             f"classified). Got {self.spool!r}")
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "The listener's AE title"))
        object.__setattr__(self, "allowed_calling_aes", tuple(check_ae_title(a, "An allowed calling AE title")
                                                              for a in self.allowed_calling_aes))
        if isinstance(self.destination, str):
            object.__setattr__(self, "destination", parse_destination(self.destination, calling_ae=self.ae_title))
        if not isinstance(self.destination, (DicomWebDestination, DimseDestination)):
            raise ValueError(f"destination must be a DicomWebDestination, a DimseDestination or a URI. "
                             f"Got {self.destination!r}")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ValueError(f"port must be 0 to 65535 (0: any free port). Got {self.port!r}")
        parsed = urlparse(self.service_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"service_url must be the service's http(s):// address, e.g. http://127.0.0.1:8000. "
                             f"Got {self.service_url!r}")
        if self.tls is not None and self.tls.cert is None:
            raise ValueError(f"A TLS listener needs its certificate and key (tls.cert, tls.key). Got {self.tls}")
        for name in ("study_idle_s", "max_request_mb", "service_timeout_s", "retry_backoff_s", "max_backoff_s",
                     "poll_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive. Got {getattr(self, name)!r}")
        if self.max_study_images < 1 or self.max_attempts < 1:
            raise ValueError(f"max_study_images and max_attempts must be at least 1. Got {self.max_study_images}, "
                             f"{self.max_attempts}")
        if not self.token_env:
            raise ValueError(f"token_env must name an environment variable. Got {self.token_env!r}")
        if not isinstance(self.limits, ServerLimits):
            raise ValueError(f"limits must be a ServerLimits. Got {self.limits!r}")


class _Refused(Exception):
    """The study cannot be classified (the service refused every image): logged and dropped."""


class _Retry(Exception):
    """A failure worth retrying (service or PACS down, overloaded, misconfigured). The message
    is written to be logged: hosts and statuses, no patient data."""


class _Permanent(Exception):
    """A failure that trying again cannot mend (the results cannot be built from these images,
    or the PACS refuses them): the study is dead-lettered at once. The message is written to be
    logged (no patient data)."""




@dataclasses.dataclass
class ListenerStats:
    received: int = 0        # instances spooled
    skipped: int = 0         # instances acknowledged and not classified
    studies: int = 0         # studies whose results were stored
    refused: int = 0         # studies the service refused (nothing to report)
    failures: int = 0        # failed attempts, transient (retried) or permanent
    permanent: int = 0       # studies dead-lettered at once (results not buildable, or refused by the PACS)
    given_up: int = 0        # studies dead-lettered after max_attempts transient failures


class Listener:
    """The running DICOM node: ``Listener(config).start()``, then ``stop()`` (or a ``with`` block)."""

    def __init__(self, config: ListenerConfig):
        self.config = config
        self.spool = Path(config.spool)
        self.stats = ListenerStats()
        self._lock = threading.Lock()           # spool writes vs. a study's clean-up
        self._stop = threading.Event()
        self._server = None
        self._ae: AE | None = None
        self._worker: threading.Thread | None = None
        self._attempts: Counter[str] = Counter()
        self._next_try: dict[str, float] = {}
        self._receiving: set[str] = set()
        # Per study: the results built from a snapshot of its spool, kept while a transient failure
        # to store them is retried (so a retry does not classify the study again).
        self._built: dict[str, tuple[dict[str, int], list, str]] = {}

    # ------------------------------------------------------------------ life cycle

    def start(self) -> "Listener":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines name UIDs
        self.spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in self.spool.glob(f"*/*{_PART}"):  # writes cut short by a crash; the sender got no success
            stale.unlink(missing_ok=True)
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        if self.config.allowed_calling_aes:
            ae.require_calling_aet = list(self.config.allowed_calling_aes)
        for context in VerificationPresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        for context in AllStoragePresentationContexts:
            sop_class = context.abstract_syntax
            # Classes that are skipped anyway accept anything; radiographs only what decodes.
            ae.add_supported_context(sop_class, DECODABLE_SYNTAXES if sop_class in RADIOGRAPH_SOP_CLASSES
                                     else list(dicom_uid.AllTransferSyntaxes))
        ssl_context = server_context(self.config.tls) if self.config.tls else None
        self._server = start_server(ae, (self.config.host, self.config.port), limits=self.config.limits,
                                    ssl_context=ssl_context, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self._ae = ae
        self._stop.clear()
        self._worker = threading.Thread(target=self._run, name="fracray-listener", daemon=True)
        self._worker.start()
        pending = len(self.pending())
        logger.info("DICOM listener %s on %s:%d%s; results to %s%s", self.config.ae_title, self.config.host, self.port,
                    " (TLS)" if self.config.tls else "", self.config.destination.describe(),
                    f"; {pending} study(ies) waiting in the spool" if pending else "")
        return self

    @property
    def port(self) -> int:
        if self._server is None:
            return self.config.port
        return int(self._server.server_address[1])

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting (associations in progress are ended), let the study being classified
        finish (up to ``timeout``); whatever is left stays in the spool for the next start."""
        self._stop.set()
        if self._ae is not None:
            self._server.guard.close_all()
            self._ae.shutdown()
            self._ae, self._server = None, None
        if self._worker is not None:
            self._worker.join(timeout)
            self._worker = None
        logger.info("DICOM listener %s stopped; %d study(ies) left in the spool", self.config.ae_title,
                    len(self.pending()))

    def __enter__(self) -> "Listener":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def pending(self) -> list[str]:
        """Keys of the studies in the spool (not yet classified, or waiting for a retry)."""
        if not self.spool.is_dir():
            return []
        return sorted(p.name for p in self.spool.iterdir() if p.is_dir() and not p.name.startswith("."))

    # ------------------------------------------------------------------ receiving

    def _on_store(self, event) -> int:
        sop_class = str(event.context.abstract_syntax)
        try:
            ds = event.dataset
        except Exception as exc:  # a data set pydicom cannot parse: acknowledged, never a crash
            self.stats.skipped += 1
            logger.warning("skipped an instance of %s: unreadable data set (%s); acknowledged, not classified",
                           _sop_class_name(sop_class), type(exc).__name__)
            return 0x0000
        try:
            reason = skip_reason(sop_class, ds)
        except Exception as exc:  # a header element that does not parse
            reason = f"{_sop_class_name(sop_class)} with an unreadable header ({type(exc).__name__})"
        if reason:
            self.stats.skipped += 1
            logger.info("skipped an instance: %s; acknowledged, not classified", reason)
            return 0x0000
        key = study_key(str(ds.StudyInstanceUID))
        folder = self.spool / key
        target = folder / _instance_file(str(ds.SOPInstanceUID))
        try:
            data = event.encoded_dataset(include_meta=True)  # as sent: no re-encoding
            with self._lock:
                folder.mkdir(exist_ok=True, mode=0o700)
                part = target.with_suffix(_PART)
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(part, target)
                first = key not in self._receiving
                self._receiving.add(key)
                self._next_try.pop(key, None)  # new images: classify when the study is idle again
        except OSError as exc:  # spool full or not writable: the sender keeps the image and may retry
            logger.error("could not spool an instance of study %s (%s): answered 'out of resources' (0xA700)",
                         key, type(exc).__name__)
            return 0xA700
        self.stats.received += 1
        if first:
            logger.info("study %s: receiving", key)
        return 0x0000

    # ------------------------------------------------------------------ classifying

    def _run(self) -> None:
        while not self._stop.wait(self.config.poll_s):
            for key in self._due():
                if self._stop.is_set():
                    return
                self._process(key)

    def _due(self) -> list[str]:
        now, due = time.time(), []
        for key in self.pending():
            files = list((self.spool / key).glob("*.dcm"))
            if not files:
                continue
            try:
                last = max(f.stat().st_mtime for f in files)
            except FileNotFoundError:  # being cleaned up
                continue
            if now - last >= self.config.study_idle_s and time.monotonic() >= self._next_try.get(key, 0.0):
                due.append((last, key))
        return [key for _, key in sorted(due)]

    def _snapshot(self, folder: Path) -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.dcm")}

    def _process(self, key: str) -> None:
        folder = self.spool / key
        snapshot = self._snapshot(folder)
        with self._lock:
            self._receiving.discard(key)
        try:
            summary = self._classify_and_store(folder, snapshot)
        except _Refused as exc:
            self.stats.refused += 1
            logger.warning("study %s: %s; no result written, study dropped from the spool", key, exc)
            self._clean_up(key, snapshot)
        except _Permanent as exc:
            self.stats.failures += 1
            self.stats.permanent += 1
            self._dead_letter(key, "permanent", str(exc), exc)
        except Exception as exc:
            self.stats.failures += 1
            if not isinstance(exc, (_Retry, dicomweb.DicomWebError, DimseError, OSError)):
                # A bug of ours, not the service's or the PACS's: trying again changes nothing.
                self.stats.permanent += 1
                self._dead_letter(key, "permanent", f"an internal error ({type(exc).__name__}: "
                                  f"{_scrub(str(exc), [])})", exc)
                return
            self._attempts[key] += 1
            attempt = self._attempts[key]
            # Our own messages (hosts, statuses) are logged as they are; an OSError's text is not
            # (a path in the spool names a study only by its key, but be safe): its type is.
            why = str(exc) if isinstance(exc, (_Retry, dicomweb.DicomWebError, DimseError)) else \
                f"{type(exc).__name__} (a local I/O error)"
            if attempt >= self.config.max_attempts:
                self.stats.given_up += 1
                self._dead_letter(key, "transient", f"{attempt} attempts failed; the last: {why}", exc)
                return
            delay = min(self.config.max_backoff_s, self.config.retry_backoff_s * 2 ** (attempt - 1))
            self._next_try[key] = time.monotonic() + delay
            logger.warning("study %s: attempt %d of %d failed: %s; kept in the spool, retrying in %.3g s", key,
                           attempt, self.config.max_attempts, why, delay)
        else:
            self.stats.studies += 1
            logger.info("study %s: %s", key, summary)
            self._clean_up(key, snapshot)

    def _dead_letter(self, key: str, kind: str, reason: str, exc: BaseException) -> None:
        """Move the study's spool to spool/.failed/<key>/ with failure.json; log it once."""
        folder = self.spool / key
        moved = self.spool / _FAILED / key
        attempts = self._attempts.pop(key, 0) or 1
        self._next_try.pop(key, None)
        self._built.pop(key, None)
        record = {"study": key, "kind": kind, "reason": reason, "attempts": attempts,
                  "failed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "replay": f"listen.py --spool {self.spool} --replay {key}",
                  "traceback": "".join(traceback.format_exception(exc))}
        with self._lock:
            moved.parent.mkdir(exist_ok=True, mode=0o700)
            if moved.exists():  # dead-lettered before: keep what it had, add what came since
                for f in folder.glob("*.dcm"):
                    os.replace(f, moved / f.name)
                shutil.rmtree(folder, ignore_errors=True)
            else:
                os.replace(folder, moved)
            fd = os.open(moved / FAILURE_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1)
        what = "permanent failure, not retried" if kind == "permanent" else "gave up"
        logger.error("study %s: %s: %s; dead-lettered to %s (replay: listen.py --spool %s --replay %s)", key, what,
                     reason, moved, self.spool, key)

    def _clean_up(self, key: str, snapshot: dict[str, int]) -> None:
        folder = self.spool / key
        self._attempts.pop(key, None)
        self._next_try.pop(key, None)
        self._built.pop(key, None)
        with self._lock:
            now = self._snapshot(folder) if folder.is_dir() else {}
            if now == snapshot:
                shutil.rmtree(folder, ignore_errors=True)
                return
        # More of the study arrived meanwhile: keep it all, so that the next round classifies
        # the whole study and its results replace these.
        logger.info("study %s: %d more instance(s) arrived while it was classified; it will be classified again "
                    "with them", key, len(set(now) - set(snapshot)) or len(now))

    def _classify_and_store(self, folder: Path, snapshot: dict[str, int]) -> str:
        key = folder.name
        built = self._built.get(key)
        if built is not None and built[0] == snapshot:  # a retry after a failed store: send the same results
            instances, summary = built[1], built[2]
            logger.info("study %s: sending its results again", key)
        else:
            instances, summary = self._classify_and_build(folder, sorted(snapshot))
            self._built[key] = (snapshot, instances, summary)
        try:
            self._send(instances)
        except (dicomweb.DicomWebRefused, DimseRefused) as exc:
            raise _Permanent(f"the PACS refused the results: {exc}") from exc
        return summary

    def _classify_and_build(self, folder: Path, names: list[str]) -> tuple[list, str]:
        items = []
        for name in names:
            data = (folder / name).read_bytes()
            try:
                items.append((data, pydicom.dcmread(io.BytesIO(data))))
            except Exception as exc:  # it was read when it arrived; a spool file damaged since
                raise _Permanent(f"a spooled instance ({name}) is unreadable ({type(exc).__name__})") from exc
        items.sort(key=lambda item: (str(item[1].get("SeriesInstanceUID", "")), int(item[1].get("InstanceNumber") or 0),
                                     str(item[1].SOPInstanceUID)))
        logger.info("study %s: %d image(s), classifying", folder.name, len(items))
        results, errors, requests_made = self._classify(items)
        scored = [(data, ds, results[i]) for i, (data, ds) in enumerate(items) if i in results]
        if not scored:
            raise _Refused("the service scored none of its images (" + ", ".join(
                f"{n} {code}" for code, n in sorted(errors.items())) + ")")
        sources = [ds for _, ds, _ in scored]
        try:
            finding = self._finding(scored)
            instances = [structured_report(sources, finding)]
            if self.config.overlays:
                from ..imaging.decode import decode_image  # Pillow and the DICOM decoders: only for overlays

                instances += [overlay_secondary_capture(ds, decode_image(data).pixels, finding)
                              for data, ds, _ in scored]
        except Exception as exc:  # these images and answers do not make valid results: so it stays
            raise _Permanent(f"its results could not be built ({type(exc).__name__}: "
                             f"{_scrub(str(exc), sources)})") from exc
        verdict = "fracture suspected" if finding.label else "no fracture found"
        skipped = f"; {sum(errors.values())} image(s) not scored (" + ", ".join(
            f"{n} {code}" for code, n in sorted(errors.items())) + ")" if errors else ""
        return instances, (f"{len(scored)} image(s) scored in {requests_made} request(s), {verdict}; stored 1 report "
                           f"and {len(instances) - 1} overlay(s) in {self.config.destination.describe()}{skipped}")

    def _chunks(self, items: list, errors: Counter) -> list[list[int]]:
        """Indexes of the images per request: at most max_study_images and max_request_mb each."""
        limit = int(self.config.max_request_mb * 1024 * 1024)
        chunks: list[list[int]] = []
        size = 0
        for i, (data, _) in enumerate(items):
            if len(data) > limit:
                errors["larger_than_max_request_mb"] += 1
                continue
            if not chunks or len(chunks[-1]) >= self.config.max_study_images or size + len(data) > limit:
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += len(data)
        return chunks

    def _classify(self, items: list) -> tuple[dict[int, dict], Counter, int]:
        """Each scored image's result (by index), the count of each reason an image was not
        scored, and the number of requests made."""
        token = os.environ.get(self.config.token_env)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        params = {"operating_point": self.config.operating_point} if self.config.operating_point else {}
        url = self.config.service_url.rstrip("/") + "/v1/classify/study"
        host = urlparse(url).netloc
        results: dict[int, dict] = {}
        errors: Counter = Counter()
        chunks = self._chunks(items, errors)
        for chunk in chunks:
            # Parts are named by their index: no UID travels in a name or comes back in an error.
            files = [("files", (f"{i}.dcm", items[i][0], "application/dicom")) for i in chunk]
            request_id = f"listener-{uuid.uuid4().hex[:12]}"
            try:
                response = requests.post(url, files=files, params=params, timeout=self.config.service_timeout_s,
                                         headers={**headers, "X-Request-Id": request_id})
            except requests.RequestException as exc:
                raise _Retry(f"the service at {host} did not answer ({type(exc).__name__})") from exc
            try:
                body = response.json()
            except ValueError:
                body = {}
            error = body.get("error") if isinstance(body, dict) else None
            if response.status_code in (401, 403):
                raise _Retry(f"the service at {host} refused the bearer token ({response.status_code} {error}); "
                             f"set {self.config.token_env} to the service's token")
            if response.status_code in _REFUSED_BY_SERVICE and error:
                errors[error] += len(chunk)  # e.g. out_of_scope, no_readable_image: every image of the request
                continue
            if response.status_code != 200 or not isinstance(body, dict) or "images" not in body:
                hint = ("; lower max_study_images or max_request_mb to the service's"
                        if response.status_code == 413 else "")
                raise _Retry(f"the service at {host} answered {response.status_code} {error or ''}".rstrip()
                             + f" (request id {request_id}){hint}")
            for answer in body["images"]:
                index = int(str(answer["image"]["name"]).split(".", 1)[0])
                if "fracture_probability" in answer:
                    results[index] = answer
                else:
                    errors[str(answer.get("error", "error"))] += 1
        return results, errors, len(chunks)

    def _finding(self, scored: list) -> StudyFinding:
        answers = [r for _, _, r in scored]
        decision = study_decision([r["fracture_probability"] for r in answers], [r["threshold"] for r in answers],
                                  [r.get("body_part") for r in answers])
        models = sorted({str(r.get("classifier") or "unknown") for r in answers})
        names, versions = zip(*(m.partition("@")[::2] for m in models))
        regions = {}
        for _, ds, r in scored:
            cols, rows = int(ds.Columns), int(ds.Rows)
            boxes = []
            for f in r.get("findings") or []:
                x0, y0, x1, y1 = (float(v) for v in f["box"])
                x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(cols), x1), min(float(rows), y1)
                if x0 < x1 and y0 < y1:
                    boxes.append({"box": [x0, y0, x1, y1], "score": float(f["score"])})
            if boxes:
                regions[str(ds.SOPInstanceUID)] = boxes
        return StudyFinding(fracture_probability=decision["fracture_probability"], threshold=decision["threshold"],
                            label=decision["label"], model_name="+".join(names),
                            model_version="+".join(v or "unknown" for v in versions),
                            operating_point=self.config.operating_point or "default", regions=regions)

    def _send(self, instances: list) -> None:
        destination = self.config.destination
        if isinstance(destination, DicomWebDestination):
            files = []
            for ds in instances:
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                files.append(buf.getvalue())
            dicomweb.store_instances(destination.uri, files)
        else:
            send_instances(destination, instances)


def list_failed(spool: str | os.PathLike) -> list[dict]:
    """The dead-lettered studies of a spool: each one's failure.json (study key, kind, reason,
    attempts, time) without the traceback, plus how many images it holds; oldest first."""
    folder = Path(spool) / _FAILED
    found = []
    for study in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not study.is_dir():
            continue
        try:
            record = json.loads((study / FAILURE_FILE).read_text())
        except (OSError, ValueError):
            record = {"study": study.name, "kind": "unknown", "reason": f"no readable {FAILURE_FILE}"}
        record.pop("traceback", None)
        record["images"] = len(list(study.glob("*.dcm")))
        found.append(record)
    return sorted(found, key=lambda r: str(r.get("failed_at", "")))


def replay_failed(spool: str | os.PathLike, keys: list[str] | None = None) -> list[str]:
    """Move dead-lettered studies (``keys``, or all of them) back into the spool, where a running
    listener, or the next one started, classifies them again; their failure.json is kept as
    ``spool/.failed/<key>.replayed.json``. Returns the keys moved. Raises ValueError for a key
    that is not in the dead letter."""
    root = Path(spool)
    failed = root / _FAILED
    present = sorted(p.name for p in failed.iterdir() if p.is_dir()) if failed.is_dir() else []
    wanted = present if keys is None else list(keys)
    unknown = sorted(set(wanted) - set(present))
    if unknown:
        raise ValueError(f"Not in the dead letter ({failed}): {', '.join(unknown)}. There: "
                         f"{', '.join(present) or 'nothing'}")
    for key in wanted:
        source, target = failed / key, root / key
        record = source / FAILURE_FILE
        if record.exists():
            os.replace(record, failed / f"{key}.replayed.json")
        target.mkdir(exist_ok=True, mode=0o700)
        for f in source.glob("*.dcm"):
            os.replace(f, target / f.name)
        shutil.rmtree(source, ignore_errors=True)
        logger.info("study %s: moved from the dead letter back into the spool", key)
    return wanted
