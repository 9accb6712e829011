"""The one file hash and the one size formatter.

``sha256_file`` is checked against coreutils' ``sha256sum`` (the tool the guest side uses to
check uploads) on sizes around ``hashlib.file_digest``'s internal buffer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.digest import sha256_file
from appliance.log import human_size
from appliance.run import run


@pytest.mark.parametrize("size", [0, 1, 2**18 - 1, 2**18, 3 * 2**18 + 7])
def test_sha256_file_agrees_with_sha256sum(tmp_path: Path, size: int) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(size))
    expected = run(["sha256sum", "--", str(path)]).stdout.split()[0]
    assert sha256_file(path) == expected


def test_sha256_file_missing_file_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "absent")


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (int(2.1 * 2**20), "2.1 MiB"),
    (2**30 - 1, "1024.0 MiB"), (2**30, "1.0 GiB"), (5 * 2**40, "5120.0 GiB"),
])
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text
