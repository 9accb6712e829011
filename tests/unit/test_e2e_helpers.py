"""The e2e test's helpers (tests/e2e/test_full_build.py), here where the e2e test itself cannot run."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.config import PROJECT_ROOT
from tests.e2e.test_full_build import (
    http_status,
    imported,
    invoke_argv,
    port_taken,
    report_problems,
    virtualbox_missing,
    wait_for_status,
)

DIGEST = "sha256:" + "a" * 64


@pytest.fixture
def server() -> Iterator[tuple[int, list[str]]]:
    """Loopback: 302 to a name nobody resolves on /elsewhere, 503 twice then 200 on /slow, 200 on /."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(f"{self.headers.get('Host')} {self.path}")
            if self.path == "/elsewhere":
                self.send_response(302)
                self.send_header("Location", "http://csghub.invalid./login")
            elif self.path == "/slow":
                self.send_response(200 if sum(s.endswith("/slow") for s in seen) > 2 else 503)
            else:
                self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1]), seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_http_follows_no_redirect_and_no_proxy(server: tuple[int, list[str]],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    port, seen = server
    # A proxy from the environment would swallow the request (nothing listens on port 9 here).
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert http_status(f"http://127.0.0.1:{port}/elsewhere", "csghub.localhost:30080") == 302
    assert http_status(f"http://127.0.0.1:{port}/", "csghub.localhost:30080") == 200
    assert seen == ["csghub.localhost:30080 /elsewhere", "csghub.localhost:30080 /"]  # the Host as sent
    assert http_status("http://127.0.0.1:9/", "x") == 0  # nothing answers


def test_wait_for_status_polls_until_the_wanted_answer(server: tuple[int, list[str]]) -> None:
    port, _ = server
    assert wait_for_status(f"http://127.0.0.1:{port}/slow", "h", 200, time.monotonic() + 30, poll=0.1) == 200
    # The deadline passed: the last status seen, for the failure message.
    assert wait_for_status(f"http://127.0.0.1:{port}/elsewhere", "h", 200, time.monotonic() + 0.3, poll=0.1) == 302


def good_report() -> dict[str, Any]:
    return {
        "ova": {"verified": True, "verification": {"boot": {"first_boot_proved": True, "http_status": 200,
                                                            "http_skipped": None}}},
        "versions": {"images": [{"name": "docker.io/library/redis:7.4.9", "digest": DIGEST}]},
    }


def test_report_problems_name_what_a_release_lacks() -> None:
    declared = ["docker.io/library/redis:7.4.9"]
    assert report_problems(good_report(), declared) == []
    report = good_report()
    report["ova"]["verification"]["boot"].update(first_boot_proved=False, http_status=None,
                                                 http_skipped="built without CSGHub")
    report["ova"]["verified"] = False
    problems = report_problems(report, [*declared, "docker.io/library/busybox:latest"])
    assert problems == [
        "the published OVA is not the one verify checked (ova.verified)",
        "the boot check did not prove the first boot (ova.verification.boot.first_boot_proved)",
        "the boot check's portal status is None, not 200 (ova.verification.boot.http_status; skipped: "
        "'built without CSGHub')",
        "no recorded digest for 1 declared image(s): docker.io/library/busybox:latest",
    ]
    assert report_problems({}, []) == [
        "the published OVA is not the one verify checked (ova.verified)",
        "the boot check did not prove the first boot (ova.verification.boot.first_boot_proved)",
        "the boot check's portal status is None, not 200 (ova.verification.boot.http_status; skipped: None)",
        "the build declared no image (build/manifests/images.txt)",
    ]


def test_import_success_is_read_from_vboxmanages_own_line() -> None:
    assert imported("0%...100%\nSuccessfully imported the appliance.\n")
    assert not imported("VBoxManage: error: Cannot import until the license agreement listed above is accepted.\n")


def test_the_tasks_the_e2e_test_runs_exist_in_this_interpreters_invoke() -> None:
    argv = invoke_argv("--list", [])
    assert argv[:3] == [sys.executable, "-m", "invoke"]
    listed = subprocess.run(argv, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    tasks = {line.split()[0] for line in listed.splitlines() if line.startswith("  ")}
    assert {"base-box", "build-ova", "destroy"} <= tasks
    assert invoke_argv("build-ova", ["a=1", "b=2"], "--on-error", "destroy")[3:] == [
        "build-ova", "--on-error", "destroy", "--set", "a=1", "--set", "b=2"]


def test_virtualbox_gate_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert virtualbox_missing() == "VirtualBox is not installed (no VBoxManage on PATH)"
    if Path("/dev/vboxdrv").exists():
        pytest.skip("this host has VirtualBox's kernel driver")
    (tmp_path / "VBoxManage").write_text("#!/bin/sh\necho 7.2.4r170995\n")
    (tmp_path / "VBoxManage").chmod(0o755)
    assert virtualbox_missing() == ("VirtualBox's kernel driver: missing: /dev/vboxdrv does not exist (the vboxdrv "
                                    "kernel module is not loaded)")


def test_port_taken_sees_a_listener_on_the_forwarded_port() -> None:
    """Before the imported copy starts, its HTTP port must be free: else another service would answer the asserts."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = int(listener.getsockname()[1])
        assert port_taken(port)
    assert not port_taken(port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as wildcard:  # a service on every address holds it too
        wildcard.bind(("0.0.0.0", 0))
        wildcard.listen(1)
        assert port_taken(int(wildcard.getsockname()[1]))
