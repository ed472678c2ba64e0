"""L3 localisation: sliding-window CNN over the frontal MIP, correlation decision.

Belharbi et al. 2017, "Spotting L3 slice in CT scans using deep convolutional network and
transfer learning", sections 3.2-3.3 and Fig. 6.

Flow (one series): frontal MIP at the model's pixel size (:func:`worker.mip.frontal_mip`)
-> :func:`mip_to_strip` (HU window, fixed physical width around the body, air padding above
and below) -> :func:`sliding_windows` (stride ``s``) -> the CNN predicts per window the L3
row inside it (and, l3spot extension, the probability that L3 lies near the window centre)
-> :func:`decide_l3` correlates the prediction sequence with the ideal slope -1 line and
takes the maximum -> MIP row -> z (mm) -> nearest real slice.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import LocatorConfig
from core.errors import AnalysisError, L3SpotError
from worker.locator.model import build_model, prepare_input
from worker.mip import Mip, frontal_mip
from worker.volume.load import CTVolume

#: HU window of the network input: air/fat floor to dense cortical bone (ANATOMY.md: cortical
#: bone 700-1500 HU, cancellous 150-300, soft tissue 30-60). Linear to [0, 1]; air padding = 0.
INPUT_HU_WINDOW = (-200.0, 1600.0)

#: Columns whose MIP exceeds this HU count as "body" for centring the fixed-width strip.
BODY_HU = -300.0

#: Without a presence head: the correlation and agreement an in-FOV decision needs.
FALLBACK_MIN_CORRELATION = 0.8
FALLBACK_MIN_AGREEMENT = 0.5

#: Votes within this distance (mm) of the decided row count as agreeing windows.
AGREEMENT_TOL_MM = 6.0

#: With a refinement stage, this many next-best first-stage runs at other places are
#: refined too, and the fine stage's agreement arbitrates (:func:`worker.locator.fine.choose_run`).
REFINE_ALTERNATIVES = 2


class LocatorWeightsError(L3SpotError):
    """The locator weights file is missing, unreadable or not an l3spot locator."""


@dataclass(frozen=True)
class WindowSpec:
    """Geometry and intensity of the MIP windows a locator model was trained on.

    Attributes
    ----------
    pixel_mm : MIP pixel edge (mm), both axes.
    height_mm : window height H along z (mm). Paper: 400 px at about 1 mm.
    width_mm : fixed window width (mm) around the body centre; narrower MIPs are padded with
        air, wider ones cropped.
    a_mm : training windows hold L3 within ``[-a, +a]`` of the window centre (paper: 50 px
        at about 1 mm).
    hu_window : (low, high) HU mapped linearly to [0, 1] (clipped).
    """

    pixel_mm: float = 3.0
    height_mm: float = 330.0
    width_mm: float = 384.0
    a_mm: float = 51.0
    hu_window: tuple[float, float] = INPUT_HU_WINDOW

    @property
    def height_px(self) -> int:
        return int(round(self.height_mm / self.pixel_mm))

    @property
    def width_px(self) -> int:
        return int(round(self.width_mm / self.pixel_mm))

    @property
    def a_px(self) -> float:
        return self.a_mm / self.pixel_mm

    @property
    def pad_px(self) -> int:
        """Air rows added above and below the MIP so a window can centre on any row +/- a."""
        return self.height_px // 2 + int(np.ceil(self.a_px))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hu_window"] = list(self.hu_window)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WindowSpec:
        d = dict(d)
        if "hu_window" in d:
            d["hu_window"] = tuple(float(v) for v in d["hu_window"])
        return cls(**d)


@dataclass
class L3Location:
    """Where L3 is, or why it was not found.

    Attributes
    ----------
    in_field_of_view : False when L3 is not inside the scanned range (then no slice).
    slice_index : 0-based index of the L3 slice in the series sorted by ascending z
        (``CTVolume.z_mm``), or None.
    z_mm : z position (mm) of the L3 decision, or None.
    mip_row : fractional MIP row of the decision, or None.
    confidence : 0..1, from the correlation peak and the agreement of the windows.
    reason : why ``in_field_of_view`` is False or the confidence is low; None otherwise.
    window_top_rows : (n_windows,) int, MIP row of each window's top edge.
    predictions : (n_windows,) float32, predicted L3 offset (MIP rows) inside each window.
    correlation : (n_candidates,) float32, correlation with the ideal slope -1 line for each
        candidate L3 row in ``candidate_rows``.
    candidate_rows : (n_candidates,) float, MIP rows the correlation was evaluated at.
    presence : (n_windows,) float32, probability that L3 lies within +/- a of each window's
        centre (l3spot's second head; empty for a paper-only model).
    window_height_px : window height H in MIP rows (for plots).
    timings_s : seconds spent per stage ("mip", "windows", "cnn", "decision", "refine").
    model : architecture and weights file the decision came from.
    refinement : the second (fine) stage's report (:class:`worker.locator.fine.Refinement`
        summary) when one ran; ``z_mm``/``slice_index``/``mip_row`` are then the refined
        answer and ``refinement["start_z_mm"]`` the first stage's.
    """

    in_field_of_view: bool
    slice_index: int | None
    z_mm: float | None
    mip_row: float | None
    confidence: float
    reason: str | None = None
    window_top_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    predictions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    correlation: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    candidate_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    presence: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    window_height_px: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    model: str = ""
    refinement: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict of the decision (without the per-window arrays)."""
        return {
            "in_field_of_view": self.in_field_of_view,
            "slice_index": self.slice_index,
            "z_mm": None if self.z_mm is None else round(float(self.z_mm), 2),
            "mip_row": None if self.mip_row is None else round(float(self.mip_row), 2),
            "confidence": round(float(self.confidence), 4),
            "reason": self.reason,
            "n_windows": int(len(self.predictions)),
            "timings_s": {k: round(v, 4) for k, v in self.timings_s.items()},
            "model": self.model,
            "refinement": self.refinement,
        }


