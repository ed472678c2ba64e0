"""The classical segmentation of the L3 slice as named steps over one :class:`SliceState`.

Steps, in order (:func:`run_steps`; each a public function ``step(state) -> state`` that
can be run and tested alone on a state whose earlier fields are set):

1. :func:`~worker.composition.body.find_body` — trunk mask, table and arms excluded.
2. :func:`~worker.composition.body.denoise_low_dose` — TV denoising of low-dose slices.
3. :func:`~worker.composition.body.classify_tissue` — Mitsiopoulos HU ranges.
4. :func:`~worker.composition.wall.find_wall` — the abdominal wall (SAT/VAT boundary).
5. :func:`~worker.composition.vertebra.find_vertebra` — vertebra, canal, arch front.
6. :func:`~worker.composition.wall.find_wall_muscles` — wall muscles by rays.
7. :func:`~worker.composition.psoas.find_psoas` — psoas, quadratus lumborum, paraspinals.
8. :func:`find_imat` — the muscle compartments and the fat inside them.
9. :func:`split_fat` — bowel contents removed; VAT inside the wall, SAT outside.

The four anatomical rules that each fixed a failure seen on the development phantoms or
the real case can be replaced (:class:`Rules`), so a test can reproduce the failure a rule
fixes without patching the module. All thresholds are in
:class:`core.composition_params.ClassicalParams` (``CompositionConfig.classical``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from core import labels as lab
from core.config import CompositionConfig
from worker.composition.body import classify_tissue, denoise_low_dose, find_body
from worker.composition.bowel import bowel_contents
from worker.composition.morphology import close_disk, dilate_disk, erode_disk, small_holes
from worker.composition.psoas import (
    AttachRule,
    OrganRule,
    attached,
    find_psoas,
    without_lateral_organ,
)
from worker.composition.state import SliceState
from worker.composition.vertebra import CanalRule, canal_to_arch, find_vertebra
from worker.composition.wall import SpikeRule, find_wall, find_wall_muscles, without_spikes


@dataclass(frozen=True)
class Rules:
    """The replaceable anatomical rules of the classical method (defaults: the method's).

    Attributes
    ----------
    canal_to_arch : disc and canal joined to the vertebra at a disc level
        (:func:`worker.composition.vertebra.canal_to_arch`, round 8).
    without_spikes : narrow spikes of the wall-muscle band cut back
        (:func:`worker.composition.wall.without_spikes`, round 8).
    without_lateral_organ : an organ joined to a psoas's lateral side dropped
        (:func:`worker.composition.psoas.without_lateral_organ`, round 7).
    attached : psoas candidates detached from the muscles by a fat rim dropped
        (:func:`worker.composition.psoas.attached`, round 8).
    """

    canal_to_arch: CanalRule = canal_to_arch
    without_spikes: SpikeRule = without_spikes
    without_lateral_organ: OrganRule = without_lateral_organ
    attached: AttachRule = attached


DEFAULT_RULES = Rules()


def find_imat(state: SliceState) -> SliceState:
    """Step: the muscle compartments; ``state.imat`` = fat enclosed by muscle.

    The compartment is the muscle closed by ``imat_close_mm`` with its holes up to
    ``imat_hole_mm2`` (fat inside a muscle; the abdominal cavity is larger), inside the wall
    and outside the vertebra. Muscle-HU tissue inside it is muscle too (fatty infiltration
    that stopped the rays), as is the outer layer of a wall muscle that the ray casting put
    outside the wall (muscle-HU tissue connected to the muscle, deeper than the skin and
    within ``wall_outlier_mm`` of the wall). IMAT is the fat inside the compartment eroded
    by one pixel (not the fat lining its surface), less the partial volume of bowel gas
    (within ``gas_partial_volume_mm``), which also leaves ``state.fat``.

    Reads ``hu``, ``body``, ``fat``, ``muscle``, ``inner``, ``vertebra``, ``sma``.
    """
    p = state.params
    px = state.px
    inner, vert, muscle_hu = state.inner, state.vertebra, state.muscle
    sma = state.sma
    compartment = close_disk(sma, max(1.0, p.imat_close_mm / px))
    # small holes are fat inside a muscle; the abdominal cavity is not
    compartment |= small_holes(compartment, p.imat_hole_mm2 / (px * px))
    compartment &= inner
    if vert is not None:
        compartment &= ~vert
    # muscle between fat streaks that stopped the rays (fatty infiltration) is muscle too
    sma = sma | (muscle_hu & compartment)
    # the outer layer of a wall muscle the ray casting put outside the wall (partial volume
    # with the subcutaneous fat, a smoothed-over bulge): muscle-HU tissue connected to the
    # muscle, deeper than the skin and within ``wall_outlier_mm`` of the wall
    skin = state.body & ~erode_disk(state.body, (p.skin_mm + px) / px)
    near_wall = dilate_disk(inner, p.wall_outlier_mm / px)
    outer = muscle_hu & ~inner & ~skin & near_wall
    if outer.any() and sma.any():
        sma |= ndimage.binary_propagation(sma, mask=sma | outer) & outer
    # fat enclosed by muscle, not the fat lining the compartment's surface
    compartment = erode_disk(compartment, 1.0)
    fat = state.fat
    imat = fat & compartment & ~sma
    # pixels between bowel gas and the bowel wall fall in the fat range by partial volume
    gas = (state.hu < p.gas_hu) & inner
    if gas.any():
        fat_pv = fat & dilate_disk(gas, max(1.0, p.gas_partial_volume_mm / px))
        fat = fat & ~fat_pv
        imat &= ~fat_pv
    state.sma, state.imat, state.fat = sma, imat, fat
    return state


def split_fat(state: SliceState) -> SliceState:
    """Step: bowel contents with fat HU leave ``state.fat``; ``vat`` inside the wall, ``sat``
    outside (:func:`worker.composition.bowel.bowel_contents`).

    The SAT/VAT boundary is ``inner_closed`` (gaps of the anterior muscle ring closed,
    :func:`~worker.composition.wall.wall_regions`; rectus diastasis, round 10) when set,
    else ``inner``.

    Reads ``hu``, ``fat``, ``inner``, ``inner_closed``, ``imat``.
    """
    inner, imat = state.inner, state.imat
    boundary = state.inner_closed if state.inner_closed is not None else inner
    fat = state.fat
    fat = fat & ~bowel_contents(state.hu, fat & inner & ~imat, inner, state.px, state.params)
    state.fat = fat
    state.vat = fat & boundary & ~imat
    state.sat = fat & ~boundary
    return state


def label_map(state: SliceState) -> np.ndarray:
    """(y, x) uint8 label map (:mod:`core.labels`) of a state whose steps have all run.

    Later compartments win: SAT, then VAT, IMAT, SMA.
    """
    out = np.zeros(state.hu.shape, dtype=np.uint8)
    if state.sat is None:
        return out
    out[state.sat] = lab.SAT
    out[state.vat] = lab.VAT
    out[state.imat] = lab.IMAT
    out[state.sma] = lab.SMA
    return out


def run_steps(
    hu: np.ndarray,
    spacing_mm: tuple[float, float],
    config: CompositionConfig,
    rules: Rules = DEFAULT_RULES,
) -> SliceState:
    """Run all classical steps on one slice and return the final state.

    Parameters
    ----------
    hu : (y, x) HU slice; y anterior->posterior, x patient right->left.
    spacing_mm : (dy, dx) pixel spacing in mm.
    config : HU ranges (Mitsiopoulos et al. 1998 by default) and ``classical`` parameters.
    rules : the replaceable anatomical rules (:class:`Rules`).

    Returns
    -------
    :class:`SliceState`; ``sat`` is None when the slice holds no body.
    """
    state = SliceState(np.asarray(hu, dtype=np.float32), tuple(spacing_mm), config)  # type: ignore[arg-type]
    find_body(state)
    denoise_low_dose(state)
    if not state.body.any():
        return state
    classify_tissue(state)
    find_wall(state)
    find_vertebra(state, rules.canal_to_arch)
    find_wall_muscles(state, rules.without_spikes)
    find_psoas(state, rules.without_lateral_organ, rules.attached)
    find_imat(state)
    split_fat(state)
    return state
