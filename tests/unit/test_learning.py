"""Learning from the readers' reviews (issue 17): locator versions, training examples kept by
the analysis, the promotion rule, ``l3spot train --from-reviews`` and ``l3spot models``."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

import worker.pipeline as pipeline
from core.config import Config
from core.layout import LOCATOR_MIPS_FILE
from core.model_registry import (
    COARSE_FILE,
    FINE_FILE,
    SHIPPED,
    ModelRegistry,
    ModelRegistryError,
    active_locator,
)
from worker.mip import Mip
from worker.training.from_reviews import (
    FromReviewsSettings,
    NotEnoughReviewsError,
    Scores,
    decide,
    phantom_eval_cases,
    train_from_reviews,
)
from worker.training.reviews import (
    is_held_out,
    read_locator_mips,
    review_examples,
    split_examples,
    write_locator_mips,
)


def _config(tmp_path: Path, **locator: object) -> Config:
    return Config.model_validate(
        {"node": {"spool_dir": str(tmp_path / "spool")}, "locator": locator}
    )


def _site_version(registry: ModelRegistry) -> str:
    """A site version holding copies of the shipped weights."""
    name, folder = registry.new_version()
    shutil.copy(registry.shipped.weights, folder / COARSE_FILE)
    shutil.copy(registry.shipped.refine_weights, folder / FINE_FILE)
    (folder / "record.json").write_text(json.dumps({"base_version": SHIPPED}))
    return name


# ------------------------------------------------------------------------------ the registry


def test_registry_promotes_rolls_back_and_the_analysis_config_follows(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    registry = ModelRegistry.from_config(cfg)
    assert registry.root == tmp_path / "models"
    locator, label = active_locator(cfg)
    assert locator.weights == cfg.locator.weights
    assert label == f"{SHIPPED} ({cfg.locator.weights.stem}, {cfg.locator.refine_weights.stem})"
    with pytest.raises(ModelRegistryError, match="nothing to roll back"):
        registry.rollback("alice")

    first, second = _site_version(registry), _site_version(registry)
    assert (first, second) == ("site-0001", "site-0002")
    registry.promote(first, "alice", "better on the site")
    locator, label = active_locator(cfg)
    assert label == "site-0001"
    assert locator.weights == registry.versions_dir / first / COARSE_FILE
    assert locator.refine_weights == registry.versions_dir / first / FINE_FILE
    registry.promote(second, "bob", "better again")
    assert registry.rollback("carol", "worse on real scans")["version"] == first
    assert active_locator(cfg)[1] == first
    assert registry.rollback("carol")["version"] == SHIPPED
    history = registry.state()["history"]
    assert [(h["action"], h["version"], h["previous"], h["by"]) for h in history] == [
        ("promote", first, SHIPPED, "alice"),
        ("promote", second, first, "bob"),
        ("rollback", first, second, "carol"),
        ("rollback", SHIPPED, first, "carol"),
    ]
    # the configured weights whatever is promoted, when the site says so
    registry.promote(second, "bob", "again")
    off = _config(tmp_path, use_site_models=False)
    assert active_locator(off)[0].weights == off.locator.weights


def test_a_promoted_version_whose_weights_are_gone_fails_rather_than_falls_back(
    tmp_path: Path,
) -> None:
    cfg = _config(tmp_path)
    registry = ModelRegistry.from_config(cfg)
    name = _site_version(registry)
    registry.promote(name, "alice", "test")
    (registry.versions_dir / name / COARSE_FILE).unlink()
    with pytest.raises(ModelRegistryError, match=name):
        active_locator(cfg)
    with pytest.raises(ModelRegistryError, match="no locator version"):
        registry.promote("site-0099", "alice", "typo")
    with pytest.raises(ModelRegistryError):
        registry.get("../../etc")


# --------------------------------------------------------- what the analysis keeps and names


def test_the_analysis_keeps_its_mips_and_names_the_locator_version(
    phantom_series, tmp_path: Path
) -> None:
    series_dir, ph = phantom_series
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    result = pipeline.analyze_series(series_dir, out, cfg)
    shipped_label = active_locator(cfg)[1]
    assert result.algorithm.locator_model == shipped_label
    mips, group = read_locator_mips(out / LOCATOR_MIPS_FILE)
    assert [m.pixel_mm for m in mips] == [3.0, 1.0]  # the two stages' pixel sizes
    study_uid = pydicom.dcmread(next(series_dir.glob("*.dcm"))).StudyInstanceUID
    assert group == f"study:{study_uid}"  # no patient history here
    assert len(mips[0].slice_z_mm) == ph.volume.hu.shape[0]
    assert abs(mips[1].image.shape[0] - mips[0].image.shape[0] * 3) <= 3
    for name in ("sr.dcm", "seg.dcm"):
        ds = pydicom.dcmread(out / name)
        assert list(ds.SoftwareVersions)[1] == f"locator {shipped_label}"
        ours = [
            i
            for i in ds.ContributingEquipmentSequence
            if i.ManufacturerModelName == ds.ManufacturerModelName
        ]
        assert len(ours) == 1 and list(ours[0].SoftwareVersions) == list(ds.SoftwareVersions)

    registry = ModelRegistry.from_config(cfg)
    registry.promote(_site_version(registry), "alice", "test")
    again = pipeline.analyze_series(series_dir, tmp_path / "again", cfg)
    assert again.algorithm.locator_model == "site-0001"
    sr = pydicom.dcmread(tmp_path / "again" / "sr.dcm")
    assert "locator site-0001" in list(sr.SoftwareVersions)
    assert (
        json.loads((tmp_path / "again" / "result.json").read_text())["algorithm"]["locator_model"]
        == "site-0001"
    )


# ------------------------------------------------------------------------ training examples


def _mips(z_top: float = 300.0) -> list[Mip]:
    rng = np.random.default_rng(0)
    sz = np.arange(0.0, 300.0, 5.0)
    return [
        Mip(rng.normal(0, 100, (100, 128)).astype(np.float32), 3.0, z_top, sz),
        Mip(rng.normal(0, 100, (300, 128)).astype(np.float32), 1.0, z_top, sz),
    ]


def _review(i: int, uid: str, action: str, z: float | None, at: float) -> object:
    return types.SimpleNamespace(
        id=i, series_uid=uid, action=action, z_mm=z, created_at=at, model_version="site-0001"
    )


def test_each_reviewed_series_is_labelled_by_its_latest_decision(tmp_path: Path) -> None:
    for uid in ("1.1", "1.2", "1.3", "1.4"):
        write_locator_mips(tmp_path / uid, _mips(), f"patient-{uid}")
    reviews = [
        _review(1, "1.1", "accept", 120.0, 1.0),  # accepted: the measured slice
        _review(2, "1.2", "accept", 120.0, 1.0),
        _review(3, "1.2", "correct", 85.0, 2.0),  # corrected later: the chosen slice
        _review(4, "1.3", "reject", None, 1.0),  # rejected: L3 not in the series
        _review(5, "1.4", "accept", None, 1.0),  # "not in the FOV" confirmed
        _review(6, "1.5", "accept", 100.0, 1.0),  # results deleted by retention
    ]
    (tmp_path / "1.6").mkdir()
    (tmp_path / "1.6" / LOCATOR_MIPS_FILE).write_bytes(b"not a zip")
    reviews.append(_review(7, "1.6", "accept", 100.0, 1.0))
    examples, skipped = review_examples(reversed(reviews), tmp_path)
    got = {e.series_uid: (e.action, e.l3_z_mm) for e in examples}
    assert got == {
        "1.1": ("accept", 120.0),
        "1.2": ("correct", 85.0),
        "1.3": ("reject", None),
        "1.4": ("accept", None),
    }
    assert skipped == {"no_mips": 1, "unreadable": 1}
    e = next(e for e in examples if e.series_uid == "1.2")
    assert e.group == "patient-1.2" and e.model_version == "site-0001"
    case = e.case(3.0)
    assert case.l3_row == pytest.approx((300.0 - 85.0) / 3.0)
    assert e.case(1.0).l3_row == pytest.approx(215.0)
    assert next(e for e in examples if e.series_uid == "1.3").case(3.0).l3_row is None
    with pytest.raises(KeyError):
        e.mip_at(2.0)


def test_the_held_out_patients_are_the_same_in_every_run() -> None:
    groups = [f"patient-{i}" for i in range(400)]
    held = [g for g in groups if is_held_out(g, 0.25)]
    assert 0.18 < len(held) / len(groups) < 0.32
    assert held == [g for g in groups if is_held_out(g, 0.25)]
    # a larger fraction holds out a superset: no patient moves from held-out to training
    assert set(held) <= {g for g in groups if is_held_out(g, 0.4)}
    mips = _mips()
    from worker.training.reviews import ReviewExample

    examples = [
        ReviewExample(f"1.{i}", f"patient-{i // 2}", mips, 100.0, "accept", "") for i in range(80)
    ]
    train, test = split_examples(examples, 0.25)
    assert not {e.group for e in train} & {e.group for e in test}
    assert len(train) + len(test) == 80


# ------------------------------------------------------------------------ the promotion rule


def _scores(right: float, mean: float) -> Scores:
    return Scores(
        n=10, n_in_fov=10, right=right, within_10mm=right, absent_right=None, mean_abs_mm=mean
    )


@pytest.mark.parametrize(
    ("site", "phantoms", "promote", "why"),
    [
        (
            (_scores(0.9, 3.0), _scores(0.8, 9.0)),
            (_scores(1.0, 0.8), _scores(1.0, 0.8)),
            True,
            "better on the site",
        ),
        (
            (_scores(0.8, 3.0), _scores(0.8, 4.0)),
            (_scores(1.0, 0.8), _scores(1.0, 0.8)),
            True,
            "better on the site",
        ),  # as many right, lower mean error
        (
            (_scores(0.8, 4.0), _scores(0.8, 4.0)),
            (_scores(1.0, 0.8), _scores(1.0, 0.8)),
            False,
            "not better",
        ),
        (
            (_scores(0.7, 1.0), _scores(0.8, 9.0)),
            (_scores(1.0, 0.8), _scores(1.0, 0.8)),
            False,
            "not better",
        ),  # fewer right, whatever the mean error
        (
            (_scores(0.9, 3.0), _scores(0.8, 9.0)),
            (_scores(0.95, 0.8), _scores(1.0, 0.8)),
            False,
            "worse on the phantom benchmark",
        ),
        (
            (_scores(0.9, 3.0), _scores(0.8, 9.0)),
            (_scores(1.0, 2.5), _scores(1.0, 0.8)),
            False,
            "worse on the phantom benchmark",
        ),
        (
            (_scores(0.9, 3.0), _scores(0.8, 9.0)),
            (_scores(0.98, 1.5), _scores(1.0, 0.8)),
            True,
            "no worse",
        ),  # within both tolerances
    ],
)
def test_a_candidate_is_promoted_only_if_better_on_the_site_and_no_worse_on_phantoms(
    site, phantoms, promote: bool, why: str
) -> None:
    ok, reason = decide(site, phantoms, FromReviewsSettings())
    assert ok is promote
    assert why in reason


# ------------------------------------------------------------------- train --from-reviews


def _reviewed_site(cfg: Config, cache: Path, n: int) -> list[object]:
    """``n`` reviewed scans in the results folder: phantom MIPs, one patient each."""
    cases = phantom_eval_cases([930_001], (3.0, 1.0), cache, training=False)  # L3 in the FOV
    assert cases[0].l3_z_mm is not None
    res = cfg.node.resolved_results_dir()
    out = []
    for i in range(n):
        write_locator_mips(res / f"2.25.{i}", cases[0].mips, f"patient-{i}")
        out.append(_review(i, f"2.25.{i}", "correct", cases[0].l3_z_mm, float(i)))
    return out


@pytest.mark.slow  # about 17 s: two phantoms, two short fine-tunings, four evaluations
def test_train_from_reviews_keeps_every_candidate_with_its_record_and_card(
    tmp_path: Path,
) -> None:
    cfg = _config(tmp_path)
    cache = tmp_path / "cache"
    reviews = _reviewed_site(cfg, cache, 14)
    settings = FromReviewsSettings(
        steps=2,
        batch_size=4,
        phantoms=0,
        bench_phantoms=1,
        cache_dir=cache,
        min_train=4,
        min_holdout=2,
        holdout_fraction=0.3,
    )
    with pytest.raises(NotEnoughReviewsError, match="need at least"):
        train_from_reviews(cfg, reviews[:3], settings)
    assert not (tmp_path / "models" / "versions").exists()  # nothing made

    out = train_from_reviews(cfg, reviews, settings, promote=False, record={"command": "t"})
    folder = tmp_path / "models" / "versions" / "site-0001"
    assert out.version == "site-0001" and out.folder == folder and not out.promoted
    assert {p.name for p in folder.iterdir()} == {
        "locator.pt",
        "locator_fine.pt",
        "record.json",
        "evaluation.json",
        "card.md",
    }
    record = json.loads((folder / "record.json").read_text())
    trained, held = set(record["site_training_series"]), set(record["site_held_out_series"])
    assert trained and held and not trained & held and len(trained | held) == 14
    assert record["base_version"].startswith(SHIPPED) and record["command"] == "t"
    evaluation = json.loads((folder / "evaluation.json").read_text())
    assert set(evaluation["site_held_out"]["series"]) == held
    assert evaluation["site_held_out"]["candidate"]["n"] == len(held)
    assert evaluation["phantom_benchmark"]["active"]["n"] == 1
    assert evaluation["promoted"] is False
    card = (folder / "card.md").read_text()
    assert "site-0001" in card and f"{len(trained)} of the site's" in card
    assert ModelRegistry.from_config(cfg).state()["active"] == SHIPPED

    # the CLI lists it, promotes it (audited), rolls it back
    from l3spot import app

    (tmp_path / "config.yaml").write_text(
        f"node:\n  spool_dir: {tmp_path / 'spool'}\nlogging:\n  json_logs: false\n"
    )
    conf = ["--config", str(tmp_path / "config.yaml")]
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list", "--json", *conf])
    assert listed.exit_code == 0, listed.output
    versions = json.loads(listed.output)["versions"]
    assert [v["version"].split(" ")[0] for v in versions] == [SHIPPED, "site-0001"]
    assert versions[0]["active"] and not versions[1]["active"]
    done = runner.invoke(app, ["models", "promote", "site-0001", "--reason", "by hand", *conf])
    assert done.exit_code == 0, done.output
    assert active_locator(cfg)[1] == "site-0001"
    done = runner.invoke(app, ["models", "rollback", *conf])
    assert done.exit_code == 0, done.output
    assert active_locator(cfg)[1].startswith(SHIPPED)
    audit = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(a["event"], a["model_action"], a["model_version"]) for a in audit] == [
        ("model", "promote", "site-0001"),
        ("model", "rollback", SHIPPED),
    ]
    bad = runner.invoke(app, ["models", "promote", "site-0042", *conf])
    assert bad.exit_code != 0 and "site-0042" in bad.output