# --------------------------------------------------------------------------- input windows


def normalise_hu(image: np.ndarray, hu_window: tuple[float, float] = INPUT_HU_WINDOW) -> np.ndarray:
    """Map HU linearly from ``hu_window`` to [0, 1] (clipped); float32, same shape."""
    lo, hi = hu_window
    return np.clip((np.asarray(image, np.float32) - lo) / (hi - lo), 0.0, 1.0)


def body_centre_column(image_hu: np.ndarray) -> float:
    """Column (fractional) at the middle of the body in a frontal MIP ``(rows, cols)`` HU.

    The weighted median of the per-column count of body pixels (> :data:`BODY_HU`), so an
    off-centre patient is centred; falls back to the image centre for an empty image.
    """
    counts = (np.asarray(image_hu) > BODY_HU).sum(axis=0).astype(np.float64)
    if counts.sum() <= 0:
        return (image_hu.shape[1] - 1) / 2.0
    cdf = np.cumsum(counts) / counts.sum()
    return float(np.searchsorted(cdf, 0.5))


def mip_to_strip(image_hu: np.ndarray, spec: WindowSpec) -> np.ndarray:
    """Normalised, fixed-width strip of a frontal MIP, not yet padded in z.

    Parameters
    ----------
    image_hu : (rows, cols) MIP in HU at ``spec.pixel_mm`` (row 0 = most superior).
    spec : window geometry.

    Returns
    -------
    np.ndarray
        (rows, spec.width_px) float32 in [0, 1]; columns centred on the body
        (:func:`body_centre_column`), air (0) where the MIP is narrower.
    """
    rows, cols = image_hu.shape
    w = spec.width_px
    norm = normalise_hu(image_hu, spec.hu_window)
    c0 = int(round(body_centre_column(image_hu))) - w // 2
    out = np.zeros((rows, w), np.float32)
    src_lo, src_hi = max(c0, 0), min(c0 + w, cols)
    if src_hi > src_lo:
        out[:, src_lo - c0 : src_hi - c0] = norm[:, src_lo:src_hi]
    return out


