"""SFTP uploads to a real loopback sshd: checksum verified, identical files skipped, nothing half-written."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from sshd_server import SSHServer

from appliance.errors import ConnectionLost
from appliance.ssh import RemoteSession
from appliance.upload import ensure_remote_dir, remote_sha256, upload_file, upload_files


def _random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_upload_verifies_then_skips_an_identical_file(session: RemoteSession, tmp_path: Path) -> None:
    local = _random_file(tmp_path / "bundle.tar", 5 * 1024 * 1024 + 123)
    remote_dir = tmp_path / "guest"
    remote_dir.mkdir()
    remote = str(remote_dir / "bundle.tar")

    first = upload_file(session, local, remote, mode=0o600)
    assert not first.skipped
    assert first.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
    assert Path(remote).read_bytes() == local.read_bytes()
    assert Path(remote).stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in remote_dir.iterdir()) == ["bundle.tar"], "a temporary file was left behind"

    second = upload_file(session, local, remote)
    assert second.skipped and second.sha256 == first.sha256


def test_same_size_different_content_is_uploaded_again(session: RemoteSession, tmp_path: Path) -> None:
    local = _random_file(tmp_path / "a.bin", 300_000)
    remote = tmp_path / "guest.bin"
    remote.write_bytes(b"\0" * 300_000)  # same size, other bytes: the size alone must not fool the skip
    result = upload_file(session, local, str(remote))
    assert not result.skipped
    assert remote.read_bytes() == local.read_bytes()


def test_empty_file_and_progress_bar(session: RemoteSession, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert upload_file(session, empty, str(tmp_path / "empty.out")).size == 0
    big = _random_file(tmp_path / "big", 2 * 1024 * 1024)
    result = upload_file(session, big, str(tmp_path / "big.out"), progress=True)
    assert (tmp_path / "big.out").read_bytes() == big.read_bytes()
    assert result.bytes_per_second > 0


def test_remote_sha256_leaves_out_missing_files(session: RemoteSession, tmp_path: Path) -> None:
    present = tmp_path / "present"
    present.write_text("x")
    sums = remote_sha256(session, [str(present), str(tmp_path / "absent")])
    assert sums == {str(present): hashlib.sha256(b"x").hexdigest()}


def test_upload_files_and_ensure_remote_dir(session: RemoteSession, tmp_path: Path) -> None:
    target = tmp_path / "guest" / "deep" / "dir"
    ensure_remote_dir(session, str(target))
    assert target.is_dir()
    a, b = tmp_path / "a.sh", tmp_path / "b.txt"
    a.write_text("echo a\n")
    b.write_text("b\n")
    upload_files(session, [(a, str(target / "a.sh")), (b, str(target / "b.txt"))], mode=0o640)
    assert (target / "a.sh").read_text() == "echo a\n"
    assert (target / "b.txt").stat().st_mode & 0o777 == 0o640


def test_upload_into_a_missing_directory_is_a_clear_error(session: RemoteSession, tmp_path: Path) -> None:
    local = _random_file(tmp_path / "f", 10)
    with pytest.raises(Exception, match="cannot upload"):
        upload_file(session, local, str(tmp_path / "no" / "such" / "dir" / "f"))


def test_dropped_connection_during_upload_is_connection_lost(private_sshd: SSHServer, tmp_path: Path) -> None:
    local = _random_file(tmp_path / "large", 64 * 1024 * 1024)
    remote = tmp_path / "large.out"
    with private_sshd.session(known_hosts=tmp_path / "kh") as s:
        s.run("true")
        partial = tmp_path / ".large.out.part"

        def drop_mid_transfer() -> None:
            # Drop the link once the transfer is under way (a few MiB written), not before or after.
            for _ in range(2000):
                if partial.exists() and partial.stat().st_size > 4 * 1024 * 1024:
                    private_sshd.drop_connections()
                    return
                time.sleep(0.005)

        dropper = threading.Thread(target=drop_mid_transfer)
        dropper.start()
        with pytest.raises(ConnectionLost):
            upload_file(s, local, str(remote), skip_identical=False, progress=False)
        dropper.join()
        assert not remote.exists(), "a partial upload sits under the final name"
        upload_file(s, local, str(remote), progress=False)  # reconnects lazily and completes
    assert remote.read_bytes() == local.read_bytes()


def test_upload_sets_the_mode_and_leaves_only_the_final_file(session: RemoteSession, tmp_path: Path) -> None:
    local = _random_file(tmp_path / "bundle.tar", 3 * 1024 * 1024 + 7)
    remote_dir = tmp_path / "guest"
    remote_dir.mkdir()
    remote = str(remote_dir / "bundle.tar")
    result = upload_file(session, local, remote, mode=0o640)
    assert Path(remote).read_bytes() == local.read_bytes()
    assert result.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
    assert Path(remote).stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in remote_dir.iterdir()) == ["bundle.tar"]
