"""Golden snapshots of the classical composition method: label-map hashes, areas, mean HU.

The file ``tests/golden/composition_classical.json`` records, for a fixed set of cases, the
sha256 of each uint8 label map, each compartment's area (cm², 6 decimals) and mean HU
(4 decimals), and the QA flags the segmenter raises; ``tests/unit/test_composition_golden.py``
compares the current code with it exactly. A change of a rule therefore shows up as a
reviewed diff of that file.

Cases (``CompositionConfig()`` defaults):

* development phantoms 6000-6005, ``PhantomSpec(fov="abdomen", slice_thickness_mm=5.0)``,
  their mid-L3 slice (``truth.l3_mid_slice_index``);
* the real case ``abdomen_ct_totalseg/ct.nii.gz`` (``$L3SPOT_DATA``), axial slices z 65..79
  (T12-L3 around L3, 3 mm pixels).

Usage::

    python -m research.golden            # compare with the file, print the differences
    python -m research.golden --write    # regenerate the file after a reviewed rule change
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from core.config import REPO_ROOT, CompositionConfig, data_dir

GOLDEN_FILE = REPO_ROOT / "tests" / "golden" / "composition_classical.json"
#: development phantom seeds and their geometry (docs/composition.md: seeds 6000-6019 are the
#: development set; six keep the snapshot quick)
PHANTOM_SEEDS = tuple(range(6000, 6006))
PHANTOM_SPEC = {"fov": "abdomen", "slice_thickness_mm": 5.0}
#: real case and its slices (index into the loaded volume's z axis)
REAL_CASE = Path("abdomen_ct_totalseg") / "ct.nii.gz"
REAL_SLICES = tuple(range(65, 80))


def sha256_labels(labels: np.ndarray) -> str:
    """sha256 (hex) of a label map's bytes as a C-contiguous uint8 (y, x) array."""
    return hashlib.sha256(np.ascontiguousarray(labels, np.uint8).tobytes()).hexdigest()


def record(
    labels: np.ndarray, hu: np.ndarray, spacing_mm: tuple[float, float], qa_flags: list[str]
) -> dict[str, Any]:
    """The golden record of one slice: label hash, areas (cm²) and mean HU, QA flags.

    Parameters
    ----------
    labels : (y, x) uint8 label map (:mod:`core.labels`).
    hu : (y, x) HU slice the measures are taken on.
    spacing_mm : (dy, dx) pixel spacing in mm.
    qa_flags : the segmenter's flags.
    """
    from worker.composition.measure import measure_labels

    m = measure_labels(labels, np.asarray(hu, np.float32), spacing_mm)
    return {
        "labels_sha256": sha256_labels(labels),
        "measures": {
            k: {
                "area_cm2": round(v.area_cm2, 6),
                "mean_hu": None if v.mean_hu is None else round(v.mean_hu, 4),
            }
            for k, v in m.items()
        },
        "qa_flags": list(qa_flags),
    }


def phantom_slices() -> Iterator[tuple[str, int, np.ndarray, tuple[float, float]]]:
    """(seed, slice index, (y, x) HU slice, (dy, dx) mm) of each development phantom."""
    from worker.phantom import PhantomSpec, generate_phantom

    for seed in PHANTOM_SEEDS:
        ph = generate_phantom(seed, PhantomSpec(**PHANTOM_SPEC))
        k = int(ph.truth.l3_mid_slice_index)
        sp = (float(ph.volume.pixel_spacing_mm[0]), float(ph.volume.pixel_spacing_mm[1]))
        yield str(seed), k, np.array(ph.volume.hu[k]), sp


def real_slices(root: Path | None = None) -> Iterator[tuple[str, np.ndarray, tuple[float, float]]]:
    """(z as text, (y, x) HU slice, (dy, dx) mm) of the real case's golden slices.

    Raises
    ------
    FileNotFoundError
        The real case is not under ``root`` (default :func:`core.config.data_dir`).
    """
    from worker.volume.load import load_nifti

    path = (root or data_dir()) / REAL_CASE
    if not path.is_file():
        raise FileNotFoundError(path)
    vol = load_nifti(path)
    sp = (float(vol.pixel_spacing_mm[0]), float(vol.pixel_spacing_mm[1]))
    for z in REAL_SLICES:
        yield str(z), vol.hu[z], sp


def compute(config: CompositionConfig | None = None, with_real: bool = True) -> dict[str, Any]:
    """Golden records of all cases with the current code (the file's format)."""
    from worker.composition.measure import segment_slice

    cfg = config or CompositionConfig()
    out: dict[str, Any] = {"phantoms": {}, "real": {}}
    for seed, k, hu, sp in phantom_slices():
        seg = segment_slice(hu, sp, cfg)
        r = record(seg.labels, hu, sp, seg.qa_flags)
        r["slice"] = k
        r["hu_sha256"] = hashlib.sha256(np.ascontiguousarray(hu, np.float32).tobytes()).hexdigest()
        out["phantoms"][seed] = r
    if with_real:
        for z, hu, sp in real_slices():
            seg = segment_slice(hu, sp, cfg)
            out["real"][z] = record(seg.labels, hu, sp, seg.qa_flags)
    return out


def differences(expected: dict[str, Any], got: dict[str, Any], tol: float = 1e-6) -> list[str]:
    """Human-readable differences between two golden dictionaries (empty when equal).

    Hashes, flags and slice indices must be equal; areas and mean HU within ``tol``.
    """
    diffs: list[str] = []
    for group in ("phantoms", "real"):
        for case, exp in expected.get(group, {}).items():
            cur = got.get(group, {}).get(case)
            if cur is None:
                diffs.append(f"{group}/{case}: missing")
                continue
            for key in ("labels_sha256", "hu_sha256", "qa_flags", "slice"):
                if exp.get(key) != cur.get(key):
                    diffs.append(f"{group}/{case}: {key} {exp.get(key)} -> {cur.get(key)}")
            for comp, em in exp["measures"].items():
                cm = cur["measures"][comp]
                for q in ("area_cm2", "mean_hu"):
                    a, b = em[q], cm[q]
                    if (a is None) != (b is None) or (a is not None and abs(a - b) > tol):
                        diffs.append(f"{group}/{case}/{comp}: {q} {a} -> {b}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {GOLDEN_FILE}")
    ap.add_argument("--file", type=Path, default=GOLDEN_FILE)
    args = ap.parse_args(argv)
    got = compute()
    if args.write:
        args.file.parent.mkdir(parents=True, exist_ok=True)
        args.file.write_text(json.dumps(got, indent=1, sort_keys=True))
        print(f"wrote {args.file}")
        return 0
    diffs = differences(json.loads(args.file.read_text()), got)
    print("\n".join(diffs) if diffs else "identical to the golden file")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