def sliding_windows(
    strip: np.ndarray, spec: WindowSpec, stride: int
) -> tuple[torch.Tensor, np.ndarray]:
    """All windows of height H over a strip padded with air above and below.

    Parameters
    ----------
    strip : (rows, W) normalised strip from :func:`mip_to_strip`.
    spec : window geometry (H, padding).
    stride : step between consecutive windows, MIP rows (paper: up to 6 px at ~1 mm).

    Returns
    -------
    windows : (n, H, W) float32 tensor (a view into the padded strip).
    top_rows : (n,) int64, MIP row of each window's top edge (negative = in the padding).
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    pad, h = spec.pad_px, spec.height_px
    padded = np.zeros((strip.shape[0] + 2 * pad, strip.shape[1]), np.float32)
    padded[pad : pad + strip.shape[0]] = strip
    t = torch.from_numpy(padded)
    windows = t.unfold(0, h, stride).permute(0, 2, 1)  # (n, H, W)
    top_rows = np.arange(windows.shape[0], dtype=np.int64) * stride - pad
    return windows, top_rows


# --------------------------------------------------------------------------------- decision


@dataclass
class Decision:
    """Output of :func:`decide_l3` (rows are MIP rows)."""

    row: float
    correlation_peak: float
    agreement: float
    presence: float | None
    confidence: float
    correlation: np.ndarray
    candidate_rows: np.ndarray
    segment: tuple[int, int]
    #: the next-best runs at other places (each more than 2a from every better one), best
    #: first; filled when ``decide_l3(..., n_alternatives=k)`` asks for them
    alternatives: list[Decision] = field(default_factory=list)
    #: the run's selection score ``confidence * presence**(power - 1)``
    selection_score: float = 0.0


def decide_l3(
    top_rows: np.ndarray,
    predictions: np.ndarray,
    height_px: int,
    a_px: float,
    presence: np.ndarray | None = None,
    tol_px: float = 2.0,
    presence_power: float = 4.0,
    n_alternatives: int = 0,
) -> Decision:
    """Correlate the prediction sequence with the ideal slope -1 line (paper Fig. 6).

    Parameters
    ----------
    top_rows : (n,) MIP rows of the windows' top edges, ascending with a constant stride.
    predictions : (n,) predicted L3 row inside each window (counted from its top).
    height_px : window height H (rows).
    a_px : half-range of L3 offsets around the window centre seen in training (rows).
    presence : (n,) optional probability that L3 lies within +/- a of each window centre.
    tol_px : votes within this many rows of the decision count as agreeing.
    presence_power : the segment is chosen by ``confidence * presence**(power - 1)``: a
        strong preference for segments the presence head is sure of (4 was chosen on the
        validation phantoms of the shipped model: mean error 9.9 -> 5.2 mm, the median
        unchanged; the real cases were not used).
    n_alternatives : also return up to this many next-best runs at other places (more than
        2a from every better run), for a second opinion (:func:`worker.locator.fine.choose_run`).

    Returns
    -------
    Decision
        ``row`` = median of the votes ``top + prediction`` of the best segment.

    Notes
    -----
    Where a window holds L3 within +/- a of its centre the prediction falls by one row per
    row the window moves down: a line of slope -1. A segment of ``L = floor(2a/s) + 1``
    consecutive windows spans exactly those windows for one L3 row; for each segment we
    take the Pearson correlation between the predictions and the ideal line (``-top``),
    as Belharbi et al. 2017 (section 3.3, Fig. 6). l3spot picks the segment maximising
    ``max(corr, 0)**2 * agreement * presence`` (agreement = share of the segment's votes
    within ``tol_px`` of their median; presence = mean presence probability, 1 without the
    head) and reports that product as the confidence.
    """
    top_rows = np.asarray(top_rows, np.float64)
    p = np.asarray(predictions, np.float64)
    n = len(p)
    if n == 0 or len(top_rows) != n:
        raise ValueError("need as many predictions as windows (and at least one)")
    stride = float(top_rows[1] - top_rows[0]) if n > 1 else 1.0
    seg = int(np.floor(2 * a_px / stride)) + 1
    seg = max(2, min(seg, n))
    view = np.lib.stride_tricks.sliding_window_view
    ps, ts = view(p, seg), view(top_rows, seg)  # (m, seg)
    ideal = -ts
    pc = ps - ps.mean(axis=1, keepdims=True)
    ic = ideal - ideal.mean(axis=1, keepdims=True)
    denom = np.sqrt((pc**2).sum(axis=1) * (ic**2).sum(axis=1))
    corr = np.where(denom > 1e-9, (pc * ic).sum(axis=1) / np.maximum(denom, 1e-12), 0.0)
    votes = ts + ps
    med = np.median(votes, axis=1)
    agree = (np.abs(votes - med[:, None]) <= tol_px).mean(axis=1)
    if presence is not None and len(presence) == n:
        pres = view(np.asarray(presence, np.float64), seg).mean(axis=1)
    else:
        pres = np.ones_like(corr)
    score = np.maximum(corr, 0.0) ** 2 * agree * pres
    selection = score * pres ** (presence_power - 1.0)
    candidate_rows = ts.mean(axis=1) + height_px / 2.0
    has_presence = presence is not None and len(presence) == n
    correlation = corr.astype(np.float32)

    def run(j: int) -> Decision:
        return Decision(
            row=float(med[j]),
            correlation_peak=float(corr[j]),
            agreement=float(agree[j]),
            presence=float(pres[j]) if has_presence else None,
            confidence=float(np.clip(score[j], 0.0, 1.0)),
            correlation=correlation,
            candidate_rows=candidate_rows,
            segment=(j, j + seg),
            selection_score=float(selection[j]),
        )

    order = np.argsort(-selection, kind="stable")
    best = run(int(order[0]))
    taken = [best.row]
    for j in order[1:]:
        if len(best.alternatives) >= n_alternatives or selection[j] <= 0:
            break
        if all(abs(med[j] - r) > 2 * a_px for r in taken):
            best.alternatives.append(run(int(j)))
            taken.append(float(med[j]))
    return best


# ------------------------------------------------------------------------------- the model


@dataclass
class LoadedLocator:
    """A locator network ready for inference.

    Attributes
    ----------
    model : the network in eval mode on ``device``.
    spec : the window geometry it was trained with.
    arch : "cnn4" or "vgg16".
    device : torch device.
    path : weights file.
    record : training metadata stored with the weights (command, seed, epochs...).
    """

    model: torch.nn.Module
    spec: WindowSpec
    arch: str
    device: torch.device
    path: Path
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def has_presence(self) -> bool:
        return getattr(self.model, "presence", None) is not None

    @torch.no_grad()
    def predict(
        self, windows: torch.Tensor, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Predict per window the L3 row (from the window top) and the presence probability.

        Parameters
        ----------
        windows : (n, H, W) float32 normalised windows.
        batch_size : windows per forward pass.

        Returns
        -------
        rows : (n,) float32, L3 row inside each window.
        presence : (n,) float32 probabilities, or None for a paper-only model.
        """
        h, a = self.spec.height_px, self.spec.a_px
        rows, pres = [], []
        for i in range(0, windows.shape[0], batch_size):
            x = windows[i : i + batch_size].contiguous().to(self.device, non_blocking=True)
            off, logit = self.model(prepare_input(x, self.model))
            rows.append((off.float() * a + h / 2.0).cpu())
            if logit is not None:
                pres.append(torch.sigmoid(logit.float()).cpu())
        r = torch.cat(rows).numpy() if rows else np.zeros(0, np.float32)
        return r, (torch.cat(pres).numpy() if pres else None)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LocatorWeightsError(f"device {device!r} requested but CUDA is not available")
    return dev


