"""Reading DICOM element headers without pydicom: one VR table and one element walker.

Both processes read encoded data sets by hand where pydicom would be too slow: the node
checks every received C-STORE data set before it answers (:mod:`service.validate`) and
the worker reads the header of every slice file to sort and validate a series
(:mod:`worker.volume.load`). Both walk the element headers with :class:`ElementWalker`
(PS3.5 section 7: tag, VR, length; sequences and encapsulated pixel data item by item)
and skip the values they do not need; neither decodes values here.

The walker is strict: an element, item or delimiter that does not lie inside its
container, an unknown explicit VR, tags that do not ascend (PS3.5 section 7.1), a File
Meta (0002,xxxx) element inside the data set, bad nesting or nesting deeper than
:data:`MAX_DEPTH` raise :class:`core.errors.MalformedDatasetError` with the byte offset.
The node answers such data sets with 0xC000; the loader leaves such files to pydicom.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Generator
from typing import Any

import pydicom.config

from core.errors import MalformedDatasetError

# pydicom's own warnings on reading a malformed value quote the value ("Invalid value for VR
# DA: '1950-01-02'"), which may be patient data, into the logs of the node and the workers.
# l3spot checks the values it uses itself (malformed_elements) and names the attribute only.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

__all__ = [
    "ATTRIBUTE_VR",
    "ITEM",
    "ITEM_DELIMITER",
    "LONG_VRS",
    "MAX_DEPTH",
    "PIXEL_DATA",
    "SEQUENCE_DELIMITER",
    "SHORT_VRS",
    "UNDEFINED_LENGTH",
    "Element",
    "ElementWalker",
    "MalformedDatasetError",
]

#: Value length (FFFFFFFFH) of a sequence, item or encapsulated Pixel Data delimited by
#: a delimitation item (PS3.5 section 7.5).
UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
#: Deepest sequence nesting walked (the node refuses deeper data sets: a stack of
#: thousands of nested sequences is a denial of service, not a CT image).
MAX_DEPTH = 16

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1).
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
#: Explicit VRs with a 2-byte length (PS3.5 Table 7.1-2).
SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT"}
    | {b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)

#: Dictionary VR (PS3.6) of every top-level attribute l3spot reads without pydicom.
ATTRIBUTE_VR: dict[int, bytes] = {
    0x00080005: b"CS",  # Specific Character Set
    0x00080008: b"CS",  # Image Type
    0x00080016: b"UI",  # SOP Class UID
    0x00080018: b"UI",  # SOP Instance UID
    0x00080060: b"CS",  # Modality
    0x00080070: b"LO",  # Manufacturer
    0x0008103E: b"LO",  # Series Description
    0x00180050: b"DS",  # Slice Thickness
    0x00181120: b"DS",  # Gantry/Detector Tilt
    0x0020000D: b"UI",  # Study Instance UID
    0x0020000E: b"UI",  # Series Instance UID
    0x00200011: b"IS",  # Series Number
    0x00200013: b"IS",  # Instance Number
    0x00200032: b"DS",  # Image Position (Patient)
    0x00200037: b"DS",  # Image Orientation (Patient)
    0x00200052: b"UI",  # Frame of Reference UID
    0x00280002: b"US",  # Samples per Pixel
    0x00280008: b"IS",  # Number of Frames
    0x00280010: b"US",  # Rows
    0x00280011: b"US",  # Columns
    0x00280030: b"DS",  # Pixel Spacing
    0x00280100: b"US",  # Bits Allocated
    0x00280101: b"US",  # Bits Stored
    0x00280103: b"US",  # Pixel Representation
    0x00281052: b"DS",  # Rescale Intercept
    0x00281053: b"DS",  # Rescale Slope
}

#: One element header: (tag, VR or None for implicit VR and items, value length, offset
#: of the value, offset of the element).
Element = tuple[int, bytes | None, int, int, int]

_LE = (struct.Struct("<HH"), struct.Struct("<H"), struct.Struct("<L"))
_BE = (struct.Struct(">HH"), struct.Struct(">H"), struct.Struct(">L"))
_DELIMITERS = (ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER)
_SEQUENCE_VRS = (b"SQ", b"UN", None)
_PIXEL_VRS = (b"OB", b"OW", None)


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class ElementWalker:
    """Walks the element headers of an encoded data set (PS3.5 section 7).

    Parameters
    ----------
    buf : the encoded bytes, from offset 0 (a whole data set, or the first chunk of a file).
    implicit : Implicit VR (PS3.5 section 7.1.3); may be changed between walks (a Part 10
        file's File Meta Information is always explicit VR little endian).
    little : little endian byte order.
    read_more : ``read(n)`` of the file ``buf`` was read from; when given, ``buf`` grows
        forward on demand (:meth:`need`), so a file is read only as far as it is walked.

    Notes
    -----
    Offsets are absolute positions in the data (or file). ``end`` arguments bound the
    container being walked (the data set, an item, a sequence of defined length).
    """

    def __init__(
        self,
        buf: bytes,
        *,
        implicit: bool,
        little: bool = True,
        read_more: Callable[[int], bytes] | None = None,
    ) -> None:
        self.buf = buf
        self.implicit = implicit
        self.little = little
        self._tag, self._u16, self._u32 = _LE if little else _BE
        self._read_more = read_more

    def fail(self, pos: int, msg: str) -> MalformedDatasetError:
        """The error for a malformed structure at byte ``pos``."""
        return MalformedDatasetError(f"{msg} at byte {pos}")

    def need(self, end: int) -> None:
        """Make ``buf`` hold the bytes up to ``end`` (reading more of the file if any).

        Raises
        ------
        MalformedDatasetError
            The data (or file) ends before ``end``.
        """
        if end <= len(self.buf):
            return
        if self._read_more is not None:
            self.buf += self._read_more(max(end - len(self.buf), 65536))
        if end > len(self.buf):
            raise self.fail(len(self.buf), "unexpected end of data")

    def u16(self, pos: int) -> int:
        """The unsigned 16-bit value at ``pos`` in the walker's byte order."""
        self.need(pos + 2)
        return int(self._u16.unpack_from(self.buf, pos)[0])

    def value(self, offset: int, length: int) -> bytes:
        """The ``length`` value bytes at ``offset``."""
        if offset + length > len(self.buf):
            self.need(offset + length)
        return self.buf[offset : offset + length]

    def header(self, pos: int, end: int) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, value length, value offset) of the element at ``pos``.

        Items and delimiters (group FFFE) have no VR in either encoding.

        Raises
        ------
        MalformedDatasetError
            The header does not fit before ``end``, or an explicit VR is unknown.
        """
        if pos + 4 > end:
            raise self.fail(pos, "truncated element tag")
        if pos + 8 > end:
            raise self.fail(pos, "truncated element header")
        buf = self.buf
        if pos + 12 > len(buf):  # a long-VR header is 12 bytes
            self.need(min(pos + 12, end))
            buf = self.buf
        group, elem = self._tag.unpack_from(buf, pos)
        tag = (group << 16) | elem
        if self.implicit or tag in _DELIMITERS:
            return tag, None, self._u32.unpack_from(buf, pos + 4)[0], pos + 8
        vr = buf[pos + 4 : pos + 6]
        if vr in SHORT_VRS:
            return tag, vr, self._u16.unpack_from(buf, pos + 6)[0], pos + 8
        if vr in LONG_VRS:
            if pos + 12 > end:
                raise self.fail(pos, "truncated element header")
            return tag, vr, self._u32.unpack_from(buf, pos + 8)[0], pos + 12
        raise self.fail(pos, f"unknown VR {vr!r} in {_tag_text(tag)}")

    def elements(
        self,
        pos: int,
        end: int,
        depth: int = 0,
        in_item: bool = False,
        descend: bool = True,
    ) -> Generator[Element, None, int]:
        """Yield the elements of one data set (or item) level; returns the end offset.

        Each element is yielded before its value is walked, so a caller may stop (e.g. at
        Pixel Data) without the walker touching what follows. Nested sequences and
        encapsulated Pixel Data are walked here, not yielded: with ``descend`` every item
        is checked; without it, sequences of defined length are skipped whole and only
        undefined-length ones are walked (to find their delimiters), which is all a
        reader of top-level attributes needs.

        Parameters
        ----------
        pos, end : offsets of the first element and of the container's end.
        depth : nesting depth (0 = the data set itself); deeper than :data:`MAX_DEPTH`
            raises.
        in_item : an undefined-length item, ended by an Item Delimitation Item.
        descend : check the items of defined-length sequences too.

        Raises
        ------
        MalformedDatasetError
            See the module docstring.
        """
        if depth > MAX_DEPTH:
            raise self.fail(pos, "sequences nested too deeply")
        last = -1
        header = self.header
        while pos < end:
            tag, vr, length, value = header(pos, end)
            if tag == ITEM_DELIMITER:
                if not in_item:
                    raise self.fail(pos, "item delimiter outside an item")
                return value
            if tag in (ITEM, SEQUENCE_DELIMITER):
                raise self.fail(pos, "item tag inside a data set")
            if tag <= last:
                raise self.fail(pos, f"tags out of order at {_tag_text(tag)}")
            last = tag
            if tag < 0x00030000 and depth == 0 and (tag >> 16) == 0x0002:
                raise self.fail(pos, "File Meta element (0002,xxxx) inside the data set")
            if length == UNDEFINED_LENGTH:
                fragments = tag == PIXEL_DATA and depth == 0 and vr in _PIXEL_VRS
                if not fragments and vr not in _SEQUENCE_VRS:
                    raise self.fail(pos, f"undefined length for VR {vr!r}")
                yield tag, vr, length, value, pos
                if fragments:
                    pos = self.fragments(value, end)
                else:
                    pos = self.sequence(value, end, depth + 1, None, descend)
                continue
            if value + length > end:
                raise self.fail(pos, f"{_tag_text(tag)} length {length} runs past the end")
            yield tag, vr, length, value, pos
            if vr == b"SQ" and descend:
                self.sequence(value, end, depth + 1, value + length, descend)
            pos = value + length
        if in_item:
            raise self.fail(pos, "item without delimiter (truncated)")
        return pos

    def walk(
        self, pos: int, end: int, depth: int = 0, in_item: bool = False, descend: bool = True
    ) -> int:
        """Walk one data set (or item) level to its end; returns the end offset."""
        gen = self.elements(pos, end, depth, in_item, descend)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return int(stop.value)

    def sequence(
        self, pos: int, end: int, depth: int, defined_end: int | None, descend: bool = True
    ) -> int:
        """Walk the items of a sequence from ``pos``; returns the offset after it.

        ``defined_end`` is the end of a defined-length sequence, None for one ended by a
        Sequence Delimitation Item.
        """
        stop = end if defined_end is None else defined_end
        while pos < stop:
            tag, _, length, value = self.header(pos, stop)
            if tag == SEQUENCE_DELIMITER:
                if defined_end is not None:
                    raise self.fail(pos, "sequence delimiter in a defined-length sequence")
                return value
            if tag != ITEM:
                raise self.fail(pos, "expected an item in a sequence")
            if length == UNDEFINED_LENGTH:
                pos = self.walk(value, stop, depth, in_item=True, descend=descend)
            else:
                if value + length > stop:
                    raise self.fail(pos, f"item length {length} runs past its sequence")
                if descend:
                    self.walk(value, value + length, depth, in_item=False, descend=descend)
                pos = value + length
        if defined_end is None:
            raise self.fail(pos, "sequence without delimiter (truncated)")
        return pos

    def fragments(self, pos: int, end: int) -> int:
        """Walk the items of encapsulated Pixel Data (PS3.5 A.4); returns the offset after."""
        while pos < end:
            tag, _, length, value = self.header(pos, end)
            if tag == SEQUENCE_DELIMITER:
                return value
            if tag != ITEM or length == UNDEFINED_LENGTH or value + length > end:
                raise self.fail(pos, "bad encapsulated pixel data fragment")
            pos = value + length
        raise self.fail(pos, "encapsulated pixel data without delimiter (truncated)")


#: Value representations whose malformed values break encoders (highdicom refuses them) and
#: that may carry patient data (dates, times, names, ages, sizes): PS3.5 6.2.
CHECKED_VRS = frozenset({"DA", "TM", "DT", "PN", "DS", "IS", "AS"})


def malformed_elements(ds: Any) -> list[str]:
    """Keywords (or tags) of the top-level elements of ``ds`` whose values break their VR.

    Only the keyword is returned, never the value: these are often patient attributes
    (PatientBirthDate, PatientAge ...) and must not reach logs, job records or web pages.

    Parameters
    ----------
    ds : a pydicom Dataset (pixel data not needed).
    """
    bad: list[str] = []
    for elem in ds:
        try:
            if elem.VR not in CHECKED_VRS or not elem.keyword or elem.value in (None, ""):
                continue  # private elements are not copied into derived objects
            values = elem.value if elem.VM > 1 else [elem.value]
            for v in values:
                _check_value(elem.VR, v if isinstance(v, str) else str(v))
        except (ValueError, TypeError, OverflowError):
            bad.append(elem.keyword or _tag_text(int(elem.tag)))
    return bad


def _check_value(vr: str, value: str) -> None:
    """Raise ValueError when ``value`` breaks its VR: the pattern and length of PS3.5 6.2,
    and for DA/TM/DT a real calendar date and time (19500230 matches the DA pattern but
    highdicom's conversion refuses it), for DS a finite number."""
    from pydicom.config import RAISE
    from pydicom.valuerep import DA, DT, TM, validate_value

    validate_value(vr, value, RAISE)
    text = value.strip()
    if not text:
        return
    if vr == "DA":
        DA(text)  # ValueError for 30 February
    elif vr == "TM":
        TM(text)  # ValueError for 25 o'clock
    elif vr == "DT":
        DT(text)
    elif vr == "DS" and not math.isfinite(float(text)):
        raise ValueError("DS not a finite number")


def blank_malformed(ds: Any) -> list[str]:
    """Empty every top-level element of ``ds`` whose value breaks its VR, in place.

    An empty value is valid for every attribute l3spot copies into its derived objects
    (Type 2 attributes of the Patient and Study modules). Returns the keywords emptied
    (:func:`malformed_elements`), for a warning that names the attribute, not its value.
    """
    bad = malformed_elements(ds)
    for keyword in bad:
        if keyword in ds:
            ds[keyword].value = ""
    return bad
