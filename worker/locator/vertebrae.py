"""Level verification: count the vertebrae around the located L3 in 3-D.

The first-stage locator reads a frontal MIP; its typical error is a whole vertebra (it
learned where L3 usually is, not which vertebra it is). This module checks its answer the way
a radiologist does, by counting vertebral bodies (ANATOMY.md):

* **from the ribs down**: L1 is the first vertebra without ribs; L3 is the third body below
  the last rib-bearing one (the convention l3spot reports, as radiologists do);
* **from the sacrum up**: L3 is the third body above the sacrum when there are five lumbar
  vertebrae.

The two counts disagree exactly when the number of non-rib-bearing vertebrae above the sacrum
is not five (sacralisation, lumbarisation, 11 or 13 rib pairs): ``possible_transitional_anatomy``.

Steps (one series):

1. :func:`column_centre` finds the vertebral column (a robust estimate from the bone pixels
   near the located slice) and :func:`extract_box` resamples a box of
   :data:`BOX_SHAPE` 1 mm isotropic voxels around it (trilinear, Mita et al. section 3.1),
   304 mm along z centred on the located L3, moved into the scan where an end of the
   scan cuts it (:func:`box_centre_z`);
2. :class:`SpineFCN`, a 3-D fully convolutional encoder-decoder after Mita et al.
   ("Automatic detection and evaluation of spine from CT images using deep learning",
   section 2.2: 5x5x5 convolutions, PReLU, stride-2 2x2x2 convolutions to down-sample,
   residual levels, skip connections, global-convolution decoder, softmax), labels each
   voxel :data:`CLASSES`; where the segmented column lies more than :data:`RECENTRE_MM`
   to the side of the box's axis (the estimate took a bone or an organ beside the spine),
   the box is moved sideways onto it and segmented again (:func:`segment_on_column`);
3. :func:`count_levels` splits the vertebral-body voxels into bodies (connected
   components; discs separate them), keeps those of the column (:func:`_column`), marks
   the rib-bearing ones and the top of the sacrum;
4. :func:`verify_level` compares the locator's z with the counted L3 and confirms, corrects
   or flags it (:class:`LevelVerification`).

Coordinates: the box lives in the volume's canonical grid in mm: ``z`` = the volume's
``z_mm``, ``y`` = row x row spacing (anterior -> posterior), ``x`` = column x column spacing
(patient right -> left).
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import ndimage
from scipy.sparse.csgraph import connected_components as sparse_components
from torch import nn

from core.errors import L3SpotError

__all__ = [
    "BOX_ANTERIOR_MM",
    "BOX_SHAPE",
    "CLASSES",
    "LevelCount",
    "LevelVerification",
    "SpineBox",
    "SpineFCN",
    "VerificationError",
    "box_at_level",
    "box_centre_z",
    "column_centre",
    "column_offset",
    "count_levels",
    "counted_l3",
    "extract_box",
    "find_by_counting",
    "load_spine_model",
    "normalise_hu",
    "segment_box",
    "segment_on_column",
    "upsampled_argmax",
    "verify_in_volume",
    "verify_level",
]

#: Box size (z, y, x) in 1 mm voxels, each a multiple of 8: 304 mm along z (the located L3
#: +/- 152 mm: from below the sacrum's top to T11 even with a sixth lumbar vertebra or an
#: off-by-one locator; ANATOMY.md: one lumbar level 35-42 mm); 96 mm antero-posterior and
#: 128 mm wide: the body (lumbar 30-35 mm deep, 40-50 mm wide) and behind it the rib heads,
#: necks and the start of the shafts running back to the rib angles, which tell a rib from a
#: transverse process (a 72 x 112 mm box cut the ribs at their tubercles, and the network
#: took lumbar transverse processes for ribs).
BOX_SHAPE = (304, 96, 128)
#: The box reaches this far (mm) in front of the estimated body centre; the rest lies behind.
BOX_ANTERIOR_MM = 28.0
#: Voxel classes of the segmentation.
CLASSES = ("background", "vertebral_body", "rib", "sacrum")
BODY, RIB, SACRUM = 1, 2, 3
#: HU above which a pixel counts as bone for centring the box (cancellous bone 150-300 HU,
#: cortex 700-1500; ANATOMY.md).
BONE_HU = 150.0
#: Half body depth (mm) added to the body's anterior edge to reach its centre (lumbar body
#: 30-35 mm deep; ANATOMY.md).
HALF_BODY_DEPTH_MM = 16.0
#: Smallest connected component (mm^3) taken as a vertebral body: a T11 body is about
#: 30 x 22 x 20 mm (10 cm^3), a lumbar one 20-30 cm^3; fragments below 2 cm^3 are noise.
MIN_BODY_MM3 = 2000.0
#: Smallest rib component (mm^3) counted.
MIN_RIB_MM3 = 60.0
#: Smallest piece (mm^3) that continues a rib broken where the network missed its thin
#: shaft, and the widest gap (mm) it may leave (:func:`_rib_heads`; style-B validation
#: phantoms 7,000,026 and 7,000,099: T12 ribs in two pieces 2-11 mm apart).
MIN_RIB_PIECE_MM3 = 20.0
RIB_GAP_MM = 15.0
#: The shortest part (mm) a too-tall component is cut into (thoracic bodies 15-25 mm).
MIN_PART_MM = 12
#: A "body" whose bottom lies within this distance (mm) of the sacrum's top is S1: the
#: L5-S1 disc is 8-12 mm (ANATOMY.md; a collapsed one keeps a few mm), S1 has none.
S1_CONTACT_MM = 3.0
#: A rib's most medial voxel lies this close (mm) to the column's axis: its head beside the
#: body (lumbar bodies 40-50 mm wide, the head 2 mm beyond; ANATOMY.md).
RIB_HEAD_REACH_MM = 40.0
#: Two consecutive bodies further apart than this factor times the median spacing mean a
#: body was missed: the count is not trusted.
MAX_GAP_FACTOR = 1.6
#: Two consecutive whole "bodies" sharing more than this share of the shorter one's height
#: along z are one vertebra split in two side by side (style B 7,000,027's L5): vertebrae
#: are stacked with a disc between them, tilted ones at the lordosis overlap a few mm at
#: most. The count is not trusted. Pieces of a body cut by the box or the scan's end are
#: left alone (held-out boxes 9,500,007 and 9,500,011: the top body cut in two, far above
#: the levels counted).
MAX_BODY_OVERLAP = 0.5
#: A "body" taller than this (mm) is two merged bodies: the count is not trusted (the
#: tallest lumbar body is about 30 mm, ANATOMY.md).
MAX_BODY_HEIGHT_MM = 42.0
#: Rib-bearing vertebrae run without a gap (ANATOMY.md: the ribs are the thoracic
#: vertebrae's). A "rib-bearing" body just below a body without ribs, itself just below the
#: end of the run from the top, means a rib was missed (style-B validation phantom
#: 7,000,003: a thin T11 rib missed, T10 taken for the last rib-bearing vertebra and L1 for
#: L3, a correction two levels off) or a transverse process was taken for a rib; either way
#: the count from the ribs is not trusted. Two or more bodies below, it is a lumbar
#: transverse process (L3's are the longest, ANATOMY.md: style B 7,000,012's L3, two bodies
#: below T12, was read as rib-bearing, most likely from them) or, further down, the iliac
#: wings or the sacral alae, and the run stands (:func:`_last_rib_bearing`). One body, not
#: two, was chosen on those two style-B validation scans: at two, 7,000,012's right
#: correction became "unverified".
RIB_SKIP_BODIES = 1
#: The three bodies above the sacrum (L3-L5 in a typical spine, L2-L4 with four lumbar
#: vertebrae) bear no ribs in any spine (ANATOMY.md); one of them may be read as
#: rib-bearing (L3's transverse processes, the iliac wings or sacral alae near L5), more
#: than this many cannot: what was taken for the sacrum is not counted from (style-B
#: validation phantom 7,000,148, a chest scan, counted up from a "sacrum" at its lower end
#: to a thoracic L3, 234 mm off).
MAX_RIBS_ABOVE_SACRUM = 1
#: Below the last rib-bearing vertebra, L3's transverse processes and, near L5, the iliac
#: wings or sacral alae may be read as ribs: at most this many bodies. More mean that the run
#: of rib-bearing bodies from the top ended early, ribs missed over several vertebrae
#: (style-B validation phantoms 7,000,046 and 7,000,129, chest scans: ribs found at T1,
#: missed at T2-T4, found from T5 down; T4 was counted as L3); the count is not trusted.
MAX_RIBS_BELOW_RUN = 3
#: The lumbar vertebrae of a typical spine (24 presacral: 7 cervical, 12 thoracic, 5 lumbar).
TYPICAL_LUMBAR = 5
#: Vertebrae without ribs above the sacrum in people, transitional anatomy included (a
#: sacralised L5, a lumbarised S1 or a rib-free T12: ANATOMY.md). A count outside means a
#: rib or a body missed, or the sacrum misplaced: it is not trusted. Each count of seven in
#: the style-B validation runs (7,000,004, 7,000,147, 7,000,192; "bt" 7,500,056) was such
#: an error (two or three ribs missed), one of them moving a right answer a level.
LUMBAR_RANGE = (4, 6)


#: Why no count could be made although the segmentation is trusted.
NO_COUNT = "neither a rib-bearing vertebra nor the sacrum with three bodies above it is in view"


class VerificationError(L3SpotError, ValueError):
    """The level cannot be verified on this series, or the verification weights cannot be
    loaded (reason in the message)."""


# --------------------------------------------------------------------------- the box


@dataclass
class SpineBox:
    """A 1 mm isotropic box around the vertebral column.

    Attributes
    ----------
    image : (z, y, x) float32 HU, :data:`BOX_SHAPE`; voxels outside the scan are -1024.
    in_scan : (z,) bool, whether each box slice lies inside the scanned z range.
    origin_mm : (z, y, x) of voxel (0, 0, 0)'s centre in the volume's grid mm (module
        docstring); voxel size 1 mm.
    slice_spacing_mm : the scan's slice spacing (mm; 1 when unknown): a body ending within
        it of the scan's end may be cut there (:func:`count_levels`).
    """

    image: np.ndarray
    in_scan: np.ndarray
    origin_mm: tuple[float, float, float]
    slice_spacing_mm: float = 1.0

    def z_of(self, index: float) -> float:
        """z (mm) of box slice ``index`` (fractional allowed)."""
        return float(self.origin_mm[0] + index)

    @property
    def z_centre_mm(self) -> float:
        """z (mm) of the box's centre (``z_centre_mm`` of :func:`extract_box`)."""
        return float(self.origin_mm[0] + BOX_SHAPE[0] / 2 - 0.5)

    @property
    def centre_yx_mm(self) -> tuple[float, float]:
        """(y, x) grid mm of the column centre the box was placed on (``centre_yx_mm`` of
        :func:`extract_box`): another image on the same grid (a label map) resampled with
        ``extract_box(image, z_mm, spacing_mm, box.z_centre_mm, box.centre_yx_mm)`` lands
        on the same voxels."""
        return (
            float(self.origin_mm[1] + BOX_ANTERIOR_MM - 0.5),
            float(self.origin_mm[2] + BOX_SHAPE[2] / 2 - 0.5),
        )


