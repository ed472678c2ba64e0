"""A corpus of malformed and unexpected inputs over the network: each gets the proper DIMSE
status, nothing valid is lost, what cannot be stored is quarantined with a reason, and the
node keeps serving.

Data sets are hand-encoded (so that lengths, VRs and order can be wrong on purpose) and sent
*as bytes* with pynetdicom: with ``STORE_SEND_CHUNKED_DATASET`` it sends the data set that
follows a file's meta information without decoding it. About 80 hand-made cases plus 170
hypothesis mutations (fixed seed) plus raw-socket garbage run against one node.
"""

from __future__ import annotations

import json
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from core.config import Config
from service import scp
from service.spool import Spool, dataset_offset
from service.validate import MalformedDatasetError, inspect_dataset
from tests.support.node import free_port, make_ct

SC = "1.2.840.10008.5.1.4.1.1.7"
MR = "1.2.840.10008.5.1.4.1.1.4"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
]
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
FAILURES = {0xC000, 0xA900, 0x0111, 0x0122}

Element = tuple[int, str, bytes]


def encode(elements: list[Element], ts: str = ExplicitVRLittleEndian) -> bytes:
    """Encode (tag, VR, value) triples as given: no sorting, padding or checks."""
    uid = UID(ts)
    e = "<" if uid.is_little_endian else ">"
    out = bytearray()
    for tag, vr, value in elements:
        out += struct.pack(e + "HH", tag >> 16, tag & 0xFFFF)
        if uid.is_implicit_VR:
            out += struct.pack(e + "L", len(value))
        elif vr in LONG_VRS:
            out += vr.encode() + b"\0\0" + struct.pack(e + "L", len(value))
        else:
            out += vr.encode() + struct.pack(e + "H", len(value))
        out += value
    raw = bytes(out)
    if uid.is_deflated:
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = c.compress(raw) + c.flush()
    return raw


def _s(text: str, pad: bytes = b" ") -> bytes:
    b = text.encode()
    return b + pad if len(b) % 2 else b


def _ui(uid: str) -> bytes:
    return _s(uid, b"\0")


def ct_elements(
    study: str,
    series: str,
    sop: str,
    *,
    size: int = 8,
    ts: str = ExplicitVRLittleEndian,
    sop_class: str = CTImageStorage,
    seed: int = 0,
) -> list[Element]:
    """A small valid CT image (size x size int16) as element triples, ascending tags."""
    e = "<" if UID(ts).is_little_endian else ">"
    us = lambda v: struct.pack(e + "H", v)  # noqa: E731
    pixels = (np.arange(size * size, dtype=np.int16) + seed).astype(e + "i2").tobytes()
    return [
        (0x00080016, "UI", _ui(sop_class)),
        (0x00080018, "UI", _ui(sop)),
        (0x00080060, "CS", _s("CT")),
        (0x00100010, "PN", _s("Hostile^Corpus")),
        (0x0020000D, "UI", _ui(study)),
        (0x0020000E, "UI", _ui(series)),
        (0x00200013, "IS", _s("1")),
        (0x00280002, "US", us(1)),
        (0x00280004, "CS", _s("MONOCHROME2")),
        (0x00280010, "US", us(size)),
        (0x00280011, "US", us(size)),
        (0x00280100, "US", us(16)),
        (0x00280101, "US", us(16)),
        (0x00280102, "US", us(15)),
        (0x00280103, "US", us(1)),
        (0x7FE00010, "OW", pixels),
    ]


@dataclass
class Case:
    name: str
    raw: bytes
    expected: int
    sop: str
    sop_class: str = CTImageStorage
    ts: str = ExplicitVRLittleEndian


