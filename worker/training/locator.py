"""Training the L3 locator from frontal MIPs annotated with one L3 row per scan.

Belharbi et al. 2017, section 3.2: windows of height H holding L3 within ``[-a, +a]`` of
their centre, target = the L3 offset inside the window, shuffled across scans, folds split
by patient. l3spot adds a "L3 near the window centre" head trained on L3-containing and
L3-free windows (the not-in-field-of-view decision), and augmentation (z scale, lateral
shift and flip, contrast, noise) because the default training data are phantoms.

Data sources, all turned into :class:`MipCase` (a frontal MIP in HU at the model's pixel
size and the L3 row, or None when L3 is outside the scan):

* phantoms generated on the fly (:func:`phantom_cases`, cached as ``.npz``),
* a folder of such ``.npz`` files (:func:`load_case_folder`),
* a site's CSV ``series_path,l3_slice_index`` (:func:`csv_cases`).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.atomic import write_npz_atomically
from worker.locator.decision import decide_l3
from worker.locator.model import build_model, load_pretrained_backbone, prepare_input
from worker.locator.weights import LoadedLocator, save_locator
from worker.locator.windows import WindowSpec, mip_to_strip, sliding_windows
from worker.mip import Mip, frontal_mip
from worker.volume.load import CTVolume


@dataclass
class MipCase:
    """One training/validation scan.

    Attributes
    ----------
    name : identifier (phantom seed or series path).
    group : patient key; train/validation folds never share a group.
    image_hu : (rows, cols) float32 frontal MIP in HU, row 0 = most superior.
    pixel_mm : MIP pixel size (mm).
    l3_row : fractional MIP row of mid-L3, or None when L3 is not in the field of view.
    slice_mm : median slice spacing of the source series (mm), to express errors in slices.
    landmark_rows : fractional MIP rows of the levels a field-of-view crop is drawn between
        and a radiologist counts from (:data:`LANDMARKS`: mid-T10, mid of the last
        rib-bearing vertebra, mid-L2, mid-L4, the top end plate of S1); empty when unknown
        (a site's scan), and then the case is never cropped.
    """

    name: str
    group: str
    image_hu: np.ndarray
    pixel_mm: float
    l3_row: float | None
    slice_mm: float = 1.0
    strip: np.ndarray | None = field(default=None, repr=False)
    landmark_rows: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------ data sources


def case_from_volume(
    volume: CTVolume, l3_z_mm: float | None, pixel_mm: float, name: str, group: str
) -> MipCase:
    """Frontal MIP of a volume plus its L3 row (None = L3 not in the field of view)."""
    mip = frontal_mip(volume, pixel_mm=pixel_mm)
    row = None if l3_z_mm is None else float(mip.z_to_row(l3_z_mm))
    return MipCase(name, group, mip.image, pixel_mm, row, volume.slice_spacing_mm)


def save_case(case: MipCase, path: Path) -> None:
    """Write a case as ``.npz`` (HU as int16; l3_row NaN when not in the field of view)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "image_hu": np.clip(np.round(case.image_hu), -32768, 32767).astype(np.int16),
        "pixel_mm": np.asarray(case.pixel_mm),
        "l3_row": np.asarray(np.nan if case.l3_row is None else case.l3_row),
        "slice_mm": np.asarray(case.slice_mm),
        "name": np.asarray(case.name),
        "group": np.asarray(case.group),
        "landmark_names": np.array(sorted(case.landmark_rows), dtype=str),
        "landmark_rows": np.array([case.landmark_rows[k] for k in sorted(case.landmark_rows)]),
    }
    write_npz_atomically(path, arrays)


def load_case(path: Path) -> MipCase:
    """Read a case written by :func:`save_case`."""
    with np.load(path) as z:
        row = float(z["l3_row"])
        marks = (
            dict(
                zip(
                    (str(n) for n in z["landmark_names"]),
                    map(float, z["landmark_rows"]),
                    strict=True,
                )
            )
            if "landmark_names" in z
            else {}
        )
        return MipCase(
            name=str(z["name"]),
            group=str(z["group"]),
            image_hu=z["image_hu"].astype(np.float32),
            pixel_mm=float(z["pixel_mm"]),
            l3_row=None if math.isnan(row) else row,
            slice_mm=float(z["slice_mm"]),
            landmark_rows=marks,
        )


