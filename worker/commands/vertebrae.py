"""CLI command ``train-spine``: train and evaluate the level-verification network.

See :mod:`worker.locator.vertebrae` (inference) and :mod:`worker.training.vertebrae`
(training, Mita et al.).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from core.commands import command_line, git_commit

#: Held-out phantom seeds of the evaluation (never trained on: training seeds start at
#: 9,000,000 and a run uses fewer than 500,000 of them).
EVAL_SEED = 9_500_000
#: Transitional-anatomy phantoms of the evaluation, their seeds from here.
TRANSITIONAL_SEED = 9_800_000
#: The transitional phantoms evaluated (worker.phantom.PhantomSpec fields): a sixth lumbar
#: vertebra, a sacralised fifth, a thirteenth rib pair (4 lumbar below it), eleven rib pairs
#: (6 lumbar below them).
TRANSITIONAL_SPECS: tuple[dict[str, int], ...] = (
    {"n_lumbar": 6, "n_rib_pairs": 12},
    {"n_lumbar": 4, "n_rib_pairs": 12},
    {"n_rib_pairs": 13},
    {"n_rib_pairs": 11},
)


def evaluation_sets(n_eval: int, n_transitional: int, cache_dir: Path) -> dict[str, list[Any]]:
    """The held-out typical and transitional boxes (made once, cached)."""
    from worker.phantom import PhantomSpec
    from worker.training.vertebrae import load_cases

    refused: list[tuple[int, str]] = []
    typical = load_cases(range(EVAL_SEED, EVAL_SEED + n_eval), cache_dir, refused=refused)
    trans: list[Any] = []
    for i in range(n_transitional):
        spec = PhantomSpec(**TRANSITIONAL_SPECS[i % len(TRANSITIONAL_SPECS)])
        trans += load_cases([TRANSITIONAL_SEED + i], cache_dir, spec, refused=refused)
    return {"typical": typical, "transitional": trans, "refused": refused}


def train_spine_command(
    out: Annotated[Path, typer.Option(help="Weights file.")] = Path("models/spine_fcn.pt"),
    phantoms: Annotated[int, typer.Option(min=1, help="Training phantoms (style A).")] = 160,
    phantom_seed: Annotated[int, typer.Option()] = 9_000_000,
    steps: Annotated[int, typer.Option(min=1)] = 3000,
    batch: Annotated[int, typer.Option(min=1)] = 2,
    lr: Annotated[float, typer.Option()] = 2e-3,
    eps: Annotated[
        float, typer.Option(help="Adversarial step (normalised HU; 0.03 = 15 HU).")
    ] = 0.03,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option(min=1)] = 2,
    max_minutes: Annotated[float, typer.Option(help="Wall-time budget; stops early.")] = 35.0,
    eval_phantoms: Annotated[int, typer.Option(min=0, help="Held-out typical phantoms.")] = 30,
    eval_transitional: Annotated[int, typer.Option(min=0, help="Transitional phantoms.")] = 24,
    cache_dir: Annotated[Path, typer.Option()] = Path("var/cache/spine_boxes"),
    transitional_every: Annotated[
        int, typer.Option(min=0, help="Every n-th training phantom has transitional anatomy.")
    ] = 4,
    varied_every: Annotated[
        int,
        typer.Option(min=0, help="Every n-th training phantom has a varied spine (0: none)."),
    ] = 2,
    init: Annotated[
        Path | None,
        typer.Option(help="Start from these weights (a fine-tune); recorded with their SHA-256."),
    ] = None,
    evaluate_only: Annotated[
        bool,
        typer.Option(
            "--evaluate-only",
            help="Do not train: evaluate the weights at --out again (after a change of the "
            "counting rules) and replace the evaluation in <out>.json.",
        ),
    ] = False,
) -> None:
    """Train the level-verification network (Mita et al.) on phantom boxes, then evaluate
    it on held-out and transitional phantoms; writes the weights and ``<out>.json``."""
    from tqdm import tqdm

    from worker.training.vertebrae import (
        SpineTrainSettings,
        load_cases,
        train_spine,
    )

    if evaluate_only:
        record = json.loads(out.with_suffix(".json").read_text())
        record["evaluation_command"] = command_line()
        record["evaluation_git_commit"] = git_commit()
        _evaluate(out, record, eval_phantoms, eval_transitional, cache_dir)
        return
    if phantom_seed + phantoms > EVAL_SEED:
        raise typer.BadParameter(f"training seeds must stay below the held-out {EVAL_SEED}")
    # what the run starts from, read before the boxes render (minutes): a commit made
    # meanwhile is not the code the boxes and the weights come from
    commit = git_commit()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    from worker.phantom import PhantomSpec

    cases: list[Any] = []
    refused: list[tuple[int, str]] = []
    with tqdm(total=phantoms, desc="phantom boxes", unit="box") as bar:
        for i in range(phantoms):
            fixed: dict[str, Any] = {}
            if transitional_every and i % transitional_every == transitional_every - 1:
                fixed.update(
                    TRANSITIONAL_SPECS[(i // transitional_every) % len(TRANSITIONAL_SPECS)]
                )
            if varied_every and i % varied_every == 0:
                fixed["spine_variation"] = True
            spec = PhantomSpec(**fixed) if fixed else None
            cases += load_cases(
                [phantom_seed + i], cache_dir, spec, progress=bar.update, refused=refused
            )
    settings = SpineTrainSettings(
        seeds=(phantom_seed, phantom_seed + phantoms - 1),
        steps=steps,
        batch=batch,
        lr=lr,
        eps=eps,
        seed=seed,
        threads=threads,
        max_minutes=max_minutes,
        init=str(init) if init else None,
    )
    record: dict[str, Any] = {
        "command": command_line(),
        "git_commit": commit,
        "seed": seed,
        "data": f"{phantoms} style-A phantoms (worker.phantom.spine_box), seeds "
        f"{phantom_seed}..{phantom_seed + phantoms - 1}; every {transitional_every}-th with "
        f"transitional anatomy ({list(TRANSITIONAL_SPECS)} in turn), the others of the "
        "default population (transitional at its natural 5 % / 6 % rate); every "
        f"{varied_every}-th with a varied spine (worker.phantom.variation)",
        "started": started,
        # no box where the run-time column check refuses (no verification there either)
        "refused_by_column_check": [[seed, why] for seed, why in refused],
    }
    if init is not None:
        from core.digest import file_sha256

        record["init"] = {"path": str(init), "sha256": file_sha256(init)}
        prior = init.with_suffix(".json")
        if prior.is_file():  # what the starting weights saw, for the model card
            record["init"]["record"] = {
                k: v for k, v in json.loads(prior.read_text()).items() if k != "evaluation"
            }
    with tqdm(total=steps, desc="training", unit="step") as bar:

        def step(n: int, loss: float) -> None:
            bar.update(n)
            bar.set_postfix(loss=f"{loss:.4f}")

        record = train_spine(cases, settings, out, record, step)
    del cases
    _evaluate(out, record, eval_phantoms, eval_transitional, cache_dir)


def _evaluate(
    out: Path, record: dict[str, Any], eval_phantoms: int, eval_transitional: int, cache_dir: Path
) -> None:
    """Evaluate the weights at ``out`` on the held-out sets; write ``<out>.json``."""
    from worker.locator.vertebrae import load_spine_model
    from worker.training.vertebrae import evaluate_spine

    net = load_spine_model(out)
    sets = evaluation_sets(eval_phantoms, eval_transitional, cache_dir)
    t0 = time.perf_counter()
    ev = evaluate_spine(net, sets["typical"] + sets["transitional"])
    record["evaluation"] = {
        "held_out": f"{eval_phantoms} typical phantoms (seeds {EVAL_SEED}..) and "
        f"{eval_transitional} transitional ones (seeds {TRANSITIONAL_SEED}.., "
        f"specs {list(TRANSITIONAL_SPECS)}); never trained on",
        "seconds": round(time.perf_counter() - t0, 1),
        # boxes the run-time column check refuses: "unverified" there, not evaluated here
        "refused_by_column_check": [seed for seed, _ in sets["refused"]],
        **ev,
    }
    record["weights_bytes"] = out.stat().st_size
    out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    typer.echo(json.dumps({k: ev[k] for k in ("iou", "levels", "transitional")}, indent=2))
    typer.echo(f"wrote {out} and {out.with_suffix('.json')}")


def register(app: typer.Typer) -> None:
    app.command("train-spine")(train_spine_command)
