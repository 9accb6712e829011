"""A file error on the build host is one line and exit status 1 from every task, never a traceback.

`invoke render --output` into a full disk or a folder that cannot be made used to end in an
`OSError` traceback (issue 12: "every problem ... never a traceback"). The full disk is a real
tmpfs of 64 KiB the test mounts (root needed, as in test_publish.py) and fills.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import PROJECT_ROOT

SMALL = ["--provider", "libvirt", "--set", "provision.skip=[k3s,csghub]", "--set", "vm.cpus=2",
         "--set", "vm.memory_mb=2048"]


def _invoke(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "invoke", "-r", str(PROJECT_ROOT), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("a full disk is a small tmpfs, which needs root to mount")
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: full
            pass
        finally:
            os.close(fd)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_render_into_a_full_disk_is_one_line(tmp_path: Path, full_disk: Path) -> None:
    proc = _invoke(tmp_path, "render", *SMALL, "--output", str(full_disk / "Vagrantfile"))
    assert proc.returncode == 1, proc.stderr
    assert "render failed: No space left on device" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"], "no temporary file is left"


def test_render_into_a_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    proc = _invoke(tmp_path, "render", *SMALL, "--output", "/proc/no-such-folder/Vagrantfile")
    assert proc.returncode == 1, proc.stderr
    assert "render failed: No such file or directory (/proc/no-such-folder)" in proc.stderr
    assert "Traceback" not in proc.stderr
