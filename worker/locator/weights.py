"""Locator weights: the saved file format, loading (cached), the inference device.

A weights file (``models/locator_*.pt``) holds the network's state, its architecture and
its window geometry (:class:`worker.locator.windows.WindowSpec`, the MIP pixel size
included) plus the training record; :func:`load_locator` turns it into a
:class:`LoadedLocator` ready for inference. Belharbi et al. 2017, section 3.2.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.atomic import write_atomically
from core.errors import L3SpotError
from worker.locator.model import build_model, prepare_input
from worker.locator.windows import WindowSpec


class LocatorWeightsError(L3SpotError):
    """The locator weights file is missing, unreadable or not an l3spot locator."""


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
        """Whether the network has l3spot's "L3 near the window centre" head."""
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
    """The inference device: ``"auto"`` -> CUDA when available, else CPU.

    Parameters
    ----------
    device : "auto", "cpu", "cuda" or "cuda:N".

    Raises
    ------
    LocatorWeightsError
        CUDA was asked for and is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LocatorWeightsError(f"device {device!r} requested but CUDA is not available")
    return dev


def save_locator(
    path: Path, model: torch.nn.Module, arch: str, spec: WindowSpec, record: dict[str, Any]
) -> None:
    """Write weights + window geometry + training record in the format :func:`load_locator` reads.

    Parameters
    ----------
    path : ``.pt`` file, written atomically (temporary name, then rename).
    model : the trained network (its state is saved on the CPU).
    arch : "cnn4" or "vgg16".
    spec : the window geometry the network was trained with; the only place the MIP pixel
        size of an analysis comes from.
    record : training metadata (JSON-serialisable; ``"stage": "fine"`` for a refinement
        stage).
    """
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
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


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
