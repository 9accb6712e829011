"""The step runner on a real libvirt VM (one boot shared by this module's tests).

The VM runs the real ``provision/00-base.sh`` plus two small steps of the test's own: one
that declares and records an input (``env=K3S_VERSION``), one that declares ``reboot-after``.
The tests run in file order: first provisioning (with a real reboot), a rerun that skips
everything, 00-base.sh run again by name (no ``changed:`` lines), a changed input (rerunning
the step that declares it and the one after it, not base), and a changed middle step. Last, with the
guest's outbound network cut, the real csghub step against the k3s stand-in: it completes and pulls nothing.
"""

from __future__ import annotations

import contextlib
import getpass
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance import vm as lifecycle
from appliance.config import PROJECT_ROOT, ApplianceConfig, load_config
from appliance.guest import NEED_CHART, NEED_IMAGE_SET, NEED_MANIFESTS
from appliance.needs import GuestUpload
from appliance.providers.registry import provider_for
from appliance.scripts import GUEST_PROVISION_DIR
from appliance.ssh import RemoteSession
from appliance.steps import DEFAULT_STATE_DIR, Options, Provisioner

pytestmark = pytest.mark.vm

UP_TIMEOUT = 900
REBOOT_TIMEOUT = 600

PROBE = """#!/usr/bin/env bash
# Test step: records the input it was given.
# appliance: env=K3S_VERSION
set -euo pipefail
if [[ "$(cat /var/tmp/probe.k3s 2>/dev/null)" == "$K3S_VERSION" ]]; then
    echo "ok: probe already records $K3S_VERSION"
else
    printf '%s' "$K3S_VERSION" > /var/tmp/probe.k3s
    echo "changed: probe records $K3S_VERSION"
fi
echo "$K3S_VERSION" >> /var/tmp/probe.runs
"""
REBOOT = """#!/usr/bin/env bash
# Test step: asks the runner for a reboot afterwards.
# appliance: reboot-after
set -euo pipefail
cat /proc/sys/kernel/random/boot_id >> /var/tmp/reboot.runs
echo "changed: reboot requested"
"""


@dataclass
class ProvisionedVM:
    make_cfg: Callable[..., ApplianceConfig]
    session: RemoteSession
    scripts: Path

    def provisioner(self, *sets: str) -> Provisioner:
        return Provisioner(self.make_cfg(*sets), self.session, directory=self.scripts, reboot_timeout=REBOOT_TIMEOUT)

    def run(self, *sets: str, **options: object) -> dict[str, str]:
        report = self.provisioner(*sets).run(Options(**options))  # type: ignore[arg-type]
        return {s.name: s.outcome for s in report.steps}

    def guest(self, command: str) -> str:
        return self.session.run(command, timeout=120).stdout


@pytest.fixture(scope="module")
def vm(libvirt_env: Any, base_box: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProvisionedVM]:
    tmp = tmp_path_factory.mktemp("provision-vm")

    def make_cfg(*sets: str) -> ApplianceConfig:
        # The settings of conftest's vm_config (a per-test fixture), for a VM this module shares.
        return load_config(
            None,
            [
                f"vm.name={libvirt_env.vm_prefix}provision",
                "vm.cpus=2",
                "vm.memory_mb=1024",
                "vm.disk_gb=8",
                "vm.boot_timeout=300",
                "provision.skip={k3s,csghub}",
                "network.forwarded_ports={}",
                f"libvirt.uri={libvirt_env.uri}",
                f"libvirt.storage_pool={libvirt_env.pool}",
                f"libvirt.management_network_name={libvirt_env.network}",
                f"libvirt.management_network_address={libvirt_env.network_cidr}",
                "libvirt.management_network_mode=none",
                f"output.build_dir={tmp / 'build'}",
                *sets,
            ],
            "libvirt",
            cwd=tmp,
        )

    scripts = tmp / "provision"
    scripts.mkdir()
    shutil.copy(PROJECT_ROOT / "provision" / "00-base.sh", scripts / "00-base.sh")
    # 00-base.sh declares files=common (the shared helpers it sources).
    shutil.copytree(PROJECT_ROOT / "provision" / "files" / "common", scripts / "files" / "common")
    (scripts / "10-probe.sh").write_text(PROBE)
    (scripts / "20-reboot.sh").write_text(REBOOT)
    cfg = make_cfg()
    try:
        lifecycle.up(cfg, provider_for(cfg), timeout=UP_TIMEOUT, render_first=True)
        endpoint = lifecycle.ssh_config(cfg, provider_for(cfg))
        with RemoteSession.from_config(cfg, endpoint) as session:
            yield ProvisionedVM(make_cfg, session, scripts)
    finally:
        lifecycle.destroy(cfg, provider_for(cfg))


