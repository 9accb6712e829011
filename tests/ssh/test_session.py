"""RemoteSession against a real OpenSSH server on loopback: streaming, exit codes, timeouts,
environment quoting, connection errors, host keys, dropped connections."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from sshd_server import SSHServer

from appliance.errors import ConnectionLost, RemoteCommandFailed, RemoteError
from appliance.ssh import RemoteSession, SSHEndpoint, forget_host_key


def test_lines_stream_in_arrival_order_across_both_streams(session: RemoteSession) -> None:
    seen: list[tuple[str, str]] = []
    result = session.run(
        "echo out1; sleep 0.2; echo err1 >&2; sleep 0.2; echo out2; sleep 0.2; printf 'err2-no-newline' >&2",
        on_line=lambda stream, line: seen.append((stream, line)),
    )
    assert seen == [("stdout", "out1"), ("stderr", "err1"), ("stdout", "out2"), ("stderr", "err2-no-newline")]
    assert result.stdout == "out1\nout2\n"
    assert result.stderr == "err1\nerr2-no-newline"
    assert result.tail(2) == ["out2", "err2-no-newline"]


def test_a_line_arrives_while_the_command_still_runs(session: RemoteSession) -> None:
    arrived: list[float] = []
    session.run("echo first; sleep 1.5; echo second", on_line=lambda s, line: arrived.append(time.monotonic()))
    finished = time.monotonic()
    assert len(arrived) == 2
    assert finished - arrived[0] >= 1.0, "the first line was only delivered when the command ended"


def test_large_output_on_both_streams_does_not_block(session: RemoteSession) -> None:
    # 2 MB on each stream: more than any window; a reader that waits for the exit status first would hang.
    result = session.run(
        "head -c 2000000 /dev/zero | tr '\\0' x | fold -w 99 >&2; head -c 2000000 /dev/zero | tr '\\0' y | fold -w 99",
        timeout=60,
    )
    assert len(result.stdout) == 2000000 + 2000000 // 99  # fold adds no newline after the last partial line
    assert set(result.stdout) == {"y", "\n"}
    assert set(result.stderr) == {"x", "\n"}


def test_exit_status_raises_with_the_result_unless_check_is_false(session: RemoteSession) -> None:
    with pytest.raises(RemoteCommandFailed) as info:
        session.run("echo something went wrong >&2; exit 3")
    assert info.value.result.exit_status == 3
    assert "exit status 3" in str(info.value)
    assert "something went wrong" in str(info.value)
    result = session.run("exit 4", check=False)
    assert result.exit_status == 4 and not result.ok
    assert session.run("true").ok


def test_missing_program_says_so(session: RemoteSession) -> None:
    with pytest.raises(RemoteCommandFailed, match="exit 127: program not found"):
        session.run("no-such-program-appliance-test")


def test_timeout_kills_the_remote_command(session: RemoteSession) -> None:
    tag = f"appliance-timeout-{uuid.uuid4().hex}"
    started = time.monotonic()
    with pytest.raises(RemoteCommandFailed) as info:
        session.run(f"echo started; exec sleep 300 # {tag}", timeout=2)
    assert info.value.result.timed_out
    assert "timed out after 2 s" in str(info.value)
    assert time.monotonic() - started < 20
    assert info.value.result.stdout == "started\n"
    # "[a]" keeps the pattern from matching the shell that runs pgrep itself.
    left = session.run(f"pgrep -f '[a]{tag[1:]}' || true", sudo=False)
    assert left.stdout.strip() == "", "the timed-out command is still running on the guest"


HOSTILE = {
    "SUBSHELL": "$(touch {canary})",
    "BACKTICKS": "`touch {canary}`",
    "QUOTES": "it's \"quoted\" 'twice'",
    "NEWLINES": "line one\nline two\n; touch {canary}",
    "SEMICOLON": "; touch {canary}; echo",
    "BACKSLASH": "ends with a backslash \\",
    "DOLLAR": "$HOME ${{HOME}} $0 $$",
    "GLOB": "* ?",
    "EMPTY": "",
    "DASHES": "--help -n",
}


def test_hostile_environment_values_arrive_verbatim_and_inert(session: RemoteSession, tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    env = {k: v.format(canary=canary) for k, v in HOSTILE.items()}
    script = "; ".join(f'printf "%s\\0" "${k}"' for k in env)
    for sudo in (True, False):
        result = session.run(script, env=env, sudo=sudo)
        assert result.stdout.split("\0")[:-1] == list(env.values())
    assert not canary.exists(), "a value was executed by the shell"


def test_invalid_environment_name_is_refused(session: RemoteSession) -> None:
    with pytest.raises(RemoteError, match="invalid environment variable name"):
        session.run("true", env={"BAD;NAME": "x"})


def test_sudo_prefix_only_for_non_root_users(tmp_path: Path) -> None:
    as_vagrant = RemoteSession(SSHEndpoint("127.0.0.1", 2222, "vagrant"), known_hosts=tmp_path / "kh")
    as_root = RemoteSession(SSHEndpoint("127.0.0.1", 2222, "root"), known_hosts=tmp_path / "kh")
    assert as_vagrant.wrap_command("id", timeout=5).startswith("sudo -n -H -- timeout --kill-after 10 5 /bin/sh -c")
    assert as_vagrant.wrap_command("id", sudo=False) == "/bin/sh -c id"
    assert as_root.wrap_command("id") == "/bin/sh -c id"


def test_rsa_key_works_too(sshd: SSHServer, tmp_path: Path) -> None:
    with sshd.session(sshd.rsa_key, known_hosts=tmp_path / "kh") as s:
        assert s.run("echo rsa").stdout == "rsa\n"


def test_wrong_key_is_an_authentication_error(sshd: SSHServer, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    os.system(f"ssh-keygen -q -t ed25519 -N '' -f {stranger}")  # noqa: S605 - fixed test command
    with sshd.session(stranger, known_hosts=tmp_path / "kh") as s, pytest.raises(RemoteError) as info:
        s.run("true")
    assert "authentication as" in str(info.value)
    assert "ssh.private_key" in str(info.value)


def test_missing_key_file_is_named(sshd: SSHServer, tmp_path: Path) -> None:
    with sshd.session(tmp_path / "nope", known_hosts=tmp_path / "kh") as s, pytest.raises(RemoteError) as info:
        s.run("true")
    assert f"{tmp_path / 'nope'} does not exist" in str(info.value)


def test_refused_connection_is_retried_then_explained(sshd: SSHServer, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = SSHEndpoint("127.0.0.1", port, sshd.user, (sshd.ed25519_key,))
    session = RemoteSession(endpoint, known_hosts=tmp_path / "kh", connect_retries=2, retry_delay=(0.05, 0.1))
    with session, pytest.raises(RemoteError) as info:
        session.run("true")
    assert "after 3 attempts: connection refused" in str(info.value)
    assert "vagrant status" in str(info.value)


def test_connect_waits_for_a_server_that_comes_up_late(private_sshd: SSHServer, tmp_path: Path) -> None:
    private_sshd.stop()
    timer = threading.Timer(1.5, private_sshd.start)
    timer.start()
    try:
        with private_sshd.session(known_hosts=tmp_path / "kh", connect_retries=20, retry_delay=(0.2, 0.4)) as s:
            assert s.run("echo up").stdout == "up\n"
    finally:
        timer.join()


def test_host_key_is_recorded_then_a_changed_key_is_refused(private_sshd: SSHServer, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    with private_sshd.session(known_hosts=known) as s:
        s.run("true")
    assert f"[127.0.0.1]:{private_sshd.port} ssh-ed25519 " in known.read_text()
    with private_sshd.session(known_hosts=known) as s:
        s.run("true")  # same key: accepted silently

    private_sshd.new_host_key()
    with private_sshd.session(known_hosts=known) as s, pytest.raises(RemoteError) as info:
        s.run("true")
    message = str(info.value)
    assert f"the host key of [127.0.0.1]:{private_sshd.port} changed" in message
    assert "refusing to connect" in message
    assert f"ssh-keygen -f {known} -R" in message

    assert forget_host_key(known, private_sshd.endpoint())
    with private_sshd.session(known_hosts=known) as s:
        assert s.run("echo again").stdout == "again\n"


def test_dropped_connection_raises_connection_lost_and_the_session_reconnects(
    private_sshd: SSHServer, tmp_path: Path
) -> None:
    with private_sshd.session(known_hosts=tmp_path / "kh") as s:
        s.run("true")
        timer = threading.Timer(1.0, private_sshd.drop_connections)
        timer.start()
        started = time.monotonic()
        with pytest.raises(ConnectionLost, match="dropped while running"):
            s.run("sleep 60")
        timer.join()
        assert time.monotonic() - started < 30
        assert not s.is_connected
        assert s.run("echo back").stdout == "back\n"  # connects again on next use


def test_context_manager_closes_sftp_and_connection(session: RemoteSession) -> None:
    sftp = session.sftp()
    assert sftp.listdir("/")
    session.close()
    assert not session.is_connected
    assert sftp.sock.closed


def test_command_killed_by_a_signal_is_a_failure_not_a_lost_connection(session: RemoteSession) -> None:
    with pytest.raises(RemoteCommandFailed, match="killed by a signal"):
        session.run("echo before; kill -9 $$")
    assert session.is_connected
