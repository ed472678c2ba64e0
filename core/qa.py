"""The quality-assurance flags an analysis can raise, and what each one means to the reader.

One table for every place that shows a flag: ``result.json`` and the job record (the key),
the SR (a qualitative evaluation coded in l3spot's scheme, :mod:`worker.outputs.sr`), the
Secondary Capture and the web page (the meaning as text).
"""

from __future__ import annotations

from typing import NamedTuple


class QaFlag(NamedTuple):
    """One flag: its code in l3spot's coding scheme (SH, <= 16 characters) and its meaning
    for the reader (LO, <= 64 characters: it is the SR code meaning, PS3.5 6.2)."""

    code: str
    meaning: str


#: flag key (result.json, job record) -> code and meaning.
QA_FLAGS: dict[str, QaFlag] = {
    "low_l3_confidence": QaFlag(
        "LOWL3CONF", "L3 localisation confidence below threshold: check the level"
    ),
    "body_truncated": QaFlag(
        "BODYTRUNC", "Body cut by the field of view edge: SAT and SMA underestimated"
    ),
    "arms_in_slice": QaFlag("ARMS", "Arms in the L3 slice excluded from the measurement"),
    "metal_artefact": QaFlag("METAL", "Metal in the L3 slice: streaks may change areas and HU"),
    "possible_transitional_anatomy": QaFlag(
        "TRANSITIONAL", "Possible transitional vertebra: rib and sacrum counts disagree"
    ),
    "l3_level_corrected": QaFlag(
        "LEVELCORR", "L3 level set by counting vertebrae, not the locator: check it"
    ),
    "l3_level_disagrees": QaFlag(
        "LEVELDISAGREE", "Counting vertebrae gives another L3 level: check the level"
    ),
    "l3_level_unverified": QaFlag(
        "LEVELUNVERIFIED", "L3 level not checked by counting vertebrae: check the level"
    ),
    "l3_found_by_counting": QaFlag(
        "L3COUNTED", "L3 found by counting vertebrae, not by the locator: check it"
    ),
    "unusual_muscle_hu": QaFlag(
        "MUSCLEHU", "Mean muscle HU outside the expected range: check the masks"
    ),
}


def qa_flag(key: str) -> QaFlag:
    """The code and meaning of flag ``key``; an unknown key keeps its own name (cut to fit)."""
    return QA_FLAGS.get(key, QaFlag(key[:16].upper(), key[:64]))