@dataclass
class Harness:
    """One node, one SCU association (re-opened if a case ends it), and the corpus files."""

    tmp: Path
    spool: Spool
    ae: AE
    port: int
    assoc: Association | None = None
    n: int = 0
    sent: int = 0
    quarantined: set[str] = field(default_factory=set)

    def associate(self) -> Association:
        if self.assoc is None or not self.assoc.is_established:
            scu = AE(ae_title="FUZZER")
            scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 20
            for cls in (CTImageStorage, SC, MR, RTSTRUCT, TEXT_SR):
                for ts in SYNTAXES:
                    scu.add_requested_context(cls, [ts])
            scu.add_requested_context(Verification)
            self.assoc = scu.associate("127.0.0.1", self.port, ae_title="L3SPOT")
            assert self.assoc.is_established
        return self.assoc

    def send(
        self,
        raw: bytes,
        sop: str,
        sop_class: str = CTImageStorage,
        ts: str = ExplicitVRLittleEndian,
    ) -> int:
        """Send ``raw`` as the data set of a C-STORE with these Affected UIDs; the status."""
        self.n += 1
        path = self.tmp / f"{self.n:05d}.dcm"
        meta = scp.file_meta_bytes(sop_class, sop, ts, "FUZZER")
        path.write_bytes(b"\0" * 128 + b"DICM" + meta + raw)
        status = self.associate().send_c_store(path)
        assert "Status" in status, "no response: the node stopped answering"
        self.sent += 1
        return int(status.Status)

    def check_outcome(self, raw: bytes, status: int, ts: str) -> None:
        """Stored bytes are exactly what was sent; failures are quarantined with a reason."""
        if status == 0:
            info = inspect_dataset(raw, UID(ts))
            path = self.spool.root / info.study / info.series / f"{info.sop_instance}.dcm"
            data = path.read_bytes()
            assert data[dataset_offset(data[:144]) :] == raw
            return
        assert status in FAILURES, hex(status)
        new = {p.name for p in self.spool.quarantine_dir.glob("*.bin")} - self.quarantined
        assert len(new) == 1, "a refused input must land in quarantine exactly once"
        name = new.pop()
        self.quarantined.add(name)
        assert (self.spool.quarantine_dir / name).read_bytes() == raw
        reason = json.loads(
            (self.spool.quarantine_dir / name.replace(".bin", ".reason.json")).read_text()
        )
        assert reason["reason"] and reason["status"] == f"0x{status:04X}"


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    tmp = tmp_path_factory.mktemp("hostile")
    config = Config.model_validate(
        {"node": {"port": free_port(), "host": "127.0.0.1", "spool_dir": str(tmp / "spool")}}
    )
    spool = Spool(tmp / "spool", tmp / "quarantine", fsync=False)  # speed; durability: spool tests
    ae, _ = scp.start_scp(config, spool, lambda *a: None)
    (tmp / "corpus").mkdir()
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    h = Harness(tmp / "corpus", spool, ae, config.node.port)
    yield h
    _config.STORE_SEND_CHUNKED_DATASET = old
    if h.assoc is not None and h.assoc.is_established:
        h.assoc.release()
    ae.shutdown()


def _without(elements: list[Element], tag: int) -> list[Element]:
    return [el for el in elements if el[0] != tag]


def _replace(
    elements: list[Element], tag: int, vr: str | None = None, value: bytes | None = None
) -> list[Element]:
    return [
        (t, vr or v, value if value is not None else b) if t == tag else (t, v, b)
        for t, v, b in elements
    ]


