"""Content hashes of files: the one place l3spot hashes a file's bytes.

Used to identify model weights (startup report, calibration records, caches) and to seed
the generated UIDs of NIfTI input. The reading is :func:`hashlib.file_digest` (streamed, so
a large weights or NIfTI file is never held in memory whole).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 (64 digits) of a file's bytes.

    Raises
    ------
    OSError
        The file cannot be read (missing, a folder, no permission).
    """
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
