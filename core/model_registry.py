"""The site's locator versions: kept, promoted, rolled back (issue 17).

l3spot ships one locator (``locator.weights`` and ``locator.refine_weights``, trained on
phantoms). ``l3spot train --from-reviews`` fine-tunes it on the site's reviewed scans and
writes each candidate as a new *version*; a version the evaluation found better is
*promoted*, and from then on every analysis uses it, until another is promoted or the
promotion is rolled back. Every version stays on disk with its weights, training record,
evaluation and model card, promoted or not.

``<locator.site_models_dir>/`` (default ``<node.spool_dir>/../models``)::

    versions/site-0001/locator.pt        first stage (worker.locator.weights format)
    versions/site-0001/locator_fine.pt   refinement stage (absent: first stage only)
    versions/site-0001/record.json       what it saw, how it was trained (seed, commit...)
    versions/site-0001/evaluation.json   candidate vs. the model it was compared with
    versions/site-0001/card.md           the model card
    active.json                          the active version and the history of changes

The shipped models are the version named :data:`SHIPPED`. Workers read ``active.json`` at
each analysis (a small file), so a promotion takes effect on the next series without a
restart; the weights of a version are loaded once per worker (cached by path).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.atomic import write_atomically
from core.config import Config, LocatorConfig
from core.errors import L3SpotError

#: The version name of the models the configuration names (``locator.weights``).
SHIPPED = "shipped"
#: File names inside a version folder.
COARSE_FILE = "locator.pt"
FINE_FILE = "locator_fine.pt"
RECORD_FILE = "record.json"
EVALUATION_FILE = "evaluation.json"
CARD_FILE = "card.md"
ACTIVE_FILE = "active.json"
_NAME = re.compile(r"site-(\d{4,})")


class ModelRegistryError(L3SpotError):
    """A version that does not exist, or a rollback with nothing to roll back to."""


@dataclass(frozen=True)
class ModelVersion:
    """One locator version.

    Attributes
    ----------
    name : :data:`SHIPPED` or ``site-NNNN``.
    weights : first-stage weights file.
    refine_weights : refinement-stage weights file, or None (first stage only).
    folder : the version's folder (None for the shipped models).
    record : its training record (``record.json``), {} for the shipped models.
    evaluation : its evaluation (``evaluation.json``), {} when absent.
    """

    name: str
    weights: Path
    refine_weights: Path | None
    folder: Path | None = None
    record: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """What results name: ``site-0003``, or ``shipped (locator_cnn4_round3,
        locator_fine_cnn4)`` for the configured weights."""
        if self.name != SHIPPED:
            return self.name
        stems = [self.weights.stem] + (
            [self.refine_weights.stem] if self.refine_weights is not None else []
        )
        return f"{SHIPPED} ({', '.join(stems)})"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic: a worker reading at the same time sees the old or the new file, whole."""
    write_atomically(
        path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    )


