"""The whole product, for real: `invoke build-ova` with k3s and CSGHub, then the copy an evaluator imports.

Needs what only a release host has: VirtualBox (VBoxManage and its kernel driver) and the
internet (k3s's GitHub releases, OpenCSG's chart repository, the container registries the
chart's images come from). Anywhere else it skips and says which is missing; VirtualBox is
checked first (the same driver check as `invoke doctor`), so a host without it never touches
the network.

From nothing: it makes the VirtualBox base box first (`invoke base-box`, cached: a no-op when the
box is there), builds, checks the build report (the boot check proved the first boot and got the
portal's HTTP status), imports the OVA as an evaluator does (`--eula accept`, VirtualBox's own
success line), starts it and reaches the portal and the login service through the NAT forward on
127.0.0.1, without following redirects and without the host's proxies. Whatever it made (the
build VM, the imported VM, its work folder) is removed at the end, passed or failed.

Run: `pytest -m e2e tests/e2e -s` (several hours under emulation; ~1 h with VT-x). The helpers
below are unit-tested in tests/unit/test_e2e_helpers.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from appliance.config import PROJECT_ROOT, load_config
from appliance.run import run
from appliance.values import chart_hostnames, generate_values

pytestmark = pytest.mark.e2e

BUILD_TIMEOUT = 6 * 3600
FIRST_BOOT_TIMEOUT = 3600
INTERNET_HOSTS = [("github.com", 443), ("charts.opencsg.com", 443), ("registry-1.docker.io", 443)]


def virtualbox_missing() -> str | None:
    """Why VirtualBox cannot run VMs here, or None: VBoxManage, then its kernel driver (as doctor checks it)."""
    from appliance.providers.virtualbox import vbox_driver_missing

    vbox = shutil.which("VBoxManage") or shutil.which("vboxmanage")
    if vbox is None:
        return "VirtualBox is not installed (no VBoxManage on PATH)"
    missing = vbox_driver_missing()
    if missing:
        return f"VirtualBox's kernel driver: {missing}"
    result = run([vbox, "--version"], check=False, timeout=60)
    if not result.ok:
        return f"VBoxManage --version failed: {result.stderr.strip()[:200]}"
    return None


def internet_missing() -> str | None:
    for host, port in INTERNET_HOSTS:
        try:
            with socket.create_connection((host, port), timeout=10):
                pass
        except OSError as exc:
            return f"no internet: cannot reach {host}:{port} ({exc})"
    return None


@pytest.fixture(scope="module")
def release_host() -> None:
    reason = virtualbox_missing() or internet_missing()
    if reason:
        pytest.skip(reason)


def invoke_argv(task: str, sets: Sequence[str], *flags: str) -> list[str]:
    """This interpreter's Invoke (not whatever `invoke` PATH finds) running ``task`` with ``--set`` each of ``sets``."""
    argv = [sys.executable, "-m", "invoke", task, *flags]
    for item in sets:
        argv += ["--set", item]
    return argv


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx is the answer: its Location may name a host this machine cannot resolve


# Straight to the loopback forward: no proxy from the environment, no redirect followed.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


def http_status(url: str, host_header: str, timeout: float = 10) -> int:
    """The status of one GET of ``url`` sent with ``Host: host_header``; 0 when nothing answered."""
    request = urllib.request.Request(url, headers={"Host": host_header})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something on this machine already listens on ``host:port`` (binding it fails). Checked before the
    imported copy starts: an answer there is then the copy's (VirtualBox's NAT forward binds that port), not
    another service's that happened to hold it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def wait_for_status(url: str, host_header: str, wanted: int, deadline: float, poll: float = 15) -> int:
    """Poll until ``url`` answers ``wanted``; the last status seen (``wanted`` unless the deadline passed)."""
    status = http_status(url, host_header)
    while status != wanted and time.monotonic() < deadline:
        time.sleep(poll)
        status = http_status(url, host_header)
    return status


