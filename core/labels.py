"""Tissue label values shared by the phantom's ground truth, the segmenters and the DICOM SEG.

A label map is a (y, x) or (z, y, x) uint8 array with these values.
"""

from __future__ import annotations

BACKGROUND = 0
SMA = 1  # skeletal muscle: psoas, paraspinal, abdominal wall (and quadratus lumborum)
IMAT = 2  # intermuscular / intramuscular adipose tissue (inside the muscle fascia)
VAT = 3  # visceral adipose tissue (inside the abdominal wall)
SAT = 4  # subcutaneous adipose tissue (between skin and abdominal wall)

#: label value -> short key used in result.json, CSV columns and SEG segment labels
COMPARTMENTS: dict[int, str] = {SMA: "sma", IMAT: "imat", VAT: "vat", SAT: "sat"}

#: label value -> human-readable name
COMPARTMENT_NAMES: dict[int, str] = {
    SMA: "Skeletal muscle",
    IMAT: "Intermuscular adipose tissue",
    VAT: "Visceral adipose tissue",
    SAT: "Subcutaneous adipose tissue",
}

#: label value -> display colour (R, G, B), used by overlays and SEG recommended colours
COMPARTMENT_COLOURS: dict[int, tuple[int, int, int]] = {
    SMA: (220, 50, 47),  # red
    IMAT: (38, 198, 218),  # cyan
    VAT: (255, 193, 7),  # amber
    SAT: (76, 175, 80),  # green
}
