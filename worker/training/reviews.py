"""Training examples from the readers' reviews (issue 17, "Learn from the corrections").

The whole annotation of a scan for the locator is one number, the L3 slice (Belharbi et al.
2017, section 3.2). Every analysis keeps what training needs beside its results: the frontal
MIPs at the pixel sizes of the locator models that produced it (``locator_mips.npz``,
:func:`write_locator_mips`), not the CT; a reader's decision on the job page then labels it:

* **accept**: L3 is the slice the result measured (or, for a result "L3 not in the field
  of view", L3 is indeed not in the series);
* **correct**: L3 is the slice the reader chose;
* **reject**: L3 is not in this series (the locator's L3 was wrong and no slice is L3).

:func:`review_examples` turns the latest decision of every reviewed series into a
:class:`ReviewExample`. The file has no patient identifiers (pixels of a projection, z
positions, the keyed patient hash used to split patients); it lives in the series' results
folder and is deleted with it by retention (``retention.results_max_age_days``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.atomic import write_npz_atomically
from core.layout import LOCATOR_MIPS_FILE, series_results_dir
from core.logs import log_event
from worker.mip import Mip
from worker.training.locator import MipCase

log = logging.getLogger("l3spot.training")

#: Format tag of ``locator_mips.npz``.
MIPS_FORMAT = "l3spot-locator-mips-1"


def write_locator_mips(
    out_dir: Path,
    mips: Sequence[Mip],
    group: str,
    *,
    filename: str = LOCATOR_MIPS_FILE,
    truth_l3_z_mm: float | None = None,
) -> Path:
    """Keep the frontal MIPs of an analysis for training (``<out_dir>/locator_mips.npz``).

    Parameters
    ----------
    out_dir : the series' results folder.
    mips : the MIPs at each locator model's pixel size (first stage first); each image
        (rows, cols) HU, row 0 most superior; they share ``slice_z_mm``.
    group : what keeps one patient's scans on one side of a train/held-out split: the keyed
        patient hash (:func:`core.followup.patient_key`), else the Study Instance UID.
    filename : the file's name in ``out_dir``.
    truth_l3_z_mm : a phantom's true mid-L3 z (mm) for a cached benchmark case (NaN stored
        when None); never set for a site's scan.

    Returns
    -------
    Path
        The file, written atomically (HU rounded to int16, compressed).
    """
    if not mips:
        raise ValueError("no MIP to keep")
    arrays: dict[str, np.ndarray] = {
        "format": np.array(MIPS_FORMAT),
        "group": np.array(group),
        "pixel_mm": np.array([m.pixel_mm for m in mips], np.float64),
        "z_top_mm": np.array([m.z_top_mm for m in mips], np.float64),
        "slice_z_mm": np.asarray(mips[0].slice_z_mm, np.float64),
        "truth_l3_z_mm": np.array(np.nan if truth_l3_z_mm is None else truth_l3_z_mm),
    }
    for i, m in enumerate(mips):
        arrays[f"image_{i}"] = np.clip(np.round(m.image), -32768, 32767).astype(np.int16)
    path = Path(out_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_npz_atomically(path, arrays)


def read_locator_mips(path: Path) -> tuple[list[Mip], str]:
    """The MIPs and the group written by :func:`write_locator_mips`.

    Raises
    ------
    ValueError
        Not such a file (another format, or unreadable).
    """
    try:
        with np.load(path) as z:
            if str(z["format"]) != MIPS_FORMAT:
                raise ValueError(f"{path}: not a {MIPS_FORMAT} file")
            slice_z = z["slice_z_mm"].astype(np.float64)
            mips = [
                Mip(
                    image=z[f"image_{i}"].astype(np.float32),
                    pixel_mm=float(px),
                    z_top_mm=float(z["z_top_mm"][i]),
                    slice_z_mm=slice_z,
                )
                for i, px in enumerate(z["pixel_mm"])
            ]
            return mips, str(z["group"])
    except (OSError, KeyError, EOFError) as exc:
        raise ValueError(f"{path}: unreadable locator MIPs ({exc})") from exc


@dataclass
class ReviewExample:
    """A reviewed scan as the locator sees it.

    Attributes
    ----------
    series_uid : Series Instance UID of the scan.
    group : patient key (train/held-out splits never separate one patient's scans).
    mips : the MIPs at each stored pixel size (:func:`read_locator_mips`).
    l3_z_mm : z (mm) of the L3 slice the reader accepted or chose; None = L3 not in the
        series (a rejection).
    action : the decision that labelled it ("accept", "correct", "reject").
    model_version : the locator version of the result the reader reviewed.
    """

    series_uid: str
    group: str
    mips: list[Mip]
    l3_z_mm: float | None
    action: str
    model_version: str

    def mip_at(self, pixel_mm: float) -> Mip:
        """The stored MIP of that pixel size (mm).

        Raises
        ------
        KeyError
            None was stored at that size (the example came from other models).
        """
        for m in self.mips:
            if abs(m.pixel_mm - pixel_mm) < 1e-6:
                return m
        raise KeyError(f"{self.series_uid}: no MIP at {pixel_mm:g} mm")

    def case(self, pixel_mm: float) -> MipCase:
        """The example as a training case at that pixel size (l3_row None = no L3)."""
        m = self.mip_at(pixel_mm)
        row = None if self.l3_z_mm is None else float(m.z_to_row(self.l3_z_mm))
        sz = m.slice_z_mm
        slice_mm = float(np.median(np.diff(sz))) if len(sz) > 1 else 1.0
        return MipCase(f"review-{self.series_uid}", self.group, m.image, m.pixel_mm, row, slice_mm)


def review_examples(
    reviews: Iterable, results_root: Path
) -> tuple[list[ReviewExample], dict[str, int]]:
    """The latest decision of every reviewed series, as training examples.

    Parameters
    ----------
    reviews : :class:`core.jobs.ReviewRecord` rows (``JobStore.reviews()``), any order.
    results_root : the results folder (``node.resolved_results_dir()``).

    Returns
    -------
    (examples, skipped)
        One example per series with a usable decision, in series UID order; ``skipped``
        counts the series left out by reason (``no_mips``: the results folder or its
        ``locator_mips.npz`` is gone, e.g. deleted by retention, or the result predates
        it; ``unreadable``; ``no_slice``: an accept or correct without a z position).
    """
    latest: dict[str, object] = {}
    for r in sorted(reviews, key=lambda r: (r.created_at, r.id)):
        latest[r.series_uid] = r
    examples: list[ReviewExample] = []
    skipped: dict[str, int] = {}
    for uid in sorted(latest):
        r = latest[uid]
        action = str(r.action)
        path = series_results_dir(results_root, uid) / LOCATOR_MIPS_FILE
        if not path.is_file():
            skipped["no_mips"] = skipped.get("no_mips", 0) + 1
            continue
        try:
            mips, group = read_locator_mips(path)
        except ValueError as exc:
            skipped["unreadable"] = skipped.get("unreadable", 0) + 1
            log_event(
                log,
                "review_example_unreadable",
                logging.WARNING,
                series_instance_uid=uid,
                reason=str(exc),
            )
            continue
        # accept of a "not in the field of view" result, or reject: L3 is not in the series
        z = None if action == "reject" else r.z_mm
        if action == "correct" and (z is None or not math.isfinite(z)):
            skipped["no_slice"] = skipped.get("no_slice", 0) + 1
            continue
        examples.append(ReviewExample(uid, group, mips, z, action, str(r.model_version or "")))
    return examples, skipped


def is_held_out(group: str, fraction: float) -> bool:
    """Whether a patient group is held out of training, stably across runs.

    A group is held out when the first 8 bytes of SHA-256(``"l3spot-holdout:" + group``),
    read as a fraction of 2^64, fall below ``fraction``: the same patients are held out by
    every run with the same fraction, so no later training sees a scan an earlier
    evaluation reported on.
    """
    h = hashlib.sha256(f"l3spot-holdout:{group}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < fraction


def split_examples(
    examples: Sequence[ReviewExample], fraction: float
) -> tuple[list[ReviewExample], list[ReviewExample]]:
    """(training, held-out) by :func:`is_held_out` of each example's patient group."""
    train = [e for e in examples if not is_held_out(e.group, fraction)]
    held = [e for e in examples if is_held_out(e.group, fraction)]
    return train, held
