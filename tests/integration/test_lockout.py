"""No single peer locks scanners out: connections that never associate (issue 16).

Before an A-ASSOCIATE-RQ has arrived a connection is not an association: it has its own,
larger cap (in all and per source address), must deliver its complete A-ASSOCIATE-RQ within
the ARTIM time (PS3.8 section 9.1.5), and junk or a closed socket frees its place at once.
Each such connection leaves one audit record. The hostile peers connect from 127.0.0.2 and
127.0.0.3 (Linux routes all of 127/8 to loopback); the scanner from 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.scp_node import ScpNode

SCANNER, IDLER, TRICKLER = "127.0.0.1", "127.0.0.2", "127.0.0.3"


@pytest.fixture(scope="module")
def associate_rq() -> bytes:
    """The bytes of a real A-ASSOCIATE-RQ (pynetdicom's, captured on a plain socket)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        ae = AE(ae_title="SCANNER")
        ae.acse_timeout = ae.network_timeout = 2
        ae.add_requested_context(Verification)
        t = threading.Thread(target=ae.associate, args=("127.0.0.1", port), daemon=True)
        t.start()
        conn, _ = srv.accept()
        conn.settimeout(5)
        data = b""
        while len(data) < 6 or len(data) < 6 + int.from_bytes(data[2:6], "big"):
            data += conn.recv(65536)
        conn.close()
        t.join(5)
    assert data[0] == 0x01
    return data


def _connect(port: int, source: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def _closed_by_peer(s: socket.socket, within_s: float) -> bool:
    """True when the node closes (EOF or reset) ``s`` within ``within_s`` seconds."""
    s.settimeout(within_s)
    try:
        while s.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def echo_seconds(port: int, source: str = SCANNER, timeout_s: float = 10.0) -> float | None:
    """Seconds a C-ECHO took from ``source`` (association + echo + release), None if refused."""
    t0 = time.monotonic()
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="L3SPOT", bind_address=(source, 0))
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    return time.monotonic() - t0 if int(status.Status) == 0 else None


class Trickler:
    """Sockets that send an A-ASSOCIATE-RQ one byte every ``every_s`` seconds."""

    def __init__(self, sockets: list[socket.socket], rq: bytes, every_s: float) -> None:
        self.sockets, self.rq, self.every_s = sockets, rq, every_s
        self.stop = threading.Event()
        self.closed_at: dict[int, float] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for i in range(len(self.rq)):
            for n, s in enumerate(self.sockets):
                if n in self.closed_at:
                    continue
                try:
                    s.send(self.rq[i : i + 1])
                except OSError:
                    self.closed_at[n] = time.monotonic()
            if self.stop.wait(self.every_s):
                return


@pytest.fixture()
def sockets() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    yield held
    for s in held:
        with contextlib.suppress(OSError):
            s.close()


def test_echo_succeeds_within_5_s_while_12_idle_and_12_trickling_connections_are_open(
    make_node: Callable[..., ScpNode], associate_rq: bytes, sockets: list[socket.socket]
) -> None:
    node = make_node()  # defaults: max_associations 10, 8 pending per address
    # 4 per source address, so that all 24 stay open (the per-address cap has its own test)
    sockets += [_connect(node.port, f"127.0.0.{10 + i // 4}") for i in range(12)]
    trickling = [_connect(node.port, f"127.0.0.{20 + i // 4}") for i in range(12)]
    sockets += trickling
    trickler = Trickler(trickling, associate_rq, every_s=1.0)
    try:
        time.sleep(1.5)  # the node has accepted them all and is waiting on them
        assert not any(_closed_by_peer(s, within_s=0.01) for s in sockets), "not all open"
        took = echo_seconds(node.port, timeout_s=5)
        assert took is not None, "C-ECHO refused while idle and trickling peers were connected"
        assert took < 5.0
    finally:
        trickler.stop.set()


def test_a_trickled_association_request_is_closed_when_artim_expires(
    make_node: Callable[..., ScpNode], associate_rq: bytes, sockets: list[socket.socket]
) -> None:
    node = make_node(node={"artim_timeout_seconds": 1.5})
    s = _connect(node.port, TRICKLER)
    sockets.append(s)
    trickler = Trickler([s], associate_rq, every_s=0.2)
    t0 = time.monotonic()
    try:
        assert _closed_by_peer(s, within_s=6), "trickling peer kept its connection"
    finally:
        trickler.stop.set()
    assert time.monotonic() - t0 < 4.0
    (rec,) = node.records(event="connection")
    assert rec["outcome"] == "closed" and "ARTIM" in rec["reason"]
    assert rec["address"] == TRICKLER


def test_an_idle_connection_is_closed_when_artim_expires_and_audited(
    make_node: Callable[..., ScpNode], sockets: list[socket.socket]
) -> None:
    node = make_node(node={"artim_timeout_seconds": 1.0})
    s = _connect(node.port, IDLER)
    sockets.append(s)
    t0 = time.monotonic()
    assert _closed_by_peer(s, within_s=6)
    assert 0.8 < time.monotonic() - t0 < 3.0
    (rec,) = node.records(event="connection")
    assert rec["outcome"] == "closed" and "no A-ASSOCIATE-RQ" in rec["reason"]


@pytest.mark.parametrize(
    "junk",
    [os.urandom(64), b"GET / HTTP/1.1\r\n\r\n", b"\x09\x00\x00\x00\x00\x04abcd"],
    ids=["random", "http", "pdu-type-9"],
)
def test_junk_connections_are_closed_at_once_and_free_their_place(
    make_node: Callable[..., ScpNode], junk: bytes
) -> None:
    node = make_node(node={"max_associations": 2, "max_pending_per_address": 2})
    for _ in range(30):
        with _connect(node.port, SCANNER) as s:
            with contextlib.suppress(OSError):  # the node may have reset it already
                s.sendall(junk)
            assert _closed_by_peer(s, within_s=1.0), "junk connection kept open"
    took = echo_seconds(node.port, timeout_s=5)
    assert took is not None and took < 1.0, "refused or slow right after the junk"
    recs = node.records(event="connection", at_least=30)
    assert len(recs) == 30
    assert all("not an A-ASSOCIATE-RQ" in r["reason"] for r in recs)


def test_a_closed_idle_connection_frees_its_place_at_once(
    make_node: Callable[..., ScpNode],
) -> None:
    node = make_node(node={"max_associations": 2, "max_pending_per_address": 2})
    for _ in range(3):
        held = [_connect(node.port, IDLER) for _ in range(2)]
        time.sleep(0.2)
        for s in held:
            s.close()
        time.sleep(0.2)
        took = echo_seconds(node.port, source=IDLER, timeout_s=5)
        assert took is not None, "the closed connections still hold their places"
    recs = node.records(event="connection", at_least=6)
    assert len(recs) == 6
    assert all("closed before an A-ASSOCIATE-RQ" in r["reason"] for r in recs)


def test_connections_beyond_the_per_address_cap_are_closed_and_others_still_get_in(
    make_node: Callable[..., ScpNode], sockets: list[socket.socket]
) -> None:
    node = make_node(node={"max_pending_per_address": 3, "max_pending_connections": 5})
    sockets += [_connect(node.port, IDLER) for _ in range(3)]
    time.sleep(0.2)
    extra = _connect(node.port, IDLER)
    sockets.append(extra)
    assert _closed_by_peer(extra, within_s=1.0)
    sockets += [_connect(node.port, TRICKLER) for _ in range(2)]
    time.sleep(0.2)
    over = _connect(node.port, "127.0.0.4")
    sockets.append(over)
    assert _closed_by_peer(over, within_s=1.0), "the total pre-association cap was not kept"
    # an association request is always served: the scanner's association is not pending
    # long enough to be refused by a cap it arrives under
    for s in sockets[:3]:
        s.close()
    time.sleep(0.2)
    assert echo_seconds(node.port, timeout_s=5) is not None
    reasons = [r["reason"] for r in node.records(outcome="refused", event="connection")]
    assert any("127.0.0.2" in r or "per address" in r for r in reasons)
    assert any("max_pending_connections" in r for r in reasons)