def save_locator(
    path: Path, model: torch.nn.Module, arch: str, spec: WindowSpec, record: dict[str, Any]
) -> None:
    """Write weights + geometry + training record in the format :func:`load_locator` reads."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": "l3spot-locator",
        "version": 1,
        "arch": arch,
        "presence_head": getattr(model, "presence", None) is not None,
        "spec": spec.to_dict(),
        "record_json": json.dumps(record, default=str),
        "state_dict": state,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, device: str) -> LoadedLocator:
    dev = resolve_device(device)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle errors of a truncated or foreign file
        raise LocatorWeightsError(f"locator weights {path} are unreadable: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != "l3spot-locator":
        raise LocatorWeightsError(f"{path} is not an l3spot locator weights file")
    try:
        spec = WindowSpec.from_dict(payload["spec"])
        arch = str(payload["arch"])
        model = build_model(arch, spec.height_px, spec.width_px, bool(payload["presence_head"]))
        model.load_state_dict(payload["state_dict"])
        record = json.loads(payload.get("record_json") or "{}")
    except Exception as exc:
        raise LocatorWeightsError(f"{path}: inconsistent locator weights: {exc}") from exc
    model.eval().to(dev)
    return LoadedLocator(
        model=model, spec=spec, arch=arch, device=dev, path=Path(path), record=record
    )


def load_locator(weights: Path, device: str = "auto") -> LoadedLocator:
    """Load (once per file version and device) a locator saved by :func:`save_locator`.

    Parameters
    ----------
    weights : ``.pt`` file (e.g. ``models/locator_cnn4.pt``).
    device : "auto", "cpu", "cuda" or "cuda:N".

    Raises
    ------
    LocatorWeightsError
        The file is missing, unreadable, not a locator file, or CUDA was requested but is
        not available.
    """
    p = Path(weights).expanduser().resolve()
    if not p.is_file():
        raise LocatorWeightsError(
            f"locator weights not found: {p} (train them with 'l3spot train' or set "
            "locator.weights / L3SPOT__LOCATOR__WEIGHTS)"
        )
    return _load_cached(str(p), p.stat().st_mtime_ns, device)


# ---------------------------------------------------------------------------- the decision


def locate_in_mip(
    mip: Mip,
    loc: LoadedLocator,
    stride_px: int = 4,
    batch_size: int = 64,
    min_confidence: float = 0.5,
    fine: tuple[Mip, LoadedLocator] | None = None,
    refine_stride_px: int = 2,
) -> L3Location:
    """Run the sliding-window locator on a frontal MIP already at ``loc.spec.pixel_mm``.

    ``slice_index`` is the nearest source slice (``mip.slice_z_mm``); see :func:`locate_l3`.
    ``fine`` = (frontal MIP at the fine model's pixel size, refinement-stage locator): when
    given and L3 is in the field of view, the best run and up to
    :data:`REFINE_ALTERNATIVES` next-best runs elsewhere are refined and
    :func:`worker.locator.fine.choose_run` picks one (``refinement`` in the result).
    """
    spec = loc.spec
    if abs(mip.pixel_mm - spec.pixel_mm) > 1e-6:
        raise ValueError(f"MIP pixel {mip.pixel_mm} mm != model pixel {spec.pixel_mm} mm")
    t0 = time.perf_counter()
    windows, tops = sliding_windows(mip_to_strip(mip.image, spec), spec, stride_px)
    t1 = time.perf_counter()
    rows, pres = loc.predict(windows, batch_size)
    t2 = time.perf_counter()
    tol = max(1.5, AGREEMENT_TOL_MM / spec.pixel_mm)
    n_alt = REFINE_ALTERNATIVES if fine is not None else 0
    d = decide_l3(tops, rows, spec.height_px, spec.a_px, pres, tol_px=tol, n_alternatives=n_alt)
    t3 = time.perf_counter()
    timings = {"windows": t1 - t0, "cnn": t2 - t1, "decision": t3 - t2}
    common: dict[str, Any] = {
        "window_top_rows": tops,
        "predictions": rows.astype(np.float32),
        "correlation": d.correlation,
        "candidate_rows": d.candidate_rows,
        "presence": np.zeros(0, np.float32) if pres is None else pres.astype(np.float32),
        "window_height_px": spec.height_px,
        "timings_s": timings,
        "model": f"{loc.arch}:{loc.path.name}",
    }
    in_fov, why = _in_field_of_view(d, mip)
    if not in_fov:
        return L3Location(False, None, None, None, d.confidence, reason=why, **common)
    refinement = None
    if fine is None:
        z = float(mip.row_to_z(d.row))
    else:
        from worker.locator.fine import choose_run

        t4 = time.perf_counter()
        candidates = [d] + [c for c in d.alternatives if _in_field_of_view(c, mip)[0]]
        d, ref = choose_run(candidates, mip, fine[0], fine[1], refine_stride_px, batch_size)
        timings["refine"] = time.perf_counter() - t4
        z, refinement = ref.z_mm, ref.summary()
        refinement["model"] = f"{fine[1].arch}:{fine[1].path.name}"
        refinement["candidates"] = len(candidates)
        refinement["first_stage_choice_kept"] = d is candidates[0]
    row = float(mip.z_to_row(z))
    reason = None
    if d.confidence < min_confidence:
        reason = f"low confidence ({d.confidence:.2f} < {min_confidence:.2f}); check the L3 slice"
    return L3Location(
        True,
        mip.row_to_slice_index(row),
        z,
        row,
        d.confidence,
        reason=reason,
        refinement=refinement,
        **common,
    )


def _in_field_of_view(d: Decision, mip: Mip) -> tuple[bool, str]:
    """Whether a run's decision says L3 is in the scan, and the reason when it is not."""
    if d.presence is not None:
        in_fov = d.presence >= 0.5
        why = f"L3 not in field of view (presence {d.presence:.2f} < 0.50)"
    else:
        in_fov = (
            d.correlation_peak >= FALLBACK_MIN_CORRELATION and d.agreement >= FALLBACK_MIN_AGREEMENT
        )
        why = (
            f"L3 not in field of view (correlation {d.correlation_peak:.2f}, "
            f"agreement {d.agreement:.2f})"
        )
    if in_fov and not (-0.5 <= d.row <= mip.rows - 0.5):
        in_fov, why = False, f"L3 not in field of view (decided row {d.row:.1f} outside the scan)"
    return in_fov, why


def locate_l3(
    volume: CTVolume, config: LocatorConfig, mip: Mip | None = None, *, device: str = "auto"
) -> L3Location:
    """Find the L3 slice of a CT volume (Belharbi et al. 2017, sections 3.2-3.3, Fig. 6).

    Parameters
    ----------
    volume : the CT volume ((z, y, x) HU, ``z_mm`` ascending).
    config : locator settings (weights, stride, batch size, minimum confidence).
    mip : a frontal MIP of ``volume`` if the caller has one; recomputed when its pixel size
        differs from the one the model was trained at (``config.mip_pixel_mm`` is the
        pipeline's default and should match the shipped model's, 2 mm).
    device : "auto", "cpu" or "cuda".

    Returns
    -------
    L3Location
        ``slice_index`` indexes ``volume.z_mm`` (nearest real slice to the decided z);
        ``in_field_of_view=False`` with ``slice_index=None`` and a ``reason`` when L3 is not
        inside the scanned range. Never a guess.

    Raises
    ------
    AnalysisError
        The weights cannot be loaded (missing/corrupt) or the volume is unusable; carries
        the Series Instance UID.
    """
    uid = volume.series_instance_uid
    try:
        loc = load_locator(config.weights, device)
    except LocatorWeightsError as exc:
        raise AnalysisError(uid, "locator", str(exc)) from exc
    t0 = time.perf_counter()
    try:
        if mip is None or abs(mip.pixel_mm - loc.spec.pixel_mm) > 1e-6:
            mip = frontal_mip(volume, pixel_mm=loc.spec.pixel_mm)
    except ValueError as exc:
        raise AnalysisError(uid, "locator", f"cannot build the frontal MIP: {exc}") from exc
    fine = None
    if config.refine_weights is not None:
        from worker.locator.fine import check_fine_locator

        try:
            fine_loc = load_locator(config.refine_weights, device)
            check_fine_locator(fine_loc)  # a misconfiguration fails every series, at once
        except LocatorWeightsError as exc:
            raise AnalysisError(uid, "locator", str(exc)) from exc
        try:
            fine = (frontal_mip(volume, pixel_mm=fine_loc.spec.pixel_mm), fine_loc)
        except ValueError as exc:
            raise AnalysisError(uid, "locator", f"cannot build the fine MIP: {exc}") from exc
    t_mip = time.perf_counter() - t0
    result = locate_in_mip(
        mip,
        loc,
        config.stride_px,
        config.batch_size,
        config.min_confidence,
        fine,
        config.refine_stride_px,
    )
    if result.z_mm is not None:
        result.slice_index = volume.nearest_slice(result.z_mm)
    result.timings_s = {"mip": t_mip, **result.timings_s}
    return result
