"""Every patch l3spot applies to pynetdicom's internals, in one module.

Patching a library's internals is a last resort: each patch here names the pynetdicom
version it was written against (:data:`PYNETDICOM_VERSION`, pinned exactly in
``pyproject.toml``), and ``tests/unit/test_netpatch.py`` fails when a patch can no longer
attach to the installed version. A patch that cannot attach raises :class:`NetPatchError`
(never a silent no-op): :func:`verify_pynetdicom` checks the targets once when the SCP
starts, and the per-association patches raise when an attribute they replace is missing.

The patches (PS3.8 is the protocol; the internals are pynetdicom 3.0.4's):

=============================  ============================================================
:class:`ReactorClock`          ``pynetdicom.association.time``: the acceptor reactor's fixed
                               1 ms sleep becomes a wait on a wake-up event (SCP ingest)
:func:`wake_on_put`            ``DIMSEServiceProvider.msg_queue.put`` and
                               ``DULServiceProvider.to_user_queue.put`` set that event
:class:`SharedContexts`        ``ThreadedAssociationServer.contexts``: not deep-copied per
                               association (``RequestHandler._create_association``)
:class:`PduGuard`              ``AssociationSocket.recv``: refuses PDUs over a length limit
:func:`guard_state_machine`    ``StateMachine.do_action``: malformed P-DATA aborts the
                               association instead of killing the DUL thread
:func:`quiet_pdu_logging`      unbinds ``pynetdicom._handlers.standard_*`` (DEBUG formatting)
:func:`set_dul_idle_sleep`     ``DULServiceProvider._run_loop_delay``
:func:`guard_scu_reactor`      ``DIMSEServiceProvider.get_msg`` on requestor associations
:func:`replay_received`        ``AssociationSocket.ready`` (class) and ``.recv``: the
                               A-ASSOCIATE-RQ read by :mod:`service.gate` is read again
:func:`bound_received_datasets` ``DIMSEServiceProvider.receive_primitive``: a new
                               message collects its data set in a buffer l3spot supplies
:func:`register_server`        ``ApplicationEntity._servers``: a server made with
                               ``make_server`` is stopped by ``ae.shutdown()``
=============================  ============================================================
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pynetdicom
import pynetdicom.association
from pynetdicom import _handlers, evt
from pynetdicom.pdu import A_ABORT_RQ

from core.errors import NetPatchError
from core.logs import log_event

__all__ = [
    "PYNETDICOM_VERSION",
    "NetPatchError",
    "PduGuard",
    "ReactorClock",
    "SharedContexts",
    "attach_acceptor_patches",
    "guard_pdu_length",
    "guard_scu_reactor",
    "guard_state_machine",
    "install_reactor_clock",
    "quiet_pdu_logging",
    "bound_received_datasets",
    "register_server",
    "replay_received",
    "set_dul_idle_sleep",
    "share_server_contexts",
    "verify_pynetdicom",
    "wake_on_put",
]

log = logging.getLogger(__name__)

#: The pynetdicom release these patches were written against (pinned in pyproject.toml).
PYNETDICOM_VERSION = "3.0.4"

#: pynetdicom's standard DEBUG handlers, unbound from the SCP's associations.
PYNETDICOM_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler),
)


def _require(obj: Any, *names: str, where: str) -> None:
    """Raise :class:`NetPatchError` unless ``obj`` has every attribute in ``names``."""
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise NetPatchError(
            f"pynetdicom {pynetdicom.__version__}: {where} has no {', '.join(missing)}; "
            f"core.netpatch was written for pynetdicom {PYNETDICOM_VERSION}"
        )


def verify_pynetdicom() -> str:
    """Check that every class-level patch target exists in the installed pynetdicom.

    Called when the SCP starts, so an incompatible pynetdicom stops the node with a clear
    message instead of leaving it without its PDU guard. Per-association targets (instance
    attributes) are checked when each patch attaches.

    Returns
    -------
    str
        The installed pynetdicom version (a different version than
        :data:`PYNETDICOM_VERSION` is logged as a warning: the pin was bypassed).

    Raises
    ------
    NetPatchError
        A patch target is missing.
    """
    from pynetdicom.association import Association
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.fsm import StateMachine
    from pynetdicom.transport import AssociationSocket, RequestHandler

    _require(pynetdicom.association, "time", where="pynetdicom.association")
    _require(pynetdicom.association.time, "sleep", where="pynetdicom.association.time")
    _require(Association, "_run_reactor", "unbind", "kill", where="Association")
    _require(RequestHandler, "_create_association", where="RequestHandler")
    _require(AssociationSocket, "recv", "send", where="AssociationSocket")
    _require(StateMachine, "do_action", where="StateMachine")
    _require(DIMSEServiceProvider, "get_msg", where="DIMSEServiceProvider")
    _require(AssociationSocket, "ready", where="AssociationSocket")
    if not isinstance(AssociationSocket.__dict__.get("ready"), property):
        raise NetPatchError("pynetdicom AssociationSocket.ready is no longer a property")
    version = str(pynetdicom.__version__)
    if version != PYNETDICOM_VERSION:
        log_event(
            log,
            "pynetdicom_version_mismatch",
            level=logging.WARNING,
            installed=version,
            expected=PYNETDICOM_VERSION,
        )
    return version


class ReactorClock:
    """Stand-in for the ``time`` module inside ``pynetdicom.association``.

    pynetdicom 3.0's association reactor sleeps a fixed 1 ms before each look at its DIMSE
    queue (``Association._run_reactor``; not configurable), so every C-STORE waits on
    average half a millisecond, plus the kernel's timer slack, before its handler runs:
    about a third of storescp's whole time per 512 x 512 instance. For the acceptor
    threads of the SCP (those carrying an ``l3spot_wakeup`` event), the sleep becomes a
    wait on an event that is set whenever a DIMSE message or an ACSE primitive is queued
    for the association (:func:`wake_on_put`), with the same 1 ms as the upper bound; every
    other thread (pynetdicom SCUs in the workers, tests) sleeps exactly as before.
    """

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        wake = getattr(threading.current_thread(), "l3spot_wakeup", None)
        if wake is None:
            self._real.sleep(seconds)
            return
        wake.wait(seconds)
        wake.clear()  # before the reactor looks at its queues, so no wake-up is lost


def install_reactor_clock() -> None:
    """Replace ``pynetdicom.association.time`` by a :class:`ReactorClock` (idempotent).

    Raises
    ------
    NetPatchError
        ``pynetdicom.association`` no longer uses the ``time`` module.
    """
    _require(pynetdicom.association, "time", where="pynetdicom.association")
    if not isinstance(pynetdicom.association.time, ReactorClock):
        pynetdicom.association.time = ReactorClock(time)  # type: ignore[attr-defined]


def wake_on_put(q: Any, wake: threading.Event) -> None:
    """Make ``q.put`` also set ``wake`` (a queue the reactor polls; see :class:`ReactorClock`).

    Raises
    ------
    NetPatchError
        ``q`` has no ``put`` method.
    """
    _require(q, "put", where=type(q).__name__)
    put = q.put

    def put_and_wake(item: Any, *args: Any, **kwargs: Any) -> None:
        put(item, *args, **kwargs)
        wake.set()

    q.put = put_and_wake


class SharedContexts(list):  # type: ignore[type-arg]
    """The server's supported presentation contexts, shared by its associations.

    pynetdicom deep-copies the server's contexts for every association
    (``RequestHandler._create_association``): with every storage SOP class x every
    transfer syntax (171 contexts, 7,654 UIDs) that is about 45 ms of CPU under the GIL per
    association. Negotiation only reads them (``presentation.negotiate_as_acceptor``), so
    each association gets a shallow copy of the list instead.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


