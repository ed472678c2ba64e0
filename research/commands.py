"""CLI commands of development-only evaluation: ``evaluate`` (the L3 locator on phantoms or a
site CSV) and ``evaluate-composition`` (the body-composition methods on phantoms and the real
references). Present only where :mod:`research` is installed (not in the runtime image).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from worker.commands.locator import NoRefineOption, RefineOption, _locator_config

#: First seed of style B's reserved validation range (``research.phantom_b.VALIDATION_SEEDS``;
#: a literal here so that the CLI loads without importing the generator).
STYLE_B_FIRST_SEED = 7_000_000


def evaluate(
    phantoms: Annotated[int, typer.Option(help="Evaluate on this many phantoms.")] = 0,
    seed: Annotated[int, typer.Option(help="First phantom seed (disjoint from training).")] = (
        1_000_000
    ),
    csv_path: Annotated[
        Path | None, typer.Option("--csv", help="CSV series_path,l3_slice_index.")
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="Locator weights (default: config).")] = None,
    stride: Annotated[int | None, typer.Option(help="Window stride, MIP pixels.")] = None,
    refine_weights: RefineOption = None,
    no_refine: NoRefineOption = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write all figures.")] = None,
    style: Annotated[
        str,
        typer.Option(
            help="Phantom style: a (worker.phantom, the training generator), b "
            "(research.phantom_b, validation only) or both (a summary per style)."
        ),
    ] = "a",
    seed_b: Annotated[
        int, typer.Option(help="First style-B seed (its reserved validation range).")
    ] = STYLE_B_FIRST_SEED,
) -> None:
    """Evaluate the locator: error in slices and mm, share within 10 mm, not-in-FOV decisions."""
    from research.evaluate_locator import (
        STYLES,
        CaseResult,
        evaluate_csv,
        evaluate_phantoms,
        summarise,
    )
    from worker.training.locator import load_volume_any

    if style not in ("a", "b", "both"):
        raise typer.BadParameter("--style must be a, b or both")

    if phantoms <= 0 and csv_path is None:
        raise typer.BadParameter("give --phantoms N or --csv FILE")
    cfg = _locator_config(weights, stride, refine_weights, no_refine)

    def show(r: CaseResult) -> None:
        typer.echo(json.dumps(r.row()))

    results: list[CaseResult] = []
    by_style: dict[str, list[CaseResult]] = {}
    if phantoms > 0:
        for st in ("a", "b") if style == "both" else (style,):
            first = seed_b if st == "b" else seed
            name = "phantom" if st == "a" else "phantom_b"
            by_style[st] = evaluate_phantoms(phantoms, first, cfg, device, show, STYLES[st], name)
            results += by_style[st]
    if csv_path is not None:
        results += evaluate_csv(csv_path, cfg, load_volume_any, device, show)
    summary = summarise(results)
    summary["weights"] = str(cfg.weights)
    summary["stride_px"] = cfg.stride_px
    summary["refine_weights"] = None if cfg.refine_weights is None else str(cfg.refine_weights)
    report: dict[str, object] = {"overall": summary}
    if len(by_style) > 1:
        for st, res in by_style.items():
            report[f"style_{st}"] = summarise(res)
    typer.echo(json.dumps(report, indent=2))
    if json_out is not None:
        report["cases"] = [r.row() for r in results]
        json_out.write_text(json.dumps(report, indent=2) + "\n")


def evaluate_composition(
    phantoms: Annotated[int, typer.Option(help="Phantom cases (0 = none).")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the first phantom.")] = 5000,
    synthetic: Annotated[bool, typer.Option(help="Synthetic slices instead of phantoms.")] = False,
    real: Annotated[bool, typer.Option(help="Score the real TotalSegmentator references.")] = True,
    method: Annotated[str | None, typer.Option(help="classical or unet (default: config).")] = None,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Print Dice and area error per compartment on phantoms and the real references."""
    from core.config import data_dir, load_config
    from research.evaluate_composition import evaluate_phantoms, evaluate_real, format_summary

    cfg = load_config().composition
    if method:
        cfg = cfg.model_copy(update={"method": method})
    typer.echo(f"method: {cfg.method}")
    if phantoms:
        src, scores = evaluate_phantoms(phantoms, seed, cfg, synthetic=synthetic, device=device)
        typer.echo(format_summary(f"\n[phantoms] {src}, n={phantoms}, seed={seed}", scores))
    if real:
        root = data_dir()
        if not (root / "abdomen_ct_totalseg").is_dir():
            typer.echo(f"real references not found under {root}")
            return
        titles = {
            "tissue_types_raw": "[real] tissue_types T11-L2 (z 82..111), raw reference masks",
            "tissue_types_hu": "[real] tissue_types T11-L2, reference restricted to HU ranges",
            "l3_psoas_paraspinal": "[real] L3 (z 65..79): iliopsoas + autochthon, muscle HU",
            "l3_psoas_paraspinal_oracle": "[real] L3, oracle: every muscle-HU pixel of the "
            "scored region (the labels' anatomy, rim by HU range; no segmentation)",
            "tissue_types_ceiling": "[real] tissue_types T11-L2, oracle with the reference's "
            "anatomy and its one-pixel rim by HU range (the definitional gap; no segmentation)",
        }
        for key, scores in evaluate_real(root, cfg, device=device).items():
            typer.echo(format_summary("\n" + titles[key], scores))


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""
    app.command("evaluate")(evaluate)
    app.command("evaluate-composition")(evaluate_composition)
