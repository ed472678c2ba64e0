"""core.digest: the one file hash (weights identity, NIfTI UID seeds)."""

import hashlib

import pytest

from core.digest import file_sha256


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 9000  # over 2 MiB: read in more than one block
    f = tmp_path / "weights.pt"
    f.write_bytes(data)
    assert file_sha256(f) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(f)) == file_sha256(f)


def test_file_sha256_of_a_missing_file_raises(tmp_path):
    with pytest.raises(OSError):
        file_sha256(tmp_path / "absent.pt")
