"""Writing a file so that a reader sees the old file or the new one, whole, never a part.

Every result, DICOM object, weight file, calibration and registry file l3spot writes goes
through :func:`write_atomically`: one rule in one place for the temporary name, the rename
and the clean-up on failure. The spool keeps its own writers (``service/spool.py``): they
also write through a file descriptor in chunks and ``fsync`` the folder, for durability of
what a scanner sent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np


def temporary_name(path: Path) -> Path:
    """The temporary file :func:`write_atomically` writes before the rename: hidden (a
    leading dot, so folder scans skip it), in the same folder (a rename within one file
    system is atomic), unique per process, and ending in ``.tmp`` so that no glob for the
    real suffix matches it (a writer that picks the format by the suffix, as ``numpy.savez``
    does, writes to an open file instead)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomically(path: Path | str, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through a temporary file and a rename (``os.replace``, atomic on
    POSIX): a reader at the same time sees the old file or the new one, whole.

    Parameters
    ----------
    path : the file to (re)write; its folder must exist.
    write : writes the whole content to the path it is given (the temporary file), e.g.
        ``lambda p: p.write_text(text)``, ``lambda p: ds.save_as(p)``; numpy's ``savez``
        through ``p.open("wb")``, since it adds ".npz" to a name without it.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    Exception
        Whatever ``write`` or the rename raises; the temporary file is removed first and
        ``path`` is left as it was.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_npz_atomically(path: Path | str, arrays: Mapping[str, np.ndarray]) -> Path:
    """``numpy.savez_compressed`` of ``arrays`` to ``path`` through :func:`write_atomically`
    (written to an open file, so numpy adds no ".npz" to the temporary name).

    Raises
    ------
    Exception
        As :func:`write_atomically`.
    """

    def save(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.savez_compressed(fh, **arrays)

    return write_atomically(path, save)
