"""The build reads back, over a real SSH session, the image record the csghub step leaves on the guest."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.images import ImageError, read_stored_images
from appliance.ssh import RemoteSession

DIGEST = "sha256:" + "c" * 64


def test_the_record_is_read_back_sorted_with_digests(session: RemoteSession, tmp_path: Path) -> None:
    record = tmp_path / "images.txt"
    record.write_text(f"docker.io/library/redis:7.4.9 {DIGEST}\ndocker.io/library/busybox:latest {DIGEST}\n")
    assert read_stored_images(session, str(record)) == [
        {"name": "docker.io/library/busybox:latest", "digest": DIGEST},
        {"name": "docker.io/library/redis:7.4.9", "digest": DIGEST},
    ]


def test_a_missing_record_names_the_file_and_the_step(session: RemoteSession, tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        read_stored_images(session, str(tmp_path / "no such file"))
    assert "no such file" in str(info.value) and "--only csghub" in str(info.value)
