"""l3spot's SEG and SR in the OHIF viewer (issue 18), through Orthanc's DICOMweb.

A phantom abdomen CT series is analysed by the pipeline (real locator, real composition),
the CT series and l3spot's SEG, SR and SC are stored into Orthanc with Debian's DICOMweb
plugin, and OHIF's prebuilt viewer (npm ``@ohif/app``, pinned in
:data:`tests.support.ohif.OHIF_VERSION`, unpacked by ``.ci/run``) is served locally with
``/dicom-web`` proxied to Orthanc from the same origin. Headless Chromium opens the study and:

- **SR**: OHIF's SR viewport opens on the L3 image (the overlay's ``I:`` is the L3
  image's Instance Number) and lists every compartment's Area and Mean Attenuation
  Coefficient with the SR's values, beside their outlines (SVG) on that image;
- **SEG**: the segmentation panel lists the four segments (SMA, IMAT, VAT, SAT) by label, and
  inside each non-empty compartment, at the pixel farthest from its border mapped through
  cornerstone's own world-to-canvas transform, the viewport shows that segment's colour
  (and no other compartment's), so the segments are drawn on the right image, in the right
  place, with the SEG's recommended colours;
- **reports that measured nothing** ("L3 not in field of view", "not measured"): OHIF opens
  them without its error boundary and shows, as text, that nothing was measured and why
  (issue 18: both threw before, on their measurement group without an image region).

Screenshots ``ohif_sr.png``, ``ohif_seg.png``, ``ohif_sr_not_in_fov.png`` and
``ohif_sr_not_measured.png`` go to ``$L3SPOT_SCREENSHOTS`` when set
(else the test's temporary folder); ``docs/images/`` keeps a copy.

Skips, with the reason, only when the OHIF package, Orthanc's DICOMweb plugin, Chromium or
chromedriver (or selenium) is not installed; the shipped locator weights must be present.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from core.config import load_config
from core.labels import COMPARTMENT_COLOURS
from tests.conftest import require_shipped
from tests.support.node import ORTHANC_DICOMWEB_PLUGIN, start_orthanc, stop
from tests.support.ohif import OHIF_VERSION, OhifServer, ohif_dist

pytestmark = pytest.mark.slow  # about 40 s on 2 cores (integration: by folder)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Chromium without a screen or GPU: WebGL through SwiftShader, which cornerstone needs.
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--window-size=1600,1000",
)


def _require() -> None:
    if not (ohif_dist() / "index.html").is_file():
        pytest.skip(
            f"OHIF viewer @ohif/app {OHIF_VERSION} not installed at {ohif_dist()} (.ci/run: "
            "npm pack + tar into .cache/ohif)"
        )
    if not ORTHANC_DICOMWEB_PLUGIN.is_file():
        pytest.skip(
            f"Orthanc DICOMweb plugin not installed ({ORTHANC_DICOMWEB_PLUGIN}; "
            "apt-get install orthanc-dicomweb)"
        )
    for prog in (CHROMIUM, CHROMEDRIVER):
        if not os.access(prog, os.X_OK):
            pytest.skip(f"{prog} not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="selenium not installed (pip install selenium)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("L3SPOT")}
    require_shipped(load_config(environ=env).locator.weights, "locator weights")


@dataclass
class Analysed:
    """The phantom series and l3spot's objects for it."""

    ct_dir: Path
    out_dir: Path
    result: dict[str, Any]

    def files(self) -> list[Path]:
        objects = [self.out_dir / n for n in ("seg.dcm", "sr.dcm", "sc.dcm")]
        return sorted(self.ct_dir.glob("*.dcm")) + objects


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> Analysed:
    """A phantom abdomen-pelvis series (seed 5, L3 in the field of view) run through l3spot."""
    _require()
    from worker.phantom import PhantomSpec, generate_phantom
    from worker.pipeline import analyze_series
    from worker.volume.write import write_ct_series

    root = tmp_path_factory.mktemp("ohif_case")
    spec = PhantomSpec(
        fov="abdomen_pelvis", slice_thickness_mm=5.0, pixel_spacing_mm=3.0, rows=160, cols=160
    )
    write_ct_series(generate_phantom(5, spec).volume, root / "ct", uid_seed="ohif-phantom-5")
    env = {k: v for k, v in os.environ.items() if not k.startswith("L3SPOT")}
    analyze_series(root / "ct", root / "out", load_config(environ=env))
    result = json.loads((root / "out" / "result.json").read_text())
    assert result["l3"]["in_field_of_view"], result["l3"]
    return Analysed(root / "ct", root / "out", result)


