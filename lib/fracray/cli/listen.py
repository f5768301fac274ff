"""``fracray listen`` / ``listen.py``: a DICOM node that classifies the studies a PACS sends it.

A C-STORE listener (AE title, port, optional TLS) that a modality or PACS routes studies to.
Each complete study (nothing new of it for --idle seconds) goes through the Serve service
(``POST /v1/classify/study``), and a Structured Report and overlay images go back into the
same study, by STOW-RS (``dicomweb://``) or C-STORE (``dimse://``). SR, RT, ECG, multi-frame
and other objects that are not radiographs are acknowledged and skipped. Logs never name a
patient: studies go by a key, and headers are never logged.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from ..pacs.destinations import parse_destination
from ..pacs.dimse import TlsFiles
from ..pacs.listener import Listener, ListenerConfig
from ..pacs.server import ServerLimits
from ..pacs.spool import list_failed, replay_failed

__all__ = ["build_parser", "main"]

EXAMPLE = """\
Example (the service on this machine, results back to Orthanc by STOW-RS):
  serve.py --models runs/latest/model_index.json --port 8000 &
  %(prog)s --ae-title FRACRAY --port 11112 --spool /var/spool/fracray \\
            --service http://127.0.0.1:8000 --send-to dicomweb://127.0.0.1:8042/dicom-web
  storescu -aet MODALITY -aec FRACRAY +sd 127.0.0.1 11112 study/   # compressed files: add -xs, -xt, -xv or -xr

Results by C-STORE instead, to the PACS's AE (it must know ours, --ae-title or --send-ae):
  %(prog)s ... --send-to dimse://ORTHANC@127.0.0.1:4242
