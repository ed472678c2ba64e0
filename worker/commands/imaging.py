"""CLI commands: imaging (``mip``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

#: Display windows (low, high) in HU for the MIP picture.
MIP_WINDOWS: dict[str, tuple[float, float]] = {
    "bone": (-200.0, 1300.0),  # skeleton bright, soft tissue grey, air black
    "soft": (-160.0, 240.0),  # W400 / L40
}


def mip_png(
    series: Annotated[
        Path, typer.Argument(help="DICOM series folder, or a .nii / .nii.gz file.", exists=True)
    ],
    png: Annotated[Path, typer.Option("--png", help="PNG file to write.")],
    pixel_mm: Annotated[float, typer.Option(help="MIP pixel size in mm.", min=0.05)] = 1.0,
    window: Annotated[str, typer.Option(help="Display window: bone or soft.")] = "bone",
) -> None:
    """Write the frontal MIP of a CT series as a PNG (head up, patient's right on the left)."""
    import numpy as np
    from PIL import Image

    from core.errors import SeriesValidationError
    from worker.mip import frontal_mip
    from worker.volume.load import load_series

    if window not in MIP_WINDOWS:
        raise typer.BadParameter(f"choose one of {', '.join(MIP_WINDOWS)}", param_hint="--window")
    try:
        # A picture to look at: accept short series and missing UIDs, keep every other check.
        volume = load_series(series, min_slices=2, require_uids=False)
    except SeriesValidationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    for w in volume.warnings:
        typer.echo(f"warning: {w}", err=True)
    mip = frontal_mip(volume, pixel_mm=pixel_mm)
    lo, hi = MIP_WINDOWS[window]
    grey = np.clip((mip.image - lo) / (hi - lo), 0.0, 1.0)
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(grey * 255).astype(np.uint8), mode="L").save(png)
    typer.echo(
        f"{png}: {mip.image.shape[1]} x {mip.image.shape[0]} px at {mip.pixel_mm:g} mm, "
        f"z {mip.row_to_z(mip.rows - 1):.1f}..{mip.z_top_mm:.1f} mm, "
        f"{volume.shape[0]} slices, window {window} [{lo:g}, {hi:g}] HU"
    )


def phantom(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    seed: Annotated[int, typer.Option("--seed", help="Random seed (deterministic).")] = 0,
    fov: Annotated[
        str | None,
        typer.Option(
            help="chest, abdomen, abdomen_pelvis, chest_abdomen_pelvis, whole_body or pelvis "
            "(default: drawn from the seed)."
        ),
    ] = None,
    slice_thickness: Annotated[
        float | None, typer.Option("--slice-thickness", help="Slice thickness in mm.", min=0.1)
    ] = None,
    pixel_spacing: Annotated[
        float | None, typer.Option("--pixel-spacing", help="Pixel spacing in mm.", min=0.05)
    ] = None,
    rows: Annotated[int, typer.Option(help="Image rows.", min=8)] = 512,
    cols: Annotated[int, typer.Option(help="Image columns.", min=8)] = 512,
    fmt: Annotated[str, typer.Option("--format", help="dicom or nifti.")] = "dicom",
) -> None:
    """Write a synthetic CT phantom with known L3 and tissue labels, plus ground_truth.json."""
    from worker.phantom import FOVS, PhantomSpec, generate_phantom, write_phantom

    if fov is not None and fov not in FOVS:
        raise typer.BadParameter(f"choose one of {', '.join(FOVS)}", param_hint="--fov")
    if fmt not in ("dicom", "nifti"):
        raise typer.BadParameter("choose dicom or nifti", param_hint="--format")
    spec = PhantomSpec(
        fov=fov,
        slice_thickness_mm=slice_thickness,
        pixel_spacing_mm=pixel_spacing,
        rows=rows,
        cols=cols,
    )
    ph = generate_phantom(seed, spec)
    path = write_phantom(ph, out, fmt=fmt)
    t = ph.truth
    where = (
        f"L3 mid z {t.l3_mid_z_mm:.1f} mm, slice {t.l3_mid_slice_index}"
        if t.l3_in_fov
        else "L3 not in field of view"
    )
    typer.echo(f"{path}: {t.fov}, {ph.volume.shape[0]} slices, {where}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""
    app.command("mip")(mip_png)
    app.command("phantom")(phantom)
