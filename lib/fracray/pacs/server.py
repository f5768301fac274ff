"""The listener's DICOM server, hardened against peers that do not play by the rules.

pynetdicom's server as it comes counts a connection that never sends an association request
against ``maximum_associations`` (10) until its ACSE timeout (30 s), reads a PDU of any length
the peer announces (one that announces 0xFFFFFFFF bytes and sends none is waited for forever,
without a reply), and does a TLS handshake in the thread that accepts connections (one peer that
connects and says nothing stops every other). Here:

- **Idle connections**, ones that have sent no PDU yet, are capped per peer address
  (``max_idle_per_peer``) and in all (``max_idle``): a new connection over a cap closes the
  oldest idle one (of that peer, else of any), so a peer that holds sockets open cannot lock
  anyone out, and a real request, which follows its connection at once, always gets through.
  Association slots (``max_associations``) are sized above the idle caps.
- **Timeouts**: the association request must arrive within ``acse_timeout_s``; a socket that
  stalls mid-PDU, or an association with no traffic, is closed after ``network_timeout_s``;
  a TLS handshake runs in the connection's own thread, within ``acse_timeout_s``.
- **The largest PDU** accepted is ``max_pdu_bytes`` (also the P-DATA size we announce): a longer
  one, or bytes that are not a DICOM PDU, are answered with an A-ABORT and the connection closed.
- **One log line per refusal** (WARNING, logger ``fracray.pacs.server``): the peer's address, what
  it did, and which limit applied; AE titles, never anything from a data set.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import socket
import ssl
import struct
import threading
import time
import types
from collections import OrderedDict

from pynetdicom import evt
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

__all__ = ["ServerLimits", "start_server"]

logger = logging.getLogger(__name__)

_PDU_TYPES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
              0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    acse_timeout_s: float = 10.0       # connect -> association request; and ACSE answers
    network_timeout_s: float = 60.0    # a stalled socket read, or an association with no traffic
    dimse_timeout_s: float = 60.0      # a DIMSE message's parts
    max_pdu_bytes: int = 1 << 20       # largest PDU accepted (and the P-DATA size announced)
    max_idle_per_peer: int = 4         # connections without a PDU yet, per peer address
    max_idle: int = 16                 # ... in all
    max_associations: int = 32         # associations (and connections) at once

    def __post_init__(self):
        for name in ("acse_timeout_s", "network_timeout_s", "dimse_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive. Got {getattr(self, name)!r}")
        if not 16 * 1024 <= self.max_pdu_bytes <= 64 * 1024 * 1024:
            raise ValueError(f"max_pdu_bytes must be 16 KiB to 64 MiB (DICOM peers send 16-256 KiB PDUs). "
                             f"Got {self.max_pdu_bytes!r}")
        if not 1 <= self.max_idle_per_peer <= self.max_idle < self.max_associations:
            raise ValueError(f"Need 1 <= max_idle_per_peer <= max_idle < max_associations (so idle connections "
                             f"always leave room for associations). Got {self.max_idle_per_peer}, {self.max_idle}, "
                             f"{self.max_associations}")


@dataclasses.dataclass
class _Connection:
    peer: str
    sock: socket.socket
    opened: float


class _IdleGuard:
    """Connections that have sent nothing yet, oldest first; closes the oldest over a cap."""

    def __init__(self, limits: ServerLimits):
        self.limits = limits
        self._lock = threading.Lock()
        self._idle: OrderedDict[int, _Connection] = OrderedDict()
        self._ids = itertools.count(1)

    def opened(self, peer: str, sock: socket.socket) -> int:
        evicted: list[tuple[_Connection, str]] = []
        with self._lock:
            # Closed ones stay listed until their thread ends (it logs why) but count for nothing.
            live = [k for k, c in self._idle.items() if c.sock.fileno() != -1]
            mine = [k for k in live if self._idle[k].peer == peer]
            while len(mine) >= self.limits.max_idle_per_peer:
                key = mine.pop(0)
                live.remove(key)
                evicted.append((self._idle.pop(key), f"max_idle_per_peer {self.limits.max_idle_per_peer}"))
            while len(live) >= self.limits.max_idle:
                evicted.append((self._idle.pop(live.pop(0)), f"max_idle {self.limits.max_idle}"))
            key = next(self._ids)
            self._idle[key] = _Connection(peer, sock, time.monotonic())
        for conn, limit in evicted:
            logger.warning("refused: closed an idle connection from %s (open %.1f s without sending a PDU; a new "
                           "connection came over %s)", conn.peer, time.monotonic() - conn.opened, limit)
            try:  # its reader sees the end of the stream and ends the connection's thread at once
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return key

    def spoke(self, key: int) -> None:
        with self._lock:
            self._idle.pop(key, None)

    def is_idle(self, key: int) -> bool:
        with self._lock:
            return key in self._idle

    def close_all(self, wait_s: float = 2.0) -> None:
        """End every idle connection (before a shutdown: pynetdicom cannot abort an association
        that has had no request yet), and wait up to ``wait_s`` for their threads to close them."""
        with self._lock:
            conns = list(self._idle.values())
        for conn in conns:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(c.sock.fileno() != -1 for c in conns):
            time.sleep(0.02)
        time.sleep(0.1)  # the acceptor threads end right after the socket is closed


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _transport_closed(dul) -> None:
    """The connection is gone: tell the state machine, and, if no association request came, wake
    the acceptor thread that waits for one (pynetdicom would hold it, and an association slot,
    for the whole ACSE timeout)."""
    dul.event_queue.put("Evt17")
    if dul.assoc.requestor.primitive is None:
        dul.assoc._fracray_ended = True
        dul.to_user_queue.put(None)  # Association.run_reactor: no request -> kill, close, return


def _guarded_read_pdu_data(self) -> None:
    """pynetdicom's DULServiceProvider._read_pdu_data (3.0), with the PDU length capped and a log
    line for what is refused. ``self`` is the association's DUL."""
    assoc = self.assoc
    limit = assoc._fracray_limits.max_pdu_bytes
    peer = assoc._fracray_peer
    sock = self.socket
    try:
        header = sock.recv(6)
    except (OSError, TimeoutError):
        header = b""
    if len(header) < 6:  # closed (or reset) by the peer, or by the idle guard
        sock.close()
        _transport_closed(self)
        return
    pdu_type, _, pdu_length = struct.unpack(">BBL", header)
    if pdu_type not in _PDU_TYPES or pdu_length > limit:
        why = (f"not a DICOM PDU (first byte 0x{pdu_type:02X})" if pdu_type not in _PDU_TYPES else
               f"{_PDU_TYPES[pdu_type]} PDU of {pdu_length:,} bytes, over the largest accepted ({limit:,} bytes, "
               f"max_pdu_bytes)")
        logger.warning("refused: %s from %s; answered A-ABORT and closed the connection", why, peer)
        abort = A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = 0x02, 0x02 if pdu_type not in _PDU_TYPES else 0x06
        sock.send(abort.encode())  # AssociationSocket.send: never raises
        sock.close()
        _transport_closed(self)
        return
    assoc._fracray_guard.spoke(assoc._fracray_conn)
    try:
        body = sock.recv(pdu_length)
    except (OSError, TimeoutError):
        body = None
    if body is None or len(body) != pdu_length:
        logger.warning("refused: %s stopped sending in the middle of a %s PDU (%s; network_timeout %.0f s); "
                       "connection closed", peer, _PDU_TYPES[pdu_type], "timed out" if body is None else
                       f"{len(body):,} of {pdu_length:,} bytes", assoc._fracray_limits.network_timeout_s)
        sock.close()
        _transport_closed(self)
        return
    try:
        pdu, event = self._decode_pdu(bytearray(header) + body)
    except Exception as exc:
        logger.warning("refused: undecodable %s PDU from %s (%s); answered A-ABORT", _PDU_TYPES[pdu_type], peer,
                       type(exc).__name__)
        self.event_queue.put("Evt19")  # invalid PDU: pynetdicom's state machine answers A-ABORT
        return
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)


