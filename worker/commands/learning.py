"""``l3spot train --from-reviews``: the locator learns from the readers' reviews (issue 17).

Called by ``l3spot train --from-reviews`` (:mod:`worker.commands.locator`); the work is
:func:`worker.training.from_reviews.train_from_reviews`, the versions it makes are listed,
promoted and rolled back with ``l3spot models`` (:mod:`service.commands.models`).
"""

from __future__ import annotations

import getpass
import logging
import shlex
import sys
from pathlib import Path

import typer

from core.commands import fail
from core.commands import load_for_cli as _load
from core.logs import log_event

log = logging.getLogger("l3spot.training")


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def train_from_reviews_command(
    config: Path | None,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    phantoms: int,
    phantom_seed: int,
    bench_phantoms: int,
    holdout_fraction: float,
    min_train: int,
    min_holdout: int,
    seed: int,
    device: str,
    cache_dir: Path,
    promote: bool,
    git_commit: str,
) -> None:
    """``l3spot train --from-reviews`` (:func:`worker.training.from_reviews.train_from_reviews`)."""
    from core.jobs import JobStore
    from worker.training.from_reviews import (
        FromReviewsSettings,
        NotEnoughReviewsError,
        train_from_reviews,
    )

    cfg = _load(config)
    store = JobStore.from_config(cfg)
    settings = FromReviewsSettings(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        phantoms=phantoms,
        phantom_seed=phantom_seed,
        bench_phantoms=bench_phantoms,
        holdout_fraction=holdout_fraction,
        min_train=min_train,
        min_holdout=min_holdout,
        seed=seed,
        device=device,
        cache_dir=cache_dir,
    )
    record = {
        "command": "l3spot " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "git_commit": git_commit,
    }
    try:
        outcome = train_from_reviews(
            cfg,
            store.reviews(),
            settings,
            promote=promote,
            by=f"{_actor()} (l3spot train --from-reviews)",
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