def handmade_cases() -> list[Case]:
    study, series = generate_uid(), generate_uid()
    cases: list[Case] = []

    def add(name: str, build: object, expected: int, **kw: str) -> None:
        sop = kw.pop("sop", None) or generate_uid()
        ts = kw.get("ts", ExplicitVRLittleEndian)
        els = ct_elements(study, series, sop, ts=ts, sop_class=kw.get("sop_class", CTImageStorage))
        raw = build(els) if callable(build) else encode(els, ts)  # type: ignore[operator]
        cases.append(Case(name, raw, expected, sop, **kw))

    add("valid CT", None, 0)
    for ts in SYNTAXES[1:4]:
        add(f"valid CT in {UID(ts).name}", None, 0, ts=ts)
    # truncated at 24 places: inside headers, values and the pixel data
    base_sop = generate_uid()
    full = encode(ct_elements(study, series, base_sop))
    for cut in np.linspace(8, len(full) - 1, 24).astype(int):
        sop = generate_uid()
        raw = encode(ct_elements(study, series, sop))[: int(cut)]
        cases.append(Case(f"truncated at {cut}", raw, 0xC000, sop))
    # wrong and huge lengths
    for tag in (0x00080060, 0x00280010, 0x7FE00010, 0x0020000E):
        for length in (0xFFFFFFF0, 0x7FFFFFFF, 0xFFFF):

            def build(els: list[Element], tag: int = tag, length: int = length) -> bytes:
                raw = bytearray(encode(els))
                pos = raw.index(struct.pack("<HH", tag >> 16, tag & 0xFFFF))
                vr = bytes(raw[pos + 4 : pos + 6]).decode()
                if vr in LONG_VRS:
                    raw[pos + 8 : pos + 12] = struct.pack("<L", length)
                else:
                    raw[pos + 6 : pos + 8] = struct.pack("<H", min(length, 0xFFFF))
                return bytes(raw)

            add(f"length {length:#x} on {tag:08X}", build, 0xC000)
    add(
        "Rows with 4 bytes",
        lambda els: encode(_replace(els, 0x00280010, value=b"\0\1\0\0")),
        0xC000,
    )
    add("CS with length 0xFFFF", lambda els: encode(els)[:0] + _undefined_cs(els), 0xC000)
    # missing required attributes
    for tag, name in (
        (0x00080016, "SOPClassUID"),
        (0x00080018, "SOPInstanceUID"),
        (0x0020000D, "StudyInstanceUID"),
        (0x0020000E, "SeriesInstanceUID"),
        (0x00280010, "Rows"),
        (0x00280011, "Columns"),
        (0x00280100, "BitsAlloc"),
        (0x7FE00010, "PixelData"),
    ):
        add(f"missing {name}", lambda els, tag=tag: encode(_without(els, tag)), 0xC000)
    add(
        "missing Modality (stored; the eligibility filter decides)",
        lambda els: encode(_without(els, 0x00080060)),
        0,
    )
    # wrong VRs
    add("Rows as LO", lambda els: encode(_replace(els, 0x00280010, "LO", b"12")), 0xC000)
    add("SeriesInstanceUID as LO", lambda els: encode(_replace(els, 0x0020000E, "LO")), 0xC000)
    add("unknown VR ZZ", lambda els: encode(_replace(els, 0x00080060, "ZZ")), 0xC000)
    add("lower-case VR", lambda els: encode(_replace(els, 0x00080060, "cs")), 0xC000)
    add(
        "Modality as SH (tolerated: not read on the hot path)",
        lambda els: encode(_replace(els, 0x00080060, "SH")),
        0,
    )
    # SOP class in the data set differs from the presentation context's
    add(
        "SC inside a CT C-STORE",
        lambda els: encode(_replace(els, 0x00080016, value=_ui(SC))),
        0xA900,
    )
    add(
        "MR inside a CT C-STORE",
        lambda els: encode(_replace(els, 0x00080016, value=_ui(MR))),
        0xA900,
    )
    # pixel data too short
    for short in (2, 64, 127):
        add(
            f"pixel data {short} bytes",
            lambda els, n=short: encode(_replace(els, 0x7FE00010, value=b"\0" * n)),
            0xC000,
        )
    add(
        "pixel data longer than needed (tolerated)",
        lambda els: encode(_replace(els, 0x7FE00010, value=b"\0" * 200)),
        0,
    )
    # private tags (kept as sent)
    add(
        "private block",
        lambda els: encode(
            sorted(
                els
                + [
                    (0x00090010, "LO", _s("ACME")),
                    (0x00091001, "OB", b"\x01\x02\x03\x04"),
                    (0x00091002, "UN", b"\xff" * 6),
                ]
            )
        ),
        0,
    )
    add("private SQ with undefined length", lambda els: _with_private_sequence(els), 0)
    # non-CT objects are stored as they are
    for cls, name in ((SC, "SC"), (MR, "MR"), (RTSTRUCT, "RT Struct"), (TEXT_SR, "Basic Text SR")):
        if cls in (RTSTRUCT, TEXT_SR):
            add(
                name,
                lambda els, cls=cls: encode([e for e in els if e[0] < 0x00280000]),
                0,
                sop_class=cls,
            )
        else:
            add(name, None, 0, sop_class=cls)
    # structure
    add("tags out of order", lambda els: encode([els[1], els[0], *els[2:]]), 0xC000)
    add("empty data set", lambda els: b"", 0xC000)
    add("sequence without delimiter", lambda els: encode(els[:3]) + _open_sequence(), 0xC000)
    add("sequences nested 40 deep", lambda els: encode(els[:4]) + _deep_sequence(40), 0xC000)
    add(
        "item longer than its sequence",
        lambda els: encode(
            els[:4] + [(0x00081140, "SQ", struct.pack("<HHL", 0xFFFE, 0xE000, 500) + b"\0" * 8)]
        ),
        0xC000,
    )
    add(
        "random bytes",
        lambda els: bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8)),
        0xC000,
    )
    # empty or invalid UIDs
    for bad in ("", "1.2.abc", "1..2", "1.2.", "." + "1" * 10, "1" * 65, "../../etc", "1.2.3 4"):
        add(
            f"series UID {bad!r}",
            lambda els, b=bad: encode(_replace(els, 0x0020000E, value=_ui(b))),
            0xC000,
        )
    add(
        "SOPInstanceUID differs from the Affected one",
        lambda els: encode(_replace(els, 0x00080018, value=_ui(generate_uid()))),
        0xC000,
    )
    # odd transfer syntaxes
    add(
        "deflate stream corrupt",
        lambda els: b"\x00\x01garbage-not-deflate" * 4,
        0xC000,
        ts=DeflatedExplicitVRLittleEndian,
    )
    add("RLE with encapsulated fragments", lambda els: _encapsulated(els), 0, ts=RLELossless)
    add(
        "JPEG whose fragment list has no delimiter",
        lambda els: _encapsulated(els)[:-8],
        0xC000,
        ts=JPEGBaseline8Bit,
    )
    add(
        "big endian data set sent as little endian",
        lambda els: encode(els, ExplicitVRBigEndian),
        0xC000,
    )
    return cases


