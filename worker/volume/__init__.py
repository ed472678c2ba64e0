"""CT series in and out: DICOM/NIfTI loading to an HU volume, and writing a CT series."""
