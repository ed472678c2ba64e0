"""The L3 locator on crops of the one real abdomen CT, cut as scanners cut (issue 15).

**Evaluation data only, never training data**: the crops are made of the one real case in
``../shared/data/abdomen_ct_totalseg`` (README there), whose L3 must stay unseen by every
training, tuning and model-selection step; nothing here may feed ``l3spot train`` or a
calibration. ``l3spot evaluate-crops`` prints the table (models/locator_cnn4.md, "Issue 15
baseline").

The crops (slice indices of ``ct.nii.gz``, 3 mm slices, z ascending = superior; vertebral
extents from the TotalSegmentator labels of the data README: S1 37..51, L5 42..59, L4
55..69, L3 65..79, L2 75..91, L1 86..103, T12 97..111; the lowest ribs start at 85, the hip
bones end at 60):

- the whole scan (sacrum to T11, 333 mm);
- no lower ribs: pelvis up to the top of L2 (0..84), as an abdomen-pelvis scan started low;
- no pelvis: above the iliac crests (61..111, L4 to T11);
- lumbar-spine windows of 250, 200, 165 (S1 to T12, as in the issue), and 150 mm around
  L3, and two 150 mm windows with L3 low and high in the window;
- the whole scan and the 200 mm window resampled to 5 mm slices (slab average of the 3 mm
  slices whose centres lie within +/- 2.5 mm, as a scanner's thick reconstruction);
- wholly above L3: 82..111 (T11 to L2, the z range of the data's ``tissue_types`` crop).

The real chest series (``chest_ct_lidc``, L3 not in the field of view) is run too.

**The reference** is the middle of the L3 vertebral *body*, between its end plates, measured
from the labels (:func:`vertebral_body_mid_index`: slice 74). That is what the phantoms'
truth is (``GroundTruth.l3_mid_z_mm``, ``TruthB.l3_mid_z_mm``: the midpoint of the L3 body's
end plates) and what the L3 slice is clinically (the mid-L3 vertebral body). The data
README's "mid-L3 = z 72" is the middle of the whole L3 label's z extent, which includes the
spinous process sloping down behind L4 (slices 65-68 hold posterior elements only); each
row also reports its error against that (``label_mid_z_mm``), as every figure before
2026-12-07's seventh session was measured.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import LocatorConfig
from research.evaluate_locator import SUCCESS_MM
from worker.locator.locate import locate_l3
from worker.volume.load import CTVolume

#: middle of the whole L3 label's z extent in ``abdomen_ct_totalseg`` (data README: L3
#: label z 65..79); the reference until 2026-12-07, kept as a second figure
REAL_LABEL_MID_L3_INDEX = 72

#: TotalSegmentator label numbers (``segmentation_total_labels.json``): L3, spinal cord
REAL_L3_LABEL = 29
REAL_CORD_LABEL = 79

#: name -> (first, last) slice index (inclusive) of ``ct.nii.gz``, resampled slice mm or None
REAL_CROPS: dict[str, tuple[int, int, float | None]] = {
    "whole scan (sacrum-T11)": (0, 111, None),
    "no lower ribs (pelvis-L2)": (0, 84, None),
    "no pelvis (L4-T11)": (61, 111, None),
    "lumbar 250 mm": (30, 111, None),
    "lumbar 200 mm": (40, 106, None),
    "lumbar 165 mm (S1-T12)": (45, 99, None),
    "lumbar 150 mm": (47, 96, None),
    "lumbar 150 mm, L3 high": (35, 84, None),
    "lumbar 150 mm, L3 low": (60, 109, None),
    "whole scan, 5 mm slices": (0, 111, 5.0),
    "lumbar 200 mm, 5 mm slices": (40, 106, 5.0),
    "wholly above L3 (T11-L2)": (82, 111, None),
}


def crop_volume(volume: CTVolume, first: int, last: int) -> CTVolume:
    """Slices ``first..last`` (inclusive) of a volume, as a scanner with that range makes.

    Parameters
    ----------
    volume : the source volume ((z, y, x) HU, ``z_mm`` ascending).
    first, last : slice indices, ``0 <= first <= last < n``.

    Returns
    -------
    CTVolume
        Same geometry and identifiers; per-slice lists cut to match.

    Raises
    ------
    ValueError
        The range is empty or outside the volume.
    """
    n = volume.hu.shape[0]
    if not 0 <= first <= last < n:
        raise ValueError(f"crop {first}..{last} outside the volume's slices 0..{n - 1}")
    sl = slice(first, last + 1)

    def per_slice(items: list[Any]) -> list[Any]:
        return items[sl] if len(items) == n else items

    pos = volume.image_position_first
    return dataclasses.replace(
        volume,
        hu=volume.hu[sl].copy(),
        z_mm=volume.z_mm[sl].copy(),
        sop_instance_uids=per_slice(volume.sop_instance_uids),
        source_files=per_slice(volume.source_files),
        image_position_first=(pos[0], pos[1], pos[2] + float(volume.z_mm[first] - volume.z_mm[0])),
        warnings=list(volume.warnings),
    )


def thick_slices(volume: CTVolume, slice_mm: float) -> CTVolume:
    """Resample to thicker slices: each new slice averages the source slices whose centres
    lie within +/- ``slice_mm``/2 of it (a thick reconstruction), centres ``slice_mm`` apart
    from the first source slice.

    Parameters
    ----------
    volume : source volume (``z_mm`` ascending).
    slice_mm : new slice spacing and thickness (mm), larger than the source's.

    Returns
    -------
    CTVolume
        No per-slice identifiers (the slices are new); ``slice_thickness_mm`` = ``slice_mm``.

    Raises
    ------
    ValueError
        ``slice_mm`` not positive.
    """
    if slice_mm <= 0:
        raise ValueError("slice_mm must be positive")
    z = volume.z_mm
    centres = np.arange(z[0], z[-1] + 1e-6, slice_mm)
    slabs = []
    for c in centres:
        sel = np.abs(z - c) <= slice_mm / 2
        if not sel.any():
            sel = np.abs(z - c) == np.abs(z - c).min()
        slabs.append(volume.hu[sel].mean(axis=0))
    return dataclasses.replace(
        volume,
        hu=np.stack(slabs).astype(np.float32),
        z_mm=centres.astype(np.float64),
        sop_instance_uids=[],
        source_files=[],
        slice_thickness_mm=slice_mm,
        warnings=list(volume.warnings),
    )


def vertebral_body_mid_index(labels: np.ndarray, vertebra: int, cord: int) -> float:
    """The middle of a vertebral body between its end plates, as a (fractional) slice index
    of a label map: the L3 reference of the real case.

    The body is the vertebra's voxels in front of the spinal canal: in each slice, those in
    rows anterior to the spinal cord's most anterior row (in the nearest slice that holds
    cord). Its end plates are where the body ends along z through its centre (the (y, x)
    centroid of the body's voxels), as a vertebral body's height is measured; the middle is
    halfway between them (the phantoms' truth, ``GroundTruth.l3_mid_z_mm``).

    Parameters
    ----------
    labels : (z, y, x) integer label map in the axial layout of
        :func:`~worker.volume.load.load_nifti` (z ascending = superior, y rows anterior ->
        posterior), e.g. TotalSegmentator's ``segmentation_total.nii.gz``.
    vertebra, cord : the label numbers of the vertebra and of the spinal cord.

    Returns
    -------
    float
        (bottom slice + top slice) / 2 of the body's column through its centre.

    Raises
    ------
    ValueError
        The vertebra or the cord is not labelled, no body voxel lies in front of the cord,
        or the column through the body's centre does not cross it in one run.
    """
    v = labels == vertebra
    c = labels == cord
    zs = np.flatnonzero(v.any(axis=(1, 2)))
    cord_z = np.flatnonzero(c.any(axis=(1, 2)))
    if zs.size == 0 or cord_z.size == 0:
        raise ValueError(f"label {vertebra} or the cord's {cord} is not in the label map")
    body = np.zeros_like(v)
    for z in zs:
        k = cord_z[np.argmin(np.abs(cord_z - z))]
        front = int(np.flatnonzero(c[k].any(axis=1)).min())  # the cord's most anterior row
        body[z, :front] = v[z, :front]
    if not body.any():
        raise ValueError(f"no voxel of label {vertebra} lies in front of the spinal cord")
    _, ys, xs = np.nonzero(body)
    column = np.flatnonzero(body[:, int(round(ys.mean())), int(round(xs.mean()))])
    if column.size == 0 or column[-1] - column[0] + 1 != column.size:
        raise ValueError("the column through the body's centre does not cross it in one run")
    return 0.5 * float(column[0] + column[-1])


@dataclass
class CropResult:
    """The locator on one crop (z in mm of the source volume's frame).

    Attributes
    ----------
    crop : name.
    z_range_mm : (first, last) slice z.
    slice_mm : slice spacing.
    truth_z_mm : mid-L3 z, None when outside the crop.
    answer_z_mm : z of the answered slice, None when the locator said "not in FOV".
    in_fov : the locator's decision.
    confidence : the reported confidence (calibrated when a calibration applies).
    confidence_raw : the raw score.
    flagged : the ``low_l3_confidence`` flag would be raised.
    verification : the level verification's report (``L3Location.verification``), or None
        when it did not run (no answer, or ``locator.verify_weights`` null).
    label_mid_z_mm : the middle of the whole L3 label's z extent (the reference before
        2026-12-07, the spinous process included), None when outside the crop or unknown.
    """

    crop: str
    z_range_mm: tuple[float, float]
    slice_mm: float
    truth_z_mm: float | None
    answer_z_mm: float | None
    in_fov: bool
    confidence: float
    confidence_raw: float | None
    flagged: bool
    verification: dict[str, Any] | None = None
    label_mid_z_mm: float | None = None

    @property
    def locator_error_mm(self) -> float | None:
        """The locator's own error, before the level verification (None as ``error_mm``)."""
        v = self.verification
        if v is None or self.truth_z_mm is None:
            return self.error_mm
        if v.get("locator_z_mm") is None:  # the locator said "not in field of view"
            return None
        return abs(float(v["locator_z_mm"]) - self.truth_z_mm)

    @property
    def level_check(self) -> str:
        """The verification's verdict in a few words ("—" when none ran)."""
        v = self.verification
        if not v:
            return "—"
        parts = [str(v["status"])]
        if v.get("counted_by"):
            parts.append(f"by {v['counted_by']}")
        if v.get("lumbar_counted") is not None:
            parts.append(f"{v['lumbar_counted']} lumbar")
        if v.get("possible_transitional_anatomy"):
            parts.append("transitional?")
        return ", ".join(parts)

    @property
    def error_mm(self) -> float | None:
        if self.truth_z_mm is None or self.answer_z_mm is None:
            return None
        return abs(self.answer_z_mm - self.truth_z_mm)

    @property
    def label_mid_error_mm(self) -> float | None:
        """The answer's distance (mm) from the whole L3 label's middle (None as ``error_mm``)."""
        if self.label_mid_z_mm is None or self.answer_z_mm is None:
            return None
        return abs(self.answer_z_mm - self.label_mid_z_mm)

    @property
    def ok(self) -> bool:
        """Within 10 mm when L3 is in the crop; "not in FOV" when it is not."""
        if self.truth_z_mm is None:
            return not self.in_fov
        return self.error_mm is not None and self.error_mm <= SUCCESS_MM

    def row(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "crop": self.crop,
            "z_range_mm": [round(v, 1) for v in self.z_range_mm],
            "length_mm": round(self.z_range_mm[1] - self.z_range_mm[0] + self.slice_mm, 1),
            "slice_mm": round(self.slice_mm, 2),
            "truth_z_mm": None if self.truth_z_mm is None else round(self.truth_z_mm, 1),
            "answer_z_mm": None if self.answer_z_mm is None else round(self.answer_z_mm, 1),
            "error_mm": None if self.error_mm is None else round(self.error_mm, 1),
            "label_mid_z_mm": (
                None if self.label_mid_z_mm is None else round(self.label_mid_z_mm, 1)
            ),
            "label_mid_error_mm": (
                None if self.label_mid_error_mm is None else round(self.label_mid_error_mm, 1)
            ),
            "in_fov": self.in_fov,
            "confidence": round(self.confidence, 3),
            "confidence_raw": (
                None if self.confidence_raw is None else round(self.confidence_raw, 3)
            ),
            "flagged": self.flagged,
            "ok": self.ok,
            "locator_error_mm": (
                None if self.locator_error_mm is None else round(self.locator_error_mm, 1)
            ),
            "level_check": self.level_check,
            "verification": self.verification,
        }


def locate_crop(
    name: str,
    volume: CTVolume,
    truth_z_mm: float | None,
    config: LocatorConfig,
    device: str,
    label_mid_z_mm: float | None = None,
) -> CropResult:
    """Run the locator on one (cropped) volume; ``truth_z_mm`` None = L3 not in it
    (``label_mid_z_mm``: the second reference, :class:`CropResult`)."""
    res = locate_l3(volume, config, device=device)
    z = volume.z_mm
    inside = truth_z_mm is not None and z[0] - 1e-6 <= truth_z_mm <= z[-1] + 1e-6
    return CropResult(
        crop=name,
        z_range_mm=(float(z[0]), float(z[-1])),
        slice_mm=volume.slice_spacing_mm,
        truth_z_mm=truth_z_mm if inside else None,
        answer_z_mm=None if res.slice_index is None else float(z[res.slice_index]),
        in_fov=res.in_field_of_view,
        confidence=float(res.confidence),
        confidence_raw=res.confidence_raw,
        flagged=res.low_confidence,
        verification=res.verification,
        label_mid_z_mm=label_mid_z_mm if inside else None,
    )


def _real_file(data: Path, name: str) -> Path:
    """A file of the real case under ``data/abdomen_ct_totalseg``; FileNotFoundError if absent."""
    path = Path(data) / "abdomen_ct_totalseg" / name
    if not path.is_file():
        raise FileNotFoundError(f"real case file not found: {path}")
    return path


def real_l3_reference_z_mm(data: Path, z_mm: np.ndarray) -> float:
    """The real case's L3 reference: the middle of the L3 body between its end plates
    (:func:`vertebral_body_mid_index` on the TotalSegmentator labels), in mm along ``z_mm``
    (the slice z of ``ct.nii.gz``, ascending; the labels share its grid).

    Raises
    ------
    FileNotFoundError
        The labels are not under ``data``.
    ValueError
        As :func:`vertebral_body_mid_index`.
    """
    from worker.volume.load import load_nifti

    labels = load_nifti(_real_file(data, "segmentation_total.nii.gz"), check_hu=False)
    index = vertebral_body_mid_index(
        np.rint(labels.hu).astype(np.int16), REAL_L3_LABEL, REAL_CORD_LABEL
    )
    return float(np.interp(index, np.arange(len(z_mm)), z_mm))


def evaluate_real_crops(
    data: Path,
    config: LocatorConfig,
    device: str = "auto",
    crops: dict[str, tuple[int, int, float | None]] | None = None,
    chest: bool = True,
) -> list[CropResult]:
    """The locator on each crop of the real abdomen CT (:data:`REAL_CROPS`) and on the real
    chest series.

    Parameters
    ----------
    data : the shared data folder (``L3SPOT_DATA``).
    config : locator settings.
    device : "auto", "cpu" or "cuda".
    crops : subset of :data:`REAL_CROPS` (default: all).
    chest : also run ``chest_ct_lidc`` (L3 not in the field of view).

    Returns
    -------
    list of CropResult

    Raises
    ------
    FileNotFoundError
        The real abdomen CT or its labels are not under ``data``.
    """
    from worker.training.locator import load_volume_any

    vol = load_volume_any(_real_file(data, "ct.nii.gz"))
    truth = real_l3_reference_z_mm(data, vol.z_mm)
    label_mid = float(vol.z_mm[REAL_LABEL_MID_L3_INDEX])
    out = []
    for name, (first, last, thick) in (crops or REAL_CROPS).items():
        v = crop_volume(vol, first, last)
        if thick is not None:
            v = thick_slices(v, thick)
        out.append(locate_crop(name, v, truth, config, device, label_mid))
    chest_dir = Path(data) / "chest_ct_lidc"
    if chest and chest_dir.is_dir():
        chest_vol = load_volume_any(chest_dir)
        out.append(locate_crop("real chest series (LIDC)", chest_vol, None, config, device))
    return out


#: TotalSegmentator label numbers of ``segmentation_total.nii.gz`` (its labels JSON) whose
#: voxels :func:`real_bone_recognition` reports. TotalSegmentator labels S1 apart from the
#: rest of the sacrum ("sacrum" is S2 down and the alae); the phantom's sacrum class holds
#: both, and a count from the sacrum needs either; the hip bones are what lies beside it.
REAL_BONE_LABELS: dict[str, tuple[int, ...]] = {
    "sacrum": (25,),
    "S1": (26,),
    "L5": (27,),
    "L4": (28,),
    "L3": (29,),
    "hip bones": (77, 78),
}


def real_bone_recognition(
    data: Path, weights: Path, *, probes: bool = False
) -> dict[str, dict[str, dict[str, float]]]:
    """What the level-verification network calls the real case's bones (evaluation only).

    The box is placed as at run time (:func:`~worker.locator.vertebrae.box_at_level`)
    around the reference mid-L3 of the whole scan; each TotalSegmentator label
    (:data:`REAL_BONE_LABELS`; model output, not manual annotation; the vertebrae include
    their posterior elements, so a lumbar label's share called "vertebral_body" is about
    0.4 when the body is all found) is resampled onto the same box. The sacrum (or S1
    touching it) is what a count from the sacrum needs.

    With ``probes`` the network also reads edited copies of the real box, each asking what
    keeps it from the sacrum (a diagnostic, never a tuning target):

    - ``"hip bones as muscle"``: the hip bones and femurs (dilated by 2 voxels, for their
      partial volume; never over the sacrum or S1) set to 50 HU;
    - ``"sacral marrow as L5's"``: the sacrum's and S1's voxels raised by the difference of
      L5's and the sacrum's median HU;
    - ``"both"``.

    Parameters
    ----------
    data : the shared data folder (``L3SPOT_DATA``).
    weights : level-verification weights (:func:`~worker.locator.vertebrae.load_spine_model`).
    probes : also read the edited boxes.

    Returns
    -------
    box name ("real", then each probe) -> label name -> {"cm3": its volume inside the box,
    "median_hu" (in the box as the network reads it), and per class of
    :data:`~worker.locator.vertebrae.CLASSES` the share of its voxels given that class}.

    Raises
    ------
    FileNotFoundError
        The real case or its labels are not under ``data``.
    """
    from scipy import ndimage

    from worker.locator.vertebrae import (
        CLASSES,
        box_at_level,
        extract_box,
        load_spine_model,
        segment_box,
    )
    from worker.volume.load import load_nifti

    vol = load_nifti(_real_file(data, "ct.nii.gz"))
    labels = load_nifti(_real_file(data, "segmentation_total.nii.gz"), check_hu=False)
    z = float(vol.z_mm[REAL_LABEL_MID_L3_INDEX])
    box = box_at_level(vol.hu, vol.z_mm, vol.pixel_spacing_mm, z)
    label_ids = np.rint(labels.hu)

    def in_box(values: tuple[int, ...]) -> np.ndarray:
        # the label as a two-level image: trilinear resampling, then the half-way threshold
        image = np.where(np.isin(label_ids, values), 1000.0, -1000.0).astype(np.float32)
        return (
            extract_box(
                image, labels.z_mm, labels.pixel_spacing_mm, box.z_centre_mm, box.centre_yx_mm
            ).image
            > 0
        )

    masks = {name: in_box(values) for name, values in REAL_BONE_LABELS.items()}
    net = load_spine_model(weights)

    def read(image: np.ndarray) -> dict[str, dict[str, float]]:
        classes = segment_box(net, dataclasses.replace(box, image=image))
        rows: dict[str, dict[str, float]] = {}
        for name, mask in masks.items():
            n = int(mask.sum())
            row = {
                "cm3": round(n / 1000.0, 1),
                "median_hu": round(float(np.median(image[mask])), 1) if n else float("nan"),
            }
            for i, cls in enumerate(CLASSES):
                row[cls] = round(float((classes[mask] == i).mean()), 3) if n else float("nan")
            rows[name] = row
        return rows

    out = {"real": read(box.image)}
    if probes:
        sacrum = masks["sacrum"] | masks["S1"]
        hips = ndimage.binary_dilation(
            masks["hip bones"] | in_box((75, 76)), iterations=2
        ) & ~ndimage.binary_dilation(sacrum)
        no_hips = np.where(hips, np.float32(50.0), box.image)
        lift = np.float32(np.median(box.image[masks["L5"]]) - np.median(box.image[masks["sacrum"]]))
        out["hip bones as muscle"] = read(no_hips)
        out["sacral marrow as L5's"] = read(np.where(sacrum, box.image + lift, box.image))
        out["both"] = read(np.where(sacrum, no_hips + lift, no_hips))
    return out


def format_table(rows: list[CropResult]) -> str:
    """A Markdown table: crop, z range, truth, answer, error (and against the whole L3
    label's middle), in-FOV, confidence, flag."""
    lines = [
        "| crop | z range (mm), length | truth mid-L3 body z | answer z | error mm (vs the "
        "whole label's middle) | in FOV "
        "(said) | confidence (raw) | flagged | level check (locator's error) | ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r.row()
        truth = "not in crop" if d["truth_z_mm"] is None else f"{d['truth_z_mm']}"
        ans = "—" if d["answer_z_mm"] is None else f"{d['answer_z_mm']}"
        err = "—" if d["error_mm"] is None else f"{d['error_mm']}"
        if d["label_mid_error_mm"] is not None:
            err += f" ({d['label_mid_error_mm']})"
        raw = "" if d["confidence_raw"] is None else f" ({d['confidence_raw']})"
        moved = d["verification"] is not None and d["locator_error_mm"] != d["error_mm"]
        before = ""
        if moved:
            said = d["locator_error_mm"]
            before = " (locator: not in FOV)" if said is None else f" (locator {said} mm)"
        lines.append(
            f"| {d['crop']} | {d['z_range_mm'][0]}..{d['z_range_mm'][1]}, "
            f"{d['length_mm']} mm at {d['slice_mm']} mm | {truth} | {ans} | {err} | "
            f"{'yes' if d['in_fov'] else 'no'} | {d['confidence']}{raw} | "
            f"{'yes' if d['flagged'] else 'no'} | {d['level_check']}{before} | "
            f"{'yes' if d['ok'] else '**no**'} |"
        )
    n_ok = sum(r.ok for r in rows)
    lines.append(f"\n{n_ok}/{len(rows)} as they should be (within 10 mm, or not in FOV).")
    return "\n".join(lines)
