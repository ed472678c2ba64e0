"""Body composition at L3: SMA, IMAT, VAT and SAT segmented and measured.

HU ranges: skeletal muscle -29..+150 HU, adipose tissue -190..-30 HU (Mitsiopoulos et al.
1998). Skeletal muscle index SMI = SMA / height^2 (cm^2/m^2); sarcopenia cut-offs from Prado
et al. 2008 or Martin et al. 2013.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TissueMeasure:
    """One compartment on the L3 slice: area (cm^2) and radiodensity (HU)."""

    area_cm2: float
    mean_hu: float | None
    sd_hu: float | None
    pixel_count: int


@dataclass(frozen=True)
class SarcopeniaResult:
    """Sarcopenia evaluation; ``flag`` is None with a ``reason`` when it cannot be decided."""

    cutoffs: str  # "prado2008" | "martin2013"
    flag: bool | None
    threshold_cm2_per_m2: float | None = None
    reason: str | None = None


@dataclass
class CompositionResult:
    """Segmentation and measurements on the L3 slice.

    Attributes
    ----------
    slice_index : the measured slice (index into ``CTVolume.z_mm``).
    labels : (y, x) uint8 label map on the source pixel grid of that slice, values from
        :mod:`worker.labels` (0 background, 1 SMA, 2 IMAT, 3 VAT, 4 SAT).
    measures : compartment key ("sma", "imat", "vat", "sat") -> :class:`TissueMeasure`.
    smi_cm2_per_m2 : SMA / PatientSize^2, or None (see ``smi_reason``).
    smi_reason : why SMI is None.
    sarcopenia : evaluation with the configured cut-offs.
    bmi_kg_per_m2 : from PatientWeight and PatientSize when both are present.
    qa_flags : e.g. "body_truncated", "arms_in_slice", "metal_artefact", "unusual_muscle_hu".
    method : "classical" or "unet".
    """

    slice_index: int
    labels: np.ndarray
    measures: dict[str, TissueMeasure]
    smi_cm2_per_m2: float | None
    smi_reason: str | None
    sarcopenia: SarcopeniaResult | None
    bmi_kg_per_m2: float | None = None
    qa_flags: list[str] = field(default_factory=list)
    method: str = "classical"
