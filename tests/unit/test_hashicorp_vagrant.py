"""HashiCorp's Vagrant for VirtualBox 7.1+ hosts: when setup.sh installs it, and that a download which is not
the pinned release is refused before anything is installed.

A real HTTP server on loopback, laid out like releases.hashicorp.com
(``/vagrant/<version>/vagrant_<version>_SHA256SUMS`` and ``..._linux_amd64.zip``), serves a zip
with a small ``vagrant`` program; the tampered cases flip a byte of the zip or a digit of the list.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from appliance.errors import DigestMismatch
from appliance.hashicorp_vagrant import PINNED, Release, decide, install, listed_digest


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def releases(tmp_path: Path) -> Iterator[tuple[str, Path, Release]]:
    """(base URL, the release folder, a release whose pin is the served zip's digest)."""
    root = tmp_path / "releases"
    folder = root / "vagrant" / PINNED.version
    folder.mkdir(parents=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("vagrant", f"#!/bin/sh\necho 'Vagrant {PINNED.version}'\n")
        archive.writestr("LICENSE.txt", "test\n")
    data = buffer.getvalue()
    release = Release(PINNED.version, hashlib.sha256(data).hexdigest())
    (folder / release.zip_name).write_bytes(data)
    (folder / release.sums_name).write_text(
        f"{'0' * 64}  vagrant_{PINNED.version}_darwin_arm64.dmg\n{release.zip_sha256}  {release.zip_name}\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder, release
    finally:
        server.shutdown()
        server.server_close()


def test_the_listed_and_pinned_zip_is_installed(releases: tuple[str, Path, Release], tmp_path: Path) -> None:
    base, _, release = releases
    installed = install(release, base=base, dest=tmp_path / "bin")
    assert installed == tmp_path / "bin" / "vagrant" and installed.stat().st_mode & 0o111
    assert subprocess.run([str(installed), "--version"], capture_output=True, text=True,
                          timeout=10).stdout.strip() == f"Vagrant {PINNED.version}"


def test_a_tampered_zip_is_refused_and_nothing_installed(releases: tuple[str, Path, Release], tmp_path: Path) -> None:
    base, folder, release = releases
    zip_file = folder / release.zip_name
    data = bytearray(zip_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    zip_file.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match="not the pinned and listed"):
        install(release, base=base, dest=tmp_path / "bin")
    assert not (tmp_path / "bin" / "vagrant").exists()


def test_a_list_that_disagrees_with_the_pin_is_refused(releases: tuple[str, Path, Release], tmp_path: Path) -> None:
    base, folder, release = releases
    sums = folder / release.sums_name
    # Another digest for certain: the zip's digest differs per run and starts with "f" one time in 16.
    other = ("0" if release.zip_sha256[0] != "0" else "1") + release.zip_sha256[1:]
    sums.write_text(sums.read_text().replace(release.zip_sha256, other))
    with pytest.raises(DigestMismatch, match="not the pinned"):
        install(release, base=base, dest=tmp_path / "bin")
    assert not (tmp_path / "bin").exists()
    # The real pin against a mirror serving other bytes: refused the same way.
    with pytest.raises(DigestMismatch):
        install(PINNED, base=base, dest=tmp_path / "bin")


def test_listed_digest_reads_hashicorps_format() -> None:
    sums = "abc123  vagrant_2.4.9_linux_amd64.zip\ndef456  vagrant_2.4.9-1_amd64.deb\n"
    assert listed_digest(sums, "vagrant_2.4.9_linux_amd64.zip") == "abc123"
    assert listed_digest(sums, "vagrant_2.4.9_windows_amd64.msi") is None


@pytest.mark.parametrize(("virtualbox", "vagrant", "install_it"), [
    ((), (2, 3, 4), False),              # no VirtualBox: libvirt hosts keep Debian's Vagrant
    ((7, 0, 20), (2, 3, 4), False),      # 7.0: Debian's Vagrant drives it
    ((7, 1, 4), (2, 3, 4), True),        # 7.1 needs 2.4.2+
    ((7, 2, 4), (2, 3, 7), True),        # 7.2 needs 2.4.9+
    ((7, 2, 4), (), True),               # VirtualBox and no Vagrant at all
    ((7, 2, 4), (2, 4, 9), False),       # already the pinned one (a second run of setup.sh)
    ((7, 1, 4), (2, 4, 3), False),       # a Vagrant that drives 7.1 is left alone
    ((7, 3, 0), (2, 4, 9), False),       # a line newer than any known: doctor warns; nothing newer is pinned
])
def test_when_setup_installs_hashicorps_vagrant(virtualbox: tuple[int, ...], vagrant: tuple[int, ...],
                                                install_it: bool) -> None:
    assert bool(decide(virtualbox, vagrant)) is install_it
