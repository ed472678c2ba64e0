"""CLI commands of the L3 locator: ``train``, ``locate``, ``evaluate``.

Belharbi et al. 2017; see ``worker/locator/`` (inference, entry ``locate.py``),
``worker/training/locator.py`` (training) and ``research/evaluate_locator.py`` (figures and
the diagnostic picture).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from core.commands import ConfigOpt, command_line, git_commit

DEFAULT_CACHE = Path("var/cache/locator_mips")

#: Default window geometry (mm) per training stage: the coarse one is the shipped CNN4's
#: (models/locator_cnn4.md); the fine one works at 1 mm around the coarse answer with
#: a = 18 mm, under half the distance between two lumbar vertebral centres (about 35-40 mm),
#: so the vertebral body nearest the window centre is the target and no level has to be
#: counted (the coarse stage did that); H = 128 mm shows that body and both discs.
STAGE_GEOMETRY: dict[str, dict[str, float]] = {
    "coarse": {"pixel_mm": 3.0, "height_mm": 330.0, "width_mm": 384.0, "a_mm": 51.0},
    "fine": {"pixel_mm": 1.0, "height_mm": 128.0, "width_mm": 128.0, "a_mm": 18.0},
}


def _locator_config(
    weights: Path | None, stride: int | None, refine: Path | None = None, no_refine: bool = False
) -> Any:
    from core.config import load_config

    cfg = load_config().locator
    if weights is not None:
        cfg = cfg.model_copy(update={"weights": weights})
    if stride is not None:
        cfg = cfg.model_copy(update={"stride_px": stride})
    if refine is not None:
        cfg = cfg.model_copy(update={"refine_weights": refine})
    if no_refine:
        cfg = cfg.model_copy(update={"refine_weights": None})
    return cfg


RefineOption = Annotated[
    Path | None, typer.Option(help="Refinement-stage weights (default: config).")
]
NoRefineOption = Annotated[
    bool, typer.Option("--no-refine", help="First stage only (ignore locator.refine_weights).")
]


def train(
    out: Annotated[Path, typer.Option(help="Weights file to write.")] = Path(
        "models/locator_cnn4.pt"
    ),
    phantoms: Annotated[
        int | None,
        typer.Option(help="Phantoms generated on the fly (0 = none) [0; --from-reviews 60]."),
    ] = None,
    phantom_seed: Annotated[int, typer.Option(help="Seed of the first training phantom.")] = 0,
    phantom_dir: Annotated[
        Path | None, typer.Option(help="Folder of cached MIP cases (*.npz) to train from.")
    ] = None,
    csv_path: Annotated[
        Path | None,
        typer.Option("--csv", help="Site CSV series_path,l3_slice_index[,patient_id]."),
    ] = None,
    cache_dir: Annotated[Path, typer.Option(help="Cache of generated phantom MIPs.")] = (
        DEFAULT_CACHE
    ),
    arch: Annotated[str, typer.Option(help="cnn4 (paper) or vgg16.")] = "cnn4",
    pretrained: Annotated[
        Path | None, typer.Option(help="VGG16 backbone state dict (features.*) to start from.")
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(help="Locator weights to continue training from (same arch and window)."),
    ] = None,
    positive_fraction: Annotated[
        float, typer.Option(help="Share of windows holding L3 within +/- a (the rest: presence).")
    ] = 0.6,
    epochs: Annotated[int, typer.Option(min=1)] = 12,
    steps_per_epoch: Annotated[
        int | None, typer.Option(min=1, help="[200; --from-reviews: steps per stage, 300]")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="[64; --from-reviews 32]")] = None,
    lr: Annotated[float | None, typer.Option(help="[0.001; --from-reviews 0.0003]")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of patients for validation.")] = 0.1,
    stage: Annotated[
        str,
        typer.Option(
            help="coarse: the whole-MIP locator; fine: the refinement stage around its answer "
            "(worker/locator/fine.py). Sets the default window geometry below."
        ),
    ] = "coarse",
    pixel_mm: Annotated[
        float | None, typer.Option(help="MIP pixel size (mm) [coarse 3, fine 1].")
    ] = None,
    height_mm: Annotated[
        float | None, typer.Option(help="Window height H (mm) [coarse 330, fine 128].")
    ] = None,
    width_mm: Annotated[
        float | None, typer.Option(help="Fixed window width (mm) [coarse 384, fine 128].")
    ] = None,
    a_mm: Annotated[
        float | None,
        typer.Option(help="L3 within +/- a of the window centre (mm) [coarse 51, fine 18]."),
    ] = None,
    fov_crops: Annotated[
        float,
        typer.Option(
            help="Share of training windows cut from a cropped field of view (T10-L2 to "
            "L4-end, lumbar windows 150-260 mm); L3 counts as present only where it can be "
            "counted from the ribs or the sacrum (issue 15; phantoms only)."
        ),
    ] = 0.0,
    varied_every: Annotated[
        int,
        typer.Option(
            min=0,
            help="Every n-th phantom with a varied spine and lowest ribs "
            "(worker.phantom.variation; domain randomisation, issue 15); 0: none.",
        ),
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of splits, init, sampling, augmentation.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    from_reviews: Annotated[
        bool,
        typer.Option(
            "--from-reviews",
            help="Fine-tune the active locator on the readers' reviewed scans, evaluate it "
            "against the active version, promote it if better (docs/learning.md).",
        ),
    ] = False,
    holdout_fraction: Annotated[
        float, typer.Option(help="--from-reviews: share of patients held out for evaluation.")
    ] = 0.25,
    bench_phantoms: Annotated[
        int, typer.Option(min=1, help="--from-reviews: phantoms of the benchmark.")
    ] = 40,
    min_train: Annotated[
        int, typer.Option(min=1, help="--from-reviews: fewest reviewed scans to train on.")
    ] = 8,
    min_holdout: Annotated[
        int, typer.Option(min=1, help="--from-reviews: fewest held-out reviewed scans.")
    ] = 3,
    promote: Annotated[
        bool,
        typer.Option(help="--from-reviews: promote a candidate that passes the evaluation."),
    ] = True,
    config: ConfigOpt = None,
) -> None:
    """Train the L3 locator (phantoms, a folder of MIP cases, and/or a site CSV), or with
    --from-reviews fine-tune it on the site's reviewed scans."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if from_reviews:
        from worker.commands.learning import train_from_reviews_command
        from worker.training.from_reviews import FromReviewsSettings

        given = {
            "steps": steps_per_epoch,
            "batch_size": batch_size,
            "lr": lr,
            "phantoms": phantoms,
        }  # None: FromReviewsSettings' default
        settings = FromReviewsSettings(
            **{k: v for k, v in given.items() if v is not None},
            phantom_seed=phantom_seed,
            bench_phantoms=bench_phantoms,
            holdout_fraction=holdout_fraction,
            min_train=min_train,
            min_holdout=min_holdout,
            seed=seed,
            device=device,
            cache_dir=cache_dir,
        )
        train_from_reviews_command(config, settings, promote=promote, git_commit=git_commit())
        return
    phantoms = phantoms or 0
    steps_per_epoch = steps_per_epoch or 200
    batch_size = batch_size or 64
    lr = lr or 1e-3
    from tqdm import tqdm

    from worker.locator.weights import resolve_device
    from worker.locator.windows import WindowSpec
    from worker.training.locator import (
        TrainSettings,
        csv_cases,
        load_case_folder,
        load_volume_any,
        phantom_cases,
        split_by_group,
        train_locator,
    )

    dev = str(resolve_device(device))
    command = command_line()
    if stage not in STAGE_GEOMETRY:
        raise typer.BadParameter(f"--stage must be one of {sorted(STAGE_GEOMETRY)}")
    geometry = dict(STAGE_GEOMETRY[stage])
    given = {"pixel_mm": pixel_mm, "height_mm": height_mm, "width_mm": width_mm, "a_mm": a_mm}
    geometry.update({k: v for k, v in given.items() if v is not None})
    spec = WindowSpec(**geometry)
    pixel_mm = spec.pixel_mm
    cases = []
    data: list[str] = []
    if phantoms > 0:
        with tqdm(total=phantoms, desc="phantom MIPs", unit="scan") as bar:
            cases += phantom_cases(
                range(phantom_seed, phantom_seed + phantoms),
                pixel_mm,
                cache_dir,
                bar.update,
                varied_every=varied_every,
            )
        last = phantom_seed + phantoms - 1
        varied = f", every {varied_every}-th with a varied spine" if varied_every else ""
        data.append(f"{phantoms} phantoms (worker.phantom, seeds {phantom_seed}..{last}{varied})")
    if phantom_dir is not None:
        folder = load_case_folder(phantom_dir, pixel_mm)
        cases += folder
        data.append(f"{len(folder)} MIP cases from {phantom_dir}")
    if csv_path is not None:
        site = csv_cases(csv_path, pixel_mm, load_volume_any)
        cases += site
        data.append(f"{len(site)} series from {csv_path}")
    if not cases:
        raise typer.BadParameter("no training data: give --phantoms, --phantom-dir or --csv")
    tr, va = split_by_group(cases, val_fraction, seed)
    n_abs = sum(1 for c in cases if c.l3_row is None)
    typer.echo(
        f"{len(tr)} training / {len(va)} validation scans (split by patient); "
        f"{n_abs} without L3 in the field of view; device {dev}"
    )
    settings = TrainSettings(
        arch=arch,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=dev,
        pretrained=pretrained,
        spec=spec,
        init=init,
        positive_fraction=positive_fraction,
        stage=stage,
        fov_crop_fraction=fov_crops,
    )
    record: dict[str, Any] = {
        "command": command,
        "seed": seed,
        "arch": arch,
        "data": "; ".join(data),
        "n_train_scans": len(tr),
        "n_val_scans": len(va),
        "n_not_in_fov_scans": n_abs,
        "validation_split": f"{val_fraction:g} of patients (phantom seeds), seed {seed}",
        "git_commit": git_commit(),
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": batch_size,
        "lr": lr,
        "init": None if init is None else str(init),
        "positive_fraction": 1.0 if stage == "fine" else positive_fraction,
        "fov_crop_fraction": fov_crops,
        "varied_every": varied_every,
        "stage": stage,
        "device": dev,
        "torch": torch.__version__,
        "window": spec.to_dict(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    t0 = time.perf_counter()
    with tqdm(total=epochs * steps_per_epoch, desc="training", unit="step") as bar:

        def step(n: int, loss: float) -> None:
            bar.update(n)
            bar.set_postfix(loss=f"{loss:.4f}")

        def epoch(log: Any) -> None:
            scan = "-" if log.val_scan_mae_mm is None else f"{log.val_scan_mae_mm:.2f}"
            bar.write(
                f"epoch {log.epoch}: train loss {log.train_loss:.4f}, validation window "
                f"offset error {log.val_offset_mae_mm:.2f} mm, presence accuracy "
                f"{log.val_presence_acc:.3f}, whole-scan error {scan} mm ({log.seconds:.0f} s)"
            )

        _, logs = train_locator(tr, va, settings, out, record, step, epoch)
    record["wall_seconds"] = round(time.perf_counter() - t0, 1)
    # the saved weights hold the best epoch's record; write the sidecar JSON from it
    from worker.locator.weights import load_locator

    saved = load_locator(out, "cpu").record
    saved["wall_seconds"] = record["wall_seconds"]
    saved["weights_bytes"] = out.stat().st_size
    out.with_suffix(".json").write_text(json.dumps(saved, indent=2, default=str) + "\n")
    typer.echo(f"wrote {out} (best epoch {saved.get('best_epoch')}) and {out.with_suffix('.json')}")


def locate(
    series: Annotated[Path, typer.Argument(help="DICOM series folder or NIfTI file.")],
    png: Annotated[Path | None, typer.Option(help="Write the diagnostic picture here.")] = None,
    weights: Annotated[Path | None, typer.Option(help="Locator weights (default: config).")] = None,
    stride: Annotated[int | None, typer.Option(help="Window stride, MIP pixels.")] = None,
    refine_weights: RefineOption = None,
    no_refine: NoRefineOption = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Find the L3 slice of one series and print the result as JSON."""
    from core.errors import L3SpotError
    from worker.locator.figure import render_locator_png
    from worker.locator.locate import locate_l3
    from worker.locator.weights import load_locator
    from worker.mip import FrontalMips
    from worker.training.locator import load_volume_any

    cfg = _locator_config(weights, stride, refine_weights, no_refine)
    try:
        vol = load_volume_any(series)
        mips = FrontalMips(vol)
        res = locate_l3(vol, cfg, mips, device=device)  # timings include the MIPs
        mip = mips.at(load_locator(cfg.weights, device).spec.pixel_mm)  # the first stage's
    except (L3SpotError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    out = {"series": str(series), "n_slices": len(vol.z_mm), **res.summary()}
    typer.echo(json.dumps(out, indent=2))
    if png is not None:
        render_locator_png(mip, res, png)
        typer.echo(f"picture: {png}", err=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""
    app.command("train")(train)
    app.command("locate")(locate)