def column_centre(
    hu: np.ndarray,
    z_mm: np.ndarray,
    spacing_mm: tuple[float, float],
    z_lo: float,
    z_hi: float,
) -> tuple[float, float]:
    """Centre (y, x) in grid mm of the vertebral body column between ``z_lo`` and ``z_hi``.

    Per slice (24 at most), bone pixels are those above :data:`BONE_HU`.

    * **The vertebra** (:func:`_vertebra_centre`): the midline is the median column of all
      bone pixels (the spine lies between symmetric lateral bones), bone within 30 mm of it
      is kept, and its largest component is the vertebra; its anterior edge plus
      :data:`HALF_BODY_DEPTH_MM` is the body centre; the median over slices is returned.
    * **Checked against the spinal canal** (:func:`_canal_candidates`): the hole that a
      bone component encloses (the ring of body, pedicles and laminae) with the body in
      front of it (:data:`CANAL_BODY_IN_FRONT_MM`; not a hole in the marrow), within
      :data:`CANAL_OFF_MIDLINE_MM` of the body outline's middle column, at the same place
      (within :data:`CANAL_MATCH_MM`) in :data:`CANAL_MIN_SHARE` of the slices (holes in a
      noisy bright organ or in bowel contrast scatter from slice to slice). The centre
      stands when it lies within :data:`COLUMN_OFF_CANAL_MM` to the side of the canal and
      its anterior surface :data:`CANAL_TO_FRONT_MM` in front of it.
    * **Otherwise, the body in front of the canal** (:func:`_body_in_front_of_canal`):
      bright non-bone beside the spine (a stomach of positive oral contrast, an enhanced
      liver or kidney beside an osteoporotic body whose marrow is below the bone
      threshold) was taken for the vertebra. The body straight in front of the canal is
      the column; where none of a body's depth is found there (contrast lying against the
      body's front), the centre is refused: a box placed on the organ would be counted
      wrongly, and a refusal is safer. (Taking the largest bright structure near the
      canal instead, tried on style-B phantoms, still took an organ touching the body with
      it and moved a count 93 mm.)

    Parameters
    ----------
    hu : (z, y, x) HU, canonical grid (rows anterior -> posterior).
    z_mm : (z,) ascending slice positions (mm).
    spacing_mm : (row, col) pixel spacing (mm).
    z_lo, z_hi : z range (mm) to look in.

    Returns
    -------
    (y, x) in mm (row x dy, col x dx).

    Raises
    ------
    VerificationError
        No slice in the range shows a vertebra, or the vertebra found does not fit the
        canal and no body is found in front of the canal.
    """
    dy, dx = spacing_mm
    idx = np.nonzero((z_mm >= z_lo) & (z_mm <= z_hi))[0]
    if idx.size > 24:
        idx = idx[np.linspace(0, idx.size - 1, 24).round().astype(int)]
    bones = {int(i): hu[i] > BONE_HU for i in idx}
    # the canal lies near the body's midline: holes further out (the marrow of a femoral
    # head, the pelvic ring) are not it
    body_cols = (np.nonzero(hu[i] > -500.0)[1] for i in idx)
    body_x = [float(c.mean()) * dx for c in body_cols if c.size]
    mid_x = float(np.median(body_x)) if body_x else None
    canal = _consistent_canal(
        {
            i: [
                p
                for p in _canal_candidates(b, dy, dx)
                if mid_x is None or abs(p[1] - mid_x) <= CANAL_OFF_MIDLINE_MM
            ]
            for i, b in bones.items()
        }
    )
    found = _vertebra_centre(bones, dy, dx)
    if found is None:
        raise VerificationError(
            f"no vertebra found between z {z_lo:.0f} and {z_hi:.0f} mm (no bone above "
            f"{BONE_HU:.0f} HU near the midline)"
        )
    if canal is None:
        return found
    side = abs(found[1] - canal[1])
    front = canal[0] - (found[0] - HALF_BODY_DEPTH_MM)
    if side <= COLUMN_OFF_CANAL_MM and CANAL_TO_FRONT_MM[0] <= front <= CANAL_TO_FRONT_MM[1]:
        return found
    at_canal = _body_in_front_of_canal(bones, canal, dy, dx)
    if at_canal is None:
        where = (
            f"{side:.0f} mm beside the spinal canal"
            if side > COLUMN_OFF_CANAL_MM
            else f"with its front {front:.0f} mm before the spinal canal"
        )
        raise VerificationError(
            f"the vertebral column is ambiguous: the largest bright structure near the "
            f"midline lies {where} (oral contrast or an enhanced organ taken for bone?), and "
            "no vertebral body was found in front of the canal"
        )
    return at_canal


def _vertebra_centre(
    bones: dict[int, np.ndarray], dy: float, dx: float
) -> tuple[float, float] | None:
    """Median body centre (y, x) mm over the slices' bone masks (:func:`column_centre`);
    None when no slice shows a vertebra."""
    ys: list[float] = []
    xs: list[float] = []
    for bone in bones.values():
        rr, cc = np.nonzero(bone)
        if rr.size < 20:
            continue
        xm = float(np.median(cc)) * dx
        band = np.zeros_like(bone)
        c0 = max(0, int((xm - 30.0) / dx))
        c1 = min(bone.shape[1], int((xm + 30.0) / dx) + 1)
        band[:, c0:c1] = bone[:, c0:c1]
        lab, n = ndimage.label(band)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(band, lab, index=np.arange(1, n + 1)) * dx * dy
        k = int(np.argmax(sizes)) + 1
        if sizes[k - 1] < 300.0:  # smaller than any vertebra's cross-section
            continue
        r, c = np.nonzero(lab == k)
        ys.append(float(r.min()) * dy + HALF_BODY_DEPTH_MM)
        xs.append(float(np.mean(c)) * dx)
    if not ys:
        return None
    return float(np.median(ys)), float(np.median(xs))


#: Area (mm^2) of a hole in a bone component that may be the spinal canal: the lumbar canal
#: is about 15-20 x 20-25 mm (ANATOMY.md); smaller holes are marrow or noise, larger ones
#: rings of other bones.
CANAL_AREA_MM2 = (40.0, 700.0)
#: Canal candidates of different slices closer than this (mm) are the same canal.
CANAL_MATCH_MM = 8.0
#: Share of the slices looked at that must show the canal at one place: the ring is closed
#: at the pedicles only. A one-off count (not a benchmark) found the true canal in 6-8 of 24
#: slices over 80 mm on four phantom scans, and chance clusters of a noisy bright organ's
#: holes in 2-4 (and 2 on the real abdomen, where no canal cluster formed).
CANAL_MIN_SHARE = 0.25
#: A body centre further than this (mm) to the side of the spinal canal is refused: a
#: bright organ beside the spine was taken for the vertebra.
COLUMN_OFF_CANAL_MM = 20.0
#: Largest distance (mm) of the canal from the body outline's middle column (the patient
#: lies about centred; a scoliotic spine stays within it).
CANAL_OFF_MIDLINE_MM = 45.0


#: Half-width (mm) of the strip straight in front of the spinal canal in which
#: :func:`_body_in_front_of_canal` looks for the vertebral body: narrower than the body
#: (lumbar 40-50 mm wide, ANATOMY.md), so that an organ beside it stays out.
CANAL_STRIP_MM = 5.0
#: Distance (mm) from the canal's centre to the body's anterior surface that a slice may
#: show: the canal's half depth (8-10 mm) plus a body 12-50 mm deep (a crushed or a large
#: vertebra). Less is a slice through the disc or an open cortex; more is something bright
#: lying against the body's front (bowel contrast, an aneurysm's calcified wall).
CANAL_TO_FRONT_MM = (20.0, 60.0)
#: Gap (mm) allowed between the canal's centre and the body's posterior wall (the canal's
#: half depth, 8-10 mm, with room): the body lies straight in front of its canal.
CANAL_WALL_GAP_MM = 15.0


def _body_in_front_of_canal(
    bones: dict[int, np.ndarray],
    canal: tuple[float, float],
    dy: float,
    dx: float,
) -> tuple[float, float] | None:
    """Body centre (y, x) mm straight in front of the spinal canal; None when fewer than
    three slices show one.

    The column's midline is the canal's (the body lies in front of its own canal), which
    neither an organ beside the spine nor an osteoporotic body (marrow below
    :data:`BONE_HU` inside its cortex, so that an enhanced kidney is the largest bright
    structure) can move. Per slice, the bone mask with its enclosed holes filled (the
    marrow inside a closed cortex) is read in a strip of +/- :data:`CANAL_STRIP_MM` around
    the canal's column, from the canal's centre forwards: the first bone within
    :data:`CANAL_WALL_GAP_MM` is the body's posterior wall, and the end of that run of bone
    its anterior surface, kept when it lies :data:`CANAL_TO_FRONT_MM` in front of the canal.
    The median anterior surface plus :data:`HALF_BODY_DEPTH_MM` is the centre, as in
    :func:`_vertebra_centre`.
    """
    cy, cx = canal
    c0 = max(0, int(round((cx - CANAL_STRIP_MM) / dx)))
    c1 = int(round((cx + CANAL_STRIP_MM) / dx)) + 1
    r_canal = int(round(cy / dy))
    fronts: list[float] = []
    for bone in bones.values():
        if r_canal >= bone.shape[0] or c0 >= bone.shape[1]:
            continue
        filled = ndimage.binary_fill_holes(bone)[: r_canal + 1, c0:c1]
        # rows from the canal's centre forwards (index 0 = the canal's row)
        col = filled.any(axis=1)[::-1]
        wall = np.flatnonzero(col)
        if wall.size == 0 or wall[0] * dy > CANAL_WALL_GAP_MM:
            continue
        gap = np.flatnonzero(~col[wall[0] :])
        end = wall[0] + (int(gap[0]) if gap.size else col.size - wall[0]) - 1
        depth = end * dy
        if CANAL_TO_FRONT_MM[0] <= depth <= CANAL_TO_FRONT_MM[1]:
            fronts.append((r_canal - end) * dy)
    if len(fronts) < 3:
        return None
    return float(np.median(fronts)) + HALF_BODY_DEPTH_MM, cx


