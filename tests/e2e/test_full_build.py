"""The whole product, for real: `invoke build-ova` with k3s and CSGHub, then the portal over HTTP.

Needs what only a release host has: VirtualBox (VBoxManage and its kernel driver) and the
internet (k3s's GitHub releases, OpenCSG's chart repository, the container registries the
chart's images come from). Anywhere else it skips and says which is missing; VirtualBox is
checked first, so a host without it never touches the network.

Run: `pytest -m e2e tests/e2e -s` (several hours under emulation; ~1 h with VT-x).
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
from pathlib import Path

import pytest

from appliance.config import PROJECT_ROOT, load_config
from appliance.run import run
from appliance.values import chart_hostnames, generate_values

pytestmark = pytest.mark.e2e

BUILD_TIMEOUT = 6 * 3600
INTERNET_HOSTS = [("github.com", 443), ("charts.opencsg.com", 443), ("registry-1.docker.io", 443)]


def _virtualbox_missing() -> str | None:
    vbox = shutil.which("VBoxManage") or shutil.which("vboxmanage")
    if vbox is None:
        return "VirtualBox is not installed (no VBoxManage on PATH)"
    if sys.platform.startswith("linux") and not Path("/dev/vboxdrv").exists():
        return "VirtualBox's kernel driver is not loaded (/dev/vboxdrv missing)"
    result = run([vbox, "--version"], check=False, timeout=60)
    if not result.ok:
        return f"VBoxManage --version failed: {result.stderr.strip()[:200]}"
    return None


def _internet_missing() -> str | None:
    for host, port in INTERNET_HOSTS:
        try:
            with socket.create_connection((host, port), timeout=10):
                pass
        except OSError as exc:
            return f"no internet: cannot reach {host}:{port} ({exc})"
    return None


@pytest.fixture(scope="module")
def release_host() -> None:
    reason = _virtualbox_missing() or _internet_missing()
    if reason:
        pytest.skip(reason)


def _http_get(url: str, host_header: str, timeout: float = 10) -> int:
    request = urllib.request.Request(url, headers={"Host": host_header})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_full_build_serves_the_portal(release_host: None, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    sets = [
        "provider=virtualbox",
        f"output.dir={work / 'dist'}",
        f"output.build_dir={work / 'build'}",
        f"vm.name=csghub-e2e-{os.getpid()}",
    ]
    argv = ["invoke", "build-ova", "--on-error", "destroy"]
    for s in sets:
        argv += ["--set", s]
    run(argv, cwd=PROJECT_ROOT, stream=True, timeout=BUILD_TIMEOUT)

    ovas = sorted((work / "dist").glob("*.ova"))
    assert len(ovas) == 1, ovas
    report = json.loads((work / "dist" / "build-report.json").read_text())
    assert report, "empty build report"
    # Every image of the declared set (build/manifests/images.txt) is recorded with its digest.
    declared = (work / "build" / "manifests" / "images.txt").read_text().split("\n")
    declared_names = {line.split(" ")[0] for line in declared if line}
    recorded = {image["name"]: image["digest"] for image in report["versions"]["images"]}
    assert declared_names and declared_names <= set(recorded), declared_names - set(recorded)
    assert all(digest.startswith("sha256:") for digest in recorded.values())

    # Import the OVA as an evaluator would, start it, and reach CSGHub through the NAT
    # forward on 127.0.0.1 with the names the chart routes (docs/networking.md).
    vbox = shutil.which("VBoxManage") or "VBoxManage"
    name = f"csghub-e2e-import-{os.getpid()}"
    run([vbox, "import", str(ovas[0]), "--vsys", "0", "--vmname", name], timeout=3600)
    try:
        run([vbox, "startvm", name, "--type", "headless"], timeout=300)
        cfg = load_config(None, sets)
        names = chart_hostnames(generate_values(cfg))
        port = cfg.http_port()
        assert port is not None
        # First boot makes this copy's secrets and brings the stack up from local images.
        deadline = time.monotonic() + 3600
        for host in (names["portal"], names["casdoor"]):
            while True:
                try:
                    status = _http_get(f"http://127.0.0.1:{port.host}/", f"{host}:{port.host}")
                except OSError:
                    status = 0
                if 200 <= status < 400:
                    break
                assert time.monotonic() < deadline, f"http://{host}:{port.host}/ answered {status}"
                time.sleep(15)
    finally:
        run([vbox, "controlvm", name, "poweroff"], check=False, timeout=120)
        time.sleep(5)
        run([vbox, "unregistervm", name, "--delete"], check=False, timeout=600)
