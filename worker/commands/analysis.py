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


#: One analysis input: a NIfTI file, a series folder, or the files of one series.
Input = Path | tuple[Path, ...]


def _relative(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root)
    except ValueError:
        return path.name
    return "" if str(rel) == "." else rel.as_posix()


def find_inputs(path: Path) -> tuple[list[tuple[str, Input]], list[str]]:
    """The series to analyse under ``path`` and one line per thing skipped.

    Parameters
    ----------
    path : a NIfTI file, a DICOMDIR file, or a folder searched recursively (one series,
        a folder of series folders, a PATIENT/STUDY/SERIES export, a DICOM File-set, or
        a flat folder mixing several series): :func:`worker.volume.discover.find_series`.

    Returns
    -------
    (inputs, skipped)
        ``inputs`` are (output sub-folder name, input) pairs: the name is the series'
        folder relative to ``path`` ("" for ``path`` itself), followed by the Series
        Instance UID when several series share that folder, or the NIfTI file's path
        without its suffix. ``skipped`` holds "SKIPPED <where> (...): <reason>" lines
        (non-CT objects, localizers) and the other findings of the search.

    Raises
    ------
    typer.BadParameter
        ``path`` does not exist.
    """
    from worker.volume.discover import find_series

    if not path.exists():
        raise typer.BadParameter(f"{path} is neither a NIfTI file nor a folder")
    root = path.parent if path.is_file() else path
    found = find_series(path)
    per_folder: dict[Path, int] = {}
    for series in found.series:
        per_folder[series.folder] = per_folder.get(series.folder, 0) + 1
    out: list[tuple[str, Input]] = []
    for series in found.series:
        name = _relative(series.folder, root)
        if per_folder[series.folder] > 1:
            uid = series.series_instance_uid or "no-series-uid"
            name = f"{name}/{uid}" if name else uid
        whole_folder = set(series.files) == {
            p for p in series.folder.rglob("*") if p.is_file() and not p.name.startswith(".")
        }
        out.append((name, series.folder if whole_folder else series.files))
    for nii in found.nifti:
        rel = _relative(nii, root) if nii != path else ""
        out.append((rel.removesuffix(".gz").removesuffix(".nii"), nii))
    lines = [
        f"SKIPPED {_relative(s.folder, root) or '.'} (series {s.series_instance_uid or '<none>'}"
        f", {s.n_files} file(s)): {s.reason}"
        for s in found.skipped
    ]
    for series in found.series:
        for note in series.notes:
            lines.append(f"note: {_relative(series.folder, root) or '.'}: {note}")
    lines += [f"note: {n}" for n in found.notes]
    return out, lines


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
        Path,
        typer.Argument(
            help="DICOM series folder, NIfTI file, DICOMDIR, or an export folder of many "
            "series (searched recursively; every CT series is analysed)"
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    csv_path: Annotated[
        Path | None, typer.Option("--csv", help="append one row per series to this CSV")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Analyse CT series without a server: L3, body composition, SEG/SR/SC, result.json.

    Finds every CT series under the input by reading headers only (files grouped by Series
    Instance UID, DICOMDIR read through pydicom's FileSet); each series is analysed into its
    own folder under --out; non-CT objects and localizers are skipped with a reason line.
    """
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
    inputs, skipped = find_inputs(input_path)
    for line in skipped:
        typer.echo(line)
    if not inputs:
        typer.echo(f"error: no CT series found under {input_path}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{len(inputs)} series to analyse under {input_path}")
    rows: list[dict[str, str]] = []
    failures = 0
    for name, src in inputs:
        out_dir = out / name if name else out
        where = src if isinstance(src, Path) else f"{src[0].parent} ({len(src)} files)"
        try:
            result = analyze_series(src, out_dir, cfg)
        except L3SpotError as exc:
            failures += 1
            kind = "nifti" if isinstance(src, Path) and _is_nifti(src) else "dicom"
            result = AnalysisResult.failed(
                str(exc),
                series_instance_uid=getattr(exc, "series_uid", "") or "",
                source=SourceInfo(input_path=str(where), kind=kind),
            )
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / RESULT_JSON).write_text(result.to_json())
            typer.echo(f"FAILED {where}: {exc}", err=True)
        else:
            l3 = result.l3
            found = (
                f"L3 slice {l3.slice_index} (confidence {l3.confidence:.2f})"
                if l3.in_field_of_view
                else "L3 not in field of view"
            )
            sma = (result.composition or {}).get("sma")
            extra = f", SMA {sma.area_cm2:.1f} cm2" if sma else ""
            typer.echo(f"{where}: {found}{extra} -> {out_dir}")
        rows.append(result_csv_row(result))
    if csv_path is not None:
        append_csv(csv_path, rows)
    if len(inputs) == 1 and failures == 0:
        name = inputs[0][0]
        typer.echo(json.dumps({"result": str(((out / name) / RESULT_JSON).resolve())}))
    if failures == len(inputs):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""
    app.command("analyze")(analyze)
