"""What l3spot's own results look like, so that the node recognises them coming back.

A PACS rule that forwards whole studies sends l3spot's SEG, SR and Secondary Capture (and a
rejection note) back to its AE title (a routing loop). The node acknowledges them and drops
them without a job row (:mod:`service.scp`); the writer (:mod:`worker.outputs`) stamps every
object with :data:`MANUFACTURER`. One definition serves both sides.
"""

from __future__ import annotations

#: Manufacturer (0008,0070) of every object l3spot writes (General Equipment module).
MANUFACTURER = "l3spot"
#: Manufacturer's Model Name (0008,1090) of those objects.
MANUFACTURER_MODEL_NAME = "l3spot body composition"

#: SOP classes l3spot writes: Segmentation, Comprehensive 3D SR, Secondary Capture, and the
#: Key Object Selection of a rejection note (after a reader's correction, IHE IOCM).
DERIVED_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR Storage
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document Storage
    }
)


def is_own_output(sop_class_uid: str, manufacturer: str) -> bool:
    """True for an object l3spot itself wrote: one of its SOP classes and its Manufacturer.

    A false positive cannot hide a CT series (CT Image Storage is never among these
    classes); it only spares an "ineligible" job row.
    """
    return sop_class_uid in DERIVED_SOP_CLASSES and manufacturer.strip() == MANUFACTURER