def test_first_provisioning_applies_base_settings_and_survives_a_reboot(vm: ProvisionedVM) -> None:
    boot_before = vm.session.boot_id()
    assert vm.run() == {"base": "changed", "probe": "changed", "reboot": "changed"}
    assert vm.session.boot_id() != boot_before, "the reboot-after step did not reboot the guest"
    # What 00-base.sh set must hold after the reboot: modules and sysctls come back at boot.
    assert vm.guest("ls -d /sys/module/br_netfilter /sys/module/overlay").split() == [
        "/sys/module/br_netfilter", "/sys/module/overlay"
    ]
    values = vm.guest(
        "sysctl -n net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables fs.inotify.max_user_instances "
        "fs.inotify.max_user_watches"
    ).split()
    assert values == ["1", "1", "8192", "524288"]
    assert vm.guest("swapon --show --noheadings") == ""
    assert vm.guest("systemctl is-active systemd-timesyncd").strip() == "active"
    markers = vm.guest(f"ls {DEFAULT_STATE_DIR}").split()
    assert markers == ["base.done", "probe.done", "reboot.done"]
    assert vm.guest(f"ls {GUEST_PROVISION_DIR}").split() == ["00-base.sh", "10-probe.sh", "20-reboot.sh", "files"]
    common = vm.guest(f"ls {GUEST_PROVISION_DIR}/files/common").split()
    assert {"run-step.sh", "lib.sh"} <= set(common), common  # the marker writer and the shared shell helpers
    log = vm.make_cfg().build_dir / "logs" / "00-base.log"
    assert "changed: wrote /etc/sysctl.d/60-csghub-appliance.conf" in log.read_text()


def test_rerun_skips_every_step_quickly(vm: ProvisionedVM) -> None:
    vm.session.run("true")  # the connection is up: what follows is the no-op cost itself
    provisioner = vm.provisioner()
    started = time.monotonic()
    report = provisioner.run(Options())
    elapsed = time.monotonic() - started
    assert [s.outcome for s in report.steps] == ["skipped"] * 3
    assert all(s.reason == "done, inputs unchanged" for s in report.steps)
    print(f"\nno-op provision on a provisioned VM, connection up: {elapsed:.2f} s")


def test_base_step_run_again_changes_nothing(vm: ProvisionedVM) -> None:
    report = vm.provisioner().run(Options(only="base"))
    base = report.steps[0]
    assert base.outcome == "no changes", base.changes
    text = (vm.make_cfg().build_dir / "logs" / "00-base.log").read_text()
    assert "changed:" not in text
    assert "ok: packages" in text and "ok: no active swap" in text


def test_changed_input_reruns_the_steps_that_declare_it(vm: ProvisionedVM) -> None:
    boot_before = vm.session.boot_id()
    # Only probe declares K3S_VERSION: base keeps its marker; reboot follows probe, which reran.
    plan = {p.name: (p.run, p.reason) for p in vm.provisioner("k3s.version=v1.30.0+k3s1").plan(Options())}
    assert plan == {
        "base": (False, "done, inputs unchanged"),
        "probe": (True, "inputs changed: env:K3S_VERSION"),
        "reboot": (True, "follows probe, which runs"),
    }
    outcomes = vm.run("k3s.version=v1.30.0+k3s1")
    assert outcomes == {"base": "skipped", "probe": "changed", "reboot": "changed"}
    assert vm.guest("cat /var/tmp/probe.k3s") == "v1.30.0+k3s1"
    assert vm.session.boot_id() != boot_before


def test_changed_middle_step_reruns_it_and_the_later_ones_only(vm: ProvisionedVM) -> None:
    (vm.scripts / "10-probe.sh").write_text(PROBE + "# edited\n")
    plan = {p.name: (p.run, p.reason) for p in vm.provisioner("k3s.version=v1.30.0+k3s1").plan(Options())}
    assert plan == {
        "base": (False, "done, inputs unchanged"),
        "probe": (True, "inputs changed: script"),
        "reboot": (True, "follows probe, which runs"),
    }
    runs_before = len(vm.guest("cat /var/tmp/probe.runs").split())
    outcomes = vm.run("k3s.version=v1.30.0+k3s1")
    assert outcomes == {"base": "skipped", "probe": "no changes", "reboot": "changed"}
    assert len(vm.guest("cat /var/tmp/probe.runs").split()) == runs_before + 1


