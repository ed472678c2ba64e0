"""``l3spot analyze`` on export folders: nested trees, flat mixed folders and DICOMDIR."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian
from typer.testing import CliRunner

import worker.volume.discover as discover
from l3spot import app
from tests.support.outputs import (
    L3_INDEX,
    N_SLICES,
    SERIES_UID,
    write_series,
)
from worker.volume.discover import find_series

UID_B = "1.2.826.0.1.3680043.8.498.20002"
UID_C = "1.2.826.0.1.3680043.8.498.30002"
UID_SCOUT = "1.2.826.0.1.3680043.8.498.40002"
UID_SR = "1.2.826.0.1.3680043.8.498.50002"


def _copy_series(src: list[Path], dst: Path, series_uid: str, prefix: str = "", **attrs) -> None:
    """Copy a series under a new Series Instance UID (and SOP Instance UIDs)."""
    dst.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(src):
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{series_uid}.{i + 1}"
        for k, v in attrs.items():
            setattr(ds, k, v)
        ds.save_as(dst / f"{prefix}{i:03d}.dcm", enforce_file_format=True)


def _sr(path: Path) -> None:
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_SR}.1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = BasicTextSRStorage, f"{UID_SR}.1"
    ds.Modality, ds.SeriesInstanceUID = "SR", UID_SR
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.10001"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture()
def export(tmp_path: Path) -> Path:
    """PATIENT/STUDY/SERIES tree: a CT series, a scout, an SR; a flat folder of two series."""
    root = tmp_path / "export"
    ct = root / "PAT1" / "STUDY1" / "SE_CT"
    files = write_series(ct)
    _copy_series(
        files[:2],
        root / "PAT1" / "STUDY1" / "SE_SCOUT",
        UID_SCOUT,
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
    )
    _sr(root / "PAT1" / "STUDY1" / "SE_SR" / "report.dcm")
    mixed = root / "PAT2" / "ALL"  # one folder, two series, files interleaved by name
    _copy_series(files, mixed, UID_B, prefix="b")
    _copy_series(files, mixed, UID_C, prefix="a")
    (root / "README.txt").write_text("export notes\n")
    return root


def test_finds_every_ct_series_by_headers_and_skips_the_rest(
    export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict] = []
    real = pydicom.dcmread

    def spy(path, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append(kw)
        return real(path, **kw)

    monkeypatch.setattr(discover.pydicom, "dcmread", spy)
    found = find_series(export)
    assert calls and all(c.get("stop_before_pixels") and c.get("specific_tags") for c in calls)

    by_uid = {s.series_instance_uid: s for s in found.series}
    assert set(by_uid) == {SERIES_UID, UID_B, UID_C}
    assert by_uid[SERIES_UID].folder == export / "PAT1" / "STUDY1" / "SE_CT"
    for uid in (UID_B, UID_C):  # the flat folder is split by Series Instance UID
        files = by_uid[uid].files
        assert len(files) == N_SLICES
        assert {pydicom.dcmread(p).SeriesInstanceUID for p in files} == {uid}
    skipped = {s.series_instance_uid: s.reason for s in found.skipped}
    assert "localizer" in skipped[UID_SCOUT]
    assert "Modality SR" in skipped[UID_SR] and "not a CT image series" in skipped[UID_SR]
    assert any("1 file(s) that are not DICOM" in n for n in found.notes)


@pytest.mark.slow  # over 2 s: the quick subset stays under 2 min
def test_cli_analyses_each_series_into_its_own_folder(
    fake_stages: None, export: Path, tmp_path: Path
) -> None:
    out, csv_path = tmp_path / "out", tmp_path / "rows.csv"
    res = CliRunner().invoke(
        app, ["analyze", str(export), "--out", str(out), "--csv", str(csv_path)]
    )
    assert res.exit_code == 0, res.output
    results = {
        p.parent.relative_to(out).as_posix(): json.loads(p.read_text())
        for p in out.rglob("result.json")
    }
    assert {k: r["series_instance_uid"] for k, r in results.items()} == {
        "PAT1/STUDY1/SE_CT": SERIES_UID,
        f"PAT2/ALL/{UID_B}": UID_B,
        f"PAT2/ALL/{UID_C}": UID_C,
    }
    assert all(
        r["status"] == "done" and r["l3"]["slice_index"] == L3_INDEX for r in results.values()
    )
    assert len(list(csv.DictReader(csv_path.open()))) == 3
    lines = res.output.splitlines()
    assert any(
        line.startswith("SKIPPED PAT1/STUDY1/SE_SCOUT") and "localizer" in line for line in lines
    )
    assert any(
        line.startswith("SKIPPED PAT1/STUDY1/SE_SR") and "Modality SR" in line for line in lines
    )


def _fileset(series_files: list[Path], dest: Path) -> Path:
    fs = FileSet()
    for p in series_files:
        fs.add(pydicom.dcmread(p))
    fs.write(dest)
    return dest / "DICOMDIR"


def test_dicomdir_export_is_read_through_its_fileset(fake_stages: None, tmp_path: Path) -> None:
    files = write_series(tmp_path / "src")
    dicomdir = _fileset(files, tmp_path / "cd")
    found = find_series(dicomdir)
    assert [s.series_instance_uid for s in found.series] == [SERIES_UID]
    assert len(found.series[0].files) == N_SLICES
    assert all(p.suffix == "" for p in found.series[0].files)  # IM000000...: no .dcm names
    assert any(f"DICOMDIR lists {N_SLICES} instance(s)" in n for n in found.notes)

    res = CliRunner().invoke(app, ["analyze", str(dicomdir), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    # named like a tree export: the File-set's own PATIENT/STUDY/SERIES folders
    data = json.loads(
        (
            tmp_path / "o" / found.series[0].folder.relative_to(tmp_path / "cd") / "result.json"
        ).read_text()
    )
    assert data["status"] == "done"
    # the folder holding the DICOMDIR is searched the same way (DICOMDIR itself not an image)
    assert [s.series_instance_uid for s in find_series(tmp_path / "cd").series] == [SERIES_UID]

    missing = found.series[0].files[3]
    missing.unlink()
    again = find_series(dicomdir)
    assert any("1 of them missing" in n for n in again.notes)
    assert len(again.series[0].files) == N_SLICES - 1


def test_an_unreadable_file_fails_its_series_rather_than_drop_a_slice(
    fake_stages: None, tmp_path: Path
) -> None:
    files = write_series(tmp_path / "exp" / "SE1")
    raw = files[5].read_bytes()
    files[5].write_bytes(raw[:200])  # header cut inside the file meta: a broken DICOM file
    found = find_series(tmp_path / "exp")
    assert len(found.series) == 1 and files[5] in found.series[0].files
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "exp"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    data = json.loads((tmp_path / "o" / "SE1" / "result.json").read_text())
    assert data["status"] == "failed" and "ct_005.dcm" in data["reason"]


def test_no_ct_series_is_an_error_with_the_reasons(tmp_path: Path) -> None:
    _sr(tmp_path / "only_sr" / "x.dcm")
    res = CliRunner().invoke(
        app, ["analyze", str(tmp_path / "only_sr"), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2
    assert "SKIPPED" in res.output and "no CT series found" in res.output
