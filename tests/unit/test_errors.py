"""The error tree (core/errors.py): every exception class l3spot defines derives from one base."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import core
from core.errors import (
    JobNotFoundError,
    L3SpotError,
    SeriesValidationError,
)

REPO = Path(core.__file__).resolve().parent.parent
PACKAGES = ("core", "service", "worker", "research")


def _l3spot_modules() -> list[str]:
    names = ["l3spot"]
    for package in PACKAGES:
        names.append(package)
        path = [str(REPO / package)]
        for info in pkgutil.walk_packages(path, prefix=f"{package}."):
            names.append(info.name)
    return names


def test_every_exception_class_in_l3spot_derives_from_l3spot_error() -> None:
    modules = _l3spot_modules()
    assert len(modules) > 40, modules  # the walk found the packages
    offenders, found = [], []
    for name in modules:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
            ):
                found.append(f"{name}.{attr}")
                if not issubclass(obj, L3SpotError):
                    offenders.append(f"{name}.{attr}")
    assert offenders == []
    # the walk saw the errors it is meant to police
    for expected in (
        "core.errors.SeriesValidationError",
        "core.errors.MalformedDatasetError",
        "service.requeue.RetryError",
        "service.spool.SpoolWriteError",
        "worker.locator.weights.LocatorWeightsError",
    ):
        assert expected in found, found


def test_errors_carry_the_uids_and_keep_their_builtin_types() -> None:
    from service.requeue import RetryError
    from service.spool import SpoolWriteError

    e = SeriesValidationError("1.2.3", "gantry tilt", study_uid="1.2")
    assert (e.series_uid, e.study_uid, e.reason) == ("1.2.3", "1.2", "gantry tilt")
    assert str(e) == "series 1.2.3: gantry tilt"
    missing = JobNotFoundError("1.2.3")
    assert isinstance(missing, KeyError) and missing.series_uid == "1.2.3"
    with pytest.raises(KeyError):
        raise missing
    disk = SpoolWriteError(28, "No space left on device", series_uid="1.2.3", study_uid="1.2")
    assert isinstance(disk, OSError) and disk.errno == 28 and disk.study_uid == "1.2"
    retry = RetryError("1.2.3", "no_record")
    assert isinstance(retry, LookupError) and retry.series_uid == "1.2.3"
    assert L3SpotError("x").series_uid == "" and L3SpotError("x").study_uid == ""
