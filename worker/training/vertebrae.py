"""Training the level-verification network (:class:`worker.locator.vertebrae.SpineFCN`).

Mita et al., "Automatic detection and evaluation of spine from CT images using deep
learning", sections 2.3-2.4:

* **contour-weighted cross-entropy**: the one-hot target is 1.1 instead of 1 on the label's
  boundary, found by a Laplacian filter of each class's label image (section 2.4);
* **adversarial training**: the same loss on the input plus the perturbation that maximises
  it, added to the loss (section 2.3; the perturbation is the fast-gradient sign of
  Goodfellow et al. 2015, ``eps`` in normalised HU units: 0.03 = 15 HU).

Data: boxes of style-A phantoms made as the pipeline makes them
(:func:`worker.phantom.spine_box.spine_case`), cached as ``.npz`` per seed; training crops
:data:`CROP_Z` mm along z with intensity randomisation (bone density from osteoporotic to
dense, noise, blur of a soft reconstruction kernel, left-right mirror). A run is bounded by
steps and by wall-clock minutes; it is deterministic for a seed only up to that bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from worker.locator.vertebrae import (
    BODY,
    CLASSES,
    SpineBox,
    SpineFCN,
    count_levels,
    load_spine_model,
    normalise_hu,
    segment_box,
    verify_level,
)
from worker.phantom import PhantomSpec

__all__ = [
    "CROP_Z",
    "SpineTrainSettings",
    "case_box",
    "contour_target",
    "evaluate_spine",
    "load_cases",
    "spine_loss",
    "train_spine",
]

#: Version of the cached boxes (bump when :func:`worker.phantom.spine_box.spine_case`
#: changes, so that no stale box is trained on). 7: the varied spine's curved sacrum
#: (plain boxes are the same as in 6); 8: the column's centre in front of the spinal
#: canal where the largest bright structure does not fit it (boxes once refused or
#: misplaced), and the varied spine's lowest ribs' slope; 9: the varied spine's lordosis
#: (lumbar bodies and discs along the curve, end plates perpendicular to it) and its wider
#: sacral slope; 10: the curved sacrum's lateral masses as one curved plate from the alae
#: to S4 reaching the sacro-iliac joints (``skeleton._sacral_wings``) instead of a slab;
#: 11: the varied sacrum's fattier marrow (``variation.SACRAL_MARROW``); 12: the varied
#: sacrum's canal under a dorsal wall and its deep lateral masses (``skeleton._sacral_roof``);
#: 13: those lateral masses' front kept where the thin plate's was at every point (12 kept
#: it only at the ends).
CASE_VERSION = 13
#: Training crop along z (1 mm voxels, a multiple of 8): two to three lumbar levels.
CROP_Z = 96
#: Per-class loss weights: the ribs are under 1 % of the voxels and decide the count.
CLASS_WEIGHTS = (1.0, 1.0, 3.0, 1.0)
#: Target value on label boundaries (Mita et al. section 2.4).
CONTOUR_TARGET = 1.1


@dataclass
class SpineTrainSettings:
    """One training run (recorded beside the weights)."""

    seeds: tuple[int, int]  # first, last phantom seed (inclusive) of the training boxes
    steps: int = 3000
    batch: int = 2
    lr: float = 2e-3
    eps: float = 0.03
    base: int = 8
    seed: int = 0
    threads: int = 2
    max_minutes: float = 35.0
    init: str | None = None  # weights to start from (a fine-tune), else a fresh network


def load_cases(
    seeds: Iterable[int],
    cache_dir: Path,
    spec: PhantomSpec | None = None,
    progress: Callable[[int], None] | None = None,
    refused: list[tuple[int, str]] | None = None,
) -> list[dict[str, Any]]:
    """Boxes of the phantoms ``seeds`` (made once, then read from ``cache_dir``).

    A phantom whose box the run-time checks refuse (:func:`~worker.locator.vertebrae.
    column_centre`: the column is ambiguous) gives no box, as it gives no verification at
    run time; its seed and the reason go to ``refused`` (and to a ``.refused`` file in the
    cache, so that it is not rendered again).

    Returns
    -------
    list of dict: ``image`` (z, y, x) int16 HU, ``classes`` and ``instance`` (z, y, x) uint8,
    ``in_scan`` (z,) bool, ``origin`` (3,) mm, ``names`` and ``truth`` (see
    :class:`worker.phantom.spine_box.SpineCase`).
    """
    import json

    from worker.locator.vertebrae import VerificationError
    from worker.phantom.spine_box import spine_case

    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = (
        ""
        if spec is None
        else "-"
        + "-".join(
            f"{k}{v}"
            for k, v in sorted(spec.__dict__.items())
            if v is not None
            and k != "with_labels"
            and v != PhantomSpec.__dataclass_fields__[k].default
        )
    )
    out = []
    for seed in seeds:
        path = cache_dir / f"spine-{CASE_VERSION}-{seed}{tag}.npz"
        marker = path.with_suffix(".refused")
        if not path.exists() and not marker.exists():
            try:
                case = spine_case(seed, spec)
            except VerificationError as exc:
                marker.write_text(str(exc) + "\n")
            else:
                np.savez_compressed(
                    path,
                    image=np.clip(np.rint(case.box.image), -1024, 3071).astype(np.int16),
                    classes=case.classes,
                    instance=case.instance,
                    in_scan=case.box.in_scan,
                    origin=np.array(case.box.origin_mm),
                    names=np.array(case.names),
                    truth=np.array(json.dumps(case.truth, default=float)),
                )
        if marker.exists():
            if refused is not None:
                refused.append((seed, marker.read_text().strip()))
            if progress:
                progress(1)
            continue
        d = np.load(path)
        out.append(
            {
                "image": d["image"],
                "classes": d["classes"],
                "instance": d["instance"],
                "in_scan": d["in_scan"],
                "origin": tuple(float(v) for v in d["origin"]),
                "names": [str(n) for n in d["names"]],
                "truth": json.loads(str(d["truth"])),
            }
        )
        if progress:
            progress(1)
    return out


def contour_target(classes: np.ndarray, n_classes: int = len(CLASSES)) -> np.ndarray:
    """One-hot target with :data:`CONTOUR_TARGET` on each foreground label's boundary.

    Parameters
    ----------
    classes : (..., z, y, x) integer class map.

    Returns
    -------
    (..., n_classes, z, y, x) float32: 1 for the voxel's class, 1.1 where that class's
    Laplacian is non-zero inside it (Mita et al. section 2.4), 0 elsewhere.
    """
    onehot = np.stack([(classes == c) for c in range(n_classes)], axis=-4).astype(np.float32)
    for c in range(1, n_classes):
        m = onehot[..., c, :, :, :]
        lap = ndimage.laplace(m) if m.ndim == 3 else np.stack([ndimage.laplace(x) for x in m])
        m[(lap != 0) & (m > 0)] = CONTOUR_TARGET
    return onehot


def spine_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy ``-sum_c w_c y_c log p_c``, mean over voxels.

    logits, target : (batch, classes, z, y, x).
    """
    w = torch.tensor(CLASS_WEIGHTS, dtype=logits.dtype, device=logits.device).view(1, -1, 1, 1, 1)
    return -(w * target * torch.log_softmax(logits, dim=1)).sum(1).mean()


