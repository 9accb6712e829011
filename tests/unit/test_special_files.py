"""No input path ever blocks or is read as something it is not (issue 21).

A config file (``appliance.yaml`` found in the working folder, or ``--config``), ``build/state.json``,
the EULA file and the OVA ``verify-ova`` reads: each may be a FIFO (``open()`` would block until
a writer appears: forever), a directory or a device. Each is refused with one line naming the
path and what it is, exit status 2, within a second, and nothing reads from it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import PROJECT_ROOT, load_config
from appliance.errors import ApplianceError, ConfigError, StateError, UsageError
from appliance.state import BuildState

KINDS = ["fifo", "directory", "device"]
WHAT = {"fifo": "it is a FIFO (named pipe), not a regular file", "directory": "it is a directory, not a regular file",
        "device": "it is a character device, not a regular file"}


def special(path: Path, kind: str) -> Path:
    """``path`` made a FIFO or a directory, or (device) a symlink to /dev/zero, which never ends."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    return path


def within_a_second(action: Callable[[], object]) -> BaseException:
    """Run ``action`` in a thread; it must raise within a second (a blocked open would hang the test)."""
    box: list[BaseException] = []

    def target() -> None:
        try:
            action()
        except BaseException as exc:  # handed to the test
            box.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # unblock it: open the FIFO's writing end, if it is one
        pytest.fail("blocked for 5 s")
    assert time.monotonic() - started < 1.0
    assert box, "no error raised"
    return box[0]


@pytest.mark.parametrize("kind", KINDS)
def test_config_file(tmp_path: Path, kind: str) -> None:
    path = special(tmp_path / "appliance.yaml", kind)
    for config_file in (path, None):  # --config, and the appliance.yaml found in the working folder
        err = within_a_second(lambda c=config_file: load_config(c, ["provider=libvirt"], cwd=tmp_path))
        assert isinstance(err, ConfigError) and err.exit_code == 2
        assert f"{path}: (top level): cannot read the config file: {WHAT[kind]}" in str(err)


@pytest.mark.parametrize("kind", KINDS)
def test_eula_file(tmp_path: Path, kind: str) -> None:
    path = special(tmp_path / "EULA.txt", kind)
    err = within_a_second(lambda: load_config(None, ["provider=libvirt", f"output.eula_file={path}"], cwd=tmp_path))
    assert isinstance(err, ConfigError) and f"cannot be read: {WHAT[kind]}" in str(err)
    assert "output.eula_file" in str(err)


@pytest.mark.parametrize("kind", KINDS)
def test_state_file(tmp_path: Path, kind: str) -> None:
    special(tmp_path / "state.json", kind)
    err = within_a_second(lambda: BuildState.load(tmp_path))
    assert isinstance(err, StateError) and err.exit_code == 2
    assert f"cannot read the build state {tmp_path / 'state.json'}: {WHAT[kind]}" in str(err)


@pytest.mark.parametrize("kind", KINDS)
def test_ova_to_verify(tmp_path: Path, kind: str) -> None:
    from appliance.verify import verify_ova

    path = special(tmp_path / "x.ova", kind)
    err = within_a_second(lambda: verify_ova(path, boot=False))
    assert isinstance(err, UsageError) and err.exit_code == 2
    assert f"cannot read the OVA {str(path)!r}: {WHAT[kind]}" in str(err)


def test_the_vmdk_walk_never_opens_a_fifo(tmp_path: Path) -> None:
    from appliance.verify_vmdk import walk_stream_vmdk

    path = special(tmp_path / "disk.vmdk", "fifo")
    started = time.monotonic()
    walk = walk_stream_vmdk(path, "disk.vmdk")
    assert time.monotonic() - started < 1.0
    assert walk.problems == ["reading it failed: a FIFO (named pipe), not a regular file"]


@pytest.mark.parametrize(("task", "target"), [
    (["config", "-c", "{p}"], "appliance.yaml"),
    (["verify-ova", "{p}", "--no-boot", "--no-fetch"], "x.ova"),
    (["up", "--provider", "libvirt", "--set", "output.build_dir={d}"], "state.json"),
])
def test_cli_exits_2_at_once_on_a_fifo(tmp_path: Path, task: list[str], target: str) -> None:
    fifo = special(tmp_path / target, "fifo")
    argv = [a.format(p=fifo, d=tmp_path) for a in task]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "invoke", "-r", str(PROJECT_ROOT), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "a FIFO (named pipe), not a regular file" in proc.stderr and "Traceback" not in proc.stderr
    # The process (Python and invoke start-up included) ends in seconds; the refusal itself in-process
    # is timed above at under a second.
    assert time.monotonic() - started < 20


def test_error_types_are_hostile_input_exit_2() -> None:
    assert all(e.exit_code == 2 for e in (ConfigError([]), StateError("x"), UsageError("x")))
    assert issubclass(StateError, ApplianceError)


@pytest.mark.parametrize("kind", KINDS)
def test_ssh_key_for_the_boot_check(tmp_path: Path, kind: str) -> None:
    """`verify-ova --ssh-key`: Paramiko would block reading a FIFO when the boot check logs in."""
    from appliance.verify import boot_access

    key = special(tmp_path / "id_ed25519", kind)
    cfg = load_config(None, ["provider=libvirt", "provision.skip=[k3s, csghub]", "vm.cpus=2", "vm.memory_mb=2048"],
                      cwd=tmp_path)
    err = within_a_second(lambda: boot_access(cfg, ssh_key=str(key)))
    assert isinstance(err, UsageError) and f"cannot read the SSH key {str(key)!r}: {WHAT[kind]}" in str(err)