#: Bone (mm, the component with its holes filled) that must lie straight in front of a hole
#: for it to be the spinal canal: the vertebral body (lumbar 30-35 mm deep, ANATOMY.md).
#: A hole in the body's marrow (trabecular bone below :data:`BONE_HU` inside the cortex,
#: as in an osteoporotic spine) has only the 1-3 mm anterior cortex in front of it; it was
#: taken for the canal in 8 of 34 phantom boxes where a canal was found.
CANAL_BODY_IN_FRONT_MM = 12.0


def _canal_candidates(bone: np.ndarray, dy: float, dx: float) -> list[tuple[float, float]]:
    """(y, x) in mm of every hole of :data:`CANAL_AREA_MM2` that a bone component of at
    least 300 mm^2 encloses in one slice's bone mask (rows, cols), with at least
    :data:`CANAL_BODY_IN_FRONT_MM` of the component straight in front of it."""
    lab, _ = ndimage.label(bone)
    out: list[tuple[float, float]] = []
    need = int(np.ceil(CANAL_BODY_IN_FRONT_MM / dy))
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        comp = lab[sl] == k
        if float(comp.sum()) * dy * dx < 300.0:
            continue
        filled = ndimage.binary_fill_holes(comp)
        holes = filled & ~comp
        hl, nh = ndimage.label(holes)
        if nh == 0:
            continue
        area = np.bincount(hl.ravel())[1:] * dy * dx
        for h in np.nonzero((area >= CANAL_AREA_MM2[0]) & (area <= CANAL_AREA_MM2[1]))[0]:
            r, c = np.nonzero(hl == h + 1)
            # the rows in front of the hole, in its middle column
            col = int(round(float(c.mean())))
            front = filled[max(0, r.min() - need) : r.min(), col]
            if front.size < need or not front.all():
                continue
            out.append(((float(r.mean()) + sl[0].start) * dy, (float(c.mean()) + sl[1].start) * dx))
    return out


def _consistent_canal(
    candidates: dict[int, list[tuple[float, float]]],
) -> tuple[float, float] | None:
    """The canal position (y, x) mm seen in the most slices (at least three and
    :data:`CANAL_MIN_SHARE` of the slices looked at), or None.

    For every candidate, the slices with a candidate within :data:`CANAL_MATCH_MM` are
    counted; the best one's matching candidates (the nearest per slice) are averaged.
    """
    pts = [(i, p) for i, ps in candidates.items() for p in ps]
    if len(pts) < 3:
        return None
    sl = np.array([i for i, _ in pts])
    xy = np.array([p for _, p in pts], dtype=np.float64)  # (P, 2)
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))  # (P, P)
    slices = np.unique(sl)
    onehot = sl[:, None] == slices[None, :]  # (P, S)
    near = d <= CANAL_MATCH_MM
    counts = (near.astype(np.int32) @ onehot.astype(np.int32) > 0).sum(1)  # slices per p
    b = int(np.argmax(counts))
    if counts[b] < max(3, CANAL_MIN_SHARE * len(candidates)):
        return None
    chosen = []
    for j in range(len(slices)):
        m = onehot[:, j] & near[b]
        if m.any():
            cand = np.nonzero(m)[0]
            chosen.append(xy[cand[np.argmin(d[b, cand])]])
    arr = np.array(chosen)
    return float(arr[:, 0].mean()), float(arr[:, 1].mean())


def extract_box(
    hu: np.ndarray,
    z_mm: np.ndarray,
    spacing_mm: tuple[float, float],
    z_centre_mm: float,
    centre_yx_mm: tuple[float, float],
) -> SpineBox:
    """Resample the :data:`BOX_SHAPE` box around the column, trilinear (Mita et al. 3.1).

    Parameters
    ----------
    hu : (z, y, x) HU; z_mm : (z,) ascending (mm); spacing_mm : (row, col) (mm).
    z_centre_mm : the box's centre along z (the located L3, mm).
    centre_yx_mm : the body centre (:func:`column_centre`), grid mm.

    Returns
    -------
    SpineBox
        Outside the scan (z beyond the first/last slice, or beyond the image edge) -1024 HU.
    """
    nz, ny, nx = BOX_SHAPE
    dy, dx = spacing_mm
    z0 = z_centre_mm - nz / 2 + 0.5
    y0 = centre_yx_mm[0] - BOX_ANTERIOR_MM + 0.5
    x0 = centre_yx_mm[1] - nx / 2 + 0.5
    zb = z0 + np.arange(nz)
    in_scan = (zb >= z_mm[0]) & (zb <= z_mm[-1])
    out = np.full(BOX_SHAPE, -1024.0, dtype=np.float32)
    spacing = float(np.median(np.diff(z_mm))) if len(z_mm) > 1 else 1.0
    if not in_scan.any():
        return SpineBox(out, in_scan, (z0, y0, x0), spacing)
    zi = np.interp(zb[in_scan], z_mm, np.arange(len(z_mm), dtype=np.float64))
    rows = (y0 + np.arange(ny)) / dy
    cols = (x0 + np.arange(nx)) / dx
    # crop the source first (a view): the interpolation then reads only the box's neighbourhood
    s0, s1 = int(np.floor(zi.min())), int(np.ceil(zi.max())) + 1
    r0 = max(0, int(np.floor(rows.min())) - 1)
    r1 = min(hu.shape[1], int(np.ceil(rows.max())) + 2)
    c0 = max(0, int(np.floor(cols.min())) - 1)
    c1 = min(hu.shape[2], int(np.ceil(cols.max())) + 2)
    if r1 <= r0 or c1 <= c0:
        raise VerificationError("the vertebral column box lies outside the image")
    sub = hu[s0:s1, r0:r1, c0:c1]
    # separable trilinear interpolation (the same values as map_coordinates, order 1,
    # constant -1024 outside), z first: the rows and columns are then blended on the box's
    # slices only
    out[in_scan] = _interp_axis(
        _interp_axis(_interp_axis(sub, zi - s0, 0), rows - r0, 1), cols - c0, 2
    )
    return SpineBox(out, in_scan, (z0, y0, x0), spacing)