# -- the csghub step with the guest's outbound network cut (issue 22: the guest never pulls) ----------
#
# Last in the module: it changes the guest (a k3s stand-in at /usr/local/bin/k3s, the gate's /etc/hosts line)
# and cuts its network for its own duration. The cut is policy routing, with iproute2 (the base box has no
# nftables or iptables): a rule before the main table sends every packet the guest originates to `prohibit`,
# except TCP from port 22 (sshd's side of the SSH session the build holds open, and of any new one the host
# opens). Packets to the guest's own addresses never reach these rules (the `local` table comes first).
# What the step's readiness gate must reach (the gateway's and gitlab-sshd's stand-ins, on the host's loopback)
# it reaches through SSH remote forwards: the guest connects to its own loopback, sshd carries the bytes
# back over the session the host opened. That is inbound networking the build already has, not a route out.

CUT_PREF = 31000  # below the main table's 32766
CUT_RULES = (f"pref {CUT_PREF} ipproto tcp sport 22 lookup main", f"pref {CUT_PREF + 1} prohibit")
STAND_IN_DIR = "/opt/k3s-stand-in"
STAND_IN_STATE = "/var/lib/k3s-stand-in"
# A real Python for tests/data/fake_k3s.py: the base box has none. The host's Debian 12 Python (the files of
# these installed packages; host and guest are both bookworm) is copied beside the stand-in rather than installed,
# so the guest's package set stays the appliance's.
GUEST_PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib")
GATE_HTTP_PORT, GATE_GIT_SSH_PORT = 30080, 30022  # the chart's NodePorts (the config's default forwards)


def _cut_network(vm: ProvisionedVM) -> None:
    for family in ("-4", "-6"):
        for rule in CUT_RULES:
            vm.guest(f"ip {family} rule add {rule}")


def _restore_network(vm: ProvisionedVM) -> None:
    for family in ("-4", "-6"):
        for rule in reversed(CUT_RULES):  # `prohibit` first: while it stands alone, SSH's replies are refused too
            vm.session.run(f"ip {family} rule del {rule}", check=False, timeout=60)


