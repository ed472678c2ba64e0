"""l3spot as equipment: the General Equipment values and the Contributing Equipment item.

IHE Radiology AI Results (AIR), section 6.5.3.1 "General Result Encoding Requirements": the
creator of a result describes each algorithm that produced it in the Contributing Equipment
Sequence (0018,A001) with Manufacturer, Manufacturer's Model Name, Software Versions and
Device UID (PS3.3 C.12.1.1.5). The SEG and the SR carry the same item, and the same values in
their General Equipment module, so a PACS or viewer can tell which l3spot version made them.

Device UID is left out of the item: the dciodvfy we validate with (Debian's dicom3tools) does
not know it in this sequence and reports the object as a Standard Extended SOP Class. The
version's UID is the SR's Device Observer UID (TID 1004,
``worker.outputs.uids.device_observer_uid``).

The Purpose of Reference is DCM 109102 "Processing Equipment" (CID 7005): AIR Rev 1.1 names a
placeholder code (``Newcode1``, ``99IHE``, "Processing Algorithm") that DICOM has not
assigned, which neither dciodvfy nor a PACS would recognise; 109102 is the standard code for
equipment that processed the source images into this object (highdicom uses it for itself).
"""

from __future__ import annotations

import datetime

from highdicom import ContributingEquipment
from pydicom import Dataset
from pydicom.sr.codedict import codes

from core import ALGORITHM_NAME, __version__
from core.derived import MANUFACTURER, MANUFACTURER_MODEL_NAME

#: Device Serial Number (General Equipment, Type 1 in the SEG's Enhanced General Equipment):
#: software has no serial number; "0" as the SEG always wrote.
DEVICE_SERIAL_NUMBER = "0"


def equipment_attributes(version: str = __version__) -> dict[str, str]:
    """General Equipment keyword arguments for highdicom (model name, versions, serial)."""
    return {
        "manufacturer_model_name": MANUFACTURER_MODEL_NAME,
        "software_versions": version,
        "device_serial_number": DEVICE_SERIAL_NUMBER,
    }


def algorithm_equipment(
    version: str = __version__, when: datetime.datetime | None = None
) -> ContributingEquipment:
    """The Contributing Equipment item of l3spot (IHE AIR 6.5.3.1).

    Parameters
    ----------
    version : l3spot's version (Software Versions).
    when : Contribution DateTime (the analysis); now when not given.

    Returns
    -------
    highdicom.ContributingEquipment
        Purpose of Reference DCM 109102 "Processing Equipment", Manufacturer ``l3spot``,
        Manufacturer's Model Name, Software Versions, Device Serial Number, Contribution
        DateTime and Description.
    """
    return ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=version,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        contribution_datetime=when or datetime.datetime.now(),
        contribution_description=(
            f"{ALGORITHM_NAME} {version}: automated L3 localisation and body composition "
            "(SMA, IMAT, VAT, SAT)"
        ),
    )


def name_model_version(ds: Dataset, model_version: str | None) -> None:
    """Name the locator version that chose the L3 slice in a SEG's or SR's Software Versions.

    Software Versions (0018,1020, LO, VM 1-n) of the General Equipment module and of
    l3spot's Contributing Equipment item become ``[<l3spot version>, "locator <version>"]``
    (``site-0003``, or ``shipped (...)`` for the configured weights; issue 17: the SR names
    the model version that produced it). Nothing changes when ``model_version`` is None.

    Parameters
    ----------
    ds : the SEG or SR (highdicom object), changed in place.
    model_version : :func:`core.model_registry.active_locator`'s label, at most 55
        characters kept (LO is 64 characters).
    """
    if not model_version:
        return
    versions = [str(__version__), f"locator {model_version}"[:64]]
    ds.SoftwareVersions = versions
    for item in ds.get("ContributingEquipmentSequence", []):
        if (
            str(item.get("Manufacturer", "")) == MANUFACTURER
            and str(item.get("ManufacturerModelName", "")) == MANUFACTURER_MODEL_NAME
        ):  # l3spot's own item, not the source images' equipment
            item.SoftwareVersions = versions