With TLS towards the PACS (dimses://) and on the listener itself:
  %(prog)s ... --send-to dimses://PACS@pacs.hospital.org:2762 --send-tls-ca hospital-ca.pem \\
            --tls-cert node.pem --tls-key node.key [--tls-ca hospital-ca.pem: require client certificates]

A study whose results cannot be built, or that the PACS refuses, is not retried: it is moved to the
dead letter, SPOOL/.failed/<study key>/ (its images and failure.json with the reason). See it and
send it through again once the cause is fixed (a running listener picks it up):
  %(prog)s --spool /var/spool/fracray --list-failed
  %(prog)s --spool /var/spool/fracray --replay <study key>      # or --replay all

The service's bearer token is read from the variable --token-env names (FRACRAY_API_TOKEN);
DICOMweb credentials from FRACRAY_DICOMWEB_TOKEN or FRACRAY_DICOMWEB_USER/FRACRAY_DICOMWEB_PASSWORD.
Runs until Ctrl-C or SIGTERM; studies not yet classified stay in the spool for the next start."""


def build_parser(prog: str = "listen.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A DICOM node (C-STORE listener): classify each study a modality or PACS sends through the "
                    "Serve service, and store a Structured Report and overlay images back into the study.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    node = parser.add_argument_group("the listener")
    node.add_argument("--ae-title", default="FRACRAY",
                      help="our AE title: senders must call it (default: %(default)s)")
    node.add_argument("--host", default="127.0.0.1",
                      help="interface to listen on; 0.0.0.0 for every interface (default: %(default)s)")
    node.add_argument("--port", type=int, default=11112, help="DICOM port (default: %(default)s)")
    node.add_argument("--allow-ae", action="append", default=[], metavar="AE_TITLE",
                      help="accept associations only from this calling AE title (repeat for several; default: any)")
    node.add_argument("--spool", required=True,
                      help="local folder for received images until they are classified (holds patient data: keep "
                           "it private; a restart picks it up)")
    node.add_argument("--idle", type=float, default=10.0, dest="study_idle_s",
                      help="a study is complete when nothing of it has arrived for this many seconds "
                           "(default: %(default)s)")
    node.add_argument("--tls-cert", default=None, help="the listener's TLS certificate (PEM); turns TLS on")
    node.add_argument("--tls-key", default=None, help="its private key (PEM)")
    node.add_argument("--tls-ca", default=None, help="CA bundle (PEM): require client certificates it signed")
    node.add_argument("--acse-timeout", type=float, default=10.0, dest="acse_timeout_s",
                      help="seconds a caller has to send its association request (and to answer ACSE messages) "
                           "(default: %(default)s)")
    node.add_argument("--network-timeout", type=float, default=60.0, dest="network_timeout_s",
                      help="seconds of silence after which an association or a half-sent PDU is dropped "
                           "(default: %(default)s)")
    node.add_argument("--max-idle-per-peer", type=int, default=4,
                      help="connections one address may hold open without sending anything; a new one over it "
                           "closes its oldest (default: %(default)s)")
    node.add_argument("--max-pdu-kb", type=int, default=1024,
                      help="largest PDU accepted, in KiB; longer ones are aborted (default: %(default)s)")
    dead = parser.add_argument_group("the dead letter (studies that failed for good)")
    dead.add_argument("--list-failed", action="store_true", help="list the dead-lettered studies of --spool, then exit")
    dead.add_argument("--replay", action="append", default=[], metavar="STUDY_KEY",
                      help="move a dead-lettered study back into --spool to be classified again ('all': every one), "
                           "then exit")
    service = parser.add_argument_group("the Serve service")
    service.add_argument("--service", default="http://127.0.0.1:8000", dest="service_url",
                         help="the service's address (default: %(default)s)")
    service.add_argument("--token-env", default="FRACRAY_API_TOKEN",
                         help="environment variable holding the service's bearer token (default: %(default)s)")
    service.add_argument("--operating-point", default=None,
                         help="named operating point of the model, or a threshold in [0, 1] (default: the model's)")
    service.add_argument("--max-study-images", type=int, default=32,
                         help="images per request, the service's max_study_images (default: %(default)s); larger "
                              "studies are sent in several requests and decided together")
    service.add_argument("--max-request-mb", type=float, default=60.0,
                         help="bytes per request, below the service's max_upload_mb (default: %(default)s)")
    results = parser.add_argument_group("the results")
    results.add_argument("--send-to", default=None, dest="destination",
                         help="dicomweb[s]://host:port/root (STOW-RS) or dimse[s]://CALLED_AE@host:port (C-STORE; "
                              "dimses: TLS)")
    results.add_argument("--send-ae", default=None,
                         help="our calling AE title for C-STORE (default: --ae-title)")
    results.add_argument("--send-tls-ca", default=None,
                         help="dimses://: CA bundle (PEM) that verifies the PACS (default: the system's CAs)")
    results.add_argument("--send-tls-cert", default=None, help="dimses://: our client certificate (PEM)")
    results.add_argument("--send-tls-key", default=None, help="dimses://: its private key (PEM)")
    results.add_argument("--no-overlays", dest="overlays", action="store_false",
                         help="store the Structured Report only, not the overlay images")
    return parser


def _config(args: argparse.Namespace) -> ListenerConfig:
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca) if (args.tls_cert or args.tls_key or args.tls_ca) \
        else None
    send_tls = TlsFiles(args.send_tls_cert, args.send_tls_key, args.send_tls_ca) \
        if (args.send_tls_cert or args.send_tls_key or args.send_tls_ca) else None
    if not args.destination:
        raise ValueError("--send-to is required: dicomweb[s]://host:port/root or dimse[s]://CALLED_AE@host:port")
    destination = parse_destination(args.destination, calling_ae=args.send_ae or args.ae_title, tls_files=send_tls)
    limits = ServerLimits(acse_timeout_s=args.acse_timeout_s, network_timeout_s=args.network_timeout_s,
                          max_idle_per_peer=args.max_idle_per_peer, max_pdu_bytes=args.max_pdu_kb * 1024,
                          max_idle=max(ServerLimits.max_idle, args.max_idle_per_peer))
    return ListenerConfig(spool=args.spool, destination=destination, ae_title=args.ae_title, host=args.host,
                          port=args.port, allowed_calling_aes=tuple(args.allow_ae), tls=tls,
                          service_url=args.service_url, token_env=args.token_env,
                          operating_point=args.operating_point, overlays=args.overlays,
                          study_idle_s=args.study_idle_s, max_study_images=args.max_study_images,
                          max_request_mb=args.max_request_mb, limits=limits)


def _dead_letter(args: argparse.Namespace) -> int:
    if args.list_failed:
        failed = list_failed(args.spool)
        for record in failed:
            print(f"{record['study']}  {record.get('failed_at', '?')}  {record.get('kind', '?')}  "
                  f"{record['images']} image(s)  {record.get('reason', '')}")
        print(f"{len(failed)} study(ies) in {args.spool}/.failed")
    if args.replay:
        try:
            moved = replay_failed(args.spool, None if "all" in args.replay else args.replay)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"Moved {len(moved)} study(ies) back into {args.spool}: {' '.join(moved) or '-'}")
    return 0


def main(argv: list[str] | None = None, *, prog: str = "listen.py") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.list_failed or args.replay:
        return _dead_letter(args)
    try:
        config = _config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log = logging.getLogger("fracray.pacs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    listener = Listener(config)
    try:
        listener.start()
    except (OSError, ValueError) as exc:  # port in use, TLS files that do not load, spool not writable
        log.removeHandler(handler)
        print(f"error: could not start the listener on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 2
    print(f"Listening as {config.ae_title} on {config.host}:{listener.port}; Ctrl-C to stop.", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop()
        log.removeHandler(handler)
    return 0
