"""CLI commands of body composition at L3: ``composition``, ``train-seg``,
``evaluate-composition``.

See ``worker/composition.py`` (segmentation and measurements), ``worker/seg_unet.py`` and
``worker/train_seg.py`` (U-Net), ``worker/evaluate_composition.py`` (figures).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from core.commands import command_line, git_commit


def _load(path: Path) -> Any:
    """CTVolume from a DICOM series folder or a NIfTI file."""
    from worker.volume.load import load_series

    return load_series(path)


def render_png(hu: np.ndarray, result: Any, spacing_mm: tuple[float, float], out: Path) -> None:
    """Draw the slice (window -160..240 HU) with coloured masks, a legend and the numbers.

    The image is resampled to square pixels (so anatomy is not distorted), at least 512 px wide.
    """
    from PIL import Image, ImageDraw

    from core import labels as lab

    g = np.clip((hu + 160.0) / 400.0 * 255.0, 0, 255)
    rgb = np.stack([g, g, g], -1)
    for v, colour in lab.COMPARTMENT_COLOURS.items():
        m = result.labels == v
        rgb[m] = 0.45 * rgb[m] + 0.55 * np.array(colour)
    img = Image.fromarray(rgb.astype(np.uint8))
    scale = max(512 / (hu.shape[1] * spacing_mm[1]), 1e-3)
    size = (round(hu.shape[1] * spacing_mm[1] * scale), round(hu.shape[0] * spacing_mm[0] * scale))
    img = img.resize(size, Image.NEAREST)
    panel_w = 330
    canvas = Image.new("RGB", (size[0] + panel_w, max(size[1], 260)), (0, 0, 0))
    canvas.paste(img, (0, 0))
    d = ImageDraw.Draw(canvas)
    x0, y = size[0] + 10, 10
    d.text((x0, y), f"slice {result.slice_index}  method {result.method}", fill=(255, 255, 255))
    y += 20
    for v, key in lab.COMPARTMENTS.items():
        m = result.measures[key]
        d.rectangle([x0, y, x0 + 12, y + 12], fill=lab.COMPARTMENT_COLOURS[v])
        hu_txt = f"{m.mean_hu:6.1f} HU" if m.mean_hu is not None else "   -"
        d.text((x0 + 18, y), f"{key.upper():4} {m.area_cm2:7.1f} cm2 {hu_txt}", fill=(255,) * 3)
        y += 18
    smi = result.smi_cm2_per_m2
    d.text(
        (x0, y + 4),
        f"SMI {smi:.1f} cm2/m2" if smi is not None else "SMI n/a (no height)",
        fill=(255, 255, 255),
    )
    y += 22
    s = result.sarcopenia
    if s is not None:
        txt = f"sarcopenia ({s.cutoffs}): " + ("n/a" if s.flag is None else str(s.flag))
        d.text((x0, y), txt, fill=(255, 255, 255))
        y += 18
    if result.qa_flags:
        d.text((x0, y), "QA: " + ", ".join(result.qa_flags), fill=(255, 120, 120))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)


def composition(
    series: Annotated[Path, typer.Argument(help="DICOM series folder or NIfTI file.")],
    slice_index: Annotated[int, typer.Option("--slice", help="Slice index (ascending z).")],
    png: Annotated[Path | None, typer.Option(help="Write the annotated slice here.")] = None,
    method: Annotated[str | None, typer.Option(help="classical or unet (default: config).")] = None,
    neighbour_mm: Annotated[float | None, typer.Option(help="Average over +/- mm.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Segment and measure SMA, IMAT, VAT and SAT on one slice."""
    from core.config import load_config
    from worker.composition.measure import measure_composition

    cfg = load_config().composition
    upd: dict[str, Any] = {}
    if method:
        upd["method"] = method
    if neighbour_mm is not None:
        upd["neighbour_mm"] = neighbour_mm
    cfg = cfg.model_copy(update=upd)
    vol = _load(series)
    res = measure_composition(vol, slice_index, cfg, device=device)
    out = {
        "slice_index": res.slice_index,
        "method": res.method,
        "measures": {k: vars(m) for k, m in res.measures.items()},
        "smi_cm2_per_m2": res.smi_cm2_per_m2,
        "smi_reason": res.smi_reason,
        "sarcopenia": vars(res.sarcopenia) if res.sarcopenia else None,
        "qa_flags": res.qa_flags,
    }
    if json_out:
        typer.echo(json.dumps(out, indent=2))
    else:
        for k, m in res.measures.items():
            hu = f"{m.mean_hu:7.1f} ± {m.sd_hu:5.1f} HU" if m.mean_hu is not None else "-"
            typer.echo(f"{k.upper():5} {m.area_cm2:8.2f} cm2  {hu}")
        typer.echo(f"SMI   {res.smi_cm2_per_m2 or res.smi_reason}")
        typer.echo(f"QA    {', '.join(res.qa_flags) or 'none'}")
    if png is not None:
        render_png(np.asarray(vol.hu[slice_index], np.float32), res, vol.pixel_spacing_mm, png)
        typer.echo(f"wrote {png}")


