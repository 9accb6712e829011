"""Parsing Vagrant's output: machine-readable status, ssh-config (repeated keys), `up` phases, errors.

Inputs are captured from Vagrant 2.3.4 + vagrant-libvirt 0.11.2 on this host
(tests/data/vagrant/): ``status-not-created.txt``, ``status-running.txt``,
``status-error-exit.txt``, ``box-list.txt`` and ``up-libvirt.txt`` (a real `vagrant up`,
progress lines thinned out). ``ssh-config-two-keys.txt`` is a real ``vagrant ssh-config`` with a second, quoted
IdentityFile added (what Vagrant prints when ``config.ssh.private_key_path`` lists two keys).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import CommandFailed, VagrantError
from appliance.providers.libvirt.provider import failure_hint as libvirt_failure_hint
from appliance.run import CommandResult
from appliance.vagrant import (
    Box,
    ProgressThrottle,
    _failure,
    detect_phase,
    parse_box_list,
    parse_machine_readable,
    parse_plugin_list,
    parse_ssh_config,
    parse_status,
    strip_ansi,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "vagrant"


def read(name: str) -> str:
    return (DATA / name).read_text()


# -- machine-readable status ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capture", "state", "exists", "running"),
    [("status-not-created.txt", "not_created", False, False), ("status-running.txt", "running", True, True)],
)
def test_status_is_read_from_machine_readable_lines(capture: str, state: str, exists: bool, running: bool) -> None:
    (machine,) = parse_status(read(capture))
    assert machine.name == "default"
    assert machine.provider == "libvirt"
    assert machine.state == state
    assert machine.exists is exists
    assert machine.running is running


def test_libvirt_shutoff_counts_as_stopped() -> None:
    text = "1,default,provider-name,libvirt\n1,default,state,shutoff\n"
    (machine,) = parse_status(text)
    assert machine.stopped and machine.exists and not machine.running


def test_an_error_exit_line_raises_with_vagrants_message() -> None:
    with pytest.raises(VagrantError, match="The machine with the name 'nosuch' was not found configured for\nthis"):
        parse_status(read("status-error-exit.txt"))


def test_escaped_commas_and_newlines_are_restored_and_extra_fields_kept() -> None:
    lines = parse_machine_readable(read("status-running.txt"))
    meta = next(ln for ln in lines if ln.kind == "metadata")
    assert meta.data == ("provider", "libvirt")
    long = next(ln for ln in lines if ln.kind == "state-human-long")
    assert "To stop this machine, you can run\n`vagrant halt`" in long.data[0]


def test_lines_that_are_not_machine_readable_are_ignored() -> None:
    assert parse_machine_readable("Bringing machine 'default' up...\n\n==> default: hi, there\n") == []


def test_box_list_gives_versions_per_name_and_provider() -> None:
    assert parse_box_list(read("box-list.txt")) == [Box("csghub/debian12", "libvirt", "12.20261128.135307")]


def test_box_list_keeps_every_version_of_every_box() -> None:
    text = (
        "1,,box-name,csghub/debian12\n1,,box-provider,libvirt\n1,,box-version,12.1.1\n"
        "1,,box-name,csghub/debian12\n1,,box-provider,libvirt\n1,,box-version,12.1.2\n"
        "1,,box-name,other/box\n1,,box-provider,virtualbox\n1,,box-version,0\n"
    )
    assert parse_box_list(text) == [Box("csghub/debian12", "libvirt", "12.1.1"),
                                    Box("csghub/debian12", "libvirt", "12.1.2"), Box("other/box", "virtualbox", "0")]


def test_plugin_list_as_vagrant_2_3_prints_it() -> None:
    # `vagrant plugin list --machine-readable` on this host (Vagrant 2.3.4, Debian's vagrant-libvirt).
    text = ("1795945921,,ui,info,vagrant-libvirt (0.11.2%!(VAGRANT_COMMA) system)\n"
            "1795945921,,plugin-name,vagrant-libvirt\n"
            "1795945921,vagrant-libvirt,plugin-version,0.11.2%!(VAGRANT_COMMA) system\n")
    assert parse_plugin_list(text) == {"vagrant-libvirt": "0.11.2, system"}


# -- ssh-config -----------------------------------------------------------------------------------


def test_every_identity_file_is_kept_in_order() -> None:
    endpoint = parse_ssh_config(read("ssh-config-two-keys.txt"))
    assert (endpoint.host, endpoint.port, endpoint.user) == ("192.168.213.181", 22, "vagrant")
    assert endpoint.identity_files == (
        Path("/root/.vagrant.d/boxes/csghub-VAGRANTSLASH-debian12/12.20261128.135307/libvirt/vagrant_ed25519"),
        Path("/home/dev/keys/my key"),
    )


def test_the_named_host_block_is_taken_and_key_value_with_equals_is_read() -> None:
    text = "Host web\n  HostName 10.0.0.2\n  Port=2222\n  User=deploy\nHost db\n  HostName 10.0.0.3\n  User x\n"
    web, db = parse_ssh_config(text, "web"), parse_ssh_config(text, "db")
    assert (web.host, web.port, web.user) == ("10.0.0.2", 2222, "deploy")
    assert (db.host, db.port, db.user, db.identity_files) == ("10.0.0.3", 22, "x", ())


@pytest.mark.parametrize(("text", "message"), [
    ("# comment\nUser stray\n", "no Host block for 'default'"),
    ("Host default\n  User vagrant\n", "no HostName or User"),
    ("Host default\n  HostName 10.0.0.2\n", "no HostName or User"),
    ("Host default\n  HostName 10.0.0.2\n  User v\n  Port twenty\n", "port 'twenty'"),
])
def test_an_incomplete_ssh_config_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(VagrantError, match=message):
        parse_ssh_config(text)


# -- phases of `vagrant up` -----------------------------------------------------------------------


def test_phases_follow_a_real_vagrant_up() -> None:
    phase, seen = "starting vagrant", []
    for line in read("up-libvirt.txt").splitlines():
        new = detect_phase(line, phase)
        if new != phase:
            seen.append(new)
            phase = new
    assert seen == [
        "uploading the box image",
        "creating the disk",
        "creating domain",
        "starting domain",
        "waiting for IP",
        "waiting for SSH",
        "booted",
    ]


def test_a_line_without_a_marker_keeps_the_phase() -> None:
    assert detect_phase("    default: Warning: Connection refused. Retrying...", "waiting for SSH") == "waiting for SSH"


def test_progress_updates_are_thinned_to_one_per_ten_percent() -> None:
    throttle = ProgressThrottle()
    lines = [strip_ansi(f"\x1b[KProgress: {p}%") for p in (0, 0, 3, 9, 10, 15, 55, 100)]
    shown = [ln for ln in lines if throttle.wants(ln)]
    assert shown == ["Progress: 0%", "Progress: 10%", "Progress: 55%", "Progress: 100%"]
    assert throttle.wants("==> default: Creating domain with the following settings...")


# -- errors ---------------------------------------------------------------------------------------


def _failed(stderr: str, *, timed_out: bool = False, rc: int = 1) -> CommandFailed:
    result = CommandResult(("vagrant", "up"), rc, "", stderr, 12.0, timed_out=timed_out)
    return CommandFailed(result)


def test_failure_names_the_command_and_shows_the_stderr_tail() -> None:
    err = _failed("\n".join(f"line {i}" for i in range(40)) + "\nThe box 'csghub/debian12' could not be found")
    exc = _failure("up", err)
    assert exc.message.startswith("`vagrant up` failed (exit status 1)")
    assert "line 39" in exc.message and "line 10" not in exc.message
    assert exc.hint == "build and add the base box first: `invoke base-box`"


@pytest.mark.parametrize(
    ("stderr", "hint_part"),
    [
        ("Error while connecting to Libvirt: Failed to connect socket to '/var/run/libvirt/libvirt-sock'",
         "libvirtd -d"),
        ("The provider 'libvirt' could not be found, but was requested to\nback the machine", "apt-get install"),
        ("Name `csghub_default` of domain about to create is already taken. Please try to run", "virsh undefine"),
    ],
)
def test_known_failures_get_a_hint(stderr: str, hint_part: str) -> None:
    hint = _failure("up", _failed(stderr), hint=libvirt_failure_hint).hint
    assert hint is not None and hint_part in hint


@pytest.mark.parametrize(
    ("phase", "advice"),
    [
        ("creating domain", "virsh list --all"),
        ("waiting for IP", "DHCP lease"),
        ("waiting for SSH", "SSH does not answer"),
    ],
)
def test_a_timed_out_up_names_its_phase(phase: str, advice: str) -> None:
    exc = _failure("up", _failed("", timed_out=True, rc=-9), phase=phase, hint=libvirt_failure_hint)
    assert f"timed out after 12 s while {phase}" in exc.message
    assert exc.hint is not None and advice in exc.hint and "vm.boot_timeout" in exc.hint


def test_vagrants_own_boot_timeout_is_recognised() -> None:
    exc = _failure("up", _failed("Timed out while waiting for the machine to boot. This means that"),
                   phase="waiting for SSH")
    assert "while waiting for SSH" in exc.message
    assert exc.hint is not None and "vm.boot_timeout" in exc.hint


def test_ruby_backtrace_frames_are_left_out_of_the_tail() -> None:
    stderr = (
        "/usr/lib/ruby/vendor_ruby/fog/libvirt/requests/compute/list_domains.rb:9:in `lookup_domain_by_uuid': "
        "Call to virDomainLookupByUUID failed: Domain not found (Libvirt::RetrieveError)\n"
        + "".join(f"\tfrom /usr/share/rubygems-integration/all/gems/vagrant-2.3.4/lib/x{i}.rb:{i}:in `call'\n"
                  for i in range(40))
    )
    exc = _failure("up", _failed(stderr), phase="waiting for IP")
    assert "Domain not found" in exc.message
    assert "from /usr/share" not in exc.message
