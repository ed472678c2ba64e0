"""``l3spot train --from-reviews``: fine-tune the locator on the site's reviewed scans, evaluate
the candidate against the active version, promote it only if it is better (issue 17).

1. **Data.** The latest decision of every reviewed series (:mod:`worker.training.reviews`),
   split by patient with a stable hash (:func:`worker.training.reviews.is_held_out`): the
   held-out patients are never trained on, by this run or any later one with the same
   fraction. Training phantoms of the default style are mixed in (``phantoms``, half of
   the windows by default) so that the model does not forget what it knew.
2. **Training.** Both stages of the active version (first stage, then refinement) are
   fine-tuned from their weights (Belharbi et al. 2017, section 3.2; the same loss, window
   sampling and augmentation as :func:`worker.training.locator.train_locator`), one pass of
   ``steps`` steps each with a warm-up and a cosine decay; no epoch is chosen, so no
   validation data is spent on choosing.
3. **Evaluation.** Candidate and active version locate L3 (both stages,
   :func:`worker.locator.locate.locate_in_mip`) on the held-out reviewed scans and on a
   fixed phantom benchmark of the default style (seeds disjoint from the training
   phantoms'). A scan is *right* when L3 is in the field of view and found within 10 mm
   of the reader's slice, or when L3 is not in the series and the locator says so.
4. **Promotion** (:func:`decide`): only when the candidate is better on the held-out site
   scans (more right, or as many right and a lower mean error) and no worse on the phantom
   benchmark (its right share at most ``phantom_tolerance`` lower and its mean error at
   most ``phantom_mean_tolerance_mm`` higher). Every candidate is kept as a version with
   its record, evaluation and card, promoted or not (:mod:`core.model_registry`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import Config
from core.errors import L3SpotError
from core.model_registry import (
    CARD_FILE,
    COARSE_FILE,
    EVALUATION_FILE,
    FINE_FILE,
    RECORD_FILE,
    ModelRegistry,
    ModelVersion,
)
from worker.locator.locate import locate_in_mip
from worker.locator.weights import LoadedLocator, load_locator
from worker.mip import Mip
from worker.training.locator import MipCase, TrainSettings, phantom_spec, train_locator
from worker.training.reviews import (
    ReviewExample,
    read_locator_mips,
    review_examples,
    split_examples,
    write_locator_mips,
)

#: A found L3 farther than this from the truth, or a missed one, counts this error (mm) in
#: the mean, so that one wrong level does not outweigh every other scan.
ERROR_CLIP_MM = 50.0
#: "Right" means within this distance (mm) of the reader's slice (the targets of issue 15).
RIGHT_WITHIN_MM = 10.0


class NotEnoughReviewsError(L3SpotError):
    """Too few reviewed scans to train or to evaluate a candidate."""


@dataclass
class FromReviewsSettings:
    """Settings of :func:`train_from_reviews` (defaults: docs/learning.md)."""

    steps: int = 300  # per stage
    batch_size: int = 32
    lr: float = 3e-4
    phantoms: int = 60  # default-style training phantoms mixed in
    phantom_seed: int = 0
    site_share: float = 0.5  # share of training windows drawn from the site's scans
    holdout_fraction: float = 0.25
    min_train: int = 8
    min_holdout: int = 3
    bench_phantoms: int = 40
    bench_seed: int = 970_000
    phantom_tolerance: float = 0.025
    phantom_mean_tolerance_mm: float = 1.0
    seed: int = 0
    device: str = "cpu"
    cache_dir: Path = Path("var/cache/locator_mips")


@dataclass
class EvalCase:
    """A scan to locate L3 in: its MIP per pixel size and the truth (None = no L3)."""

    name: str
    mips: list[Mip]
    l3_z_mm: float | None

    def mip_at(self, pixel_mm: float) -> Mip:
        for m in self.mips:
            if abs(m.pixel_mm - pixel_mm) < 1e-6:
                return m
        raise KeyError(f"{self.name}: no MIP at {pixel_mm:g} mm")


@dataclass
class Scores:
    """How a locator version did on a set of scans.

    Attributes
    ----------
    n : scans; n_in_fov : of them with L3 in the field of view.
    right : share of scans right (see the module docstring).
    within_10mm : share of in-FOV scans found within 10 mm.
    absent_right : share of no-L3 scans said "not in field of view" (None without any).
    mean_abs_mm : mean absolute error (mm) on in-FOV scans, a miss or a larger error
        counted as :data:`ERROR_CLIP_MM`.
    errors_mm : per scan: signed error (mm), None for a miss, "absent" cases left out.
    """

    n: int
    n_in_fov: int
    right: float
    within_10mm: float | None
    absent_right: float | None
    mean_abs_mm: float | None
    errors_mm: list[float | None] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["errors_mm"] = [None if e is None else round(e, 2) for e in self.errors_mm]
        for k in ("right", "within_10mm", "absent_right", "mean_abs_mm"):
            if d[k] is not None:
                d[k] = round(d[k], 4)
        return d


def _stages(version: ModelVersion) -> tuple[LoadedLocator, LoadedLocator | None]:
    coarse = load_locator(version.weights, "cpu")
    fine = load_locator(version.refine_weights, "cpu") if version.refine_weights else None
    return coarse, fine


def evaluate_version(version: ModelVersion, cases: Sequence[EvalCase], config: Config) -> Scores:
    """Locate L3 with both stages of ``version`` in every case and score it.

    Parameters
    ----------
    version : the locator version.
    cases : MIPs at the version's pixel sizes with their truth.
    config : ``locator`` strides, batch size and minimum confidence.
    """
    coarse, fine = _stages(version)
    lc = config.locator
    errors: list[float | None] = []
    right = in_fov = absent = absent_ok = 0
    for c in cases:
        fine_pair = None if fine is None else (c.mip_at(fine.spec.pixel_mm), fine)
        loc = locate_in_mip(
            c.mip_at(coarse.spec.pixel_mm),
            coarse,
            lc.stride_px,
            lc.batch_size,
            lc.min_confidence,
            fine_pair,
            lc.refine_stride_px,
        )
        found = loc.in_field_of_view and loc.z_mm is not None
        if c.l3_z_mm is None:
            absent += 1
            absent_ok += int(not found)
            right += int(not found)
            continue
        in_fov += 1
        err = float(loc.z_mm) - c.l3_z_mm if found else None
        errors.append(err)
        right += int(err is not None and abs(err) <= RIGHT_WITHIN_MM)
    clipped = [ERROR_CLIP_MM if e is None else min(abs(e), ERROR_CLIP_MM) for e in errors]
    within = [e is not None and abs(e) <= RIGHT_WITHIN_MM for e in errors]
    return Scores(
        n=len(cases),
        n_in_fov=in_fov,
        right=right / len(cases) if cases else 0.0,
        within_10mm=float(np.mean(within)) if within else None,
        absent_right=absent_ok / absent if absent else None,
        mean_abs_mm=float(np.mean(clipped)) if clipped else None,
        errors_mm=errors,
    )


def _better(a: Scores, b: Scores) -> bool:
    """``a`` better than ``b``: more scans right, or as many and a lower mean error."""
    if a.right != b.right:
        return a.right > b.right
    return (a.mean_abs_mm or 0.0) < (b.mean_abs_mm or 0.0)


def decide(
    site: tuple[Scores, Scores], phantoms: tuple[Scores, Scores], settings: FromReviewsSettings
) -> tuple[bool, str]:
    """Whether to promote the candidate, and why.

    Parameters
    ----------
    site : (candidate, active) on the held-out reviewed scans.
    phantoms : (candidate, active) on the phantom benchmark.

    Returns
    -------
    (promote, reason)
    """
    (cs, as_), (cp, ap) = site, phantoms
    if not _better(cs, as_):
        return False, (
            f"not better on the site's held-out scans ({cs.right:.1%} right, mean "
            f"{cs.mean_abs_mm or 0:.1f} mm vs {as_.right:.1%}, {as_.mean_abs_mm or 0:.1f} mm)"
        )
    if cp.right < ap.right - settings.phantom_tolerance:
        return False, (
            f"worse on the phantom benchmark ({cp.right:.1%} right vs {ap.right:.1%}, "
            f"tolerance {settings.phantom_tolerance:.1%})"
        )
    if (cp.mean_abs_mm or 0.0) > (ap.mean_abs_mm or 0.0) + settings.phantom_mean_tolerance_mm:
        return False, (
            f"worse on the phantom benchmark (mean {cp.mean_abs_mm:.2f} mm vs "
            f"{ap.mean_abs_mm:.2f} mm, tolerance {settings.phantom_mean_tolerance_mm:g} mm)"
        )
    return True, (
        f"better on the site's held-out scans ({cs.right:.1%} right, mean "
        f"{cs.mean_abs_mm or 0:.1f} mm vs {as_.right:.1%}, {as_.mean_abs_mm or 0:.1f} mm) and no "
        f"worse on the phantom benchmark ({cp.right:.1%} vs {ap.right:.1%} right)"
    )


def phantom_eval_cases(
    seeds: Sequence[int],
    pixel_mms: tuple[float, ...],
    cache_dir: Path | None,
    training: bool,
    site: str | None = None,
) -> list[EvalCase]:
    """Phantoms of ``seeds`` as MIPs at ``pixel_mms`` with their true mid-L3 z (cached).

    Parameters
    ----------
    training : the training phantoms' spec (:func:`worker.training.locator.phantom_spec`)
        or the evaluation one.
    site : a simulated site (:data:`worker.phantom.SITES`) or None.
    """
    from worker.phantom import generate_phantom_mips

    out = []
    tag = "-".join(f"{p:g}" for p in pixel_mms)
    for seed in seeds:
        name = f"phantom-{seed}{'-' + site if site else ''}-{'train' if training else 'eval'}"
        path = None if cache_dir is None else Path(cache_dir) / f"{name}-{tag}mm.npz"
        if path is not None and path.is_file():
            mips, group = read_locator_mips(path)
            with np.load(path) as z:
                truth = float(z["truth_l3_z_mm"]) if "truth_l3_z_mm" in z else math.nan
            out.append(EvalCase(name, mips, None if math.isnan(truth) else truth))
            continue
        spec = dataclasses.replace(phantom_spec(seed, training), site=site)
        pms = generate_phantom_mips(seed, spec, pixel_mms)
        truth = pms[0].truth
        z = float(truth.l3_mid_z_mm) if truth.l3_in_fov else None
        mips = [pm.mip for pm in pms]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_locator_mips(path.parent, mips, name, filename=path.name, truth_l3_z_mm=z)
        out.append(EvalCase(name, mips, z))
    return out


def _cases_for_stage(
    site: Sequence[ReviewExample],
    phantoms: Sequence[EvalCase],
    pixel_mm: float,
    site_share: float,
) -> list[MipCase]:
    """Training cases of one stage: the site's scans repeated so that about ``site_share``
    of the windows come from them (windows are drawn uniformly over the cases)."""
    site_cases = [e.case(pixel_mm) for e in site]
    ph = []
    for c in phantoms:
        m = c.mip_at(pixel_mm)
        row = None if c.l3_z_mm is None else float(m.z_to_row(c.l3_z_mm))
        sz = m.slice_z_mm
        slice_mm = float(np.median(np.diff(sz))) if len(sz) > 1 else 1.0
        ph.append(MipCase(c.name, c.name, m.image, m.pixel_mm, row, slice_mm))
    if not ph:
        return site_cases
    repeat = max(1, round(site_share / max(1e-6, 1 - site_share) * len(ph) / len(site_cases)))
    return site_cases * repeat + ph


@dataclass
class FromReviewsOutcome:
    """What :func:`train_from_reviews` did."""

    version: str
    base: str
    promoted: bool
    reason: str
    evaluation: dict[str, Any]
    folder: Path


def _example_case(e: ReviewExample) -> EvalCase:
    return EvalCase(f"review-{e.series_uid}", e.mips, e.l3_z_mm)


def train_from_reviews(
    config: Config,
    reviews: Sequence,
    settings: FromReviewsSettings,
    *,
    promote: bool = True,
    by: str = "l3spot train --from-reviews",
    record: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> FromReviewsOutcome:
    """Fine-tune the active locator on the reviewed scans; keep, evaluate, maybe promote.

    Parameters
    ----------
    config : the site configuration (results folder, models folder, locator settings).
    reviews : :class:`core.jobs.ReviewRecord` rows of the job store.
    settings : :class:`FromReviewsSettings`.
    promote : promote a candidate that passes :func:`decide` (False: evaluate only).
    by : who promotes (the history of ``active.json``).
    record : extra entries for the record (command line, git commit).
    progress : called with a line of progress text.

    Returns
    -------
    FromReviewsOutcome

    Raises
    ------
    NotEnoughReviewsError
        Fewer than ``min_train`` training or ``min_holdout`` held-out reviewed scans.
    """
    say = progress or (lambda _line: None)
    t0 = time.perf_counter()
    registry = ModelRegistry.from_config(config)
    base = registry.active()
    coarse, fine = _stages(base)
    pixel_mms = (coarse.spec.pixel_mm,) + ((fine.spec.pixel_mm,) if fine is not None else ())
    examples, skipped = review_examples(reviews, config.node.resolved_results_dir())
    usable = []
    for e in examples:
        try:
            for px in pixel_mms:
                e.mip_at(px)
        except KeyError:
            skipped["other_pixel_size"] = skipped.get("other_pixel_size", 0) + 1
            continue
        usable.append(e)
    train, held = split_examples(usable, settings.holdout_fraction)
    say(
        f"{len(usable)} reviewed scans ({len(train)} for training, {len(held)} held out; "
        f"skipped: {skipped or 'none'}); active version {base.label}"
    )
    if len(train) < settings.min_train or len(held) < settings.min_holdout:
        raise NotEnoughReviewsError(
            f"{len(train)} reviewed scans to train on and {len(held)} held out; need at least "
            f"{settings.min_train} and {settings.min_holdout} (review more results)"
        )
    torch.manual_seed(settings.seed)
    phantom_seeds = range(settings.phantom_seed, settings.phantom_seed + settings.phantoms)
    say(f"{settings.phantoms} training phantoms (seeds {settings.phantom_seed}..)")
    phantoms = phantom_eval_cases(phantom_seeds, pixel_mms, settings.cache_dir, training=True)
    name, folder = registry.new_version()
    say(f"candidate {name}: fine-tuning {base.label}")
    rec: dict[str, Any] = {
        **(record or {}),
        "version": name,
        "base_version": base.label,
        "seed": settings.seed,
        "settings": {k: str(v) for k, v in dataclasses.asdict(settings).items()},
        "site_training_series": [e.series_uid for e in train],
        "site_held_out_series": [e.series_uid for e in held],
        "site_decisions": {
            a: sum(e.action == a for e in train) for a in ("accept", "correct", "reject")
        },
        "skipped": skipped,
        "phantom_training_seeds": f"{phantom_seeds.start}..{phantom_seeds.stop - 1}",
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    stages = [("coarse", coarse, base.weights, folder / COARSE_FILE)]
    if fine is not None and base.refine_weights is not None:
        stages.append(("fine", fine, base.refine_weights, folder / FINE_FILE))
    for stage, loaded, init, out in stages:
        cases = _cases_for_stage(train, phantoms, loaded.spec.pixel_mm, settings.site_share)
        ts = TrainSettings(
            arch=loaded.arch,
            epochs=1,
            steps_per_epoch=settings.steps,
            batch_size=settings.batch_size,
            lr=settings.lr,
            seed=settings.seed,
            device=settings.device,
            spec=loaded.spec,
            init=init,
            stage=stage,
        )
        site_val = [e.case(loaded.spec.pixel_mm) for e in train]
        say(f"{stage} stage: {settings.steps} steps on {len(cases)} cases")
        train_locator(
            cases,
            site_val,
            ts,
            out,
            {**rec, "stage": stage},
            max_val_scans=10,
            checkpoint=folder / f".{stage}.ckpt",
        )
        (folder / f".{stage}.ckpt").unlink(missing_ok=True)
    if fine is None:
        (folder / FINE_FILE).unlink(missing_ok=True)
    rec["wall_seconds_training"] = round(time.perf_counter() - t0, 1)
    (folder / RECORD_FILE).write_text(json.dumps(rec, indent=2, default=str) + "\n")
    candidate = registry.get(name)

    say(f"evaluating {name} and {base.label} on {len(held)} held-out reviewed scans")
    held_cases = [_example_case(e) for e in held]
    site_scores = (
        evaluate_version(candidate, held_cases, config),
        evaluate_version(base, held_cases, config),
    )
    bench_seeds = range(settings.bench_seed, settings.bench_seed + settings.bench_phantoms)
    say(f"... and on {settings.bench_phantoms} benchmark phantoms (seeds {settings.bench_seed}..)")
    bench = phantom_eval_cases(bench_seeds, pixel_mms, settings.cache_dir, training=False)
    phantom_scores = (
        evaluate_version(candidate, bench, config),
        evaluate_version(base, bench, config),
    )
    ok, reason = decide(site_scores, phantom_scores, settings)
    evaluation = {
        "candidate": name,
        "compared_with": base.label,
        "site_held_out": {
            "series": [e.series_uid for e in held],
            "candidate": site_scores[0].summary(),
            "active": site_scores[1].summary(),
        },
        "phantom_benchmark": {
            "seeds": f"{settings.bench_seed}..{settings.bench_seed + settings.bench_phantoms - 1}",
            "candidate": phantom_scores[0].summary(),
            "active": phantom_scores[1].summary(),
        },
        "decision": "promote" if ok else "keep the active version",
        "reason": reason,
        "promoted": bool(ok and promote),
    }
    (folder / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2) + "\n")
    (folder / CARD_FILE).write_text(model_card(name, rec, evaluation))
    if ok and promote:
        registry.promote(name, by, reason)
    say(f"{name}: {evaluation['decision']} ({reason})")
    return FromReviewsOutcome(name, base.label, bool(ok and promote), reason, evaluation, folder)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _mm(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} mm"


def model_card(name: str, record: dict[str, Any], evaluation: dict[str, Any]) -> str:
    """The Markdown model card of a site version: what it saw, how it did, the decision."""
    rows = []
    for label, key in (
        ("held-out reviewed scans", "site_held_out"),
        ("phantom benchmark", "phantom_benchmark"),
    ):
        part = evaluation[key]
        for who in ("candidate", "active"):
            s = part[who]
            rows.append(
                f"| {label} | {name if who == 'candidate' else evaluation['compared_with']} | "
                f"{s['n']} ({s['n_in_fov']} with L3) | {_pct(s['right'])} | "
                f"{_pct(s['within_10mm'])} | {_pct(s['absent_right'])} | {_mm(s['mean_abs_mm'])} |"
            )
    decisions = record.get("site_decisions", {})
    return "\n".join(
        [
            f"# Model card: locator version `{name}` (fine-tuned on this site's reviews)",
            "",
            f"- **Base**: `{record.get('base_version')}`, both stages fine-tuned "
            f"(`l3spot train --from-reviews`, docs/learning.md).",
            f"- **Command**: `{record.get('command', '')}`; git commit "
            f"`{str(record.get('git_commit', 'unknown'))[:12]}`; seed {record.get('seed')}; "
            f"torch {record.get('torch')}; started {record.get('started')}.",
            f"- **What it saw**: {len(record.get('site_training_series', []))} of the site's "
            f"reviewed scans (accepted {decisions.get('accept', 0)}, corrected "
            f"{decisions.get('correct', 0)}, rejected {decisions.get('reject', 0)}: the "
            "frontal MIPs and the reader's L3, no CT, no patient identifiers) and the "
            f"default-style training phantoms {record.get('phantom_training_seeds')}.",
            f"- **What it did not see**: the {len(record.get('site_held_out_series', []))} "
            "held-out reviewed scans (patients chosen by a stable hash, never trained on by "
            f"any run) and the benchmark phantoms {evaluation['phantom_benchmark']['seeds']}.",
            "- **Caveat**: the held-out scans decide the promotion and are the figures "
            "reported; with few of them the figures are noisy.",
            "",
            "| data | version | scans | right | within 10 mm | no-L3 said absent | mean error |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"**Decision**: {evaluation['decision']}: {evaluation['reason']}."
            + (" Promoted." if evaluation.get("promoted") else " Not promoted."),
            "",
        ]
    )
