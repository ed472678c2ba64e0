"""core/dicom.py: the one element walker the node's C-STORE check and the loader share."""

from __future__ import annotations

import io
import struct

import pytest

from core.dicom import PIXEL_DATA, UNDEFINED_LENGTH, ElementWalker
from core.errors import MalformedDatasetError


def _el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"SQ", b"OB", b"OW", b"UN"):
        return struct.pack("<HH2s2xL", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _item(body: bytes) -> bytes:
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body


def _nested(depth: int) -> bytes:
    body = _el(0x0008, 0x0060, b"CS", b"CT")
    for _ in range(depth):
        body = _el(0x0040, 0x0260, b"SQ", _item(body))
    return body


def test_top_level_elements_are_yielded_and_sequences_walked() -> None:
    data = (
        _el(0x0008, 0x0016, b"UI", b"1.2\x00") + _nested(2) + _el(0x7FE0, 0x0010, b"OW", b"\0" * 8)
    )
    walker = ElementWalker(data, implicit=False)
    tags = [(tag, vr, length) for tag, vr, length, _, _ in walker.elements(0, len(data))]
    assert tags == [
        (0x00080016, b"UI", 4),
        (0x00400260, b"SQ", len(_nested(2)) - 12),
        (PIXEL_DATA, b"OW", 8),
    ]
    assert walker.value(8, 4) == b"1.2\x00"


def test_depth_limit_and_defined_sequences_skipped_without_descend() -> None:
    deep = _nested(20)
    with pytest.raises(MalformedDatasetError, match="nested too deeply"):
        ElementWalker(deep, implicit=False).walk(0, len(deep))
    # a reader of top-level attributes does not look inside defined-length sequences
    assert ElementWalker(deep, implicit=False).walk(0, len(deep), descend=False) == len(deep)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_el(0x0010, 0x0010, b"PN", b"AB") + _el(0x0008, 0x0060, b"CS", b"CT"), "out of order"),
        (b"\x08\x00\x60\x00XX\x02\x00CT", "unknown VR"),
        (_el(0x0008, 0x0060, b"CS", b"CT")[:-1], "runs past the end"),
        (_el(0x0002, 0x0010, b"UI", b"1.2\x00"), "File Meta element"),
        (struct.pack("<HH2s2xL", 0x0008, 0x0060, b"OB", UNDEFINED_LENGTH), "undefined length"),
    ],
)
def test_malformed_structures_raise_with_the_byte_offset(data: bytes, match: str) -> None:
    with pytest.raises(MalformedDatasetError, match=f"{match}.* at byte \\d+"):
        ElementWalker(data, implicit=False).walk(0, len(data))


def test_a_file_is_read_forward_only_as_far_as_it_is_walked() -> None:
    data = _el(0x0008, 0x0060, b"CS", b"CT") + _el(0x7FE0, 0x0010, b"OW", b"\0" * 200_000)
    fp = io.BytesIO(data)
    walker = ElementWalker(fp.read(4), implicit=False, read_more=fp.read)
    for tag, *_ in walker.elements(0, len(data)):
        if tag == PIXEL_DATA:
            break
    assert walker.value(8, 2) == b"CT" and len(walker.buf) < len(data)