def load_case_folder(folder: Path, pixel_mm: float) -> list[MipCase]:
    """All ``*.npz`` cases of a folder; raises ValueError on a pixel-size mismatch."""
    cases = [load_case(p) for p in sorted(Path(folder).glob("*.npz")) if ".tmp" not in p.name]
    for c in cases:
        if abs(c.pixel_mm - pixel_mm) > 1e-6:
            raise ValueError(f"{c.name}: MIP pixel {c.pixel_mm} mm, model needs {pixel_mm} mm")
    return cases


#: Slice thicknesses (mm) of the training phantoms (the coarser half of the generator's range
#: keeps generation fast; the MIP is resampled to 2 mm pixels anyway).
TRAIN_THICKNESSES = (1.25, 2.0, 2.5, 3.0, 5.0)

#: In-plane pixel of the (low-resolution) phantoms; the MIP is resampled to ``pixel_mm``.
PHANTOM_PIXEL_MM = 2.5


def phantom_spec(seed: int, training: bool = True, spine_variation: bool = False) -> Any:
    """Low-resolution :class:`worker.phantom.PhantomSpec` for ``seed``.

    The field of view in z is the generator's random type (chest, abdomen, pelvis, ...);
    the in-plane field of view is drawn in 340-500 mm (2.5 mm pixels) so that wide patients
    touch the image edge, as in real CT; training draws the slice thickness from
    :data:`TRAIN_THICKNESSES`, evaluation (``training=False``) leaves it to the generator
    (0.625-5 mm). ``spine_variation`` varies the vertebral column and the lowest ribs
    (:mod:`worker.phantom.variation`; domain randomisation, issue 15).
    """
    from worker.phantom import PhantomSpec

    rng = np.random.default_rng([seed, 0x13])
    n = int(round(rng.uniform(340.0, 500.0) / PHANTOM_PIXEL_MM))
    thk = float(rng.choice(TRAIN_THICKNESSES)) if training else None
    return PhantomSpec(
        rows=n,
        cols=n,
        pixel_spacing_mm=PHANTOM_PIXEL_MM,
        slice_thickness_mm=thk,
        with_labels=False,
        spine_variation=spine_variation,
    )


def phantom_volume(seed: int, training: bool = False) -> tuple[CTVolume, float | None]:
    """The phantom volume of ``seed`` (spec :func:`phantom_spec`) and its mid-L3 z (mm) or
    None when L3 is outside its field of view (``worker.phantom`` ground truth)."""
    from worker.phantom import generate_phantom

    p = generate_phantom(seed, phantom_spec(seed, training))
    z = float(p.truth.l3_mid_z_mm) if p.truth.l3_in_fov else None
    return p.volume, z


def phantom_mip(seed: int, pixel_mm: float, training: bool = True) -> tuple[Mip, float | None]:
    """Frontal MIP of the phantom of ``seed`` (fast path, no volume) and mid-L3 z or None."""
    mips, z = phantom_mips(seed, (pixel_mm,), training)
    return mips[0], z


def phantom_mips(
    seed: int, pixel_mms: tuple[float, ...], training: bool = True
) -> tuple[list[Mip], float | None]:
    """Frontal MIPs of the phantom of ``seed`` at several pixel sizes (rendered once, for
    the two-stage locator) and mid-L3 z or None."""
    from worker.phantom import generate_phantom_mips

    pms = generate_phantom_mips(seed, phantom_spec(seed, training), pixel_mms)
    z = float(pms[0].truth.l3_mid_z_mm) if pms[0].truth.l3_in_fov else None
    return [pm.mip for pm in pms], z


#: The levels of :attr:`MipCase.landmark_rows` (field-of-view crops, issue 15).
LANDMARKS = ("T10", "last_rib", "L2", "L4", "S1_top")


def landmark_z_mm(vertebrae_z_mm: dict[str, tuple[float, float]]) -> dict[str, float]:
    """z (mm) of the :data:`LANDMARKS` from a phantom's vertebra table (bottom, top per name).

    The last rib-bearing vertebra is the lowest ``T`` (its number is the rib pairs'); with
    11 or 13 rib pairs it is T11 or T13, and L2/L4 are counted below it as radiologists do
    (ANATOMY.md). Levels the phantom lacks are left out.
    """
    mid = {k: 0.5 * (a + b) for k, (a, b) in vertebrae_z_mm.items()}
    thoracic = [k for k in mid if k.startswith("T") and k[1:].isdigit()]
    out: dict[str, float] = {}
    if "T10" in mid:
        out["T10"] = mid["T10"]
    if thoracic:
        out["last_rib"] = mid[max(thoracic, key=lambda k: int(k[1:]))]
    for k in ("L2", "L4"):
        if k in mid:
            out[k] = mid[k]
    if "S1" in vertebrae_z_mm:
        out["S1_top"] = float(vertebrae_z_mm["S1"][1])
    return out


