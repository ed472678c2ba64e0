"""l3spot service: the DICOM node that receives CT series, spools them and enqueues analysis."""
