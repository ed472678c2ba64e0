"""l3spot worker: the analysis process.

A series flows through the subpackages in this order: :mod:`.volume` (DICOM or NIfTI -> HU
volume) -> :mod:`.mip` (frontal MIP) -> :mod:`.locator` (the L3 slice) -> :mod:`.composition`
(SMA, IMAT, VAT, SAT) -> :mod:`.outputs` (SEG, SR, SC); :mod:`.pipeline` runs them,
:mod:`.tasks` are the Celery tasks and :mod:`.export` sends the results to the PACS.
The worker imports :mod:`core`, never :mod:`service`.
"""
