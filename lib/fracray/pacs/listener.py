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

The parts: ``receiver`` (the C-STORE SCP's handler and contexts), ``spool`` (the spool, the
schedule, back-off and the dead letter), ``service_client`` (the service's study endpoint),
``destinations`` (STOW-RS or C-STORE out), ``failures`` (how a study fails); this module wires
them into the node.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
from pathlib import Path
from urllib.parse import urlparse

import pydicom
from pynetdicom import AE, evt

from .. import dicomweb, storage
from ..imaging.instances import RADIOGRAPH_SOP_CLASSES
from .destinations import DicomWebDestination, Destination, parse_destination, send_results
from .dimse import DimseDestination, DimseError, DimseRefused, TlsFiles, check_ae_title, server_context
from .failures import PermanentFailure, StudyRefused
from .privacy import scrub as _scrub
from .privacy import study_key
from .receiver import DECODABLE_SYNTAXES, Receiver, add_contexts, skip_reason
from .results import overlay_secondary_capture, structured_report
from .server import ServerLimits, start_server
from .service_client import ServiceClient, study_finding
from .spool import FAILURE_FILE, Spool, list_failed, replay_failed

# The node's public names, wherever their part lives (fracray listen and the tests use them).
__all__ = ["ListenerConfig", "ListenerStats", "Listener", "DicomWebDestination", "RADIOGRAPH_SOP_CLASSES",
           "DECODABLE_SYNTAXES", "ServerLimits", "parse_destination", "study_key", "skip_reason", "list_failed",
           "replay_failed", "FAILURE_FILE"]

logger = logging.getLogger(__name__)


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
        self.stats = ListenerStats()
        self.spool = Spool(config.spool, self.stats, idle_s=config.study_idle_s, max_attempts=config.max_attempts,
                           retry_backoff_s=config.retry_backoff_s, max_backoff_s=config.max_backoff_s,
                           logged_errors=(dicomweb.DicomWebError, DimseError))
        self.receiver = Receiver(self.spool, self.stats)
        self.service = ServiceClient(url=config.service_url, token_env=config.token_env,
                                     operating_point=config.operating_point, max_study_images=config.max_study_images,
                                     max_request_mb=config.max_request_mb, timeout_s=config.service_timeout_s)
        self._stop = threading.Event()
        self._server = None
        self._ae: AE | None = None
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> "Listener":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines name UIDs
        self.spool.open()
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        if self.config.allowed_calling_aes:
            ae.require_calling_aet = list(self.config.allowed_calling_aes)
        add_contexts(ae)
        ssl_context = server_context(self.config.tls) if self.config.tls else None
        self._server = start_server(ae, (self.config.host, self.config.port), limits=self.config.limits,
                                    ssl_context=ssl_context, evt_handlers=[(evt.EVT_C_STORE, self.receiver.on_store)])
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
        return self.spool.pending()

    # ------------------------------------------------------------------ classifying

    def _run(self) -> None:
        while not self._stop.wait(self.config.poll_s):
            for key in self.spool.due():
                if self._stop.is_set():
                    return
                self.spool.process(key, self._classify_and_store)

    def _classify_and_store(self, folder: Path, snapshot: dict[str, int]) -> str:
        key = folder.name
        built = self.spool.kept.get(key)
        if built is not None and built[0] == snapshot:  # a retry after a failed store: send the same results
            instances, summary = built[1], built[2]
            logger.info("study %s: sending its results again", key)
        else:
            instances, summary = self._classify_and_build(folder, sorted(snapshot))
            self.spool.kept[key] = (snapshot, instances, summary)
        try:
            send_results(self.config.destination, instances)
        except (dicomweb.DicomWebRefused, DimseRefused) as exc:
            raise PermanentFailure(f"the PACS refused the results: {exc}") from exc
        return summary

    def _classify_and_build(self, folder: Path, names: list[str]) -> tuple[list, str]:
        items = []
        for name in names:
            data = (folder / name).read_bytes()
            try:
                items.append((data, pydicom.dcmread(io.BytesIO(data))))
            except Exception as exc:  # it was read when it arrived; a spool file damaged since
                raise PermanentFailure(f"a spooled instance ({name}) is unreadable ({type(exc).__name__})") from exc
        items.sort(key=lambda item: (str(item[1].get("SeriesInstanceUID", "")), int(item[1].get("InstanceNumber") or 0),
                                     str(item[1].SOPInstanceUID)))
        logger.info("study %s: %d image(s), classifying", folder.name, len(items))
        answers = self.service.classify(items)
        results, errors = answers.results, answers.errors
        scored = [(data, ds, results[i]) for i, (data, ds) in enumerate(items) if i in results]
        if not scored:
            raise StudyRefused("the service scored none of its images (" + ", ".join(
                f"{n} {code}" for code, n in sorted(errors.items())) + ")")
        sources = [ds for _, ds, _ in scored]
        try:
            finding = study_finding(scored, self.config.operating_point)
            instances = [structured_report(sources, finding)]
            if self.config.overlays:
                from ..imaging.decode import decode_image  # Pillow and the DICOM decoders: only for overlays

                instances += [overlay_secondary_capture(ds, decode_image(data).pixels, finding)
                              for data, ds, _ in scored]
        except Exception as exc:  # these images and answers do not make valid results: so it stays
            raise PermanentFailure(f"its results could not be built ({type(exc).__name__}: "
                                   f"{_scrub(str(exc), sources)})") from exc
        verdict = "fracture suspected" if finding.label else "no fracture found"
        skipped = f"; {sum(errors.values())} image(s) not scored (" + ", ".join(
            f"{n} {code}" for code, n in sorted(errors.items())) + ")" if errors else ""
        return instances, (f"{len(scored)} image(s) scored in {answers.requests} request(s), {verdict}; stored 1 "
                           f"report and {len(instances) - 1} overlay(s) in {self.config.destination.describe()}"
                           f"{skipped}")
