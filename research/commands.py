"""CLI commands of development-only evaluation: ``evaluate`` (the L3 locator on phantoms or a
site CSV) and ``evaluate-composition`` (the body-composition methods on phantoms and the real
references). Present only where :mod:`research` is installed (not in the runtime image).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from worker.commands.locator import NoRefineOption, RefineOption, _locator_config

#: Phantom seeds both shipped locator stages were trained on (models/locator_cnn4.md,
#: models/locator_fine_cnn4.md): calibration and test seeds must lie above.
TRAINING_SEEDS = range(0, 1480)
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


def calibrate_locator(
    val_phantoms: Annotated[int, typer.Option(help="Validation phantoms (fit).")] = 200,
    val_seed: Annotated[int, typer.Option(help="First validation seed.")] = 4_000_000,
    test_phantoms: Annotated[int, typer.Option(help="Test phantoms (reported only).")] = 120,
    test_seed: Annotated[int, typer.Option(help="First test seed.")] = 1_000_000,
    max_flagged_share: Annotated[
        float, typer.Option(help="Flag at most this share of validation answers.")
    ] = 0.10,
    out: Annotated[
        Path | None,
        typer.Option(help="Calibration file (default: beside the first-stage weights)."),
    ] = None,
    png: Annotated[Path | None, typer.Option(help="Reliability diagram PNG.")] = Path(
        "docs/images/locator_reliability.png"
    ),
    cache: Annotated[Path | None, typer.Option(help="Keep the phantom cases here.")] = Path(
        "var/calibration"
    ),
    weights: Annotated[Path | None, typer.Option(help="Locator weights (default: config).")] = None,
    refine_weights: RefineOption = None,
    no_refine: NoRefineOption = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    score: Annotated[
        str | None, typer.Option(help="Score to map (default: best validation AUC).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write all figures.")] = None,
) -> None:
    """Calibrate the locator's confidence to P(within 10 mm) on validation phantoms; report
    reliability on test phantoms (models/locator_cnn4.md, "Calibrated confidence")."""
    import sys

    import numpy as np

    from core.commands import git_commit
    from research.calibrate_locator import (
        brier,
        build_calibration,
        cached_cases,
        case_scores,
        flag_stats,
        reliability_table,
        render_reliability_png,
    )
    from worker.locator.calibration import calibration_path

    val = range(val_seed, val_seed + val_phantoms)
    test = range(test_seed, test_seed + test_phantoms)
    if val_seed < TRAINING_SEEDS.stop or test_seed < TRAINING_SEEDS.stop:
        raise typer.BadParameter(f"seeds must lie above the training seeds {TRAINING_SEEDS}")
    if set(val) & set(test):
        raise typer.BadParameter("validation and test seeds overlap")
    cfg = _locator_config(weights, None, refine_weights, no_refine)
    out = out or calibration_path(cfg.weights)

    def progress(c: object) -> None:
        typer.echo(json.dumps(getattr(c, "__dict__", {})), err=True)

    sub = (lambda name: None) if cache is None else (lambda name: cache / name)
    vcases = cached_cases(val_phantoms, val_seed, cfg, sub("val"), device, progress)
    provenance = {
        "command": "l3spot " + " ".join(sys.argv[1:]),
        "git_commit": git_commit(),
        "validation_seeds": [val.start, val.stop - 1],
        "test_seeds": [test.start, test.stop - 1],
        "training_seeds": [TRAINING_SEEDS.start, TRAINING_SEEDS.stop - 1],
        "phantoms": "worker.training.locator.phantom_mips(seed, training=False)",
        "score_given": score is not None,
    }
    cal = build_calibration(vcases, cfg, provenance, max_flagged_share, score)
    tcases = cached_cases(test_phantoms, test_seed, cfg, sub("test"), device, progress)
    tans = [c for c in tcases if c.answered]
    traw = np.array([c.confidence_raw for c in tans])
    tok = np.array([c.within for c in tans])
    tp = cal.probabilities(case_scores(tans, cal.score))
    vans = [c for c in vcases if c.answered]
    vp = cal.probabilities(case_scores(vans, cal.score))
    vok = np.array([c.within for c in vans])
    test_figures = {
        "n_test_phantoms": len(tcases),
        "n_test_answers": len(tans),
        "n_test_within": int(tok.sum()),
        "test_flag": flag_stats(tp, tok, cal.flag_below),
        "test_flag_raw_0.5": flag_stats(traw, tok, 0.5),
        "test_brier": brier(tp, tok),
        "test_brier_raw": brier(traw, tok),
        "test_reliability": reliability_table(tp, tok),
        "validation_reliability": reliability_table(vp, vok),
        "validation_flag_raw_0.5": flag_stats(np.array([c.confidence_raw for c in vans]), vok, 0.5),
    }
    cal.record.update(test_figures)
    cal.save(out)
    typer.echo(f"wrote {out}")
    typer.echo(json.dumps({k: v for k, v in cal.to_dict().items() if k != "record"}, indent=2))
    typer.echo(json.dumps(cal.record, indent=2))
    if png is not None:
        render_reliability_png(
            [
                (f"validation {val.start}..{val.stop - 1}", vp, vok, (0, 70, 200)),
                (f"test {test.start}..{test.stop - 1}", tp, tok, (220, 120, 0)),
            ],
            cal,
            png,
        )
        typer.echo(f"wrote {png}")
    if json_out is not None:
        json_out.write_text(json.dumps(cal.to_dict(), indent=2) + "\n")


def calibrate_levels(
    cases: Annotated[
        list[Path],
        typer.Option(help="evaluate-levels --json files of validation phantoms (fit)."),
    ],
    test: Annotated[
        list[Path] | None,
        typer.Option(help="evaluate-levels --json files of other seeds (reported only)."),
    ] = None,
    max_flagged_share: Annotated[
        float, typer.Option(help="Flag at most this share of validation answers.")
    ] = 0.20,
    out: Annotated[
        Path | None,
        typer.Option(help="Level calibration file (default: beside the verification weights)."),
    ] = None,
    png: Annotated[Path | None, typer.Option(help="Reliability diagram PNG.")] = Path(
        "docs/images/level_reliability.png"
    ),
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write all figures.")] = None,
) -> None:
    """Calibrate the final answer's confidence on the level verification's verdict: P(within
    10 mm) per verdict, fitted on validation cases of ``l3spot evaluate-levels --json``, with
    the flag threshold; reliability on test cases (models/spine_fcn.md, "Confidence after
    the count")."""
    import sys

    from core.commands import git_commit
    from research.calibrate_levels import (
        answered,
        build_level_calibration,
        level_probabilities,
        level_report,
        load_level_cases,
        outcomes,
    )
    from research.calibrate_locator import render_reliability_png
    from research.evaluate_levels import weights_sha256
    from worker.locator.calibration import calibration_path

    cfg = _locator_config(None, None)
    if not cfg.verify_weights:
        raise typer.BadParameter("locator.verify_weights is not set: nothing to calibrate")
    vcases, shas = load_level_cases(cases)
    if shas != weights_sha256(cfg, cfg.verify_weights):
        raise typer.BadParameter("the cases were made with other weights than the configured ones")
    tcases: list[Any] = []
    if test:
        tcases, tshas = load_level_cases(test)
        if tshas != shas:
            raise typer.BadParameter("the test cases were made with other weights")
        if {c.name for c in tcases} & {c.name for c in vcases}:
            raise typer.BadParameter("validation and test cases share phantoms")
    provenance = {
        "command": "l3spot " + " ".join(sys.argv[1:]),
        "git_commit": git_commit(),
        "validation_cases": [str(p) for p in cases],
        "validation_phantoms": [vcases[0].name, vcases[-1].name, len(vcases)],
        "test_cases": [str(p) for p in test or []],
        "test_phantoms": [tcases[0].name, tcases[-1].name, len(tcases)] if tcases else None,
    }
    cal = build_level_calibration(vcases, shas, provenance, max_flagged_share)
    if tcases:
        cal.record["test"] = level_report(cal, tcases)
    out = out or calibration_path(cfg.verify_weights)
    cal.save(out)
    typer.echo(f"wrote {out}")
    typer.echo(json.dumps(cal.record, indent=2))
    if png is not None:
        sets = [("validation", answered(vcases), (0, 70, 200))]
        if tcases:
            sets.append(("test", answered(tcases), (220, 120, 0)))
        render_reliability_png(
            [(label, level_probabilities(cal, a), outcomes(a), rgb) for label, a, rgb in sets],
            cal,
            png,
        )
        typer.echo(f"wrote {png}")
    if json_out is not None:
        json_out.write_text(json.dumps(cal.to_dict(), indent=2) + "\n")


def evaluate_crops(
    weights: Annotated[Path | None, typer.Option(help="Locator weights (default: config).")] = None,
    refine_weights: RefineOption = None,
    no_refine: NoRefineOption = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the rows.")] = None,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Without the level verification.")
    ] = False,
    probes: Annotated[
        bool,
        typer.Option(
            "--probes",
            help="Also read edited real boxes (hip bones removed, sacral marrow brightened).",
        ),
    ] = False,
) -> None:
    """Run the locator on crops of the real abdomen CT as scanners crop (evaluation data only,
    never training data) and print a table; also the real chest series (not in the FOV)."""
    from core.config import data_dir
    from research.evaluate_crops import evaluate_real_crops, format_table

    cfg = _locator_config(weights, None, refine_weights, no_refine)
    if no_verify:
        cfg = cfg.model_copy(update={"verify_weights": None})
    rows = evaluate_real_crops(data_dir(), cfg, device)
    typer.echo(format_table(rows))
    bones = None
    if cfg.verify_weights:
        from research.evaluate_crops import real_bone_recognition

        bones = real_bone_recognition(data_dir(), cfg.verify_weights, probes=probes)
        typer.echo("\nWhat the level network calls the real case's bones (share of each")
        typer.echo("TotalSegmentator label's voxels in the box, by class):")
        for box_name, table in bones.items():
            typer.echo(f"{box_name}:")
            for name, row in table.items():
                typer.echo(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    if json_out is not None:
        out = [r.row() for r in rows]
        if bones is not None:
            out.append({"real_bone_recognition": bones})
        json_out.write_text(json.dumps(out, indent=2) + "\n")


def evaluate_levels(
    style: Annotated[
        str,
        typer.Option(
            help="Phantom style: a (training generator), b, or bt (style B with transitional "
            "anatomy only, in scans that hold the lower ribs and the sacrum)."
        ),
    ] = "b",
    phantoms: Annotated[int, typer.Option(min=1)] = 60,
    seed: Annotated[
        int | None,
        typer.Option(help="First seed (default: a 1,000,000 held out; b 7,000,000; bt 7,500,000)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "cpu",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the cases.")] = None,
    verify_weights: Annotated[
        list[Path] | None,
        typer.Option(
            "--verify-weights",
            help="Level-verification weights to compare on the same volumes (give it twice "
            "for a paired comparison; default: the configured ones).",
        ),
    ] = None,
    pixel_mm: Annotated[
        float | None,
        typer.Option(
            min=0.3,
            help="Render styles b and bt at this in-plane pixel size (mm) instead of 2.5 mm, "
            "with the same field of view and anatomy (scanners use 0.6-1 mm).",
        ),
    ] = None,
) -> None:
    """Run the whole locator (with the level verification) on phantom volumes and print the
    accuracy before and after the verification (models/spine_fcn.md); with two
    ``--verify-weights``, also where the two differ scan by scan (McNemar)."""
    from research.evaluate_levels import (
        compare_verification,
        format_levels,
        paired,
        summarise,
        weights_sha256,
    )

    first_seeds = {"a": 1_000_000, "b": 7_000_000, "bt": 7_500_000}
    first = seed if seed is not None else first_seeds.get(style, 0)
    cfg = _locator_config(None, None)
    weights = list(verify_weights) if verify_weights else [cfg.verify_weights]
    runs = compare_verification(
        style,
        range(first, first + phantoms),
        cfg,
        weights,
        device,
        each=lambda c: typer.echo(
            f"{c.name}: {c.status}, error {c.error_before_mm} -> {c.error_after_mm} mm",
            err=True,
        ),
        pixel_mm=pixel_mm,
    )
    seeds = f"seeds {first}..{first + phantoms - 1}" + (
        f", {pixel_mm} mm pixels" if pixel_mm is not None else ""
    )
    out: dict[str, Any] = {}
    for key, cases in runs.items():
        summary = summarise(cases)
        name = f"style {style}, {seeds}" + (f", {key}" if len(runs) > 1 else "")
        typer.echo(format_levels(name, summary))
        out[key] = {"summary": summary, "cases": [c.row() for c in cases]}
    pair = None
    if len(runs) == 2:
        a, b = runs.values()
        pair = paired(a, b)
        typer.echo(
            f"\npaired ({' vs '.join(runs)}): both right {pair['both_right']}, neither "
            f"{pair['neither_right']}, only the first {len(pair['only_first'])}, only the "
            f"second {len(pair['only_second'])} of {pair['scans']}; McNemar p = "
            f"{pair['mcnemar_p']}"
        )
    if json_out is not None:
        for key, run in out.items():
            # which weights made these cases (a level calibration fitted on them checks it)
            run["weights_sha256"] = weights_sha256(cfg, None if key == "None" else Path(key))
            run["pixel_mm"] = pixel_mm  # None: style B's validation spec (2.5 mm)
        doc = next(iter(out.values())) if len(out) == 1 else {"runs": out, "paired": pair}
        json_out.write_text(json.dumps(doc, indent=2) + "\n")


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""
    app.command("evaluate")(evaluate)
    app.command("evaluate-composition")(evaluate_composition)
    app.command("calibrate-locator")(calibrate_locator)
    app.command("calibrate-levels")(calibrate_levels)
    app.command("evaluate-crops")(evaluate_crops)
    app.command("evaluate-levels")(evaluate_levels)
