"""VirtualBox export at its boundary: argv built, machine-readable output parsed, failures reported.

VirtualBox cannot run here, so a small fake ``VBoxManage`` (tests/data/vbox/fake-VBoxManage)
stands in on PATH: it records its arguments and answers like VBoxManage does. The vbox tier
(tests/vbox) runs the same code against the real VBoxManage.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from appliance.errors import CommandFailed, ExportError, PrerequisiteMissing
from appliance.providers.virtualbox import export as vbox
from appliance.providers.virtualbox.export import export_argv, export_virtualbox, nat_rules, parse_machinereadable

DATA = Path(__file__).resolve().parent.parent / "data" / "vbox"


@pytest.fixture
def fake_vboxmanage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built_ova: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(DATA / "fake-VBoxManage", bin_dir / "VBoxManage")
    shutil.copy(DATA / "showvminfo-poweroff.txt", bin_dir / "showvminfo-poweroff.txt")
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_VBOX_LOG", str(calls))
    monkeypatch.setenv("FAKE_VBOX_OVA", str(built_ova))
    # run() passes only a fixed set of variables to commands; let the fake's settings through.
    import appliance.run as run_module

    monkeypatch.setattr(run_module, "_PASSTHROUGH", (*run_module._PASSTHROUGH, "FAKE_VBOX_LOG", "FAKE_VBOX_OVA",
                                                     "FAKE_VBOX_STATE", "FAKE_VBOX_STATES", "FAKE_VBOX_FAIL"))
    return calls


def calls_of(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_parse_machinereadable_sample() -> None:
    info = parse_machinereadable((DATA / "showvminfo-poweroff.txt").read_text())
    assert info["name"] == "csghub-appliance"
    assert info["VMState"] == "poweroff"
    assert info["memory"] == "16384" and info["cpus"] == "8"
    assert info["SATA Controller-0-0"].endswith("/box-disk001.vmdk")  # quoted key with spaces
    assert info["CPUID Portability Level"] == "0"  # unquoted key with spaces, unquoted number
    assert info["description"] == (
        'CSGHub appliance "build" VM\nsecond line of the description, with a backslash \\ in it')
    assert info["GuestMemoryBalloon"] == "0"  # parsing continued after the multi-line value
    assert [(r.name, r.host_ip, r.host_port, r.guest_port) for r in nat_rules(info)] == [
        ("git-ssh", "127.0.0.1", 30022, 30022), ("http", "127.0.0.1", 30080, 30080), ("ssh", "127.0.0.1", 2222, 22)]


def test_parse_machinereadable_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="unterminated"):
        parse_machinereadable('name="open\n')
    with pytest.raises(ValueError, match="without '='"):
        parse_machinereadable("just words\n")


def test_export_argv(make_cfg: Callable[..., ApplianceConfig], tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vbox, "vboxmanage", lambda: "VBoxManage")
    eula = tmp_path / "EULA.txt"
    eula.write_text("licence\n")
    cfg = make_cfg("output.version=3.1.4", f"output.eula_file={eula}", "output.description=It's \"quoted\"")
    argv = export_argv(cfg, "csghub-appliance", Path("/out/csghub-3.1.4.ova"))
    assert argv == [
        "VBoxManage", "export", "csghub-appliance", "--output=/out/csghub-3.1.4.ova", "--ovf10",
        "--manifest", "--options=nomacsbutnat", "--vsys=0",
        "--product=CSGHub", "--producturl=https://github.com/OpenCSGs/csghub",
        "--vendor=OpenCSG", "--vendorurl=https://opencsg.com", "--version=3.1.4",
        "--description=It's \"quoted\"", f"--eulafile={eula}",
    ]
    assert "--ovf20" in export_argv(cfg, "vm", Path("/o.ova"), "ovf20")
    no_extras = export_argv(make_cfg("output.description="), "vm", Path("/o.ova"))
    assert not any(a.startswith(("--description", "--eulafile")) for a in no_extras)


def test_export_runs_vboxmanage_and_publishes_atomically(
    fake_vboxmanage: Path, make_cfg: Callable[..., ApplianceConfig], tmp_path: Path, built_ova: Path
) -> None:
    dist = tmp_path / "dist"
    result = export_virtualbox(make_cfg("output.version=5.0.0"), dist)
    assert result.path == dist / "csghub-5.0.0.ova"
    assert result.path.read_bytes() == built_ova.read_bytes()
    assert (dist / "csghub-5.0.0.ova.sha256").read_text() == f"{result.sha256}  csghub-5.0.0.ova\n"
    assert sorted(p.name for p in dist.iterdir()) == ["csghub-5.0.0.ova", "csghub-5.0.0.ova.sha256"]
    assert result.disk.capacity == 64 * 2**20 and result.members[0].endswith(".ovf")
    calls = calls_of(fake_vboxmanage)
    assert calls[0] == ["showvminfo", "csghub-appliance", "--machinereadable"]
    # Vagrant's ssh forward is not in the configuration: removed before export.
    assert ["modifyvm", "csghub-appliance", "--natpf1", "delete", "ssh"] in calls
    export = next(c for c in calls if c[0] == "export")
    staged = next(a for a in export if a.startswith("--output="))
    assert staged.endswith("/csghub-5.0.0.ova") and "/.csghub-5.0.0.ova.work-" in staged


def test_running_vm_is_refused(fake_vboxmanage: Path, make_cfg: Callable[..., ApplianceConfig],
                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VBOX_STATE", "running")
    with pytest.raises(ExportError, match="is 'running'; export needs it powered off"):
        export_virtualbox(make_cfg(), tmp_path / "dist")
    assert [c[0] for c in calls_of(fake_vboxmanage)] == ["showvminfo"]


def test_a_vm_still_stopping_is_waited_for(fake_vboxmanage: Path, make_cfg: Callable[..., ApplianceConfig],
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sealed VM powered itself off a moment ago: its VM process is still tearing down ("stopping")."""
    monkeypatch.setenv("FAKE_VBOX_STATES", "stopping,stopping,stopping,poweroff")
    monkeypatch.setattr(vbox.time, "sleep", lambda _s: None)
    export_virtualbox(make_cfg(), tmp_path / "dist")
    calls = [c[0] for c in calls_of(fake_vboxmanage)]
    assert calls[:4] == ["showvminfo"] * 4  # waited until poweroff before the first modifyvm
    assert "modifyvm" in calls[4:] and calls[-1] == "export"