def report_problems(report: Mapping[str, Any], declared: Sequence[str]) -> list[str]:
    """What the build report lacks for a release: the verified OVA, the boot check's first-boot proof
    and portal status, and a digest for every declared image. Empty when it is all there."""
    problems = []
    ova = report.get("ova") or {}
    if ova.get("verified") is not True:
        problems.append("the published OVA is not the one verify checked (ova.verified)")
    boot = ((ova.get("verification") or {}).get("boot")) or {}
    if boot.get("first_boot_proved") is not True:
        problems.append("the boot check did not prove the first boot (ova.verification.boot.first_boot_proved)")
    if boot.get("http_status") != 200:
        problems.append(f"the boot check's portal status is {boot.get('http_status')!r}, not 200 "
                        f"(ova.verification.boot.http_status; skipped: {boot.get('http_skipped')!r})")
    images = {i.get("name"): i.get("digest") for i in (report.get("versions") or {}).get("images") or []}
    if not declared:
        problems.append("the build declared no image (build/manifests/images.txt)")
    lacking = [name for name in declared if name not in images]
    if lacking:
        problems.append(f"no recorded digest for {len(lacking)} declared image(s): {', '.join(lacking[:5])}")
    bad = [name for name, digest in images.items() if not str(digest).startswith("sha256:")]
    if bad:
        problems.append(f"malformed digests for: {', '.join(bad[:5])}")
    return problems


def imported(output: str) -> bool:
    """VBoxManage import exits 0 even when it refuses (an EULA not accepted): its own line decides."""
    return "Successfully imported the appliance." in output


def test_full_build_serves_the_portal(release_host: None, tmp_path: Path) -> None:
    from appliance.export.virtualbox import unregister_and_delete
    from appliance.images import read_image_list

    work = tmp_path / "work"
    work.mkdir()
    sets = [
        "provider=virtualbox",
        f"output.dir={work / 'dist'}",
        f"output.build_dir={work / 'build'}",
        f"vm.name=csghub-e2e-{os.getpid()}",
    ]
    vbox = shutil.which("VBoxManage") or "VBoxManage"
    name = f"csghub-e2e-import-{os.getpid()}"
    try:
        # The box the build boots, made here from the Debian archive (a no-op when cached). The
        # build-ova pipeline may make it itself (issue 20); this keeps the test whole either way.
        run(invoke_argv("base-box", sets), cwd=PROJECT_ROOT, stream=True, timeout=3600)
        run(invoke_argv("build-ova", sets, "--on-error", "destroy"), cwd=PROJECT_ROOT, stream=True,
            timeout=BUILD_TIMEOUT)

        ovas = sorted((work / "dist").glob("*.ova"))
        assert len(ovas) == 1, ovas
        report = json.loads((work / "dist" / "build-report.json").read_text())
        images_txt = work / "build" / "manifests" / "images.txt"
        declared = [n for n, _ in read_image_list(images_txt)]
        assert report_problems(report, declared) == []

        # Import the OVA as an evaluator would, start it, and reach CSGHub through the NAT forward on
        # 127.0.0.1 with the names the chart routes (docs/networking.md).
        result = run([vbox, "import", str(ovas[0]), "--vsys", "0", "--vmname", name, "--eula", "accept",
                      "--basefolder", str(work / "vms")], timeout=3600)
        assert imported(result.stdout), result.stdout + result.stderr
        cfg = load_config(None, sets)
        names = chart_hostnames(generate_values(cfg))
        port = cfg.http_port()
        assert port is not None
        assert not port_taken(port.host), (f"127.0.0.1:{port.host} is in use before the imported copy starts: "
                                           "its answers would not be CSGHub's; free the port and run again")
        run([vbox, "startvm", name, "--type", "headless"], timeout=300)
        # First boot makes this copy's secrets and brings the stack up from local images.
        deadline = time.monotonic() + FIRST_BOOT_TIMEOUT
        url = f"http://127.0.0.1:{port.host}/"
        assert wait_for_status(url, f"{names['portal']}:{port.host}", 200, deadline) == 200
        assert wait_for_status(url, f"{names['casdoor']}:{port.host}", 200, deadline) == 200
    finally:
        try:
            unregister_and_delete(name)  # waits until VirtualBox has released the VM's session
        finally:  # the build VM goes even when the imported one could not be removed
            run(invoke_argv("destroy", sets), cwd=PROJECT_ROOT, check=False, timeout=1800)
