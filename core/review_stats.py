"""The readers' decisions as figures: what a hospital's post-market monitoring asks for.

One rule for the CSV (``GET /reviews.csv``) and the Prometheus figures (``/metrics``):
per model version, how many results were accepted, corrected or rejected, how far (mm along
z) each correction moved L3, and how many corrections found L3 where the locator said it was
not in the field of view (issue 17).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterable

from core.jobs import ReviewAction, ReviewRecord
from core.result import csv_safe

__all__ = [
    "DECISIONS",
    "REVIEW_CSV_HEADER",
    "correction_mm",
    "from_not_in_fov",
    "review_csv",
    "review_summary",
]

REVIEW_CSV_HEADER = (
    "time_utc",
    "series_instance_uid",
    "action",
    "user",
    "model_version",
    "slice_index",
    "z_mm",
    "previous_slice_index",
    "previous_z_mm",
    "correction_mm",
    "previous_in_field_of_view",
)


def correction_mm(review: ReviewRecord) -> float | None:
    """How far a correction moved L3 along z (mm, absolute); 0 for an accept; None for a
    reject, and when a position is unknown (a correction of "not in the field of view")."""
    if review.action == ReviewAction.ACCEPT:
        return 0.0
    if review.action != ReviewAction.CORRECT:
        return None
    if review.z_mm is None or review.previous_z_mm is None:
        return None
    return round(abs(review.z_mm - review.previous_z_mm), 2)


def from_not_in_fov(review: ReviewRecord) -> bool:
    """True when the result reviewed had no L3 (the locator said "not in the field of
    view"): the review has no previous slice."""
    return review.previous_slice_index is None


#: :class:`ReviewAction` -> the decision a reviewed series counts as (metrics label).
DECISIONS = {
    ReviewAction.ACCEPT: "accepted",
    ReviewAction.CORRECT: "corrected",
    ReviewAction.REJECT: "rejected",
}


def review_csv(reviews: Iterable[ReviewRecord]) -> str:
    """Every decision, one row each (:data:`REVIEW_CSV_HEADER`); text cells formula-safe."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(REVIEW_CSV_HEADER)
    for r in reviews:
        distance = correction_mm(r)
        writer.writerow(
            [
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.created_at)),
                r.series_uid,
                str(r.action),
                csv_safe(r.user_name),
                csv_safe(r.model_version or ""),
                "" if r.slice_index is None else r.slice_index,
                "" if r.z_mm is None else r.z_mm,
                "" if r.previous_slice_index is None else r.previous_slice_index,
                "" if r.previous_z_mm is None else r.previous_z_mm,
                "" if distance is None else distance,
                "no" if from_not_in_fov(r) else "yes",
            ]
        )
    return out.getvalue()


def review_summary(
    reviews: Iterable[ReviewRecord],
) -> dict[str, dict[str, object]]:
    """Per model version: ``accepted``, ``corrected``, ``rejected`` (reviewed series),
    ``acceptance`` (share of reviewed series whose result was accepted without a correction
    or a reject, 0-1), ``corrections_mm`` (the distance of every correction with two known
    positions) and ``corrected_from_not_in_fov`` (corrected series whose result said L3
    was not in the field of view).

    A series counts once: a correction or a reject stays (a result corrected and then
    accepted was corrected); of those, the latest counts; a series only accepted counts as
    accepted.
    """
    latest: dict[str, ReviewRecord] = {}
    distances: dict[str, list[float]] = {}
    for r in reviews:
        version = r.model_version or "unknown"
        if r.action == ReviewAction.CORRECT:
            d = correction_mm(r)
            if d is not None:
                distances.setdefault(version, []).append(d)
        kept = latest.get(r.series_uid)
        if kept is None or kept.action == ReviewAction.ACCEPT or r.action != ReviewAction.ACCEPT:
            latest[r.series_uid] = r
    out: dict[str, dict[str, object]] = {}

    def row_of(version: str) -> dict[str, object]:
        return out.setdefault(
            version,
            {"accepted": 0, "corrected": 0, "rejected": 0, "corrected_from_not_in_fov": 0},
        )

    for r in latest.values():
        row = row_of(r.model_version or "unknown")
        row[DECISIONS[r.action]] += 1  # type: ignore[operator]
        if r.action == ReviewAction.CORRECT and from_not_in_fov(r):
            row["corrected_from_not_in_fov"] += 1  # type: ignore[operator]
    for version in distances:
        row_of(version)
    for version, row in out.items():
        total = sum(int(row[d]) for d in DECISIONS.values())  # type: ignore[call-overload]
        row["acceptance"] = round(int(row["accepted"]) / total, 4) if total else None  # type: ignore[call-overload]
        row["corrections_mm"] = distances.get(version, [])
    return out
