"""The verify boot runs the image's own code: what that code can make the verifying host do is bounded.

- Its HTTP server cannot send the verifier to another URL (a redirect to a service inside the
  host's network): redirects are not followed, a 3xx is the answer. The loopback check never
  goes through the host's proxy settings either.
- Its serial console cannot fill the work folder or the verifier's memory: more than
  ``MAX_CONSOLE_BYTES`` ends the check with a refusal, and error messages read only the tail.

Real loopback HTTP servers; the console is a real (sparse) file.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import PROJECT_ROOT
from appliance.errors import VerifyError
from appliance.verify_boot import MAX_CONSOLE_BYTES, _console_login_check, free_loopback_port, wait_http


class _Server:
    def __init__(self, answer: tuple[int, str]) -> None:
        self.paths: list[str] = []
        code, location = answer
        paths = self.paths

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                paths.append(self.path)
                self.send_response(code)
                if location:
                    self.send_header("Location", location)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers() -> Iterator[list[_Server]]:
    made: list[_Server] = []
    yield made
    for s in made:
        s.close()


def test_a_redirect_from_the_copy_is_not_followed(servers: list[_Server]) -> None:
    victim = _Server((200, ""))
    servers.append(victim)
    copy = _Server((302, f"http://127.0.0.1:{victim.port}/admin/delete-everything"))
    servers.append(copy)
    assert wait_http(f"http://127.0.0.1:{copy.port}/", time.monotonic() + 10) == 302
    time.sleep(0.2)
    assert copy.paths == ["/"] and victim.paths == [], "the verifier went where the copy sent it"


def test_the_loopback_check_ignores_the_hosts_proxy(servers: list[_Server]) -> None:
    # In a child process: urllib reads the proxy variables once per process.
    copy = _Server((200, ""))
    servers.append(copy)
    absent = f"http://127.0.0.1:{free_loopback_port()}"  # a proxy that is not there
    child = ("import sys, time; from appliance.verify_boot import wait_http; "
             "print(wait_http(sys.argv[1], time.monotonic() + 5))")
    proc = subprocess.run([sys.executable, "-c", child, f"http://127.0.0.1:{copy.port}/"], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT),
                                                       "http_proxy": absent, "HTTP_PROXY": absent})
    assert proc.returncode == 0 and proc.stdout.strip() == "200", proc.stderr[-2000:]
    assert copy.paths == ["/"]


def _flood(console: Path) -> None:
    with console.open("wb") as f:
        f.write(b"CSGHUB-APPLIANCE-LOGIN user=csghub password=pw firstboot=" + b"a" * 32 + b"\n")
        f.truncate(MAX_CONSOLE_BYTES + 1)  # a hole: the size counts, the disk is not used
        f.seek(0, 2)
        f.write(b"\nlast words of the flood\n")


def test_a_console_flood_ends_the_login_wait(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    _flood(console)
    now = time.monotonic()
    with pytest.raises(VerifyError, match=f"more than {MAX_CONSOLE_BYTES >> 20} MiB to its serial console") as err:
        _console_login_check(free_loopback_port(), console, "true", now + 30, now, "a" * 32)
    assert "last words of the flood" in err.value.reasons[0], "the tail is shown, read from the end"
    assert time.monotonic() - now < 10


def test_a_console_flood_ends_the_http_wait(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    _flood(console)
    closed = free_loopback_port()
    started = time.monotonic()
    with pytest.raises(VerifyError, match="to its serial console"):
        wait_http(f"http://127.0.0.1:{closed}/", started + 60, console=console)
    assert time.monotonic() - started < 10