def _crop(case: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A :data:`CROP_Z` crop (mostly over bone) of one box, intensity-randomised."""
    z_in = np.nonzero(case["in_scan"])[0]
    lo, hi = int(z_in[0]), int(z_in[-1]) - CROP_Z + 1
    if hi <= lo:
        lo = hi = max(0, min(int(z_in[0]), case["image"].shape[0] - CROP_Z))
    z0 = int(rng.integers(lo, hi + 1))
    img = case["image"][z0 : z0 + CROP_Z].astype(np.float32)
    cls = case["classes"][z0 : z0 + CROP_Z]
    if rng.random() < 0.5:
        img, cls = img[..., ::-1], cls[..., ::-1]
    bone = img > 100.0  # bone density from osteoporotic to dense (ANATOMY.md 50-300 HU)
    img = np.where(bone, 100.0 + (img - 100.0) * rng.uniform(0.5, 1.3), img)
    r = rng.random()
    if r < 0.4:  # a soft reconstruction kernel
        img = ndimage.gaussian_filter(img, rng.uniform(0.3, 1.2))
    elif r < 0.6:  # a sharp (bone) kernel: edge overshoot
        img = img + rng.uniform(0.3, 1.0) * (img - ndimage.gaussian_filter(img, 1.0))
    img = img + rng.normal(0.0, rng.uniform(0.0, 40.0), img.shape)
    return normalise_hu(img), np.ascontiguousarray(cls)


def train_spine(
    cases: list[dict[str, Any]],
    settings: SpineTrainSettings,
    out: Path,
    record: dict[str, Any],
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train :class:`SpineFCN` on ``cases`` and save ``{"state_dict", "base", "record"}``.

    Returns
    -------
    The record, completed with ``steps_done``, ``train_seconds`` and the loss history.
    """
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    rng = np.random.default_rng(settings.seed)
    net = SpineFCN(base=settings.base)
    if settings.init:
        net.load_state_dict(load_spine_model(Path(settings.init)).state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps)
    t0 = time.perf_counter()
    history: list[float] = []
    run = 0.0
    step = 0
    for step in range(1, settings.steps + 1):
        batch = [_crop(cases[int(rng.integers(len(cases)))], rng) for _ in range(settings.batch)]
        x = torch.from_numpy(np.stack([b[0] for b in batch])[:, None]).requires_grad_(True)
        y = torch.from_numpy(contour_target(np.stack([b[1] for b in batch])))
        opt.zero_grad()
        loss_st = spine_loss(net(x), y)
        loss_st.backward()  # the weights' gradients and the input's, in one pass
        # adversarial example: the perturbation of the input that increases the loss most
        x_adv = (x + settings.eps * x.grad.sign()).detach()
        loss_at = spine_loss(net(x_adv), y)
        loss_at.backward()
        loss = float(loss_st.detach()) + float(loss_at.detach())
        opt.step()
        sched.step()
        run = 0.95 * run + 0.05 * loss if step > 1 else loss
        if step % 50 == 0:
            history.append(round(run, 4))
        if progress:
            progress(1, run)
        if time.perf_counter() - t0 > settings.max_minutes * 60:
            break
    record = {
        **record,
        "settings": asdict(settings),
        "steps_done": step,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "loss_every_50_steps": history,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "base": settings.base, "record": record}, out)
    return record