def _forward_to_host(session: RemoteSession, ports: dict[int, int]) -> None:
    """``ssh -R 127.0.0.1:GUEST:127.0.0.1:HOST`` for each ``GUEST: HOST`` of ``ports``, on the session's transport.

    Paramiko keeps one handler for all of a transport's remote forwards: it picks the host port by the guest's."""
    import socket
    import threading

    def pump(src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for end in (src, dst):
                with contextlib.suppress(OSError):
                    end.close()

    def handler(channel: Any, _origin: object, server: tuple[str, int]) -> None:
        upstream = socket.create_connection(("127.0.0.1", ports[server[1]]), timeout=10)
        upstream.settimeout(None)
        threading.Thread(target=pump, args=(channel, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, channel), daemon=True).start()

    for guest_port in ports:
        session.transport.request_port_forward("127.0.0.1", guest_port, handler=handler)


def _registry_probe(vm: ProvisionedVM, url: str, ca: str) -> tuple[int, str]:
    """curl's exit status and the headers of GET ``url`` from the guest (the OCI manifest Accept header)."""
    result = vm.session.run(
        f"curl -sS -o /dev/null -D - --max-time 15 --noproxy '*' --cacert {ca} "
        f"-H 'Accept: application/vnd.oci.image.manifest.v1+json' {url}",
        check=False, timeout=60, sudo=False)
    return result.exit_status, result.stdout + result.stderr


def test_csghub_step_completes_with_the_guests_network_cut_and_pulls_nothing(
        vm: ProvisionedVM, libvirt_env: Any, tmp_path: Path) -> None:
    import ipaddress
    import re
    import secrets
    import tarfile

    from appliance.artifacts import GUEST_ARTIFACT_DIR
    from appliance.imagecache import GUEST_IMAGE_ARCHIVE, write_archive
    from appliance.images import GUEST_IMAGE_LIST, helm_template, image_set
    from appliance.manifests import write_manifests
    from appliance.run import run
    from appliance.upload import upload_file
    from appliance.values import generate_values
    from tests.chart import CHART_DIR, helm_binary
    from tests.csghub_stand_in import Gateway, GitlabSshd, make_copy
    from tests.registry import Registry, image_blobs, registry_missing, write_layout

    started = time.monotonic()
    # The sizes a CSGHub build needs (the chart's values are computed from them); the VM running is not resized:
    # only the values, the manifests and the step's environment come from this config.
    cfg = vm.make_cfg("provision.skip=[k3s]", "k3s.node_ip=127.0.0.1", "vm.cpus=4", "vm.memory_mb=8192",
                      "vm.disk_gb=200",
                      f"network.forwarded_ports=[{{name: http, guest: {GATE_HTTP_PORT}, host: 30080}}, "
                      f"{{name: git-ssh, guest: {GATE_GIT_SSH_PORT}, host: 30022}}]",
                      "provision.timeouts={csghub: 300}")  # a gate that never passes fails here, not in 90 min
    helm = helm_binary()
    assert helm is not None and CHART_DIR.is_dir(), "helm and the vendored chart 2.4.0 are needed (scripts/setup.sh)"
    assert registry_missing() is None, registry_missing()
    wanted = [e.name for e in image_set(helm_template(helm, CHART_DIR, generate_values(cfg),
                                                      k3s_version=cfg.k3s.version))]

    # The images as the build delivers them: one OCI archive (appliance/imagecache.py's write_archive, which the
    # build's build_archive calls), every name of the real chart's set a tiny real image.
    manifest, blobs = image_blobs([{"stand-in": b"tiny\n"}])
    layout = write_layout(tmp_path / "layout", manifest, blobs)
    archive = tmp_path / "images.tar"
    write_archive(layout, [(name, manifest.digest) for name in wanted], archive)
    image_list = tmp_path / "images.txt"
    image_list.write_text("".join(f"{name} {manifest.digest}\n" for name in wanted))
    chart = tmp_path / "csghub-2.4.0.tgz"
    chart.write_bytes(b"chart archive")  # the k3s stand-in installs no chart; the step only places it
    uploads = [GuestUpload(NEED_CHART, chart, f"{GUEST_ARTIFACT_DIR}/csghub-2.4.0.tgz"),
               *(GuestUpload(NEED_MANIFESTS, local, guest) for local, guest in write_manifests(cfg)),
               GuestUpload(NEED_IMAGE_SET, image_list, GUEST_IMAGE_LIST),
               GuestUpload(NEED_IMAGE_SET, archive, GUEST_IMAGE_ARCHIVE)]

    # A real registry serving one of those images, on the libvirt network's host address (the guest's way out).
    network = ipaddress.ip_network(libvirt_env.network_cidr)
    host_ip = next(ipaddress.ip_interface(m).ip for m in re.findall(
        r"inet (\S+)", run(["ip", "-o", "-4", "addr", "show"]).stdout) if ipaddress.ip_interface(m).ip in network)
    registry = Registry(tmp_path / "registry", address=str(host_ip))
    registry.start()
    gateway = git_sshd = None
    try:
        repo, tag = "opencsghq/csghub-portal", "v2.4.0-ce"
        assert f"docker.io/{repo}:{tag}" in wanted
        registry.push_layout(layout, f"{repo}:{tag}")
        upload_file(vm.session, registry.ca_dir / "ca.crt", "/tmp/registry-ca.crt")
        url = f"https://{registry.host}/v2/{repo}/manifests/{tag}"
        code, answer = _registry_probe(vm, url, "/tmp/registry-ca.crt")
        assert code == 0 and " 200 " in answer.splitlines()[0], answer
        assert f"docker-content-digest: {manifest.digest}" in answer.lower(), answer  # the guest could pull it

        _cut_network(vm)
        log_at_cut = registry.log_size()
        try:
            code, answer = _registry_probe(vm, url, "/tmp/registry-ca.crt")
            assert code == 7, answer  # curl: "Failed to connect": the guest has no way out
            assert vm.session.run(f"timeout 5 bash -c 'exec 3<>/dev/tcp/{host_ip}/{registry.port}'",
                                  check=False, timeout=60, sudo=False).exit_status != 0

            # Everything from here on reaches the guest over the SSH session only.
            python_files = [Path(f) for f in run(["dpkg", "-L", *GUEST_PYTHON_PACKAGES]).stdout.splitlines()
                            if Path(f).is_symlink() or Path(f).is_file()]
            state = tmp_path / "state"
            state.mkdir()
            copy = make_copy(secrets.token_urlsafe(12), secrets.token_urlsafe(12))
            files = {
                "workloads": ["Deployment csghub/csghub-portal 1 1"],
                "httproutes": ["csghub.localhost", "casdoor.csghub.localhost"],
                "pod_images": [f"{repo}:{tag}"],
                "pullable": wanted,  # the stand-in would serve any pull: none may be asked for
                "jobs": ["csghub/csghub-server-migrate Complete=True,SuccessCriteriaMet=True,"],
                **copy.cluster_state(),
            }
            for name, content in files.items():
                (state / name).write_text("".join(f"{line}\n" for line in content))
            bundle = tmp_path / "k3s-stand-in.tar"
            with tarfile.open(bundle, "w") as tar:
                for path in python_files:
                    tar.add(path, f"python{path}", recursive=False)
                tar.add(PROJECT_ROOT / "tests" / "data" / "fake_k3s.py", "fake_k3s.py")
                tar.add(state, "state")
            upload_file(vm.session, bundle, "/tmp/k3s-stand-in.tar")
            vm.guest(
                f"set -e; rm -rf {STAND_IN_DIR} {STAND_IN_STATE}; mkdir -p {STAND_IN_DIR}; "
                f"tar -xf /tmp/k3s-stand-in.tar -C {STAND_IN_DIR}; "
                f"mv {STAND_IN_DIR}/state {STAND_IN_STATE}; install -d /usr/local/bin; "
                f"printf '#!/bin/sh\\nFAKE_K3S_STATE={STAND_IN_STATE} exec {STAND_IN_DIR}/python/usr/bin/python3.11 "
                f"{STAND_IN_DIR}/fake_k3s.py \"$@\"\\n' > /usr/local/bin/k3s; chmod 0755 /usr/local/bin/k3s"
            )
            gateway = Gateway(copy.stand_in())
            # gitlab-sshd: a real sshd that asks the stand-in's csghub-server whose key it is and serves git.
            git_sshd = GitlabSshd(tmp_path / "gitlab-sshd", gateway.stand_in, gateway.port,
                                  gateway.stand_in.gitaly_jwt_secret)
            _forward_to_host(vm.session, {GATE_HTTP_PORT: gateway.port, GATE_GIT_SSH_PORT: git_sshd.port})

            scripts = tmp_path / "provision"
            scripts.mkdir()
            shutil.copy(PROJECT_ROOT / "provision" / "30-csghub.sh", scripts / "30-csghub.sh")
            for support in ("common", "csghub"):
                shutil.copytree(PROJECT_ROOT / "provision" / "files" / support, scripts / "files" / support)
            # The gate clones over SSH as gitlab-sshd's user `git`; the stand-in is a real OpenSSH sshd on
            # this host, which logs in real users only, so the gate's copy here logs in as the test's own
            # user (the unit tier sets GATE_GIT_SSH_USER the same way; the step runner passes no such knob).
            gate = scripts / "files" / "common" / "readiness.sh"
            default = "GATE_GIT_SSH_USER=${GATE_GIT_SSH_USER:-git}"
            assert default in gate.read_text()
            as_tester = f"GATE_GIT_SSH_USER=${{GATE_GIT_SSH_USER:-{getpass.getuser()}}}"
            gate.write_text(gate.read_text().replace(default, as_tester))
            step_started = time.monotonic()
            report = Provisioner(cfg, vm.session, directory=scripts, uploads=uploads).run(Options())
            step_seconds = time.monotonic() - step_started
            assert [(s.name, s.outcome) for s in report.steps] == [("csghub", "changed")]
            text = (cfg.build_dir / "logs" / "30-csghub.log").read_text()
            assert f"progress: importing {len(wanted)} image(s) from {GUEST_IMAGE_ARCHIVE}" in text
            assert f"ok: all {len(wanted)} images of the declared set are stored and pinned" in text
            assert "ok: CSGHub is ready" in text
            assert "ok: the cluster runs only images of the declared set" in text
            # No pull was attempted, and the guest's store holds exactly the set, from the archive.
            assert vm.guest(f"test -e {STAND_IN_STATE}/pulls && echo pulled || echo none").strip() == "none"
            assert "crictl" not in vm.guest(f"cat {STAND_IN_STATE}/calls.log")
            assert sorted(vm.guest(f"cat {STAND_IN_STATE}/store").split()) == sorted(wanted)
            # Still cut at the end, and the registry saw nothing from the guest after the cut.
            assert _registry_probe(vm, url, "/tmp/registry-ca.crt")[0] == 7
            after_cut = (registry.base / "registry.log").read_bytes()[log_at_cut:].decode(errors="replace")
            assert vm.session.endpoint.host not in after_cut, after_cut
        finally:
            _restore_network(vm)
        assert _registry_probe(vm, url, "/tmp/registry-ca.crt")[0] == 0  # the cut was the rules, and only them
        print(f"\ncsghub step with the network cut: {step_seconds:.1f} s; "
              f"whole test {time.monotonic() - started:.1f} s")
    finally:
        registry.stop()
        for server in (gateway, git_sshd):
            if server is not None:
                server.stop()
