"""First stage of the L3 locator: sliding windows over the whole frontal MIP, in-FOV decision.

Belharbi et al. 2017, sections 3.2-3.3 and Fig. 6. On a frontal MIP at the first-stage
model's pixel size (3 mm for the shipped CNN4): :func:`worker.locator.windows.mip_to_strip`
-> :func:`worker.locator.windows.sliding_windows` (stride ``s``) -> the CNN predicts per window
the L3 row inside it and (l3spot extension) the probability that L3 lies near the window
centre -> :func:`worker.locator.decision.decide_l3` -> is L3 in the scanned range at all
(:func:`in_field_of_view`). The second stage (:mod:`worker.locator.fine`) and how the two are
combined (:mod:`worker.locator.locate`) build on this one; this module imports neither.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from worker.locator.decision import Decision, decide_l3
from worker.locator.weights import LoadedLocator
from worker.locator.windows import mip_to_strip, sliding_windows
from worker.mip import Mip

#: Without a presence head: the correlation and agreement an in-FOV decision needs.
FALLBACK_MIN_CORRELATION = 0.8
FALLBACK_MIN_AGREEMENT = 0.5

#: Votes within this distance (mm) of the decided row count as agreeing windows.
AGREEMENT_TOL_MM = 6.0


@dataclass
class CoarseResult:
    """What the first stage saw and decided on one MIP.

    Attributes
    ----------
    decision : the best run (and its ``alternatives`` when asked for), rows of the MIP.
    window_top_rows : (n_windows,) int64, MIP row of each window's top edge.
    predictions : (n_windows,) float32, predicted L3 row inside each window.
    presence : (n_windows,) float32 presence probabilities, or None for a paper-only model.
    timings_s : seconds per step ("windows", "cnn", "decision").
    """

    decision: Decision
    window_top_rows: np.ndarray
    predictions: np.ndarray
    presence: np.ndarray | None
    timings_s: dict[str, float] = field(default_factory=dict)


def coarse_stage(
    mip: Mip,
    loc: LoadedLocator,
    stride_px: int = 4,
    batch_size: int = 64,
    n_alternatives: int = 0,
) -> CoarseResult:
    """Slide the first-stage locator over a whole frontal MIP and decide L3.

    Parameters
    ----------
    mip : frontal MIP (rows, cols) in HU at ``loc.spec.pixel_mm`` (row 0 = most superior).
    loc : the first-stage locator.
    stride_px : step between consecutive windows (MIP rows; paper: up to 6 px at ~1 mm).
    batch_size : windows per forward pass.
    n_alternatives : also keep up to this many next-best runs at other places
        (:func:`worker.locator.decision.decide_l3`), for the second stage to arbitrate.

    Returns
    -------
    CoarseResult
        The decision in rows of ``mip``, and the per-window sequences (for plots).

    Raises
    ------
    ValueError
        The MIP's pixel size differs from the model's.
    """
    spec = loc.spec
    if abs(mip.pixel_mm - spec.pixel_mm) > 1e-6:
        raise ValueError(f"MIP pixel {mip.pixel_mm} mm != model pixel {spec.pixel_mm} mm")
    t0 = time.perf_counter()
    windows, tops = sliding_windows(mip_to_strip(mip.image, spec), spec, stride_px)
    t1 = time.perf_counter()
    rows, pres = loc.predict(windows, batch_size)
    t2 = time.perf_counter()
    tol = max(1.5, AGREEMENT_TOL_MM / spec.pixel_mm)
    d = decide_l3(
        tops, rows, spec.height_px, spec.a_px, pres, tol_px=tol, n_alternatives=n_alternatives
    )
    t3 = time.perf_counter()
    return CoarseResult(
        decision=d,
        window_top_rows=tops,
        predictions=rows.astype(np.float32),
        presence=None if pres is None else pres.astype(np.float32),
        timings_s={"windows": t1 - t0, "cnn": t2 - t1, "decision": t3 - t2},
    )


def in_field_of_view(d: Decision, mip: Mip) -> tuple[bool, str]:
    """Whether a run's decision says L3 is in the scan, and the reason when it is not.

    Parameters
    ----------
    d : a first-stage run (rows of ``mip``).
    mip : the MIP the run was decided on.

    Returns
    -------
    (bool, str)
        In the field of view when the run's mean presence probability is at least 0.5 (with
        a presence head), else when its correlation reaches :data:`FALLBACK_MIN_CORRELATION`
        and its agreement :data:`FALLBACK_MIN_AGREEMENT`; and in both cases the decided row
        lies inside the MIP. The string says why not (ignore it when True).
    """
    if d.presence is not None:
        in_fov = d.presence >= 0.5
        why = f"L3 not in field of view (presence {d.presence:.2f} < 0.50)"
    else:
        in_fov = (
            d.correlation_peak >= FALLBACK_MIN_CORRELATION and d.agreement >= FALLBACK_MIN_AGREEMENT
        )
        why = (
            f"L3 not in field of view (correlation {d.correlation_peak:.2f}, "
            f"agreement {d.agreement:.2f})"
        )
    if in_fov and not (-0.5 <= d.row <= mip.rows - 0.5):
        in_fov, why = False, f"L3 not in field of view (decided row {d.row:.1f} outside the scan)"
    return in_fov, why
