"""CLI commands: ``l3spot analyze`` (the whole worker pipeline on files, no server)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="config.yaml (default: $L3SPOT_CONFIG or ./config.yaml)"),
]


def _is_nifti(p: Path) -> bool:
    return p.is_file() and (p.name.endswith(".nii") or p.name.endswith(".nii.gz"))


def find_inputs(path: Path) -> list[tuple[str, Path]]:
    """The series to analyse under ``path``, as (output sub-folder name, input) pairs.

    A NIfTI file, or a folder that directly holds files (one DICOM series), is one input
    (name ""); otherwise every NIfTI file and every sub-folder holding files is one input,
    named after it (a folder of many series for the research export).
    """
    if _is_nifti(path):
        return [("", path)]
    if not path.is_dir():
        raise typer.BadParameter(f"{path} is neither a NIfTI file nor a folder")
    children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if any(p.is_file() and not _is_nifti(p) for p in children):
        return [("", path)]
    out: list[tuple[str, Path]] = []
    for p in children:
        if _is_nifti(p):
            out.append((p.name.removesuffix(".gz").removesuffix(".nii"), p))
        elif p.is_dir():
            out.append((p.name, p))
    return out


def append_csv(csv_path: Path, rows: list[dict[str, str]]) -> None:
    """Append rows to the research CSV, writing the header when the file is new or empty."""
    from core.result import CSV_HEADER

    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    with csv_path.open("a", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(CSV_HEADER))
        if new:
            w.writeheader()
        w.writerows(rows)


def analyze(
    input_path: Annotated[
        Path, typer.Argument(help="DICOM series folder, NIfTI file, or a folder of many series")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    csv_path: Annotated[
        Path | None, typer.Option("--csv", help="append one row per series to this CSV")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Analyse CT series without a server: L3, body composition, SEG/SR/SC, result.json."""
    from core.config import ConfigError, load_config
    from core.errors import L3SpotError
    from core.layout import RESULT_JSON
    from core.result import AnalysisResult, SourceInfo, result_csv_row
    from worker.pipeline import analyze_series

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    inputs = find_inputs(input_path)
    if not inputs:
        typer.echo(f"error: no series found under {input_path}", err=True)
        raise typer.Exit(2)
    rows: list[dict[str, str]] = []
    failures = 0
    for name, src in inputs:
        out_dir = out / name if name else out
        try:
            result = analyze_series(src, out_dir, cfg)
        except L3SpotError as exc:
            failures += 1
            kind = "nifti" if _is_nifti(src) else "dicom"
            result = AnalysisResult.failed(
                str(exc),
                series_instance_uid=getattr(exc, "series_uid", "") or "",
                source=SourceInfo(input_path=str(src), kind=kind),
            )
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / RESULT_JSON).write_text(result.to_json())
            typer.echo(f"FAILED {src}: {exc}", err=True)
        else:
            l3 = result.l3
            where = (
                f"L3 slice {l3.slice_index} (confidence {l3.confidence:.2f})"
                if l3.in_field_of_view
                else "L3 not in field of view"
            )
            sma = (result.composition or {}).get("sma")
            extra = f", SMA {sma.area_cm2:.1f} cm2" if sma else ""
            typer.echo(f"{src}: {where}{extra} -> {out_dir}")
        rows.append(result_csv_row(result))
    if csv_path is not None:
        append_csv(csv_path, rows)
    if len(inputs) == 1 and failures == 0:
        typer.echo(json.dumps({"result": str((out / RESULT_JSON).resolve())}))
    if failures == len(inputs):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""
    app.command("analyze")(analyze)
