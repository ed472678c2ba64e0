"""The readers' decisions as figures: what a hospital's post-market monitoring asks for.

One rule for the CSV (``GET /reviews.csv``) and the Prometheus figures (``/metrics``):
per model version, how many results were accepted and how many corrected, and how far
(mm along z) each correction moved L3 (issue 17).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterable

from core.jobs import ReviewAction, ReviewRecord
from core.result import csv_safe

__all__ = ["REVIEW_CSV_HEADER", "correction_mm", "review_csv", "review_summary"]

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
)


def correction_mm(review: ReviewRecord) -> float | None:
    """How far a correction moved L3 along z (mm, absolute); 0 for an accept; None when a
    position is unknown."""
    if review.action == ReviewAction.ACCEPT:
        return 0.0
    if review.z_mm is None or review.previous_z_mm is None:
        return None
    return round(abs(review.z_mm - review.previous_z_mm), 2)


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
            ]
        )
    return out.getvalue()


def review_summary(
    reviews: Iterable[ReviewRecord],
) -> dict[str, dict[str, object]]:
    """Per model version: ``accepted``, ``corrected``, ``acceptance`` (share of reviewed
    series whose result was accepted without a correction, 0-1) and ``corrections_mm`` (the
    distance of every correction).

    A series counts once: as corrected when a reader corrected it at least once (a result
    corrected and then accepted was corrected), else as accepted.
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
        if kept is None or kept.action != ReviewAction.CORRECT:  # a correction stays
            latest[r.series_uid] = r
    out: dict[str, dict[str, object]] = {}
    for r in latest.values():
        version = r.model_version or "unknown"
        row = out.setdefault(version, {"accepted": 0, "corrected": 0})
        row["corrected" if r.action == ReviewAction.CORRECT else "accepted"] += 1  # type: ignore[operator]
    for version, row in out.items():
        total = int(row["accepted"]) + int(row["corrected"])  # type: ignore[call-overload]
        row["acceptance"] = round(int(row["accepted"]) / total, 4) if total else None  # type: ignore[call-overload]
        row["corrections_mm"] = distances.get(version, [])
    for version, ds in distances.items():
        out.setdefault(version, {"accepted": 0, "corrected": 0, "acceptance": None})
        out[version]["corrections_mm"] = ds
    return out
