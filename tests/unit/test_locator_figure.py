"""The locator's diagnostic picture (``l3spot locate --png``), drawn by the worker itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from l3spot import app


def test_locate_command_prints_the_result_and_writes_the_picture(phantom_series, tmp_path: Path):
    series_dir, ph = phantom_series
    png = tmp_path / "loc.png"
    res = CliRunner().invoke(app, ["locate", str(series_dir), "--png", str(png), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{") : res.stdout.rindex("}") + 1])
    assert out["n_slices"] == len(ph.volume.z_mm)
    assert out["in_field_of_view"] is True
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] > 40 and img.shape[1] > 440  # MIP + two 220 px panels
    red = (img[..., 0] > 200) & (img[..., 1] < 80) & (img[..., 2] < 80)
    assert red.sum() > img.shape[1] // 2  # the L3 line crosses the picture
