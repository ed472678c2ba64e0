"""Second, finer stage of the L3 locator: the same method on a 1 mm MIP around the first answer.

The first stage (:mod:`worker.locator.coarse`) slides a CNN over the whole frontal MIP at
3 mm pixels and decides L3 with the paper's slope -1 correlation (Belharbi et al. 2017,
section 3.3, Fig. 6). Its misses are windows that agree with each other but are all shifted by a few
pixels: precision, not counting (``models/locator_cnn4.md``). This stage repeats the method
at a finer pixel, only around the first answer:

1. frontal MIP at the fine model's pixel size (1 mm), fixed-width strip around the body;
2. windows of height H whose centres cover the first answer +/- 2a at a small stride;
3. the fine CNN predicts the L3 row inside each window (trained only on windows that hold
   L3 within +/- a of their centre, the paper's training protocol);
4. the same correlation decision (:func:`worker.locator.decision.decide_l3`) on that short sequence:
   the run of windows whose predictions fall on a slope -1 line gives the refined row.

With a = 18 mm, under half the distance between two lumbar vertebral centres (35-40 mm),
the only L3-like target within +/- a of a window centre is the vertebral body nearest to it,
so the fine CNN learns "where is the centre of this body", a local task a 21-pixel receptive
field can do; which vertebra is L3 stays the first stage's decision. The candidate runs are
centred within +/- a of the first answer, so the refinement moves it by at most about a; a
first answer more than half a level off (about 18 mm) is moved onto the neighbouring body
(see ``models/locator_fine_cnn4.md`` for how often that happens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from worker.locator.decision import Decision, decide_l3
from worker.locator.weights import LoadedLocator, LocatorWeightsError
from worker.locator.windows import mip_to_strip
from worker.mip import Mip

#: The refined row replaces the first answer only when the chosen run of fine windows
#: correlates with the ideal slope -1 line at least this well (the paper's decision signal);
#: otherwise the first stage's answer is kept and the refinement reported as not applied.
MIN_REFINE_CORRELATION = 0.5

#: The refinement stage's record says ``"stage": "fine"`` (set by ``l3spot train --stage fine``).
FINE_STAGE = "fine"


@dataclass
class Refinement:
    """Result of :func:`refine_in_mip`.

    Attributes
    ----------
    applied : True when the refined row replaced the first answer.
    z_mm : refined mid-L3 z (mm) when applied, else the first answer's z.
    start_z_mm : the first stage's z (mm).
    correlation : Pearson correlation of the chosen run with the ideal slope -1 line.
    agreement : share of the run's votes within the agreement tolerance of the decision.
    shift_mm : ``z_mm - start_z_mm``.
    n_windows : fine windows evaluated.
    reason : why the refinement was not applied, else None.
    """

    applied: bool
    z_mm: float
    start_z_mm: float
    correlation: float
    agreement: float
    shift_mm: float
    n_windows: int
    reason: str | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "applied": self.applied,
            "start_z_mm": round(self.start_z_mm, 2),
            "shift_mm": round(self.shift_mm, 2),
            "correlation": round(self.correlation, 4),
            "agreement": round(self.agreement, 4),
            "n_windows": self.n_windows,
            "reason": self.reason,
        }


def check_fine_locator(loc: LoadedLocator) -> None:
    """Raise :class:`LocatorWeightsError` unless ``loc`` was trained as a refinement stage.

    A first-stage model has a presence head and a different window geometry; using it here
    would silently give wrong rows.
    """
    if loc.record.get("stage") != FINE_STAGE:
        raise LocatorWeightsError(
            f"{loc.path} is not a refinement-stage locator (its record says stage "
            f"{loc.record.get('stage', 'coarse')!r}; train one with 'l3spot train --stage fine')"
        )


def refine_windows(
    strip: np.ndarray, centre_row: float, height_px: int, a_px: float, stride_px: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Windows whose centres cover ``centre_row +/- 2a`` of a fine strip.

    Parameters
    ----------
    strip : (rows, W) normalised fine strip (:func:`worker.locator.windows.mip_to_strip`).
    centre_row : first answer, fractional row of ``strip``.
    height_px : window height H (rows).
    a_px : half-range of L3 offsets the fine model was trained on (rows).
    stride_px : step between window centres (rows).

    Returns
    -------
    windows : (n, H, W) float32 tensor (air = 0 outside the strip).
    top_rows : (n,) int64 strip row of each window's top edge, ascending, constant stride.
    """
    if stride_px < 1:
        raise ValueError(f"stride must be >= 1, got {stride_px}")
    reach = int(np.ceil(2 * a_px / stride_px)) * stride_px
    centres = int(round(centre_row)) + np.arange(-reach, reach + 1, stride_px)
    tops = centres - height_px // 2
    rows, w = strip.shape
    lo = int(min(tops.min(), 0))
    hi = int(max(tops.max() + height_px, rows))
    padded = np.zeros((hi - lo, w), np.float32)
    padded[-lo : -lo + rows] = strip
    first = int(tops[0] - lo)
    block = torch.from_numpy(padded[first : int(tops[-1] - lo) + height_px])
    windows = block.unfold(0, height_px, stride_px).permute(0, 2, 1)  # (n, H, W) view
    return windows, tops.astype(np.int64)