def train_seg(
    out: Annotated[Path, typer.Option(help="Weights file.")] = Path("models/seg_unet.pt"),
    phantoms: Annotated[int, typer.Option(help="Phantom (or synthetic) cases.")] = 40,
    phantom_seed: Annotated[int, typer.Option()] = 1000,
    neighbours: Annotated[int, typer.Option(help="Slices either side of L3 per phantom.")] = 1,
    site_csv: Annotated[
        Path | None,
        typer.Option(
            help="CSV ct,labels[,slice]: NIfTI CT + NIfTI label map (core.labels values), or "
            "DICOM series folder + DICOM SEG with SMA/IMAT/VAT/SAT segments (matched by "
            "l3spot's SNOMED codes or by segment label; docs/composition.md)."
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=1)] = 300,
    batch: Annotated[int, typer.Option(min=1)] = 4,
    crop: Annotated[int, typer.Option(help="Square crop (px at 1 mm), multiple of 8.")] = 256,
    lr: Annotated[float, typer.Option()] = 1e-3,
    seed: Annotated[int, typer.Option()] = 0,
    ensemble: Annotated[int, typer.Option(min=1, help="Models with seeds seed..seed+n-1.")] = 1,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    max_minutes: Annotated[
        float | None, typer.Option(help="Wall-time budget per model; stops early.")
    ] = None,
) -> None:
    """Train the body-composition U-Net (Dice loss) from phantoms and/or site masks.

    Site masks come as NIfTI label maps or DICOM SEG objects referencing the CT series
    (--site-csv); a SEG of another series or without a known segment is refused.
    """
    import logging
    import time

    import torch

    from core.config import load_config
    from worker.training.segmentation import phantom_slices, save_trained, site_slices, train_unet

    if threads:
        torch.set_num_threads(threads)
    if not logging.getLogger().handlers:
        from core.logs import setup_logging

        # progress: one JSON line per 20 steps, on stderr (stdout is the command's output)
        setup_logging("INFO", json_logs=True, stream=sys.stderr)
    git = git_commit()
    cfg = load_config().composition
    slices = phantom_slices(phantoms, phantom_seed, neighbours) if phantoms else []
    typer.echo(f"{len(slices)} training slices")
    if site_csv is not None:
        slices += site_slices(site_csv)
    paths = []
    for i in range(ensemble):
        path = out if ensemble == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        t0 = time.perf_counter()
        model, losses = train_unet(
            slices,
            cfg,
            steps=steps,
            batch=batch,
            crop=crop,
            lr=lr,
            seed=seed + i,
            device=device,
            max_seconds=max_minutes * 60 if max_minutes else None,
        )
        record = {
            "command": command_line(),
            "git_commit": git,
            "seed": seed + i,
            "steps_done": len(losses),
            "train_seconds": round(time.perf_counter() - t0, 1),
            "threads": torch.get_num_threads(),
            "data": {
                "phantoms": phantoms,
                "phantom_seed": phantom_seed,
                "phantom_seeds": [phantom_seed, phantom_seed + phantoms - 1] if phantoms else None,
                "phantom_spec": "worker.phantom PhantomSpec(fov='abdomen', slice_thickness_mm=5)",
                "neighbours": neighbours,
                "site_csv": str(site_csv) if site_csv else None,
                "n_slices": len(slices),
            },
            "steps": steps,
            "batch": batch,
            "crop": crop,
            "lr": lr,
            "final_loss": float(np.mean(losses[-20:])),
            "loss_every_50_steps": [round(v, 4) for v in losses[::50]],
            "architecture": {"levels": model.levels, "base": model.base},
        }
        save_trained(model, path, record)
        paths.append(path.name)
        typer.echo(f"wrote {path} (final Dice loss {record['final_loss']:.3f})")
    if ensemble > 1:
        out.with_suffix(".ensemble.json").write_text(json.dumps(paths) + "\n")


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""
    app.command("composition")(composition)
    app.command("train-seg")(train_seg)
