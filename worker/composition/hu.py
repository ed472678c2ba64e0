"""Tissue by Hounsfield units, and the low-dose noise estimate and denoising.

HU ranges: skeletal muscle -29..+150 HU, adipose tissue -190..-30 HU (Mitsiopoulos et al.
1998), configured as ``composition.muscle_hu`` and ``composition.fat_hu``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: MAD to SD of a normal distribution
_MAD_TO_SD = 1.4826


def in_hu_range(hu: np.ndarray, hu_range: tuple[float, float]) -> np.ndarray:
    """Boolean mask of ``lo <= hu <= hu_range[1]`` (both bounds inclusive).

    Parameters
    ----------
    hu : array of Hounsfield units, any shape.
    hu_range : (low, high) in HU, inclusive, e.g. (-29, 150) for skeletal muscle
        (Mitsiopoulos et al. 1998).
    """
    lo, hi = hu_range
    return (hu >= lo) & (hu <= hi)


def noise_sd(
    hu: np.ndarray, body: np.ndarray, soft_tissue_hu: float = 300.0, median_gain: float = 1.2
) -> float:
    """Robust noise SD (HU) of a slice: MAD of the residual of a 3x3 median in soft tissue.

    Parameters
    ----------
    hu : (y, x) HU slice.
    body : (y, x) bool trunk mask; only pixels with |HU| < ``soft_tissue_hu`` inside it are
        used.
    soft_tissue_hu, median_gain : ``ClassicalParams.noise_soft_tissue_hu`` and
        ``noise_median_gain``.

    Returns
    -------
    Noise SD estimate in HU (1.4826 x MAD, x ``median_gain`` for the median's own
    smoothing); 0 when no soft tissue is present.
    """
    soft = body & (np.abs(hu) < soft_tissue_hu)
    if not soft.any():
        return 0.0
    d = (hu - ndimage.median_filter(hu, size=3))[soft]
    return _MAD_TO_SD * float(np.median(np.abs(d - np.median(d)))) * median_gain


def denoise_slice(
    hu: np.ndarray, sigma_hu: float, soft_tissue_hu: float = 300.0, weight_per_sigma: float = 1.5
) -> np.ndarray:
    """Edge-preserving total-variation denoising (Chambolle 2004) of a noisy slice.

    Used to classify low-dose slices (PET/CT attenuation CT) by HU range: muscle and fat are
    piecewise-constant, so TV keeps their borders while the noise that pushes pixels across
    the Mitsiopoulos thresholds is removed.

    Parameters
    ----------
    hu : (y, x) HU slice.
    sigma_hu : noise SD (HU) from :func:`noise_sd`; sets the TV weight
        (``weight_per_sigma`` x sigma).
    soft_tissue_hu : pixels outside +/- this keep their value (bone clipped for the TV).

    Returns
    -------
    (y, x) float32 denoised HU.
    """
    from skimage.restoration import denoise_tv_chambolle

    # air kept at -1000 HU so the skin border does not move; bone clipped at 300 HU
    clipped = np.clip(hu, -1000.0, soft_tissue_hu) / 1000.0
    den = denoise_tv_chambolle(clipped, weight=weight_per_sigma * sigma_hu / 1000.0) * 1000.0
    return np.where(np.abs(hu) < soft_tissue_hu, den, hu).astype(np.float32)
