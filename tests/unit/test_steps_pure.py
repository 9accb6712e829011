"""Pure parts of the step runner and SSH session: input manifests, quoting, endpoints, host-key files."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import paramiko
import pytest

from appliance.config import PROJECT_ROOT
from appliance.errors import RemoteCommandFailed, RemoteError, UsageError
from appliance.scripts import discover_scripts, guest_variable_names
from appliance.ssh import RemoteResult, SSHEndpoint, env_exports, forget_host_key
from appliance.steps import STEP_WRAPPER, StepInputs, is_final, step_environment, step_inputs, support_files


def _script(tmp_path: Path, name: str, *header: str) -> Path:
    path = tmp_path / name
    lines = ["#!/usr/bin/env bash", *(f"# appliance: {h}" for h in header), "set -euo pipefail", "echo hi"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_inputs_hash_script_files_and_each_declared_variable(tmp_path: Path) -> None:
    _script(tmp_path, "10-web.sh", "files=web", "env=K3S_VERSION,CSGHUB_DOMAIN")
    (tmp_path / "files" / "web").mkdir(parents=True)
    (tmp_path / "files" / "web" / "site.conf").write_text("a\n")
    [script] = discover_scripts(tmp_path)
    env = {"K3S_VERSION": "v1", "CSGHUB_DOMAIN": "secret-looking value", "K3S_NODE_IP": "10.0.0.1",
           "PROVISION_DIR": "/p"}
    inputs = step_inputs(script, env, tmp_path)
    # Only what the script declares, plus PROVISION_DIR (every step gets it): K3S_NODE_IP is not an input.
    assert list(inputs.inputs) == ["env:CSGHUB_DOMAIN", "env:K3S_VERSION", "env:PROVISION_DIR",
                                   "file:files/web/site.conf", "script"]
    assert step_environment(script, env) == {"CSGHUB_DOMAIN": "secret-looking value", "K3S_VERSION": "v1",
                                             "PROVISION_DIR": "/p"}
    assert "secret-looking value" not in json.dumps(inputs.inputs), "values are stored hashed"
    assert inputs.digest == step_inputs(script, dict(reversed(list(env.items()))), tmp_path).digest
    assert inputs.digest == step_inputs(script, {**env, "K3S_NODE_IP": "10.9.9.9"}, tmp_path).digest

    (tmp_path / "files" / "web" / "site.conf").write_text("b\n")
    changed = step_inputs(script, {**env, "CSGHUB_DOMAIN": "other"}, tmp_path)
    assert changed.changes_from(inputs.inputs) == ["env:CSGHUB_DOMAIN", "file:files/web/site.conf"]
    recorded = {k: v for k, v in inputs.inputs.items() if k != "env:K3S_VERSION"} | {"env:OLD": "0" * 64}
    assert inputs.changes_from(recorded) == ["env:K3S_VERSION (new)", "env:OLD (gone)"]


def test_marker_body_is_one_json_object_the_wrapper_completes(tmp_path: Path) -> None:
    inputs = StepInputs("base", {"script": "0" * 64})
    body = inputs.marker_body()
    assert "\n" not in body and body.startswith("{") and body.endswith("}")
    data = json.loads(body)
    assert data == {"format": 1, "step": "base", "digest": inputs.digest, "inputs": {"script": "0" * 64}}
    assert inputs.wrapper_env("/state/") == {"APPLIANCE_STEP_MARKER": body,
                                             "APPLIANCE_STEP_MARKER_FILE": "/state/base.done"}


def test_wrapper_writes_the_marker_only_after_success_and_hides_its_variables(tmp_path: Path) -> None:
    """provision/files/common/run-step.sh, run by a real bash: the one writer of markers."""
    wrapper = PROJECT_ROOT / "provision" / STEP_WRAPPER
    step = tmp_path / "10-step.sh"
    step.write_text('env | grep -c "^APPLIANCE_STEP_" || true\nexit "${FAIL:-0}"\n')
    marker_file = tmp_path / "state" / "step.done"
    inputs = StepInputs("step", {"script": "1" * 64})
    env = {"PATH": "/usr/bin:/bin", **inputs.wrapper_env(str(tmp_path / "state"))}
    done = subprocess.run(["bash", str(wrapper), str(step)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0", "the step must not see the wrapper's variables"
    written = marker_file.read_text()
    assert written.endswith("\n") and written.count("\n") == 1
    data = json.loads(written)
    assert {k: data[k] for k in ("format", "step", "digest", "inputs")} == json.loads(inputs.marker_body())
    assert isinstance(data["seconds"], float) and data["finished"].endswith("+00:00")

    # A failing step: its old marker is gone (never "done" after a failed rerun), the status passes through.
    failed = subprocess.run(["bash", str(wrapper), str(step)], env={**env, "FAIL": "7"}, capture_output=True,
                            text=True, timeout=30)
    assert failed.returncode == 7
    assert not marker_file.exists()

    # No marker requested (the final step): nothing is written anywhere.
    bare = subprocess.run(["bash", str(wrapper), str(step)], env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=30)
    assert bare.returncode == 0 and not marker_file.exists()
    bad = subprocess.run(["bash", str(wrapper), str(step)], env={**env, "APPLIANCE_STEP_MARKER_FILE": "rel.done"},
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "absolute path ending in .done" in bad.stderr


def test_env_header_lists_are_merged_and_checked(tmp_path: Path) -> None:
    _script(tmp_path, "10-a.sh", "env=K3S_VERSION", "env=K3S_NODE_IP,PROVISION_DIR")
    _script(tmp_path, "20-b.sh")
    a, b = discover_scripts(tmp_path)
    assert a.env == ("K3S_NODE_IP", "K3S_VERSION", "PROVISION_DIR") and b.env == ()


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("env=K3S_VERSON", r"30-bad.sh: `# appliance: env=` names 'K3S_VERSON', which is not a guest variable"),
        ("env=K3S_VERSION,k3s_node_ip", r"30-bad.sh: .* names 'k3s_node_ip'"),
        ("env=SEAL_POWEROFF", r"30-bad.sh: .* names 'SEAL_POWEROFF'"),
        ("env=", r"30-bad.sh: `# appliance: env=` lists an empty variable name"),
        ("env=K3S_VERSION,,K3S_NODE_IP", r"30-bad.sh: .* lists an empty variable name"),
    ],
)
def test_bad_env_header_names_the_script_and_the_variable(tmp_path: Path, header: str, message: str) -> None:
    _script(tmp_path, "10-good.sh", "env=K3S_VERSION")
    _script(tmp_path, "30-bad.sh", header)
    with pytest.raises(UsageError, match=message) as err:
        discover_scripts(tmp_path)
    if "names" in message:
        assert err.value.hint is not None and "K3S_VERSION" in err.value.hint, "the hint lists the known names"


def test_the_real_steps_declare_what_they_read() -> None:
    """Each real script declares every config variable its body uses, and no other."""
    known = guest_variable_names() - {"PROVISION_DIR"}
    for script in discover_scripts():
        body = script.path.read_text()
        used = {name for name in known if re.search(rf"\${{?{name}\b", body)}
        assert set(script.env) == used, f"{script.filename}: declares {sorted(script.env)}, uses {sorted(used)}"


@pytest.mark.parametrize("value", ["..", "../..", "common/../..", "/etc", ".", ".hidden", "a/b"])
def test_files_header_names_one_folder_under_provision_files(tmp_path: Path, value: str) -> None:
    """`files=..` would upload provision/ itself and `files=../..` the whole project: refused at discovery."""
    (tmp_path / "files" / "common").mkdir(parents=True)
    _script(tmp_path, "10-good.sh", "files=common")
    _script(tmp_path, "30-bad.sh", f"files={value}")
    with pytest.raises(UsageError) as err:
        discover_scripts(tmp_path)
    assert str(err.value).splitlines()[0] == (
        f"30-bad.sh: header line `# appliance: files={value}`: `files` takes the name of one folder under "
        f"provision/files (letters, digits, - and _; no / or ..), not {value!r}")
    (tmp_path / "30-bad.sh").unlink()
    assert [s.files for s in discover_scripts(tmp_path)] == [("common",)]


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
