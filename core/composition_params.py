"""The one parameter object of the classical body-composition method (``ClassicalParams``).

Every threshold of the classical segmentation (:mod:`worker.composition.classical`) lives
here, with its unit in its name and where its value comes from in its description. The
defaults are the values the method was developed with; ``docs/composition.md`` tells the
rounds in which each was chosen. The configuration nests it as ``composition.classical``
(YAML ``composition: {classical: {skin_mm: 4.0}}``, environment
``L3SPOT__COMPOSITION__CLASSICAL__SKIN_MM=4``); the clinically meaningful values (HU ranges
of Mitsiopoulos et al. 1998, averaging, cut-offs, QA) stay in ``CompositionConfig`` itself.

Sources named in the descriptions:

* "anatomy": sizes of the anatomical structures at L3 (adult abdomen);
* "dev round N": chosen on the development phantoms 6000-6019 (and, where stated, on the real
  case ``abdomen_ct_totalseg``, T11-L3) in round N of ``docs/composition.md``; held-out
  phantoms 7000-7019 were never used to choose; "development, docs/composition.md": chosen
  during development as the "Classical method" section there describes, no round named;
* "convention": a fixed part of the algorithm (ray count, sampling step) with no tuning
  intent.

This module imports neither numpy nor the worker: the node reads the configuration too.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


def _f(default: float, why: str, **kw: float) -> float:
    return Field(default, description=why, **kw)  # type: ignore[no-any-return]


class ClassicalParams(BaseModel):
    """Thresholds of the classical segmentation, each with its unit and source."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ---------------------------------------------------------------- body mask
    body_hu: float = _f(
        -500.0,
        "HU above which a pixel is body, not air or table foam (anatomy: "
        "lung/bowel gas < -900, fat > -190; development, docs/composition.md).",
    )
    table_opening_mm: float = _f(
        4.0,
        "Opening radius (mm) removing the table: tables are thinner "
        "(development, docs/composition.md).",
        ge=0,
    )
    arm_separation_mm: float = _f(
        20.0,
        "Opening radius (mm) detaching arms that touch the trunk "
        "(anatomy: the arm-trunk contact is narrower; development, docs/composition.md).",
        ge=0,
    )
    arm_min_area_cm2: float = _f(
        15.0,
        "Smallest separate or detached body part (cm^2) taken as an "
        "arm (anatomy: an adult arm section is > 30 cm^2).",
        ge=0,
    )
    arm_min_thickness_mm: float = _f(
        8.0,
        "A detached part is an arm only if thicker than this (mm, "
        "largest inscribed radius): a skin fold is not (development, docs/composition.md).",
    )
    truncation_min_mm: float = _f(
        10.0,
        "Body contact (mm) with the image edge or the padding "
        "outside the reconstruction circle that flags 'body_truncated'.",
        ge=0,
    )
    padding_hu: float = _f(
        -1500.0,
        "HU below which a pixel is padding outside the reconstruction "
        "circle (convention: scanners pad with -2000..-3024 HU; air is -1000).",
    )

    # ---------------------------------------------------------------- low-dose denoising
    denoise_above_hu: float = _f(
        20.0,
        "Noise SD (HU) above which the slice is TV-denoised before "
        "thresholding; 0 = never (development, docs/composition.md: PET/CT low-dose CT).",
        ge=0,
    )
    noise_soft_tissue_hu: float = _f(
        300.0,
        "Absolute HU below which a pixel is soft tissue for the noise "
        "estimate and the denoising (anatomy: bone > 300 HU).",
    )
    noise_median_gain: float = _f(
        1.2,
        "Factor on the MAD of the 3x3-median residual for the "
        "median's own smoothing (measured on synthetic noise).",
    )
    tv_weight_per_sigma: float = _f(
        1.5, "TV (Chambolle 2004) weight in noise SDs (development, docs/composition.md)."
    )

    # ---------------------------------------------------------------- abdominal wall (SAT/VAT)
    n_rays: int = Field(
        360, description="Rays cast from the trunk centroid (convention: 1 degree)."
    )
    ray_step_px: float = _f(0.5, "Sampling step along a ray (pixels; convention: Nyquist).")
    skin_mm: float = _f(
        4.0,
        "Skin thickness (mm) skipped before the subcutaneous fat, plus one "
        "pixel of partial volume (anatomy: dermis 1.5-4 mm).",
        ge=0,
    )
    wall_min_mm: float = _f(
        4.0,
        "Thinnest run (mm) of non-fat tissue taken as the abdominal wall "
        "(anatomy: thin obliques; development, docs/composition.md).",
        gt=0,
    )
    wall_spike_median_rays: int = Field(
        9,
        description="Circular median window (rays) replacing "
        "isolated spikes of the SAT depth (development, docs/composition.md).",
    )
    wall_median_deg: int = Field(
        41,
        ge=3,
        description="Circular median window (degrees) bridging "
        "gaps in the wall ring (linea alba; development, docs/composition.md).",
    )
    wall_gap_max_mm: float = _f(
        80.0,
        "Widest gap (mm, between the wall points on either side) of the anterior muscle "
        "ring bridged for the SAT/VAT split: rectus diastasis (inter-rectus distance normally "
        "<= 15-22 mm, Beer et al. 2009; diastasis 20-60 mm and more) with a linea alba "
        "thinner than wall_min_mm; 0 = off (dev round 10, issue #14 defect 8).",
        ge=0,
    )
    wall_final_median_rays: int = Field(
        5,
        description="Circular median (rays) smoothing the wall "
        "radius last (development, docs/composition.md).",
    )
    wall_outlier_mm: float = _f(
        6.0,
        "SAT depth deviations beyond this (mm) are outliers; also the "
        "reach (mm) of the wall muscles' outer layer (development, docs/composition.md).",
        ge=0,
    )
    wall_min_valid_ray_fraction: float = _f(
        0.125,
        "Below this fraction of rays with a skin, the cut-edge rays decide the wall (dev round 2).",
    )
    truncation_probe_px: float = _f(
        1.5,
        "Distance (pixels) beyond the last body sample probed for "
        "the image edge or padding (convention).",
    )
    cut_edge_sat_factor: float = _f(
        2.0,
        "At a cut edge the wall is the first dense run within this "
        "multiple of the median SAT depth (dev round 2).",
    )

    # ---------------------------------------------------------------- wall muscles (ray band)
    muscle_band_max_mm: float = _f(
        90.0, "Deepest paraspinal muscle band (mm; anatomy: erector spinae + multifidus).", gt=0
    )
    wall_muscle_max_mm: float = _f(
        30.0, "Deepest anterior/lateral wall muscle band (mm; anatomy: rectus, obliques).", gt=0
    )
    paraspinal_half_width_mm: float = _f(
        90.0,
        "Half-width (mm) around the midline behind the spine "
        "where the deep band is trusted (development, docs/composition.md).",
        gt=0,
    )
    posterior_wall_max_mm: float = _f(
        70.0,
        "Deepest posterolateral band (mm; latissimus, quadratus lumborum; 50 until dev round 9).",
        gt=0,
    )
    imat_gap_mm: float = _f(
        2.0,
        "Fat gap (mm) inside a muscle band still taken as IMAT, not the "
        "muscle's end (development, docs/composition.md).",
        ge=0,
    )
    min_spot_px: int = Field(
        3,
        description="Fat-HU holes of a muscle this small (pixels) are not "
        "intramuscular fat spots: at 3 mm pixels they are the fat plane to an "
        "abutting organ (development, docs/composition.md).",
    )
    spike_half_rays: int = Field(
        10,
        description="Wall-band spikes: rays on each side whose median "
        "a ray is compared with (dev round 8).",
    )
    spike_mm: float = _f(
        10.0,
        "Wall-band spikes: excess (mm) over both sides' medians that makes a "
        "ray a spike (organ tip; dev round 8, real T12-L1).",
    )

    # ---------------------------------------------------------------- vertebra
    cortical_bone_hu: float = _f(
        200.0,
        "HU above which a pixel is cortical bone (anatomy; "
        "cancellous bone can be in the muscle range).",
    )
    vertebra_closing_mm: float = _f(
        5.0,
        "Closing radius (mm, at least 2 px) grouping the "
        "vertebra's bone (development, docs/composition.md).",
    )
    cortex_gap_mm: float = _f(
        6.0,
        "Largest gap (mm) between fragments of a thin cortex that still "
        "belong together (dev round 7, real L3 at 3 mm).",
    )
    cortex_fragment_mm2: float = _f(
        50.0, "Largest piece of bone (mm^2) taken as a fragment of such a cortex (dev round 7)."
    )
    vertebra_midline_mm: float = _f(
        40.0,
        "Vertebra candidates lie within this distance (mm) of the "
        "midline; ribs are lateral (anatomy).",
    )
    vertebra_front_margin_mm: float = _f(
        10.0,
        "Candidates' centres lie behind the wall region's "
        "middle row minus this (mm; anatomy: posterior half).",
    )
    vertebra_group_mm: float = _f(
        20.0,
        "Parts beside or behind the largest within this (mm) are the same vertebra (dev round 7).",
    )
    cortex_reach_mm: float = _f(
        20.0, "Bone within this (mm) of the vertebra may be its cortex (dev round 7)."
    )
    vertebra_min_mm2: float = _f(
        200.0,
        "Less cortical bone (mm^2) than this is not a vertebra "
        "(dev round 6: a thin osteoporotic cortex at 3 mm pixels).",
    )
    cortex_median_hu: float = _f(
        50.0,
        "3x3 median HU above which bone near the vertebra borders "
        "marrow, i.e. is its cortex (dev round 8, real z 74).",
    )
    body_half_width_mm: float = _f(
        25.0,
        "Half-width (mm) of the vertebral body around its midline "
        "(anatomy: lumbar bodies 40-50 mm wide).",
    )
    body_depth_mm: float = _f(
        35.0,
        "Depth (mm) of the vertebral body behind its front (anatomy: lumbar bodies 30-35 mm deep).",
    )
    marrow_hu: float = _f(
        110.0,
        "3x3 median HU of osteoporotic cancellous bone the vertebra is "
        "grown into, inside its body only (dev round 6).",
    )
    marrow_opening_mm: float = _f(2.0, "Opening radius (mm, at least 1 px) of that growth.")
    canal_closing_mm: float = _f(
        8.0,
        "Closing radius (mm, at least 2 px) whose enclosed hole is "
        "the spinal canal (anatomy: canal 15-20 mm).",
    )
    canal_half_mm: float = _f(
        15.0,
        "Half-width (mm) of the midline band holding the spinal canal and the lamina (anatomy).",
    )
    canal_depth_mm: float = _f(
        30.0,
        "Depth (mm) behind the vertebral body within which the arch's "
        "front is searched (dev round 8, real T12-L2).",
    )
    arch_front_mm: float = _f(6.0, "Thickness (mm) of the arch's front taken (dev round 8).")
    hull_max_soft: float = _f(
        0.25,
        "Largest fraction of a vertebral body's hull below "
        "cortex_median_hu for the canal-to-arch rule (dev round 8, z 79).",
    )

    # ---------------------------------------------------------------- psoas / paravertebral
    psoas_anterior_mm: float = _f(
        20.0, "Psoas search box: extent (mm) in front of the vertebral body (anatomy).", ge=0
    )
    psoas_posterior_mm: float = _f(
        200.0, "Psoas/paraspinal search box: extent (mm) behind the body's front (anatomy).", ge=0
    )
    psoas_lateral_mm: float = _f(
        60.0, "Psoas search box: extent (mm) beside the body (anatomy).", ge=0
    )
    psoas_body_front_mm: float = _f(
        25.0,
        "Depth (mm) behind the vertebra's front whose bone gives "
        "the body's midline and width for the box (anatomy).",
    )
    psoas_min_half_width_mm: float = _f(
        15.0, "Smallest half-width (mm) of the vertebral body used for the box (anatomy)."
    )
    prevertebral_mm: float = _f(
        5.0,
        "No muscle in front of the body's front + this (mm) in the "
        "midline: aorta, IVC, duodenum (development, docs/composition.md).",
    )
    psoas_opening_mm: float = _f(
        3.0,
        "Opening radius (mm) breaking thin bridges between the psoas "
        "and a kidney or bowel loop (development, docs/composition.md).",
        gt=0,
    )
    psoas_hole_mm2: float = _f(
        100.0,
        "Fat-HU holes up to this area (mm^2; intramuscular fat "
        "spots) filled before that opening; 0 = off (development, docs/composition.md).",
        ge=0,
    )
    psoas_min_mm2: float = _f(
        100.0,
        "Smallest opened candidate (mm^2) kept as psoas (anatomy: a psoas at L3 is > 5 cm^2).",
    )
    psoas_touch_mm: float = _f(
        8.0, "Distance (mm) to the vertebra within which a candidate touches it (dev round 7)."
    )
    organ_min_mm2: float = _f(
        500.0,
        "Smallest region (mm^2) dropped as an organ joined to a psoas's "
        "lateral side (anatomy: kidney; dev round 7).",
    )
    organ_split_depth_mm: float = _f(
        3.0,
        "Depth (mm) of the neck between two blobs that splits "
        "them (h-maxima; dev round 8, real L1-L2).",
    )

    # ---------------------------------------------------------------- IMAT, bowel
    imat_close_mm: float = _f(
        4.0,
        "Closing radius (mm) defining the muscle fascia for IMAT "
        "(development, docs/composition.md).",
        ge=0,
    )
    imat_hole_mm2: float = _f(
        500.0,
        "Holes of the muscle compartment up to this (mm^2) are fat "
        "inside a muscle; the abdominal cavity is larger (anatomy).",
    )
    gas_hu: float = _f(-500.0, "HU below which a pixel inside the wall is bowel gas (anatomy).")
    gas_partial_volume_mm: float = _f(
        1.5,
        "Fat-HU pixels this near (mm, at least 1 px) to gas are "
        "partial volume of gas and bowel wall (dev round 2).",
    )
    bowel_wall_mm: float = _f(
        3.0,
        "Bowel wall thickness (mm): no fat nearer than this (+1 px) to "
        "luminal gas (anatomy; dev round 6).",
        ge=0,
    )
    bowel_lumen_cm2: float = _f(
        40.0,
        "Largest fat-HU region (cm^2) taken as an enclosed lumen of stool; 0 = off (dev round 6).",
        ge=0,
    )
    bowel_lumen_min_cm2: float = _f(1.0, "Smallest such lumen (cm^2, about 11 mm across; anatomy).")
    bowel_lumen_solidity: float = _f(
        0.85,
        "Smallest solidity of a lumen's filled region: a lumen is "
        "convex, fat between loops is not (dev round 6).",
    )
    bowel_shell_mm: float = _f(
        3.0, "Width (mm) of the shell beyond the bowel wall inspected for fat or gas (dev round 6)."
    )
    bowel_shell_fraction: float = _f(
        0.5,
        "Smallest fraction of that shell that is fat or gas for "
        "the region to be enclosed by a thin wall (dev round 6).",
    )


#: keys of ``ClassicalParams`` that were flat keys of ``composition`` before the parameter
#: object existed; the configuration still accepts them there (moved into ``classical``)
LEGACY_FLAT_KEYS = frozenset(
    {
        "body_hu", "table_opening_mm", "arm_separation_mm", "arm_min_area_cm2",
        "truncation_min_mm", "skin_mm", "wall_min_mm", "wall_median_deg", "wall_outlier_mm",
        "muscle_band_max_mm", "wall_muscle_max_mm", "paraspinal_half_width_mm",
        "posterior_wall_max_mm", "imat_gap_mm", "imat_close_mm", "psoas_anterior_mm",
        "psoas_posterior_mm", "psoas_lateral_mm", "psoas_opening_mm", "psoas_hole_mm2",
        "bowel_wall_mm", "bowel_lumen_cm2", "denoise_above_hu",
    }
)  # fmt: skip
