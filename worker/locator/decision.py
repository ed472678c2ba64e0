"""The L3 decision: correlation of the window predictions with the ideal slope -1 line.

Belharbi et al. 2017, section 3.3 and Fig. 6: where a sliding window holds L3 within +/- a
of its centre, the predicted L3 row inside the window falls by one row per row the window
moves down. Both locator stages (:mod:`worker.locator.coarse`, :mod:`worker.locator.fine`)
decide with :func:`decide_l3`. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Decision:
    """One run of consecutive windows chosen by :func:`decide_l3` (rows are MIP rows).

    Attributes
    ----------
    row : decided mid-L3 row (median of the run's votes ``top + prediction``).
    correlation_peak : Pearson correlation of the run's predictions with the ideal line.
    agreement : share of the run's votes within the tolerance of ``row``.
    presence : mean presence probability of the run, None without a presence head.
    confidence : ``max(corr, 0)**2 * agreement * presence``, in [0, 1].
    correlation : (n_candidates,) float32 correlation of every run (for plots).
    candidate_rows : (n_candidates,) float, centre row of every run.
    segment : (first, last + 1) window indices of the chosen run.
    """

    row: float
    correlation_peak: float
    agreement: float
    presence: float | None
    confidence: float
    correlation: np.ndarray
    candidate_rows: np.ndarray
    segment: tuple[int, int]
    #: the next-best runs at other places (each more than 2a from every better one), best
    #: first; filled when ``decide_l3(..., n_alternatives=k)`` asks for them
    alternatives: list[Decision] = field(default_factory=list)
    #: the run's selection score ``confidence * presence**(power - 1)``
    selection_score: float = 0.0


def decide_l3(
    top_rows: np.ndarray,
    predictions: np.ndarray,
    height_px: int,
    a_px: float,
    presence: np.ndarray | None = None,
    tol_px: float = 2.0,
    presence_power: float = 4.0,
    n_alternatives: int = 0,
) -> Decision:
    """Correlate the prediction sequence with the ideal slope -1 line (paper Fig. 6).

    Parameters
    ----------
    top_rows : (n,) MIP rows of the windows' top edges, ascending with a constant stride.
    predictions : (n,) predicted L3 row inside each window (counted from its top).
    height_px : window height H (rows).
    a_px : half-range of L3 offsets around the window centre seen in training (rows).
    presence : (n,) optional probability that L3 lies within +/- a of each window centre.
    tol_px : votes within this many rows of the decision count as agreeing.
    presence_power : the segment is chosen by ``confidence * presence**(power - 1)``: a
        strong preference for segments the presence head is sure of (4 was chosen on the
        validation phantoms of the shipped model: mean error 9.9 -> 5.2 mm, the median
        unchanged; the real cases were not used).
    n_alternatives : also return up to this many next-best runs at other places (more than
        2a from every better run), for a second opinion (:func:`worker.locator.fine.choose_run`).

    Returns
    -------
    Decision
        ``row`` = median of the votes ``top + prediction`` of the best segment.

    Notes
    -----
    Where a window holds L3 within +/- a of its centre the prediction falls by one row per
    row the window moves down: a line of slope -1. A segment of ``L = floor(2a/s) + 1``
    consecutive windows spans exactly those windows for one L3 row; for each segment we
    take the Pearson correlation between the predictions and the ideal line (``-top``),
    as Belharbi et al. 2017 (section 3.3, Fig. 6). l3spot picks the segment maximising
    ``max(corr, 0)**2 * agreement * presence`` (agreement = share of the segment's votes
    within ``tol_px`` of their median; presence = mean presence probability, 1 without the
    head) and reports that product as the confidence.
    """
    top_rows = np.asarray(top_rows, np.float64)
    p = np.asarray(predictions, np.float64)
    n = len(p)
    if n == 0 or len(top_rows) != n:
        raise ValueError("need as many predictions as windows (and at least one)")
    stride = float(top_rows[1] - top_rows[0]) if n > 1 else 1.0
    seg = int(np.floor(2 * a_px / stride)) + 1
    seg = max(2, min(seg, n))
    view = np.lib.stride_tricks.sliding_window_view
    ps, ts = view(p, seg), view(top_rows, seg)  # (m, seg)
    ideal = -ts
    pc = ps - ps.mean(axis=1, keepdims=True)
    ic = ideal - ideal.mean(axis=1, keepdims=True)
    denom = np.sqrt((pc**2).sum(axis=1) * (ic**2).sum(axis=1))
    corr = np.where(denom > 1e-9, (pc * ic).sum(axis=1) / np.maximum(denom, 1e-12), 0.0)
    votes = ts + ps
    med = np.median(votes, axis=1)
    agree = (np.abs(votes - med[:, None]) <= tol_px).mean(axis=1)
    if presence is not None and len(presence) == n:
        pres = view(np.asarray(presence, np.float64), seg).mean(axis=1)
    else:
        pres = np.ones_like(corr)
    score = np.maximum(corr, 0.0) ** 2 * agree * pres
    selection = score * pres ** (presence_power - 1.0)
    candidate_rows = ts.mean(axis=1) + height_px / 2.0
    has_presence = presence is not None and len(presence) == n
    correlation = corr.astype(np.float32)

    def run(j: int) -> Decision:
        return Decision(
            row=float(med[j]),
            correlation_peak=float(corr[j]),
            agreement=float(agree[j]),
            presence=float(pres[j]) if has_presence else None,
            confidence=float(np.clip(score[j], 0.0, 1.0)),
            correlation=correlation,
            candidate_rows=candidate_rows,
            segment=(j, j + seg),
            selection_score=float(selection[j]),
        )

    order = np.argsort(-selection, kind="stable")
    best = run(int(order[0]))
    taken = [best.row]
    for j in order[1:]:
        if len(best.alternatives) >= n_alternatives or selection[j] <= 0:
            break
        if all(abs(med[j] - r) > 2 * a_px for r in taken):
            best.alternatives.append(run(int(j)))
            taken.append(float(med[j]))
    return best
