"""Pure parts of the step runner and SSH session: input manifests, quoting, endpoints, host-key files."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import paramiko
import pytest

from appliance.errors import RemoteCommandFailed, RemoteError, UsageError
from appliance.scripts import discover_scripts
from appliance.ssh import RemoteResult, SSHEndpoint, env_exports, forget_host_key
from appliance.steps import StepInputs, is_final, step_inputs, support_files


def _script(tmp_path: Path, name: str, *header: str) -> Path:
    path = tmp_path / name
    lines = ["#!/usr/bin/env bash", *(f"# appliance: {h}" for h in header), "set -euo pipefail", "echo hi"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_inputs_hash_script_files_and_each_variable(tmp_path: Path) -> None:
    _script(tmp_path, "10-web.sh", "files=web")
    (tmp_path / "files" / "web").mkdir(parents=True)
    (tmp_path / "files" / "web" / "site.conf").write_text("a\n")
    [script] = discover_scripts(tmp_path)
    inputs = step_inputs(script, {"B": "2", "A": "secret-looking value"}, tmp_path)
    assert list(inputs.inputs) == ["env:A", "env:B", "file:files/web/site.conf", "script"]
    assert "secret-looking value" not in json.dumps(inputs.inputs), "values are stored hashed"
    assert inputs.digest == step_inputs(script, {"A": "secret-looking value", "B": "2"}, tmp_path).digest

    (tmp_path / "files" / "web" / "site.conf").write_text("b\n")
    changed = step_inputs(script, {"A": "other", "C": "new"}, tmp_path)
    assert changed.changes_from(inputs.inputs) == ["env:A", "env:B (gone)", "env:C (new)", "file:files/web/site.conf"]


def test_marker_is_one_json_line_with_the_digest(tmp_path: Path) -> None:
    inputs = StepInputs("base", {"script": "0" * 64})
    marker = inputs.marker(12.34)
    assert "\n" not in marker
    data = json.loads(marker)
    assert data["step"] == "base" and data["digest"] == inputs.digest and data["seconds"] == 12.3


def test_missing_support_directory_is_a_usage_error(tmp_path: Path) -> None:
    _script(tmp_path, "10-web.sh", "files=nope")
    [script] = discover_scripts(tmp_path)
    with pytest.raises(UsageError, match=r"declares files=nope, but .*files/nope is not a directory"):
        support_files(script, tmp_path)


def test_final_header_is_recognised(tmp_path: Path) -> None:
    _script(tmp_path, "10-a.sh")
    _script(tmp_path, "90-seal.sh", "final", "timeout=60")
    a, seal = discover_scripts(tmp_path)
    assert not is_final(a) and is_final(seal)


@pytest.mark.parametrize(
    "value",
    ["$(id)", "`id`", "a'b\"c", "line1\nline2", "; rm -rf /tmp/x;", "\\", "", "${HOME}", "*", "-n"],
)
def test_env_exports_survive_a_real_shell_verbatim(value: str) -> None:
    script = env_exports({"V": value}) + 'printf "%s" "$V"'
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out == value


def test_env_exports_refuse_bad_names() -> None:
    for name in ("1A", "A-B", "A B", "A;B", ""):
        with pytest.raises(RemoteError, match="invalid environment variable name"):
            env_exports({name: "x"})
    assert env_exports({}) == ""


def test_endpoint_normalises_and_validates(tmp_path: Path) -> None:
    e = SSHEndpoint("127.0.0.1", "2222", "vagrant", ("~/k1", tmp_path / "k2"))  # type: ignore[arg-type]
    assert e.port == 2222 and e.identity_files[0] == Path("~/k1").expanduser()
    assert e.known_hosts_name == "[127.0.0.1]:2222"
    assert SSHEndpoint("h", 22, "u").known_hosts_name == "h"
    assert str(e) == "vagrant@127.0.0.1:2222"
    with pytest.raises(ValueError, match="out of range"):
        SSHEndpoint("h", 70000, "u")
    with pytest.raises(ValueError, match="needs a host"):
        SSHEndpoint("", 22, "u")


def test_forget_host_key_removes_only_that_endpoint(tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    keys = paramiko.HostKeys()
    keys.add("[127.0.0.1]:2222", "ssh-ed25519", paramiko.Ed25519Key.from_private_key_file(_keygen(tmp_path, "a")))
    keys.add("[127.0.0.1]:2200", "ssh-ed25519", paramiko.Ed25519Key.from_private_key_file(_keygen(tmp_path, "b")))
    keys.save(str(known))
    assert forget_host_key(known, SSHEndpoint("127.0.0.1", 2222, "u"))
    assert not forget_host_key(known, SSHEndpoint("127.0.0.1", 2222, "u"))
    assert "[127.0.0.1]:2200" in known.read_text() and "[127.0.0.1]:2222" not in known.read_text()
    assert forget_host_key(known) and not known.exists()
    assert not forget_host_key(known)


def _keygen(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return str(path)


def test_failure_message_shows_hidden_output_once() -> None:
    lines = tuple(("stdout" if i % 2 else "stderr", f"line {i}") for i in range(40))
    result = RemoteResult("make", 2, "", "", 1.0, lines=lines)
    text = str(RemoteCommandFailed(result))
    assert text.startswith("remote command failed (exit status 2): make")
    assert "last 30 lines" in text and "line 39" in text and "line 9\n" not in text
    streamed = RemoteResult("make", 2, "", "", 1.0, streamed=True, lines=lines)
    assert "line 39" not in str(RemoteCommandFailed(streamed))
    timed = RemoteResult("sleep 9", 124, "", "", 5.0, timed_out=True, timeout=5)
    assert "timed out after 5 s" in str(RemoteCommandFailed(timed))


def test_wrap_command_quotes_the_whole_script() -> None:
    from appliance.ssh import RemoteSession

    session = RemoteSession(SSHEndpoint("h", 22, "vagrant"), known_hosts=Path("/nonexistent/kh"))
    wire = session.wrap_command("echo $V", env={"V": "x'y"}, timeout=30)
    argv = shlex.split(wire)
    assert argv[:9] == ["sudo", "-n", "-H", "--", "timeout", "--kill-after", "10", "30", "/bin/sh"]
    assert argv[9:] == ["-c", "export V='x'\"'\"'y'; echo $V"]