def phantom_case(seed: int, pixel_mm: float, spine_variation: bool = False) -> MipCase:
    """Training case of the phantom of ``seed`` (see :func:`phantom_mip`), with the rows of
    its :data:`LANDMARKS` for field-of-view crops; ``spine_variation`` as in
    :func:`phantom_spec`."""
    from worker.phantom import generate_phantom_mips

    spec = phantom_spec(seed, True, spine_variation)
    (pm,) = generate_phantom_mips(seed, spec, (pixel_mm,))
    mip, truth = pm.mip, pm.truth
    row = float(mip.z_to_row(truth.l3_mid_z_mm)) if truth.l3_in_fov else None
    sz = mip.slice_z_mm
    slice_mm = float(np.median(np.diff(sz))) if len(sz) > 1 else 1.0
    marks = {k: float(mip.z_to_row(z)) for k, z in landmark_z_mm(truth.vertebrae_z_mm).items()}
    return MipCase(
        f"phantom-{seed}", f"phantom-{seed}", mip.image, pixel_mm, row, slice_mm, None, marks
    )


def phantom_cases(
    seeds: Iterable[int],
    pixel_mm: float,
    cache_dir: Path | None,
    progress: Callable[[int], None] | None = None,
    varied_every: int = 0,
) -> list[MipCase]:
    """Phantom cases for ``seeds``, generated once and cached as ``<cache_dir>/<seed>.npz``.

    With ``varied_every`` = n > 0, every n-th phantom (the first, the (n+1)-th, ...) has a
    varied spine (:func:`phantom_spec`), cached under its own name.
    """
    out = []
    for i, seed in enumerate(seeds):
        varied = bool(varied_every) and i % varied_every == 0
        tag = "-sv" if varied else ""
        path = (
            None
            if cache_dir is None
            else Path(cache_dir) / f"phantom-{seed:07d}-{pixel_mm:g}mm-lm{tag}.npz"
        )
        if path is not None and path.is_file():
            out.append(load_case(path))
        else:
            case = phantom_case(seed, pixel_mm, varied)
            if path is not None:
                save_case(case, path)
            out.append(case)
        if progress:
            progress(1)
    return out


def read_case_csv(path: Path) -> list[tuple[Path, int | None, str]]:
    """Rows of a site CSV ``series_path,l3_slice_index[,patient_id]``.

    ``l3_slice_index`` is the 0-based index in the series sorted by ascending z (as
    ``CTVolume.z_mm``); empty or negative = L3 not in the field of view. Relative paths are
    relative to the CSV's folder.

    Raises
    ------
    ValueError
        Missing columns or a non-integer index.
    """
    path = Path(path)
    rows = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"series_path", "l3_slice_index"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs columns series_path,l3_slice_index")
        for i, r in enumerate(reader, start=2):
            sp = Path(r["series_path"].strip())
            sp = sp if sp.is_absolute() else path.parent / sp
            raw = (r["l3_slice_index"] or "").strip()
            try:
                idx = int(raw) if raw else None
            except ValueError as exc:
                raise ValueError(f"{path}:{i}: l3_slice_index {raw!r} is not an integer") from exc
            if idx is not None and idx < 0:
                idx = None
            rows.append((sp, idx, (r.get("patient_id") or "").strip() or str(sp)))
    return rows


def csv_cases(path: Path, pixel_mm: float, loader: Callable[[Path], CTVolume]) -> list[MipCase]:
    """Cases from a site CSV; ``loader`` turns a series path into a CTVolume."""
    out = []
    for sp, idx, group in read_case_csv(path):
        vol = loader(sp)
        if idx is not None and not 0 <= idx < len(vol.z_mm):
            raise ValueError(f"{sp}: l3_slice_index {idx} outside 0..{len(vol.z_mm) - 1}")
        z = None if idx is None else float(vol.z_mm[idx])
        out.append(case_from_volume(vol, z, pixel_mm, str(sp), group))
    return out