class _GuardedHandler(RequestHandler):
    def handle(self) -> None:
        server: _GuardedServer = self.server  # type: ignore[assignment]
        limits = server.limits
        peer = str(self.client_address[0])
        sock = self.request
        sock.settimeout(limits.network_timeout_s)  # no recv/send blocks for ever
        self._conn = server.guard.opened(peer, sock)
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock.settimeout(limits.acse_timeout_s)
                sock.do_handshake()
                sock.settimeout(limits.network_timeout_s)
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                server.guard.spoke(self._conn)
                logger.warning("refused: the TLS handshake with %s failed (%s; acse_timeout %.0f s)", peer,
                               type(exc).__name__, limits.acse_timeout_s)
                _close(sock)
                return
        super().handle()

    def _create_association(self):
        assoc = super()._create_association()
        server: _GuardedServer = self.server  # type: ignore[assignment]
        assoc._fracray_limits = server.limits
        assoc._fracray_guard = server.guard
        assoc._fracray_conn = self._conn
        assoc._fracray_peer = str(self.client_address[0])
        assoc._fracray_ended = False
        assoc.dul._read_pdu_data = types.MethodType(_guarded_read_pdu_data, assoc.dul)
        run = assoc.run

        def run_and_report() -> None:
            try:
                run()
            finally:
                if server.guard.is_idle(self._conn):
                    server.guard.spoke(self._conn)
                    if not assoc._fracray_ended:
                        logger.warning("refused: %s connected and sent no association request within %.0f s "
                                       "(acse_timeout); connection closed", assoc._fracray_peer,
                                       server.limits.acse_timeout_s)

        assoc.run = run_and_report
        return assoc


