"""RGB Secondary Capture (PS3.3 A.8.1) of the rendered L3 summary picture.

The picture (:func:`worker.outputs.render.render_summary`) is what most radiologists will
actually see, since many PACS viewers show neither SEG nor SR (MONAILabel#1621). Patient and
Study modules are copied from a source CT image, so the PACS files it in the same study.
"""

from __future__ import annotations

import numpy as np
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from core import ALGORITHM_NAME, __version__
from core.derived import MANUFACTURER, MANUFACTURER_MODEL_NAME
from worker.outputs.uids import derived_uid

#: Series Number of the Secondary Capture.
SC_SERIES_NUMBER = 9703


def sc_series_description(version: str = __version__) -> str:
    """Series Description of the SC, e.g. ``"L3 body composition overlay (l3spot 0.1.0)"``."""
    return f"L3 body composition overlay ({ALGORITHM_NAME} {version})"


def build_sc(ref: Dataset, rgb: np.ndarray) -> SCImage:
    """A Secondary Capture Image Storage instance holding ``rgb``.

    Parameters
    ----------
    ref : a source CT image (the L3 image, or a representative one); Patient, Study and the
        seed of the derived UIDs (its Series Instance UID) come from it.
    rgb : (rows, cols, 3) uint8 RGB picture.

    Returns
    -------
    highdicom.sc.SCImage
        RGB, 8 bits, uncompressed, in a new series of the source study, with deterministic
        Series and SOP Instance UIDs.

    Raises
    ------
    ValueError
        ``rgb`` is not a (rows, cols, 3) uint8 array.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (rows, cols, 3) uint8, got {rgb.shape} {rgb.dtype}")
    series_uid = str(ref.SeriesInstanceUID)
    sc = SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation="RGB",
        bits_allocated=8,
        # highdicom needs a coordinate system; the picture's main panel is the axial L3
        # slice (columns towards patient left, rows towards posterior).
        coordinate_system="PATIENT",
        patient_orientation=("L", "P"),
        series_instance_uid=derived_uid(series_uid, "sc-series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derived_uid(series_uid, "sc-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=__version__,
        series_description=sc_series_description(),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.ConversionType = "WSD"  # workstation: a rendered picture, not a digitised film
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"  # numbers and labels are drawn into the pixels
    # General Series Laterality is Type 2C, required for paired body parts: naming the
    # (unpaired) body part settles the condition (dciodvfy asks for it otherwise).
    sc.BodyPartExamined = "ABDOMEN"
    return sc