def split_by_group(
    cases: Sequence[MipCase], val_fraction: float, seed: int
) -> tuple[list[MipCase], list[MipCase]]:
    """Patient-level split: every case of a group lands on the same side."""
    groups = sorted({c.group for c in cases})
    rng = np.random.default_rng(seed)
    rng.shuffle(groups)
    n_val = max(1, int(round(len(groups) * val_fraction))) if len(groups) > 1 else 0
    val_groups = set(groups[:n_val])
    return [c for c in cases if c.group not in val_groups], [
        c for c in cases if c.group in val_groups
    ]


# ---------------------------------------------------------------------------- window sampling


def extract_window(strip: np.ndarray, top: float, height: int, scale: float = 1.0) -> np.ndarray:
    """Window of ``height`` rows starting at fractional source row ``top``, covering
    ``height * scale`` source rows (linear interpolation; air = 0 outside the strip).

    Parameters
    ----------
    strip : (rows, W) normalised strip.
    top : source row at the window's top edge (may be negative or beyond the strip).
    height : output rows H.
    scale : source rows per output row (z zoom augmentation).

    Returns
    -------
    np.ndarray
        (height, W) float32.
    """
    src = top + np.arange(height, dtype=np.float64) * scale
    i0 = np.floor(src).astype(np.int64)
    w = (src - i0).astype(np.float32)[:, None]
    n = strip.shape[0]

    def rows(idx: np.ndarray) -> np.ndarray:
        ok = (idx >= 0) & (idx < n)
        out = np.zeros((len(idx), strip.shape[1]), np.float32)
        out[ok] = strip[idx[ok]]
        return out

    return rows(i0) * (1 - w) + rows(i0 + 1) * w


@dataclass
class Sample:
    """A batch of training windows: ``x`` (B, H, W), ``offset`` (B,) normalised target
    ``(row - H/2) / a`` (NaN where L3 is not within +/- a), ``present`` (B,) 0/1."""

    x: torch.Tensor
    offset: torch.Tensor
    present: torch.Tensor


#: Field-of-view crops (issue 15): a lumbar-spine window is this long (mm), uniform.
LUMBAR_WINDOW_MM = (150.0, 260.0)
#: A crop shows the sacrum, for counting up from it, when at least this much (mm) of S1
#: below its top end plate is inside.
SACRUM_SEEN_MM = 10.0


@dataclass(frozen=True)
class FovCrop:
    """A field of view cut from a scan, in MIP rows (``top`` < ``bottom``; row 0 superior)."""

    top: float
    bottom: float

    def holds(self, row: float) -> bool:
        return self.top <= row <= self.bottom


def draw_fov_crop(case: MipCase, rng: np.random.Generator) -> FovCrop | None:
    """A field of view as scanners make them, inside ``case``'s scan (issue 15).

    Half the crops are abdominal scans starting anywhere from mid-T10 to mid-L2 and ending
    anywhere from mid-L4 to the end of the scan; half are lumbar-spine windows of
    :data:`LUMBAR_WINDOW_MM` holding L3 somewhere between 15 % and 85 % of their length.
    None when the case has no landmarks or no L3 to crop around.
    """
    m = case.landmark_rows
    if case.l3_row is None or not {"T10", "L2", "L4"} <= m.keys():
        return None
    n = case.image_hu.shape[0]
    if rng.random() < 0.5:
        top = rng.uniform(m["T10"], m["L2"])
        bottom = rng.uniform(m["L4"], max(m["L4"], n - 1.0))
    else:
        length = rng.uniform(*LUMBAR_WINDOW_MM) / case.pixel_mm
        top = case.l3_row - rng.uniform(0.15, 0.85) * length
        bottom = top + length
    return FovCrop(max(top, 0.0), min(bottom, n - 1.0))


def countable_l3(case: MipCase, crop: FovCrop | None) -> bool:
    """Whether L3 is in the field of view in the radiologist's sense (issue 15): its middle
    is inside and a reader can count to it, down from the last rib-bearing vertebra (its
    middle inside) or up from the sacrum (:data:`SACRUM_SEEN_MM` of S1 inside). Without a
    crop: L3 is in the scan."""
    if case.l3_row is None:
        return False
    if crop is None:
        return True
    m = case.landmark_rows
    if not crop.holds(case.l3_row):
        return False
    from_ribs = "last_rib" in m and crop.holds(m["last_rib"])
    sacrum = m.get("S1_top")
    from_sacrum = sacrum is not None and crop.holds(sacrum + SACRUM_SEEN_MM / case.pixel_mm)
    return from_ribs or from_sacrum