def test_unknown_vm_is_reported_with_vboxmanage_message(
    fake_vboxmanage: Path, make_cfg: Callable[..., ApplianceConfig], tmp_path: Path
) -> None:
    with pytest.raises(CommandFailed) as err:
        export_virtualbox(make_cfg(), tmp_path / "dist", vm="no-such-vm")
    assert "Could not find a registered machine named 'no-such-vm'" in str(err.value)
    assert "VBoxManage list vms" in str(err.value)


def test_removing_a_vm_virtualbox_cannot_describe_is_no_silent_success(
    fake_vboxmanage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only "no such VM" means there is nothing to remove; any other showvminfo failure is reported."""
    from appliance.errors import ExportError
    from appliance.providers.virtualbox.export import unregister_and_delete

    unregister_and_delete("no-such-vm")  # never imported: nothing to do
    monkeypatch.setenv("FAKE_VBOX_FAIL", "showvminfo")
    with pytest.raises(ExportError) as err:
        unregister_and_delete("csghub-appliance")
    assert "cannot tell whether VirtualBox VM 'csghub-appliance' is still registered" in str(err.value)
    assert "simulated failure" in str(err.value) or "Appliance write failed" in str(err.value)


def test_failed_export_leaves_nothing_behind(
    fake_vboxmanage: Path, make_cfg: Callable[..., ApplianceConfig], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VBOX_FAIL", "export")
    dist = tmp_path / "dist"
    with pytest.raises(CommandFailed) as err:
        export_virtualbox(make_cfg(), dist)
    # The output was streamed to the terminal, so the error carries it in its result.
    assert "simulated failure" in err.value.result.stderr and err.value.result.returncode == 1
    assert list(dist.iterdir()) == []


def test_missing_vboxmanage_is_a_prerequisite_error(
    make_cfg: Callable[..., ApplianceConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(vbox, "which", lambda _name: None)
    with pytest.raises(PrerequisiteMissing, match="VBoxManage is not installed"):
        export_virtualbox(make_cfg(), tmp_path / "dist")


def test_nat_rules_are_read_per_adapter_from_a_real_capture() -> None:
    """VBoxManage 7.2 prints every adapter's first rule as `Forwarding(0)`: each belongs to the `nicN` before it."""
    info = parse_machinereadable((DATA / "showvminfo-three-nat.txt").read_text())
    assert [(r.name, r.protocol, r.host_ip, r.host_port, r.guest_port) for r in nat_rules(info, 1)] == [
        ("a", "tcp", "127.0.0.1", 2222, 22)]
    assert [(r.name, r.host_port) for r in nat_rules(info, 2)] == [("b", 8080)]
    assert [(r.name, r.protocol, r.host_port) for r in nat_rules(info, 3)] == [("c", "udp", 5353)]
    assert nat_rules(info, 4) == []


def test_a_copy_that_stops_fails_the_boot_check_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The VirtualBox boot watches the VM's state at every poll: an abort fails now, not at the deadline."""
    import time

    from appliance.errors import GuestStopped
    from appliance.providers.virtualbox import boot as vboxboot
    from appliance.verify_boot import SSHLogin, check_booted_copy, free_loopback_port, wait_http

    console = tmp_path / "console.log"
    console.write_text("kernel panic\n")
    key = tmp_path / "id_ed25519"
    key.write_text("unused: nothing listens\n")
    port = free_loopback_port()  # nothing listens there
    states = iter(["running", "aborted"])
    monkeypatch.setattr(vboxboot, "vm_info", lambda vm: {"VMState": next(states, "aborted")})
    watch = lambda: vboxboot.stopped_guest("csghub-verify", console)  # noqa: E731
    assert watch() is None  # running: the check goes on
    started = time.monotonic()
    with pytest.raises(GuestStopped) as err:
        check_booted_copy(port, None, console, login=SSHLogin(user="vagrant", key_file=key), ready_command="true",
                          started=started, deadline=started + 600, nonce="n", http_host=None, watch=watch)
    assert "the copy stopped while it was being checked: VirtualBox reports it 'aborted'" in str(err.value)
    assert "kernel panic" in str(err.value)
    with pytest.raises(GuestStopped, match="'aborted'"):
        wait_http(f"http://127.0.0.1:{port}/", time.monotonic() + 600, watch=watch)
    assert time.monotonic() - started < 30
