"""Ctrl-C against a real loopback sshd: the remote command's whole process tree ends, uploads end.

The "guest" is this host (the sshd runs here), so the tests look for surviving processes
in /proc directly.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_steps import Rig, sh

from appliance.run import process_alive
from appliance.ssh import GROUP_TOKEN_VAR, RemoteSession
from appliance.upload import upload_file


def _wait_gone(pids: list[int], seconds: float = 15) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [p for p in pids if process_alive(p)]
        if not left:
            return []
        time.sleep(0.2)
    return [p for p in pids if process_alive(p)]


def _pids(folder: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(folder.glob("*.pid"))]


@pytest.fixture
def bare_rig(tmp_path: Path, session: RemoteSession) -> Rig:
    return Rig(tmp_path, session)


@pytest.fixture
def cleanup_pids() -> Iterator[list[int]]:
    """Processes a test leaves on purpose (the control case) are killed afterwards, by PID."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# A command with a background child, a subshell and a foreground sleep, each PID written down.
TREE = (
    "sleep 300 & echo $! > {d}/bg.pid; "
    "( sleep 301; true ) & echo $! > {d}/sub.pid; "
    "sleep 302 & echo $! > {d}/fg.pid; echo started; wait"
)


def _interrupt_on_started(name: str, line: str) -> None:
    if line == "started":
        raise KeyboardInterrupt  # what Ctrl-C raises in the main thread, at the same place


def test_ctrl_c_ends_the_whole_remote_process_tree(session: RemoteSession, tmp_path: Path) -> None:
    group_file = str(tmp_path / "run.pgid")
    with pytest.raises(KeyboardInterrupt):
        session.run(TREE.format(d=tmp_path), group_file=group_file, on_line=_interrupt_on_started, timeout=600)
    pids = _pids(tmp_path)
    assert len(pids) == 3
    assert _wait_gone(pids) == [], "processes of the interrupted command survived"
    assert not Path(group_file).exists(), "the group record is removed once the group is gone"
    # The session is still usable for the next command.
    assert session.run("echo ok").stdout.strip() == "ok"


def test_without_a_group_the_remote_tree_would_survive(session: RemoteSession, tmp_path: Path,
                                                       cleanup_pids: list[int]) -> None:
    # The control case: closing only the channel (the old behaviour) leaves the processes running,
    # so the test above would fail without the group.
    with pytest.raises(KeyboardInterrupt):
        session.run(TREE.format(d=tmp_path), on_line=_interrupt_on_started, timeout=600)
    pids = _pids(tmp_path)
    cleanup_pids.extend(pids)
    time.sleep(1)
    assert any(process_alive(p) for p in pids)


def test_a_stale_group_record_never_signals_other_processes(session: RemoteSession, tmp_path: Path) -> None:
    # A record naming this test's own session, with a token nobody carries.
    record = tmp_path / "run.pgid"
    record.write_text(f"{os.getsid(0)} {'ab' * 16}\n")
    assert session.stop_group(str(record)) is False
    assert not record.exists()
    assert session.stop_group(str(tmp_path / "missing.pgid")) is False


def test_a_grouped_run_records_its_session_and_token_then_removes_the_record(session: RemoteSession,
                                                                                tmp_path: Path) -> None:
    record = tmp_path / "g.pgid"
    out = session.run(f"cat {record}; cut -d' ' -f6 /proc/$$/stat; "
                      f"tr '\\0' '\\n' < /proc/$$/environ | grep ^{GROUP_TOKEN_VAR}=",
                      group_file=str(record)).stdout.split("\n")
    sid, token = out[0].split()
    assert out[1] == sid, "the command runs in the recorded session"
    assert out[2] == f"{GROUP_TOKEN_VAR}={token}" and len(token) == 32
    assert not record.exists(), "a run that ends by itself removes its record"
    failed = session.run("exit 7", group_file=str(record), check=False)
    assert failed.exit_status == 7 and not record.exists(), "the exit status passes through"


def test_ctrl_c_during_a_step_stops_it_and_the_rerun_does_not_overlap(bare_rig: Rig) -> None:
    rig = bare_rig
    rig.write("10-long.sh", sh(f"sleep 300 & echo $! > {rig.work}/child.pid",
                               f"echo $$ > {rig.work}/main.pid", "sleep 301"))
    def ctrl_c_once_running() -> None:
        deadline = time.monotonic() + 60
        while not (rig.work / "main.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=ctrl_c_once_running, daemon=True)
    watcher.start()
    with pytest.raises(KeyboardInterrupt):
        rig.run()
    watcher.join()
    pids = [int((rig.work / n).read_text()) for n in ("child.pid", "main.pid")]
    assert _wait_gone(pids) == [], "the interrupted step kept running on the guest"
    assert not (rig.state / "long.done").exists()


def test_a_step_left_running_is_stopped_before_the_next_run(bare_rig: Rig, cleanup_pids: list[int]) -> None:
    rig = bare_rig
    # As after a lost connection: the step's group still runs when the build comes back.
    rig.write("10-quick.sh", sh("echo quick"))
    provisioner = rig.provisioner()
    rig.state.mkdir(parents=True, exist_ok=True)
    leftover = threading.Thread(target=lambda: rig.session.run(
        f"sleep 300 & echo $! > {rig.work}/left.pid; wait", group_file=provisioner.group_file, check=False))
    leftover.daemon = True
    leftover.start()
    deadline = time.monotonic() + 20
    while not (rig.work / "left.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    pid = int((rig.work / "left.pid").read_text())
    cleanup_pids.append(pid)
    assert process_alive(pid)
    assert rig.run() == {"quick": "no changes"}
    assert _wait_gone([pid]) == [], "the next run must stop the step left running first"
    leftover.join(timeout=20)
    assert not leftover.is_alive()


def test_ctrl_c_during_an_upload_ends_promptly(session: RemoteSession, tmp_path: Path) -> None:
    local = tmp_path / "big.bin"
    with local.open("wb") as f:
        for _ in range(64):
            f.write(os.urandom(1024 * 1024))
    remote = tmp_path / "guest" / "big.bin"
    remote.parent.mkdir()
    for attempt in range(3):
        timer = threading.Timer(0.3 + 0.2 * attempt, lambda: os.kill(os.getpid(), signal.SIGINT))
        started = time.monotonic()
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                upload_file(session, local, str(remote), skip_identical=False,
                            request_size=32 * 1024)
        finally:
            timer.cancel()
        assert time.monotonic() - started < 20, "the interrupted upload hung"
        assert not remote.exists(), "a half upload never sits under the final name"
    upload_file(session, local, str(remote))
    assert remote.read_bytes() == local.read_bytes()
