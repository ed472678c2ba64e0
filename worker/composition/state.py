"""The slice state the classical steps read and fill in, one step after the other."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from core.composition_params import ClassicalParams
from core.config import CompositionConfig
from worker.composition.morphology import RaySampler


@dataclass
class Rays:
    """Rays from the trunk centroid, shared by the wall and the wall-muscle steps.

    Attributes
    ----------
    cy, cx : centroid of the trunk (row, column; pixels).
    angles : (a,) ray angles (rad); radii : (r,) sample radii (pixels).
    ys, xs : (a, r) sample coordinates (pixels); sample : nearest-pixel sampler of masks.
    """

    cy: float
    cx: float
    angles: np.ndarray
    radii: np.ndarray
    ys: np.ndarray
    xs: np.ndarray
    sample: RaySampler


@dataclass
class SliceState:
    """One axial slice and what the classical steps found on it.

    Arrays are (y, x): y rows anterior->posterior, x columns patient right->left. Each step
    of :mod:`worker.composition.classical` reads some fields and sets others; a field is
    None until its step has run.

    Attributes
    ----------
    hu : (y, x) float32 HU the tissue is classified on (denoised for low-dose slices).
    spacing_mm : (dy, dx) pixel spacing in mm; ``px`` is the smaller (mm).
    config : HU ranges (``muscle_hu``, ``fat_hu``) and ``classical`` parameters.
    body : trunk mask (arms, table excluded); flags : "arms_in_slice", "body_truncated".
    fat, muscle : pixels in the Mitsiopoulos fat / muscle HU ranges inside the body.
    inner : region inside the abdominal wall fascia where the rays found it (the wall
        muscles are searched from its line).
    inner_closed : ``inner`` with gaps between the anterior wall muscles closed (rectus
        diastasis): the SAT/VAT boundary.
    vertebra : vertebra mask (body, canal, arch front), or None when none is found.
    vertebral_bone : the vertebra's own bone (> ``cortical_bone_hu``, its grouped parts), or
        None when no vertebra is found.
    rays : the rays of the wall steps.
    sma : skeletal muscle found so far; imat, vat, sat : fat compartments.
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float]
    config: CompositionConfig
    body: np.ndarray | None = None
    flags: list[str] = field(default_factory=list)
    fat: np.ndarray | None = None
    muscle: np.ndarray | None = None
    inner: np.ndarray | None = None
    inner_closed: np.ndarray | None = None
    vertebra: np.ndarray | None = None
    vertebral_bone: np.ndarray | None = None
    rays: Rays | None = None
    sma: np.ndarray | None = None
    imat: np.ndarray | None = None
    vat: np.ndarray | None = None
    sat: np.ndarray | None = None

    @property
    def px(self) -> float:
        """Pixel size (mm): the smaller of the two spacings."""
        return float(min(self.spacing_mm))

    @property
    def params(self) -> ClassicalParams:
        """The classical method's parameters (``config.classical``)."""
        return self.config.classical
