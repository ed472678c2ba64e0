"""Re-queue one series: what ``l3spot retry`` and the web page's retry button both do."""

from __future__ import annotations

from typing import Any

from core.config import Config
from core.errors import L3SpotError
from core.jobs import JobNotFoundError, JobStore
from core.layout import result_files, series_results_dir
from core.queue import send_analysis, send_export
from service.spool import Spool

#: Why a retry can fail: code -> explanation (the page shows the explanation for the code).
RETRY_ERRORS = {
    "no_record": "no job record",
    "not_in_spool": "its instances are not in the spool any more",
}


class RetryError(L3SpotError, LookupError):
    """The series cannot be re-queued; ``code`` is a key of :data:`RETRY_ERRORS`."""

    def __init__(self, series_uid: str, code: str) -> None:
        self.code = code
        self.reason = RETRY_ERRORS[code]
        super().__init__(f"series {series_uid}: {self.reason}", series_uid=series_uid)


def requeue_series(
    config: Config, store: JobStore, celery: Any, series_uid: str, analysis: bool = False
) -> str:
    """Re-queue one series: its export if its results exist, else its analysis.

    Used by ``l3spot retry`` and the web page's retry button. When the
    analysis finished, result files exist and export destinations are configured (and
    ``analysis`` is false), the export rows are reset, the job gets a new token and the
    export task is sent;
    otherwise the job gets a new token (state ``queued``) and the analysis task is sent.

    Parameters
    ----------
    config : the configuration.
    store : the job records.
    celery : the configured Celery app (``send_task``).
    series_uid : Series Instance UID.
    analysis : re-run the analysis even if results exist.

    Returns
    -------
    "export" or "analysis": what was re-queued.

    Raises
    ------
    RetryError
        No job record for ``series_uid``, or its instances are no longer in the spool.
    """
    try:
        rec = store.get(series_uid)
    except JobNotFoundError as exc:
        raise RetryError(series_uid, "no_record") from exc
    results = series_results_dir(config.node.resolved_results_dir(), series_uid)
    if (
        not analysis
        and rec.analysis_finished_at is not None
        and result_files(results)
        and config.export.destinations
    ):
        store.start_export(series_uid, [d.label for d in config.export.destinations])
        token = store.renew_token(series_uid)  # an older export chain still retrying stops
        send_export(celery, series_uid, token)
        return "export"
    spool = Spool(config.node.spool_dir, config.node.resolved_quarantine_dir())
    series_dir = spool.series_path(series_uid, rec.series_dir)
    if series_dir is None:
        raise RetryError(series_uid, "not_in_spool")
    token = store.mark_queued(series_uid)
    send_analysis(celery, series_dir, token)
    return "analysis"