def refine_in_mip(
    mip: Mip,
    start_z_mm: float,
    fine: LoadedLocator,
    stride_px: int = 2,
    batch_size: int = 64,
    min_correlation: float = MIN_REFINE_CORRELATION,
    strip: np.ndarray | None = None,
) -> Refinement:
    """Refine a first-stage L3 z on a frontal MIP at the fine model's pixel size.

    Parameters
    ----------
    mip : frontal MIP (rows, cols) in HU at ``fine.spec.pixel_mm`` (row 0 = most superior).
    start_z_mm : the first stage's mid-L3 z (mm).
    fine : a refinement-stage locator (:func:`check_fine_locator`).
    stride_px : step between fine window centres (MIP rows).
    batch_size : windows per forward pass.
    min_correlation : below this correlation peak the first answer is kept.
    strip : ``mip_to_strip(mip.image, fine.spec)`` when the caller already has it (several
        starts on one MIP, :func:`choose_run`).

    Returns
    -------
    Refinement
        ``z_mm`` is the refined z when ``applied``, else ``start_z_mm``.

    Raises
    ------
    ValueError
        The MIP's pixel size differs from the fine model's.
    LocatorWeightsError
        ``fine`` is not a refinement-stage model.
    """
    check_fine_locator(fine)
    spec = fine.spec
    if abs(mip.pixel_mm - spec.pixel_mm) > 1e-6:
        raise ValueError(f"MIP pixel {mip.pixel_mm} mm != fine model pixel {spec.pixel_mm} mm")
    start_row = float(mip.z_to_row(start_z_mm))
    if strip is None:
        strip = mip_to_strip(mip.image, spec)
    windows, tops = refine_windows(strip, start_row, spec.height_px, spec.a_px, stride_px)
    rows, _ = fine.predict(windows, batch_size)
    d = decide_l3(tops, rows, spec.height_px, spec.a_px, None, tol_px=max(1.5, 3.0 / spec.pixel_mm))
    common = {
        "start_z_mm": float(start_z_mm),
        "correlation": d.correlation_peak,
        "agreement": d.agreement,
        "n_windows": int(len(tops)),
    }
    if d.correlation_peak < min_correlation:
        return Refinement(
            False,
            float(start_z_mm),
            shift_mm=0.0,
            reason=f"fine windows do not agree (correlation {d.correlation_peak:.2f})",
            **common,
        )
    z = float(mip.row_to_z(d.row))
    return Refinement(True, z, shift_mm=z - float(start_z_mm), **common)


def choose_run(
    candidates: Sequence[Decision],
    mip: Mip,
    fine_mip: Mip,
    fine: LoadedLocator,
    stride_px: int = 2,
    batch_size: int = 64,
) -> tuple[Decision, Refinement]:
    """Refine each first-stage candidate and keep the one both stages agree on best.

    Parameters
    ----------
    candidates : first-stage runs in the field of view (:func:`worker.locator.decision.decide_l3`'s
        best run first, then its ``alternatives``), rows in ``mip``.
    mip : the first stage's MIP (maps candidate rows to z).
    fine_mip, fine : the fine MIP and refinement-stage locator (:func:`refine_in_mip`).
    stride_px, batch_size : as :func:`refine_in_mip`.

    Returns
    -------
    (Decision, Refinement)
        The chosen candidate and its refinement. The choice maximises the first stage's
        selection score x (fine correlation, floored at 0)^2: the fine windows line up on a
        slope -1 line only around a lumbar body like the ones they were trained on, so a
        first-stage run that scored well on a cervical or thoracic level (a whole-body scan)
        loses to a slightly weaker run on L3. With one candidate this is
        :func:`refine_in_mip` of it.

    Raises
    ------
    ValueError
        No candidates.
    """
    if not candidates:
        raise ValueError("no first-stage candidate to refine")
    best: tuple[float, Decision, Refinement] | None = None
    strip = mip_to_strip(fine_mip.image, fine.spec)  # once for all candidates
    for c in candidates:
        z = float(mip.row_to_z(c.row))
        ref = refine_in_mip(fine_mip, z, fine, stride_px, batch_size, strip=strip)
        value = c.selection_score * max(ref.correlation, 0.0) ** 2
        if best is None or value > best[0]:
            best = (value, c, ref)
    assert best is not None
    return best[1], best[2]