def _undefined_cs(els: list[Element]) -> bytes:
    head = encode(els[:2])
    return head + struct.pack("<HH", 0x0008, 0x0060) + b"CS" + b"\xff\xff" + b"CT"


def _open_sequence() -> bytes:
    return (
        struct.pack("<HH", 0x0008, 0x1140)
        + b"SQ\0\0"
        + struct.pack("<L", 0xFFFFFFFF)
        + (struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF))
        + encode([(0x00081150, "UI", _ui(CTImageStorage))])
    )


def _deep_sequence(depth: int) -> bytes:
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHL", 0xFFFE, 0xE000, len(inner)) + inner
        inner = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + struct.pack("<L", len(item)) + item
    return inner


def _with_private_sequence(els: list[Element]) -> bytes:
    item = encode([(0x00290010, "LO", _s("ACME"))])
    sq = (
        struct.pack("<HH", 0x0029, 0x1010)
        + b"SQ\0\0"
        + struct.pack("<L", 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + item
        + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    )
    head = encode([e for e in els if e[0] < 0x00290000])
    tail = encode([(0x00290010, "LO", _s("ACME"))]) + sq
    return head + tail + encode([e for e in els if e[0] > 0x00291010])


def _encapsulated(els: list[Element]) -> bytes:
    pixel = (
        struct.pack("<HH", 0x7FE0, 0x0010)
        + b"OB\0\0"
        + struct.pack("<L", 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0)  # empty basic offset table
        + struct.pack("<HHL", 0xFFFE, 0xE000, 8)
        + b"\x01" * 8
        + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    )
    return encode(els[:-1]) + pixel


CASES = handmade_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_handmade_input_gets_its_status_and_is_stored_or_quarantined(
    harness: Harness, case: Case
) -> None:
    status = harness.send(case.raw, case.sop, case.sop_class, case.ts)
    assert status == case.expected, f"{case.name}: {status:#06x}"
    harness.check_outcome(case.raw, status, case.ts)


_BASE_STUDY, _BASE_SERIES = generate_uid(), generate_uid()

mutation = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(0)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("length"), st.floats(0, 1), st.integers(0, 0xFFFFFFFF)),
)


