"""``l3spot train --from-reviews``: the locator learns from the readers' reviews (issue 17).

Called by ``l3spot train --from-reviews`` (:mod:`worker.commands.locator`); the work is
:func:`worker.training.from_reviews.train_from_reviews`, the versions it makes are listed,
promoted and rolled back with ``l3spot models`` (:mod:`service.commands.models`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from core.commands import command_line, fail, os_user
from core.commands import load_for_cli as _load
from core.logs import log_event
from worker.training.from_reviews import (
    FromReviewsSettings,
    NotEnoughReviewsError,
    train_from_reviews,
)

log = logging.getLogger("l3spot.training")


def train_from_reviews_command(
    config: Path | None, settings: FromReviewsSettings, *, promote: bool, git_commit: str
) -> None:
    """``l3spot train --from-reviews`` (:func:`worker.training.from_reviews.train_from_reviews`)
    with the job store and configuration of ``config``."""
    from core.jobs import JobStore

    cfg = _load(config)
    store = JobStore.from_config(cfg)
    record = {
        "command": command_line(),
        "git_commit": git_commit,
    }
    try:
        outcome = train_from_reviews(
            cfg,
            store.reviews(),
            settings,
            promote=promote,
            by=f"{os_user()} (l3spot train --from-reviews)",
            record=record,
            progress=typer.echo,
        )
    except NotEnoughReviewsError as exc:
        fail(str(exc))
    log_event(
        log,
        "locator_version_trained",
        model_version=outcome.version,
        base_model_version=outcome.base,
        promoted=outcome.promoted,
        reason=outcome.reason,
    )
    typer.echo(
        f"{outcome.version}: {'promoted' if outcome.promoted else 'not promoted'}; "
        f"card {outcome.folder / 'card.md'}"
    )
