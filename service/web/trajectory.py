"""The patient's trajectory on the job page: SMA and SMI over time (issue 17), inline SVG.

The patient is known only by the keyed hash of the Patient ID (:mod:`core.followup`); the
page shows days since the first measured study, and the study dates only when
``web.show_patient_identifiers`` is on. No JavaScript, no build.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from html import escape

from core.followup import MeasurementRow

__all__ = ["Trajectory", "trajectory"]

WIDTH, HEIGHT, PAD = 360, 120, 34


@dataclass
class Trajectory:
    """What ``_trajectory.html`` shows: the SVG per quantity, the rows, which one is this."""

    charts: list[tuple[str, str]]  # (title, svg)
    rows: list[MeasurementRow]
    current: str  # Series Instance UID of this job


def _days(rows: list[MeasurementRow]) -> list[int]:
    first = date.fromisoformat(rows[0].study_date)
    return [(date.fromisoformat(r.study_date) - first).days for r in rows]


def _chart(xs: list[int], ys: list[float], unit: str, current: int, labels: list[str]) -> str:
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or max(abs(hi), 1.0) * 0.1
    lo, hi = lo - span * 0.15, hi + span * 0.15
    xmax = max(xs) or 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (
            PAD + (WIDTH - 2 * PAD) * x / xmax,
            HEIGHT - PAD / 2 - (HEIGHT - PAD) * (y - lo) / (hi - lo),
        )

    points = [px(x, y) for x, y in zip(xs, ys, strict=True)]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dots = "".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{5 if i == current else 3}" '
        f'class="{"current" if i == current else "point"}"><title>{escape(labels[i])}: '
        f"{ys[i]:.1f} {escape(unit)}</title></circle>"
        for i, (x, y) in enumerate(points)
    )
    texts = "".join(
        f'<text x="{x:.1f}" y="{y - 8:.1f}" text-anchor="middle" class="value">{ys[i]:.1f}</text>'
        f'<text x="{x:.1f}" y="{HEIGHT - 2}" text-anchor="middle" class="axis">'
        f"{escape(labels[i])}</text>"
        for i, (x, y) in enumerate(points)
    )
    return (
        f'<svg class="trajectory" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
        f'height="{HEIGHT}" role="img"><polyline points="{path}" fill="none" '
        f'stroke="currentColor" stroke-width="1.5"/>{dots}{texts}</svg>'
    )


def trajectory(
    rows: list[MeasurementRow], current_series: str, show_dates: bool
) -> Trajectory | None:
    """The trajectory of a patient's measurements, or None with fewer than two studies.

    Parameters
    ----------
    rows : the patient's measurements, oldest study first (``JobStore.patient_measurements``).
    current_series : the job's Series Instance UID (its point is drawn larger).
    show_dates : label points with study dates (``web.show_patient_identifiers``), else
        with days since the first study.
    """
    if len(rows) < 2:
        return None
    xs = _days(rows)
    labels = [r.study_date for r in rows] if show_dates else [f"day {d}" for d in xs]
    current = next((i for i, r in enumerate(rows) if r.series_uid == current_series), -1)
    charts = [("SMA (cm²)", _chart(xs, [r.sma_cm2 for r in rows], "cm²", current, labels))]
    smi = [(x, r.smi_cm2_m2, lab) for x, r, lab in zip(xs, rows, labels, strict=True)]
    with_smi = [(x, v, lab) for x, v, lab in smi if v is not None]
    if len(with_smi) >= 2:
        idx = [i for i, (_, v, _) in enumerate(smi) if v is not None]
        charts.append(
            (
                "SMI (cm²/m²)",
                _chart(
                    [x for x, _, _ in with_smi],
                    [float(v) for _, v, _ in with_smi],  # type: ignore[arg-type]
                    "cm²/m²",
                    idx.index(current) if current in idx else -1,
                    [lab for _, _, lab in with_smi],
                ),
            )
        )
    return Trajectory(charts, rows, current_series)
