"""The locator's calibrated confidence: raw score -> P(answer within 10 mm of mid-L3).

The raw confidence of an answer (``corr**2 * agreement * presence`` of the chosen run,
:func:`worker.locator.decision.decide_l3`) ranks answers but is not a probability. A
calibration file, fitted on validation phantoms by ``l3spot calibrate-locator``
(:mod:`research.calibrate_locator`), maps it monotonically to the probability that the
answer is within 10 mm of the true mid-L3 (Ha et al. 2021's technical success) and holds
the flag threshold chosen on the same phantoms.

Where it lives: beside the first-stage weights, ``<weights stem>.calibration.json``
(``models/locator_cnn4_round3.calibration.json``; a site version
``models/versions/site-NNNN/locator.pt`` carries ``locator.calibration.json``). It names the
SHA-256 of the first- and refinement-stage weights it was fitted with and applies to
exactly those. Missing, unreadable or fitted on other weights: the locator reports the raw
confidence (``confidence_calibrated`` false in ``result.json``) and logs one warning per
file version; the analysis does not fail, so a site version trained before calibration
existed keeps working.

After the level verification (:mod:`worker.locator.vertebrae`) the answer's confidence is
mapped again, per verdict (:class:`LevelCalibration`, :func:`verdict_of`): an answer the
count confirms and one no count could check are not equally likely right, whatever the
first stage's score. That file lives beside the verification weights
(``models/spine_fcn.calibration.json``), is fitted by ``l3spot calibrate-levels``
(:mod:`research.calibrate_levels`) on style-B validation phantoms, and applies only to the
three weights files it names.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from core import digest
from core.atomic import write_atomically

logger = logging.getLogger(__name__)

_C = TypeVar("_C")

#: the ``format`` of a calibration file
CALIBRATION_FORMAT = "l3spot-locator-calibration"
#: the suffix replacing ``.pt`` of the first-stage weights
CALIBRATION_SUFFIX = ".calibration.json"

#: the scores a calibration can map (:func:`calibration_score`)
SCORES = ("confidence_raw", "raw_x_fine_correlation2")


def calibration_score(name: str, raw: float, fine_correlation: float | None) -> float:
    """The score a calibration maps to a probability.

    Parameters
    ----------
    name : one of :data:`SCORES`. ``"confidence_raw"``: the raw confidence.
        ``"raw_x_fine_correlation2"``: the raw confidence times the square of the refinement
        stage's correlation (floored at 0); the raw confidence alone when no refinement ran.
    raw : the raw confidence ``corr**2 * agreement * presence`` of the chosen run.
    fine_correlation : the refinement's slope -1 correlation
        (``L3Location.refinement["correlation"]``), or None.

    Raises
    ------
    ValueError
        Unknown ``name``.
    """
    if name == "confidence_raw":
        return float(raw)
    if name == "raw_x_fine_correlation2":
        if fine_correlation is None:
            return float(raw)
        return float(raw) * max(float(fine_correlation), 0.0) ** 2
    raise ValueError(f"unknown calibration score {name!r} (one of {SCORES})")


def _check_map(
    score: str, knots_raw: tuple[float, ...], knots_probability: tuple[float, ...], flag: float
) -> None:
    """Raise ValueError unless the knots are a monotone map of a known score into [0, 1]
    and the flag threshold lies in [0, 1]."""
    if score not in SCORES:
        raise ValueError(f"unknown calibration score {score!r} (one of {SCORES})")
    x = np.asarray(knots_raw, np.float64)
    y = np.asarray(knots_probability, np.float64)
    if x.size == 0 or x.shape != y.shape:
        raise ValueError("calibration knots: need as many probabilities as raw values")
    if np.any(np.diff(x) <= 0) or np.any(np.diff(y) < 0):
        raise ValueError("calibration knots must be ascending and the map non-decreasing")
    if y.min() < 0 or y.max() > 1 or not 0 <= flag <= 1:
        raise ValueError("calibrated probabilities and the threshold must lie in [0, 1]")


@dataclass(frozen=True)
class Calibration:
    """A monotone map of the locator's score to P(within 10 mm), and the flag threshold.

    Attributes
    ----------
    knots_raw : ascending scores (:func:`calibration_score` ``score``; isotonic block means).
    knots_probability : non-decreasing probabilities at those knots, in [0, 1].
    flag_below : flag an answer (``low_l3_confidence``) whose probability is below this.
    coarse_sha256, fine_sha256 : SHA-256 of the weights files it was fitted with (the fine
        one None when fitted without a refinement stage).
    record : provenance (command, seeds, commit, validation figures).
    score : which score the knots are of (one of :data:`SCORES`).

    Raises
    ------
    ValueError
        Knots empty, of different lengths, not ascending / non-decreasing,
        probabilities outside [0, 1], or an unknown score.
    """

    knots_raw: tuple[float, ...]
    knots_probability: tuple[float, ...]
    flag_below: float
    coarse_sha256: str
    fine_sha256: str | None
    record: dict[str, Any] = field(default_factory=dict)
    score: str = "confidence_raw"

    def __post_init__(self) -> None:
        _check_map(self.score, self.knots_raw, self.knots_probability, self.flag_below)

    def probabilities(self, raw: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of raw confidences (linear between knots, constant
        beyond the first and last knot). ``raw``: any shape; returns float64, same shape."""
        return np.interp(np.asarray(raw, np.float64), self.knots_raw, self.knots_probability)

    def probability(self, raw: float, fine_correlation: float | None = None) -> float:
        """P(within 10 mm) of one answer from its raw confidence and the refinement's
        correlation (:func:`calibration_score`)."""
        s = calibration_score(self.score, raw, fine_correlation)
        return float(self.probabilities(np.asarray([s]))[0])

    def to_dict(self) -> dict[str, Any]:
        """The JSON content of a calibration file."""
        return {
            "format": CALIBRATION_FORMAT,
            "version": 1,
            "score": self.score,
            "coarse_sha256": self.coarse_sha256,
            "fine_sha256": self.fine_sha256,
            "flag_below": self.flag_below,
            "knots_raw": [round(v, 6) for v in self.knots_raw],
            "knots_probability": [round(v, 6) for v in self.knots_probability],
            "record": self.record,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`. Raises ValueError/KeyError/TypeError on bad content."""
        if d.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"not a {CALIBRATION_FORMAT} file")
        return cls(
            knots_raw=tuple(float(v) for v in d["knots_raw"]),
            knots_probability=tuple(float(v) for v in d["knots_probability"]),
            flag_below=float(d["flag_below"]),
            coarse_sha256=str(d["coarse_sha256"]),
            fine_sha256=None if d.get("fine_sha256") is None else str(d["fine_sha256"]),
            record=dict(d.get("record") or {}),
            score=str(d.get("score", "confidence_raw")),
        )

    def save(self, path: Path) -> None:
        """Write the file (atomically: temporary name, then rename)."""
        _save_json(Path(path), self.to_dict())


def _save_json(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` as JSON atomically (temporary name, then rename)."""
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(content, indent=2) + "\n"))


def _read(
    path: str, mtime_ns: int, parse: Callable[[dict[str, Any]], _C], what: str
) -> tuple[_C | None, str | None]:
    """(the parsed calibration file, None), or (None, why not) when it is missing
    (``mtime_ns`` < 0) or unreadable."""
    if mtime_ns < 0:
        return None, f"no {what} file"
    try:
        return parse(json.loads(Path(path).read_text())), None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"unreadable {what} file ({exc})"


def calibration_path(weights: Path) -> Path:
    """Where the calibration of a first-stage weights file lives:
    ``locator_cnn4_round3.pt`` -> ``locator_cnn4_round3.calibration.json``."""
    weights = Path(weights)
    return weights.with_name(weights.stem + CALIBRATION_SUFFIX)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (:func:`core.digest.file_sha256`), remembered while
    the file's path, modification time and size stay the same."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    return digest.file_sha256(path)


def load_calibration(weights: Path, refine_weights: Path | None) -> Calibration | None:
    """The calibration of this pair of locator weights, or None (raw confidence).

    Parameters
    ----------
    weights : the first-stage weights file; the calibration is read from
        :func:`calibration_path` of it.
    refine_weights : the refinement-stage weights file, or None.

    Returns
    -------
    Calibration or None
        None, with one WARNING log line per file version saying why, when the file is
        missing, unreadable, malformed, or was fitted with other weights (SHA-256 differ).
    """
    path = calibration_path(weights)
    mtime = path.stat().st_mtime_ns if path.is_file() else -1
    fine = None if refine_weights is None else file_sha256(refine_weights)
    return _load_cached(file_sha256(weights), fine, str(path), mtime)


@functools.lru_cache(maxsize=16)
def _load_cached(
    coarse_sha: str, fine_sha: str | None, path: str, mtime_ns: int
) -> Calibration | None:
    cal, why = _read(path, mtime_ns, Calibration.from_dict, "calibration")
    if cal is not None and (cal.coarse_sha256, cal.fine_sha256) != (coarse_sha, fine_sha):
        cal, why = None, "calibration fitted with other locator weights"
    if cal is None:
        logger.warning(
            "locator confidence not calibrated: %s (%s); reporting the raw confidence, flag "
            "threshold locator.min_confidence or 0.5 on the raw score (l3spot calibrate-locator "
            "writes one)",
            why,
            path,
        )
    return cal


#: the ``format`` of a level calibration file
LEVEL_CALIBRATION_FORMAT = "l3spot-level-calibration"

#: The level verification's statuses a level calibration maps apart, each also with the
#: prefix ``transitional_`` where the two counts disagree (:func:`verdict_of`).
STATUSES = ("confirmed", "corrected", "unverified", "counted")
VERDICTS = STATUSES + tuple(f"transitional_{s}" for s in STATUSES)


def verdict_of(verification: Mapping[str, Any] | None) -> str | None:
    """The verdict group of an answer's level verification (``L3Location.verification``).

    Returns
    -------
    str or None
        The status "confirmed", "unverified", "counted", or "corrected" when the counted
        level was applied; prefixed ``transitional_`` when both counts were made and disagree
        (``possible_transitional_anatomy``). None without a verification, or for a
        disagreement left standing (``locator.verify_mode`` "flag"): no level calibration was
        fitted on such answers.

    Notes
    -----
    Why the status and the disagreement both: on style B 7,000,000-399 (validation) a level
    the count from the ribs confirmed was right in 15 of 17 answers with the counts
    disagreeing, one it corrected in 11 of 19; by five-fold cross-validation there (a
    one-off script), maps per status and disagreement predicted best (log-loss 0.268,
    against 0.272 with one map for every disagreement and 0.309 ignoring it;
    models/spine_fcn.md).
    """
    if not verification:
        return None
    status = verification.get("status")
    if status == "corrected" and not verification.get("applied", True):
        return None
    if status not in STATUSES:
        return None
    return f"transitional_{status}" if verification.get("possible_transitional_anatomy") else status


@dataclass(frozen=True)
class LevelCalibration:
    """P(the final answer is within 10 mm of mid-L3) given the level verification's verdict
    and the first stage's score, and the flag threshold on it.

    The first-stage calibration (:class:`Calibration`) knows nothing of the count: an answer
    the vertebrae confirm and one no count could check get the same probability. This
    calibration maps the same score (:func:`calibration_score`) once per verdict
    (:func:`verdict_of`), each map fitted on validation-style phantoms answered by the whole
    locator (``l3spot calibrate-levels``, :mod:`research.calibrate_levels`).

    Attributes
    ----------
    maps : verdict -> (ascending scores, non-decreasing probabilities in [0, 1]).
    flag_below : flag an answer (``low_l3_confidence``) whose probability is below this.
    score : the score the maps are of (one of :data:`SCORES`).
    coarse_sha256, fine_sha256, verify_sha256 : SHA-256 of the first-stage, refinement
        (None without one) and level-verification weights it was fitted with.
    record : provenance and validation figures.

    Raises
    ------
    ValueError
        No map, an unknown verdict, a map that is not monotone into [0, 1], an unknown
        score or a threshold outside [0, 1].
    """

    maps: dict[str, tuple[tuple[float, ...], tuple[float, ...]]]
    flag_below: float
    score: str
    coarse_sha256: str
    fine_sha256: str | None
    verify_sha256: str
    record: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.maps:
            raise ValueError("a level calibration needs at least one verdict's map")
        for verdict, (kx, ky) in self.maps.items():
            if verdict not in VERDICTS:
                raise ValueError(f"unknown verdict {verdict!r} (one of {VERDICTS})")
            _check_map(self.score, kx, ky, self.flag_below)

    def probability(
        self, verdict: str | None, raw: float, fine_correlation: float | None
    ) -> float | None:
        """P(within 10 mm) of one answer; None when no map was fitted for ``verdict``."""
        if verdict not in self.maps:
            return None
        kx, ky = self.maps[verdict]
        s = calibration_score(self.score, raw, fine_correlation)
        return float(np.interp(s, kx, ky))

    def to_dict(self) -> dict[str, Any]:
        """The JSON content of a level calibration file."""
        return {
            "format": LEVEL_CALIBRATION_FORMAT,
            "version": 1,
            "score": self.score,
            "coarse_sha256": self.coarse_sha256,
            "fine_sha256": self.fine_sha256,
            "verify_sha256": self.verify_sha256,
            "flag_below": self.flag_below,
            "maps": {
                v: {
                    "knots_score": [round(x, 6) for x in kx],
                    "knots_probability": [round(y, 6) for y in ky],
                }
                for v, (kx, ky) in self.maps.items()
            },
            "record": self.record,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LevelCalibration:
        """Inverse of :meth:`to_dict`. Raises ValueError/KeyError/TypeError on bad content."""
        if d.get("format") != LEVEL_CALIBRATION_FORMAT:
            raise ValueError(f"not a {LEVEL_CALIBRATION_FORMAT} file")
        return cls(
            maps={
                str(v): (
                    tuple(float(x) for x in m["knots_score"]),
                    tuple(float(y) for y in m["knots_probability"]),
                )
                for v, m in d["maps"].items()
            },
            flag_below=float(d["flag_below"]),
            score=str(d["score"]),
            coarse_sha256=str(d["coarse_sha256"]),
            fine_sha256=None if d.get("fine_sha256") is None else str(d["fine_sha256"]),
            verify_sha256=str(d["verify_sha256"]),
            record=dict(d.get("record") or {}),
        )

    def save(self, path: Path) -> None:
        """Write the file (atomically: temporary name, then rename)."""
        _save_json(Path(path), self.to_dict())


def load_level_calibration(
    verify_weights: Path, weights: Path, refine_weights: Path | None
) -> LevelCalibration | None:
    """The level calibration of these three weights files, or None.

    Read from :func:`calibration_path` of ``verify_weights``
    (``models/spine_fcn.calibration.json``). None, with one WARNING log line per file
    version, when it is missing, unreadable, malformed, or was fitted with other weights:
    the answer then keeps the first stage's calibrated confidence.
    """
    path = calibration_path(verify_weights)
    mtime = path.stat().st_mtime_ns if path.is_file() else -1
    fine = None if refine_weights is None else file_sha256(refine_weights)
    return _load_level_cached(
        file_sha256(weights), fine, file_sha256(verify_weights), str(path), mtime
    )


@functools.lru_cache(maxsize=16)
def _load_level_cached(
    coarse_sha: str, fine_sha: str | None, verify_sha: str, path: str, mtime_ns: int
) -> LevelCalibration | None:
    cal, why = _read(path, mtime_ns, LevelCalibration.from_dict, "level calibration")
    shas = (coarse_sha, fine_sha, verify_sha)
    if cal is not None and (cal.coarse_sha256, cal.fine_sha256, cal.verify_sha256) != shas:
        cal, why = None, "level calibration fitted with other weights"
    if cal is None:
        logger.warning(
            "L3 confidence not calibrated on the level verification: %s (%s); reporting the "
            "first stage's confidence (l3spot calibrate-levels writes one)",
            why,
            path,
        )
    return cal