def share_server_contexts(server: Any) -> None:
    """Wrap ``server.contexts`` in :class:`SharedContexts` (see there).

    Raises
    ------
    NetPatchError
        The server has no ``contexts`` attribute.
    """
    _require(server, "contexts", where=type(server).__name__)
    server.contexts = SharedContexts(server.contexts)


class PduGuard:
    """Wraps an association socket's ``recv``: refuses PDUs longer than the limit.

    pynetdicom reads a PDU's announced length in full before decoding it, so a peer
    announcing a 4 GB PDU would make it buffer 4 GB. The DUL treats the ``OSError`` raised
    here as a closed connection and aborts the association.

    Parameters
    ----------
    sock : the association's ``AssociationSocket``.
    limit : largest PDU (bytes) read.
    context : fields for the ``pdu_too_large`` log line (peer address).
    logger : where that line goes.
    """

    def __init__(
        self,
        sock: Any,
        limit: int,
        context: dict[str, Any],
        logger: logging.Logger | None = None,
    ) -> None:
        self._sock = sock
        self._recv = sock.recv
        self.limit = limit
        self.context = context
        self.logger = logger or log

    def __call__(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.limit:
            log_event(
                self.logger,
                "pdu_too_large",
                level=logging.WARNING,
                length=nr_bytes,
                limit=self.limit,
                **self.context,
            )
            with contextlib.suppress(OSError, AttributeError):
                self._sock.socket.shutdown(socket.SHUT_RDWR)  # the peer sees the close now
            raise OSError(f"PDU of {nr_bytes} bytes exceeds the limit of {self.limit}")
        return self._recv(nr_bytes)  # type: ignore[no-any-return]


def guard_pdu_length(
    assoc: Any, limit: int, context: dict[str, Any], logger: logging.Logger | None = None
) -> None:
    """Install a :class:`PduGuard` on the association's socket.

    Raises
    ------
    NetPatchError
        The association has no DUL socket with a ``recv`` method.
    """
    _require(assoc, "dul", where="Association")
    _require(assoc.dul, "socket", where="DULServiceProvider")
    sock = assoc.dul.socket
    _require(sock, "recv", where="AssociationSocket")
    sock.recv = PduGuard(sock, limit, context, logger)


def guard_state_machine(assoc: Any, on_abort: Callable[[str], None]) -> None:
    """Abort (not crash) when pynetdicom cannot decode what the peer sent.

    pynetdicom 3.0 decodes P-DATA inside its state machine, outside the DUL reactor's
    exception handler: a malformed DIMSE command set (e.g. no Command Field) raises in
    the DUL thread, which dies without an A-ABORT and without ``EVT_ABORTED``. Wrapped
    here, the peer gets an A-ABORT (PS3.8 section 9.3.8, source: service provider) and
    ``on_abort(reason)`` is called (the SCP records an "aborted" association).

    Raises
    ------
    NetPatchError
        The DUL has no state machine with ``do_action``.
    """
    _require(assoc, "dul", where="Association")
    dul = assoc.dul
    _require(dul, "state_machine", "socket", "_kill_thread", where="DULServiceProvider")
    machine = dul.state_machine
    _require(machine, "do_action", where="StateMachine")
    do_action = machine.do_action

    def guarded(event: str) -> None:
        try:
            do_action(event)
        except Exception as exc:  # pynetdicom raises many types on malformed input
            pdu = A_ABORT_RQ()
            pdu.source = 0x02
            pdu.reason_diagnostic = 0x00
            with contextlib.suppress(Exception):  # the peer may be gone: abort anyway
                dul.socket.send(pdu.encode())
            assoc.is_aborted = True
            assoc.is_established = False
            assoc._kill = True
            dul._kill_thread = True
            on_abort(f"malformed message from peer: {type(exc).__name__}: {exc}"[:200])

    machine.do_action = guarded


def quiet_pdu_logging(assoc: Any) -> None:
    """Unbind pynetdicom's standard DEBUG handlers unless pynetdicom's DEBUG log is on.

    They format a DEBUG message for every PDU and DIMSE message even when nothing is
    logged (the C-STORE one copies the whole data set to test it for emptiness): about a
    tenth of the DUL thread.
    """
    if logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        return
    _require(assoc, "unbind", where="Association")
    for event_type, handler in PYNETDICOM_LOG_HANDLERS:
        assoc.unbind(event_type, handler)


def set_dul_idle_sleep(assoc: Any, seconds: float) -> None:
    """Set the DUL reactor's idle sleep per loop (``DULServiceProvider._run_loop_delay``).

    Raises
    ------
    NetPatchError
        The DUL has no ``_run_loop_delay`` (the value would be ignored silently).
    """
    _require(assoc, "dul", where="Association")
    _require(assoc.dul, "_run_loop_delay", where="DULServiceProvider")
    assoc.dul._run_loop_delay = seconds


def attach_acceptor_patches(
    assoc: Any,
    pdu_limit: int,
    context: dict[str, Any],
    on_abort: Callable[[str], None],
    logger: logging.Logger | None = None,
) -> threading.Event:
    """Every per-association patch of the SCP, on a newly opened acceptor association.

    Disables Nagle on the socket (DESIGN.md "Known pitfalls"; a socket already closed by
    the peer is left alone), then :func:`guard_pdu_length`, :func:`guard_state_machine`,
    :func:`quiet_pdu_logging` and the reactor wake-up (:func:`wake_on_put` on the DIMSE
    and ACSE queues; the event is stored as ``assoc.l3spot_wakeup`` for
    :class:`ReactorClock`).

    Returns
    -------
    threading.Event
        The wake-up event.

    Raises
    ------
    NetPatchError
        A patch target is missing (pynetdicom changed): nothing is swallowed.
    """
    _require(assoc, "dul", "dimse", where="Association")
    _require(assoc.dul, "socket", "to_user_queue", where="DULServiceProvider")
    _require(assoc.dimse, "msg_queue", where="DIMSEServiceProvider")
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # the peer already closed the connection
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    guard_pdu_length(assoc, pdu_limit, context, logger)
    guard_state_machine(assoc, on_abort)
    quiet_pdu_logging(assoc)
    wake = threading.Event()
    wake_on_put(assoc.dimse.msg_queue, wake)
    wake_on_put(assoc.dul.to_user_queue, wake)
    assoc.l3spot_wakeup = wake
    return wake


def guard_scu_reactor(assoc: Any) -> None:
    """Keep a requestor association's reactor from taking the responses its caller awaits.

    pynetdicom 3.0.4 runs a reactor thread on requestor associations too; it looks at the
    DIMSE queue with ``get_msg(block=False)`` (``Association._run_reactor``) between the
    caller's requests. ``send_c_store`` pauses it with ``_reactor_checkpoint.clear()`` then
    ``while not _is_paused``, but ``_is_paused`` is still True from the reactor's previous
    pause when the reactor was woken by the previous ``send_c_store`` and has not run yet
    (a busy CPU, the GIL): the request goes out, the reactor resumes, takes the C-STORE-RSP
    off the queue and drops it ("Received unexpected C-STORE service message"), and
    ``send_c_store`` waits its whole DIMSE timeout (30 s) and aborts. Only the reactor calls
    ``get_msg`` without blocking (every ``send_*`` blocks), so answering it "no message"
    leaves every response to the ``send_*`` waiting for it. Use on associations that only
    send requests (C-STORE, C-ECHO); call it right after the association is established.
    See docs/reliability.md "The 30 s C-STORE stall".

    Raises
    ------
    NetPatchError
        The association has no DIMSE provider with ``get_msg``.
    """
    _require(assoc, "dimse", where="Association")
    _require(assoc.dimse, "get_msg", where="DIMSEServiceProvider")
    get_msg = assoc.dimse.get_msg

    def get_msg_for_callers_only(block: bool = False) -> Any:
        if not block:  # the reactor's look: responses belong to the waiting send_*
            return None, None
        return get_msg(block=True)

    assoc.dimse.get_msg = get_msg_for_callers_only


class _ReplayAwareReady(property):
    """``AssociationSocket.ready`` that is also True while replayed bytes remain."""


def _replay_aware_ready(original: property) -> property:
    def ready(self: Any) -> bool:
        if getattr(self, "l3spot_replay", None):
            return True
        return bool(original.fget(self))  # type: ignore[misc]

    return _ReplayAwareReady(ready)


def replay_received(sock: Any, data: bytes) -> None:
    """Make an acceptor's ``AssociationSocket`` read ``data`` first, then the network.

    :mod:`service.gate` reads the A-ASSOCIATE-RQ itself (under the ARTIM deadline) before
    pynetdicom sees the connection; pynetdicom's DUL then reads the same bytes from here.
    ``AssociationSocket.ready`` (a property, patched once on the class) answers True while
    replayed bytes remain; the instance's ``recv`` serves them before the socket's.

    Raises
    ------
    NetPatchError
        ``AssociationSocket`` has no ``ready`` property or the socket no ``recv``.
    """
    from pynetdicom.transport import AssociationSocket

    _require(sock, "recv", where="AssociationSocket")
    current = AssociationSocket.__dict__.get("ready")
    if not isinstance(current, property):
        raise NetPatchError("pynetdicom AssociationSocket.ready is no longer a property")
    if not isinstance(current, _ReplayAwareReady):
        AssociationSocket.ready = _replay_aware_ready(current)  # type: ignore[method-assign]
    buffer = bytearray(data)
    sock.l3spot_replay = buffer
    recv = sock.recv

    def recv_replayed_first(nr_bytes: int) -> bytearray:
        if not buffer:
            return recv(nr_bytes)  # type: ignore[no-any-return]
        out = bytearray(buffer[:nr_bytes])
        del buffer[:nr_bytes]
        if len(out) < nr_bytes:
            out += recv(nr_bytes - len(out))
        return out

    sock.recv = recv_replayed_first


def register_server(ae: Any, server: Any) -> None:
    """Add a server made with ``ae.make_server`` to those ``ae.shutdown()`` stops.

    ``AE.start_server`` always builds pynetdicom's own server class; the SCP builds a
    :class:`service.gate.GatedAssociationServer` with ``make_server`` and serves it itself.

    Raises
    ------
    NetPatchError
        The AE keeps no ``_servers`` list.
    """
    _require(ae, "_servers", where="ApplicationEntity")
    ae._servers.append(server)


def bound_received_datasets(assoc: Any, make_buffer: Callable[[], Any]) -> None:
    """Collect each received DIMSE message's data set in ``make_buffer()``.

    pynetdicom creates a ``DIMSEMessage`` with an ``io.BytesIO`` for the data set when the
    first P-DATA of a message arrives (``DIMSEServiceProvider.receive_primitive``); here the
    message is created first, with the buffer l3spot supplies (an ``io.BytesIO`` subclass,
    :class:`service.receive.SpillingBuffer`, that bounds memory and size).

    Raises
    ------
    NetPatchError
        The association's DIMSE provider has no ``receive_primitive`` or ``message``.
    """
    from pynetdicom.dimse_messages import DIMSEMessage

    _require(assoc, "dimse", where="Association")
    dimse = assoc.dimse
    _require(dimse, "receive_primitive", "message", where="DIMSEServiceProvider")
    receive = dimse.receive_primitive

    def receive_into_bounded_buffer(primitive: Any) -> None:
        if dimse.message is None:
            message = DIMSEMessage()
            _require(message, "data_set", where="DIMSEMessage")
            message.data_set = make_buffer()
            dimse.message = message
        receive(primitive)

    dimse.receive_primitive = receive_into_bounded_buffer