def countable_in_z(
    vertebrae_z_mm: dict[str, tuple[float, float]], z_first_mm: float, z_last_mm: float
) -> bool:
    """:func:`countable_l3` in the volume's z (mm) rather than MIP rows: whether a scan from
    ``z_first_mm`` to ``z_last_mm`` (slice centres, ascending) holds mid-L3 and a reader can
    count to it, from the last rib-bearing vertebra (its middle inside) or from the sacrum
    (:data:`SACRUM_SEEN_MM` of S1 below its top end plate inside).

    Parameters
    ----------
    vertebrae_z_mm : a phantom's vertebra table, name -> (bottom, top) z (mm), with "L3".

    Raises
    ------
    KeyError
        The table has no L3.
    """
    lo, hi = float(z_first_mm), float(z_last_mm)
    l3 = 0.5 * float(sum(vertebrae_z_mm["L3"]))
    if not lo <= l3 <= hi:
        return False
    return any(count_ends_in_z(vertebrae_z_mm, lo, hi))


def count_ends_in_z(
    vertebrae_z_mm: dict[str, tuple[float, float]], z_first_mm: float, z_last_mm: float
) -> tuple[bool, bool]:
    """Which ends a reader can count the lumbar vertebrae from in a scan from ``z_first_mm``
    to ``z_last_mm`` (slice centres, ascending): (the last rib-bearing vertebra, its middle
    inside; the sacrum, :data:`SACRUM_SEEN_MM` of S1 below its top end plate inside). Only
    with both can transitional anatomy be seen by counting (ANATOMY.md).

    Parameters
    ----------
    vertebrae_z_mm : a phantom's vertebra table, name -> (bottom, top) z (mm).
    """
    lo, hi = float(z_first_mm), float(z_last_mm)
    m = {k: float(v) for k, v in landmark_z_mm(vertebrae_z_mm).items()}
    from_ribs = "last_rib" in m and lo <= m["last_rib"] <= hi
    from_sacrum = "S1_top" in m and lo <= m["S1_top"] - SACRUM_SEEN_MM <= hi
    return from_ribs, from_sacrum


