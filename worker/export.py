"""Sending results to a PACS: C-STORE SCU (pynetdicom), all objects on one association.

One call = one attempt against one destination. Retries with exponential backoff are the
task's business (:mod:`worker.tasks`), so a PACS that is down never blocks a worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from core.config import Destination, ExportConfig
from core.logs import log_event
from core.netpatch import guard_scu_reactor

log = logging.getLogger(__name__)

#: Result objects of one series, in sending order (SEG only exists when L3 was found).
#: C-STORE statuses that mean "stored" (PS3.4 Table B.2-1: success and the warnings
#: B000 coercion of data elements, B007 data set does not match SOP class, B006 elements
#: discarded).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


@dataclass
class ExportOutcome:
    """Result of one attempt to deliver a series' objects to one destination.

    Attributes
    ----------
    ok : every object was stored.
    status : the remote DIMSE status of the first failure (``"0xA700"``) or None.
    error : human-readable failure (association rejected, timeout, status), or None.
    stored : SOP Instance UIDs the destination accepted.
    """

    ok: bool
    status: str | None = None
    error: str | None = None
    stored: list[str] = field(default_factory=list)


def backoff_seconds(attempt: int, export: ExportConfig) -> float:
    """Wait before retry number ``attempt`` (1-based): initial x 2^(attempt-1), capped."""
    return float(
        min(export.backoff_initial_seconds * 2 ** max(attempt - 1, 0), export.backoff_max_seconds)
    )


def send_results(
    files: list[Path], dest: Destination, calling_ae_title: str, timeout_s: float = 30.0
) -> ExportOutcome:
    """C-STORE ``files`` to ``dest`` over a single association.

    Parameters
    ----------
    files : DICOM Part 10 files (SEG, SR, SC).
    dest : the destination SCP.
    calling_ae_title : our AE title.
    timeout_s : ACSE, DIMSE and network timeout (s).

    Returns
    -------
    ExportOutcome
        Never raises for network or remote failures; they are reported in the outcome.
    """
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    seen: set[str] = set()
    for ds in datasets:
        sop_class = str(ds.SOPClassUID)
        if sop_class in seen:
            continue
        seen.add(sop_class)
        syntaxes = [str(ds.file_meta.TransferSyntaxUID)]
        syntaxes += [
            s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s not in syntaxes
        ]
        ae.add_requested_context(sop_class, syntaxes)
    label = dest.label
    series_uid = str(datasets[0].get("SeriesInstanceUID", "")) if datasets else ""
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    except (OSError, RuntimeError) as exc:
        return _logged(ExportOutcome(False, None, f"{label}: cannot associate: {exc}"), series_uid)
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        return _logged(ExportOutcome(False, None, f"{label}: association {what}"), series_uid)
    guard_scu_reactor(assoc)
    outcome = ExportOutcome(True)
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.Status) if "Status" in status else None
            if code is None or code not in STORED_STATUSES:
                outcome.ok = False
                outcome.status = None if code is None else f"0x{code:04X}"
                comment = str(status.get("ErrorComment", "")) if code is not None else ""
                outcome.error = (
                    f"{label}: no C-STORE response (timeout or abort)"
                    if code is None
                    else f"{label}: C-STORE status {outcome.status} {comment}".strip()
                )
                break
            outcome.stored.append(str(ds.SOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()
    return _logged(outcome, series_uid)


def _logged(outcome: ExportOutcome, series_uid: str) -> ExportOutcome:
    log_event(
        log,
        "export_attempt",
        level=logging.INFO if outcome.ok else logging.WARNING,
        ok=outcome.ok,
        status=outcome.status,
        error=outcome.error,
        stored=len(outcome.stored),
        series_instance_uid=series_uid,
    )
    return outcome