@settings(
    max_examples=170,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    mutations=st.lists(mutation, min_size=1, max_size=4),
    ts=st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
)
def test_mutated_data_sets_never_crash_the_node_and_nothing_is_lost(
    harness: Harness, mutations: list[tuple[str, float, int]], ts: str
) -> None:
    sop = generate_uid()
    raw = bytearray(encode(ct_elements(_BASE_STUDY, _BASE_SERIES, sop, ts=ts), ts))
    for op, where, value in mutations:
        pos = int(where * max(len(raw) - 1, 0))
        if op == "flip" and raw:
            raw[pos] = value
        elif op == "truncate":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = bytes([value]) * (1 + value % 7)
        elif op == "length" and len(raw) >= pos + 4:
            raw[pos : pos + 4] = struct.pack("<L", value)
    # pynetdicom's SCU reads leading (0002,xxxx) bytes as File Meta, so it cannot send them
    assume(len(raw) >= 8 and raw[:2] != b"\x02\x00")
    status = harness.send(bytes(raw), sop, CTImageStorage, ts)
    harness.check_outcome(bytes(raw), status, ts)


def test_file_meta_elements_inside_the_data_set_are_refused() -> None:
    # not sendable with pynetdicom's SCU (it takes them for File Meta), so checked directly
    raw = encode([(0x00020010, "UI", _ui(ExplicitVRLittleEndian))])
    with pytest.raises(MalformedDatasetError, match="File Meta"):
        inspect_dataset(raw, UID(ExplicitVRLittleEndian))


def test_interleaved_series_in_one_association_land_in_their_own_folders(
    harness: Harness,
) -> None:
    study, a, b = generate_uid(), generate_uid(), generate_uid()
    sent: dict[str, list[str]] = {a: [], b: []}
    for i in range(8):
        for series in (a, b) if i % 2 else (b, a):
            sop = generate_uid()
            raw = encode(ct_elements(study, series, sop, seed=i))
            assert harness.send(raw, sop) == 0
            sent[series].append(sop)
    for series, sops in sent.items():
        names = {p.stem for p in (harness.spool.root / study / series).glob("*.dcm")}
        assert names == set(sops)