def case_box(case: dict[str, Any]) -> SpineBox:
    """A cached case's (:func:`load_cases`) box as the locator builds it at run time, its
    scan's slice spacing too."""
    spacing = float(case["truth"].get("slice_thickness_mm", 1.0))
    return SpineBox(case["image"].astype(np.float32), case["in_scan"], case["origin"], spacing)


def evaluate_spine(net: SpineFCN, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """IoU per vertebra and the level verdicts on held-out boxes.

    For each reference vertebral body wholly inside the box, the IoU with the predicted
    body component that overlaps it most (Mita et al. section 4.1, Table 1). The verdict of
    :func:`~worker.locator.vertebrae.verify_level` on the box's simulated locator answer is
    right when its z lies inside the true L3 body.

    Returns
    -------
    dict: ``iou`` (name -> mean, n), ``levels`` (counts of verdicts; right before/after),
    ``transitional`` (flagged, right-or-flagged; also among the boxes whose scan shows both
    the sacrum and the last rib-bearing vertebra, where both counts can be made),
    ``levels_both_ends_in_view``, ``cases`` (per case).
    """
    ious: dict[str, list[float]] = {}
    per_case = []
    for case in cases:
        box = case_box(case)
        pred = segment_box(net, box)
        lab, _ = ndimage.label(pred == BODY)
        inst = case["instance"]
        for i, name in enumerate(case["names"], start=1):
            ref = inst == i
            n_ref = int(ref.sum())
            if n_ref == 0:
                continue
            zz = np.nonzero(ref.any(axis=(1, 2)))[0]
            ins = np.nonzero(case["in_scan"])[0]
            if zz[0] <= ins[0] or zz[-1] >= ins[-1]:
                continue  # cut by the box or the scan
            hits = np.bincount(lab[ref], minlength=1)
            hits[0] = 0
            k = int(np.argmax(hits))
            p = lab == k if k > 0 else np.zeros_like(ref)
            inter = int((p & ref).sum())
            ious.setdefault(name, []).append(inter / float((p | ref).sum()))
        t = case["truth"]
        v = verify_level(count_levels(pred, box), t["locator_z_mm"])
        z0, z1 = t["l3_range_mm"]
        lo, hi = t["scan_mm"]
        box_lo, box_hi = box.z_of(0), box.z_of(len(box.in_scan) - 1)
        last_rib = t["vertebrae_mm"].get(f"T{t['n_rib_pairs']}", (np.inf, np.inf))
        both = max(lo, box_lo) < -5.0 and min(hi, box_hi) > last_rib[1] + 3.0
        per_case.append(
            {
                "seed": t["seed"],
                "both_ends_in_view": bool(both),
                "transitional": t.get("transitional"),
                "status": v.status,
                "flagged": v.possible_transitional_anatomy,
                "lumbar_counted": v.lumbar_counted,
                "right_before": bool(z0 <= t["locator_z_mm"] <= z1),
                "right_after": bool(z0 <= v.z_mm <= z1),
                "error_after_mm": round(abs(v.z_mm - t["l3_mid_mm"]), 1),
            }
        )
    n = max(len(per_case), 1)
    trans = [c for c in per_case if c["transitional"]]
    seen = [c for c in trans if c["both_ends_in_view"]]
    both_seen = [c for c in per_case if c["both_ends_in_view"]]
    typical = [c for c in per_case if not c["transitional"]]
    return {
        "iou": {
            k: {"mean": round(float(np.mean(v)), 3), "n": len(v)} for k, v in sorted(ious.items())
        },
        "levels": {
            "n": len(per_case),
            "right_before": sum(c["right_before"] for c in per_case) / n,
            "right_after": sum(c["right_after"] for c in per_case) / n,
            "status": {
                s: sum(c["status"] == s for c in per_case)
                for s in ("confirmed", "corrected", "unverified")
            },
            "flagged_typical": sum(c["flagged"] for c in typical),
            "n_typical": len(typical),
        },
        "transitional": {
            "n": len(trans),
            "flagged": sum(c["flagged"] for c in trans),
            "right_or_flagged": sum(c["flagged"] or c["right_after"] for c in trans),
            "n_both_ends_in_view": len(seen),
            "flagged_both_ends_in_view": sum(c["flagged"] for c in seen),
            "right_or_flagged_both_ends_in_view": sum(
                c["flagged"] or c["right_after"] for c in seen
            ),
        },
        "levels_both_ends_in_view": {
            "n": len(both_seen),
            "right_after": sum(c["right_after"] for c in both_seen),
        },
        "cases": per_case,
    }
