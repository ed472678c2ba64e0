"""L3 localisation: sliding-window CNN over the frontal MIP, correlation decision.

Belharbi et al. 2017, "Spotting L3 slice in CT scans using deep convolutional network and
transfer learning", sections 3.2-3.3 and Fig. 6.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class L3Location:
    """Where L3 is, or why it was not found.

    Attributes
    ----------
    in_field_of_view : False when L3 is not inside the scanned range (then no slice).
    slice_index : 0-based index of the L3 slice in the series sorted by ascending z
        (``CTVolume.z_mm``), or None.
    z_mm : z position (mm) of the L3 decision, or None.
    mip_row : fractional MIP row of the decision, or None.
    confidence : 0..1, from the correlation peak and the agreement of the windows.
    reason : why ``in_field_of_view`` is False or the confidence is low; None otherwise.
    window_top_rows : (n_windows,) int, MIP row of each window's top edge.
    predictions : (n_windows,) float32, predicted L3 offset (MIP rows) inside each window.
    correlation : (n_candidates,) float32, correlation with the ideal slope -1 line for each
        candidate L3 row in ``candidate_rows``.
    candidate_rows : (n_candidates,) float, MIP rows the correlation was evaluated at.
    """

    in_field_of_view: bool
    slice_index: int | None
    z_mm: float | None
    mip_row: float | None
    confidence: float
    reason: str | None = None
    window_top_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    predictions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    correlation: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    candidate_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
