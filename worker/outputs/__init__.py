"""DICOM results of one analysis: SEG, TID 1500 SR and an RGB Secondary Capture.

One module per object, as highdicom splits its subpackages: :mod:`.uids` (deterministic
derived UIDs), :mod:`.codes` (the coded concepts and where they come from), :mod:`.seg`,
:mod:`.sr`, :mod:`.sc` and :mod:`.render` (the pictures). What each object contains, and why
each code was chosen, is written down in ``docs/outputs.md``.
"""

from __future__ import annotations

from worker.outputs.uids import DerivedKind, derived_uid

__all__ = ["DerivedKind", "derived_uid"]