def test_a_ct_image_sent_on_the_verification_context_is_refused_and_quarantined(
    harness: Harness,
) -> None:
    """Issue 16: a C-STORE on the Verification presentation context was stored.

    PS3.8 section 9.3.5: the presentation context names the abstract syntax of what it
    carries; a CT data set on the Verification context is refused with 0x0122 (SOP Class
    not supported) and kept in quarantine.
    """
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE

    from core.netpatch import guard_scu_reactor

    scu = AE(ae_title="WRONGCTX")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", harness.port, ae_title="L3SPOT")
    assert assoc.is_established
    guard_scu_reactor(assoc)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    raw = encode(ct_elements(study, series, sop), ImplicitVRLittleEndian)
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = sop
    req.Priority = 2
    req.DataSet = BytesIO(raw)
    (context,) = assoc.accepted_contexts
    try:
        assoc.dimse.send_msg(req, context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assert rsp is not None, "no C-STORE response"
        status = int(rsp.Status)
    finally:
        assoc.release()
    assert status == 0x0122
    assert not (harness.spool.root / study).exists()
    harness.check_outcome(raw, status, ImplicitVRLittleEndian)


def test_same_sop_instance_twice_keeps_the_first_and_quarantines_a_different_second(
    harness: Harness,
) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    first = encode(ct_elements(study, series, sop, seed=1))
    second = encode(ct_elements(study, series, sop, seed=2))
    assert harness.send(first, sop) == 0
    assert harness.send(first, sop) == 0  # identical re-send: idempotent success
    status = harness.send(second, sop)
    assert status == 0x0111
    harness.check_outcome(second, status, ExplicitVRLittleEndian)
    stored = (harness.spool.root / study / series / f"{sop}.dcm").read_bytes()
    assert stored.endswith(first)
    assert len(list((harness.spool.root / study / series).iterdir())) == 1


def _stored_files(harness: Harness) -> set[Path]:
    """Every file in the spool and the quarantine (what the node has written so far)."""
    roots = (harness.spool.root, harness.spool.quarantine_dir)
    return {p for root in roots if root.is_dir() for p in root.rglob("*")}


@pytest.mark.parametrize(
    "junk",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x01\x00\x00\x00\x00\x10" + b"\x00" * 16,  # A-ASSOCIATE-RQ with nonsense inside
        b"\x09\x00\x00\x00\x00\x04abcd",  # unknown PDU type
        b"\x04\x00\xff\xff\xff\xff" + b"\x00" * 64,  # 4 GB P-DATA before any association
        b"\x01",  # one byte then close
        bytes(range(256)) * 4,
    ],
    ids=["http", "bad-rq", "pdu-type-9", "huge-pdata", "one-byte", "byte-ramp"],
)
def test_garbage_on_the_socket_only_ends_that_connection(harness: Harness, junk: bytes) -> None:
    before = _stored_files(harness)
    open_assoc = harness.associate()  # an association that is open while the garbage arrives
    ended = False
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as s:
        try:  # the node may already have answered A-ABORT and closed (reset) the connection
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            while s.recv(4096):
                pass
            ended = True  # the node closed the connection (EOF)
        except ConnectionResetError:
            ended = True  # the node reset it
        except TimeoutError:
            ended = False
    harness.sent += 1
    assert ended, "the node kept the garbage connection open for 10 s"
    # the association that was already open is untouched, and a new one is accepted
    assert open_assoc.is_established
    assert int(open_assoc.send_c_echo().Status) == 0
    scu = AE(ae_title="AFTERJUNK")
    scu.add_requested_context(Verification)
    fresh = scu.associate("127.0.0.1", harness.port, ae_title="L3SPOT")
    try:
        assert fresh.is_established, "the node refused a new association after the garbage"
        assert int(fresh.send_c_echo().Status) == 0
    finally:
        fresh.release()
    # garbage is not a data set: nothing was stored or quarantined
    assert _stored_files(harness) == before


def test_garbage_p_data_inside_an_association_aborts_only_it(harness: Harness) -> None:
    assoc = harness.associate()
    assoc.dul.socket.send(b"\x04\x00\x00\x00\x00\x0a" + b"\x00\x00\x00\x06\x01\x03" + b"\xff" * 4)
    assoc.dul.socket.send(b"\x04\x00\x00\x00\x00\x08" + b"\xff" * 8)
    harness.assoc = None  # aborted by the node; the next send opens a new one
    harness.sent += 1
    audit = harness.spool.root.parent / "audit.log"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = audit.read_text().splitlines() if audit.is_file() else []
        recs = [json.loads(line) for line in lines]
        if any("malformed message" in r.get("reason", "") for r in recs):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the node did not abort and audit the association with garbage P-DATA")
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted


def test_afterwards_echo_succeeds_and_a_valid_series_is_stored_intact(harness: Harness) -> None:
    assert harness.sent >= 200, f"corpus has only {harness.sent} inputs"
    assoc = harness.associate()
    assert int(assoc.send_c_echo().Status) == 0
    study, series = generate_uid(), generate_uid()
    sent = [make_ct(study, series, i, size=32) for i in range(5)]
    _config.STORE_SEND_CHUNKED_DATASET = False
    try:
        assert [int(assoc.send_c_store(ds).Status) for ds in sent] == [0] * 5
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = True
    for ds in sent:
        back = pydicom.dcmread(harness.spool.root / study / series / f"{ds.SOPInstanceUID}.dcm")
        assert np.array_equal(back.pixel_array, ds.pixel_array)
