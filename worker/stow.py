"""Sending results to a DICOMweb service: STOW-RS (PS3.18 10.5), all objects in one request.

One call = one attempt against one destination, answered as the C-STORE sender's
:class:`worker.outcome.ExportOutcome`, so :func:`worker.tasks.run_export` retries, records
and logs both kinds the same way. The request is built and sent by ``dicomweb-client``
(its own retries off: retrying is the task's business); the answer is read here, by
PS3.18 Table 10.5.3-1:

* 200 OK: every instance stored (``ReferencedSOPSequence``);
* 202 Accepted: some stored, the others listed in ``FailedSOPSequence`` (0008,1198), each
  with its Failure Reason (0008,1197) (a 202 without failures, warnings only, is stored; a
  202 without a readable response data set is not: nobody can tell what was stored);
* 400 Bad Request, 409 Conflict, 413, 415: nothing stored, the server refused these objects
  (the reasons per instance when the body lists them): the destination is up;
* 401/403: our credentials are refused; 404/405: no STOW-RS service at that URL; 429 and
  5xx: the server cannot store now. No HTTP answer: the network says why (refused, DNS,
  timeout, TLS).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from core.config import DicomwebDestination
from core.dicomweb import (
    CredentialsError,
    HttpFailure,
    http_session,
    http_status_text,
    request_failure,
    request_timeout,
)
from core.logs import log_event
from worker.outcome import ExportOutcome, FailureKind

log = logging.getLogger(__name__)

#: Failure Reasons that PS3.18 Annex I (Table I.2-1 of the STOW-RS Storage Service) adds
#: to the C-STORE statuses of PS3.4 Table B.2-1.
STOW_FAILURE_REASONS = {
    0xC122: "Referenced Transfer Syntax not supported",
    0x0122: "Referenced SOP Class not supported",
    0x0110: "Processing failure",
    0x0124: "Refused: not authorized",
}

#: HTTP statuses after which the server was reached and refused these objects (the series'
#: own problem, not the server's availability; PS3.18 Table 10.5.3-1).
REFUSED_OBJECTS_STATUSES = frozenset({400, 409, 413, 415, 422})

#: A request body this large is still sent with a Content-Length (dicomweb-client switches
#: to chunked transfer encoding above its chunk size, which some servers and proxies refuse);
#: the whole message is in memory either way.
_CHUNK_BYTES = 2**31

_NETWORK_KINDS = {
    HttpFailure.DNS: FailureKind.DNS,
    HttpFailure.REFUSED: FailureKind.CONNECTION_REFUSED,
    HttpFailure.CONNECT_TIMEOUT: FailureKind.CONNECT_TIMEOUT,
    HttpFailure.READ_TIMEOUT: FailureKind.NO_STORE_RESPONSE,
    HttpFailure.TLS: FailureKind.TLS,
    HttpFailure.NETWORK: FailureKind.NETWORK,
}


def failure_reason_text(code: int | None) -> str:
    """``0xA700 (Refused: Out of Resources)``: a Failure Reason (0008,1197) and its meaning."""
    if code is None:
        return "no Failure Reason"
    meaning = (
        STOW_FAILURE_REASONS.get(code) or STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown"))[1]
    )
    return f"0x{code:04X} ({meaning})"


def send_stow(files: list[Path], dest: DicomwebDestination, timeout_s: float) -> ExportOutcome:
    """STOW-RS ``files`` to ``dest`` in one ``multipart/related; type="application/dicom"``
    request to ``{url}/studies`` (PS3.18 10.5.1).

    Parameters
    ----------
    files : DICOM Part 10 files (SEG, SR, SC).
    dest : the DICOMweb destination (authentication and TLS as configured,
        :func:`core.dicomweb.http_session`).
    timeout_s : connect and read timeout (s) unless ``dest.timeout_seconds`` is set.

    Returns
    -------
    ExportOutcome
        ``ok`` when every instance was stored; otherwise the :class:`FailureKind`, the
        status (the first Failure Reason, ``"0xA700"``, or the HTTP status, ``"HTTP 503"``)
        and one line for an operator. Never raises for network or remote failures.
    """
    label = dest.label
    timeout = request_timeout(dest, timeout_s)
    try:
        session = http_session(dest)
    except CredentialsError as exc:
        return ExportOutcome(False, None, str(exc), kind=FailureKind.CREDENTIALS)
    datasets = [pydicom.dcmread(f) for f in files]
    answers: list[requests.Response] = []

    def keep(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        answers.append(response)
        return response

    client = DICOMwebClient(
        dest.url, session=session, timeout=timeout, callback=keep, chunk_size=_CHUNK_BYTES
    )
    client.set_http_retry_params(retry=False)
    with session:
        try:
            client.store_instances(datasets)
        except requests.HTTPError:  # 4xx/5xx (raise_for_status); the answer is read below
            pass
        except requests.RequestException as exc:
            kind, why = request_failure(exc, dest.url, timeout)
            return ExportOutcome(False, None, f"{label}: {why}", kind=_NETWORK_KINDS[kind])
        except (ValueError, KeyError, TypeError):  # dicomweb-client could not read the body
            if not answers:
                raise
    return stow_outcome(answers[-1], datasets, label)


def _response_dataset(response: requests.Response) -> Dataset | None:
    """The STOW-RS response body (PS3.18 10.5.3.1, a DICOM JSON or XML data set), or None."""
    if not response.content:
        return None
    media = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    try:
        if media in ("application/dicom+json", "application/json"):
            data = response.json()
            if isinstance(data, list):  # some servers wrap the data set in an array
                data = data[0] if data else {}
            return Dataset.from_json(data) if isinstance(data, dict) else None
        if media in ("application/dicom+xml", "application/xml", "text/xml"):
            from xml.etree.ElementTree import fromstring

            from dicomweb_client.web import _load_xml_dataset

            return _load_xml_dataset(fromstring(response.content))  # type: ignore[no-any-return]
    except Exception as exc:  # noqa: BLE001 (a malformed body: the HTTP status still says it)
        log_event(log, "stow_response_unreadable", logging.WARNING, error=type(exc).__name__)
    return None


def stow_outcome(response: requests.Response, datasets: list[Dataset], label: str) -> ExportOutcome:
    """Read a STOW-RS response (PS3.18 Table 10.5.3-1) into an :class:`ExportOutcome`.

    Parameters
    ----------
    response : the HTTP response to the POST.
    datasets : the instances sent (their number and SOP Instance UIDs).
    label : the destination's label (the start of the error text).
    """
    code = response.status_code
    ds = _response_dataset(response)
    failed = list(getattr(ds, "FailedSOPSequence", None) or []) if ds is not None else []
    referenced = list(getattr(ds, "ReferencedSOPSequence", None) or []) if ds is not None else []
    stored = [
        str(i.ReferencedSOPInstanceUID) for i in referenced if "ReferencedSOPInstanceUID" in i
    ]
    http = http_status_text(code)
    if code == 202 and ds is None:
        # "some instances stored" without the list of which: cannot call it delivered
        return ExportOutcome(
            False,
            "HTTP 202",
            f"{label}: STOW-RS answered {http} without a readable response data set "
            "(PS3.18 10.5.3.1): cannot tell which instances were stored",
            kind=FailureKind.STORE_STATUS,
        )
    if 200 <= code < 300 and not failed:
        return ExportOutcome(True, stored=stored or [str(d.SOPInstanceUID) for d in datasets])
    if failed:
        reasons = [int(i.FailureReason) if "FailureReason" in i else None for i in failed]
        items = []
        for item, reason in zip(failed, reasons, strict=True):
            uid = str(item.get("ReferencedSOPInstanceUID", "?"))
            sop_class = item.get("ReferencedSOPClassUID")
            what = f" ({UID(str(sop_class)).name})" if sop_class else ""
            items.append(f"{uid}{what}: {failure_reason_text(reason)}")
        first = next((r for r in reasons if r is not None), None)
        status = f"0x{first:04X}" if first is not None else f"HTTP {code}"
        return ExportOutcome(
            False,
            status,
            f"{label}: {len(failed)} of {len(datasets)} instances not stored (STOW-RS "
            f"answered {http}): " + "; ".join(items),
            stored=stored,
            kind=FailureKind.STORE_STATUS,
        )
    if code in (401, 403):
        kind = FailureKind.UNAUTHORIZED
    elif code in REFUSED_OBJECTS_STATUSES:
        kind = FailureKind.STORE_STATUS
    else:
        kind = FailureKind.HTTP_STATUS
    return ExportOutcome(
        False, f"HTTP {code}", f"{label}: no instance stored, STOW-RS answered {http}", kind=kind
    )