def _interp_axis(a: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``a`` along ``axis`` at fractional indices ``coords``.

    Same values as :func:`scipy.ndimage.map_coordinates` with ``order=1, mode="constant",
    cval=-1024`` along that axis: an index outside [0, n - 1] gives -1024 HU. Only the
    source planes the coordinates touch are read.

    Returns float32, ``a``'s shape with ``len(coords)`` along ``axis``.
    """
    n = a.shape[axis]
    inside = (coords >= 0) & (coords <= n - 1)
    c = np.clip(coords, 0, n - 1)
    i0 = np.minimum(np.floor(c).astype(np.intp), max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1] * a.ndim
    shape[axis] = -1
    w = (c - i0).astype(np.float32).reshape(shape)
    lo = np.take(a, i0, axis=axis).astype(np.float32, copy=False)
    hi = np.take(a, i1, axis=axis).astype(np.float32, copy=False)
    res = lo + (hi - lo) * w
    if not inside.all():
        idx = [slice(None)] * a.ndim
        idx[axis] = ~inside
        res[tuple(idx)] = -1024.0
    return res


def normalise_hu(image: np.ndarray) -> np.ndarray:
    """HU -> network input: clip to [-200, 1800] and map to about [-0.8, 3.2] (same shape)."""
    return ((np.clip(image, -200.0, 1800.0) - 200.0) / 500.0).astype(np.float32)


# --------------------------------------------------------------------------- the network


class _ResLevel(nn.Module):
    """``n`` 5x5x5 convolutions with PReLU; the level's input is added to its output."""

    def __init__(self, c_in: int, c_out: int, n: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [nn.Conv3d(c_in if i == 0 else c_out, c_out, 5, padding=2), nn.PReLU(c_out)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


class _GCN(nn.Module):
    """Global convolution (Peng et al. 2017) in 3-D: a k x k x k receptive field from three
    separable 1-D paths (z->y->x, y->x->z, x->z->y), summed, with PReLU."""

    def __init__(self, c_in: int, c_out: int, k: int) -> None:
        super().__init__()
        p = k // 2
        kz, ky, kx = (k, 1, 1), (1, k, 1), (1, 1, k)
        pz, py, px = (p, 0, 0), (0, p, 0), (0, 0, p)

        def path(a, pa, b, pb, c, pc):
            return nn.Sequential(
                nn.Conv3d(c_in, c_out, a, padding=pa),
                nn.Conv3d(c_out, c_out, b, padding=pb),
                nn.Conv3d(c_out, c_out, c, padding=pc),
            )

        self.paths = nn.ModuleList(
            [
                path(kz, pz, ky, py, kx, px),
                path(ky, py, kx, px, kz, pz),
                path(kx, px, kz, pz, ky, py),
            ]
        )
        self.act = nn.PReLU(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(sum(p(x) for p in self.paths))


class SpineFCN(nn.Module):
    """3-D encoder-decoder of Mita et al. (section 2.2, Fig. 2), sized for 2 CPU cores.

    Input ``(batch, 1, z, y, x)`` normalised HU (:func:`normalise_hu`) at 1 mm, each of z,
    y, x a multiple of 8; output ``(batch, len(CLASSES), z, y, x)`` logits at 1 mm.

    Encoder: a 5x5x5 stride-2 convolution of the 1 mm input, then three levels (2, 4, 8 mm),
    each 5x5x5 convolutions with PReLU and a residual connection (1, 2, 2 convolutions),
    stride-2 2x2x2 convolutions between levels that double the channels (``base``, 2, 4 x
    ``base``). Decoder: stride-2 2x2x2 transposed convolutions that halve them, the
    encoder's feature map of the same level concatenated (skip connection), then a global
    convolution block (k = 13 at 4 mm, 9 at 2 mm) with PReLU; a 1x1x1 convolution gives
    the class logits at 2 mm, trilinearly up-sampled to 1 mm.

    Deviations from the paper, for speed on two CPU cores (``bench/bench_locate.py``): no
    convolution runs at full resolution (the first one has stride 2 and the logits are
    up-sampled), and fewer channels (``base`` = 8).
    """

    def __init__(self, base: int = 8, n_classes: int = len(CLASSES)) -> None:
        super().__init__()
        c = [base, 2 * base, 4 * base]
        self.stem = nn.Sequential(nn.Conv3d(1, c[0], 5, stride=2, padding=2), nn.PReLU(c[0]))
        self.enc = nn.ModuleList(
            [_ResLevel(c[0], c[0], 1), _ResLevel(c[1], c[1], 2), _ResLevel(c[2], c[2], 2)]
        )
        self.down = nn.ModuleList(
            [
                nn.Sequential(nn.Conv3d(c[i], c[i + 1], 2, stride=2), nn.PReLU(c[i + 1]))
                for i in range(2)
            ]
        )
        self.up = nn.ModuleList(
            [
                nn.Sequential(nn.ConvTranspose3d(c[i + 1], c[i], 2, stride=2), nn.PReLU(c[i]))
                for i in range(2)
            ]
        )
        self.dec = nn.ModuleList([_GCN(2 * c[0], c[0], 9), _GCN(2 * c[1], c[1], 13)])
        self.head = nn.Conv3d(c[0], n_classes, 1)

    def forward_coarse(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits at 2 mm: ``(batch, len(CLASSES), z/2, y/2, x/2)`` for a ``(batch, 1,
        z, y, x)`` input at 1 mm (:meth:`forward` up-samples them)."""
        x = self.stem(x)
        skips = []
        for i in range(2):
            x = self.enc[i](x)
            skips.append(x)
            x = self.down[i](x)
        x = self.enc[2](x)
        for i in (1, 0):
            x = self.up[i](x)
            x = self.dec[i](torch.cat([x, skips[i]], dim=1))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(
            self.forward_coarse(x), scale_factor=2, mode="trilinear", align_corners=False
        )


def load_spine_model(path: Path) -> SpineFCN:
    """Load trained weights (``torch.save`` of ``{"state_dict", "base", "record"}``) in
    eval mode, cached per file version (path, size, modification time).

    Raises
    ------
    VerificationError
        The file is missing, unreadable or not this network's weights.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise VerificationError(f"level-verification weights {path}: {exc.strerror}") from exc
    return _load_spine_model(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_spine_model(path: str, size: int, mtime_ns: int) -> SpineFCN:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any unreadable file is the same error)
        raise VerificationError(f"level-verification weights {path} unreadable: {exc}") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise VerificationError(f"{path} is not level-verification weights")
    net = SpineFCN(base=int(ckpt.get("base", 8)))
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise VerificationError(f"{path} does not fit the level-verification network") from exc
    net.eval()
    return net


def segment_box(net: SpineFCN, box: SpineBox) -> np.ndarray:
    """Voxel classes of the box.

    Returns
    -------
    (z, y, x) uint8 indices into :data:`CLASSES`; 0 outside the scan.
    """
    x = torch.from_numpy(normalise_hu(box.image))[None, None]
    with torch.inference_mode():
        coarse = net.forward_coarse(x)[0].numpy()
    classes = upsampled_argmax(coarse)
    classes[~box.in_scan] = 0
    return classes


def _upsampling_taps(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two source indices and the second one's weight of each of the ``2 n`` outputs of
    a linear x2 up-sampling with ``align_corners=False`` (torch's ``interpolate``): output
    ``o`` reads ``(o + 0.5) / 2 - 0.5``, clamped to ``[0, n - 1]``."""
    src = np.clip((np.arange(2 * n) + 0.5) / 2.0 - 0.5, 0.0, None)
    lo = np.floor(src).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, (src - lo).astype(np.float32)


def upsampled_argmax(logits: np.ndarray) -> np.ndarray:
    """The class of each voxel of the trilinearly x2 up-sampled logits, without up-sampling
    them all.

    The same as ``argmax`` over the class axis of ``torch.nn.functional.interpolate(...,
    scale_factor=2, mode="trilinear", align_corners=False)`` (up to float rounding where two
    classes' interpolated logits are within about 1e-6 of each other). An up-sampled voxel
    is a convex combination of its eight 2 mm neighbours; where they all have the same class
    it keeps that class (an inequality between logits holds for any convex combination of
    them), so only voxels on a boundary between classes are interpolated. Up-sampling all
    4 x 3.7 million logits of the verification box and taking their argmax cost 0.19 s of
    its 0.44 s segmentation (a one-off profile on 2 CPU cores; ``bench/bench_locate.py``
    prints the whole step).

    Parameters
    ----------
    logits : (classes, z, y, x) float32 at 2 mm.

    Returns
    -------
    (2 z, 2 y, 2 x) uint8 class indices at 1 mm.
    """
    n_classes = logits.shape[0]
    if n_classes > 255:
        raise ValueError(f"{n_classes} classes do not fit uint8")
    coarse = np.argmax(logits, axis=0).astype(np.uint8)
    taps = [_upsampling_taps(n) for n in coarse.shape]
    lo_cls = hi_cls = coarse
    for axis, (lo, hi, _) in enumerate(taps):
        # the smallest and largest class among the neighbours, one axis at a time
        lo_cls = np.minimum(np.take(lo_cls, lo, axis), np.take(lo_cls, hi, axis))
        hi_cls = np.maximum(np.take(hi_cls, lo, axis), np.take(hi_cls, hi, axis))
    classes = lo_cls
    mixed = np.flatnonzero(lo_cls != hi_cls)
    if mixed.size:
        _, ny, nx = coarse.shape
        flat = logits.reshape(n_classes, -1)
        value = np.zeros((n_classes, mixed.size), np.float32)
        (lz, hz, wz), (ly, hy, wy), (lx, hx, wx) = taps
        oz, oy, ox = np.unravel_index(mixed, classes.shape)
        for iz, fz in ((lz[oz], 1.0 - wz[oz]), (hz[oz], wz[oz])):
            for iy, fy in ((ly[oy], 1.0 - wy[oy]), (hy[oy], wy[oy])):
                row, fzy = (iz * ny + iy) * nx, fz * fy
                for ix, fx in ((lx[ox], 1.0 - wx[ox]), (hx[ox], wx[ox])):
                    value += np.take(flat, row + ix, axis=1) * (fzy * fx)
        classes.flat[mixed] = np.argmax(value, axis=0)
    return classes


# --------------------------------------------------------------------------- counting


@dataclass
class Body:
    """One vertebral body found in the box (z in mm, top = superior end plate)."""

    z_bottom: float
    z_top: float
    volume_mm3: float
    rib_bearing: bool
    # cut by the box's or the scan's end (or ending within a slice spacing of the scan's
    # end): its extent is not all seen
    partial: bool

    @property
    def z_mid(self) -> float:
        return 0.5 * (self.z_bottom + self.z_top)


@dataclass
class LevelCount:
    """The vertebral bodies counted in a box, top (superior) first.

    Attributes
    ----------
    bodies : from the top of the box down.
    last_rib : index in ``bodies`` of the lowest rib-bearing body (T12 in a typical spine),
        or None when no rib-bearing body is seen.
    sacrum_top_mm : z of the sacrum's top (mm), or None when not seen.
    lumbar_counted : bodies between the last rib-bearing one and the sacrum (both seen), else
        None.
    l3_from_ribs, l3_from_sacrum : index in ``bodies`` of L3 by each count, or None.
    problem : why the count is not trusted (a missed or merged body), or None.
    sacrum_note : why no count is made from a sacrum that is seen (:data:`S1_UNCLEAR`), or
        None.
    """

    bodies: list[Body]
    last_rib: int | None
    sacrum_top_mm: float | None
    lumbar_counted: int | None
    l3_from_ribs: int | None
    l3_from_sacrum: int | None
    problem: str | None = None
    sacrum_note: str | None = None


class _Extent(NamedTuple):
    """One body component of :func:`_body_extents`: box z indices ``z0`` (first) and
    ``z1`` (last + 1), its eroded core's voxels (mm^3) and that core's centre (y, x) in box
    voxels."""

    z0: int
    z1: int
    voxels: int
    centre_yx: tuple[float, float]


def _body_extents(body: np.ndarray) -> list[_Extent]:
    """The vertebral bodies of a body-class mask (z, y, x), 1 mm voxels.

    A one-voxel erosion first parts bodies that touch through a thin bridge (an osteophyte
    rim, a partial-volume voxel at a thin disc). A component still taller than
    :data:`MAX_BODY_HEIGHT_MM` (no body is) is cut at its narrowest slice at least
    :data:`MIN_PART_MM` from either end (the disc between two bodies), again until none is;
    :func:`count_levels` still refuses a count whose bodies are too far apart.
    """
    core = ndimage.binary_erosion(body)
    lab, _ = ndimage.label(core)
    out: list[_Extent] = []
    # per component: first z, last z + 1, and per slice its area and the sums of y and x
    pending: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]] = []
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        m = lab[sl] == k
        yy = np.arange(sl[1].start, sl[1].stop, dtype=float)[None, :, None]
        xx = np.arange(sl[2].start, sl[2].stop, dtype=float)[None, None, :]
        area = m.sum(axis=(1, 2))
        pending.append(
            (sl[0].start, sl[0].stop, area, (m * yy).sum(axis=(1, 2)), (m * xx).sum(axis=(1, 2)))
        )
    while pending:
        z0, z1, area, ysum, xsum = pending.pop()
        if area.sum() < MIN_BODY_MM3 / 2:
            continue
        # the body's height once restored (the eroded core is one voxel short at each end
        # plate), the same height count_levels measures
        height = min(body.shape[0], z1 + 1) - max(0, z0 - 1)
        if height > MAX_BODY_HEIGHT_MM and len(area) > 2 * MIN_PART_MM:
            # no body is this tall: cut at the narrowest slice (the disc) that leaves two
            # parts of a body's height at least
            inner = area[MIN_PART_MM:-MIN_PART_MM]
            cut = int(np.argmin(inner)) + MIN_PART_MM
            pending.append((z0, z0 + cut, area[:cut], ysum[:cut], xsum[:cut]))
            pending.append((z0 + cut + 1, z1, area[cut + 1 :], ysum[cut + 1 :], xsum[cut + 1 :]))
            continue
        n = float(area.sum())
        # the eroded core is one voxel short at each end plate
        out.append(
            _Extent(
                max(0, z0 - 1),
                min(body.shape[0], z1 + 1),
                int(n),
                (float(ysum.sum() / n), float(xsum.sum() / n)),
            )
        )
    return out


#: Body components whose centres (in the axial plane) lie within this distance (mm) of one
#: another belong to one column (:func:`_column`): consecutive vertebrae sit almost straight
#: above one another (a few mm apart even in a scoliosis), the halves of a body split in two
#: 20-25 mm apart (a lumbar body is 40-50 mm wide, ANATOMY.md); the "bodies" the network
#: finds beside the column lie 60 mm or more off (style-B validation 7,000,213 and
#: 7,000,285, 2.5 mm pixels: 2,400-4,700 mm^3 "bodies" 57-69 mm beside real ones, over the
#: same slices, refused as a body split in two).
COLUMN_LINK_MM = 25.0


def _column(extents: list[_Extent]) -> list[_Extent]:
    """The body components that form the vertebral column, in the order given.

    Components are linked when their centres lie within :data:`COLUMN_LINK_MM` of each
    other in the axial plane (at any z: linked one to the next, a scoliotic column stays one
    group); the group of most voxels is the column. Other components are not vertebral
    bodies of this column (a bone, an organ or a calcification the network labelled body,
    beside it).
    """
    if len(extents) < 2:
        return list(extents)
    c = np.array([e.centre_yx for e in extents])
    near = np.hypot(*(c[:, None, :] - c[None, :, :]).transpose(2, 0, 1)) <= COLUMN_LINK_MM
    _, group = sparse_components(near)
    weight = np.bincount(group, weights=[e.voxels for e in extents])
    best = int(np.argmax(weight))
    return [e for e, g in zip(extents, group, strict=True) if g == best]


@dataclass
class _RibPiece:
    """One connected piece of the rib class: its voxels (n, 3) as box (z, y, x), their
    distance from the column's axis along x (n,), whether it leaves the box through its
    posterior or a lateral face, its side (-1, +1 along x), its outer end (3,) and its
    head's z (the mean z of its voxels within 6 mm of its most medial one)."""

    pts: np.ndarray
    d: np.ndarray
    leaves: bool
    side: float
    end: np.ndarray
    head_z: float


def _rib_pieces(rib: np.ndarray, centre_x: float) -> list[_RibPiece]:
    """The pieces of at least :data:`MIN_RIB_PIECE_MM3` of a rib-class mask (z, y, x) around
    the column's axis at box x ``centre_x``."""
    lab, _ = ndimage.label(rib)
    ny, nx = rib.shape[1:]
    pieces = []
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        zz, yy, xx = np.nonzero(lab[sl] == k)
        if zz.size < MIN_RIB_PIECE_MM3:
            continue
        pts = np.stack([zz + sl[0].start, yy + sl[1].start, xx + sl[2].start], 1).astype(float)
        d = np.abs(pts[:, 2] - centre_x)
        leaves = pts[:, 1].max() >= ny - 3 or pts[:, 2].min() <= 2 or pts[:, 2].max() >= nx - 3
        pieces.append(
            _RibPiece(
                pts=pts,
                d=d,
                leaves=bool(leaves),
                side=float(np.sign(pts[:, 2].mean() - centre_x)),
                end=pts[d >= d.max() - 6.0].mean(axis=0),  # the piece's outer end
                head_z=float(pts[d <= d.min() + 6.0, 0].mean()),
            )
        )
    return pieces


def _rib_heads(pieces: list[_RibPiece]) -> list[float]:
    """Box z (voxel index) of the head of each rib among the rib pieces of :func:`_rib_pieces`.

    A rib is a connected component of at least :data:`MIN_RIB_MM3` that reaches from within
    :data:`RIB_HEAD_REACH_MM` of the column's axis (its head, beside the body) out of the
    box through its posterior or a lateral face (the shaft runs back and out to the rib
    angle, ANATOMY.md): a transverse process ends inside the box (lumbar ones 35-50 mm from
    the midline, about 25 mm behind the body's centre), and so does a fragment. A thin rib
    whose shaft the network missed over a few mm comes in pieces: a piece that ends inside
    the box is continued by one of at least :data:`MIN_RIB_PIECE_MM3` within
    :data:`RIB_GAP_MM` of its outer end, wholly further out and not higher on the whole
    (ribs slope down-laterally), and so on out of the box; a piece continues only the piece
    whose end lies nearest to it (the lateral part of a broken T12 rib continues T12's
    head, not L1's transverse process beside it). The head's z is the mean z of the rib's
    voxels within 6 mm of its most medial one.
    """
    # gap[i, j]: how far piece j lies from piece i's outer end; inf where j cannot continue
    # i (not further out on the same side, or higher overall: a rib slopes down-laterally)
    n = len(pieces)
    gap = np.full((n, n), np.inf)
    for i, a in enumerate(pieces):
        for j, b in enumerate(pieces):
            if (
                i != j
                and b.side == a.side
                and b.d.min() >= a.d.max() - 2.0
                and b.pts[:, 0].mean() <= a.end[0] + 2.0
            ):
                gap[i, j] = np.sqrt(((b.pts - a.end) ** 2).sum(axis=1)).min()
    # a piece continues only the one piece whose end lies nearest to it
    continues = (gap <= RIB_GAP_MM) & (gap <= gap.min(axis=0, initial=np.inf)[None, :])

    def reaches_out(i: int, seen: frozenset[int]) -> bool:
        return pieces[i].leaves or any(
            reaches_out(j, seen | {j}) for j in np.nonzero(continues[i])[0] if j not in seen
        )

    return [
        p.head_z
        for i, p in enumerate(pieces)
        if len(p.pts) >= MIN_RIB_MM3
        and p.d.min() <= RIB_HEAD_REACH_MM
        and reaches_out(i, frozenset({i}))
    ]


def _short_rib_sides(pieces: list[_RibPiece], z_lo: float, z_hi: float) -> set[int]:
    """The sides (-1, +1 along x) on which a short rib's head lies between box z ``z_lo``
    and ``z_hi`` (voxel indices), of the rib pieces of :func:`_rib_pieces`.

    A short rib is a piece of at least :data:`SHORT_RIB_MM3` whose most medial voxel lies
    within :data:`RIB_HEAD_REACH_MM` of the column's axis and which reaches
    :data:`SHORT_RIB_SIDE_REACH_MM` out from it, and one of the pair
    :data:`SHORT_RIB_REACH_MM`, whether or not it leaves the box: the medial part of a
    steep, thin twelfth rib whose shaft the network lost, which
    :func:`_rib_heads` drops for ending inside the box, or a whole rib whose head lies
    just above the body's segmented top (:func:`count_levels`).
    """
    near = [
        p
        for p in pieces
        if len(p.pts) >= SHORT_RIB_MM3
        and p.d.min() <= RIB_HEAD_REACH_MM
        and p.d.max() >= SHORT_RIB_SIDE_REACH_MM
        and z_lo <= p.head_z <= z_hi
    ]
    if not any(p.d.max() >= SHORT_RIB_REACH_MM for p in near):
        return set()
    return {int(p.side) for p in near}


#: A short rib (:func:`_short_rib_sides`): at least this many mm^3, reaching this far (mm)
#: out from the column's axis (past a lumbar body's half width, 20-25 mm). Style-B
#: validation 7,000,025 and 7,000,070: the network labelled the medial 34-60 mm of each T12
#: rib (900-1500 mm^3 a side) and lost the rest, so T12 was counted as L1 and L3 put a
#: level high. The volume was 400 mm^3 until validation 7,000,073, the one wrong answer
#: without a flag in 7,000,000-399: its left T12 piece, 335 mm^3 from 18 to 32 mm out
#: (a thin rib: 30 mm of a 3.5 mm rib is about 290 mm^3), missed it, and L3 was confirmed a
#: level high. At 300 that answer alone changed in those 400 scans.
SHORT_RIB_MM3 = 300.0
SHORT_RIB_REACH_MM = 30.0
#: Where one of the pair reaches :data:`SHORT_RIB_REACH_MM`, the other's piece need only
#: reach this far (mm): a rib's head and neck beside the body (its half width 20-25 mm).
#: Style "bt" 8,000,049: a thirteenth rib pair of 478 and 533 mm^3 whose left piece reached
#: 24 mm out, so T13 was counted as L1 and both counts agreed a level off.
SHORT_RIB_SIDE_REACH_MM = 20.0
#: A short rib's head lies at most this far (mm) below the body's superior end plate (a
#: rib head articulates with the upper body and the disc above, ANATOMY.md; both T12 heads
#: of 7,000,025 and 7,000,070 at their end plate). A lumbar transverse process arises from
#: the pedicle, lower: style "bt" validation 7,500,048's L1 processes, labelled rib with
#: heads 10-11 mm below its end plate, made it rib-bearing before this limit.
#: :func:`count_levels` adds the scan's slice spacing: in thick slices the network's top of
#: a body can lie a slice or more above its end plate. Style-B test 7,002,517 at 1.25 mm
#: pixels and 5 mm slices: T12's segmented top lay 10 mm above the truth's, both its short
#: ribs' heads 9.6 mm below that top, so T12 was counted as L1 and a level-high answer
#: confirmed without a flag. (A rule written from a test scan: models/spine_fcn.md,
#: "Seventh session".)
SHORT_RIB_HEAD_BELOW_TOP_MM = 5.0
#: ... and at most this far (mm) above it. The lowest ribs' heads articulate with their own
#: body only, at its upper part (ribs 10-12 have a single facet; Gray's Anatomy), so a head
#: above the segmented end plate means the network gave the top of the body to the one
#: above. Style-B 7,002,058 and 7,002,105: T12's top 3-7 mm went to T11's component, T12's
#: rib heads (in each, a whole rib on one side and a short one on the other) lay 3.9 and
#: 6.6 mm above T12's segmented top, and T12 was counted as L1 (3.5 mm, the limit before,
#: reached neither). Only the short-rib check of the body just below the run, both sides,
#: uses it: a rib-bearing extent this wide for every body let a one-sided "rib" in the
#: L1-L2 disc make L2 rib-bearing (validation 7,000,012, then refused as a skipped rib).
SHORT_RIB_HEAD_ABOVE_TOP_MM = 8.0


def _last_rib_bearing(bodies: list[Body]) -> int | None:
    """Index (top first) of the last rib-bearing body, or None.

    Rib-bearing vertebrae run without a gap from T1 down (ANATOMY.md), so only the run of
    rib-bearing bodies that starts at the top of the box counts (its first body may be the
    top one or, when that is cut by the box, the next); a "rib" further down, two or more
    bodies below the run (a lumbar transverse process, the iliac wings or the sacral alae
    taken for one), is ignored; one just below a body without ribs leaves the count
    untrusted (:data:`RIB_SKIP_BODIES`, :func:`count_levels`).
    """
    first = next((i for i, b in enumerate(bodies) if b.rib_bearing), None)
    if first is None or first > 1:
        return None
    last = first
    while last + 1 < len(bodies) and bodies[last + 1].rib_bearing:
        last += 1
    return last


#: Body voxels (mm^3) within :data:`S1_CONTACT_MM` of the sacrum, in 3-D, below which a
#: body does not touch it: a body across a disc shares no end plate with it.
S1_CONTACT_MIN_MM3 = 100.0

#: The share of its lower end plate a "body" must share with the sacrum to be S1: S1 fused
#: to S2 shares the whole of it (over 1000 mm^2), so at least half, i.e. body
#: voxels within :data:`S1_CONTACT_MM` of the sacrum of this share of the body's mean axial
#: area times the reach. A body touching the sacrum over less (a corner of a lordotic L5
#: across a thin disc, or S1 half segmented) is neither: no count is made from the sacrum.
S1_END_PLATE_SHARE = 0.5

#: Why no count is made from a sacrum the lowest body touches over part of its end plate.
S1_UNCLEAR = (
    "the lowest vertebral body touches the sacrum over part of its end plate only (L5 across "
    "a thin disc, or S1 half segmented): no count from the sacrum"
)


def _s1_contact(
    body: Body,
    sac_lab: np.ndarray,
    sac_k: int,
    classes: np.ndarray,
    box: SpineBox,
    sacrum_top: float,
) -> str:
    """Whether the lowest "body" above the sacrum's top is S1 taken for a body.

    "s1" when its bottom lies within :data:`S1_CONTACT_MM` of the sacrum's top along z and
    its voxels within :data:`S1_CONTACT_MM` of the sacrum in 3-D cover at least
    :data:`S1_END_PLATE_SHARE` of its lower end plate (the body's volume over its height,
    mm^2, times the reach); "apart" when fewer than :data:`S1_CONTACT_MIN_MM3` do, or its
    bottom lies higher (a lordotic L5, whose bottom lies below the sacrum's top along z,
    lies across the inclined L5-S1 disc from it, 8-12 mm, ANATOMY.md); "unclear" in
    between: it touches the sacrum at a corner, which neither a disc nor a fused S1 does in
    the segmentation's own terms (the real case's L5: 164 mm^3 where half its end plate
    would be 1,100), so the count from the sacrum is not trusted.

    ``sac_lab`` (the sacrum class's components; the sacrum is component ``sac_k``) and
    ``classes`` are (z, y, x) box arrays (1 mm voxels).
    """
    if body.z_bottom - sacrum_top >= S1_CONTACT_MM:
        return "apart"
    reach = int(np.ceil(S1_CONTACT_MM))
    i0 = max(0, int(round(body.z_bottom - box.origin_mm[0] + 0.5)))
    i1 = min(classes.shape[0], int(round(body.z_top - box.origin_mm[0] + 0.5)))
    s0, s1 = max(0, i0 - reach), min(classes.shape[0], i1 + reach)
    sacrum = sac_lab[s0:s1] == sac_k  # only the slab around the body
    near = ndimage.binary_dilation(sacrum, iterations=reach)[i0 - s0 : i1 - s0]
    contact = float(np.count_nonzero(near & (classes[i0:i1] == BODY)))
    if contact < S1_CONTACT_MIN_MM3:
        return "apart"
    end_plate = body.volume_mm3 / max(body.z_top - body.z_bottom, 1.0)
    return "s1" if contact >= S1_END_PLATE_SHARE * S1_CONTACT_MM * end_plate else "unclear"


def count_levels(classes: np.ndarray, box: SpineBox) -> LevelCount:
    """Count the vertebral bodies of a segmented box from the ribs and from the sacrum.

    Bodies come from :func:`_body_extents`, those of the column (:func:`_column`); a body
    is rib-bearing when the head of a rib (:func:`_rib_heads`) lies within its z extent or
    4 mm of it (the head articulates with the upper body and the disc above, ANATOMY.md),
    and the last rib-bearing one ends the run from the top (:func:`_last_rib_bearing`), or
    the body below it when a short rib lies beside that body on both sides, its head
    between :data:`SHORT_RIB_HEAD_BELOW_TOP_MM` plus the slice spacing below and
    :data:`SHORT_RIB_HEAD_ABOVE_TOP_MM` above the body's superior end plate
    (:func:`_short_rib_sides`); the sacrum's top is that of its largest connected component
    (raised to the top of the one "body" that shares its lower end plate with it in 3-D:
    S1, :func:`_s1_contact`; no count from the sacrum where that body touches it at a
    corner only, ``sacrum_note``), and bodies below it are not counted; no count is made
    from a sacrum with rib-bearing bodies above it (:data:`MAX_RIBS_ABOVE_SACRUM`).

    Parameters
    ----------
    classes : (z, y, x) uint8 from :func:`segment_box` (or a reference segmentation).
    box : the box it came from (origin, which slices are in the scan).

    Returns
    -------
    LevelCount
        ``problem`` set when consecutive bodies are too far apart (a missed body), a body
        is too tall (two merged), two share most of their height side by side (one split,
        :data:`MAX_BODY_OVERLAP`), more than :data:`MAX_RIBS_BELOW_RUN` bodies below the run
        of ribs from the top bear ribs, a rib-bearing body lies just below one without ribs
        (:data:`RIB_SKIP_BODIES`), or the bodies between the last rib-bearing one and the
        sacrum are more or fewer than people have (:data:`LUMBAR_RANGE`), in which case
        neither count is used.
    """
    in_idx = np.nonzero(box.in_scan)[0]
    first_in, last_in = (int(in_idx[0]), int(in_idx[-1])) if in_idx.size else (0, -1)
    # a body's end plate within one slice spacing of the scan's end cannot be told from a
    # cut: a thick end slice blends the body beyond it (style B 7,000,027: a 9 mm sliver of
    # L4 ending 1 mm below the last 5 mm slice was counted as a whole L3)
    edge = max(box.slice_spacing_mm - 0.5, 0.0)
    ribs = _rib_pieces(classes == RIB, classes.shape[2] / 2 - 0.5)
    heads = _rib_heads(ribs)
    bodies: list[Body] = []
    for z0, z1, vol, _ in _column(_body_extents(classes == BODY)):
        bearing = any(z0 - 4 <= h <= z1 - 1 + 4 for h in heads)
        bodies.append(
            Body(
                z_bottom=box.z_of(z0 - 0.5),
                z_top=box.z_of(z1 - 0.5),
                volume_mm3=float(vol),
                rib_bearing=bearing,
                partial=z0 <= first_in + edge or z1 - 1 >= last_in - edge,
            )
        )
    bodies.sort(key=lambda b: -b.z_mid)
    sac_lab, n_sac = ndimage.label(classes == SACRUM)
    sacrum_top = None
    sacrum_note = None
    if n_sac:
        sizes = np.bincount(sac_lab.ravel())[1:]
        k = int(np.argmax(sizes)) + 1
        if sizes[k - 1] >= MIN_BODY_MM3:
            sl_z = ndimage.find_objects(sac_lab)[k - 1][0]
            sacrum_top = box.z_of(sl_z.stop - 0.5)
            bodies = [b for b in bodies if b.z_mid > sacrum_top]
            # S1 is fused to the sacrum (no disc below it): the one "body" that shares its
            # lower end plate with the sacrum is S1 taken for a body, and the sacrum starts
            # at its top; one that touches it at a corner leaves the sacrum's count unclear
            contact = (
                _s1_contact(bodies[-1], sac_lab, k, classes, box, sacrum_top) if bodies else "apart"
            )
            if contact == "s1":
                sacrum_top = max(sacrum_top, bodies[-1].z_top)
                bodies.pop()
            elif contact == "unclear":
                sacrum_note = S1_UNCLEAR
    problem = None
    mids = np.array([b.z_mid for b in bodies])
    if len(bodies) >= 3:
        gaps = -np.diff(mids)
        med = float(np.median(gaps))
        if gaps.max() > MAX_GAP_FACTOR * med:
            problem = f"a vertebral body seems missed ({gaps.max():.0f} mm between two bodies)"
    for upper, lower in zip(bodies, bodies[1:], strict=False):
        if upper.partial or lower.partial:
            continue  # a body cut by the box or the scan's end often comes in pieces
        shared = min(upper.z_top, lower.z_top) - max(upper.z_bottom, lower.z_bottom)
        shorter = min(upper.z_top - upper.z_bottom, lower.z_top - lower.z_bottom)
        if shared > MAX_BODY_OVERLAP * shorter:
            problem = (
                f"a vertebral body seems split in two ({shared:.0f} mm of two bodies side by side)"
            )
    tall = [b for b in bodies if b.z_top - b.z_bottom > MAX_BODY_HEIGHT_MM]
    if tall:
        problem = (
            f"two vertebral bodies seem merged ({tall[0].z_top - tall[0].z_bottom:.0f} mm tall)"
        )
    last_rib = _last_rib_bearing(bodies)
    if last_rib is not None and last_rib + 1 < len(bodies):
        # the body below the last rib-bearing one bears ribs after all when a short rib's
        # head lies beside it on both sides: a thin twelfth rib whose shaft the network lost,
        # or a twelfth rib's head just above a top the network gave to the body above
        top = bodies[last_rib + 1].z_top - box.origin_mm[0]  # box index + 0.5
        lo = top - SHORT_RIB_HEAD_BELOW_TOP_MM - box.slice_spacing_mm
        hi = top + SHORT_RIB_HEAD_ABOVE_TOP_MM
        if len(_short_rib_sides(ribs, lo, hi)) == 2:
            bodies[last_rib + 1].rib_bearing = True
            last_rib += 1
    if problem is None and last_rib is not None:
        skipped = bodies[last_rib + 2 : last_rib + 2 + RIB_SKIP_BODIES]
        if any(b.rib_bearing for b in skipped):
            problem = (
                "a rib-bearing vertebra lies below one without ribs (a rib missed, or a "
                "transverse process taken for one)"
            )
    ribs_below = 0 if last_rib is None else sum(b.rib_bearing for b in bodies[last_rib + 1 :])
    if problem is None and ribs_below > MAX_RIBS_BELOW_RUN:
        problem = (
            "rib-bearing vertebrae go on below the run of ribs from the top (ribs missed "
            "over several vertebrae)"
        )
    l3_top = last_rib + 3 if last_rib is not None and last_rib + 3 < len(bodies) else None
    l3_bottom = None
    lumbar = None
    if sacrum_top is not None and sacrum_note is None and len(bodies) >= 3:
        l3_bottom = len(bodies) - 3
        if last_rib is not None:
            lumbar = len(bodies) - 1 - last_rib
        if sum(b.rib_bearing for b in bodies[l3_bottom:]) > MAX_RIBS_ABOVE_SACRUM:
            # not the sacrum (style B 7,000,148: a chest scan's lower end): no count from it
            l3_bottom = lumbar = None
    if problem is None and lumbar is not None and not LUMBAR_RANGE[0] <= lumbar <= LUMBAR_RANGE[1]:
        problem = (
            f"{lumbar} vertebrae without ribs above the sacrum (people have "
            f"{LUMBAR_RANGE[0]}-{LUMBAR_RANGE[1]}): a rib or a body missed, or the sacrum "
            "misplaced"
        )
    if problem is not None:
        l3_top = l3_bottom = lumbar = None
    return LevelCount(bodies, last_rib, sacrum_top, lumbar, l3_top, l3_bottom, problem, sacrum_note)


# --------------------------------------------------------------------------- the verdict


@dataclass
class LevelVerification:
    """What counting the vertebrae says about the located L3.

    Attributes
    ----------
    status : "confirmed" (the located slice lies in the counted L3 body), "corrected" (it
        lies elsewhere), "unverified" (no count could be made: ``reason`` says why), or
        "counted" (the locator said "not in the field of view" and counting found L3:
        :func:`find_by_counting`).
    z_mm : the L3 z (mm) to measure at: the counted L3 body's middle when confirmed,
        corrected or counted; the locator's when unverified.
    counted_by : "ribs" (from the last rib-bearing vertebra down, the convention), "sacrum"
        (from the sacrum up, when no rib-bearing vertebra is in view), or None.
    possible_transitional_anatomy : both counts were made and disagree (the number of
        non-rib-bearing vertebrae above the sacrum is not five).
    lumbar_counted : that number when both ends are seen, else None.
    l3_from_ribs_mm, l3_from_sacrum_mm : (bottom, top) z of L3 by each count, or None.
    locator_z_mm : the locator's answer (None for "counted": it had none).
    reason : why unverified, or a note (why the sacrum seen was not counted from:
        ``LevelCount.sacrum_note``); None otherwise.
    timings_s : seconds per step ("box", "segment", "count").
    """

    status: str
    z_mm: float
    counted_by: str | None = None
    possible_transitional_anatomy: bool = False
    lumbar_counted: int | None = None
    l3_from_ribs_mm: tuple[float, float] | None = None
    l3_from_sacrum_mm: tuple[float, float] | None = None
    locator_z_mm: float | None = None
    reason: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict (mm rounded to 0.1)."""
        d = asdict(self)
        for key in ("z_mm", "locator_z_mm"):
            d[key] = None if d[key] is None else round(float(d[key]), 1)
        for key in ("l3_from_ribs_mm", "l3_from_sacrum_mm"):
            if d[key] is not None:
                d[key] = [round(float(v), 1) for v in d[key]]
        d["timings_s"] = {k: round(v, 3) for k, v in self.timings_s.items()}
        return d


def counted_l3(count: LevelCount) -> tuple[int, str] | None:
    """Which body is L3 by the count, and by which count: ``(index in count.bodies, "ribs")``
    when a rib-bearing vertebra is in view (the convention: L1 is the first vertebra
    without ribs), else ``(index, "sacrum")``; None when neither count reaches L3 or the
    count is not trusted."""
    if count.problem is not None:
        return None
    if count.l3_from_ribs is not None:
        return count.l3_from_ribs, "ribs"
    if count.l3_from_sacrum is not None:
        return count.l3_from_sacrum, "sacrum"
    return None


def verify_level(count: LevelCount, locator_z_mm: float) -> LevelVerification:
    """Confirm, correct or leave the located L3 by the vertebral count.

    The count from the ribs decides when it exists (the convention: L1 is the first
    vertebra without ribs); the count from the sacrum when no rib-bearing vertebra is in
    view. The located z is confirmed when it lies between the mid-disc below and the mid-disc
    above the counted L3 body, otherwise corrected; either way the answer is that body's
    middle (the midpoint of its segmented end plates, the phantoms' truth and the real
    case's reference), which the segmentation finds closer than the locator's MIP rows
    (models/spine_fcn.md, eighth session).

    A count that would move the located z by more than :data:`MAX_CORRECTION_LEVELS`
    levels is not applied: the answer is "unverified" with the reason.

    Parameters
    ----------
    count : from :func:`count_levels`.
    locator_z_mm : the locator's L3 z (mm).

    Returns
    -------
    LevelVerification
    """
    ribs = count.l3_from_ribs
    sacrum = count.l3_from_sacrum
    b = count.bodies

    def extent(i: int | None) -> tuple[float, float] | None:
        return None if i is None else (b[i].z_bottom, b[i].z_top)

    common: dict[str, Any] = {
        "locator_z_mm": locator_z_mm,
        "lumbar_counted": count.lumbar_counted,
        "l3_from_ribs_mm": extent(ribs),
        "l3_from_sacrum_mm": extent(sacrum),
        "possible_transitional_anatomy": (
            count.lumbar_counted is not None and count.lumbar_counted != TYPICAL_LUMBAR
        ),
    }
    if count.problem is not None:
        return LevelVerification("unverified", locator_z_mm, reason=count.problem, **common)
    found = counted_l3(count)
    note = count.sacrum_note  # why the sacrum seen was not counted from, if it was not
    if found is None:
        return LevelVerification("unverified", locator_z_mm, reason=note or NO_COUNT, **common)
    chosen, by = found
    l3 = b[chosen]
    if l3.partial:
        reason = "the counted L3 body is cut by the end of the scan"
        return LevelVerification("unverified", locator_z_mm, reason=reason, **common)
    if _in_level(b, chosen, locator_z_mm):
        return LevelVerification("confirmed", l3.z_mid, counted_by=by, reason=note, **common)
    move, level = abs(l3.z_mid - locator_z_mm), _level_height(b, chosen)
    if move > MAX_CORRECTION_LEVELS * level:
        reason = (
            f"the count puts L3 {move:.0f} mm from the located slice, {move / level:.1f} "
            "levels: more than the locator's one-level miss, so the count is not trusted"
        )
        return LevelVerification("unverified", locator_z_mm, reason=reason, **common)
    return LevelVerification("corrected", l3.z_mid, counted_by=by, reason=note, **common)


#: A count that would move the located slice by more than this many levels (body + disc)
#: is not applied. The locator misses by one level (every right correction on style B
#: 7,000,400-599 moved it 32-42 mm); the three that moved it further (60, 66, 94 mm) were
#: all wrong: a missed or extra rib two levels away, not the locator's miss.
MAX_CORRECTION_LEVELS = 1.5

#: One lumbar level, body and disc (mm; ANATOMY.md: 35-42).
LUMBAR_LEVEL_MM = 38.0


def _level_height(bodies: list[Body], i: int) -> float:
    """The distance (mm) from the middle of body ``i`` to its counted neighbours' (their
    median); a typical lumbar level (:data:`LUMBAR_LEVEL_MM`) when it has none. Measured
    at L3, not over the whole box: thoracic levels are shorter (held-out box 9,500,004, a
    right one-level correction, was refused with the box's median)."""
    mids = [bodies[j].z_mid for j in (i - 1, i + 1) if 0 <= j < len(bodies)]
    if not mids:
        return LUMBAR_LEVEL_MM
    return float(np.median([abs(m - bodies[i].z_mid) for m in mids]))


def _in_level(bodies: list[Body], i: int, z_mm: float) -> bool:
    """``z_mm`` lies between the mid-disc below and the mid-disc above body ``i`` (the
    body's own end plate where no neighbour is counted)."""
    body = bodies[i]
    above = bodies[i - 1].z_bottom if i > 0 else body.z_top
    below = bodies[i + 1].z_top if i + 1 < len(bodies) else body.z_bottom
    return 0.5 * (body.z_bottom + below) <= z_mm <= 0.5 * (body.z_top + above)


#: Least distance (mm) from the located L3 to either end of the box along z: L3 and the
#: vertebra on each side of it stay inside when the box is moved into the scan.
BOX_ANSWER_MARGIN_MM = 64.0


def box_centre_z(locator_z_mm: float, z_first_mm: float, z_last_mm: float) -> float:
    """z (mm) of the box's centre for a located L3 in a scan from ``z_first_mm`` to
    ``z_last_mm``.

    The box is centred on the answer unless a scan end cuts it: then it moves into the scan
    (a short scan: onto the scan's middle) so that it shows as much of the scan as it can,
    as far as the answer stays :data:`BOX_ANSWER_MARGIN_MM` inside it. A locator answer one
    vertebra too high near the top of the scan thus still sees the sacrum below.
    """
    half = BOX_SHAPE[0] / 2
    if z_last_mm - z_first_mm <= 2 * half:
        ideal = 0.5 * (z_first_mm + z_last_mm)
    else:
        ideal = min(max(locator_z_mm, z_first_mm + half), z_last_mm - half)
    reach = half - BOX_ANSWER_MARGIN_MM
    return float(min(max(ideal, locator_z_mm - reach), locator_z_mm + reach))


def box_at_level(
    hu: np.ndarray,
    z_mm: np.ndarray,
    spacing_mm: tuple[float, float],
    locator_z_mm: float,
    *,
    shift_yx_mm: tuple[float, float] = (0.0, 0.0),
) -> SpineBox:
    """The verification box of one located L3, placed as at run time (the one rule).

    The column centre is estimated over the located slice +-40 mm (:func:`column_centre`),
    the box's z centre is the answer moved into the scan (:func:`box_centre_z`), and the box
    is resampled there (:func:`extract_box`).

    Parameters
    ----------
    hu : (z, y, x) HU, canonical grid; z_mm : (z,) ascending (mm); spacing_mm : (row, col).
    locator_z_mm : the locator's L3 z (mm).
    shift_yx_mm : added to the estimated (y, x) centre (mm); training data uses it to move
        the box as far as the estimate errs on patients. Zero at run time.

    Returns
    -------
    SpineBox

    Raises
    ------
    VerificationError
        No column, an ambiguous column, or a box wholly outside the image.
    """
    cy, cx = column_centre(hu, z_mm, spacing_mm, locator_z_mm - 40.0, locator_z_mm + 40.0)
    zc = box_centre_z(locator_z_mm, float(z_mm[0]), float(z_mm[-1]))
    return extract_box(hu, z_mm, spacing_mm, zc, (cy + shift_yx_mm[0], cx + shift_yx_mm[1]))


#: The segmented column's centre may lie this far (mm) to the side of the box's axis before
#: the box is moved sideways onto it (:func:`segment_on_column`): the network was trained
#: on boxes up to 6 mm to the side of the body's centre (``worker.phantom.spine_box``), and
#: further off, the far side's rib heads lie beyond :data:`RIB_HEAD_REACH_MM` of the axis and
#: the body may be cut by the box's side (style-B validation 7,000,206 and 7,000,232: the
#: column estimate took a bone beside the spine, the box 40-50 mm off; 7,000,213 and
#: 7,000,285: 18 mm off, T12's ribs missed once the "bodies" beside the column were set
#: aside). Only sideways: the box reaches 68 mm behind its axis, and moving it onto the
#: column antero-posteriorly as well (10-23 mm) changed 4 of 128 validation answers
#: (7,000,200-327), turning 7,000,301's right correction into a confirmation a level off.
RECENTRE_MM = 10.0


def column_offset(classes: np.ndarray) -> tuple[float, float] | None:
    """(y, x) in mm from the box's axis (the estimated body centre the box was placed on:
    y :data:`BOX_ANTERIOR_MM` behind its front, x its middle) to the segmented column's
    centre (the voxel-weighted centre of :func:`_column`'s bodies), or None when no body
    is segmented.

    ``classes`` : (z, y, x) uint8 from :func:`segment_box`, 1 mm voxels.
    """
    column = _column(_body_extents(classes == BODY))
    if not column:
        return None
    w = np.array([e.voxels for e in column], dtype=float)
    cy, cx = (np.array([e.centre_yx for e in column]) * w[:, None]).sum(axis=0) / w.sum()
    return float(cy - (BOX_ANTERIOR_MM - 0.5)), float(cx - (classes.shape[2] / 2 - 0.5))


def segment_on_column(
    net: SpineFCN,
    hu: np.ndarray,
    z_mm: np.ndarray,
    spacing_mm: tuple[float, float],
    box: SpineBox,
) -> tuple[SpineBox, np.ndarray]:
    """Segment ``box``; where the segmented column lies more than :data:`RECENTRE_MM` to the
    side of the box's axis (:func:`column_offset`), resample the box moved sideways onto it
    and segment that instead (once: the second placement is not checked again).

    Parameters
    ----------
    net : the trained network; hu : (z, y, x) HU, canonical grid; z_mm : (z,) ascending
    (mm); spacing_mm : (row, col) (mm); box : from :func:`extract_box` on the same volume.

    Returns
    -------
    (box, classes) : the box segmented and its (z, y, x) uint8 classes.
    """
    classes = segment_box(net, box)
    off = column_offset(classes)
    if off is None or abs(off[1]) <= RECENTRE_MM:
        return box, classes
    cy, cx = box.centre_yx_mm
    moved = extract_box(hu, z_mm, spacing_mm, box.z_centre_mm, (cy, cx + off[1]))
    return moved, segment_box(net, moved)


def verify_in_volume(
    net: SpineFCN,
    hu: np.ndarray,
    z_mm: np.ndarray,
    spacing_mm: tuple[float, float],
    locator_z_mm: float,
) -> LevelVerification:
    """The whole verification of one located L3: box, segmentation, count, verdict.

    The box is centred on the located slice (:func:`box_at_level`). Where its count reaches
    L3 from one end only and the scan holds the other, a second box past the counted L3
    looks for it (:func:`_second_box_centre`), and its count is used where it adds that end
    (:func:`_fuller_count`); ``timings_s["second_box"]`` then gives its seconds.

    Parameters
    ----------
    net : the trained network (:func:`load_spine_model`).
    hu : (z, y, x) HU, canonical grid; z_mm : (z,) ascending (mm); spacing_mm : (row, col).
    locator_z_mm : the locator's L3 z (mm).

    Returns
    -------
    LevelVerification
        "unverified" with the reason when no vertebra is found near the located slice.
    """
    t0 = time.perf_counter()
    try:
        box = box_at_level(hu, z_mm, spacing_mm, locator_z_mm)
    except VerificationError as exc:
        return LevelVerification(
            "unverified", locator_z_mm, locator_z_mm=locator_z_mm, reason=str(exc)
        )
    t1 = time.perf_counter()
    box, classes = segment_on_column(net, hu, z_mm, spacing_mm, box)
    t2 = time.perf_counter()
    count = count_levels(classes, box)
    t3 = time.perf_counter()
    timings = {"box": t1 - t0, "segment": t2 - t1, "count": t3 - t2}
    second = _second_box_centre(count, box, float(z_mm[0]), float(z_mm[-1]))
    if second is not None:
        try:
            box2 = box_at_level(hu, z_mm, spacing_mm, second)
            box2, classes2 = segment_on_column(net, hu, z_mm, spacing_mm, box2)
            count = _fuller_count(count, count_levels(classes2, box2))
        except VerificationError:
            pass  # the first box's count stands
        timings["second_box"] = time.perf_counter() - t3
    result = verify_level(count, locator_z_mm)
    result.timings_s = timings
    return result


#: How far (mm) past the counted L3 the second box is centred, toward the end not seen in
#: the first (:func:`_second_box_centre`): the far end of a six-vertebra lumbar spine lies
#: about 155 mm below mid-L3 (three levels of 37 mm, half L3, 30 mm of S1), beyond the half
#: box (152 mm); the seen end (the last rib about 105 mm above mid-L3) stays inside.
SECOND_BOX_SHIFT_MM = 40.0

#: The scan must reach this far (mm) beyond the first box's end for a second box to be
#: worth its 3-D segmentation.
SECOND_BOX_MIN_MORE_MM = 20.0


def _second_box_centre(
    count: LevelCount, box: SpineBox, z_first_mm: float, z_last_mm: float
) -> float | None:
    """Where to centre a second box (z, mm), or None when none is needed.

    Transitional anatomy shows only when the vertebrae are counted from both ends
    (ANATOMY.md). The first box is centred on the locator's answer, which on style B is most
    often a level too high; with a sixth lumbar vertebra the sacrum then lies below the box
    although the scan holds it (style "bt" validation 7,500,019 and 7,500,044). When the
    first count is trusted and reaches L3 from one end only, the other end (the sacrum, or
    the last rib-bearing vertebra) was not seen at all, and the scan goes on
    :data:`SECOND_BOX_MIN_MORE_MM` beyond the box on that side, the second box is centred
    :data:`SECOND_BOX_SHIFT_MM` past the counted L3 toward it.
    """
    found = counted_l3(count)
    if found is None or count.lumbar_counted is not None:
        return None
    l3 = count.bodies[found[0]]
    lo, hi = box.z_of(-0.5), box.z_of(BOX_SHAPE[0] - 0.5)
    below = found[1] == "ribs" and count.sacrum_top_mm is None
    above = found[1] == "sacrum" and count.last_rib is None
    if below and z_first_mm < lo - SECOND_BOX_MIN_MORE_MM:
        return l3.z_mid - SECOND_BOX_SHIFT_MM
    if above and z_last_mm > hi + SECOND_BOX_MIN_MORE_MM:
        return l3.z_mid + SECOND_BOX_SHIFT_MM
    return None


def _fuller_count(first: LevelCount, second: LevelCount) -> LevelCount:
    """The second box's count where it adds the end the first lacked, else the first.

    Taken when it is trusted and counts from both ends (``lumbar_counted``), and, where the
    first counted from the ribs, its count from the ribs finds the same L3 body (mid-bodies
    within :data:`SAME_BODY_MM`): the second box then only adds the count from the sacrum,
    never moves the level by a rib seen differently. Where the first counted from the sacrum,
    the second's count from the ribs decides (the convention), with the transitional flag
    where the two counts disagree.
    """
    if second.problem is not None or second.lumbar_counted is None:
        return first
    if first.l3_from_ribs is not None:
        if second.l3_from_ribs is None:
            return first
        a = first.bodies[first.l3_from_ribs].z_mid
        b = second.bodies[second.l3_from_ribs].z_mid
        if abs(a - b) > SAME_BODY_MM:
            return first
    return second


#: Two bodies found in two boxes are the same when their middles lie this close (mm): under
#: half a lumbar level (:data:`LUMBAR_LEVEL_MM`).
SAME_BODY_MM = 15.0


def find_by_counting(
    net: SpineFCN,
    hu: np.ndarray,
    z_mm: np.ndarray,
    spacing_mm: tuple[float, float],
) -> LevelVerification | None:
    """Look for L3 by counting vertebrae over a scan the locator said does not hold it.

    A radiologist calls L3 present when they can count to it, from the sacrum or from the
    last rib-bearing vertebra (issue 15): a lumbar-spine window or an abdomen scan without
    the lower ribs holds L3 although its frontal MIP may lack the cues the locator learned.
    Boxes (:data:`BOX_SHAPE`) are placed along the scan (one centred on it when it is
    shorter than the box, else from its bottom to its top, overlapping by a quarter); a box
    whose trusted count reaches a whole L3 body gives that body's middle, and all such boxes
    must agree within 15 mm (under half a level).

    Parameters
    ----------
    net : the trained network; hu : (z, y, x) HU; z_mm : (z,) ascending (mm);
    spacing_mm : (row, col) pixel spacing (mm).

    Returns
    -------
    LevelVerification with status "counted" (``z_mm`` the counted mid-L3, ``locator_z_mm``
    None), or None when no box reaches L3 (not countable: "not in field of view" stands).
    """
    t0 = time.perf_counter()
    length = float(z_mm[-1] - z_mm[0])
    half = BOX_SHAPE[0] / 2
    if length <= BOX_SHAPE[0] - 8:
        centres = [0.5 * float(z_mm[0] + z_mm[-1])]
    else:
        n = int(np.ceil((length - BOX_SHAPE[0]) / (0.75 * BOX_SHAPE[0]))) + 1
        centres = [float(c) for c in np.linspace(z_mm[0] + half - 4, z_mm[-1] - half + 4, n)]
    answers: list[tuple[float, str, LevelCount]] = []
    for zc in centres:
        try:
            centre = column_centre(hu, z_mm, spacing_mm, zc - 60.0, zc + 60.0)
            box = extract_box(hu, z_mm, spacing_mm, zc, centre)
        except VerificationError:
            continue
        box, classes = segment_on_column(net, hu, z_mm, spacing_mm, box)
        count = count_levels(classes, box)
        found = counted_l3(count)
        if found is None or count.bodies[found[0]].partial:
            continue
        answers.append((count.bodies[found[0]].z_mid, found[1], count))
    if not answers:
        return None
    zs = np.array([a[0] for a in answers])
    if zs.max() - zs.min() > 15.0:
        return None
    _, by, count = answers[0]
    return LevelVerification(
        "counted",
        float(np.median(zs)),
        counted_by=by,
        possible_transitional_anatomy=(
            count.lumbar_counted is not None and count.lumbar_counted != TYPICAL_LUMBAR
        ),
        lumbar_counted=count.lumbar_counted,
        reason=count.sacrum_note,
        timings_s={"count_scan": time.perf_counter() - t0},
    )