@contextlib.contextmanager
def _viewer(case: Analysed, tmp_path: Path) -> Iterator[tuple[Any, OhifServer, str]]:
    """(selenium driver, OHIF server, Study Instance UID) with ``case`` stored in Orthanc."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    pacs = start_orthanc(tmp_path / "orthanc", dicomweb=True)
    try:
        for path in case.files():
            req = urllib.request.Request(
                f"http://127.0.0.1:{pacs.http}/instances", data=path.read_bytes(), method="POST"
            )
            with urllib.request.urlopen(req, timeout=30) as r:
                assert json.loads(r.read())["Status"] in ("Success", "AlreadyStored")
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in CHROME_FLAGS:
            opts.add_argument(flag)
        opts.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
        driver.set_page_load_timeout(60)
        study = str(pydicom.dcmread(case.out_dir / "sr.dcm").StudyInstanceUID)
        try:
            with OhifServer(ohif_dist(), f"http://127.0.0.1:{pacs.http}/dicom-web") as server:
                yield driver, server, study
        finally:
            driver.quit()
    finally:
        stop(pacs.proc)


@pytest.fixture()
def viewer(analysed: Analysed, tmp_path: Path) -> Iterator[tuple[Any, OhifServer, str]]:
    """The analysed phantom study in OHIF: (driver, server, Study Instance UID)."""
    with _viewer(analysed, tmp_path) as opened:
        yield opened


def _until(predicate: Callable[[], Any], timeout_s: float, what: str, driver: Any) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    text = driver.find_element("tag name", "body").text
    raise AssertionError(f"OHIF: {what} not seen in {timeout_s} s; page text:\n{text[-3000:]}")


def _open_study(driver: Any, server: OhifServer, study: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{server.url}/viewer?StudyInstanceUIDs={study}")
    _until(
        lambda: (
            len(driver.find_elements(By.CSS_SELECTOR, '[data-cy^="study-browser-thumbnail"]')) >= 4
        ),
        90,
        "the study browser with the CT, SEG, SR and SC series",
        driver,
    )
    # the first-visit guided tour opens once the first image is shown, over the viewport
    from selenium.common.exceptions import WebDriverException

    skip = "//button[normalize-space()='Skip all'] | //*[text()='Skip all']"

    def skip_tour() -> bool:
        # the tour's button may be matched while it still animates in ("element not
        # interactable"): click a displayed one, through JavaScript if the click is refused
        for element in driver.find_elements(By.XPATH, skip):
            if element.is_displayed():
                try:
                    element.click()
                except WebDriverException:
                    driver.execute_script("arguments[0].click();", element)
                return True
        return False

    _until(skip_tour, 60, "the guided tour", driver)
    _until(lambda: not driver.find_elements(By.XPATH, skip), 10, "the tour closing", driver)


def _double_click_series(driver: Any, modality: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    thumbs = driver.find_elements(By.CSS_SELECTOR, '[data-cy^="study-browser-thumbnail"]')
    match = [t for t in thumbs if t.text.split("\n", 1)[0] == modality]
    assert match, [t.text for t in thumbs]
    ActionChains(driver).double_click(match[0]).perform()


def _answer_prompt(driver: Any, answer: str, timeout_s: float = 20) -> None:
    from selenium.webdriver.common.by import By

    xpath = f"//button[normalize-space()='{answer}']"
    button = _until(lambda: driver.find_elements(By.XPATH, xpath), timeout_s, answer, driver)
    button[0].click()


def _shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("L3SPOT_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_ohif_shows_the_sr_measurements_with_their_outlines_on_the_l3_image(
    analysed: Analysed, viewer: tuple[Any, OhifServer, str], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    driver, server, study = viewer
    _open_study(driver, server, study)
    _double_click_series(driver, "SR")
    _until(lambda: "Area:" in driver.find_element(By.TAG_NAME, "body").text, 60, "SR", driver)
    # OHIF offers to track (hydrate) the measurements; l3spot's are display-only in OHIF
    # (it hydrates only its own cornerstone tool types, OHIF#5082), so decline
    _answer_prompt(driver, "No")
    time.sleep(1.5)
    text = driver.find_element(By.TAG_NAME, "body").text
    l3 = analysed.result["l3"]
    assert f"I:{l3['instance_number']} " in text, "SR not opened on the L3 image"
    for key, tissue in analysed.result["composition"].items():
        if not tissue["area_cm2"]:
            continue  # an empty compartment has no region to draw
        area = round(tissue["area_cm2"], 1)
        assert f"Area: {area:.2f} cm2" in text, (key, text)
        hu = round(tissue["mean_hu"], 1)
        assert f"Mean Attenuation Coefficient: {hu:.2f} [hnsf'U]" in text, (key, text)
    # the compartments' outlines and the localisation point are drawn (SVG) on the image
    drawn = driver.execute_script(
        "return document.querySelectorAll('svg [data-annotation-uid]').length"
    )
    regions = sum(1 for t in analysed.result["composition"].values() if t["area_cm2"]) + 1
    assert drawn >= regions, (drawn, regions)
    driver.save_screenshot(str(_shots(tmp_path) / "ohif_sr.png"))


def _interior_points(seg_path: Path) -> dict[int, tuple[int, int]]:
    """Per non-empty segment, the (row, col) of the SEG pixel farthest from its border."""
    seg = hd.seg.segread(seg_path)
    points = {}
    for number in seg.segment_numbers:
        mask = seg.get_pixels_by_source_instance(
            [seg.get_source_image_uids()[0][2]], segment_numbers=[number]
        )[0, :, :, 0].astype(bool)
        if mask.any():
            dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
            r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
            points[number] = (int(r), int(c))
    return points


def _chroma_match(rgb: np.ndarray) -> tuple[int, float]:
    """(segment number whose colour's hue is closest to ``rgb``, chroma of ``rgb``)."""
    chroma = rgb.astype(float) - rgb.min()
    best, score = 0, -1.0
    for number, colour in COMPARTMENT_COLOURS.items():
        ref = np.asarray(colour, float) - min(colour)
        cos = float(chroma @ ref / (np.linalg.norm(chroma) * np.linalg.norm(ref) + 1e-9))
        if cos > score:
            best, score = number, cos
    return best, float(chroma.max())


def test_ohif_draws_the_seg_segments_in_place_on_the_l3_slice(
    analysed: Analysed, viewer: tuple[Any, OhifServer, str], tmp_path: Path
) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By

    driver, server, study = viewer
    _open_study(driver, server, study)
    _double_click_series(driver, "SEG")
    _answer_prompt(driver, "Yes", timeout_s=60)  # "Do you want to open this Segmentation?"
    driver.find_element(By.CSS_SELECTOR, '[data-cy="panelSegmentation-btn"]').click()
    rows = _until(
        lambda: [
            e.text
            for e in driver.find_elements(By.CSS_SELECTOR, '[data-cy="data-row-title"]')
            if e.text
        ],
        60,
        "the segmentation panel's segments",
        driver,
    )
    assert rows == [
        "Skeletal muscle",
        "Intermuscular adipose tissue",
        "Visceral adipose tissue",
        "Subcutaneous adipose tissue",
    ]
    time.sleep(2)  # the labelmap is rendered after the panel lists it
    l3 = analysed.result["l3"]
    text = driver.find_element(By.TAG_NAME, "body").text
    assert f"I:{l3['instance_number']} " in text, "SEG not shown on the L3 image"

    ct = pydicom.dcmread(
        next(p for p in analysed.ct_dir.glob("*.dcm") if _sop(p) == l3["sop_instance_uid"])
    )
    ipp = np.asarray(ct.ImagePositionPatient, float)
    iop = np.asarray(ct.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ct.PixelSpacing)  # row spacing, column spacing (mm)
    points = _interior_points(analysed.out_dir / "seg.dcm")
    assert len(points) >= 3, points  # the phantom has SMA, VAT and SAT at least
    shot = driver.get_screenshot_as_png()
    image = np.asarray(Image.open(BytesIO(shot)).convert("RGB"))
    for number, (r, c) in points.items():
        world = ipp + c * dc * iop[:3] + r * dr * iop[3:]
        x, y, dpr = driver.execute_script(
            "const vp = cornerstone.getEnabledElements()[0].viewport;"
            "const box = vp.canvas.getBoundingClientRect();"
            "const p = vp.worldToCanvas(arguments[0]);"
            "return [box.left + p[0], box.top + p[1], window.devicePixelRatio];",
            [float(v) for v in world],
        )
        px = image[round(y * dpr), round(x * dpr)]
        seen, chroma = _chroma_match(px)
        assert chroma > 20 and seen == number, (number, (r, c), px.tolist())
    driver.save_screenshot(str(_shots(tmp_path) / "ohif_seg.png"))


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _open_report(
    analysed: Analysed, tmp_path: Path, sr: Any, must_read: list[str], shot: str
) -> str:
    """Open the study with ``sr`` as its SR in OHIF and wait until the page shows every text
    of ``must_read`` (the SR viewport's text; the study browser shows none of it); returns
    the page text and saves the screenshot ``shot``. Fails on OHIF's error boundary (the
    viewport of a report OHIF throws on stays empty, "Something went wrong")."""
    from selenium.webdriver.common.by import By

    case = Analysed(analysed.ct_dir, tmp_path / "case", analysed.result)
    case.out_dir.mkdir()
    sr.save_as(case.out_dir / "sr.dcm", enforce_file_format=True)
    for name in ("seg.dcm", "sc.dcm"):
        (case.out_dir / name).write_bytes((analysed.out_dir / name).read_bytes())
    with _viewer(case, tmp_path) as (driver, server, study):
        _open_study(driver, server, study)
        _double_click_series(driver, "SR")

        def shown() -> str | None:
            logs = " ".join(e["message"] for e in driver.get_log("browser"))
            assert "Error Boundary" not in logs, logs[-2000:]
            text = driver.find_element(By.TAG_NAME, "body").text
            return text if all(t in text for t in must_read) else None

        text = _until(shown, 60, f"the report's text {must_read}", driver)
        driver.save_screenshot(str(_shots(tmp_path) / shot))
        return text


def _l3_image(analysed: Analysed) -> pydicom.Dataset:
    l3_uid = analysed.result["l3"]["sop_instance_uid"]
    return pydicom.dcmread(next(p for p in analysed.ct_dir.glob("*.dcm") if _sop(p) == l3_uid))


def test_ohif_opens_the_not_in_fov_report(analysed: Analysed, tmp_path: Path) -> None:
    """Issue 18: OHIF 3.13.2 threw on this report (a TID 1501 group without an image region)."""
    from worker.locator.locate import L3Location
    from worker.outputs.sr import NOT_IN_FOV_TEXT, build_sr

    empty = np.zeros(3, np.float32)
    location = L3Location(
        in_field_of_view=False,
        slice_index=None,
        z_mm=None,
        mip_row=None,
        confidence=0.1,
        reason="no window agrees on an L3 position",
        window_top_rows=np.arange(3),
        predictions=empty,
        correlation=empty,
        candidate_rows=np.arange(3.0),
    )
    sr = build_sr(_l3_image(analysed), location, None, None, ["low_l3_confidence"])
    _open_report(
        analysed,
        tmp_path,
        sr,
        [
            f"{NOT_IN_FOV_TEXT}: no window agrees on an L3 position",
            "L3 vertebra in field of view: No",
            "Body composition at L3 measured: No",
            "L3 localisation confidence below threshold",
        ],
        "ohif_sr_not_in_fov.png",
    )


def test_ohif_opens_the_not_measured_report(analysed: Analysed, tmp_path: Path) -> None:
    """Issue 18: the "not measured" report had the same group without an image region."""
    from worker.outputs.sr import build_not_measured_sr

    reason = (
        "series refused by the loader: Rescale Intercept is not a number in 89 of 89 images "
        "(values are not Hounsfield units); series 1.2.3.4.5.6.7.8.9, rule hu.rescale_finite"
    )
    sr = build_not_measured_sr(_l3_image(analysed), reason)
    _open_report(
        analysed,
        tmp_path,
        sr,
        [reason, "Body composition at L3 measured: No"],
        "ohif_sr_not_measured.png",
    )
