"""CLI command: ``l3spot convert`` (a NIfTI CT volume -> a DICOM CT series)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def convert(
    nifti: Annotated[
        Path, typer.Argument(help="3-D NIfTI CT volume (.nii or .nii.gz) in HU.", exists=True)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Series folder to write.")],
    allow_rounding: Annotated[
        bool,
        typer.Option(
            "--allow-rounding", help="Round non-integer HU values instead of refusing the file."
        ),
    ] = False,
) -> None:
    """Write a NIfTI CT volume as a DICOM CT series with its geometry (checked by reloading).

    Refuses, with the reason, what cannot be converted exactly: 4-D images, non-millimetre
    units, missing or disagreeing sform/qform, non-integer HU (unless --allow-rounding), a
    HU range beyond 16 bits, sheared or too oblique affines, values that are not HU.
    """
    from core.errors import L3SpotError
    from worker.volume.convert import convert_nifti

    try:
        report = convert_nifti(nifti, out, allow_rounding=allow_rounding)
    except L3SpotError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if report.rounded_voxels:
        typer.echo(
            f"warning: {report.rounded_voxels} voxels rounded to integer HU (up to "
            f"{report.max_rounding_hu:.3g} HU)",
            err=True,
        )
    nz, ny, nx = report.shape_zyx
    dz, dy, dx = report.spacing_mm
    typer.echo(
        f"{nifti} -> {out}: {report.n_files} CT images, {ny} x {nx} px at {dy:g} x {dx:g} mm, "
        f"{dz:g} mm slice step; geometry checked by reloading (affine within "
        f"{report.max_affine_error_mm:.2g} mm)"
    )
    typer.echo(
        json.dumps(
            {
                "series_dir": str(out.resolve()),
                "series_instance_uid": report.series_instance_uid,
                "study_instance_uid": report.study_instance_uid,
            }
        )
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""
    app.command("convert")(convert)
