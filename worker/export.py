"""Sending results to a PACS: C-STORE SCU (pynetdicom), all objects on one association.

One call = one attempt against one destination. Retries with exponential backoff are the
task's business (:mod:`worker.tasks`), so a PACS that is down never blocks a worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from worker.config import Destination, ExportConfig
from worker.logs import log_event

log = logging.getLogger(__name__)

#: Result objects of one series, in sending order (SEG only exists when L3 was found).
RESULT_FILES = ("seg.dcm", "sr.dcm", "sc.dcm")
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


def destination_label(dest: Destination) -> str:
    """``AE@host:port``, the key of a destination in the job records."""
    return f"{dest.ae_title}@{dest.host}:{dest.port}"


def backoff_seconds(attempt: int, export: ExportConfig) -> float:
    """Wait before retry number ``attempt`` (1-based): initial x 2^(attempt-1), capped."""
    return float(
        min(export.backoff_initial_seconds * 2 ** max(attempt - 1, 0), export.backoff_max_seconds)
    )


def result_files(results_dir: Path) -> list[Path]:
    """The result objects present in ``results_dir``, in :data:`RESULT_FILES` order."""
    return [results_dir / n for n in RESULT_FILES if (results_dir / n).is_file()]


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
    label = destination_label(dest)
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


def guard_scu_reactor(assoc: Any) -> None:
    """Keep a requestor association's reactor from taking the responses its caller awaits.

    pynetdicom 3.0.4 runs a reactor thread on requestor associations too; it looks at the
    DIMSE queue with ``get_msg(block=False)`` (``Association._run_reactor``) between the
    caller's requests. ``send_c_store`` pauses it with ``_reactor_checkpoint.clear()`` then
    ``while not _is_paused``, but ``_is_paused`` is still True from the reactor's previous
    pause when the reactor was woken by the previous ``send_c_store`` and has not run yet
    (a busy CPU, the GIL): the request goes out, the reactor resumes, takes the C-STORE-RSP
    off the queue and drops it ("Received unexpected C-STORE service message"), and
    ``send_c_store`` waits its whole DIMSE timeout (30 s) and aborts. Only the reactor calls
    ``get_msg`` without blocking (every ``send_*`` blocks), so answering it "no message"
    leaves every response to the ``send_*`` waiting for it. Use on associations that only
    send requests (C-STORE, C-ECHO); call it right after the association is established.
    See docs/reliability.md "The 30 s C-STORE stall".
    """
    get_msg = assoc.dimse.get_msg

    def get_msg_for_callers_only(block: bool = False) -> Any:
        if not block:  # the reactor's look: responses belong to the waiting send_*
            return None, None
        return get_msg(block=True)

    assoc.dimse.get_msg = get_msg_for_callers_only


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
