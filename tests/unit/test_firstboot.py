"""The first-boot decisions, run for real: the guest's bash functions with canned inputs.

``provision/files/firstboot/lib.sh`` holds the pure functions (network detection, domain,
banner, readiness counts, passwords); these tests source it with bash on the build host.
The scripts' argument handling runs here too; everything that needs a real guest is in
tests/vm/test_seal_firstboot.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from appliance.scripts import discover_scripts

ROOT = Path(__file__).resolve().parents[2]
FILES = ROOT / "provision" / "files" / "firstboot"
LIB = FILES / "lib.sh"
STACK_LIB = ROOT / "provision" / "files" / "csghub" / "lib.sh"  # the csghub step's guest library
CHART_SCHEMA = ROOT.parent / "shared" / "csghub-chart" / "2.4.0" / "values.schema.json"
SCRIPTS = ["csghub-firstboot", "csghub-banner", "csghub-status", "csghub-reconfigure", "csghub-ready", "lib.sh",
           "secrets.sh"]


def bash(snippet: str, stdin: str = "", env: dict[str, str] | None = None, check: bool = True,
         ) -> subprocess.CompletedProcess[str]:
    """Run ``snippet`` in bash after sourcing lib.sh (with its state paths in a temp dir)."""
    full_env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", **(env or {})}
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; . {LIB}; {snippet}"],
        input=stdin, capture_output=True, text=True, env=full_env, check=check, timeout=30,
    )


NAT_ONLY = """\
1: lo    inet 127.0.0.1/8 scope host lo\\ valid_lft forever preferred_lft forever
2: enp0s3    inet 10.0.2.15/24 brd 10.0.2.255 scope global dynamic enp0s3\\ valid_lft 86391sec preferred_lft 86391sec
"""
NAT_AND_HOSTONLY = NAT_ONLY + """\
3: enp0s8    inet 192.168.56.10/24 brd 192.168.56.255 scope global enp0s8\\ valid_lft forever preferred_lft forever
"""
BRIDGED_WITH_CLUSTER = """\
2: ens3    inet 192.168.1.77/24 brd 192.168.1.255 scope global dynamic ens3\\ valid_lft 3600sec preferred_lft 3600sec
4: dummy-csghub    inet 10.254.254.1/24 scope global dummy-csghub\\ valid_lft forever preferred_lft forever
5: cni0    inet 10.42.0.1/24 brd 10.42.0.255 scope global cni0\\ valid_lft forever preferred_lft forever
6: flannel.1    inet 10.42.0.0/32 scope global flannel.1\\ valid_lft forever preferred_lft forever
"""
ONLY_CLUSTER = """\
4: dummy-csghub    inet 10.254.254.1/24 scope global dummy-csghub\\ valid_lft forever preferred_lft forever
7: eth0    inet 169.254.3.4/16 scope global eth0\\ valid_lft forever preferred_lft forever
"""


@pytest.mark.parametrize(
    ("ip_output", "expected"),
    [
        (NAT_ONLY, "nat 10.0.2.15"),
        # VirtualBox NAT + host-only: NAT stays the default (it always works from the host).
        (NAT_AND_HOSTONLY, "nat 10.0.2.15"),
        # The node address, CNI bridge and flannel are the cluster's, never an access address.
        (BRIDGED_WITH_CLUSTER, "address 192.168.1.77"),
        (ONLY_CLUSTER, "none -"),
        ("", "none -"),
    ],
    ids=["nat", "nat+hostonly", "bridged+cluster", "cluster-only", "nothing"],
)
def test_detect_access(ip_output: str, expected: str) -> None:
    assert bash("detect_access 10.254.254.1", stdin=ip_output).stdout.strip() == expected


@pytest.mark.parametrize(
    ("conf", "detected", "expected"),
    [
        ("auto ''", "nat 10.0.2.15", "nat 10.0.2.15"),
        ("auto ''", "address 192.168.56.10", "address 192.168.56.10"),
        ("address 192.168.56.10", "nat 10.0.2.15", "address 192.168.56.10"),
        ("address ''", "address 192.168.1.5", "address 192.168.1.5"),
        ("nat ''", "address 192.168.1.5", "nat 192.168.1.5"),
        ("nat ''", "none -", "nat 10.0.2.15"),
    ],
)
def test_choose_access_pinned_mode_wins(conf: str, detected: str, expected: str) -> None:
    assert bash(f"choose_access {conf} {detected}").stdout.strip() == expected


@pytest.mark.parametrize(
    ("mode", "address", "configured", "domain"),
    [
        ("nat", "10.0.2.15", "csghub.localhost", "csghub.localhost"),
        ("none", "-", "csghub.localhost", "csghub.localhost"),
        ("address", "192.168.56.10", "csghub.localhost", "csghub.192.168.56.10.nip.io"),
        # A domain chosen at build time is the owner's DNS name: kept in every mode.
        ("address", "192.168.56.10", "hub.example.org", "hub.example.org"),
        ("nat", "10.0.2.15", "hub.example.org", "hub.example.org"),
        ("address", "not-an-ip", "csghub.localhost", "csghub.localhost"),
    ],
)
def test_domain_for(mode: str, address: str, configured: str, domain: str) -> None:
    assert bash(f"domain_for {mode} {address} {configured}").stdout.strip() == domain


@pytest.mark.parametrize(
    ("args", "line"),
    [
        ("absent ''", "CSGHub stack not installed in this image"),
        # Before csghub-ready wrote its first line.
        ("installed ''", "CSGHub: starting (0/?): waiting for the cluster"),
        ("installed 'starting (3/11): waiting for deployment csghub/csghub-server'",
         "CSGHub: starting (3/11): waiting for deployment csghub/csghub-server"),
        ("installed ready", "CSGHub: ready"),
        ("installed 'failed: job csghub/csghub-server-migrate failed — sudo k3s kubectl -n csghub logs "
         "job/csghub-server-migrate; then sudo csghub-status --retry'",
         "CSGHub: failed: job csghub/csghub-server-migrate failed — sudo k3s kubectl"),
    ],
)
def test_status_line_shows_the_gates_state(args: str, line: str) -> None:
    assert bash(f"status_line {args}").stdout.startswith(line)


def test_gather_banner_reads_the_gates_state_file(tmp_path: Path) -> None:
    state = tmp_path / "readiness"
    env = {"CSGHUB_ETC": str(tmp_path), "CSGHUB_STATE": str(tmp_path), "CSGHUB_READINESS": str(state)}
    fake = "stack_installed() { true; }; login_password_current() { :; };"
    assert bash(f"{fake} gather_banner; echo \"$STATUS\"", env=env).stdout.strip() == (
        "CSGHub: starting (0/?): waiting for the cluster")
    state.write_text("failed: the Helm release csghub/csghub did not install — x; then sudo csghub-status --retry\n")
    out = bash(f"{fake} gather_banner; render_banner", env=env).stdout
    line = "  CSGHub: failed: the Helm release csghub/csghub did not install — x; then sudo csghub-status --retry"
    assert line in out


BANNER_VARS = {
    "PRODUCT": "CSGHub appliance", "VERSION": "2.4.0",
    "STATUS": "CSGHub: starting (3/11): waiting for deployment csghub/csghub-server",
    "MODE": "nat", "ADDRESS": "10.0.2.15", "URL": "http://csghub.localhost:30080", "STACK": "installed",
    "ADMIN_USER": "root", "LOGIN_USER": "csghub", "LOGIN_PASSWORD": "abcde-fghij-kmnpq-rstuv",
}


def test_banner_shows_url_status_admin_and_login() -> None:
    text = bash("render_banner", env=BANNER_VARS).stdout
    assert text.startswith("CSGHub appliance 2.4.0\n")
    assert "CSGHub: starting (3/11): waiting for deployment csghub/csghub-server" in text
    assert "http://csghub.localhost:30080" in text
    assert "CSGHub admin user:    root" in text
    assert "sudo csghub-status --admin-password" in text
    assert "user csghub" in text and "abcde-fghij-kmnpq-rstuv" in text


def test_banner_without_stack_is_honest_and_keeps_login() -> None:
    env = {**BANNER_VARS, "STACK": "absent", "STATUS": "CSGHub stack not installed in this image (...)"}
    text = bash("render_banner", env=env).stdout
    assert "CSGHub stack not installed in this image" in text
    assert "admin" not in text
    assert "Network: nat, VM address 10.0.2.15; CSGHub's URL here would be http://csghub.localhost:30080" in text
    assert "user csghub" in text and "abcde-fghij-kmnpq-rstuv" in text


def test_banner_after_password_change_hides_it() -> None:
    text = bash("render_banner", env={**BANNER_VARS, "LOGIN_PASSWORD": ""}).stdout
    assert "One-time password" not in text and "the one you set" in text


def test_banner_address_mode_names_reconfigure() -> None:
    env = {**BANNER_VARS, "MODE": "address", "ADDRESS": "192.168.56.10",
           "URL": "http://csghub.192.168.56.10.nip.io:30080"}
    text = bash("render_banner", env=env).stdout
    assert "http://csghub.192.168.56.10.nip.io:30080" in text and "csghub-reconfigure" in text


def test_issue_escape_keeps_backslashes_literal() -> None:
    # agetty would expand "\n" in /etc/issue into the hostname.
    assert bash("issue_escape", stdin="a\\nb\n").stdout == "a\\\\nb\n"


def test_passwords_are_random_and_readable() -> None:
    out = bash("for i in 1 2 3 4 5 6 7 8; do new_password; done").stdout.split()
    assert len(set(out)) == 8
    for pw in out:
        assert re.fullmatch(r"[a-km-np-z2-9]{5}(-[a-km-np-z2-9]{5}){3}", pw), pw


def test_tokens_are_random_hex() -> None:
    out = bash("new_token; new_token").stdout.split()
    assert len(out) == 2 and out[0] != out[1]
    assert all(re.fullmatch(r"[0-9a-f]{64}", t) for t in out)


def test_instance_manifest_is_a_helmchartconfig_the_chart_accepts() -> None:
    out = bash("instance_manifest csghub.192.168.56.10.nip.io",
               env={"CSGHUB_HELMCHART_NAME": "csghub", "CSGHUB_HELMCHART_NAMESPACE": "kube-system"}).stdout
    doc = yaml.safe_load(out)
    assert doc["kind"] == "HelmChartConfig" and doc["apiVersion"] == "helm.cattle.io/v1"
    assert doc["metadata"] == {"name": "csghub", "namespace": "kube-system"}
    values = yaml.safe_load(doc["spec"]["valuesContent"])
    assert values["global"]["gateway"]["external"]["domain"] == "csghub.192.168.56.10.nip.io"
    if CHART_SCHEMA.is_file():
        import jsonschema

        jsonschema.Draft7Validator(json.loads(CHART_SCHEMA.read_text())).validate(values)


def test_apply_access_without_stack_records_mode_only(tmp_path: Path) -> None:
    env = {"CSGHUB_STATE": str(tmp_path), "CSGHUB_DOMAIN": "csghub.localhost",
           "K3S_MANIFESTS": str(tmp_path / "manifests")}
    first = bash("stack_installed() { false; }; apply_access nat 10.0.2.15", env=env).stdout
    second = bash("stack_installed() { false; }; apply_access nat 10.0.2.15", env=env).stdout
    assert "changed: access mode nat, address 10.0.2.15, domain csghub.localhost" in first
    assert "ok: access mode nat" in second and "changed:" not in second
    assert "ok: CSGHub stack not installed" in second
    assert (tmp_path / "access.env").read_text() == "MODE=nat\nADDRESS=10.0.2.15\nDOMAIN=csghub.localhost\n"
    assert not (tmp_path / "manifests").exists()


def test_apply_access_domain_change_rewrites_values_and_registries(tmp_path: Path) -> None:
    registries = tmp_path / "registries.yaml"
    registries.write_text('mirrors:\n  "csghub.localhost:30080":\n    endpoint: ["http://csghub.localhost:30080"]\n')
    env = {"CSGHUB_STATE": str(tmp_path), "CSGHUB_DOMAIN": "csghub.localhost",
           "K3S_MANIFESTS": str(tmp_path / "manifests"), "K3S_REGISTRIES": str(registries)}
    # k3s "installed" but not running (as at first boot, before k3s starts).
    fake = "stack_installed() { true; }; systemctl() { return 3; };"
    out = bash(f"{fake} apply_access address 192.168.56.10", env=env).stdout
    assert "domain csghub.192.168.56.10.nip.io" in out
    assert "changed: Helm values for this copy" in out
    assert "now names csghub.192.168.56.10.nip.io" in out
    assert "csghub.localhost" not in registries.read_text()
    manifest = (tmp_path / "manifests" / "csghub-appliance-instance.yaml").read_text()
    assert '"csghub.192.168.56.10.nip.io"' in manifest
    again = bash(f"{fake} apply_access address 192.168.56.10", env=env).stdout
    assert "changed:" not in again


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "wifi"], "--mode 'wifi' is not one of auto, nat, address"),
        (["--address", "300.1.2"], "--address '300.1.2' is not an IPv4 address"),
        (["--mode", "nat", "--address", "192.168.56.10"], "--address goes with --mode address"),
        (["--bogus"], "unknown argument '--bogus'"),
    ],
)
def test_reconfigure_rejects_bad_arguments(args: list[str], message: str) -> None:
    proc = subprocess.run(
        ["bash", str(FILES / "csghub-reconfigure"), *args], capture_output=True, text=True, timeout=30,
        env={"PATH": os.environ["PATH"], "CSGHUB_LIB": str(LIB)},
    )
    assert proc.returncode == 2 and message in proc.stderr


def test_status_rejects_unknown_argument() -> None:
    proc = subprocess.run(
        ["bash", str(FILES / "csghub-status"), "--frobnicate"], capture_output=True, text=True, timeout=30,
        env={"PATH": os.environ["PATH"], "CSGHUB_LIB": str(LIB)},
    )
    assert proc.returncode == 2 and "unknown argument '--frobnicate'" in proc.stderr


def test_step_headers() -> None:
    """firstboot uploads its files; seal is the last step and declares itself final."""
    scripts = {s.name: s for s in discover_scripts()}
    assert scripts["firstboot"].files == ("firstboot", "common")
    assert max(scripts.values(), key=lambda s: s.number).name == "seal"
    assert "# appliance: final" in scripts["seal"].path.read_text().splitlines()[:20]


def test_guest_scripts_are_among_those_shellcheck_checks() -> None:
    # test_lint.py::test_shellcheck_clean runs shellcheck -x with its optional checks on exactly this list; the
    # scripts' `source` lines name source-path=SCRIPTDIR, so the folder shellcheck starts in does not matter.
    from tests.unit.test_lint import provision_shell_scripts

    paths = [FILES / s for s in SCRIPTS] + [ROOT / "provision" / "40-firstboot.sh", ROOT / "provision" / "90-seal.sh"]
    checked = set(provision_shell_scripts())
    assert [p for p in paths if p not in checked] == []


@pytest.mark.parametrize("unit", ["csghub-firstboot.service", "csghub-banner.service", "csghub-banner.timer",
                                  "csghub-ready.service"])
def test_units_are_enabled_and_ordered(unit: str) -> None:
    text = (FILES / unit).read_text()
    assert re.search(r"^\[Install\]\nWantedBy=", text, re.M)
    if unit == "csghub-firstboot.service":
        assert "ConditionPathExists=!/var/lib/csghub-appliance/firstboot.done" in text
        before = re.search(r"^Before=(.*)$", text, re.M)
        assert before and {"ssh.service", "k3s.service"} <= set(before.group(1).split())


def test_apply_access_rewrites_coredns_and_is_finished_after_a_cut(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    # What the csghub step installed for the build's domain (appliance/manifests.py renders it).
    from appliance.config import load_config
    from appliance.manifests import manifest_yaml, render_manifests

    build = load_config(None, [], cwd=tmp_path)
    (manifests / "coredns-custom.yaml").write_text(manifest_yaml(render_manifests(build)["coredns-custom.yaml"]))
    (manifests / "coredns-custom.yaml").chmod(0o600)  # as 30-csghub.sh installs it (mode counts as a change)
    env = {"CSGHUB_STATE": str(tmp_path), "CSGHUB_DOMAIN": "csghub.localhost", "K3S_NODE_IP": build.k3s.node_ip,
           "K3S_MANIFESTS": str(manifests), "K3S_REGISTRIES": str(tmp_path / "none.yaml"),
           "CSGHUB_STACK_LIB": str(STACK_LIB)}
    fake = "stack_installed() { true; }; systemctl() { return 3; };"
    # Same domain as the build: nothing in the cluster changes.
    nat = bash(f"{fake} apply_access nat 10.0.2.15", env=env).stdout
    assert "ok: in-cluster DNS already answers for csghub.localhost" in nat
    # A cut after the DNS rewrite but before access.env: the rerun still sees the old domain
    # recorded and finishes (writes access.env), and nothing is written twice.
    cut = bash(f"{fake} install_if_changed() {{ [[ $3 == */access.env ]] && kill -KILL $$ $BASHPID;"
               f" cat >\"$3\"; FILE_CHANGED=yes; }};"
               f" apply_access address 192.168.56.10", env=env, check=False)
    assert cut.returncode == -9  # killed, like a power cut
    new_domain = load_config(None, ["csghub.domain=csghub.192.168.56.10.nip.io"], cwd=tmp_path)
    assert (manifests / "coredns-custom.yaml").read_text() == manifest_yaml(
        render_manifests(new_domain)["coredns-custom.yaml"])
    again = bash(f"{fake} apply_access address 192.168.56.10", env=env).stdout
    assert "ok: in-cluster DNS already answers for csghub.192.168.56.10.nip.io" in again
    assert "changed: access mode address, address 192.168.56.10, domain csghub.192.168.56.10.nip.io" in again


def test_status_admin_password_is_this_copys(tmp_path: Path) -> None:
    """`csghub-status --admin-password` shows what first boot made (secrets.sh), without asking the cluster."""
    if os.geteuid() != 0:
        pytest.skip("csghub-status re-runs itself through sudo unless root")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "secrets.env").write_text("# made at first boot\nCSGHUB_ADMIN_PASSWORD=Abc123def456ghi789jkl012\n")
    proc = subprocess.run(
        ["bash", str(FILES / "csghub-status"), "--admin-password"], capture_output=True, text=True, timeout=30,
        env={"PATH": os.environ["PATH"], "CSGHUB_LIB": str(LIB), "CSGHUB_STATE": str(tmp_path),
             "CSGHUB_ETC": str(tmp_path / "etc")},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Abc123def456ghi789jkl012\n"


def _dmi_type11(tmp_path: Path, *strings: str) -> Path:
    """A /sys/firmware/dmi/entries tree holding one SMBIOS type-11 (OEM strings) entry, as the kernel shows it:
    the 5-byte formatted area (type 11, length 5, handle, count), then NUL-terminated strings, then a NUL."""
    entry = tmp_path / "dmi" / "11-0"
    entry.mkdir(parents=True)
    raw = bytes([11, 5, 0x0A, 0x8C, len(strings)]) + b"".join(s.encode() + b"\0" for s in strings) + b"\0"
    (entry / "raw").write_bytes(raw)
    return tmp_path / "dmi"


def test_first_boot_nonce_comes_from_the_oem_string_and_only_a_clean_one(tmp_path: Path) -> None:
    nonce = "0123456789abcdef0123456789abcdef"
    dmi = _dmi_type11(tmp_path, "other=1", f"csghub-appliance-boot-nonce={nonce}")
    env = {"CSGHUB_DMI_ENTRIES": str(dmi), "CSGHUB_STATE": str(tmp_path / "state")}
    assert bash("boot_nonce", env=env).stdout.strip() == nonce
    bad = _dmi_type11(tmp_path / "bad", f"csghub-appliance-boot-nonce={nonce}; rm -rf /")
    assert bash("boot_nonce", env={**env, "CSGHUB_DMI_ENTRIES": str(bad)}).stdout.strip() == "none"
    assert bash("boot_nonce", env={**env, "CSGHUB_DMI_ENTRIES": str(tmp_path / "none")}).stdout.strip() == "none"
    # What the banner prints: the recorded nonce, "unknown" when nothing (or junk) was recorded.
    (tmp_path / "state").mkdir()
    assert bash("first_boot_nonce", env=env).stdout.strip() == "unknown"
    (tmp_path / "state" / "firstboot.nonce").write_text(nonce + "\n")
    assert bash("first_boot_nonce", env=env).stdout.strip() == nonce
    (tmp_path / "state" / "firstboot.nonce").write_text("x" * 10)
    assert bash("first_boot_nonce", env=env).stdout.strip() == "unknown"


def _run_ready(tmp_path: Path, *, kept_helmchart: bool) -> subprocess.CompletedProcess[str]:
    """csghub-ready, for real, in a private mount namespace whose /usr/local holds a k3s that never answers."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a private /usr/local")
    etc, state = tmp_path / "etc", tmp_path / "state"
    etc.mkdir()
    state.mkdir()
    (etc / "appliance.env").write_text("CSGHUB_HTTP_PORT=30080\nK3S_NODE_IP=127.0.0.1\n")
    wrapper = (
        "set -e; mount -t tmpfs tmpfs /usr/local; mkdir -p /usr/local/bin /usr/local/share/csghub-appliance; "
        "printf '#!/bin/sh\\nexit 1\\n' >/usr/local/bin/k3s; chmod 755 /usr/local/bin/k3s; "
        + ("echo 'kind: HelmChart' >/usr/local/share/csghub-appliance/csghub-helmchart.yaml; "
           if kept_helmchart else "")
        + f"exec bash {FILES / 'csghub-ready'}")
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "CSGHUB_LIB": str(LIB),
           "CSGHUB_READINESS_LIB": str(ROOT / "provision" / "files" / "common" / "readiness.sh"),
           "CSGHUB_ETC": str(etc), "CSGHUB_STATE": str(state), "CSGHUB_READINESS": str(tmp_path / "run" / "readiness"),
           "CSGHUB_READY_TIMEOUT": "2", "CSGHUB_POLL_SECONDS": "1", "CSGHUB_SERIAL": str(tmp_path / "no-serial"),
           "K3S_MANIFESTS": str(tmp_path / "manifests")}
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", wrapper],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.mark.parametrize("kept_helmchart", [False, True], ids=["gate-times-out", "release-not-handed-over"])
def test_a_failed_gate_does_not_fail_the_unit(tmp_path: Path, kept_helmchart: bool) -> None:
    """The gate's "failed" is CSGHub's state (console, banner), not the service's: csghub-ready ends with the status
    its unit counts as success, so `systemctl is-system-running` is not "degraded" because CSGHub did not come up."""
    proc = _run_ready(tmp_path, kept_helmchart=kept_helmchart)
    unit = (FILES / "csghub-ready.service").read_text()
    success = re.search(r"^SuccessExitStatus=(.*)$", unit, re.M)
    assert success is not None
    assert proc.returncode != 0 and str(proc.returncode) in success.group(1).split(), (proc.returncode, proc.stderr)
    status = (tmp_path / "run" / "readiness").read_text()
    assert status.startswith("failed: ")
    if kept_helmchart:
        assert "release was not handed to k3s" in status and "precreated.yaml is missing" in status
    else:
        assert "the cluster API not ready in time" in status
    # A fault of the script itself still fails the unit.
    bad = subprocess.run(["bash", str(FILES / "csghub-ready")], capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ["PATH"], "CSGHUB_LIB": str(tmp_path / "missing-lib.sh")}, check=False)
    assert bad.returncode != 0 and str(bad.returncode) not in success.group(1).split()