class ModelRegistry:
    """The versions under one folder and which of them is active.

    Parameters
    ----------
    root : the folder (created on the first write).
    shipped : the locator configuration whose weights are the :data:`SHIPPED` version.
    """

    def __init__(self, root: Path, shipped: LocatorConfig) -> None:
        self.root = Path(root)
        self.shipped = shipped

    @classmethod
    def from_config(cls, config: Config) -> ModelRegistry:
        """The registry of ``locator.site_models_dir`` (default beside the spool)."""
        return cls(config.resolved_site_models_dir(), config.locator)

    # ------------------------------------------------------------------------------ reading

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def shipped_version(self) -> ModelVersion:
        """The configured weights as a version."""
        return ModelVersion(SHIPPED, self.shipped.weights, self.shipped.refine_weights)

    def get(self, name: str) -> ModelVersion:
        """The version called ``name``.

        Raises
        ------
        ModelRegistryError
            No such version, or its first-stage weights are missing.
        """
        if name == SHIPPED:
            return self.shipped_version()
        folder = self.versions_dir / name
        if not _NAME.fullmatch(name) or not (folder / COARSE_FILE).is_file():
            raise ModelRegistryError(f"no locator version {name!r} in {self.versions_dir}")
        fine = folder / FINE_FILE
        return ModelVersion(
            name,
            folder / COARSE_FILE,
            fine if fine.is_file() else None,
            folder,
            _read_json(folder / RECORD_FILE),
            _read_json(folder / EVALUATION_FILE),
        )

    def versions(self) -> list[ModelVersion]:
        """Every version, the shipped one first, then the site's in the order made."""
        out = [self.shipped_version()]
        if self.versions_dir.is_dir():
            names = sorted(
                (p.name for p in self.versions_dir.iterdir() if _NAME.fullmatch(p.name)),
                key=lambda n: int(n.split("-")[1]),
            )
            for name in names:
                try:
                    out.append(self.get(name))
                except ModelRegistryError:
                    continue  # a folder being written, or left by an interrupted training
        return out

    def state(self) -> dict[str, Any]:
        """``active.json``: ``{"active": name, "history": [...]}`` (shipped when absent)."""
        data = _read_json(self.root / ACTIVE_FILE)
        data.setdefault("active", SHIPPED)
        data.setdefault("history", [])
        return data

    def active(self) -> ModelVersion:
        """The version analyses use now.

        Raises
        ------
        ModelRegistryError
            ``active.json`` names a version whose weights are gone: every analysis fails
            with this reason rather than silently falling back to another model.
        """
        return self.get(str(self.state()["active"]))

    # ------------------------------------------------------------------------------ writing

    def new_version(self) -> tuple[str, Path]:
        """Reserve the next ``site-NNNN`` name and create its (empty) folder."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        taken = [
            int(m.group(1)) for p in self.versions_dir.iterdir() if (m := _NAME.fullmatch(p.name))
        ]
        n = max(taken, default=0) + 1
        while True:
            name = f"site-{n:04d}"
            try:
                (self.versions_dir / name).mkdir()
            except FileExistsError:  # another training reserved it first
                n += 1
                continue
            return name, self.versions_dir / name

    def _activate(self, name: str, action: str, by: str, reason: str) -> dict[str, Any]:
        self.get(name)  # exists
        state = self.state()
        entry = {
            "action": action,
            "version": name,
            "previous": state["active"],
            "by": by,
            "reason": reason,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        state["history"].append(entry)
        state["active"] = name
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json(self.root / ACTIVE_FILE, state)
        return entry

    def promote(self, name: str, by: str, reason: str) -> dict[str, Any]:
        """Make ``name`` the active version; returns the history entry.

        Raises
        ------
        ModelRegistryError
            No such version.
        """
        return self._activate(name, "promote", by, reason)

    def rollback(self, by: str, reason: str = "rolled back") -> dict[str, Any]:
        """Return to the version that was active before the current one was promoted.

        Returns
        -------
        dict
            The history entry (``version`` = the version active now).

        Raises
        ------
        ModelRegistryError
            The shipped models are active and were never replaced (nothing to roll back).
        """
        state = self.state()
        current = state["active"]
        for entry in reversed(state["history"]):
            if entry.get("version") == current and entry.get("action") == "promote":
                return self._activate(str(entry["previous"]), "rollback", by, reason)
        raise ModelRegistryError(f"{current} was not promoted: nothing to roll back")


def active_locator(config: Config) -> tuple[LocatorConfig, str]:
    """The locator configuration an analysis uses now, and the version's label.

    The configured weights (``locator.weights``/``refine_weights``) unless the site promoted
    one of its own versions (``l3spot train --from-reviews``) and ``locator.use_site_models``
    is on.

    Raises
    ------
    ModelRegistryError
        The active version's weights are missing.
    """
    if not config.locator.use_site_models:
        return config.locator, ModelRegistry(Path("."), config.locator).shipped_version().label
    version = ModelRegistry.from_config(config).active()
    if version.name == SHIPPED:
        return config.locator, version.label
    locator = config.locator.model_copy(
        update={"weights": version.weights, "refine_weights": version.refine_weights}
    )
    return locator, version.label
