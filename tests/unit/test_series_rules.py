"""core/series_rules.py: the rules that eligibility and the loader share."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import GantryTiltError, NonAxialError, TooFewSlicesError
from core.series_rules import (
    MAX_OBLIQUITY_DEG,
    axial_obliquity_deg,
    check_axial_geometry,
    check_slice_count,
    is_analysed_image,
    is_localizer,
)


def _tilted(degrees: float) -> tuple[float, ...]:
    a = np.radians(degrees)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(a)), -float(np.sin(a)))


def test_obliquity_is_the_angle_of_the_normal_to_the_head_foot_axis() -> None:
    assert axial_obliquity_deg((1, 0, 0, 0, 1, 0)) == pytest.approx(0.0)
    assert axial_obliquity_deg(_tilted(7.0)) == pytest.approx(7.0)
    assert axial_obliquity_deg((0, 1, 0, 0, 0, -1)) == pytest.approx(90.0)
    assert MAX_OBLIQUITY_DEG == 5.0


def test_axial_geometry_accepts_small_obliquity_and_refuses_more() -> None:
    o = _tilted(4.0)
    normal = np.cross(o[:3], o[3:])
    positions = np.outer(np.arange(5) * 2.0, normal)
    _, z = check_axial_geometry("1.2", o, positions)
    np.testing.assert_allclose(z, np.arange(5) * 2.0, atol=1e-9)
    o = _tilted(7.0)
    positions = np.outer(np.arange(5) * 2.0, np.cross(o[:3], o[3:]))
    with pytest.raises(NonAxialError, match="oblique slices 7.0 degrees") as e:
        check_axial_geometry("1.2", o, positions)
    assert e.value.series_uid == "1.2"
    with pytest.raises(GantryTiltError, match="7.0 degrees"):  # stepping along the table
        check_axial_geometry("1.2", o, np.outer(np.arange(5) * 2.0, [0, 0, 1]))
    with pytest.raises(NonAxialError, match="sagittal slices, not an axial series"):
        check_axial_geometry("1.2", (0, 1, 0, 0, 0, -1), np.zeros((0, 3)))


def test_image_and_count_rules() -> None:
    assert is_analysed_image("1.2.840.10008.5.1.4.1.1.2", "ct ")
    assert not is_analysed_image("1.2.840.10008.5.1.4.1.1.2.1", "CT")  # Enhanced CT
    assert not is_analysed_image("1.2.840.10008.5.1.4.1.1.2", "MR")
    assert is_localizer(["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert is_localizer("ORIGINAL\\PRIMARY\\LOCALIZER") and not is_localizer("LOCAL")
    check_slice_count("1.2", 20, 20, "series 1.2")
    with pytest.raises(TooFewSlicesError, match="3 slice.*fewer than node.min_slices=20"):
        check_slice_count("1.2", 3, 20, "the series", setting="node.min_slices")
