"""core/netpatch.py: every pynetdicom patch still attaches to the installed pynetdicom.

These tests fail, rather than the node silently losing its PDU guard or its ingest speed,
when pynetdicom is upgraded past the version the patches were written against.
"""

from __future__ import annotations

import copy
import inspect
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pynetdicom
import pynetdicom.association
import pytest
from pynetdicom import AE, _handlers, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler

from core import netpatch
from core.errors import L3SpotError, NetPatchError

REPO = Path(__file__).resolve().parents[2]


def test_installed_pynetdicom_is_the_pinned_version() -> None:
    assert pynetdicom.__version__ == netpatch.PYNETDICOM_VERSION
    pyproject = (REPO / "pyproject.toml").read_text()
    pins = re.findall(r'"pynetdicom([^"]*)"', pyproject)
    assert pins == [f"=={netpatch.PYNETDICOM_VERSION}"]
    assert netpatch.verify_pynetdicom() == netpatch.PYNETDICOM_VERSION


def _params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_patch_targets_keep_their_signatures_and_are_still_used() -> None:
    """What each patch replaces exists with the signature the wrapper assumes, and the
    code whose behaviour the patch changes still calls it."""
    assert _params(AssociationSocket.recv) == ["self", "nr_bytes"]  # PduGuard
    assert _params(StateMachine.do_action) == ["self", "event"]  # guard_state_machine
    sig = inspect.signature(DIMSEServiceProvider.get_msg)  # guard_scu_reactor
    assert list(sig.parameters) == ["self", "block"] and sig.parameters["block"].default is False
    assert pynetdicom.association.time is time or isinstance(
        pynetdicom.association.time, netpatch.ReactorClock
    )
    # ReactorClock: the acceptor reactor sleeps through the module's ``time``
    assert "time.sleep(" in inspect.getsource(Association._run_reactor)
    # SharedContexts: the server's contexts are deep-copied per association
    assert "deepcopy(self.server.contexts)" in inspect.getsource(RequestHandler._create_association)
    # PduGuard: the DUL reads each PDU through its socket's recv(length)
    assert "self.socket.recv(pdu_length)" in inspect.getsource(DULServiceProvider)
    # the DUL loop sleeps _run_loop_delay (set_dul_idle_sleep)
    assert "self._run_loop_delay" in inspect.getsource(DULServiceProvider.run_reactor)
    # the standard handlers unbound by quiet_pdu_logging are the ones pynetdicom binds
    for event_type, handler in netpatch.PYNETDICOM_LOG_HANDLERS:
        assert handler is getattr(_handlers, handler.__name__)
        assert event_type in evt._INTERVENTION_EVENTS + evt._NOTIFICATION_EVENTS


def _acceptor_association() -> tuple[Association, socket.socket]:
    """A real acceptor Association with a connected socket (no thread started)."""
    ae = AE()
    ae.add_supported_context(Verification)
    assoc = Association(ae, mode="acceptor")
    ours, peer = socket.socketpair()
    assoc.set_socket(AssociationSocket(assoc, client_socket=ours))
    return assoc, peer


def test_every_acceptor_patch_attaches_to_a_real_association() -> None:
    assoc, peer = _acceptor_association()
    aborted: list[str] = []
    before = {h for handlers in assoc._handlers.values() for h in _flat(handlers)}
    for _, handler in netpatch.PYNETDICOM_LOG_HANDLERS:
        assert handler in before  # pynetdicom binds them: unbinding them is not a no-op
    try:
        wake = netpatch.attach_acceptor_patches(assoc, 1024, {"address": "x"}, aborted.append)
        assert assoc.l3spot_wakeup is wake  # type: ignore[attr-defined]
        assert isinstance(assoc.dul.socket.recv, netpatch.PduGuard)  # type: ignore[union-attr]
        with pytest.raises(OSError, match="exceeds the limit of 1024"):
            assoc.dul.socket.recv(4096)  # type: ignore[union-attr]
        assert not wake.is_set()
        assoc.dimse.msg_queue.put((1, None))
        assert wake.is_set()
        wake.clear()
        assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]
        assert wake.is_set()
        bound = {h for handlers in assoc._handlers.values() for h in _flat(handlers)}
        for _, handler in netpatch.PYNETDICOM_LOG_HANDLERS:
            assert handler not in bound
        # a malformed message aborts (state machine guard), it does not kill the DUL thread
        assoc.dul.state_machine.current_state = "Sta6"
        assoc.dul.state_machine.do_action("Evt-no-such-event")
        assert assoc.is_aborted and assoc.dul._kill_thread and len(aborted) == 1
        assert aborted[0].startswith("malformed message from peer")
        netpatch.set_dul_idle_sleep(assoc, 0.0001)
        assert assoc.dul._run_loop_delay == 0.0001
    finally:
        peer.close()
        assoc.dul.socket.close()  # type: ignore[union-attr]


def _flat(handlers: Any) -> list[Any]:
    if isinstance(handlers, list):
        return [h[0] if isinstance(h, tuple) else h for h in handlers]
    if isinstance(handlers, tuple):
        return [handlers[0]]
    return [handlers]


def test_guard_scu_reactor_attaches_to_a_real_requestor_association() -> None:
    assoc = Association(AE(), mode="requestor")
    netpatch.guard_scu_reactor(assoc)
    assoc.dimse.msg_queue.put((1, "response"))  # type: ignore[arg-type]
    assert assoc.dimse.get_msg(block=False) == (None, None)  # the reactor's look
    assert assoc.dimse.get_msg(block=True) == (1, "response")  # the waiting send_*


def test_reactor_clock_and_shared_contexts_attach_to_a_real_server() -> None:
    netpatch.install_reactor_clock()
    netpatch.install_reactor_clock()  # idempotent
    assert isinstance(pynetdicom.association.time, netpatch.ReactorClock)
    ae = AE()
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        netpatch.share_server_contexts(server)
        assert isinstance(server.contexts, netpatch.SharedContexts)
        copied = copy.deepcopy(server.contexts)
        assert copied[0] is server.contexts[0]  # shallow: no per-association deep copy
        # a real association through the patched server still works
        scu = AE()
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", server.server_address[1])
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        ae.shutdown()


def test_a_patch_that_cannot_attach_raises_instead_of_passing_silently() -> None:
    class NotAnAssociation:
        dul = None
        dimse = None

    assert issubclass(NetPatchError, L3SpotError)
    with pytest.raises(
        NetPatchError, match=f"written for pynetdicom {netpatch.PYNETDICOM_VERSION}"
    ):
        netpatch.attach_acceptor_patches(NotAnAssociation(), 1024, {}, print)
    with pytest.raises(NetPatchError, match="get_msg"):
        netpatch.guard_scu_reactor(type("A", (), {"dimse": object()})())
    with pytest.raises(NetPatchError, match="put"):
        netpatch.wake_on_put(object(), threading.Event())
    with pytest.raises(NetPatchError, match="_run_loop_delay"):
        netpatch.set_dul_idle_sleep(type("A", (), {"dul": object()})(), 0.001)
    with pytest.raises(NetPatchError, match="contexts"):
        netpatch.share_server_contexts(object())
