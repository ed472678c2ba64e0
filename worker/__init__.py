"""l3spot worker: computes (volume -> mip -> locate -> composition -> dicom_out) and exports.

The worker never imports :mod:`service`; data flows one way, from the node that receives
and enqueues to the worker that computes and returns.
"""

__version__ = "0.1.0"
ALGORITHM_NAME = "l3spot"
