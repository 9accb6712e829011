"""Files the configuration names are read boundedly and checked at config time (issue 12, item 7).

A 3 GB config file (or `-c /dev/zero`) was read whole: a MemoryError traceback, or gigabytes of
memory. A huge or non-UTF-8 `output.eula_file` passed `invoke config` and failed only in the
export, after the whole build (the licence goes into the OVF descriptor, which verify-ova caps
at 4 MiB). Each is now one problem, exit status 2, naming the file and what is allowed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import MAX_EULA_BYTES, PROJECT_ROOT, load_config
from appliance.errors import ConfigError


def _problems(tmp_path: Path, *sets: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["provider=libvirt", *sets], cwd=tmp_path)
    assert info.value.exit_code == 2
    return [f"{p.source}|{p.key}|{p.message}" for p in info.value.problems]


def test_a_huge_or_binary_licence_is_refused_at_config_time(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    with big.open("wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GiB of size, no disk
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe licence")
    fine = tmp_path / "fine.txt"
    fine.write_text("Licence: €\n" * 1000)
    assert _problems(tmp_path, f"output.eula_file={big}") == [
        f"--set|output.eula_file|larger than {MAX_EULA_BYTES} bytes; a licence text of at most {MAX_EULA_BYTES} "
        "bytes is allowed"]
    assert _problems(tmp_path, f"output.eula_file={binary}") == [
        "--set|output.eula_file|not UTF-8 text (invalid start byte at byte 0); give a UTF-8 text file"]
    assert load_config(None, ["provider=libvirt", f"output.eula_file={fine}"], cwd=tmp_path).output.eula_file


@pytest.mark.parametrize("name", ["sparse-3GiB", "/dev/zero"])
def test_a_huge_config_file_is_not_read_whole(tmp_path: Path, name: str) -> None:
    path = Path(name) if name.startswith("/") else tmp_path / "appliance.yaml"
    if not name.startswith("/"):
        with path.open("wb") as f:
            f.write(b"vm: {cpus: 4}\n")
            f.truncate(3 << 30)
    # A child under a 1 GiB address-space cap: reading the file whole would be a MemoryError traceback.
    child = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
             "from invoke.main import program; sys.argv = ['invoke', '-r', sys.argv[1], 'config', '-c', sys.argv[2]]; "
             "program.run()")
    proc = subprocess.run([sys.executable, "-c", child, str(PROJECT_ROOT), str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT), "HOME": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    expected = "it is a character device, not a regular file" if name == "/dev/zero" else \
        "the config file is larger than 4194304 bytes"
    assert expected in proc.stderr and "Traceback" not in proc.stderr