class _GuardedServer(ThreadedAssociationServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, *args, limits: ServerLimits, **kwargs):
        self.limits = limits
        self.guard = _IdleGuard(limits)
        super().__init__(*args, request_handler=_GuardedHandler, **kwargs)

    def get_request(self):
        client, address = self.socket.accept()
        if self.ssl_context:  # the handshake is done in the connection's thread, with a timeout
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address


def _on_rejected(event) -> None:
    assoc = event.assoc
    rq = assoc.requestor
    ours = assoc.acceptor.ae_title
    if rq.primitive is not None and str(rq.primitive.called_ae_title).strip() != ours:
        why = f"it called AE {str(rq.primitive.called_ae_title).strip()!r}, not ours ({ours!r})"
    elif assoc.ae.require_calling_aet and rq.ae_title not in assoc.ae.require_calling_aet:
        why = f"its calling AE {rq.ae_title!r} is not among the allowed ones"
    elif len([a for a in assoc.ae.active_associations if a.is_acceptor]) > assoc.ae.maximum_associations:
        why = f"{assoc.ae.maximum_associations} associations are open already (max_associations)"
    else:
        why = "the request could not be accepted (protocol version or application context)"
    logger.warning("refused: an association from %s (calling AE %r): %s; answered A-ASSOCIATE-RJ",
                   getattr(assoc, "_fracray_peer", "?"), rq.ae_title, why)


def _on_aborted(event) -> None:
    assoc = event.assoc
    logger.info("an association from %s (calling AE %r) was aborted", getattr(assoc, "_fracray_peer", "?"),
                assoc.requestor.ae_title)


def start_server(ae, address: tuple[str, int], *, limits: ServerLimits, ssl_context=None,
                 evt_handlers: list | None = None):
    """``ae.start_server(address, block=False, ...)`` with the guards above: sets the AE's timeouts,
    maximum PDU and associations from ``limits``, and returns the running server."""
    ae.acse_timeout = limits.acse_timeout_s
    ae.network_timeout = limits.network_timeout_s
    ae.dimse_timeout = limits.dimse_timeout_s
    ae.maximum_pdu_size = limits.max_pdu_bytes
    ae.maximum_associations = limits.max_associations
    handlers = list(evt_handlers or []) + [(evt.EVT_REJECTED, _on_rejected), (evt.EVT_ABORTED, _on_aborted)]
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=handlers, server_class=_GuardedServer,
                            limits=limits)
    thread = threading.Thread(target=server.serve_forever, name="fracray-dicom-server", daemon=True)
    thread.start()
    ae._servers.append(server)
    return server
