"""Training of the body-composition U-Net (:mod:`worker.composition.unet`).

Training slices come from phantoms (``worker.phantom``, exact masks; synthetic L3 slices of
:mod:`research.evaluate_composition` when the phantom module is absent) and from a site's own
masks: NIfTI label maps (values of :mod:`core.labels`) beside their CT, or DICOM SEG objects
(PS3.3 A.51) referencing a CT series (:func:`seg_training_slices`). Every slice is
resampled to ``pixel_mm`` (1 mm^2 in the seed), clipped to the HU window and scaled to [0, 1];
the loss is the soft Dice loss (seed "Abdominal musculature segmentation and surface
prediction from CT").
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.config import CompositionConfig
from core.errors import L3SpotError
from core.labels import IMAT, SAT, SMA, VAT
from core.logs import log_event
from worker.composition.unet import UNet2D, dice_loss, normalise_hu, resample_slice, save_model
from worker.volume.load import CTVolume

logger = logging.getLogger(__name__)


@dataclass
class TrainingSlice:
    """One (y, x) HU slice and its label map (source grid) with spacing (dy, dx) mm."""

    name: str
    hu: np.ndarray
    labels: np.ndarray
    spacing_mm: tuple[float, float]


def phantom_slices(n: int, seed: int, neighbours: int = 0) -> list[TrainingSlice]:
    """L3 slices (and ``neighbours`` slices either side) of ``n`` phantoms from ``seed``."""
    from worker.phantom import PhantomSpec, generate_phantom

    out = []
    for i in range(n):
        ph = generate_phantom(seed + i, PhantomSpec(fov="abdomen", slice_thickness_mm=5.0))
        k0 = int(ph.truth.l3_mid_slice_index)
        sp = tuple(float(v) for v in ph.volume.pixel_spacing_mm)
        for k in range(k0 - neighbours, k0 + neighbours + 1):
            if 0 <= k < ph.volume.hu.shape[0]:
                # copies: a view would keep the whole phantom volume alive
                hu, lab_k = np.array(ph.volume.hu[k]), np.array(ph.labels[k])
                out.append(TrainingSlice(f"phantom{seed + i}_z{k}", hu, lab_k, sp))
    return out


class SegInputError(L3SpotError, ValueError):
    """A DICOM SEG cannot be turned into training slices for the CT series given with it.

    Parameters
    ----------
    sop_instance_uid : SOP Instance UID of the SEG.
    reason : what is wrong (e.g. "references series X, not the CT series Y").
    """

    def __init__(self, sop_instance_uid: str, reason: str) -> None:
        self.sop_instance_uid = sop_instance_uid
        self.reason = reason
        super().__init__(f"SEG {sop_instance_uid or '<no SOP Instance UID>'}: {reason}")


#: Segmented Property Type (SCT code value) -> label, for the codes l3spot writes
#: (:data:`worker.outputs.codes.COMPARTMENT_CODES`). SCT 55603005 "Adipose tissue" is IMAT
#: only with Anatomic Region SCT 127954009 "Skeletal muscle" (how l3spot codes IMAT).
SEG_TYPE_CODES: dict[str, int] = {"127954009": SMA, "725274000": VAT, "67769002": SAT}
#: Segment Labels (case-insensitive, spaces/underscores/hyphens ignored) accepted when the
#: codes do not decide: l3spot's own names and the usual abbreviations.
SEG_LABEL_NAMES: dict[str, int] = {
    "skeletalmuscle": SMA,
    "sma": SMA,
    "muscle": SMA,
    "intermuscularadiposetissue": IMAT,
    "intramuscularadiposetissue": IMAT,
    "imat": IMAT,
    "visceraladiposetissue": VAT,
    "visceralfat": VAT,
    "vat": VAT,
    "subcutaneousadiposetissue": SAT,
    "subcutaneousfat": SAT,
    "sat": SAT,
}


def seg_segment_labels(seg: object) -> dict[int, int]:
    """Map the segments of a SEG to compartment labels of :mod:`core.labels`.

    Parameters
    ----------
    seg : ``highdicom.seg.Segmentation``.

    Returns
    -------
    dict
        segment number -> label (SMA 1, IMAT 2, VAT 3, SAT 4); segments that match neither a
        code of :data:`SEG_TYPE_CODES` (SCT 55603005 with anatomic region SCT 127954009 = IMAT)
        nor a name of :data:`SEG_LABEL_NAMES` are left out.
    """
    out: dict[int, int] = {}
    for desc in seg.SegmentSequence:  # type: ignore[attr-defined]
        number = int(desc.SegmentNumber)
        typ = desc.SegmentedPropertyTypeCodeSequence[0]
        code = str(typ.CodeValue) if typ.CodingSchemeDesignator in ("SCT", "SRT") else ""
        regions = [str(r.CodeValue) for r in getattr(desc, "AnatomicRegionSequence", None) or []]
        label = None
        if code in SEG_TYPE_CODES:
            label = SEG_TYPE_CODES[code]
        elif code == "55603005" and "127954009" in regions:
            label = IMAT
        else:
            key = "".join(c for c in str(desc.SegmentLabel).lower() if c.isalnum())
            label = SEG_LABEL_NAMES.get(key)
        if label is not None:
            out[number] = label
    return out


def seg_training_slices(seg_path: Path, volume: CTVolume) -> list[TrainingSlice]:
    """Training slices from a DICOM SEG of the body-composition compartments.

    Parameters
    ----------
    seg_path : a Segmentation Storage file (PS3.3 A.51), BINARY or FRACTIONAL, on the pixel
        grid of single-frame CT images of ``volume`` (as l3spot's own SEG,
        :func:`worker.outputs.seg.build_seg`, and dcmqi/highdicom SEGs are).
    volume : the CT series the SEG references, loaded by :func:`worker.volume.load.load_series`
        (its ``sop_instance_uids`` map the SEG's source images to slices).

    Returns
    -------
    list of TrainingSlice
        One per CT slice the SEG references: the (y, x) HU slice and a (y, x) uint8 label map
        (0 background, 1 SMA, 2 IMAT, 3 VAT, 4 SAT) on the same grid, spacing (dy, dx) mm.
        Segments are matched by :func:`seg_segment_labels`; a pixel in several segments takes
        the first of SMA, IMAT, VAT, SAT; FRACTIONAL values count from 0.5.

    Raises
    ------
    SegInputError
        The file is not a SEG; it references another series than ``volume`` (or an image not
        in it); it has no segment l3spot knows; its frames are not on the source image grid.
    """
    import highdicom as hd
    import pydicom

    ds = pydicom.dcmread(seg_path)
    uid = str(getattr(ds, "SOPInstanceUID", ""))
    if str(getattr(ds, "SOPClassUID", "")) != "1.2.840.10008.5.1.4.1.1.66.4":
        raise SegInputError(uid, f"{seg_path} is not a Segmentation Storage object")
    seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    refs = seg.get_source_image_uids()  # (study, series, SOP instance)
    series = {str(s) for _, s, _ in refs}
    if series != {volume.series_instance_uid}:
        raise SegInputError(
            uid,
            f"references series {sorted(series)}, not the CT series "
            f"{volume.series_instance_uid or '<none>'} given with it",
        )
    index = {u: k for k, u in enumerate(volume.sop_instance_uids)}
    sources = [str(i) for _, _, i in refs]
    missing = [u for u in sources if u not in index]
    if missing:
        raise SegInputError(uid, f"references images not in the CT series: {missing[:3]}")
    mapping = seg_segment_labels(seg)
    if not mapping:
        names = [str(d.SegmentLabel) for d in seg.SegmentSequence]
        raise SegInputError(uid, f"no SMA/IMAT/VAT/SAT segment among {names}")
    stored_shape = volume.in_plane.to_source(volume.hu[0]).shape  # the CT's stored grid
    if (int(ds.Rows), int(ds.Columns)) != stored_shape:
        raise SegInputError(
            uid, f"frames {ds.Rows} x {ds.Columns} are not on the CT grid {stored_shape}"
        )
    numbers = sorted(mapping, key=lambda n: (mapping[n], n))
    px = seg.get_pixels_by_source_instance(
        sources, segment_numbers=numbers, assert_missing_frames_are_empty=False
    )  # (instances, rows, cols, segments)
    out = []
    for i, sop in enumerate(sources):
        stored = np.zeros(stored_shape, np.uint8)
        for j in reversed(range(len(numbers))):  # the first in SMA..SAT order wins
            stored[px[i, ..., j] >= 0.5] = mapping[numbers[j]]
        lab_ = np.ascontiguousarray(volume.in_plane.to_canonical(stored))  # on volume.hu's grid
        k = index[sop]
        out.append(
            TrainingSlice(
                f"{Path(seg_path).name}_z{k}",
                np.array(volume.hu[k]),
                lab_,
                volume.pixel_spacing_mm,
            )
        )
    return out


def site_slices(csv_path: Path) -> list[TrainingSlice]:
    """Slices from a site CSV with columns ``ct,labels[,slice]``.

    ``labels`` is either a NIfTI label map (values of :mod:`core.labels` on the grid of the
    NIfTI CT in ``ct``, RAS) or a DICOM SEG file (``.dcm`` or any file starting with the DICM
    preamble) whose source images are the DICOM series folder in ``ct``
    (:func:`seg_training_slices`). Without ``slice`` every slice with any label (NIfTI) or
    every slice the SEG references is used; with it, only that slice (index in ascending z).
    Relative paths are relative to the CSV.

    Raises
    ------
    ValueError
        A NIfTI label map's shape differs from its CT.
    SegInputError
        See :func:`seg_training_slices`.
    """
    from worker.volume.load import load_nifti, load_series

    out = []
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            ct = (csv_path.parent / row["ct"]).resolve()
            lab_path = (csv_path.parent / row["labels"]).resolve()
            if _is_dicom(lab_path):
                got = seg_training_slices(lab_path, load_series(ct))
                if row.get("slice"):
                    got = [s for s in got if s.name.endswith(f"_z{int(row['slice'])}")]
                out += got
                continue
            vol = load_nifti(ct, min_slices=1)  # values as stored; short crops allowed
            lab_ = np.rint(load_nifti(lab_path, min_slices=1, check_hu=False).hu).astype(np.uint8)
            if lab_.shape != vol.hu.shape:
                raise ValueError(f"{row['labels']}: shape {lab_.shape} != CT {vol.hu.shape}")
            ks = [int(row["slice"])] if row.get("slice") else np.flatnonzero(lab_.any((1, 2)))
            for k in ks:
                out.append(
                    TrainingSlice(f"{ct.name}_z{k}", vol.hu[k], lab_[k], vol.pixel_spacing_mm)
                )
    return out


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _prepare(s: TrainingSlice, config: CompositionConfig) -> tuple[np.ndarray, np.ndarray]:
    img = resample_slice(s.hu.astype(np.float32), s.spacing_mm, config.unet_pixel_mm, order=1)
    lab_ = resample_slice(s.labels.astype(np.uint8), s.spacing_mm, config.unet_pixel_mm, order=0)
    return normalise_hu(img, config.unet_hu_window), lab_.astype(np.int64)


def _batches(
    data: list[tuple[np.ndarray, np.ndarray]], batch: int, crop: int, rng: np.random.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        xs, ys = [], []
        for i in rng.integers(0, len(data), batch):
            x, y = data[int(i)]
            # pad then random crop of crop x crop pixels (augmentation: position, flip)
            ph, pw = max(crop - x.shape[0], 0), max(crop - x.shape[1], 0)
            x = np.pad(x, ((0, ph), (0, pw)))
            y = np.pad(y, ((0, ph), (0, pw)))
            oy = int(rng.integers(0, x.shape[0] - crop + 1))
            ox = int(rng.integers(0, x.shape[1] - crop + 1))
            x, y = x[oy : oy + crop, ox : ox + crop], y[oy : oy + crop, ox : ox + crop]
            if rng.random() < 0.5:
                x, y = x[:, ::-1], y[:, ::-1]
            xs.append(np.ascontiguousarray(x))
            ys.append(np.ascontiguousarray(y))
        yield torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys))


def train_unet(
    slices: list[TrainingSlice],
    config: CompositionConfig,
    *,
    steps: int,
    batch: int = 4,
    crop: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    levels: int = 4,
    base: int = 18,
    device: str = "cpu",
    max_seconds: float | None = None,
) -> tuple[UNet2D, list[float]]:
    """Train one U-Net with Adam and the Dice loss.

    Parameters
    ----------
    slices : training slices (any pixel spacing; resampled to ``config.unet_pixel_mm``).
    steps : optimiser steps; batch : slices per step; crop : square crop (pixels at 1 mm),
        a multiple of 2^(levels-1).
    max_seconds : wall-time budget; training stops after the step that exceeds it (the
        number of steps done is ``len(losses)``). None = no limit.

    Returns
    -------
    (model in eval mode, loss per step).
    """
    if not slices:
        raise ValueError("no training slices")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = [_prepare(s, config) for s in slices]
    model = UNet2D(levels, base).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step, (x, y) in zip(range(steps), _batches(data, batch, crop, rng), strict=False):
        opt.zero_grad()
        loss = dice_loss(model(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
        elapsed = time.perf_counter() - t0
        if step % 20 == 0:
            log_event(
                logger,
                "seg_train_step",
                step=step,
                loss=round(losses[-1], 4),
                seconds=round(elapsed, 1),
            )
        if max_seconds is not None and elapsed > max_seconds:
            break
    return model.eval(), losses


def save_trained(model: UNet2D, path: Path, record: dict) -> None:
    """Write ``path`` (weights) and ``path.with_suffix('.json')`` (the training record)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path, record)
    path.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