def sample_windows(
    cases: Sequence[MipCase],
    spec: WindowSpec,
    n: int,
    rng: np.random.Generator,
    positive_fraction: float = 0.6,
    augment: bool = True,
    absent_fraction: float = 0.35,
    fov_crop_fraction: float = 0.0,
) -> Sample:
    """Draw ``n`` windows across scans (shuffled).

    Positives hold L3 within ``[-a, +a]`` of the window centre (uniform offset), target =
    its offset; negatives hold L3 farther than ``a + 4 px`` from the centre (or not at
    all) and train only the presence head; ``absent_fraction`` of the negatives come from
    scans without L3 (chest-only, pelvis-only), the hardest "absent" cases.

    ``fov_crop_fraction`` of the windows are cut from a field of view cropped out of their
    scan (:func:`draw_fov_crop`; rows outside it are air, as outside a scan). L3 then counts
    as present only where a radiologist could count to it in that crop
    (:func:`countable_l3`): a positive window of a crop where L3 cannot be counted becomes
    a negative (no offset target, presence 0). Cases without landmarks are never cropped.
    """
    h, a = spec.height_px, spec.a_px
    with_l3 = [c for c in cases if c.l3_row is not None]
    xs = np.zeros((n, h, spec.width_px), np.float32)
    off = np.full(n, np.nan, np.float32)
    pres = np.zeros(n, np.float32)
    without_l3 = [c for c in cases if c.l3_row is None]
    for i in range(n):
        positive = bool(with_l3) and rng.random() < positive_fraction
        if positive:
            case = with_l3[rng.integers(len(with_l3))]
        elif without_l3 and rng.random() < absent_fraction:  # oversample chest/pelvis-only
            case = without_l3[rng.integers(len(without_l3))]
        else:
            case = cases[rng.integers(len(cases))]
        if case.strip is None:
            case.strip = mip_to_strip(case.image_hu, spec)
        crop = (
            draw_fov_crop(case, rng)
            if fov_crop_fraction > 0 and rng.random() < fov_crop_fraction
            else None
        )
        scale = float(np.exp(rng.uniform(np.log(0.88), np.log(1.12)))) if augment else 1.0
        if positive:
            u = rng.uniform(-a, a)  # output rows below the window centre
        elif case.l3_row is not None and rng.random() < 0.85:
            lim = a + 4.0
            reach = h / 2 + a + spec.pad_px  # far enough to be in the padding
            u = rng.uniform(lim, reach) * (1 if rng.random() < 0.5 else -1)
        else:
            u = None
        if u is not None:
            top = case.l3_row - (h / 2 + u) * scale
        else:
            lo, hi = (0.0, case.strip.shape[0]) if crop is None else (crop.top, crop.bottom)
            top = rng.uniform(lo - h * scale / 2, hi - h * scale / 2)
        xs[i] = extract_window(case.strip, top, h, scale)
        if crop is not None:  # air outside the cropped field of view
            src = top + np.arange(h, dtype=np.float64) * scale
            xs[i][(src < crop.top) | (src > crop.bottom)] = 0.0
        if positive and countable_l3(case, crop):
            off[i], pres[i] = u / a, 1.0
    x = torch.from_numpy(xs)
    if augment:
        x = _augment(x, rng)
    return Sample(x, torch.from_numpy(off), torch.from_numpy(pres))


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Lateral shift and flip, contrast/gamma, blur and noise (domain randomisation)."""
    b, _, w = x.shape
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    out = torch.empty_like(x)
    for i in range(b):
        xi = x[i]
        shift = int(rng.integers(-w // 10, w // 10 + 1))
        xi = torch.roll(xi, shift, dims=1)
        if shift > 0:
            xi[:, :shift] = 0
        elif shift < 0:
            xi[:, shift:] = 0
        if rng.random() < 0.5:
            xi = torch.flip(xi, dims=(1,))
        out[i] = xi
    gamma = torch.from_numpy(np.exp(rng.uniform(-0.35, 0.35, b)).astype(np.float32))
    gain = torch.from_numpy(rng.uniform(0.8, 1.2, b).astype(np.float32))
    out = out.clamp(0, 1) ** gamma[:, None, None] * gain[:, None, None]
    if rng.random() < 0.3:
        out = nn.functional.avg_pool2d(out[:, None], 3, stride=1, padding=1)[:, 0]
    sigma = torch.from_numpy(rng.uniform(0.0, 0.04, b).astype(np.float32))
    out = out + torch.randn(out.shape, generator=g) * sigma[:, None, None]
    return out.clamp(0, 1.2)


# ---------------------------------------------------------------------------------- training


@dataclass
class TrainSettings:
    """Hyper-parameters of :func:`train_locator` (defaults = the shipped CNN4 run)."""

    arch: str = "cnn4"
    epochs: int = 12
    steps_per_epoch: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    presence_weight: float = 0.5
    val_windows: int = 1024
    seed: int = 0
    device: str = "cpu"
    pretrained: Path | None = None
    spec: WindowSpec = field(default_factory=WindowSpec)
    init: Path | None = None
    positive_fraction: float = 0.6
    stage: str = "coarse"  # "coarse": whole-MIP locator; "fine": refinement stage
    fov_crop_fraction: float = 0.0  # windows cut from a cropped field of view (issue 15)


#: Starting errors (multiples of a) from which :func:`validate_refinement` refines each
#: validation scan: the first stage's misses lie on both sides, up to about one a.
REFINE_VALIDATION_STARTS = (-0.8, -0.4, 0.0, 0.4, 0.8)


@dataclass
class EpochLog:
    """Validation after one epoch: offset error of L3-containing windows (mm), presence
    accuracy, and (when computed) the mean whole-scan decision error (mm)."""

    epoch: int
    train_loss: float
    val_offset_mae_mm: float
    val_presence_acc: float
    val_scan_mae_mm: float | None
    seconds: float


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _loss(model: nn.Module, s: Sample, dev: torch.device, presence_weight: float) -> torch.Tensor:
    off, logit = model(prepare_input(s.x.to(dev), model))
    target = s.offset.to(dev)
    mask = ~torch.isnan(target)
    loss = torch.zeros((), device=dev)
    if mask.any():
        loss = loss + nn.functional.smooth_l1_loss(off[mask], target[mask], beta=0.1)
    if logit is not None:
        loss = loss + presence_weight * nn.functional.binary_cross_entropy_with_logits(
            logit, s.present.to(dev)
        )
    return loss


@torch.no_grad()
def validate_windows(
    model: nn.Module, val: Sample, spec: WindowSpec, dev: torch.device
) -> tuple[float, float]:
    """Mean absolute L3 offset error (mm) on positive windows and presence accuracy."""
    model.eval()
    offs, pres = [], []
    for i in range(0, len(val.x), 128):
        o, p = model(prepare_input(val.x[i : i + 128].to(dev), model))
        offs.append(o.cpu())
        pres.append(p.cpu() if p is not None else torch.zeros(0))
    o = torch.cat(offs)
    mask = ~torch.isnan(val.offset)
    mae = (
        float((o[mask] - val.offset[mask]).abs().mean() * spec.a_mm) if mask.any() else float("nan")
    )
    acc = float("nan")
    if pres and len(pres[0]):
        p = torch.cat(pres)
        acc = float(((p > 0).float() == val.present).float().mean())
    return mae, acc


@torch.no_grad()
def validate_scans(
    model: nn.Module,
    cases: Sequence[MipCase],
    spec: WindowSpec,
    dev: torch.device,
    stride: int = 4,
    clip_mm: float = 50.0,
) -> float | None:
    """Mean absolute whole-scan decision error (mm) on in-FOV cases (sliding window), each
    error clipped at ``clip_mm`` so that one wrong level does not decide the best epoch."""
    model.eval()
    loc = LoadedLocator(model, spec, "?", dev, Path("<training>"))
    errs = []
    for c in cases:
        if c.l3_row is None:
            continue
        strip = c.strip if c.strip is not None else mip_to_strip(c.image_hu, spec)
        win, tops = sliding_windows(strip, spec, stride)
        rows, p = loc.predict(win, 128)
        d = decide_l3(tops, rows, spec.height_px, spec.a_px, p, tol_px=max(1.5, 6 / spec.pixel_mm))
        errs.append(min(abs(d.row - c.l3_row) * spec.pixel_mm, clip_mm))
    return float(np.mean(errs)) if errs else None


@torch.no_grad()
def validate_refinement(
    model: nn.Module,
    cases: Sequence[MipCase],
    spec: WindowSpec,
    dev: torch.device,
    stride: int = 3,
    starts: Sequence[float] = REFINE_VALIDATION_STARTS,
) -> float | None:
    """Mean absolute error (mm) of a refinement-stage model on in-FOV validation cases.

    Each case is refined (:func:`worker.locator.fine.refine_in_mip`) from first answers placed at
    ``true L3 + k * a`` for every ``k`` in ``starts``; the error is that of the refined z
    (the first answer when the refinement declines). Clipped at ``2a`` per attempt.
    """
    from worker.locator.fine import FINE_STAGE, refine_in_mip

    model.eval()
    loc = LoadedLocator(model, spec, "?", dev, Path("<training>"), {"stage": FINE_STAGE})
    errs = []
    for c in cases:
        if c.l3_row is None:
            continue
        mip = Mip(image=c.image_hu, pixel_mm=spec.pixel_mm, z_top_mm=0.0, slice_z_mm=np.zeros(0))
        true_z = float(mip.row_to_z(c.l3_row))
        strip = c.strip if c.strip is not None else mip_to_strip(c.image_hu, spec)
        for k in starts:
            start = float(mip.row_to_z(c.l3_row + k * spec.a_px))
            ref = refine_in_mip(mip, start, loc, stride, 128, strip=strip)
            errs.append(min(abs(ref.z_mm - true_z), 2 * spec.a_mm))
    return float(np.mean(errs)) if errs else None


def init_from_locator(model: nn.Module, weights: Path, arch: str, spec: WindowSpec) -> None:
    """Start training from a saved locator (fine-tuning / continued training).

    Parameters
    ----------
    model : freshly built network of ``arch`` for ``spec``.
    weights : a :func:`worker.locator.weights.save_locator` file of the same architecture and window
        geometry.

    Raises
    ------
    ValueError
        The file's architecture or window geometry differs from the one being trained.
    """
    from worker.locator.weights import load_locator

    src = load_locator(Path(weights), "cpu")
    if src.arch != arch or src.spec != spec:
        raise ValueError(
            f"{weights}: {src.arch} {src.spec} cannot initialise {arch} {spec} "
            "(architecture and window geometry must match)"
        )
    model.load_state_dict(src.model.state_dict())


def train_locator(
    train_cases: Sequence[MipCase],
    val_cases: Sequence[MipCase],
    settings: TrainSettings,
    out: Path,
    record: dict[str, Any] | None = None,
    progress: Callable[[int, float], None] | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
    max_val_scans: int = 80,
    checkpoint: Path | None = None,
) -> tuple[nn.Module, list[EpochLog]]:
    """Train a locator; saves the best epoch (lowest validation error) to ``out``.

    Parameters
    ----------
    train_cases, val_cases : patient-disjoint MIP cases at ``settings.spec.pixel_mm``.
    settings : hyper-parameters; ``seed`` makes sampling, initialisation and augmentation
        deterministic (on one device and thread count).
    out : weights file (:func:`worker.locator.weights.save_locator` format) of the best epoch.
    checkpoint : where the last epoch's model and optimiser state are written after every
        epoch (default ``var/checkpoints/<out name>.ckpt``).
    record : metadata stored in the weights (command line, data description...).
    progress : called after each step with (1, loss) (a progress bar).
    on_epoch : called with each epoch's validation log.

    Returns
    -------
    (model, logs)
        The model of the last epoch and the per-epoch logs.
    """
    if not train_cases:
        raise ValueError("no training cases")
    spec = settings.spec
    _seed_everything(settings.seed)
    dev = torch.device(settings.device)
    if settings.stage not in ("coarse", "fine"):
        raise ValueError(f"unknown stage {settings.stage!r}; choose 'coarse' or 'fine'")
    fine = settings.stage == "fine"
    # the refinement stage is the paper's protocol exactly: only L3-holding windows, one
    # regression output (no presence head; the first stage decides "not in field of view")
    model = build_model(settings.arch, spec.height_px, spec.width_px, presence_head=not fine)
    positive_fraction = 1.0 if fine else settings.positive_fraction
    if settings.pretrained is not None:
        if settings.arch != "vgg16":
            raise ValueError("--pretrained needs --arch vgg16")
        load_pretrained_backbone(model, settings.pretrained)  # type: ignore[arg-type]
    if settings.init is not None:
        init_from_locator(model, settings.init, settings.arch, spec)
    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    total = settings.epochs * settings.steps_per_epoch
    warm = max(1, total // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 2 %
        return min(1.0, (step + 1) / warm) * (
            0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / total))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rng = np.random.default_rng(settings.seed)
    val_rng = np.random.default_rng(settings.seed + 7919)
    val_pool = list(val_cases) or list(train_cases)
    val = sample_windows(val_pool, spec, settings.val_windows, val_rng, augment=False)
    logs: list[EpochLog] = []
    best = math.inf
    ckpt = checkpoint or Path("var/checkpoints") / (Path(out).name + ".ckpt")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    rec = dict(record or {})
    rec["stage"] = settings.stage
    for epoch in range(1, settings.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        losses = []
        for _ in range(settings.steps_per_epoch):
            batch = sample_windows(
                train_cases,
                spec,
                settings.batch_size,
                rng,
                positive_fraction,
                fov_crop_fraction=settings.fov_crop_fraction,
            )
            loss = _loss(model, batch, dev, settings.presence_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if progress:
                progress(1, losses[-1])
        mae, acc = validate_windows(model, val, spec, dev)
        if fine:  # 5 refinements per scan: half the scans keep the epoch's cost alike
            scan_mae = validate_refinement(model, val_pool[: max(1, max_val_scans // 2)], spec, dev)
        else:
            scan_mae = validate_scans(model, val_pool[:max_val_scans], spec, dev)
        log = EpochLog(epoch, float(np.mean(losses)), mae, acc, scan_mae, time.perf_counter() - t0)
        logs.append(log)
        if on_epoch:
            on_epoch(log)
        rec["epochs_done"] = epoch
        rec["history"] = [vars(x) for x in logs]
        score = scan_mae if scan_mae is not None else mae
        if score <= best:
            best = score
            rec["best_epoch"] = epoch
            rec["final_validation"] = vars(log)
            save_locator(out, model, settings.arch, spec, rec)
        torch.save(
            {
                "epoch": epoch,
                "model": model.state_dict(),
                "optim": opt.state_dict(),
                "record": json.dumps(rec, default=str),
            },
            ckpt,
        )
    return model, logs


def load_volume_any(path: Path) -> CTVolume:
    """Load a DICOM series folder or a NIfTI file (:func:`worker.volume.load.load_series`).

    Raises
    ------
    core.errors.SeriesValidationError
        The input is not a usable CT series.
    """
    from worker.volume.load import load_series

    return load_series(Path(path))


def case_volume_and_mip(path: Path, pixel_mm: float) -> tuple[CTVolume, Mip]:
    """Load a series and compute its frontal MIP."""
    vol = load_volume_any(path)
    return vol, frontal_mip(vol, pixel_mm=pixel_mm)
